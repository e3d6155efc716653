//! One conformance suite, run on both backends: every test below runs once on a
//! SQLite file and once on a database of its own on the run's PostgreSQL server.
//! Runners here poll rarely (an hour, unless a test needs retries picked up), so a
//! job that runs at all was woken by its enqueue; tests wait for workers' events,
//! never for time, and read the database after a runner's shutdown has recorded
//! every attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use palisade_core::ManualClock;
use palisade_queue::{
    JobContext, JobError, JobState, ListFilter, NewJob, Periodic, Queue, QueueConfig, QueueError, Runner,
    RunnerConfig, Unique, Worker,
};
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration, State};
use palisade_resilience::retry::Backoff;
use serde::{Deserialize, Serialize};

mod support;

use support::{Backend, Events, fresh};

/// Arguments of the test jobs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Task {
    n: u32,
    /// Attempts that fail before one succeeds (`u32::MAX`: every one).
    fail: u32,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    snooze: bool,
    #[serde(default)]
    hang: bool,
}

impl Task {
    fn ok(n: u32) -> Task {
        Task {
            n,
            fail: 0,
            panic: false,
            snooze: false,
            hang: false,
        }
    }
}

/// Runs `Task`s: fails, panics, snoozes or hangs as told; reports every attempt.
struct TaskWorker {
    attempts: Arc<Events>,
    done: Arc<Events>,
}

impl Worker for TaskWorker {
    const KIND: &'static str = "task";
    type Args = Task;

    async fn work(&self, job: JobContext, t: Task) -> Result<(), JobError> {
        self.attempts.hit();
        if t.hang {
            std::future::pending::<()>().await;
        }
        if t.panic && job.attempt == 1 {
            panic!("task {} panicked", t.n);
        }
        if t.snooze && job.attempt == 1 && self.attempts.get() == 1 {
            return Err(JobError::snooze(Duration::from_millis(1)));
        }
        if u32::try_from(job.attempt).unwrap() <= t.fail {
            return Err(JobError::failed(format!(
                "task {} attempt {} failed",
                t.n, job.attempt
            )));
        }
        job.set_output(serde_json::json!({"done": t.n}))?;
        self.done.hit();
        Ok(())
    }
}

/// A runner on `q` with a `TaskWorker` reporting to the returned events
/// (attempts, completions): polling every `poll`, retrying after 1 ms.
async fn runner(
    q: &Queue,
    poll: Duration,
    lease: Duration,
) -> (palisade_queue::RunnerHandle, Arc<Events>, Arc<Events>) {
    let (attempts, done) = (Events::new(), Events::new());
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", 4)],
        poll_interval: poll,
        lease,
        rescue_interval: lease,
        backoff: Backoff::Fixed(Duration::from_millis(1)),
        ..RunnerConfig::default()
    };
    let handle = Runner::new(q.clone(), config)
        .register(TaskWorker {
            attempts: attempts.clone(),
            done: done.clone(),
        })
        .start()
        .await
        .unwrap();
    (handle, attempts, done)
}

const HOUR: Duration = Duration::from_secs(3600);
const FAST: Duration = Duration::from_millis(5);

fn task(t: Task) -> NewJob {
    NewJob::new("task", &t).unwrap()
}

