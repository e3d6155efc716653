//! Durable sagas on the job queue.
//!
//! A saga is a list of steps, each with a compensation that undoes it. Its state
//! is a row in PostgreSQL or SQLite (the queue's database); each step runs as a
//! job of `palisade-queue`, so retries with backoff, timeouts and the rescue of a
//! dead worker's job come from the queue. A step's result is recorded, the saga
//! moved on and the next step's job enqueued in one transaction; a step that fails
//! for good (it says so with [`StepError::Abort`], or runs out of attempts) has
//! the completed steps compensated, last first, each compensation a job retried
//! until it succeeds.
//!
//! A worker can die anywhere (before a step, after its effect but before its
//! record, after its record but before its job is marked done): the job runs
//! again, so every step and compensation must be idempotent, and each is given a
//! stable idempotency key for its effects. A saga ends fully done or fully
//! compensated.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use palisade_queue::{JobContext, JobError, NewJob, Queue, Worker};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, SqliteConnection, SqlitePool};

const SCHEMA_POSTGRES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS palisade_sagas (
        id bigserial PRIMARY KEY,
        name text NOT NULL,
        key text UNIQUE,
        input jsonb NOT NULL,
        state text NOT NULL,
        step int NOT NULL,
        outputs jsonb NOT NULL DEFAULT '[]',
        error text,
        updated_at timestamptz NOT NULL DEFAULT now())",
    // Tables made before sagas had start keys.
    "ALTER TABLE palisade_sagas ADD COLUMN IF NOT EXISTS key text UNIQUE",
];

const SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS palisade_sagas (
    id integer PRIMARY KEY AUTOINCREMENT,
    name text NOT NULL,
    key text UNIQUE,
    input text NOT NULL,
    state text NOT NULL,
    step integer NOT NULL,
    outputs text NOT NULL DEFAULT '[]',
    error text,
    updated_at text NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// The job kind of saga steps and compensations.
pub const SAGA_JOB: &str = "palisade_saga";

/// Why a step or a compensation did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Try again later (the queue's backoff); a step that runs out of attempts is
    /// aborted.
    #[error("{0}")]
    Retry(String),
    /// It can never succeed (a card declined, stock gone): compensate now. (A
    /// compensation that aborts is retried all the same: undoing must succeed.)
    #[error("{0}")]
    Abort(String),
    /// Not yet: something outside has not happened (a payment awaited until a
    /// deadline). The step runs again after this long without spending an
    /// attempt (the queue's snooze).
    #[error("waiting {0:?}")]
    Wait(std::time::Duration),
}

/// What a step is given.
#[derive(Clone, Debug)]
pub struct StepContext {
    /// The saga's id.
    pub saga: i64,
    /// The step's index (from 0).
    pub step: usize,
    /// The saga's input.
    pub input: Value,
    /// The results of the steps before it.
    pub outputs: Vec<Value>,
    /// A key stable across every run of this step (or of its compensation): give
    /// it to the services the step calls, so that running it again changes nothing.
    pub key: String,
    /// This run's attempt at the step (from 1): the job's attempts counted from
    /// the step's first run (a job goes on from one step to the next).
    pub attempt: i32,
}

/// One step of a saga and its compensation.
pub trait Step: Send + Sync + 'static {
    /// Its name (in logs and the saga's record).
    fn name(&self) -> &str;

    /// Does the step; its result is kept for the steps after it.
    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<Value, StepError>>;

    /// Undoes the step (called only for a step that completed).
    fn compensate<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>>;
}

/// A saga's definition: its name and its steps, in order.
#[derive(Clone)]
pub struct Saga {
    name: String,
    steps: Vec<Arc<dyn Step>>,
    attempts: i32,
}

impl std::fmt::Debug for Saga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<&str> = self.steps.iter().map(|s| s.name()).collect();
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("steps", &steps)
            .finish()
    }
}

impl Saga {
    /// A saga named `name` with no steps yet; 5 attempts per step.
    pub fn new(name: impl Into<String>) -> Self {
        Saga {
            name: name.into(),
            steps: Vec::new(),
            attempts: 5,
        }
    }

    /// Adds a step after the others.
    pub fn step(mut self, step: impl Step) -> Self {
        self.steps.push(Arc::new(step));
        self
    }

