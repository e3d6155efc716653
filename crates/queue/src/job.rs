//! Jobs: what is enqueued ([`NewJob`], with its [`Unique`] rule), what is stored
//! ([`Job`]) and the states a job moves through ([`JobState`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where a job stands. Stored as its [`code`](JobState::code).
///
/// ```text
/// enqueued -> available / scheduled -> running -> completed
///                 ^                       |  \--> retryable -> running ...
///                 |                       |  \--> discarded (the dead-letter state)
///                 +------ snoozed --------+  \--> cancelled
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Ready to run now.
    Available,
    /// Waiting for its `scheduled_at` (enqueued with a delay, or snoozed).
    Scheduled,
    /// Held by a worker, whose lease keeps it.
    Running,
    /// Failed, waiting for its backoff before another attempt.
    Retryable,
    /// Finished well.
    Completed,
    /// Cancelled by a user or by its worker; never run again unless retried by hand.
    Cancelled,
    /// Out of attempts, or refused by its worker: the dead-letter state. Its errors
    /// are kept; `retry` sends it round again.
    Discarded,
}

impl JobState {
    /// Every state, in code order.
    pub const ALL: [JobState; 7] = [
        JobState::Available,
        JobState::Scheduled,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Cancelled,
        JobState::Discarded,
    ];

    /// Its stored code (0 to 6).
    pub const fn code(self) -> i16 {
        self as i16
    }

    /// The state of a stored code.
    pub fn from_code(code: i16) -> Option<JobState> {
        usize::try_from(code).ok().and_then(|i| Self::ALL.get(i).copied())
    }

    /// Its name (`available`, `scheduled`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Discarded => "discarded",
        }
    }

    /// The state called `name`.
    pub fn parse(name: &str) -> Option<JobState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the job is done with (completed, cancelled or discarded).
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Discarded
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed attempt, kept in the job's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt that failed (1 for the first).
    pub attempt: i32,
    /// When, in milliseconds since the Unix epoch.
    pub at: i64,
    /// What its worker (or the queue: a timeout, a panic, a lost worker) said.
    pub error: String,
}

/// A stored job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Job {
    /// Its id, in enqueue order.
    pub id: i64,
    /// The queue it runs on.
    pub queue: String,
    /// Its kind: which worker runs it.
    pub kind: String,
    /// Its arguments, as the worker's argument type serialised them.
    pub args: Value,
    /// Lower runs first (0 is the most urgent).
    pub priority: i16,
    /// Where it stands.
    pub state: JobState,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed before it is discarded.
    pub max_attempts: i32,
    /// How long one attempt may run (the runner's default when `None`).
    pub timeout: Option<Duration>,
    /// Free-form labels.
    pub tags: Vec<String>,
    /// Its failed attempts, oldest first.
    pub errors: Vec<AttemptError>,
    /// Its uniqueness key, when enqueued unique.
    pub unique_key: Option<String>,
    /// When it was enqueued (ms since the epoch).
    pub inserted_at: i64,
    /// When it may run (ms since the epoch).
    pub scheduled_at: i64,
    /// When its last attempt started.
    pub attempted_at: Option<i64>,
    /// When it reached a final state.
    pub finished_at: Option<i64>,
    /// What its worker gave as its result ([`crate::JobContext::set_output`]), once
    /// completed.
    pub output: Option<Value>,
}

/// A job to enqueue. Built with [`NewJob::new`] (or a worker's typed
/// [`NewJob::of`]) and the builder methods.
///
/// ```
/// use palisade_queue::{JobState, NewJob, Unique};
/// use std::time::Duration;
///
/// let job = NewJob::new("send_email", &serde_json::json!({"to": "a@example.com"}))
///     .unwrap()
///     .queue("mail")
///     .priority(1)
///     .delay(Duration::from_secs(30))
///     .max_attempts(5)
///     .unique(Unique::by_args().period(Duration::from_secs(3600)));
/// # drop(job);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub(crate) kind: String,
    pub(crate) args: Value,
    pub(crate) queue: String,
    pub(crate) priority: i16,
    pub(crate) when: When,
    pub(crate) max_attempts: i32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) unique: Option<Unique>,
}

/// When a new job may first run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum When {
    Now,
    After(Duration),
    At(SystemTime),
}

/// The queue a job goes to unless told otherwise.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a job gets unless told otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;

impl NewJob {
    /// A job of `kind` with `args`, on the default queue, priority 1, to run now,
    /// with 20 attempts.
    pub fn new(kind: impl Into<String>, args: &impl Serialize) -> Result<NewJob, serde_json::Error> {
        Ok(NewJob {
            kind: kind.into(),
            args: serde_json::to_value(args)?,
            queue: DEFAULT_QUEUE.to_string(),
            priority: 1,
            when: When::Now,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: None,
            tags: Vec::new(),
            unique: None,
        })
    }

    /// A job for worker `W`, whose kind it takes.
    pub fn of<W: crate::Worker>(args: &W::Args) -> Result<NewJob, serde_json::Error>
    where
        W::Args: Serialize,
    {
        NewJob::new(W::KIND, args)
    }

