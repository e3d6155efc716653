//! Durable sagas with their worker processes killed at every point of a three-step
//! saga, on a real PostgreSQL: each saga ends fully done or fully compensated.

#![allow(clippy::print_stdout)] // the worker process reports over stdout

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use palisade_flow::saga::{Saga, SagaState, Sagas, Started, Step, StepContext, StepError, Transition};
use palisade_queue::{Queue, QueueConfig, Runner, RunnerConfig};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Every point a worker can die at, in the saga that succeeds and in the one whose
/// last step is declined.
const POINTS: [&str; 18] = [
    "do-before-0",
    "do-after-0",
    "done-0",
    "do-before-1",
    "do-after-1",
    "done-1",
    "do-before-2",
    "do-after-2",
    "done-2",
    "aborted-2",
    "undo-before-1",
    "undo-after-1",
    "undone-1",
    "undo-before-0",
    "undo-after-0",
    "undone-0",
    "do-before-2x",
    "none",
];

/// The points of the saga that fails at step 2 (the others are of the one that succeeds).
fn fails(point: &str) -> bool {
    point.starts_with("undo") || point.starts_with("aborted") || point == "do-before-2x"
}

/// Dies here if this saga's point is `here` and no process died there before
/// (a file per point, written first, remembers it).
fn crash_at(crashed: &Path, input: &Value, here: &str) {
    let point = input["crash"].as_str().unwrap_or("");
    let here_matches = point == here || (point == "do-before-2x" && here == "do-before-2");
    let marker = crashed.join(point);
    if here_matches && !marker.exists() {
        std::fs::write(&marker, b"").unwrap();
        std::process::abort();
    }
}

/// Step `n`: writes its effect row (idempotently), or declines at `fail_at`.
struct Effect {
    n: usize,
    pool: PgPool,
    crashed: PathBuf,
}

impl Step for Effect {
    fn name(&self) -> &str {
        ["reserve", "charge", "ship"][self.n]
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            crash_at(&self.crashed, &ctx.input, &format!("do-before-{}", self.n));
            if ctx.input["fail_at"].as_u64() == Some(self.n as u64) {
                return Err(StepError::Abort("declined".into()));
            }
            sqlx::query(
                "INSERT INTO effects (key, saga, step) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
            )
            .bind(&ctx.key)
            .bind(ctx.saga)
            .bind(self.n as i32)
            .execute(&self.pool)
            .await
            .map_err(|e| StepError::Retry(e.to_string()))?;
            crash_at(&self.crashed, &ctx.input, &format!("do-after-{}", self.n));
            Ok(json!(self.n))
        })
    }

    fn compensate<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            crash_at(&self.crashed, &ctx.input, &format!("undo-before-{}", self.n));
            sqlx::query("DELETE FROM effects WHERE saga = $1 AND step = $2")
                .bind(ctx.saga)
                .bind(self.n as i32)
                .execute(&self.pool)
                .await
                .map_err(|e| StepError::Retry(e.to_string()))?;
            crash_at(&self.crashed, &ctx.input, &format!("undo-after-{}", self.n));
            Ok(())
        })
    }
}

/// The three-step saga of an order. Each death of a worker spends an attempt of
/// the steps it was running, and 17 workers die: attempts to spare.
fn order(pool: &PgPool, crashed: &Path) -> Saga {
    (0..3).fold(Saga::new("order").attempts(50), |saga, n| {
        saga.step(Effect {
            n,
            pool: pool.clone(),
            crashed: crashed.to_path_buf(),
        })
    })
}

