//! Typed workers: a [`Worker`] names its job kind and its argument type and runs
//! one job at a time; what it returns ([`JobError`]) decides the job's next state.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Runs the jobs of one kind.
///
/// ```
/// use palisade_queue::{JobContext, JobError, Worker};
///
/// struct SendEmail;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Email { to: String }
///
/// impl Worker for SendEmail {
///     const KIND: &'static str = "send_email";
///     type Args = Email;
///
///     async fn work(&self, job: JobContext, email: Email) -> Result<(), JobError> {
///         if email.to.is_empty() {
///             return Err(JobError::discard("no recipient"));
///         }
///         // ... send it; any `?` error is a failed attempt, retried with backoff.
///         let _ = job.attempt;
///         Ok(())
///     }
/// }
/// ```
pub trait Worker: Send + Sync + 'static {
    /// The kind of job it runs.
    const KIND: &'static str;
    /// The job's arguments. A job whose arguments do not deserialize into it is
    /// discarded at once with that error, never retried.
    type Args: DeserializeOwned + Send + 'static;

    /// Runs one job.
    fn work(&self, job: JobContext, args: Self::Args) -> impl Future<Output = Result<(), JobError>> + Send;
}

/// What a worker knows of the job it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    /// The job's id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// This attempt (1 for the first).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Its labels.
    pub tags: Vec<String>,
    /// What the worker gives as the job's result.
    pub(crate) output: Arc<std::sync::Mutex<Option<Value>>>,
}

impl JobContext {
    /// Keeps `output` as the job's result, stored with it when it completes (read
    /// back as [`crate::Job::output`]: an HTTP delivery's answer, a report's
    /// location).
    pub fn set_output(&self, output: impl serde::Serialize) -> Result<(), serde_json::Error> {
        let value = serde_json::to_value(output)?;
        *self
            .output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value);
        Ok(())
    }
}

/// How a job's attempt did not complete. Any error converts into
/// [`JobError::Failed`] (so `?` works in a worker); the constructors say the rest.
#[derive(Debug)]
pub enum JobError {
    /// The attempt failed: retried after the runner's backoff while attempts
    /// remain, then discarded.
    Failed(String),
    /// The job can never succeed (bad input, a refused payment): discarded now,
    /// with this error.
    Discard(String),
    /// Not now: run again after this long, the attempt not counted (a resource is
    /// busy, a rate limit said wait).
    Snooze(Duration),
    /// Cancelled: never run again (unless retried by hand).
    Cancel(String),
}

impl JobError {
    /// A failed attempt, retried later.
    pub fn failed(e: impl std::fmt::Display) -> Self {
        JobError::Failed(e.to_string())
    }

    /// A job that can never succeed: discarded now.
    pub fn discard(e: impl std::fmt::Display) -> Self {
        JobError::Discard(e.to_string())
    }

    /// Run again after `d`, without spending an attempt.
    pub fn snooze(d: Duration) -> Self {
        JobError::Snooze(d)
    }

    /// Cancelled, for `reason`.
    pub fn cancel(reason: impl std::fmt::Display) -> Self {
        JobError::Cancel(reason.to_string())
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> Self {
        JobError::Failed(e.to_string())
    }
}

/// A job's future, its worker's type erased.
pub(crate) type JobFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// A worker whose argument type is erased: arguments arrive as JSON.
pub(crate) trait Erased: Send + Sync {
    fn run(self: Arc<Self>, job: JobContext, args: Value) -> JobFuture;
}

/// Wraps a [`Worker`] as [`Erased`].
pub(crate) struct Typed<W>(pub(crate) W);

impl<W: Worker> Erased for Typed<W> {
    fn run(self: Arc<Self>, job: JobContext, args: Value) -> JobFuture {
        match serde_json::from_value::<W::Args>(args) {
            Ok(args) => Box::pin(async move { self.0.work(job, args).await }),
            Err(e) => {
                let error =
                    JobError::Discard(format!("arguments do not deserialize into {}'s: {e}", W::KIND));
                Box::pin(std::future::ready(Err(error)))
            }
        }
    }
}
