use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::ResponseFuture;
use crate::clock::{Clock, TokioClock};
use crate::retry::{RetryAction, RetryPolicy};

/// Says what a finished attempt calls for.
///
/// Implemented for closures `Fn(Result<&T, &E>) -> RetryAction`.
pub trait RetryPredicate<T, E> {
    /// Judges one result.
    fn check(&self, result: Result<&T, &E>) -> RetryAction;
}

/// Retries every `Err`, returns every `Ok`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryErrors;

impl<T, E> RetryPredicate<T, E> for RetryErrors {
    #[inline]
    fn check(&self, result: Result<&T, &E>) -> RetryAction {
        if result.is_ok() {
            RetryAction::Return
        } else {
            RetryAction::RETRY
        }
    }
}

impl<T, E, F> RetryPredicate<T, E> for F
where
    F: Fn(Result<&T, &E>) -> RetryAction,
{
    #[inline]
    fn check(&self, result: Result<&T, &E>) -> RetryAction {
        self(result)
    }
}

/// A service whose failed calls are retried. Built by [`RetryLayer`](super::RetryLayer).
#[derive(Clone, Debug)]
pub struct Retry<S, P> {
    inner: S,
    policy: Arc<RetryPolicy>,
    predicate: P,
    clock: TokioClock,
}

impl<S, P> Retry<S, P> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: Arc<RetryPolicy>, predicate: P, clock: TokioClock) -> Self {
        Retry {
            inner,
            policy,
            predicate,
            clock,
        }
    }
}

impl<S, P, Req> Service<Req> for Retry<S, P>
where
    Req: Clone,
    S: Service<Req> + Clone,
    P: RetryPredicate<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, P, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready service makes this attempt; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let start = self.policy.needs_start_time().then(|| self.clock.now());
        let state = self.policy.begin(start);
        let fut = service.call(req.clone());
        ResponseFuture::new(
            fut,
            service,
            req,
            self.policy.clone(),
            self.predicate.clone(),
            self.clock,
            state,
        )
    }
}