/// The worker process: runs saga steps from `SAGA_DB_URL` until every saga has
/// ended (prints `all ended`), dying at the sagas' crash points. Not a test on its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the saga crash test as a worker process"]
async fn saga_worker_process() {
    let (Ok(url), Ok(crashed)) = (std::env::var("SAGA_DB_URL"), std::env::var("SAGA_CRASHED")) else {
        return;
    };
    let crashed = PathBuf::from(crashed);
    let pool = PgPool::connect(&url).await.unwrap();
    let inputs: BTreeMap<i64, Value> =
        sqlx::query_as::<_, (i64, String)>("SELECT id, input::text FROM palisade_sagas")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, input)| (id, serde_json::from_str(&input).unwrap()))
            .collect();
    let observed = crashed.clone();
    let sagas = Sagas::builder(pool.clone())
        .register(order(&pool, &crashed))
        .observe(move |t| {
            let (saga, here) = match t {
                Transition::StepDone { saga, step } => (saga, format!("done-{step}")),
                Transition::StepUndone { saga, step } => (saga, format!("undone-{step}")),
                Transition::Aborted { saga, step } => (saga, format!("aborted-{step}")),
            };
            crash_at(&observed, &inputs[saga], &here);
        })
        .build()
        .await
        .unwrap();
    let queue = Queue::postgres(pool.clone()).await.unwrap();
    let config = RunnerConfig {
        // One job at a time: a death interrupts only the job that died, so every
        // point is reached (a point after a commit is reached once).
        queues: vec![QueueConfig::new("sagas", 1)],
        lease: Duration::from_millis(500),
        rescue_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(50),
        ..RunnerConfig::default()
    };
    let _runner = Runner::new(queue, config)
        .register(sagas.worker())
        .start()
        .await
        .unwrap();
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM palisade_sagas WHERE state IN ('running', 'compensating')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if running == 0 {
            println!("all ended");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts worker processes one after another until one sees every saga end; how
/// many died on the way.
async fn run_workers(url: &str, crashed: &Path) -> usize {
    let mut deaths = 0;
    loop {
        let worker = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "saga_worker_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SAGA_DB_URL", url)
            .env("SAGA_CRASHED", crashed)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), worker)
            .await
            .expect("a worker neither died nor saw every saga end")
            .unwrap();
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("all ended") {
            break;
        }
        deaths += 1;
        assert!(deaths <= POINTS.len(), "workers kept dying: {deaths}");
    }
    deaths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_worker_dies_at_any_point_ends_fully_done_or_fully_compensated() {
    let url = support::fresh_db("saga").await;
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE effects (key text PRIMARY KEY, saga bigint NOT NULL, step int NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    Queue::postgres(pool.clone()).await.unwrap();
    let crashed = std::env::temp_dir().join(support::unique("saga_crashes"));
    std::fs::create_dir_all(&crashed).unwrap();
    let sagas = Sagas::builder(pool.clone())
        .register(order(&pool, &crashed))
        .build()
        .await
        .unwrap();
    let mut ids = BTreeMap::new();
    for point in POINTS {
        let fail_at = fails(point).then_some(2);
        let id = sagas
            .start("order", &json!({ "crash": point, "fail_at": fail_at }))
            .await
            .unwrap();
        ids.insert(id, point);
    }
    let deaths = run_workers(&url, &crashed).await;
    let died_at: HashSet<String> = std::fs::read_dir(&crashed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let _ = std::fs::remove_dir_all(&crashed);
    let expected: HashSet<String> = POINTS
        .iter()
        .filter(|p| **p != "none")
        .map(|p| p.to_string())
        .collect();
    assert_eq!(died_at, expected, "a worker did not die at every point");
    assert_eq!(deaths, POINTS.len() - 1);

    for (id, point) in ids {
        let status = sagas.status(id).await.unwrap().unwrap();
        let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE saga = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if fails(point) {
            assert_eq!(
                (status.state, effects),
                (SagaState::Compensated, 0),
                "saga dying at {point}: {status:?}"
            );
            assert!(
                status.error.as_deref().is_some_and(|e| e.contains("declined")),
                "{status:?}"
            );
        } else {
            assert_eq!(
                (status.state, effects),
                (SagaState::Done, 3),
                "saga dying at {point}: {status:?}"
            );
            assert_eq!(status.outputs, [json!(0), json!(1), json!(2)]);
        }
    }
}

/// A step that never succeeds, and one whose undo is counted.
struct Flaky;

impl Step for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn run<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async { Err(StepError::Retry("the service is down".into())) })
    }

    fn compensate<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { panic!("a step that never completed was compensated") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_out_of_attempts_has_the_steps_before_it_compensated() {
    let pool = support::fresh_pool("saga_retry", 10).await;
    sqlx::query("CREATE TABLE effects (key text PRIMARY KEY, saga bigint NOT NULL, step int NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let first = Effect {
        n: 0,
        pool: pool.clone(),
        crashed: std::env::temp_dir(),
    };
    let sagas = Sagas::builder(pool.clone())
        .register(Saga::new("retrying").attempts(2).step(first).step(Flaky))
        .build()
        .await
        .unwrap();
    let queue = Queue::postgres(pool.clone()).await.unwrap();
    let status = run_to_end(queue, &sagas, "retrying").await;
    assert_eq!(status.state, SagaState::Compensated, "{status:?}");
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("service is down")),
        "{status:?}"
    );
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(effects, 0, "the first step's effect was not undone");
}

/// A step that waits `waits` times before it succeeds.
struct Patient {
    waits: std::sync::atomic::AtomicU32,
}

impl Step for Patient {
    fn name(&self) -> &str {
        "patient"
    }

