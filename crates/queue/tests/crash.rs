//! Fault tests with real processes: worker processes (this test binary, run again as
//! `worker_process`) killed with SIGKILL mid-run, and the PostgreSQL server
//! restarted under load. Every job must complete; a job that ran twice (its
//! worker killed after running it, before recording it) is counted and reported:
//! the queue delivers at least once.
//!
//! The restart test stops the run's shared PostgreSQL server, so `scripts/test`
//! runs it alone, after the rest (`-E 'test(/postgres_restart/)'`).

#![allow(clippy::print_stdout)] // the worker process reports over stdout; the tests print what they measured

use std::collections::HashMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use palisade_queue::{
    JobContext, JobError, JobState, NewJob, Queue, QueueConfig, Runner, RunnerConfig, Worker,
};
use palisade_testkit::postgres_ctl as pg_ctl;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

mod support;

use support::{Backend, fresh};

const JOBS: usize = 10_000;

/// Appends each job's id to a file when it runs: the file counts the runs.
struct Record {
    runs: Mutex<std::fs::File>,
}

impl Worker for Record {
    const KIND: &'static str = "record";
    type Args = u32;

    async fn work(&self, job: JobContext, _n: u32) -> Result<(), JobError> {
        let mut f = self.runs.lock().unwrap();
        writeln!(f, "{}", job.id)?;
        Ok(())
    }
}

/// The worker process: runs `record` jobs from `PALISADE_CRASH_URL`, appending to
/// `PALISADE_CRASH_RUNS`, printing `ran` after every 100 jobs and `drained` once
/// no job is left to run, until killed. Not a test on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash tests as a worker process"]
async fn worker_process() {
    let (Ok(url), Ok(runs)) = (
        std::env::var("PALISADE_CRASH_URL"),
        std::env::var("PALISADE_CRASH_RUNS"),
    ) else {
        return;
    };
    let q = Queue::connect(&url).await.unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(runs)
        .unwrap();
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", 16)],
        lease: Duration::from_millis(900),
        rescue_interval: Duration::from_millis(300),
        poll_interval: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let _handle = Runner::new(q.clone(), config)
        .register(Record {
            runs: Mutex::new(file),
        })
        .start()
        .await
        .unwrap();
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(stats) = q.stats().await else { continue };
        let counts = stats.iter().fold([0i64; 7], |mut acc, s| {
            for (a, c) in acc.iter_mut().zip(s.counts) {
                *a += c;
            }
            acc
        });
        let completed = counts[JobState::Completed.code() as usize];
        if completed / 100 > last / 100 {
            println!("ran {completed}");
        }
        last = completed;
        let waiting: i64 = [
            JobState::Available,
            JobState::Scheduled,
            JobState::Running,
            JobState::Retryable,
        ]
        .iter()
        .map(|s| counts[s.code() as usize])
        .sum();
        if waiting == 0 {
            println!("drained");
        }
    }
}