    /// Attempts per step before it is aborted (at least 1).
    pub fn attempts(mut self, n: i32) -> Self {
        self.attempts = n.max(1);
        self
    }
}

/// Where a saga is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaState {
    /// Steps running forward.
    Running,
    /// A step failed: completed steps being undone.
    Compensating,
    /// Every step done.
    Done,
    /// Every completed step undone.
    Compensated,
}

impl SagaState {
    fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Done => "done",
            SagaState::Compensated => "compensated",
        }
    }

    fn parse(s: &str) -> Option<SagaState> {
        [
            SagaState::Running,
            SagaState::Compensating,
            SagaState::Done,
            SagaState::Compensated,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A saga's record.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaStatus {
    /// Its id.
    pub id: i64,
    /// Its definition's name.
    pub name: String,
    /// Where it is.
    pub state: SagaState,
    /// Running: the next step to run; compensating: the steps still to undo.
    pub step: i32,
    /// The completed steps' results.
    pub outputs: Vec<Value>,
    /// Why it is being (or was) compensated.
    pub error: Option<String>,
}

/// A change of a saga, reported to the observer (after its transaction commits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A step's result was recorded.
    StepDone {
        /// The saga.
        saga: i64,
        /// The step.
        step: usize,
    },
    /// A step's compensation was recorded.
    StepUndone {
        /// The saga.
        saga: i64,
        /// The step.
        step: usize,
    },
    /// The saga started compensating.
    Aborted {
        /// The saga.
        saga: i64,
        /// The failed step.
        step: usize,
    },
}

/// Failures of the saga machinery itself.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// No saga of this name is registered.
    #[error("no saga named {0:?} is registered")]
    Unknown(String),
    /// The database.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The queue.
    #[error(transparent)]
    Queue(#[from] palisade_queue::QueueError),
    /// An input or output that does not (de)serialize.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

type Observer = dyn Fn(&Transition) + Send + Sync;

/// Where sagas are kept: the database of the queue their steps run on, so that a
/// step's record and the next step's job are one transaction.
#[derive(Clone, Debug)]
pub enum SagaDb {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite (one process's sagas, as the embedded queue).
    Sqlite(SqlitePool),
}

impl From<PgPool> for SagaDb {
    fn from(pool: PgPool) -> SagaDb {
        SagaDb::Postgres(pool)
    }
}

impl From<SqlitePool> for SagaDb {
    fn from(pool: SqlitePool) -> SagaDb {
        SagaDb::Sqlite(pool)
    }
}

/// A connection (in a transaction) of either database.
enum Conn<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

impl Conn<'_> {
    /// `pg` on PostgreSQL, else `sqlite`: the few statements the dialects spell
    /// apart.
    fn dialect(&self, pg: &'static str, sqlite: &'static str) -> &'static str {
        match self {
            Conn::Postgres(_) => pg,
            Conn::Sqlite(_) => sqlite,
        }
    }
}

/// `$body` with `$e` the connection of `$conn` (a `&mut Conn`), written once for
/// both databases.
macro_rules! on_conn {
    ($conn:expr, $e:ident => $body:expr) => {
        match $conn {
            Conn::Postgres($e) => $body,
            Conn::Sqlite($e) => $body,
        }
    };
}

/// Runs `$body` with `$c` a [`Conn`] in a transaction of the saga database `$db`,
/// committed when the body's value is `Ok` (an early `return` rolls it back).
macro_rules! in_tx {
    ($db:expr, $c:ident => $body:expr) => {
        match $db {
            SagaDb::Postgres(pool) => {
                let mut tx = palisade_queue::begin(pool).await?;
                let mut $c = Conn::Postgres(&mut *tx);
                let out: Result<_, SagaError> = $body;
                if out.is_ok() {
                    tx.commit().await?;
                }
                out
            }
            SagaDb::Sqlite(pool) => {
                let mut tx = palisade_queue::begin(pool).await?;
                let mut $c = Conn::Sqlite(&mut *tx);
                let out: Result<_, SagaError> = $body;
                if out.is_ok() {
                    tx.commit().await?;
                }
                out
            }
        }
    };
}