    fn run<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async {
            let left = self.waits.load(std::sync::atomic::Ordering::SeqCst);
            if left == 0 {
                return Ok(json!("paid"));
            }
            self.waits.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            Err(StepError::Wait(Duration::from_millis(5)))
        })
    }

    fn compensate<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_runs_again_without_spending_its_attempts() {
    let pool = support::fresh_pool("saga_wait", 10).await;
    let patient = Patient {
        waits: std::sync::atomic::AtomicU32::new(4),
    };
    // One attempt: a wait that spent it would abort the saga.
    let sagas = Sagas::builder(pool.clone())
        .register(Saga::new("waiting").attempts(1).step(patient))
        .build()
        .await
        .unwrap();
    let queue = Queue::postgres(pool.clone()).await.unwrap();
    let status = run_to_end(queue, &sagas, "waiting").await;
    assert_eq!(status.state, SagaState::Done, "{status:?}");
    assert_eq!(status.outputs, [json!("paid")]);
}

/// A runner of the sagas' steps on `queue`.
async fn saga_runner(queue: Queue, sagas: &Sagas) -> palisade_queue::RunnerHandle {
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("sagas", 2)],
        backoff: palisade_resilience::retry::Backoff::Fixed(Duration::from_millis(10)),
        poll_interval: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    Runner::new(queue, config)
        .register(sagas.worker())
        .start()
        .await
        .unwrap()
}

/// Saga `id`'s status once it is done or compensated (within a minute).
async fn ended(sagas: &Sagas, id: i64) -> palisade_flow::saga::SagaStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = sagas.status(id).await.unwrap().unwrap();
        if matches!(s.state, SagaState::Done | SagaState::Compensated) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the saga never ended: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs saga `name` (input `{}`) on a runner of its own on `queue` until it is
/// done or compensated; its status then.
async fn run_to_end(queue: Queue, sagas: &Sagas, name: &str) -> palisade_flow::saga::SagaStatus {
    let runner = saga_runner(queue, sagas).await;
    let id = sagas.start(name, &json!({})).await.unwrap();
    let status = ended(sagas, id).await;
    runner.shutdown(Duration::from_secs(5)).await;
    status
}

/// A step that waits an hour until `arrived` is set, counting its runs.
struct AwaitsPayment {
    arrived: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runs: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Step for AwaitsPayment {
    fn name(&self) -> &str {
        "awaits_payment"
    }

    fn run<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async {
            // Counted once it has looked: a payment after that is the wake's.
            let arrived = self.arrived.load(std::sync::atomic::Ordering::SeqCst);
            self.runs.add_permits(1);
            if arrived {
                Ok(json!("paid"))
            } else {
                Err(StepError::Wait(Duration::from_secs(3600)))
            }
        })
    }

    fn compensate<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_saga_runs_its_waiting_step_now_rather_than_when_the_wait_ends() {
    let pool = support::fresh_pool("saga_wake", 10).await;
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runs = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let step = AwaitsPayment {
        arrived: arrived.clone(),
        runs: runs.clone(),
    };
    let sagas = Sagas::builder(pool.clone())
        .register(Saga::new("paying").attempts(1).step(step))
        .build()
        .await
        .unwrap();
    let runner = saga_runner(Queue::postgres(pool.clone()).await.unwrap(), &sagas).await;
    let id = sagas.start("paying", &json!({})).await.unwrap();
    // The step ran once and sleeps for an hour.
    runs.acquire().await.unwrap().forget();
    arrived.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(sagas.wake(id).await.unwrap(), "a running saga is woken");
    let status = ended(&sagas, id).await;
    assert_eq!(
        (status.state, status.outputs),
        (SagaState::Done, vec![json!("paid")])
    );
    assert!(!sagas.wake(id).await.unwrap(), "an ended saga is not woken");
    assert!(!sagas.wake(id + 1_000_000).await.unwrap());
    runner.shutdown(Duration::from_secs(5)).await;
}

/// Step `n`: records the attempt each of its runs was given, and asks to be
/// retried on its first when `flaky`.
struct Attempts {
    n: usize,
    flaky: bool,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, i32)>>>,
}

