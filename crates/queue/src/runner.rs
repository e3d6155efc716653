//! [`Runner`]: competing consumers. Each queue it serves has a fetch loop that
//! keeps up to its concurrency of jobs running, woken at once by a new job
//! (PostgreSQL `LISTEN/NOTIFY`, or this process's own enqueue) and otherwise every
//! `poll_interval`. Every job it takes is leased; a heartbeat extends the leases of
//! the jobs still running (and stops a job cancelled meanwhile), and every runner
//! takes back jobs whose lease ran out, so a worker killed mid-job loses nothing:
//! its jobs run again (at least once, never lost). Attempts end in batches
//! (completions in one statement), failures are retried after the resilience
//! crate's backoff, and a panic is a failed attempt that leaves the runner running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_resilience::breaker::{CircuitBreaker, Outcome, Permit};
use palisade_resilience::ratelimit::{Algorithm, RateLimiter, WarmUpLimiter};
use palisade_resilience::retry::Backoff;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::batch::batcher;
use crate::job::{Job, now_ms};
use crate::periodic::Periodic;
use crate::store::{Finish, Store};
use crate::worker::{Erased, JobContext, JobError, Typed};
use crate::{Queue, QueueError, Worker};

/// One queue a runner serves.
#[derive(Clone)]
pub struct QueueConfig {
    /// Its name.
    pub name: String,
    /// Jobs of it run at once by this runner (at most, when adaptive).
    pub concurrency: usize,
    /// The fewest jobs run at once when the concurrency adapts (see
    /// [`QueueConfig::adaptive`]); equal to `concurrency`, it is fixed.
    pub min_concurrency: usize,
    /// The circuit breaker of the dependency its jobs call: while it is open no job
    /// is taken (they wait, their attempts unspent); half-open, as many as it has
    /// probes; each attempt's end is recorded in it (a completion a success; a
    /// failure, timeout or panic a failure; the rest neither).
    pub breaker: Option<CircuitBreaker>,
    /// A limit on how fast its jobs start (the resilience crate's rate limiters).
    pub rate_limit: Option<Arc<dyn StartLimit>>,
}

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("min_concurrency", &self.min_concurrency)
            .field("breaker", &self.breaker)
            .field("rate_limit", &self.rate_limit.is_some())
            .finish()
    }
}

impl QueueConfig {
    /// Queue `name`, `concurrency` jobs at once, no breaker, no rate limit.
    pub fn new(name: impl Into<String>, concurrency: usize) -> Self {
        QueueConfig {
            name: name.into(),
            concurrency,
            min_concurrency: concurrency,
            breaker: None,
            rate_limit: None,
        }
    }

    /// Lets the concurrency follow the backlog between `min` and `concurrency`:
    /// it grows by half while every fetch comes back full (jobs are waiting), and
    /// falls to what is running (at least `min`) when a fetch finds fewer than it
    /// could take. An idle runner holds few slots; a backlog gets them all.
    pub fn adaptive(mut self, min: usize) -> Self {
        self.min_concurrency = min.clamp(1, self.concurrency.max(1));
        self
    }

    /// Takes no job while `breaker` is open (see [`QueueConfig::breaker`]).
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Starts jobs no faster than `limit` allows.
    pub fn rate_limit(mut self, limit: impl StartLimit) -> Self {
        self.rate_limit = Some(Arc::new(limit));
        self
    }

    /// What the queue's breaker and rate limit let a fetch take now, with up to
    /// `free` slots: a breaker permit (if it has a breaker) per job it may take, and,
    /// when they held jobs back, which held them and how long until it may let more
    /// through (when it knows).
    fn admit(&self, free: usize) -> Admitted {
        let mut permits = Vec::with_capacity(free);
        let mut held = None;
        for _ in 0..free {
            let permit = match self.breaker.as_ref().map(CircuitBreaker::try_acquire_owned) {
                Some(Err(rejected)) => {
                    held = Some(("breaker", rejected.retry_after));
                    break;
                }
                Some(Ok(p)) => Some(p),
                None => None,
            };
            if let Some(Err(wait)) = self.rate_limit.as_ref().map(|l| l.try_start()) {
                held = Some(("rate_limit", Some(wait)));
                if let Some(p) = permit {
                    p.record(Outcome::Ignored);
                }
                break;
            }
            permits.push(permit);
        }
        Admitted { permits, held }
    }
}