async fn enqueue_and_read_back(b: Backend) {
    let (q, _db) = fresh(b).await;
    let e = q
        .enqueue(
            task(Task::ok(1))
                .queue("mail")
                .priority(3)
                .max_attempts(7)
                .timeout(Duration::from_secs(9))
                .tag("a")
                .tag("b"),
        )
        .await
        .unwrap();
    assert!(!e.duplicate);
    let job = q.job(e.id).await.unwrap().unwrap();
    assert_eq!(
        (
            job.queue.as_str(),
            job.kind.as_str(),
            job.priority,
            job.max_attempts
        ),
        ("mail", "task", 3, 7)
    );
    assert_eq!(job.state, JobState::Available);
    assert_eq!(job.args, serde_json::to_value(Task::ok(1)).unwrap());
    assert_eq!(job.timeout, Some(Duration::from_secs(9)));
    assert_eq!(job.tags, ["a", "b"]);
    assert_eq!((job.attempt, job.errors.len()), (0, 0));
    let later = q.enqueue(task(Task::ok(2)).delay(HOUR)).await.unwrap();
    let later = q.job(later.id).await.unwrap().unwrap();
    assert_eq!(later.state, JobState::Scheduled);
    assert!(later.scheduled_at >= later.inserted_at + 3_599_000);
    assert!(q.job(999_999).await.unwrap().is_none());
    // Arguments that are JSON null (a unit type, `None`) are arguments too.
    let unit = q.enqueue(NewJob::new("tick", &()).unwrap()).await.unwrap();
    assert_eq!(
        q.job(unit.id).await.unwrap().unwrap().args,
        serde_json::Value::Null
    );
}

async fn many_in_one_call_keep_their_order(b: Backend) {
    let (q, _db) = fresh(b).await;
    let jobs: Vec<_> = (0..200).map(|n| task(Task::ok(n))).collect();
    let out = q.enqueue_many(&jobs).await.unwrap();
    assert_eq!(out.len(), 200);
    assert!(out.windows(2).all(|w| w[0].id < w[1].id), "ids follow the input");
    for (n, e) in out.iter().enumerate().step_by(37) {
        let job = q.job(e.id).await.unwrap().unwrap();
        assert_eq!(job.args["n"], n);
    }
    assert!(q.enqueue_many(&[]).await.unwrap().is_empty());
}

async fn a_runner_completes_jobs_woken_by_their_enqueue(b: Backend) {
    let (q, _db) = fresh(b).await;
    // Polling once an hour: only the enqueue's wake-up can start these at once.
    let (handle, _, done) = runner(&q, HOUR, Duration::from_secs(30)).await;
    let ids: Vec<i64> = q
        .enqueue_many(&(0..50).map(|n| task(Task::ok(n))).collect::<Vec<_>>())
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    done.until(50).await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.handed_back, 0);
    for id in ids {
        let job = q.job(id).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempt), (JobState::Completed, 1), "job {id}");
        assert!(job.finished_at.is_some());
        assert_eq!(
            job.output,
            Some(serde_json::json!({"done": job.args["n"]})),
            "its worker's output"
        );
    }
}

async fn a_failed_attempt_is_retried_with_its_error_kept(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, done) = runner(&q, FAST, Duration::from_secs(30)).await;
    let id = q
        .enqueue(task(Task {
            fail: 2,
            ..Task::ok(1)
        }))
        .await
        .unwrap()
        .id;
    done.until(1).await;
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(attempts.get(), 3);
    let job = q.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 3));
    let errors: Vec<_> = job.errors.iter().map(|e| (e.attempt, e.error.as_str())).collect();
    assert_eq!(
        errors,
        [(1, "task 1 attempt 1 failed"), (2, "task 1 attempt 2 failed")]
    );
}

async fn a_poison_job_is_discarded_after_max_attempts_with_every_error(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, _) = runner(&q, FAST, Duration::from_secs(30)).await;
    let poison = task(Task {
        fail: u32::MAX,
        ..Task::ok(1)
    })
    .max_attempts(3);
    let id = q.enqueue(poison).await.unwrap().id;
    attempts.until(3).await;
    // A job after it still runs: the runner is not stuck on the poison.
    let after = q.enqueue(task(Task::ok(2))).await.unwrap().id;
    attempts.until(4).await;
    handle.shutdown(Duration::from_secs(5)).await;
    let job = q.job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt, job.errors.len()),
        (JobState::Discarded, 3, 3)
    );
    assert_eq!(q.job(after).await.unwrap().unwrap().state, JobState::Completed);
    assert_eq!(attempts.get(), 4, "never a fourth attempt of the poison");
}

