//! The queue's load harness (run by `bench/queue.sh`; not a test):
//!
//! 1. throughput: `--jobs` no-op jobs enqueued in batches of `--batch`, then run by
//!    one runner of `--concurrency`; jobs per second from the first fetch to the
//!    last completion recorded (the runner's shutdown flushes it);
//! 2. latency: one job at a time at `--rate` per second for `--seconds`, to an idle
//!    runner; the time from each enqueue call to its worker starting, p50 and p99.
//!
//! ```text
//! cargo run --release -p palisade-queue --example queue_bench -- --database postgres://... --jobs 100000
//! ```
#![allow(clippy::print_stdout)] // a harness: its output is its result

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_queue::{JobContext, JobError, NewJob, Queue, QueueConfig, Runner, RunnerConfig, Worker};
use tokio::sync::Notify;

struct Args {
    database: String,
    jobs: u64,
    batch: usize,
    concurrency: usize,
    rate: u64,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        database: "sqlite::memory:".into(),
        jobs: 20_000,
        batch: 1000,
        concurrency: 100,
        rate: 200,
        seconds: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let (k, v) = (pair[0].as_str(), pair.get(1).map_or("", String::as_str));
        let n = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{k} takes a number, not {v:?}"))
        };
        match k {
            "--database" => a.database = v.to_string(),
            "--jobs" => a.jobs = n(),
            "--batch" => a.batch = n() as usize,
            "--concurrency" => a.concurrency = n() as usize,
            "--rate" => a.rate = n(),
            "--seconds" => a.seconds = n(),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// Counts runs; records, for the latency run, each job's time from enqueue to start.
struct Noop {
    epoch: Instant,
    done: AtomicU64,
    target: AtomicU64,
    all_done: Notify,
    latencies: std::sync::Mutex<Vec<u64>>,
}

impl Worker for Shared {
    const KIND: &'static str = "noop";
    /// Nanoseconds since the harness's epoch at the enqueue call (0: not timed).
    type Args = u64;

    async fn work(&self, _job: JobContext, sent: u64) -> Result<(), JobError> {
        let this = &self.0;
        if sent > 0 {
            let now = this.epoch.elapsed().as_nanos() as u64;
            this.latencies.lock().unwrap().push(now.saturating_sub(sent));
        }
        if this.done.fetch_add(1, Ordering::SeqCst) + 1 == this.target.load(Ordering::SeqCst) {
            this.all_done.notify_one();
        }
        Ok(())
    }
}

/// The worker: the counters, shared with the harness.
#[derive(Clone)]
struct Shared(Arc<Noop>);

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1e6
}

#[tokio::main]
async fn main() {
    let a = args();
    let q = Queue::connect(&a.database).await.expect("connect");
    let noop = Arc::new(Noop {
        epoch: Instant::now(),
        done: AtomicU64::new(0),
        target: AtomicU64::new(a.jobs),
        all_done: Notify::new(),
        latencies: std::sync::Mutex::default(),
    });
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", a.concurrency)],
        ..RunnerConfig::default()
    };

    // Throughput.
    let jobs: Vec<NewJob> = (0..a.batch)
        .map(|_| NewJob::new("noop", &0u64).unwrap())
        .collect();
    let enqueue_start = Instant::now();
    let mut left = a.jobs;
    while left > 0 {
        let n = (left as usize).min(a.batch);
        q.enqueue_many(&jobs[..n]).await.expect("enqueue");
        left -= n as u64;
    }
    let enqueue = enqueue_start.elapsed();
    let run_start = Instant::now();
    let done = noop.all_done.notified();
    let runner = Runner::new(q.clone(), config.clone())
        .register(Shared(noop.clone()))
        .start()
        .await
        .expect("start");
    done.await;
    runner.shutdown(Duration::from_secs(30)).await;
    let run = run_start.elapsed();
    println!(
        "backend={} jobs={} enqueue_per_s={:.0} run_per_s={:.0}",
        q.backend(),
        a.jobs,
        a.jobs as f64 / enqueue.as_secs_f64(),
        a.jobs as f64 / run.as_secs_f64()
    );

    // Latency at a steady rate, to an idle runner.
    let total = a.rate * a.seconds;
    noop.done.store(0, Ordering::SeqCst);
    noop.target.store(total, Ordering::SeqCst);
    let done = noop.all_done.notified();
    let runner = Runner::new(q.clone(), config)
        .register(Shared(noop.clone()))
        .start()
        .await
        .expect("start");
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / a.rate.max(1)));
    for _ in 0..total {
        tick.tick().await;
        let sent = noop.epoch.elapsed().as_nanos() as u64;
        q.enqueue(NewJob::new("noop", &sent).unwrap())
            .await
            .expect("enqueue");
    }
    done.await;
    runner.shutdown(Duration::from_secs(30)).await;
    let mut l = noop.latencies.lock().unwrap().clone();
    l.sort_unstable();
    println!(
        "backend={} rate={} latency_p50_ms={:.2} latency_p99_ms={:.2}",
        q.backend(),
        a.rate,
        quantile(&l, 0.5),
        quantile(&l, 0.99)
    );
}
