//! palisade-queue: a durable job queue on PostgreSQL or SQLite.
//!
//! * [`Queue`] enqueues jobs ([`NewJob`]: a kind, JSON arguments, a queue,
//!   priority, delay, attempts, timeout, tags, an optional [`Unique`] rule), one or
//!   many in one round trip, or inside the caller's own transaction so a job exists
//!   only if the business write commits; and inspects, cancels and retries them.
//! * [`Runner`] runs them with typed [`Worker`]s: competing consumers across
//!   processes (`FOR UPDATE SKIP LOCKED` on PostgreSQL), woken by `LISTEN/NOTIFY`,
//!   each job leased and its lease renewed by a heartbeat, so the jobs of a worker
//!   that dies are run again: delivery is **at least once**, and nothing is lost.
//!   Failed attempts are retried after the resilience crate's backoff; a job out of
//!   attempts, or one its worker refuses, is discarded (the dead-letter state) with
//!   its errors kept.
//! * [`Periodic`] jobs are enqueued on a schedule ([`Schedule::Every`] or a
//!   [`Cron`] expression), once per slot across every process, without a leader:
//!   the unique index admits one of the runners' inserts.
//! * [`batch`] groups items by size or linger time, for the runner's completions
//!   and for services' own flushes.
//!
//! The schema ships with the crate ([`SCHEMA_VERSION`]) and is applied on connect,
//! once, by whichever process gets there first; a database at a newer version is
//! refused ([`QueueError::SchemaTooNew`]).

pub mod batch;
mod error;
mod job;
mod periodic;
mod queue;
mod runner;
mod schema;
mod store;
mod worker;

pub use error::QueueError;
pub use job::{AttemptError, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Job, JobState, NewJob, Unique};
/// A transaction a cancelled caller cannot leave open (see [`palisade_core::db::begin`]).
pub use palisade_core::db::begin;
pub use periodic::{Cron, CronError, Periodic, Schedule, format_utc};
pub use queue::{ConnectOptions, Queue};
pub use runner::{QueueConfig, Runner, RunnerConfig, RunnerHandle, ShutdownReport, StartLimit};
pub use schema::SCHEMA_VERSION;
pub use store::{Enqueued, ListFilter, QueueStats};
pub use worker::{JobContext, JobError, Worker};