async fn arguments_that_do_not_deserialize_are_discarded_at_once(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, _) = runner(&q, FAST, Duration::from_secs(30)).await;
    let bad = q
        .enqueue(NewJob::new("task", &serde_json::json!({"n": "not a number"})).unwrap())
        .await
        .unwrap()
        .id;
    let good = q.enqueue(task(Task::ok(1))).await.unwrap().id;
    attempts.until(1).await;
    handle.shutdown(Duration::from_secs(5)).await;
    let job = q.job(bad).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Discarded, 1));
    assert!(
        job.errors[0].error.contains("do not deserialize"),
        "{:?}",
        job.errors
    );
    assert_eq!(q.job(good).await.unwrap().unwrap().state, JobState::Completed);
}

async fn a_panic_is_a_failed_attempt_and_the_runner_lives_on(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, _, done) = runner(&q, FAST, Duration::from_secs(30)).await;
    let id = q
        .enqueue(task(Task {
            panic: true,
            ..Task::ok(7)
        }))
        .await
        .unwrap()
        .id;
    done.until(1).await;
    handle.shutdown(Duration::from_secs(5)).await;
    let job = q.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.errors[0].error, "panicked: task 7 panicked");
}

async fn a_snoozed_job_runs_again_without_spending_an_attempt(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, done) = runner(&q, FAST, Duration::from_secs(30)).await;
    let id = q
        .enqueue(task(Task {
            snooze: true,
            ..Task::ok(1)
        }))
        .await
        .unwrap()
        .id;
    done.until(1).await;
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(attempts.get(), 2);
    let job = q.job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt, job.errors.len()),
        (JobState::Completed, 1, 0)
    );
}

async fn unique_jobs_leave_one_row_even_when_enqueued_at_once(b: Backend) {
    let (q, _db) = fresh(b).await;
    let job = || task(Task::ok(1)).unique(Unique::by_args());
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(job()).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for r in racers {
        results.push(r.await.unwrap());
    }
    let first = results[0].id;
    assert!(results.iter().all(|e| e.id == first), "{results:?}");
    assert_eq!(results.iter().filter(|e| !e.duplicate).count(), 1, "{results:?}");
    let listed = q.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    // Other arguments, or an explicit other key, are other jobs.
    assert!(
        !q.enqueue(task(Task::ok(2)).unique(Unique::by_args()))
            .await
            .unwrap()
            .duplicate
    );
    let by_key = |k: &str| task(Task::ok(9)).unique(Unique::by_key(k));
    assert!(!q.enqueue(by_key("order-1")).await.unwrap().duplicate);
    assert!(q.enqueue(by_key("order-1")).await.unwrap().duplicate);
    assert!(!q.enqueue(by_key("order-2")).await.unwrap().duplicate);
    // In one batch: the first is inserted, the second is its duplicate.
    let batch = q
        .enqueue_many(&[by_key("order-3"), by_key("order-3")])
        .await
        .unwrap();
    assert_eq!(
        (batch[0].id, batch[0].duplicate, batch[1].duplicate),
        (batch[1].id, false, true)
    );
}

async fn a_unique_rule_holds_only_in_its_states(b: Backend) {
    let (q, _db) = fresh(b).await;
    let waiting = [JobState::Available, JobState::Scheduled, JobState::Retryable];
    let job = || task(Task::ok(1)).unique(Unique::by_args().states(waiting));
    let first = q.enqueue(job()).await.unwrap();
    assert!(q.enqueue(job()).await.unwrap().duplicate);
    assert!(q.cancel(first.id).await.unwrap());
    let again = q.enqueue(job()).await.unwrap();
    assert!(!again.duplicate, "a cancelled job no longer blocks");
    assert_ne!(again.id, first.id);
}

