use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::Timeout;
use crate::timeout::AdaptiveTimeout;

/// Where a timeout's duration comes from.
#[derive(Clone, Debug)]
pub enum TimeoutSource {
    /// Always the same.
    Fixed(Duration),
    /// Follows recent latency; every call's latency is recorded into it.
    Adaptive(Arc<AdaptiveTimeout>),
}

impl TimeoutSource {
    /// The timeout for the next call.
    #[inline]
    pub fn current(&self) -> Duration {
        match self {
            TimeoutSource::Fixed(d) => *d,
            TimeoutSource::Adaptive(a) => a.timeout(),
        }
    }
}

/// Fails a call that takes longer than its timeout or than the deadline in force,
/// whichever comes first, and publishes the resulting deadline to the layers inside.
///
/// ```
/// use palisade_resilience::layer::timeout::TimeoutLayer;
/// use std::time::Duration;
///
/// let total = TimeoutLayer::fixed(Duration::from_secs(2));
/// # drop(total);
/// ```
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    source: TimeoutSource,
}

impl TimeoutLayer {
    /// A fixed timeout.
    pub fn fixed(timeout: Duration) -> Self {
        TimeoutLayer {
            source: TimeoutSource::Fixed(timeout),
        }
    }

    /// An adaptive timeout.
    pub fn adaptive(timeout: Arc<AdaptiveTimeout>) -> Self {
        TimeoutLayer {
            source: TimeoutSource::Adaptive(timeout),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.source.clone())
    }
}
