use std::task::{Context, Poll};

use tower_service::Service;

use super::ResponseFuture;
use crate::breaker::{BreakerError, CircuitBreaker, Outcome};

/// How a response or error counts for the breaker.
///
/// Implemented for closures `Fn(Result<&T, &E>) -> Outcome`.
pub trait Classify<T, E> {
    /// Classifies one result.
    fn classify(&self, result: Result<&T, &E>) -> Outcome;
}

/// `Err` is a failure, `Ok` a success.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl<T, E> Classify<T, E> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}

/// A service behind a circuit breaker. Built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// `B` is how the service and its response futures reach the breaker: an owned
/// [`CircuitBreaker`] (each admitted call clones it: one reference-count increment
/// and decrement) or a `&'static CircuitBreaker` (a plain copy).
#[derive(Clone, Debug)]
pub struct CircuitBreakerService<S, C, B = CircuitBreaker> {
    inner: S,
    breaker: B,
    classifier: C,
}

impl<S, C, B: AsRef<CircuitBreaker>> CircuitBreakerService<S, C, B> {
    /// Wraps `inner`.
    pub fn new(inner: S, breaker: B, classifier: C) -> Self {
        CircuitBreakerService {
            inner,
            breaker,
            classifier,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        self.breaker.as_ref()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, C, B, Req> Service<Req> for CircuitBreakerService<S, C, B>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
    B: AsRef<CircuitBreaker> + Clone,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = ResponseFuture<S::Future, C, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match CircuitBreaker::try_acquire_via(&self.breaker) {
            Ok(permit) => ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone()),
            Err(rejected) => ResponseFuture::rejected(rejected, self.classifier.clone()),
        }
    }
}
