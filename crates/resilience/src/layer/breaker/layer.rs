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
/// A breaker that lives as long as the program (a `static`, or one leaked at
/// start-up) can be passed as `&'static CircuitBreaker` with
/// [`CircuitBreakerLayer::with_handle`]: response futures then reach it through a
/// plain reference, with no reference count to touch per call.
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
pub struct CircuitBreakerLayer<C = DefaultClassifier, B = CircuitBreaker> {
    breaker: B,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer around `breaker` that counts `Err` as failure and `Ok` as success.
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self::with_handle(breaker)
    }
}

impl<B: AsRef<CircuitBreaker> + Clone> CircuitBreakerLayer<DefaultClassifier, B> {
    /// A layer around whatever reaches the breaker: an owned [`CircuitBreaker`] (as
    /// [`new`](CircuitBreakerLayer::new)) or a `&'static CircuitBreaker`.
    ///
    /// ```
    /// use std::sync::LazyLock;
    /// use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker};
    /// use palisade_resilience::layer::breaker::CircuitBreakerLayer;
    /// use tower::{ServiceBuilder, service_fn};
    ///
    /// static USERS: LazyLock<CircuitBreaker> =
    ///     LazyLock::new(|| CircuitBreaker::new("users", BreakerConfig::default()));
    ///
    /// let svc = ServiceBuilder::new()
    ///     .layer(CircuitBreakerLayer::with_handle(&*USERS))
    ///     .service(service_fn(|_req: ()| async { Ok::<u16, std::io::Error>(200) }));
    /// # drop(svc);
    /// ```
    pub fn with_handle(breaker: B) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: DefaultClassifier,
        }
    }
}

impl<C, B: AsRef<CircuitBreaker>> CircuitBreakerLayer<C, B> {
    /// Replaces the classifier: how a response or error counts.
    pub fn classify<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, B> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        self.breaker.as_ref()
    }
}

impl<S, C: Clone, B: AsRef<CircuitBreaker> + Clone> Layer<S> for CircuitBreakerLayer<C, B> {
    type Service = CircuitBreakerService<S, C, B>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