/// The registered sagas, their store, and the queue their steps run on.
#[derive(Clone)]
pub struct Sagas {
    inner: Arc<Inner>,
}

struct Inner {
    db: SagaDb,
    queue_name: String,
    sagas: HashMap<String, Saga>,
    observer: Option<Box<Observer>>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas")
            .field("sagas", &self.inner.sagas.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds [`Sagas`].
pub struct SagasBuilder {
    db: SagaDb,
    queue_name: String,
    sagas: HashMap<String, Saga>,
    observer: Option<Box<Observer>>,
}

impl SagasBuilder {
    /// Registers `saga`.
    pub fn register(mut self, saga: Saga) -> Self {
        self.sagas.insert(saga.name.clone(), saga);
        self
    }

    /// The queue steps run on (default `sagas`).
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue_name = name.into();
        self
    }

    /// Calls `observer` after every recorded change (metrics, logs).
    pub fn observe(mut self, observer: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Creates the saga table if missing (and adds the start key to a table made
    /// before it existed).
    pub async fn build(self) -> Result<Sagas, SagaError> {
        match &self.db {
            SagaDb::Postgres(pool) => {
                // Processes starting together create it once (two `CREATE TABLE
                // IF NOT EXISTS` at once can both try).
                let mut tx = palisade_queue::begin(pool).await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('palisade_sagas', 0))")
                    .execute(&mut *tx)
                    .await?;
                for ddl in SCHEMA_POSTGRES {
                    sqlx::query(ddl).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            SagaDb::Sqlite(pool) => {
                sqlx::query(SCHEMA_SQLITE).execute(pool).await?;
            }
        }
        Ok(Sagas {
            inner: Arc::new(Inner {
                db: self.db,
                queue_name: self.queue_name,
                sagas: self.sagas,
                observer: self.observer,
            }),
        })
    }
}

/// A step job's arguments.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StepJob {
    saga: i64,
    step: usize,
    undo: bool,
    /// The job's attempts spent before this step's first run: a job that went on
    /// to this step after the one it was enqueued for counts the step's attempts
    /// from there.
    #[serde(default, skip_serializing_if = "is_zero")]
    base: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl StepJob {
    /// The first run of `step` (its compensation when `undo`) in a job of its own.
    fn new(saga: i64, step: usize, undo: bool) -> StepJob {
        StepJob {
            saga,
            step,
            undo,
            base: 0,
        }
    }

    /// Where the saga is when this job is the one to run: running at the step, or
    /// compensating with this step the last one still to undo.
    fn expected(&self) -> (SagaState, i32) {
        let step = i32::try_from(self.step).unwrap_or(i32::MAX);
        if self.undo {
            (SagaState::Compensating, step.saturating_add(1))
        } else {
            (SagaState::Running, step)
        }
    }

    /// The key the step (or its compensation) gives the services it calls.
    fn key(&self) -> String {
        let what = if self.undo { "undo" } else { "do" };
        format!("saga:{}:{}:{what}", self.saga, self.step)
    }
}

/// What [`Sagas::start_once`] came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// Started now, with this id.
    New(i64),
    /// A saga with this key was started before (its id).
    Existing(i64),
}

impl Sagas {
    /// Sagas kept in `db` (a [`PgPool`] or a [`SqlitePool`]: the queue's database,
    /// so that a step's record and the next step's job are one transaction).
    pub fn builder(db: impl Into<SagaDb>) -> SagasBuilder {
        SagasBuilder {
            db: db.into(),
            queue_name: "sagas".into(),
            sagas: HashMap::new(),
            observer: None,
        }
    }

    /// The worker that runs saga steps: register it with the queue's runner.
    pub fn worker(&self) -> SagaWorker {
        SagaWorker(self.clone())
    }

    /// Starts saga `name` with `input`; its id.
    pub async fn start(&self, name: &str, input: &impl Serialize) -> Result<i64, SagaError> {
        let started = self.insert(name, None, input).await?;
        Ok(match started {
            Started::New(id) | Started::Existing(id) => id,
        })
    }

    /// Starts saga `name` with `input` unless one was started with `key` before:
    /// a start retried (a client's retry, a redelivered job) starts it once.
    pub async fn start_once(
        &self,
        name: &str,
        key: &str,
        input: &impl Serialize,
    ) -> Result<Started, SagaError> {
        self.insert(name, Some(key), input).await
    }

    async fn insert(
        &self,
        name: &str,
        key: Option<&str>,
        input: &impl Serialize,
    ) -> Result<Started, SagaError> {
        let input = serde_json::to_string(input)?;
        in_tx!(&self.inner.db, c => {
            match (self.insert_in(&mut c, name, key, &input).await?, key) {
                (Some(id), _) => Ok(Started::New(id)),
                (None, Some(key)) => {
                    let id: i64 = on_conn!(&mut c, e => {
                        sqlx::query_scalar("SELECT id FROM palisade_sagas WHERE key = $1")
                            .bind(key)
                            .fetch_one(&mut **e)
                            .await?
                    });
                    Ok(Started::Existing(id))
                }
                (None, None) => Err(sqlx::Error::RowNotFound.into()),
            }
        })
    }

    /// Starts saga `name` in the caller's PostgreSQL transaction: it exists if
    /// that commits.
    pub async fn start_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
        input: &impl Serialize,
    ) -> Result<i64, SagaError> {
        let input = serde_json::to_string(input)?;
        let id = self
            .insert_in(&mut Conn::Postgres(conn), name, None, &input)
            .await?;
        id.ok_or_else(|| sqlx::Error::RowNotFound.into())
    }

    /// Inserts a saga's record and enqueues its first step; `None` when a saga
    /// with `key` exists.
    async fn insert_in(
        &self,
        c: &mut Conn<'_>,
        name: &str,
        key: Option<&str>,
        input: &str,
    ) -> Result<Option<i64>, SagaError> {
        let saga = self.saga(name)?;
        let state = if saga.steps.is_empty() {
            SagaState::Done
        } else {
            SagaState::Running
        };
        let sql = c.dialect(
            "INSERT INTO palisade_sagas (name, key, input, state, step) VALUES ($1, $2, $3::jsonb, $4, 0)
             ON CONFLICT (key) DO NOTHING RETURNING id",
            "INSERT INTO palisade_sagas (name, key, input, state, step) VALUES ($1, $2, $3, $4, 0)
             ON CONFLICT (key) DO NOTHING RETURNING id",
        );
        let id: Option<i64> = on_conn!(&mut *c, e => {
            sqlx::query_scalar(sql)
                .bind(name)
                .bind(key)
                .bind(input)
                .bind(state.as_str())
                .fetch_optional(&mut **e)
                .await?
        });
        if let (Some(id), SagaState::Running) = (id, state) {
            self.enqueue(c, StepJob::new(id, 0, false)).await?;
        }
        Ok(id)
    }

    /// Runs saga `id`'s current step (or compensation) again now, for a step
    /// that waits ([`StepError::Wait`]) on something that has just happened (a
    /// payment arrived): a job of its own, so the saga moves on at once rather
    /// than when the wait ends. The waiting job, when it wakes, finds the saga
    /// moved on and does nothing; a step woken too early waits again. `false`
    /// when the saga has ended or does not exist.
    pub async fn wake(&self, id: i64) -> Result<bool, SagaError> {
        // A saga that moves on between the read and the lock is read again: its
        // new step is the one to wake (it only moves forward, so this ends).
        loop {
            let Some(status) = self.status(id).await? else {
                return Ok(false);
            };
            let step = usize::try_from(status.step).unwrap_or(0);
            let job = match status.state {
                SagaState::Running => StepJob::new(id, step, false),
                SagaState::Compensating if step > 0 => StepJob::new(id, step - 1, true),
                _ => return Ok(false),
            };
            let woken = in_tx!(&self.inner.db, c => {
                // Under the row's lock: only the step the saga is still at.
                if still(&mut c, id, status.state, status.step).await? {
                    self.enqueue(&mut c, job).await.map(|()| true)
                } else {
                    Ok(false)
                }
            })?;
            if woken {
                return Ok(true);
            }
        }
    }

    /// [`wake`](Self::wake) for the saga started with `key`.
    pub async fn wake_by_key(&self, key: &str) -> Result<bool, SagaError> {
        match self.status_by_key(key).await? {
            Some(s) => self.wake(s.id).await,
            None => Ok(false),
        }
    }

    /// Saga `id`'s record.
    pub async fn status(&self, id: i64) -> Result<Option<SagaStatus>, SagaError> {
        Ok(self.record(id).await?.map(|(status, _)| status))
    }

    /// The record of the saga started with `key` ([`start_once`](Self::start_once)).
    pub async fn status_by_key(&self, key: &str) -> Result<Option<SagaStatus>, SagaError> {
        let id: Option<i64> = match &self.inner.db {
            SagaDb::Postgres(pool) => {
                sqlx::query_scalar("SELECT id FROM palisade_sagas WHERE key = $1")
                    .bind(key)
                    .fetch_optional(pool)
                    .await?
            }
            SagaDb::Sqlite(pool) => {
                sqlx::query_scalar("SELECT id FROM palisade_sagas WHERE key = $1")
                    .bind(key)
                    .fetch_optional(pool)
                    .await?
            }
        };
        match id {
            Some(id) => self.status(id).await,
            None => Ok(None),
        }
    }

    /// Saga `id`'s record and its input.
    async fn record(&self, id: i64) -> Result<Option<(SagaStatus, Value)>, SagaError> {
        type Row = (String, String, i32, String, Option<String>, String);
        let row: Option<Row> = match &self.inner.db {
            SagaDb::Postgres(pool) => sqlx::query_as(
                "SELECT name, state, step, outputs::text, error, input::text FROM palisade_sagas WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?,
            SagaDb::Sqlite(pool) => sqlx::query_as(
                "SELECT name, state, step, outputs, error, input FROM palisade_sagas WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?,
        };
        let Some((name, state, step, outputs, error, input)) = row else {
            return Ok(None);
        };
        let status = SagaStatus {
            id,
            name,
            state: SagaState::parse(&state).unwrap_or(SagaState::Running),
            step,
            outputs: serde_json::from_str(&outputs)?,
            error,
        };
        Ok(Some((status, serde_json::from_str(&input)?)))
    }

    fn saga(&self, name: &str) -> Result<&Saga, SagaError> {
        self.inner
            .sagas
            .get(name)
            .ok_or_else(|| SagaError::Unknown(name.to_string()))
    }

    async fn enqueue(&self, c: &mut Conn<'_>, job: StepJob) -> Result<(), SagaError> {
        // The queue never gives a step's job up: a step counts its own attempts (a
        // job rescued from a dead worker spends one too) and is aborted after the
        // last, and a compensation is retried until it succeeds (the queue's
        // backoff is capped). A job the queue discarded would strand its saga.
        let new = NewJob::new(SAGA_JOB, &job)?
            .queue(self.inner.queue_name.clone())
            .max_attempts(i32::MAX);
        match c {
            Conn::Postgres(e) => Queue::enqueue_in_postgres(e, &[new]).await?,
            Conn::Sqlite(e) => Queue::enqueue_in_sqlite(e, &[new]).await?,
        };
        Ok(())
    }

    fn observe(&self, t: Transition) {
        if let Some(o) = &self.inner.observer {
            o(&t);
        }
    }

    /// Runs a step or compensation job: its step, and the ones after it in the
    /// same attempt while each is recorded (see [`hand_on`](Self::hand_on)).
    async fn work(&self, job: &JobContext, args: StepJob) -> Result<(), JobError> {
        let Some((status, input)) = self.record(args.saga).await.map_err(JobError::failed)? else {
            return Err(JobError::discard(format!("saga {} does not exist", args.saga)));
        };
        let saga = self.saga(&status.name).map_err(JobError::discard)?;
        // A job delivered again after its record (the worker died before the queue
        // heard it was done) finds the saga moved on and does nothing.
        if (status.state, status.step) != args.expected() {
            return Ok(());
        }
        let mut ctx = StepContext {
            saga: args.saga,
            step: args.step,
            input,
            outputs: status.outputs,
            key: String::new(),
            attempt: 0,
        };
        let mut next = Some(args);
        while let Some(args) = next {
            let Some(step) = saga.steps.get(args.step) else {
                return Err(JobError::discard(format!(
                    "saga {} has no step {}",
                    saga.name, args.step
                )));
            };
            ctx.step = args.step;
            ctx.key = args.key();
            ctx.attempt = job.attempt - args.base;
            next = if args.undo {
                match step.compensate(&ctx).await {
                    Ok(()) => self.undone(job, args).await.map_err(JobError::failed)?,
                    Err(StepError::Wait(d)) => return Err(JobError::snooze(d)),
                    Err(e) => return Err(JobError::failed(e)),
                }
            } else {
                self.run_step(job, saga, step.as_ref(), &mut ctx, args).await?
            };
        }
        Ok(())
    }

    /// Runs step `args.step` and records how it went; the job to go on with.
    async fn run_step(
        &self,
        job: &JobContext,
        saga: &Saga,
        step: &dyn Step,
        ctx: &mut StepContext,
        args: StepJob,
    ) -> Result<Option<StepJob>, JobError> {
        let outcome = if ctx.attempt > saga.attempts {
            Err(StepError::Abort(format!(
                "no attempt left after {}",
                saga.attempts
            )))
        } else {
            step.run(ctx).await
        };
        let recorded = match outcome {
            Ok(output) => {
                let next = self.done(job, saga, args, &output).await;
                ctx.outputs.push(output);
                next
            }
            Err(StepError::Retry(e)) if ctx.attempt < saga.attempts => return Err(JobError::failed(e)),
            Err(StepError::Wait(d)) => return Err(JobError::snooze(d)),
            Err(e) => self.abort(job, saga, args, &e.to_string()).await,
        };
        recorded.map_err(JobError::failed)
    }

    /// Records step `args.step`'s result and hands on the next step (or ends).
    async fn done(
        &self,
        job: &JobContext,
        saga: &Saga,
        args: StepJob,
        output: &Value,
    ) -> Result<Option<StepJob>, SagaError> {
        let last = args.step + 1 == saga.steps.len();
        let next = in_tx!(&self.inner.db, c => {
            // Recorded only if the saga is still at this step (the row's lock
            // held from here): one statement for the check and the record.
            let sql = c.dialect(
                "UPDATE palisade_sagas SET outputs = outputs || jsonb_build_array($2::jsonb), step = step + 1,
                     state = $3, updated_at = CURRENT_TIMESTAMP WHERE id = $1 AND state = $4 AND step = $5",
                "UPDATE palisade_sagas SET outputs = json_insert(outputs, '$[#]', json($2)), step = step + 1,
                     state = $3, updated_at = CURRENT_TIMESTAMP WHERE id = $1 AND state = $4 AND step = $5",
            );
            let state = if last { SagaState::Done } else { SagaState::Running };
            let recorded = on_conn!(&mut c, e => {
                sqlx::query(sql)
                    .bind(args.saga)
                    .bind(output.to_string())
                    .bind(state.as_str())
                    .bind(SagaState::Running.as_str())
                    .bind(args.step as i32)
                    .execute(&mut **e)
                    .await?
                    .rows_affected()
            });
            if recorded != 1 {
                return Ok(None);
            }
            if last {
                Ok(None)
            } else {
                self.hand_on(&mut c, job, StepJob::new(args.saga, args.step + 1, false)).await
            }
        })?;
        self.observe(Transition::StepDone {
            saga: args.saga,
            step: args.step,
        });
        Ok(next)
    }

    /// Step `args.step` failed for good: compensate the ones before it.
    async fn abort(
        &self,
        job: &JobContext,
        saga: &Saga,
        args: StepJob,
        error: &str,
    ) -> Result<Option<StepJob>, SagaError> {
        let why = format!("step {} ({}): {error}", args.step, saga.steps[args.step].name());
        let next = in_tx!(&self.inner.db, c => {
            if !still(&mut c, args.saga, SagaState::Running, args.step as i32).await? {
                return Ok(None);
            }
            let (state, next) = self.compensate_before(&mut c, job, args).await?;
            set_state(&mut c, args.saga, state, None, Some(&why)).await.map(|()| next)
        })?;
        tracing::warn!(saga = args.saga, name = %saga.name, step = args.step, error, "saga aborted; compensating");
        self.observe(Transition::Aborted {
            saga: args.saga,
            step: args.step,
        });
        Ok(next)
    }

    /// Records step `args.step`'s compensation and hands on the one before it.
    async fn undone(&self, job: &JobContext, args: StepJob) -> Result<Option<StepJob>, SagaError> {
        let next = in_tx!(&self.inner.db, c => {
            if !still(&mut c, args.saga, SagaState::Compensating, args.step as i32 + 1).await? {
                return Ok(None);
            }
            let (state, next) = self.compensate_before(&mut c, job, args).await?;
            set_state(&mut c, args.saga, state, Some(args.step as i32), None).await.map(|()| next)
        })?;
        self.observe(Transition::StepUndone {
            saga: args.saga,
            step: args.step,
        });
        Ok(next)
    }

    /// Hands on the compensation of the step before `args.step`, if there is one;
    /// the saga's state from then on, and the job to go on with.
    async fn compensate_before(
        &self,
        c: &mut Conn<'_>,
        job: &JobContext,
        args: StepJob,
    ) -> Result<(SagaState, Option<StepJob>), SagaError> {
        if args.step == 0 {
            return Ok((SagaState::Compensated, None));
        }
        let undo = StepJob::new(args.saga, args.step - 1, true);
        Ok((SagaState::Compensating, self.hand_on(c, job, undo).await?))
    }

    /// Hands `next` on, in the transaction recording the work before it. The job
    /// that did that work goes on with it in the same attempt, its arguments
    /// rewritten so that the job, rescued after a worker died, resumes at `next`:
    /// no job to enqueue, fetch, read the saga for and complete per step. When the
    /// attempt is no longer the job's (its lease ran out, it was cancelled), `next`
    /// is enqueued as a job of its own, and the attempt stops.
    async fn hand_on(
        &self,
        c: &mut Conn<'_>,
        job: &JobContext,
        next: StepJob,
    ) -> Result<Option<StepJob>, SagaError> {
        // Its first run is this attempt: its attempts count from here.
        let carried = StepJob {
            base: job.attempt - 1,
            ..next
        };
        let args = serde_json::to_value(carried)?;
        let kept = match c {
            Conn::Postgres(e) => Queue::reassign_in_postgres(e, job.id, job.attempt, &args).await?,
            Conn::Sqlite(e) => Queue::reassign_in_sqlite(e, job.id, job.attempt, &args).await?,
        };
        if kept {
            return Ok(Some(carried));
        }
        self.enqueue(c, next).await?;
        Ok(None)
    }
}

/// Whether the saga is still at `state` and `step`, its row locked for the rest
/// of the transaction if so (an update: a row lock on PostgreSQL, the write lock
/// on SQLite, taken before anything is read).
async fn still(c: &mut Conn<'_>, saga: i64, state: SagaState, step: i32) -> Result<bool, SagaError> {
    let touched = on_conn!(c, e => {
        sqlx::query(
            "UPDATE palisade_sagas SET updated_at = CURRENT_TIMESTAMP WHERE id = $1 AND state = $2 AND step = $3",
        )
        .bind(saga)
        .bind(state.as_str())
        .bind(step)
        .execute(&mut **e)
        .await?
        .rows_affected()
    });
    Ok(touched == 1)
}

/// Sets the saga's state (and its step, its error, when given).
async fn set_state(
    c: &mut Conn<'_>,
    saga: i64,
    state: SagaState,
    step: Option<i32>,
    error: Option<&str>,
) -> Result<(), SagaError> {
    on_conn!(c, e => {
        sqlx::query(
            "UPDATE palisade_sagas SET state = $2, step = COALESCE($3, step), error = COALESCE($4, error) WHERE id = $1",
        )
        .bind(saga)
        .bind(state.as_str())
        .bind(step)
        .bind(error)
        .execute(&mut **e)
        .await
        .map(drop)?
    });
    Ok(())
}

/// The queue worker of saga steps ([`Sagas::worker`]).
#[derive(Clone, Debug)]
pub struct SagaWorker(Sagas);

impl Worker for SagaWorker {
    const KIND: &'static str = SAGA_JOB;
    type Args = StepJob;

    async fn work(&self, job: JobContext, args: StepJob) -> Result<(), JobError> {
        self.0.work(&job, args).await
    }
}