/// What a queue's gates let through (see [`QueueConfig::admit`]).
struct Admitted {
    /// One per job that may be taken.
    permits: Vec<Option<Permit<CircuitBreaker>>>,
    /// Which gate held jobs back, and when it may let more through (if it knows).
    held: Option<(&'static str, Option<Duration>)>,
}

/// A limit on how fast a queue's jobs start: the resilience crate's rate limiters
/// implement it.
pub trait StartLimit: Send + Sync + 'static {
    /// Takes one start if it is allowed now, or says how long until one is.
    fn try_start(&self) -> Result<(), Duration>;
}

impl<A: Algorithm> StartLimit for RateLimiter<A> {
    fn try_start(&self) -> Result<(), Duration> {
        self.check().map(|_| ()).map_err(|r| r.retry_after())
    }
}

impl StartLimit for WarmUpLimiter {
    fn try_start(&self) -> Result<(), Duration> {
        self.check().map(|_| ()).map_err(|r| r.retry_after())
    }
}

/// How a [`Runner`] runs.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// The queues it serves (default: `default`, 10 at once).
    pub queues: Vec<QueueConfig>,
    /// How long a taken job is the runner's without a heartbeat; a job whose
    /// runner died runs again this long after its last heartbeat (default 30 s).
    /// Heartbeats go every third of it.
    pub lease: Duration,
    /// How often each queue is looked at without a wake-up, and so how late a
    /// delayed job may start (default 1 s).
    pub poll_interval: Duration,
    /// Waits between a job's failed attempts (default: full jitter from 1 s,
    /// doubling, at most 10 min).
    pub backoff: Backoff,
    /// How long an attempt may run when its job sets no timeout (default 30 min).
    pub job_timeout: Duration,
    /// How often this runner takes back other runners' expired jobs (default: the
    /// lease).
    pub rescue_interval: Duration,
    /// Attempts that ended are recorded in batches of at most this many ...
    pub finish_batch: usize,
    /// ... waiting at most this long for a batch to fill.
    pub finish_linger: Duration,
    /// This runner's name in the jobs it holds (default: host, process id and a
    /// random suffix).
    pub name: String,
    /// Jobs enqueued on a schedule, once per slot across every process (see
    /// [`Periodic`]).
    pub periodic: Vec<Periodic>,
    /// Finished jobs (completed, cancelled, discarded) are deleted this long after
    /// they finished, checked every 10 minutes (default 7 days; `None` keeps them).
    pub retention: Option<Duration>,
    /// How often the queue's depth is exported as gauges (`palisade_queue_depth{queue,
    /// state}`, `palisade_queue_oldest_wait_seconds{queue}`), for dashboards and an
    /// autoscaler adding worker processes (default 10 s; `None`: never).
    pub stats_interval: Option<Duration>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            queues: vec![QueueConfig::new(crate::job::DEFAULT_QUEUE, 10)],
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::ExponentialJitter {
                initial: Duration::from_secs(1),
                multiplier: 2.0,
                max: Duration::from_secs(600),
            },
            job_timeout: Duration::from_secs(1800),
            rescue_interval: Duration::from_secs(30),
            finish_batch: 500,
            finish_linger: Duration::from_millis(2),
            name: default_name(),
            periodic: Vec::new(),
            retention: Some(Duration::from_secs(7 * 86_400)),
            stats_interval: Some(Duration::from_secs(10)),
        }
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}:{:04x}", host.trim(), std::process::id(), fastrand::u16(..))
}

