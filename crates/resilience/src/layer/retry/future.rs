use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::RetryPredicate;
use crate::clock::{Clock, TokioClock};
use crate::retry::{Decision, RetryAction, RetryPolicy, RetryState};
use crate::timeout::Deadline;

pin_project! {
    /// The response future of a [`Retry`](super::Retry) service.
    pub struct ResponseFuture<S, P, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        phase: Phase<S::Future>,
        service: S,
        request: Req,
        policy: Arc<RetryPolicy>,
        predicate: P,
        clock: TokioClock,
        state: RetryState,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<F> {
        Calling { #[pin] fut: F },
        Sleeping { #[pin] sleep: Sleep },
        Readying,
    }
}

impl<S: Service<Req>, P, Req> std::fmt::Debug for ResponseFuture<S, P, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, P, Req> ResponseFuture<S, P, Req> {
    pub(super) fn new(
        fut: S::Future,
        service: S,
        request: Req,
        policy: Arc<RetryPolicy>,
        predicate: P,
        clock: TokioClock,
        state: RetryState,
    ) -> Self {
        ResponseFuture {
            phase: Phase::Calling { fut },
            service,
            request,
            policy,
            predicate,
            clock,
            state,
        }
    }
}

impl<S, P, Req> Future for ResponseFuture<S, P, Req>
where
    Req: Clone,
    S: Service<Req>,
    P: RetryPredicate<S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.phase.as_mut().project() {
                PhaseProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    let hint = match this.predicate.check(result.as_ref()) {
                        RetryAction::Return => return Poll::Ready(result),
                        RetryAction::Retry { after } => after,
                    };
                    let now = this.clock.now();
                    match this.policy.decide(this.state, now, hint, Deadline::remaining()) {
                        Decision::Stop(reason) => {
                            metrics::counter!("palisade_retry_stopped_total", "reason" => reason.as_str())
                                .increment(1);
                            return Poll::Ready(result);
                        }
                        Decision::Retry(delay) => {
                            metrics::counter!("palisade_retry_retries_total").increment(1);
                            this.phase.set(Phase::Sleeping {
                                sleep: tokio::time::sleep(delay),
                            });
                        }
                    }
                }
                PhaseProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.phase.set(Phase::Readying);
                }
                PhaseProj::Readying => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let fut = this.service.call(this.request.clone());
                    this.phase.set(Phase::Calling { fut });
                }
            }
        }
    }
}