async fn a_job_enqueued_in_a_rolled_back_transaction_does_not_exist(b: Backend) {
    let (q, db) = fresh(b).await;
    match b {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            Queue::enqueue_in_postgres(&mut tx, &[task(Task::ok(1))])
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            let kept = Queue::enqueue_in_postgres(&mut tx, &[task(Task::ok(2))])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let all = q.list(&ListFilter::default()).await.unwrap();
            assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), [kept[0].id]);
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            Queue::enqueue_in_sqlite(&mut tx, &[task(Task::ok(1))])
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            let kept = Queue::enqueue_in_sqlite(&mut tx, &[task(Task::ok(2))])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let all = q.list(&ListFilter::default()).await.unwrap();
            assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), [kept[0].id]);
        }
    }
}

async fn a_job_committed_in_a_transaction_wakes_a_runner(b: Backend) {
    let (q, db) = fresh(b).await;
    if b == Backend::Sqlite {
        return; // SQLite has no cross-connection notifications: its runners poll.
    }
    let (handle, _, done) = runner(&q, HOUR, Duration::from_secs(30)).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    Queue::enqueue_in_postgres(&mut tx, &[task(Task::ok(1))])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    done.until(1).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

async fn cancelling_a_running_job_stops_it_at_the_next_heartbeat(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, _) = runner(&q, FAST, Duration::from_millis(300)).await;
    let hung = q
        .enqueue(task(Task {
            hang: true,
            ..Task::ok(1)
        }))
        .await
        .unwrap()
        .id;
    attempts.until(1).await;
    assert_eq!(q.job(hung).await.unwrap().unwrap().state, JobState::Running);
    assert!(q.cancel(hung).await.unwrap());
    // The heartbeat (every 100 ms) finds the job cancelled and stops it.
    handle.until_idle().await;
    let report = handle.shutdown(Duration::ZERO).await;
    assert_eq!(report.handed_back, 0);
    assert_eq!(q.job(hung).await.unwrap().unwrap().state, JobState::Cancelled);
}

/// `Queue::reassign_in_*` on a connection of its own to `url`.
async fn reassign(b: Backend, url: &str, id: i64, attempt: i32, args: &serde_json::Value) -> bool {
    match b {
        Backend::Postgres => {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            Queue::reassign_in_postgres(&mut c, id, attempt, args)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            Queue::reassign_in_sqlite(&mut c, id, attempt, args)
                .await
                .unwrap()
        }
    }
}

async fn a_running_attempt_takes_new_arguments_only_while_it_is_the_jobs(b: Backend) {
    let (q, db) = fresh(b).await;
    let (handle, attempts, _) = runner(&q, FAST, Duration::from_millis(300)).await;
    let hang = Task {
        hang: true,
        ..Task::ok(1)
    };
    let id = q.enqueue(task(hang.clone())).await.unwrap().id;
    attempts.until(1).await;
    let next = serde_json::to_value(Task { n: 2, ..hang }).unwrap();
    assert!(!reassign(b, &db.url, id, 2, &next).await, "another attempt's");
    assert!(reassign(b, &db.url, id, 1, &next).await);
    assert_eq!(q.job(id).await.unwrap().unwrap().args, next);
    assert!(q.cancel(id).await.unwrap());
    let later = serde_json::to_value(Task::ok(3)).unwrap();
    assert!(!reassign(b, &db.url, id, 1, &later).await, "a cancelled job's");
    assert_eq!(q.job(id).await.unwrap().unwrap().args, next);
    handle.until_idle().await;
    handle.shutdown(Duration::ZERO).await;
}

async fn shutdown_hands_back_unfinished_jobs_ready_to_run(b: Backend) {
    let (q, _db) = fresh(b).await;
    let (handle, attempts, _) = runner(&q, HOUR, Duration::from_secs(30)).await;
    let hung = q
        .enqueue(task(Task {
            hang: true,
            ..Task::ok(1)
        }))
        .await
        .unwrap()
        .id;
    attempts.until(1).await;
    let report = handle.shutdown(Duration::from_millis(20)).await;
    assert_eq!((report.finished, report.handed_back), (0, 1));
    let job = q.job(hung).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Available, 0), "not counted");
}