/// Starts a worker process on `url`, its runs appended to `runs`.
fn spawn_worker(url: &str, runs: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PALISADE_CRASH_URL", url)
        .env("PALISADE_CRASH_RUNS", runs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads the worker's lines until one satisfies `until`.
async fn read_until(
    child: &mut Child,
    lines: &mut Option<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>>,
    until: impl Fn(&str) -> bool,
) {
    let reader = lines.get_or_insert_with(|| BufReader::new(child.stdout.take().unwrap()).lines());
    while let Some(line) = reader.next_line().await.unwrap() {
        if until(&line) {
            return;
        }
    }
    panic!("the worker process ended before saying so");
}

/// How many times each job ran, from the runs file.
fn runs(path: &std::path::Path) -> HashMap<i64, u32> {
    let mut out = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Ok(id) = line.parse() {
            *out.entry(id).or_default() += 1;
        }
    }
    out
}

/// Enqueues `JOBS` record jobs in batches; returns a fresh directory and the runs
/// file in it that workers append to.
async fn enqueue_jobs(q: &Queue, tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "palisade-{tag}-{}-{:x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs: Vec<NewJob> = (0..JOBS as u32)
        .map(|n| NewJob::new("record", &n).unwrap())
        .collect();
    for chunk in jobs.chunks(1000) {
        q.enqueue_many(chunk).await.unwrap();
    }
    let runs = dir.join("runs");
    (dir, runs)
}

fn completed_at_least(n: u64) -> impl Fn(&str) -> bool {
    move |line| {
        line.strip_prefix("ran ")
            .and_then(|c| c.parse::<u64>().ok())
            .is_some_and(|c| c >= n)
    }
}

async fn every_job_completes_when_workers_are_killed(b: Backend) {
    let (q, db) = fresh(b).await;
    let (dir, runs_file) = enqueue_jobs(&q, "crash").await;
    let work = async {
        // Two workers killed mid-run, one after the other; a third finishes.
        for kill_at in [2_000, 6_000] {
            let mut w = spawn_worker(&db.url, &runs_file);
            let mut lines = None;
            read_until(&mut w, &mut lines, completed_at_least(kill_at)).await;
            w.start_kill().unwrap(); // SIGKILL
            w.wait().await.unwrap();
        }
        let mut last = spawn_worker(&db.url, &runs_file);
        let mut lines = None;
        read_until(&mut last, &mut lines, |l| l == "drained").await;
        last.start_kill().unwrap();
        last.wait().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(240), work)
        .await
        .expect("the jobs did not all complete within 4 minutes");

    let stats = q.stats().await.unwrap();
    let completed: i64 = stats
        .iter()
        .map(|s| s.counts[JobState::Completed.code() as usize])
        .sum();
    let other: i64 = stats.iter().map(|s| s.counts.iter().sum::<i64>()).sum::<i64>() - completed;
    assert_eq!(
        (completed, other),
        (JOBS as i64, 0),
        "every job completed, none lost or stuck"
    );
    let runs = runs(&runs_file);
    assert_eq!(runs.len(), JOBS, "every job ran");
    let twice = runs.values().filter(|&&n| n > 1).count();
    let rescued = q
        .list(&palisade_queue::ListFilter {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .filter(|j| j.errors.iter().any(|e| e.error.starts_with("lease expired")))
        .count();
    println!(
        "{b:?}: {JOBS} jobs, 2 workers killed: all completed; {twice} ran more than once; {rescued} rescued after a lost lease"
    );
    assert!(
        twice <= 2 * 16 + 1000,
        "{twice} jobs ran twice: more than two killed batches could explain"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_job_completes_when_workers_are_killed() {
    every_job_completes_when_workers_are_killed(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_job_completes_when_workers_are_killed() {
    every_job_completes_when_workers_are_killed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_load_loses_nothing() {
    let (q, db) = fresh(Backend::Postgres).await;
    let (dir, runs_file) = enqueue_jobs(&q, "restart").await;
    let work = async {
        let mut w = spawn_worker(&db.url, &runs_file);
        let mut lines = None;
        read_until(&mut w, &mut lines, completed_at_least(3_000)).await;
        pg_ctl("-m immediate stop").await;
        // Down: an enqueue is an error the caller can act on, not a hang or a panic.
        match q.enqueue(NewJob::new("record", &0u32).unwrap()).await {
            Err(e) => assert!(e.is_unavailable(), "{e}"),
            Ok(e) => panic!("enqueued {e:?} into a stopped server"),
        }
        pg_ctl("start").await;
        // The same worker process: it reconnects and drains the queue.
        read_until(&mut w, &mut lines, |l| l == "drained").await;
        w.start_kill().unwrap();
        w.wait().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(240), work)
        .await
        .expect("the jobs did not all complete within 4 minutes of a restart");
    let q = Queue::connect(&db.url).await.unwrap();
    let stats = q.stats().await.unwrap();
    let completed: i64 = stats
        .iter()
        .map(|s| s.counts[JobState::Completed.code() as usize])
        .sum();
    assert_eq!(completed, JOBS as i64, "every job completed after the restart");
    let runs = runs(&runs_file);
    assert_eq!(runs.len(), JOBS);
    let twice = runs.values().filter(|&&n| n > 1).count();
    println!("postgres restarted mid-load: {JOBS} jobs completed; {twice} ran more than once");
    let _ = std::fs::remove_dir_all(dir);
}

/// Enqueues the unique job named by `PALISADE_RACE_KEY` into `PALISADE_RACE_URL`
/// once it reads a line on stdin (so two processes start together), and prints
/// its id and whether it was a duplicate. Not a test on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the unique race test as a process"]
async fn enqueue_process() {
    let (Ok(url), Ok(key)) = (
        std::env::var("PALISADE_RACE_URL"),
        std::env::var("PALISADE_RACE_KEY"),
    ) else {
        return;
    };
    let q = Queue::connect(&url).await.unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let job = NewJob::new("record", &7u32)
        .unwrap()
        .unique(palisade_queue::Unique::by_key(key));
    let e = q.enqueue(job).await.unwrap();
    println!("raced {} {}", e.id, e.duplicate);
}

async fn two_processes_racing_to_enqueue_a_unique_job_leave_one_row(b: Backend) {
    use tokio::io::AsyncWriteExt;
    let (q, db) = fresh(b).await;
    let mut racers = Vec::new();
    for _ in 0..2 {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "enqueue_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PALISADE_RACE_URL", &db.url)
            .env("PALISADE_RACE_KEY", "order-42")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        racers.push(child);
    }
    // Both connected (their schema step done); go at once.
    for r in &mut racers {
        r.stdin.take().unwrap().write_all(b"go\n").await.unwrap();
    }
    let mut answers = Vec::new();
    for r in racers {
        let out = r.wait_with_output().await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let line = (text.lines())
            .find_map(|l| l.split("raced ").nth(1))
            .unwrap_or_else(|| {
                panic!(
                    "a racer said nothing: {text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string();
        answers.push(line);
    }
    let ids: Vec<&str> = answers.iter().map(|a| a.split(' ').next().unwrap()).collect();
    assert_eq!(ids[0], ids[1], "{answers:?}");
    assert_eq!(
        answers.iter().filter(|a| a.ends_with("false")).count(),
        1,
        "{answers:?}"
    );
    let rows = q.list(&palisade_queue::ListFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_processes_racing_to_enqueue_a_unique_job_leave_one_row() {
    two_processes_racing_to_enqueue_a_unique_job_leave_one_row(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_processes_racing_to_enqueue_a_unique_job_leave_one_row() {
    two_processes_racing_to_enqueue_a_unique_job_leave_one_row(Backend::Sqlite).await;
}