/// Runs the jobs of its registered kinds. See the [module docs](self).
pub struct Runner {
    queue: Queue,
    config: RunnerConfig,
    workers: HashMap<String, Arc<dyn Erased>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .field("kinds", &self.workers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A running job's place in the runner.
struct Running {
    attempt: i32,
    abort: AbortHandle,
}

/// What the runner's tasks share.
struct Shared {
    store: Store,
    config: RunnerConfig,
    workers: HashMap<String, Arc<dyn Erased>>,
    kinds: Vec<String>,
    running: Mutex<HashMap<i64, Running>>,
    /// Woken whenever a job ends (shutdown waits on it).
    ended: Notify,
    /// Each queue's concurrency now, and its change's wake-up.
    targets: HashMap<String, Arc<std::sync::atomic::AtomicUsize>>,
    target_changed: Notify,
    /// Fetches a queue's breaker or rate limit held back, and its wake-up.
    held: std::sync::atomic::AtomicU64,
    held_changed: Notify,
    finish: mpsc::Sender<(i64, i32, Finish)>,
}

/// A started runner: stop it with [`shutdown`](RunnerHandle::shutdown).
pub struct RunnerHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    fetchers: Vec<JoinHandle<()>>,
    upkeep: Vec<JoinHandle<()>>,
    finisher: JoinHandle<()>,
}

impl std::fmt::Debug for RunnerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerHandle")
            .field("running", &self.running())
            .finish()
    }
}

/// What a shutdown came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs that were running at the shutdown and finished within the grace period.
    pub finished: usize,
    /// Jobs still running at its end: stopped and handed back, available at once
    /// (their attempt not counted).
    pub handed_back: usize,
}

impl Runner {
    /// A runner for `queue`'s jobs.
    pub fn new(queue: Queue, config: RunnerConfig) -> Runner {
        Runner {
            queue,
            config,
            workers: HashMap::new(),
        }
    }

    /// Runs jobs of `W::KIND` with `worker`.
    pub fn register<W: Worker>(mut self, worker: W) -> Runner {
        self.workers.insert(W::KIND.to_string(), Arc::new(Typed(worker)));
        self
    }

    /// Starts fetching and running; listens for new jobs on PostgreSQL.
    pub async fn start(self) -> Result<RunnerHandle, QueueError> {
        let Runner {
            queue,
            config,
            workers,
        } = self;
        let (finish, batches) = batcher(4096, config.finish_batch, config.finish_linger);
        let mut kinds: Vec<String> = workers.keys().cloned().collect();
        kinds.sort();
        let targets = (config.queues.iter())
            .map(|q| {
                let start = q.min_concurrency.clamp(1, q.concurrency.max(1));
                (
                    q.name.clone(),
                    Arc::new(std::sync::atomic::AtomicUsize::new(start)),
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            store: queue.store.clone(),
            config,
            workers,
            kinds,
            running: Mutex::default(),
            ended: Notify::new(),
            targets,
            target_changed: Notify::new(),
            held: std::sync::atomic::AtomicU64::new(0),
            held_changed: Notify::new(),
            finish,
        });
        let (stop, stopped) = watch::channel(false);
        let wakes: HashMap<String, Arc<Notify>> = (shared.config.queues.iter())
            .map(|q| (q.name.clone(), Arc::new(Notify::new())))
            .collect();
        let mut upkeep = vec![
            tokio::spawn(heartbeat(shared.clone())),
            tokio::spawn(rescuer(shared.clone())),
            tokio::spawn(relay_local(queue.local.clone(), wakes.clone(), stopped.clone())),
            tokio::spawn(scheduler(queue.clone(), shared.config.clone())),
        ];
        if let Store::Postgres(pool) = &queue.store {
            let listener = sqlx::postgres::PgListener::connect_with(pool).await?;
            upkeep.push(tokio::spawn(listen(
                listener,
                wakes.clone(),
                shared.config.poll_interval,
            )));
        }
        let fetchers = (shared.config.queues.iter())
            .map(|q| {
                let wake = wakes[&q.name].clone();
                tokio::spawn(fetch_loop(shared.clone(), q.clone(), wake, stopped.clone()))
            })
            .collect();
        let finisher = tokio::spawn(finisher(shared.store.clone(), batches));
        Ok(RunnerHandle {
            shared,
            stop,
            fetchers,
            upkeep,
            finisher,
        })
    }
}

impl RunnerHandle {
    /// Jobs running now.
    pub fn running(&self) -> usize {
        lock(&self.shared.running).len()
    }

