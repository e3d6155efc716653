use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::Classify;
use crate::breaker::{BreakerError, CircuitBreaker, Permit, Rejected};

pin_project! {
    /// The response future of a [`CircuitBreakerService`](super::CircuitBreakerService).
    /// Dropping it before it finishes records the call as cancelled.
    //
    // A struct of options rather than an enum of `Called` / `Rejected`: with the two
    // variants sharing bytes, the compiler built the permit's breaker pointer from
    // narrow stores and read it back whole, a store-forwarding stall that cost more
    // than the rest of the closed path together.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C, B = CircuitBreaker>
    where
        B: AsRef<CircuitBreaker>,
    {
        #[pin]
        fut: Option<F>,
        permit: Option<Permit<B>>,
        rejected: Option<Rejected>,
        classifier: C,
    }
}

impl<F, C, B: AsRef<CircuitBreaker>> ResponseFuture<F, C, B> {
    pub(super) fn called(fut: F, permit: Permit<B>, classifier: C) -> Self {
        ResponseFuture {
            fut: Some(fut),
            permit: Some(permit),
            rejected: None,
            classifier,
        }
    }

    pub(super) fn rejected(rejected: Rejected, classifier: C) -> Self {
        ResponseFuture {
            fut: None,
            permit: None,
            rejected: Some(rejected),
            classifier,
        }
    }
}

impl<F, C, B, T, E> Future for ResponseFuture<F, C, B>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
    B: AsRef<CircuitBreaker>,
{
    type Output = Result<T, BreakerError<E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(fut) = this.fut.as_pin_mut() else {
            let rejected = this
                .rejected
                .take()
                .expect("ResponseFuture polled after completion");
            return Poll::Ready(Err(BreakerError::Rejected(rejected)));
        };
        let result = ready!(fut.poll(cx));
        if let Some(permit) = this.permit {
            permit.record_in_place(this.classifier.classify(result.as_ref()));
        }
        Poll::Ready(result.map_err(BreakerError::Inner))
    }
}
