//! `palisade jobs`: the durable queue's jobs, seen and handled from a shell.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use palisade_queue::{Job, JobState, ListFilter, Queue, QueueStats, format_utc};

/// Options of `palisade jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    /// The queue's database: `postgres://user@host/db` or `sqlite:path`.
    #[arg(long, short, value_name = "URL", env = "PALISADE_DATABASE_URL")]
    pub database: String,
    /// JSON instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// What `palisade jobs` does.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this state (available, scheduled, running, retryable, completed,
        /// cancelled, discarded).
        #[arg(long, value_parser = state)]
        state: Option<JobState>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one job, its errors included.
    Show {
        /// The job's id.
        id: i64,
    },
    /// Run a finished (completed, cancelled, discarded) or waiting job again now.
    Retry {
        /// The job's id.
        id: i64,
    },
    /// Cancel a job that has not finished.
    Cancel {
        /// The job's id.
        id: i64,
    },
    /// Jobs per queue and state, and the oldest due job's wait.
    Stats,
}

fn state(name: &str) -> Result<JobState, String> {
    JobState::parse(name).ok_or_else(|| {
        let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        format!("not a state; one of {}", names.join(", "))
    })
}

/// Runs `palisade jobs`: 0 when done, 1 when the job does not exist or could not
/// be changed, 2 on an error (printed).
pub async fn run(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let q = Queue::connect(&args.database).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        JobsCommand::List {
            queue,
            state,
            kind,
            limit,
        } => {
            let jobs = q
                .list(&ListFilter {
                    queue,
                    state,
                    kind,
                    limit,
                })
                .await?;
            list(&mut out, args.json, &jobs)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id } => match q.job(id).await? {
            Some(job) if args.json => {
                writeln!(out, "{}", serde_json::to_string_pretty(&job)?)?;
                Ok(ExitCode::SUCCESS)
            }
            Some(job) => {
                show(&mut out, &job)?;
                Ok(ExitCode::SUCCESS)
            }
            None => {
                let _ = writeln!(std::io::stderr(), "palisade: no job {id}");
                Ok(ExitCode::from(1))
            }
        },
        JobsCommand::Retry { id } => changed(&mut out, args.json, id, "retried", q.retry(id).await?),
        JobsCommand::Cancel { id } => changed(&mut out, args.json, id, "cancelled", q.cancel(id).await?),
        JobsCommand::Stats => {
            stats(&mut out, args.json, &q.stats().await?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints `jobs` as a table, or as JSON.
fn list(out: &mut impl Write, json: bool, jobs: &[Job]) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(jobs)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<12} {:<20} {:<10} {:>7}  last error",
        "id", "queue", "kind", "state", "attempt"
    )?;
    for j in jobs {
        let last = j.errors.last().map_or("", |e| e.error.as_str());
        writeln!(
            out,
            "{:>8}  {:<12} {:<20} {:<10} {:>7}  {}",
            j.id,
            clip(&j.queue, 12),
            clip(&j.kind, 20),
            j.state,
            format!("{}/{}", j.attempt, j.max_attempts),
            clip(last, 60)
        )?;
    }
    Ok(())
}

/// Prints each queue's counts by state and oldest wait, as a table or as JSON.
fn stats(out: &mut impl Write, json: bool, stats: &[QueueStats]) -> anyhow::Result<()> {
    if json {
        let v: Vec<_> = stats
            .iter()
            .map(|s| {
                let mut counts = serde_json::Map::new();
                for st in JobState::ALL {
                    counts.insert(st.as_str().into(), s.counts[st.code() as usize].into());
                }
                serde_json::json!({"queue": s.queue, "counts": counts, "oldest_wait_ms": s.oldest_wait_ms})
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    write!(out, "{:<16}", "queue")?;
    for st in JobState::ALL {
        write!(out, " {:>10}", st.as_str())?;
    }
    writeln!(out, " {:>14}", "oldest wait")?;
    for s in stats {
        write!(out, "{:<16}", clip(&s.queue, 16))?;
        for c in s.counts {
            write!(out, " {c:>10}")?;
        }
        writeln!(out, " {:>12.1}s", s.oldest_wait_ms as f64 / 1e3)?;
    }
    Ok(())
}

fn changed(out: &mut impl Write, json: bool, id: i64, what: &str, done: bool) -> anyhow::Result<ExitCode> {
    if json {
        writeln!(out, "{}", serde_json::json!({"id": id, what: done}))?;
    } else if done {
        writeln!(out, "job {id} {what}")?;
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "palisade: job {id} was not {what} (no such job, or not in a state that allows it)"
        );
    }
    Ok(if done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn show(out: &mut impl Write, j: &Job) -> std::io::Result<()> {
    writeln!(out, "job {}  {} on {}  {}", j.id, j.kind, j.queue, j.state)?;
    writeln!(
        out,
        "  attempt {}/{}, priority {}",
        j.attempt, j.max_attempts, j.priority
    )?;
    writeln!(out, "  args {}", j.args)?;
    if !j.tags.is_empty() {
        writeln!(out, "  tags {}", j.tags.join(", "))?;
    }
    if let Some(k) = &j.unique_key {
        writeln!(out, "  unique key {k}")?;
    }
    writeln!(
        out,
        "  enqueued {}  scheduled {}",
        format_utc(j.inserted_at),
        format_utc(j.scheduled_at)
    )?;
    if let Some(t) = j.attempted_at {
        writeln!(out, "  last attempt {}", format_utc(t))?;
    }
    if let Some(t) = j.finished_at {
        writeln!(out, "  finished {}", format_utc(t))?;
    }
    for e in &j.errors {
        writeln!(
            out,
            "  attempt {} failed at {}: {}",
            e.attempt,
            format_utc(e.at),
            e.error
        )?;
    }
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}