impl Step for Attempts {
    fn name(&self) -> &str {
        "attempts"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push((self.n, ctx.attempt));
            if self.flaky && ctx.attempt == 1 {
                return Err(StepError::Retry("not yet".into()));
            }
            Ok(json!(self.n))
        })
    }

    fn compensate<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_steps_run_in_one_job_which_resumes_at_the_step_that_failed() {
    let pool = support::fresh_pool("saga_chain", 10).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let step = |n, flaky| Attempts {
        n,
        flaky,
        seen: seen.clone(),
    };
    let sagas = Sagas::builder(pool.clone())
        .register(
            Saga::new("chained")
                .attempts(2)
                .step(step(0, false))
                .step(step(1, true))
                .step(step(2, false)),
        )
        .build()
        .await
        .unwrap();
    let queue = Queue::postgres(pool.clone()).await.unwrap();
    let status = run_to_end(queue.clone(), &sagas, "chained").await;
    assert_eq!(
        (status.state, status.outputs),
        (SagaState::Done, vec![json!(0), json!(1), json!(2)])
    );
    // Step 1 ran again (not step 0), and each step counts its attempts from its
    // own first run, though the job was on its second attempt for step 2.
    assert_eq!(*seen.lock().unwrap(), [(0, 1), (1, 1), (1, 2), (2, 1)]);
    let filter = palisade_queue::ListFilter {
        kind: Some(palisade_flow::saga::SAGA_JOB.into()),
        ..Default::default()
    };
    let jobs = queue.list(&filter).await.unwrap();
    let runs: Vec<_> = jobs.iter().map(|j| (j.state, j.attempt)).collect();
    assert_eq!(
        runs,
        [(palisade_queue::JobState::Completed, 2)],
        "one job ran the saga"
    );
}

/// A step that records its effect and its undoing in memory, or declines.
struct Recorded {
    n: usize,
    decline: bool,
    effects: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Step for Recorded {
    fn name(&self) -> &str {
        "recorded"
    }

    fn run<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            if self.decline {
                return Err(StepError::Abort("declined".into()));
            }
            self.effects.lock().unwrap().push(format!("do-{}", self.n));
            Ok(json!(self.n))
        })
    }

    fn compensate<'a>(&'a self, _: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.effects.lock().unwrap().push(format!("undo-{}", self.n));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_on_sqlite_run_forward_and_compensate_backward() {
    let dir = std::env::temp_dir().join(support::unique("saga_sqlite"));
    std::fs::create_dir_all(&dir).unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("sagas.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let effects = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let step = |n, decline| Recorded {
        n,
        decline,
        effects: effects.clone(),
    };
    let sagas = Sagas::builder(pool.clone())
        .register(Saga::new("ok").step(step(0, false)).step(step(1, false)))
        .register(
            Saga::new("declined")
                .step(step(0, false))
                .step(step(1, false))
                .step(step(2, true)),
        )
        .build()
        .await
        .unwrap();
    let queue = Queue::sqlite(pool.clone()).await.unwrap();
    let done = run_to_end(queue.clone(), &sagas, "ok").await;
    assert_eq!(
        (done.state, done.outputs),
        (SagaState::Done, vec![json!(0), json!(1)])
    );
    assert_eq!(*effects.lock().unwrap(), ["do-0", "do-1"]);

    effects.lock().unwrap().clear();
    let undone = run_to_end(queue, &sagas, "declined").await;
    assert_eq!(undone.state, SagaState::Compensated, "{undone:?}");
    assert!(undone.error.as_deref().is_some_and(|e| e.contains("declined")));
    assert_eq!(*effects.lock().unwrap(), ["do-0", "do-1", "undo-1", "undo-0"]);
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_once_by_key_starts_once() {
    let pg = support::fresh_pool("saga_once", 4).await;
    let lite = sqlx::sqlite::SqlitePool::connect("sqlite::memory:")
        .await
        .unwrap();
    Queue::postgres(pg.clone()).await.unwrap();
    Queue::sqlite(lite.clone()).await.unwrap();
    for db in [palisade_flow::saga::SagaDb::from(pg), lite.into()] {
        let sagas = Sagas::builder(db)
            .register(Saga::new("once").step(Flaky))
            .build()
            .await
            .unwrap();
        let first = sagas
            .start_once("once", "order-7", &json!({"n": 1}))
            .await
            .unwrap();
        let again = sagas
            .start_once("once", "order-7", &json!({"n": 2}))
            .await
            .unwrap();
        let other = sagas
            .start_once("once", "order-8", &json!({"n": 3}))
            .await
            .unwrap();
        let Started::New(id) = first else {
            panic!("the first start was {first:?}");
        };
        assert_eq!(again, Started::Existing(id));
        assert!(matches!(other, Started::New(o) if o != id), "{other:?}");
        // Two sagas, two first steps enqueued (the repeat enqueued nothing).
        let status = sagas.status(id).await.unwrap().unwrap();
        assert_eq!((status.state, status.step), (SagaState::Running, 0));
        assert_eq!(sagas.status_by_key("order-7").await.unwrap(), Some(status));
        assert_eq!(sagas.status_by_key("order-9").await.unwrap(), None);
    }
}
