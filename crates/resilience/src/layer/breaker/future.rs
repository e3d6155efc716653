use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::Classify;
use crate::breaker::{BreakerError, CircuitBreaker, Permit, Rejected};

pin_project! {
    /// The response future of a [`CircuitBreakerService`](super::CircuitBreakerService).
    /// Dropping it before it finishes records the call as cancelled.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, C> {
        Called {
            #[pin]
            fut: F,
            permit: Option<Permit<CircuitBreaker>>,
            classifier: C,
        },
        Rejected {
            rejected: Option<Rejected>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(super) fn called(fut: F, permit: Permit<CircuitBreaker>, classifier: C) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                permit: Some(permit),
                classifier,
            },
        }
    }

    pub(super) fn rejected(rejected: Rejected) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejected: Some(rejected),
            },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, BreakerError<E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called {
                fut,
                permit,
                classifier,
            } => {
                let result = ready!(fut.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.record(classifier.classify(result.as_ref()));
                }
                Poll::Ready(result.map_err(BreakerError::Inner))
            }
            StateProj::Rejected { rejected } => Poll::Ready(Err(BreakerError::Rejected(
                rejected.take().expect("ResponseFuture polled after completion"),
            ))),
        }
    }
}