async fn retry_cancel_stats_and_prune(b: Backend) {
    let (q, db) = fresh(b).await;
    let a = q.enqueue(task(Task::ok(1))).await.unwrap().id;
    let later = q
        .enqueue(task(Task::ok(2)).queue("mail").delay(HOUR))
        .await
        .unwrap()
        .id;
    assert!(q.cancel(a).await.unwrap());
    assert!(!q.cancel(a).await.unwrap(), "already final");
    let stats = q.stats().await.unwrap();
    let default = stats.iter().find(|s| s.queue == "default").unwrap();
    assert_eq!(default.counts[JobState::Cancelled.code() as usize], 1);
    let mail = stats.iter().find(|s| s.queue == "mail").unwrap();
    assert_eq!(mail.counts[JobState::Scheduled.code() as usize], 1);
    assert_eq!(mail.oldest_wait_ms, 0, "nothing due yet");
    assert!(q.retry(a).await.unwrap());
    let job = q.job(a).await.unwrap().unwrap();
    assert_eq!((job.state, job.finished_at), (JobState::Available, None));
    assert!(q.retry(later).await.unwrap(), "a scheduled job is run now");
    assert_eq!(q.job(later).await.unwrap().unwrap().state, JobState::Available);
    let filtered = q
        .list(&ListFilter {
            queue: Some("mail".into()),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(filtered.iter().map(|j| j.id).collect::<Vec<_>>(), [later]);
    assert!(q.cancel(a).await.unwrap());
    assert_eq!(q.prune(HOUR).await.unwrap(), 0, "finished just now");
    // Two hours ago, as far as the table says.
    support::execute(
        &db,
        &format!("UPDATE palisade_jobs SET finished_at = finished_at - 7200000 WHERE id = {a}"),
    )
    .await;
    assert_eq!(q.prune(HOUR).await.unwrap(), 1);
    assert!(q.job(a).await.unwrap().is_none());
    assert!(q.job(later).await.unwrap().is_some(), "unfinished jobs stay");
}

async fn invalid_jobs_are_refused_with_a_clear_error(b: Backend) {
    let (q, _db) = fresh(b).await;
    let err = q.enqueue(task(Task::ok(1)).max_attempts(0)).await.unwrap_err();
    assert!(matches!(err, QueueError::InvalidJob(_)), "{err}");
    assert!(err.to_string().contains("max_attempts"), "{err}");
    assert!(q.list(&ListFilter::default()).await.unwrap().is_empty());
}

async fn the_schema_is_applied_once_and_a_newer_one_refused(b: Backend) {
    let db = support::fresh_db(b).await;
    let (a, b2) = tokio::join!(Queue::connect(&db.url), Queue::connect(&db.url));
    let (a, _b) = (a.unwrap(), b2.unwrap());
    a.enqueue(task(Task::ok(1))).await.unwrap();
    drop(Queue::connect(&db.url).await.unwrap());
    match b {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM palisade_queue_schema")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(versions, [1]);
            sqlx::query("INSERT INTO palisade_queue_schema VALUES (99)")
                .execute(&pool)
                .await
                .unwrap();
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM palisade_queue_schema")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(versions, [1]);
            sqlx::query("INSERT INTO palisade_queue_schema VALUES (99)")
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    match Queue::connect(&db.url).await {
        Err(QueueError::SchemaTooNew {
            found: 99,
            supported: 1,
        }) => {}
        other => panic!("a newer schema was not refused: {other:?}"),
    }
}

/// Runs `counter` on a runner with two queues: each queue's jobs run on it only.
async fn queues_are_served_separately(b: Backend) {
    let (q, _db) = fresh(b).await;
    let seen = Arc::new(AtomicU32::new(0));
    struct Count(Arc<AtomicU32>, Arc<Events>);
    impl Worker for Count {
        const KIND: &'static str = "count";
        type Args = String;
        async fn work(&self, job: JobContext, expect: String) -> Result<(), JobError> {
            assert_eq!(job.queue, expect);
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.hit();
            Ok(())
        }
    }
    let events = Events::new();
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("a", 1), QueueConfig::new("b", 3)],
        poll_interval: HOUR,
        ..RunnerConfig::default()
    };
    let handle = Runner::new(q.clone(), config)
        .register(Count(seen.clone(), events.clone()))
        .start()
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for (queue, n) in [("a", 5), ("b", 7), ("unserved", 2)] {
        for _ in 0..n {
            jobs.push(NewJob::new("count", &queue).unwrap().queue(queue));
        }
    }
    q.enqueue_many(&jobs).await.unwrap();
    events.until(12).await;
    handle.shutdown(Duration::from_secs(5)).await;
    let unserved = q
        .list(&ListFilter {
            queue: Some("unserved".into()),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert!(unserved.iter().all(|j| j.state == JobState::Available));
    assert_eq!(seen.load(Ordering::SeqCst), 12);
}

/// Fails while the dependency is down; reports attempts made while its breaker
/// was open (there must be none).
struct Dependent {
    up: Arc<AtomicBool>,
    breaker: CircuitBreaker,
    attempts: Arc<Events>,
    while_open: Arc<AtomicU32>,
}

impl Worker for Dependent {
    const KIND: &'static str = "dependent";
    type Args = u32;
    async fn work(&self, _job: JobContext, _n: u32) -> Result<(), JobError> {
        if self.breaker.state() == State::Open {
            self.while_open.fetch_add(1, Ordering::SeqCst);
        }
        self.attempts.hit();
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(JobError::failed("dependency down"))
        }
    }
}

async fn a_queue_waits_while_its_breaker_is_open_and_resumes_at_half_open(b: Backend) {
    let (q, _db) = fresh(b).await;
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder("dependency")
        .config(
            BreakerConfig::empty()
                .consecutive_failures(2)
                .open_duration(OpenDuration::Fixed(Duration::from_secs(30)))
                .half_open(1, 1),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    let (up, attempts, while_open) = (
        Arc::new(AtomicBool::new(false)),
        Events::new(),
        Arc::new(AtomicU32::new(0)),
    );
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", 2).breaker(breaker.clone())],
        poll_interval: FAST,
        backoff: Backoff::Fixed(Duration::from_millis(1)),
        ..RunnerConfig::default()
    };
    let handle = Runner::new(q.clone(), config)
        .register(Dependent {
            up: up.clone(),
            breaker: breaker.clone(),
            attempts: attempts.clone(),
            while_open: while_open.clone(),
        })
        .start()
        .await
        .unwrap();
    let jobs: Vec<_> = (0..2)
        .map(|n| NewJob::new("dependent", &n).unwrap().max_attempts(3))
        .collect();
    let ids: Vec<i64> = q
        .enqueue_many(&jobs)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    attempts.until(2).await;
    // Both failed: the breaker is open, and their retries are due in 1 ms. The
    // queue is held back again and again without taking them.
    let held = handle.held_back();
    handle.until_held_back(held + 5).await;
    assert_eq!(attempts.get(), 2, "no attempt while the breaker is open");
    up.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(30)); // half-open: one probe, which succeeds
    attempts.until(4).await;
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(while_open.load(Ordering::SeqCst), 0);
    assert_eq!(breaker.state(), State::Closed);
    for id in ids {
        let job = q.job(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempt),
            (JobState::Completed, 2),
            "job {id}: attempts unspent"
        );
    }
}

