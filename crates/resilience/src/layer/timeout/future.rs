use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use super::{Elapsed, TimeoutError};
use crate::timeout::AdaptiveTimeout;

pin_project! {
    /// The response future of a [`Timeout`](super::Timeout).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        fut: TaskLocalFuture<Instant, F>,
        #[pin]
        sleep: Sleep,
        start: Instant,
        by_deadline: bool,
        adaptive: Option<Arc<AdaptiveTimeout>>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(
        fut: TaskLocalFuture<Instant, F>,
        start: Instant,
        deadline: Instant,
        by_deadline: bool,
        adaptive: Option<Arc<AdaptiveTimeout>>,
    ) -> Self {
        ResponseFuture {
            fut,
            sleep: tokio::time::sleep_until(deadline),
            start,
            by_deadline,
            adaptive,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, TimeoutError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.fut.poll(cx) {
            if let Some(a) = this.adaptive {
                a.record(this.start.elapsed());
            }
            return Poll::Ready(result.map_err(TimeoutError::Inner));
        }
        let deadline = this.sleep.deadline();
        if this.sleep.poll(cx).is_ready() {
            let after = deadline.saturating_duration_since(*this.start);
            if let Some(a) = this.adaptive {
                // Cut off: it took at least this long.
                a.record(after);
            }
            metrics::counter!("palisade_timeout_elapsed_total").increment(1);
            return Poll::Ready(Err(TimeoutError::Elapsed(Elapsed {
                after,
                by_deadline: *this.by_deadline,
            })));
        }
        Poll::Pending
    }
}