    /// Runs on `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Its priority: lower runs first, 0 is the most urgent.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Runs no sooner than `delay` from now (by the database's clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.when = When::After(delay);
        self
    }

    /// Runs no sooner than `at`.
    pub fn at(mut self, at: SystemTime) -> Self {
        self.when = When::At(at);
        self
    }

    /// Attempts allowed before it is discarded (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    /// How long one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds a label.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Enqueued only if no job with the same uniqueness key is in one of the
    /// rule's states (enforced by a unique index: two processes racing to enqueue
    /// it leave one row).
    pub fn unique(mut self, unique: Unique) -> Self {
        self.unique = Some(unique);
        self
    }

    /// Its kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// What makes it refusable before it reaches the database.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.kind.is_empty() {
            return Err("a job needs a kind".into());
        }
        if self.queue.is_empty() {
            return Err("a job needs a queue name".into());
        }
        if self.max_attempts < 1 {
            return Err(format!(
                "max_attempts must be at least 1, not {}",
                self.max_attempts
            ));
        }
        if self.unique.as_ref().is_some_and(|u| u.states.is_empty()) {
            return Err("a unique rule needs at least one state".into());
        }
        Ok(())
    }

    /// The row the stores insert, as JSON (`delay_ms` from the database's now, or
    /// `at_ms`).
    pub(crate) fn row(&self, ord: usize, now_ms: i64) -> Value {
        let (delay_ms, at_ms) = match self.when {
            When::Now => (0, None),
            When::After(d) => (millis(d), None),
            When::At(t) => (0, Some(epoch_ms(t))),
        };
        let (unique_key, unique_states) = match &self.unique {
            Some(u) => (Some(u.key_for(self, now_ms)), u.state_mask()),
            None => (None, 0),
        };
        serde_json::json!({
            "ord": ord,
            "queue": self.queue,
            "kind": self.kind,
            "args": self.args,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "timeout_ms": self.timeout.map(millis),
            "tags": self.tags,
            "unique_key": unique_key,
            "unique_states": unique_states,
            "delay_ms": delay_ms,
            "at_ms": at_ms,
        })
    }
}

/// Which jobs count as the same for [`NewJob::unique`]: the same kind and
/// arguments (or the same explicit key), within the same period if one is set,
/// while the existing job is in one of `states`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unique {
    key: Option<String>,
    period: Option<Duration>,
    states: Vec<JobState>,
}

impl Unique {
    /// The same kind and arguments, in any state but cancelled and discarded, for
    /// ever.
    pub fn by_args() -> Self {
        Unique {
            key: None,
            period: None,
            states: vec![
                JobState::Available,
                JobState::Scheduled,
                JobState::Running,
                JobState::Retryable,
                JobState::Completed,
            ],
        }
    }

    /// The same kind and `key` (an idempotency key, an order id), whatever the
    /// arguments.
    pub fn by_key(key: impl Into<String>) -> Self {
        Unique {
            key: Some(key.into()),
            ..Self::by_args()
        }
    }

    /// Only within the same period of this length (counted from the Unix epoch):
    /// `Duration::from_secs(3600)` allows one such job per clock hour.
    pub fn period(mut self, period: Duration) -> Self {
        self.period = Some(period);
        self
    }

    /// Only while the existing job is in one of `states` (e.g. not yet running:
    /// `[Available, Scheduled, Retryable]`).
    pub fn states(mut self, states: impl IntoIterator<Item = JobState>) -> Self {
        self.states = states.into_iter().collect();
        self
    }

    fn state_mask(&self) -> i16 {
        self.states.iter().fold(0, |m, s| m | (1 << s.code()))
    }

    /// A digest of what identifies the job (arguments are JSON with sorted keys, so
    /// equal arguments give equal keys).
    fn key_for(&self, job: &NewJob, now_ms: i64) -> String {
        let mut h = Sha256::new();
        h.update(job.kind.as_bytes());
        h.update([0x1f]);
        match &self.key {
            Some(k) => h.update(k.as_bytes()),
            None => h.update(job.args.to_string().as_bytes()),
        }
        if let Some(p) = self.period {
            let p = millis(p).max(1);
            h.update([0x1f]);
            h.update(now_ms.div_euclid(p).to_le_bytes());
        }
        h.update([0x1f]);
        h.update(job.queue.as_bytes());
        let digest = h.finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `d` in whole milliseconds (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `t` in milliseconds since the Unix epoch.
pub(crate) fn epoch_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => millis(d),
        Err(e) => -millis(e.duration()),
    }
}

/// Now, in milliseconds since the Unix epoch, by this process's clock.
pub(crate) fn now_ms() -> i64 {
    epoch_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_codes_and_names() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_code(s.code()), Some(s));
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::from_code(7), None);
        assert_eq!(JobState::from_code(-1), None);
    }

    #[test]
    fn equal_arguments_give_equal_keys_whatever_their_field_order() {
        let a = NewJob::new("k", &serde_json::json!({"a": 1, "b": [1, 2]})).unwrap();
        let b: Value = serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).unwrap();
        let b = NewJob::new("k", &b).unwrap();
        let u = Unique::by_args();
        assert_eq!(u.key_for(&a, 0), u.key_for(&b, 0));
        let other = NewJob::new("k", &serde_json::json!({"a": 2})).unwrap();
        assert_ne!(u.key_for(&a, 0), u.key_for(&other, 0));
        let kind = NewJob::new("other", &serde_json::json!({"a": 1, "b": [1, 2]})).unwrap();
        assert_ne!(u.key_for(&a, 0), u.key_for(&kind, 0));
    }

    #[test]
    fn a_period_separates_keys_by_its_buckets() {
        let job = NewJob::new("k", &1).unwrap();
        let u = Unique::by_args().period(Duration::from_secs(60));
        assert_eq!(u.key_for(&job, 0), u.key_for(&job, 59_999));
        assert_ne!(u.key_for(&job, 59_999), u.key_for(&job, 60_000));
    }

    #[test]
    fn bad_jobs_are_refused_before_the_database() {
        let job = NewJob::new("k", &1).unwrap();
        assert!(job.clone().max_attempts(0).check().is_err());
        assert!(job.clone().queue("").check().is_err());
        assert!(job.clone().unique(Unique::by_args().states([])).check().is_err());
        assert!(job.check().is_ok());
    }
}
