//! apalis (PostgreSQL backend) under the workload of palisade-queue's
//! `queue_bench`: `--jobs` no-op jobs pushed in batches of `--batch`, then run by
//! one worker of `--concurrency` (fetching batches of that size); then one job at a
//! time at `--rate` per second for `--seconds` to an idle worker listening for
//! notifications, timing enqueue to start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::{Config, PgPool, PostgresStorage};

struct Args {
    database: String,
    jobs: u64,
    batch: usize,
    concurrency: usize,
    rate: u64,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args { database: String::new(), jobs: 20_000, batch: 1000, concurrency: 100, rate: 200, seconds: 5 };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--database" => a.database = v,
            "--jobs" => a.jobs = v.parse().unwrap(),
            "--batch" => a.batch = v.parse().unwrap(),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--rate" => a.rate = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    target: AtomicU64,
    latencies: std::sync::Mutex<Vec<u64>>,
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

async fn noop(sent: u64, c: Data<Arc<Counters>>, w: WorkerContext) -> Result<(), BoxDynError> {
    if sent > 0 {
        let now = EPOCH.get().unwrap().elapsed().as_nanos() as u64;
        c.latencies.lock().unwrap().push(now.saturating_sub(sent));
    }
    if c.done.fetch_add(1, Ordering::SeqCst) + 1 == c.target.load(Ordering::SeqCst) {
        w.stop()?;
    }
    Ok(())
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
}

#[tokio::main]
async fn main() {
    let a = args();
    EPOCH.set(Instant::now()).unwrap();
    let pool = PgPool::connect(&a.database).await.unwrap();
    PostgresStorage::setup(&pool).await.unwrap();
    let counters = Arc::new(Counters::default());
    counters.target.store(a.jobs, Ordering::SeqCst);

    // Throughput.
    let config = Config::default().queue("bench").batch_size(a.concurrency);
    let mut sink: PostgresStorage<u64> = PostgresStorage::new(&pool).with_config(config.clone());
    let enqueue_start = Instant::now();
    let mut left = a.jobs;
    while left > 0 {
        let n = left.min(a.batch as u64);
        sink.push_bulk(vec![0u64; n as usize]).await.unwrap();
        left -= n;
    }
    let enqueue = enqueue_start.elapsed();
    let run_start = Instant::now();
    // Polled every 5 ms: jobs are waiting, so the sooner a batch is fetched the better.
    let backend = PostgresStorage::<u64>::new(&pool)
        .with_config(config.clone())
        .poll_with_interval(Duration::from_millis(5));
    WorkerBuilder::new("bench-throughput")
        .backend(backend)
        .data(counters.clone())
        .concurrency(a.concurrency)
        .build(noop)
        .run()
        .await
        .unwrap();
    let run = run_start.elapsed();
    println!(
        "backend=apalis-postgres jobs={} enqueue_per_s={:.0} run_per_s={:.0}",
        a.jobs,
        a.jobs as f64 / enqueue.as_secs_f64(),
        a.jobs as f64 / run.as_secs_f64()
    );

    // Latency at a steady rate, to a worker woken by notifications.
    let total = a.rate * a.seconds;
    counters.done.store(0, Ordering::SeqCst);
    counters.target.store(total, Ordering::SeqCst);
    let latency_config = Config::default().queue("bench-latency").batch_size(a.concurrency);
    let backend = PostgresStorage::<u64>::new(&pool)
        .with_config(latency_config.clone())
        .with_pubsub()
        .poll_with_interval(Duration::from_millis(100));
    let worker = tokio::spawn({
        let counters = counters.clone();
        async move {
            WorkerBuilder::new("bench-latency")
                .backend(backend)
                .data(counters)
                .concurrency(a.concurrency)
                .build(noop)
                .run()
                .await
                .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the worker's listener up
    let mut sink: PostgresStorage<u64> = PostgresStorage::new(&pool).with_config(latency_config);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / a.rate.max(1)));
    for _ in 0..total {
        tick.tick().await;
        let sent = EPOCH.get().unwrap().elapsed().as_nanos() as u64;
        sink.push(sent).await.unwrap();
    }
    worker.await.unwrap();
    let mut l = counters.latencies.lock().unwrap().clone();
    l.sort_unstable();
    println!(
        "backend=apalis-postgres rate={} latency_p50_ms={:.2} latency_p99_ms={:.2}",
        a.rate,
        quantile(&l, 0.5),
        quantile(&l, 0.99)
    );
}
