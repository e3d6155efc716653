//! Optimistic locking with retry.
//!
//! Read a row with its version, compute the change, write it only if the version
//! is unchanged (`UPDATE … SET …, version = version + 1 WHERE id = $1 AND version =
//! $2`): no lock is held while computing, and a concurrent writer's change is never
//! overwritten. A write that finds the version moved is a conflict: read again and
//! retry, after a jittered backoff so that the conflicting writers spread out.

use std::future::Future;
use std::time::Duration;

use palisade_resilience::retry::Backoff;

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt<T> {
    /// Written: the value to return.
    Done(T),
    /// The version had moved: nothing was written.
    Conflict,
}

impl<T> Attempt<T> {
    /// `Done(value)` if the versioned update touched a row, `Conflict` if none.
    pub fn from_rows(rows_affected: u64, value: T) -> Self {
        if rows_affected == 0 {
            Attempt::Conflict
        } else {
            Attempt::Done(value)
        }
    }
}

/// Why an optimistic update gave up.
#[derive(Debug, thiserror::Error)]
pub enum OptimisticError<E> {
    /// Every attempt met a conflict.
    #[error("gave up after {attempts} conflicting attempts")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// An attempt failed otherwise.
    #[error(transparent)]
    Failed(E),
}

/// Retries a versioned update on conflict, with backoff and jitter, up to a bound.
#[derive(Clone, Debug)]
pub struct OptimisticRetry {
    attempts: u32,
    backoff: Backoff,
    conflicts: metrics::Counter,
    exhausted: metrics::Counter,
}

impl OptimisticRetry {
    /// Up to 10 attempts, full jitter from 2 ms doubling to 100 ms; conflicts
    /// counted as `palisade_optimistic_conflicts_total{name}`.
    pub fn new(name: &str) -> Self {
        OptimisticRetry {
            attempts: 10,
            backoff: Backoff::ExponentialJitter {
                initial: Duration::from_millis(2),
                multiplier: 2.0,
                max: Duration::from_millis(100),
            },
            conflicts: metrics::counter!("palisade_optimistic_conflicts_total", "name" => name.to_string()),
            exhausted: metrics::counter!("palisade_optimistic_exhausted_total", "name" => name.to_string()),
        }
    }

    /// At most `attempts` attempts (at least one).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The wait between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs `attempt` (given its number, from 1) until it is done, fails, or has
    /// met a conflict `attempts` times.
    pub async fn run<T, E, F, Fut>(&self, mut attempt: F) -> Result<T, OptimisticError<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<Attempt<T>, E>>,
    {
        let mut rng = fastrand::Rng::new();
        let mut previous = Duration::ZERO;
        for n in 1..=self.attempts {
            match attempt(n).await.map_err(OptimisticError::Failed)? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Conflict => self.conflicts.increment(1),
            }
            if n < self.attempts {
                previous = self.backoff.delay(n, previous, &mut rng);
                tokio::time::sleep(previous).await;
            }
        }
        self.exhausted.increment(1);
        Err(OptimisticError::Exhausted {
            attempts: self.attempts,
        })
    }
}
