use std::sync::Arc;

use tower_layer::Layer;

use super::{Retry, RetryErrors};
use crate::clock::TokioClock;
use crate::retry::RetryPolicy;

/// Retries failed calls by a [`RetryPolicy`]: the predicate says which results are
/// worth a retry (and may set the next delay, as `Retry-After` does), the policy says
/// whether attempts, elapsed time, the deadline in force and the budget allow it.
///
/// Requests must be `Clone` (each attempt sends a copy); the service must be `Clone`
/// (each attempt waits for readiness again). When retrying stops, the last result is
/// returned unchanged.
///
/// ```
/// use palisade_resilience::layer::retry::RetryLayer;
/// use palisade_resilience::retry::{Backoff, RetryAction, RetryPolicy};
/// use std::time::Duration;
///
/// let policy = RetryPolicy::new(3).backoff(Backoff::Fixed(Duration::from_millis(50)));
/// // Retry 503s, honouring the server's hint; return everything else.
/// let layer = RetryLayer::new(policy).predicate(|r: Result<&(u16, Option<Duration>), &std::io::Error>| match r {
///     Ok((503, hint)) => RetryAction::Retry { after: *hint },
///     Ok(_) => RetryAction::Return,
///     Err(_) => RetryAction::RETRY,
/// });
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct RetryLayer<P = RetryErrors> {
    policy: Arc<RetryPolicy>,
    predicate: P,
    clock: TokioClock,
}

impl RetryLayer {
    /// Retries every `Err` and returns every `Ok`.
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            predicate: RetryErrors,
            clock: TokioClock::new(),
        }
    }
}

impl<P> RetryLayer<P> {
    /// Replaces the predicate.
    pub fn predicate<P2>(self, predicate: P2) -> RetryLayer<P2> {
        RetryLayer {
            policy: self.policy,
            predicate,
            clock: self.clock,
        }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.policy.clone(), self.predicate.clone(), self.clock)
    }
}