async fn a_periodic_job_runs_once_per_slot_however_many_runners_schedule_it(b: Backend) {
    let (q, _db) = fresh(b).await;
    let runs = Events::new();
    struct Tick(Arc<Events>);
    impl Worker for Tick {
        const KIND: &'static str = "tick";
        type Args = ();
        async fn work(&self, _job: JobContext, _: ()) -> Result<(), JobError> {
            self.0.hit();
            Ok(())
        }
    }
    let tick = Periodic::every("tick", Duration::from_secs(1), NewJob::new("tick", &()).unwrap());
    let mut handles = Vec::new();
    // Two runners, as two processes would be, both scheduling the same job.
    for _ in 0..2 {
        let config = RunnerConfig {
            poll_interval: FAST,
            periodic: vec![tick.clone()],
            ..RunnerConfig::default()
        };
        let h = Runner::new(q.clone(), config)
            .register(Tick(runs.clone()))
            .start()
            .await
            .unwrap();
        handles.push(h);
    }
    runs.until(3).await;
    for h in handles {
        h.shutdown(Duration::from_secs(5)).await;
    }
    let jobs = q
        .list(&ListFilter {
            kind: Some("tick".into()),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let done: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Completed).collect();
    let mut slots: Vec<i64> = done.iter().map(|j| j.scheduled_at).collect();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), done.len(), "one run per slot: {jobs:#?}");
    assert_eq!(done.len() as u64, runs.get());
    assert!(
        slots.iter().all(|s| s % 1000 == 0),
        "on the period's multiples: {slots:?}"
    );
    assert!(
        jobs.iter().filter(|j| j.state == JobState::Scheduled).count() <= 1,
        "only the next slot waits"
    );
}

