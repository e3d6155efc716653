use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::{ResponseFuture, TimeoutSource};
use crate::timeout::Deadline;

/// The call took too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request timed out after {after:?}{}", if *.by_deadline { " (the caller's deadline)" } else { "" })]
pub struct Elapsed {
    /// How long the call was given.
    pub after: Duration,
    /// True if an outer deadline, not this layer's own timeout, cut the call off.
    pub by_deadline: bool,
}

/// The error of a call through a [`Timeout`].
#[derive(Debug, thiserror::Error)]
pub enum TimeoutError<E> {
    /// The call was cut off.
    #[error(transparent)]
    Elapsed(#[from] Elapsed),
    /// The call failed by itself.
    #[error("{0}")]
    Inner(E),
}

impl<E> TimeoutError<E> {
    /// True if the call was cut off.
    pub fn is_elapsed(&self) -> bool {
        matches!(self, TimeoutError::Elapsed(_))
    }
}

/// A service with a timeout. Built by [`TimeoutLayer`](super::TimeoutLayer).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    source: TimeoutSource,
}

impl<S> Timeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, source: TimeoutSource) -> Self {
        Timeout { inner, source }
    }
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = TimeoutError<S::Error>;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(TimeoutError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let start = tokio::time::Instant::now();
        let own = self.source.current();
        let mut deadline = start + own;
        let mut by_deadline = false;
        if let Some(outer) = Deadline::current()
            && outer < deadline
        {
            deadline = outer;
            by_deadline = true;
        }
        let adaptive = match &self.source {
            TimeoutSource::Adaptive(a) => Some(a.clone()),
            TimeoutSource::Fixed(_) => None,
        };
        let inner = &mut self.inner;
        let fut = Deadline::sync_scope(deadline, || inner.call(req));
        let fut = Deadline::scope(deadline, fut);
        ResponseFuture::new(fut, start, deadline, by_deadline, adaptive)
    }
}
