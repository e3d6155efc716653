use tower_layer::Layer;

use super::{CircuitBreakerService, DefaultClassifier};
use crate::breaker::CircuitBreaker;

/// Wraps a service in a [`CircuitBreaker`]: calls are rejected with
/// [`BreakerError::Rejected`](crate::breaker::BreakerError::Rejected) while it is
/// open, and every response is classified and recorded.
///
/// Every service the layer builds shares the one breaker; for one breaker per
/// endpoint, layer each endpoint with a breaker from a
/// [`BreakerRegistry`](crate::breaker::BreakerRegistry).
///
/// ```
/// use palisade_resilience::breaker::{CircuitBreaker, BreakerConfig, Outcome};
/// use palisade_resilience::layer::breaker::CircuitBreakerLayer;
/// use tower::{ServiceBuilder, service_fn};
///
/// let breaker = CircuitBreaker::new("users", BreakerConfig::default());
/// let svc = ServiceBuilder::new()
///     // 5xx and errors fail; anything else succeeds
///     .layer(CircuitBreakerLayer::new(breaker).classify(|r: Result<&u16, &std::io::Error>| match r {
///         Ok(status) if *status >= 500 => Outcome::Failure,
///         Ok(_) => Outcome::Success,
///         Err(_) => Outcome::Failure,
///     }))
///     .service(service_fn(|_req: ()| async { Ok::<u16, std::io::Error>(200) }));
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    breaker: CircuitBreaker,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer around `breaker` that counts `Err` as failure and `Ok` as success.
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Replaces the classifier: how a response or error counts.
    pub fn classify<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