async fn an_adaptive_concurrency_follows_the_backlog(b: Backend) {
    let (q, _db) = fresh(b).await;
    struct Held(Arc<Events>, Arc<tokio::sync::Semaphore>);
    impl Worker for Held {
        const KIND: &'static str = "held";
        type Args = u32;
        async fn work(&self, _job: JobContext, _n: u32) -> Result<(), JobError> {
            self.0.hit();
            self.1.acquire().await.unwrap().forget();
            Ok(())
        }
    }
    let (started, release) = (Events::new(), Arc::new(tokio::sync::Semaphore::new(0)));
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", 8).adaptive(1)],
        poll_interval: FAST,
        ..RunnerConfig::default()
    };
    let handle = Runner::new(q.clone(), config)
        .register(Held(started.clone(), release.clone()))
        .start()
        .await
        .unwrap();
    assert_eq!(handle.concurrency("default"), Some(1), "idle: the minimum");
    let jobs: Vec<_> = (0..20).map(|n| NewJob::new("held", &n).unwrap()).collect();
    q.enqueue_many(&jobs).await.unwrap();
    // A backlog: the concurrency grows to its maximum, and no further.
    started.until(8).await;
    handle.until_concurrency("default", 8).await;
    assert_eq!(handle.running(), 8);
    release.add_permits(100);
    started.until(20).await;
    handle.until_idle().await;
    // Nothing waiting: back to the minimum.
    handle.until_concurrency("default", 1).await;
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(started.get(), 20);
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    enqueue_and_read_back,
    many_in_one_call_keep_their_order,
    a_runner_completes_jobs_woken_by_their_enqueue,
    a_failed_attempt_is_retried_with_its_error_kept,
    a_poison_job_is_discarded_after_max_attempts_with_every_error,
    arguments_that_do_not_deserialize_are_discarded_at_once,
    a_panic_is_a_failed_attempt_and_the_runner_lives_on,
    a_snoozed_job_runs_again_without_spending_an_attempt,
    unique_jobs_leave_one_row_even_when_enqueued_at_once,
    a_unique_rule_holds_only_in_its_states,
    a_job_enqueued_in_a_rolled_back_transaction_does_not_exist,
    a_job_committed_in_a_transaction_wakes_a_runner,
    cancelling_a_running_job_stops_it_at_the_next_heartbeat,
    a_running_attempt_takes_new_arguments_only_while_it_is_the_jobs,
    shutdown_hands_back_unfinished_jobs_ready_to_run,
    retry_cancel_stats_and_prune,
    invalid_jobs_are_refused_with_a_clear_error,
    the_schema_is_applied_once_and_a_newer_one_refused,
    queues_are_served_separately,
    a_queue_waits_while_its_breaker_is_open_and_resumes_at_half_open,
    a_periodic_job_runs_once_per_slot_however_many_runners_schedule_it,
    an_adaptive_concurrency_follows_the_backlog,
);