    /// How many jobs of `queue` this runner runs at once now (its adaptive
    /// concurrency, or the fixed one).
    pub fn concurrency(&self, queue: &str) -> Option<usize> {
        (self.shared.targets.get(queue)).map(|t| t.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Waits until `queue`'s concurrency is `n`.
    pub async fn until_concurrency(&self, queue: &str, n: usize) {
        loop {
            let changed = self.shared.target_changed.notified();
            if self.concurrency(queue).is_none_or(|c| c == n) {
                return;
            }
            changed.await;
        }
    }

    /// How many times a queue's breaker or rate limit held a fetch back (its jobs
    /// waiting, attempts unspent).
    pub fn held_back(&self) -> u64 {
        self.shared.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until fetches were held back at least `n` times in all.
    pub async fn until_held_back(&self, n: u64) {
        loop {
            let changed = self.shared.held_changed.notified();
            if self.held_back() >= n {
                return;
            }
            changed.await;
        }
    }

    /// Waits until no job is running (none was taken, or every one taken ended).
    pub async fn until_idle(&self) {
        loop {
            let ended = self.shared.ended.notified();
            if lock(&self.shared.running).is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Stops fetching, lets the running jobs finish for up to `grace`, then stops
    /// the rest and hands them back (available at once, their attempt not
    /// counted), and records every attempt that ended.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        let _ = self.stop.send(true);
        for f in self.fetchers {
            let _ = f.await;
        }
        let at_stop = lock(&self.shared.running).len();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let ended = self.shared.ended.notified();
            if lock(&self.shared.running).is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        let left: Vec<(i64, Running)> = lock(&self.shared.running).drain().collect();
        for (id, r) in &left {
            r.abort.abort();
            let _ = self.shared.finish.send((*id, r.attempt, Finish::Released)).await;
        }
        for t in self.upkeep {
            t.abort();
            let _ = t.await;
        }
        // The finisher ends once every sender is gone: this handle's and the job
        // tasks' (which end with their jobs).
        let RunnerHandle { shared, finisher, .. } = self;
        drop(shared);
        let _ = finisher.await;
        ShutdownReport {
            finished: at_stop.saturating_sub(left.len()),
            handed_back: left.len(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps up to the queue's concurrency of its jobs running until stopped.
async fn fetch_loop(
    shared: Arc<Shared>,
    q: QueueConfig,
    wake: Arc<Notify>,
    mut stopped: watch::Receiver<bool>,
) {
    let max = q.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let target = shared.targets[&q.name].clone();
    let mut failures = 0u32;
    let mut rng = fastrand::Rng::new();
    while !*stopped.borrow() {
        // Armed before the fetch, so a job enqueued during it wakes the next wait.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let ended = shared.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let running = max - slots.available_permits();
        let free = target
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(running);
        let mut full = free == 0;
        if free > 0 {
            let Admitted { permits, held } = q.admit(free);
            if permits.is_empty() {
                held_back(&shared, &q, held, &mut stopped).await;
                continue;
            }
            let admitted = permits.len();
            let c = &shared.config;
            match shared
                .store
                .fetch(&q.name, &shared.kinds, admitted, &c.name, c.lease)
                .await
            {
                Ok(jobs) => {
                    failures = 0;
                    full = jobs.len() == admitted && admitted == free;
                    let fetched = jobs.len();
                    let mut permits = permits.into_iter();
                    for job in jobs {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        start_job(&shared, job, slot, permits.next().flatten());
                    }
                    // Permits left over (fewer jobs than admitted) decide nothing.
                    permits.flatten().for_each(|p| p.record(Outcome::Ignored));
                    adapt(&shared, &q, &target, full, running + fetched);
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!("palisade_queue_fetch_errors_total", "queue" => q.name.clone())
                        .increment(1);
                    tracing::warn!(queue = %q.name, error = %e, "fetching jobs failed");
                    let wait = Backoff::default().delay(failures, Duration::ZERO, &mut rng);
                    tokio::select! {
                        () = tokio::time::sleep(wait.max(shared.config.poll_interval / 4)) => {}
                        _ = stopped.changed() => {}
                    }
                    continue;
                }
            }
        }
        if full && free > 0 {
            continue; // more may be waiting
        }
        tokio::select! {
            () = &mut woken, if !full => {}
            // At its concurrency: a job's end makes room.
            () = &mut ended, if full => {}
            () = tokio::time::sleep(shared.config.poll_interval) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// Waits while a queue's breaker or rate limit holds its fetches back (until the
/// gate says it may let more through, at most a poll interval): its jobs wait,
/// their attempts unspent.
async fn held_back(
    shared: &Shared,
    q: &QueueConfig,
    held: Option<(&'static str, Option<Duration>)>,
    stopped: &mut watch::Receiver<bool>,
) {
    let (gate, wait) = held.unwrap_or(("none", None));
    metrics::counter!("palisade_queue_held_total", "queue" => q.name.clone(), "by" => gate).increment(1);
    shared.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared.held_changed.notify_waiters();
    let poll = shared.config.poll_interval;
    tokio::select! {
        () = tokio::time::sleep(wait.unwrap_or(poll).min(poll)) => {}
        _ = stopped.changed() => {}
    }
}

/// Moves a queue's adaptive concurrency: up by half after a full fetch (jobs are
/// waiting), else down to what runs now (`running`), never below its minimum.
fn adapt(
    shared: &Shared,
    q: &QueueConfig,
    target: &std::sync::atomic::AtomicUsize,
    full: bool,
    running: usize,
) {
    if q.min_concurrency >= q.concurrency.max(1) {
        return;
    }
    let now = target.load(std::sync::atomic::Ordering::Relaxed);
    let next = if full {
        (now + now.div_ceil(2)).min(q.concurrency.max(1))
    } else {
        running.max(q.min_concurrency)
    };
    if next != now {
        target.store(next, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("palisade_queue_concurrency", "queue" => q.name.clone()).set(next as f64);
        shared.target_changed.notify_waiters();
    }
}

/// Runs `job` on its own task, holding its queue's `slot` until it ends.
fn start_job(
    shared: &Arc<Shared>,
    job: Job,
    slot: tokio::sync::OwnedSemaphorePermit,
    permit: Option<Permit<CircuitBreaker>>,
) {
    let waited = job.attempted_at.unwrap_or_else(now_ms) - job.scheduled_at;
    metrics::histogram!("palisade_queue_wait_seconds", "queue" => job.queue.clone())
        .record(waited.max(0) as f64 / 1e3);
    let Some(worker) = shared.workers.get(&job.kind).cloned() else {
        // Unreachable: only registered kinds are fetched.
        return;
    };
    let timeout = job.timeout.unwrap_or(shared.config.job_timeout);
    let ctx = JobContext {
        id: job.id,
        queue: job.queue.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        tags: job.tags.clone(),
        output: Arc::default(),
    };
    let output = ctx.output.clone();
    let (id, attempt) = (job.id, job.attempt);
    let attempt_task = tokio::spawn(tokio::time::timeout(timeout, worker.run(ctx, job.args)));
    // Registered before the job can end: its end removes it.
    lock(&shared.running).insert(
        id,
        Running {
            attempt,
            abort: attempt_task.abort_handle(),
        },
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = attempt_task.await;
        let ran = started.elapsed();
        // Free before anyone hears the job ended: a fetch loop woken by it finds
        // the room.
        drop(slot);
        // Gone from the map: stopped by the heartbeat (cancelled, rescued) or by a
        // shutdown, which records its end itself.
        if lock(&shared.running).remove(&id).is_none() {
            shared.ended.notify_waiters();
            return;
        }
        let Some((finish, outcome, verdict)) = ending(&shared.config, result, &output, timeout, attempt)
        else {
            shared.ended.notify_waiters();
            return;
        };
        if let Some(p) = permit {
            p.record(verdict);
        }
        metrics::counter!("palisade_queue_jobs_total", "queue" => job.queue.clone(), "kind" => job.kind.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("palisade_queue_run_seconds", "queue" => job.queue, "kind" => job.kind)
            .record(ran.as_secs_f64());
        let _ = shared.finish.send((id, attempt, finish)).await;
        shared.ended.notify_waiters();
    });
}

/// How an attempt ended: what the store records, its metric label, and what its
/// queue's breaker hears. `None`: it was stopped (its end is not this task's).
type Ending = (Finish, &'static str, Outcome);

/// The ending of an attempt that came to `result` (its worker's `output` kept on
/// completion); `None` for one that was stopped.
fn ending(
    c: &RunnerConfig,
    result: Result<Result<Result<(), JobError>, tokio::time::error::Elapsed>, tokio::task::JoinError>,
    output: &std::sync::Mutex<Option<serde_json::Value>>,
    timeout: Duration,
    attempt: i32,
) -> Option<Ending> {
    Some(match result {
        Ok(Ok(Ok(()))) => {
            let value = output
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            (Finish::Completed(value), "completed", Outcome::Success)
        }
        Ok(Ok(Err(e))) => judge(c, e, attempt),
        Ok(Err(_elapsed)) => failed(c, format!("timed out after {timeout:?}"), attempt, "timed_out"),
        Err(e) if e.is_panic() => failed(c, panic_message(e), attempt, "panicked"),
        Err(_) => return None,
    })
}

/// What a worker's error makes of the attempt: a failure counts against the
/// queue's breaker; a refusal, a snooze or a cancellation says nothing of it.
fn judge(c: &RunnerConfig, e: JobError, attempt: i32) -> Ending {
    match e {
        JobError::Failed(error) => failed(c, error, attempt, "failed"),
        JobError::Discard(error) => (
            Finish::Failed {
                error,
                retry_in: Duration::ZERO,
                discard: true,
            },
            "discarded",
            Outcome::Ignored,
        ),
        JobError::Snooze(d) => (Finish::Snoozed(d), "snoozed", Outcome::Ignored),
        JobError::Cancel(reason) => (Finish::Cancelled(reason), "cancelled", Outcome::Ignored),
    }
}

fn failed(c: &RunnerConfig, error: String, attempt: i32, outcome: &'static str) -> Ending {
    let n = u32::try_from(attempt).unwrap_or(1).max(1);
    let retry_in = c.backoff.delay(n, Duration::ZERO, &mut fastrand::Rng::new());
    (
        Finish::Failed {
            error,
            retry_in,
            discard: false,
        },
        outcome,
        Outcome::Failure,
    )
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("panicked: {text}")
}

/// Records ended attempts in batches until every sender is gone. A batch the
/// database refuses is tried again (the jobs' leases keep them meanwhile; past
/// them, the jobs run again).
async fn finisher(store: Store, mut batches: crate::batch::Batcher<(i64, i32, Finish)>) {
    let mut rng = fastrand::Rng::new();
    while let Some(batch) = batches.next().await {
        for n in 1u32.. {
            match store.finish(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, jobs = batch.len(), "recording finished jobs failed; retrying");
                    if n >= 20 {
                        tracing::error!(
                            jobs = batch.len(),
                            "gave up recording finished jobs: their leases will expire and they will run again"
                        );
                        break;
                    }
                    tokio::time::sleep(Backoff::default().delay(n, Duration::ZERO, &mut rng)).await;
                }
            }
        }
    }
}

/// Extends the leases of the running jobs every third of the lease, and stops
/// those the database no longer gives this runner (cancelled, or rescued after a
/// lease lost to a long pause).
async fn heartbeat(shared: Arc<Shared>) {
    let every = shared.config.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let held: Vec<(i64, i32)> = lock(&shared.running)
            .iter()
            .map(|(id, r)| (*id, r.attempt))
            .collect();
        match shared.store.heartbeat(&held, shared.config.lease).await {
            Ok(kept) => {
                let mut running = lock(&shared.running);
                for (id, attempt) in held.iter().filter(|(id, _)| !kept.contains(id)) {
                    if running.get(id).is_some_and(|r| r.attempt == *attempt)
                        && let Some(r) = running.remove(id)
                    {
                        r.abort.abort();
                        metrics::counter!("palisade_queue_jobs_stopped_total").increment(1);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "job heartbeat failed"),
        }
    }
}

/// Enqueues each periodic job's next slot ahead of time (a duplicate when another
/// runner did it first), and deletes finished jobs past the retention.
async fn scheduler(queue: Queue, config: RunnerConfig) {
    const PRUNE_EVERY: i64 = 600_000;
    let mut enqueued: HashMap<String, i64> = HashMap::new();
    let mut next_prune = now_ms();
    let mut next_stats = now_ms();
    loop {
        let now = now_ms();
        let mut wake = now + PRUNE_EVERY;
        for p in &config.periodic {
            let Some(slot) = p.schedule.next_after(now) else {
                continue;
            };
            if enqueued.get(&p.name) != Some(&slot) {
                match queue.enqueue(p.job_for(slot)).await {
                    Ok(_) => {
                        enqueued.insert(p.name.clone(), slot);
                    }
                    Err(e) => {
                        tracing::warn!(periodic = %p.name, error = %e, "enqueueing a periodic job failed");
                        wake = wake.min(now + crate::job::millis(config.poll_interval));
                        continue;
                    }
                }
            }
            // Once this slot is due, the one after it is enqueued.
            wake = wake.min(slot + 1);
        }
        if let Some(age) = config.retention
            && now >= next_prune
        {
            loop {
                match queue.prune(age).await {
                    Ok(n) if n >= 10_000 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "deleting finished jobs failed");
                        break;
                    }
                }
            }
            next_prune = now + PRUNE_EVERY;
        }
        if let Some(every) = config.stats_interval
            && now >= next_stats
        {
            export_depth(&queue).await;
            next_stats = now + crate::job::millis(every).max(1);
        }
        if config.stats_interval.is_some() {
            wake = wake.min(next_stats);
        }
        wake = wake.min(next_prune);
        let pause = u64::try_from(wake - now_ms()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(pause.max(1))).await;
    }
}

/// Sets the depth gauges from the queue's statistics.
async fn export_depth(queue: &Queue) {
    match queue.stats().await {
        Ok(stats) => {
            for s in stats {
                for state in crate::JobState::ALL {
                    metrics::gauge!("palisade_queue_depth", "queue" => s.queue.clone(), "state" => state.as_str())
                        .set(s.counts[state.code() as usize] as f64);
                }
                metrics::gauge!("palisade_queue_oldest_wait_seconds", "queue" => s.queue.clone())
                    .set(s.oldest_wait_ms as f64 / 1e3);
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the queue's depth failed"),
    }
}

/// Takes back expired jobs every `rescue_interval`.
async fn rescuer(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.config.rescue_interval).await;
        match shared.store.rescue().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("palisade_queue_rescued_total").increment(n);
                tracing::info!(jobs = n, "rescued jobs whose worker was lost");
            }
            Err(e) => tracing::warn!(error = %e, "rescuing expired jobs failed"),
        }
    }
}

/// Passes this process's enqueues on to every queue's fetch loop.
async fn relay_local(
    local: Arc<Notify>,
    wakes: HashMap<String, Arc<Notify>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = local.notified() => {}
            _ = stopped.changed() => return,
        }
        for w in wakes.values() {
            w.notify_one();
        }
    }
}

/// Wakes a queue's fetch loop when PostgreSQL says a job was enqueued on it.
async fn listen(
    mut listener: sqlx::postgres::PgListener,
    wakes: HashMap<String, Arc<Notify>>,
    pause: Duration,
) {
    loop {
        if let Err(e) = listener.listen("palisade_jobs").await {
            tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(pause).await;
            continue;
        }
        // Jobs enqueued while not listening said nothing: look now.
        for w in wakes.values() {
            w.notify_one();
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    if let Some(w) = wakes.get(n.payload()) {
                        w.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "job notifications lost; polling until they are back");
                    tokio::time::sleep(pause).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use palisade_core::ManualClock;
    use palisade_resilience::breaker::{BreakerConfig, OpenDuration, State};
    use palisade_resilience::ratelimit::{Gcra, Quota};

    use super::*;

    fn breaker(clock: &ManualClock) -> CircuitBreaker {
        CircuitBreaker::builder("dependency")
            .config(
                BreakerConfig::empty()
                    .consecutive_failures(2)
                    .open_duration(OpenDuration::Fixed(Duration::from_secs(10)))
                    .half_open(1, 1),
            )
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    #[test]
    fn an_open_breaker_takes_nothing_and_a_half_open_one_its_probes() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        let q = QueueConfig::new("q", 8).breaker(b.clone());
        let all = q.admit(8);
        assert_eq!((all.permits.len(), all.held.is_none()), (8, true));
        for p in all.permits.into_iter().flatten().take(2) {
            p.failure();
        }
        assert_eq!(b.state(), State::Open);
        let open = q.admit(8);
        assert!(open.permits.is_empty());
        assert_eq!(open.held, Some(("breaker", Some(Duration::from_secs(10)))));
        clock.advance(Duration::from_secs(10));
        let probing = q.admit(8);
        assert_eq!(probing.permits.len(), 1, "one probe when half-open");
        assert_eq!(probing.held.map(|h| h.0), Some("breaker"));
    }

    #[test]
    fn a_rate_limit_admits_its_burst_then_says_when() {
        let clock = ManualClock::new();
        let limit = RateLimiter::new(Gcra::new(Quota::per_second(4)).unwrap()).with_clock(clock.clone());
        let q = QueueConfig::new("q", 10).rate_limit(limit);
        let first = q.admit(10);
        assert_eq!(first.permits.len(), 4, "the burst");
        assert_eq!(first.held, Some(("rate_limit", Some(Duration::from_millis(250)))));
        assert!(q.admit(10).permits.is_empty());
        clock.advance(Duration::from_millis(500));
        assert_eq!(q.admit(10).permits.len(), 2);
    }
}

#[cfg(test)]
mod depth {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;
    use crate::NewJob;

    #[test]
    fn the_depth_per_queue_and_state_is_exported_as_gauges() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            rt.block_on(async {
                let q = Queue::connect("sqlite::memory:").await.unwrap();
                let jobs: Vec<_> = (0..3)
                    .map(|n| NewJob::new("k", &n).unwrap().queue("mail"))
                    .collect();
                q.enqueue_many(&jobs).await.unwrap();
                q.enqueue(
                    NewJob::new("k", &9)
                        .unwrap()
                        .queue("mail")
                        .delay(Duration::from_secs(60)),
                )
                .await
                .unwrap();
                export_depth(&q).await;
            });
        });
        let gauges: HashMap<(String, String), f64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let key = key.key();
                let DebugValue::Gauge(v) = value else { return None };
                let label = |n: &str| key.labels().find(|l| l.key() == n).map(|l| l.value().to_string());
                Some((
                    (key.name().to_string(), label("state").unwrap_or_default()),
                    v.into_inner(),
                ))
            })
            .collect();
        let depth = |state: &str| gauges[&("palisade_queue_depth".to_string(), state.to_string())];
        assert_eq!(
            (depth("available"), depth("scheduled"), depth("running")),
            (3.0, 1.0, 0.0)
        );
        assert!(gauges.contains_key(&("palisade_queue_oldest_wait_seconds".to_string(), String::new())));
    }
}
