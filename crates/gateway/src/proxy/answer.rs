//! The answer phase: the endpoint's answer passed on with its body judged at its
//! end (the attempt's verdict to the breaker and outlier detection), or the
//! failure the attempt came to.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use palisade_balance::endpoint::OwnedInFlight;
use palisade_balance::outlier::CallResult;
use palisade_resilience::breaker::{CircuitBreaker, Outcome, Permit};
use palisade_resilience::bulkhead::BulkheadPermit;

use super::idle::IdleTimer;
use crate::conn::ActiveGuard;
use crate::pool::Lease;
use crate::upstream::Upstream;
use crate::{Body, BoxError};

use super::classify::{AttemptResult, Classified, error_chain, grpc_status_as_http, judge_status};
use super::headers::strip_hop_by_hop;
use super::upgrade::{Upgrade, tunnel};
use super::{Attempted, Cause, Exchange, Failure, REQUEST_ID};

impl Exchange<'_> {
    /// The answer phase: the endpoint's answer passed on (taking the cluster's
    /// bulkhead slot and the connection's request guard to its body's end), its
    /// tunnel opened, or the failure the attempt came to.
    pub(super) fn answer(
        &self,
        attempted: Attempted,
        upgrade: &mut Option<(Upgrade, hyper::upgrade::OnUpgrade)>,
        mut slot: Option<BulkheadPermit>,
        active: &mut Option<ActiveGuard>,
    ) -> Result<Response<Body>, Failure> {
        let Attempted {
            addr,
            result,
            outcome,
            mut verdict,
            per_try,
            ..
        } = attempted;
        let route = self.route;
        match result {
            Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => match upgrade.take() {
                Some(u) => Ok(tunnel(self.rt, route, addr, resp, u, self.request_id, slot)),
                None => Err(Failure::new(
                    Cause::ProtocolError,
                    "101 answer to a request that asked for no upgrade",
                )
                .at(addr)),
            },
            // Passed on, it would tell the HTTP/2 client its tunnel is open.
            Ok(Ok(resp))
                if resp.status().is_success() && upgrade.as_ref().is_some_and(|(u, _)| u.over_h2) =>
            {
                Err(Failure::new(
                    Cause::ProtocolError,
                    format!(
                        "the endpoint answered {} to a WebSocket upgrade instead of switching protocols",
                        resp.status()
                    ),
                )
                .at(addr))
            }
            Ok(Ok(resp)) => {
                if let Some(v) = &mut verdict {
                    v.slot = slot.take();
                    v.active = active.take();
                }
                let verdict = verdict.map(|v| (v, route.body_idle_timeout));
                Ok(downstream_response(resp, self.request_id, verdict))
            }
            Ok(Err(e)) => {
                Err(Failure::new(outcome.cause.unwrap_or(Cause::ProtocolError), error_chain(&e)).at(addr))
            }
            Err(_) => {
                let what = if per_try < route.per_try_timeout || route.per_try_timeout == route.timeout {
                    "the route's timeout"
                } else {
                    "the per-attempt timeout"
                };
                Err(Failure::new(Cause::Timeout, format!("no answer within {what} ({per_try:?})")).at(addr))
            }
        }
    }
}

/// The endpoint's answer as sent to the client; with a verdict, its body settles
/// the verdict when it ends and is cut off after `idle` without a frame.
pub(super) fn downstream_response(
    resp: Response<Incoming>,
    request_id: &HeaderValue,
    verdict: Option<(Verdict, Duration)>,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(REQUEST_ID, request_id.clone());
    let body = match verdict {
        Some((verdict, idle)) => JudgedBody {
            inner: body,
            verdict: Some(verdict),
            idle: IdleTimer::new(idle),
        }
        .boxed(),
        None => body.map_err(BoxError::from).boxed(),
    };
    Response::from_parts(parts, body)
}

/// What an attempt tells the endpoint's breaker and the cluster's outlier detector,
/// kept until the answer is complete; the endpoint counts the request in flight
/// until then. Dropped unsettled (the client went away), the breaker counts the call
/// as cancelled and the outlier detector hears nothing.
pub(super) struct Verdict {
    pub(super) upstream: Arc<Upstream>,
    /// The cluster's bulkhead slot, on the attempt that answers the client.
    pub(super) slot: Option<BulkheadPermit>,
    pub(super) permit: Option<Permit<CircuitBreaker>>,
    pub(super) breaker: Outcome,
    pub(super) outlier: CallResult,
    pub(super) latency: Duration,
    pub(super) in_flight: OwnedInFlight,
    /// The HTTP/1.1 connection the answer comes on, handed back to its pool with
    /// the verdict: once the body is read.
    pub(super) lease: Option<Lease>,
    /// The client connection's request in progress, until the answer is complete.
    pub(super) active: Option<ActiveGuard>,
}

impl Verdict {
    /// What an attempt's classification tells the endpoint's breaker and outlier
    /// detection, with what it holds until then.
    pub(super) fn new(
        up: &Arc<Upstream>,
        permit: Option<Permit<CircuitBreaker>>,
        outcome: &Classified,
        latency: Duration,
        in_flight: OwnedInFlight,
        lease: Option<Lease>,
    ) -> Self {
        Verdict {
            upstream: up.clone(),
            slot: None,
            permit,
            breaker: outcome.breaker,
            outlier: outcome.outlier,
            latency,
            in_flight,
            lease,
            active: None,
        }
    }

    /// An answer whose body is still to come is judged when it ends (a body cut
    /// mid-stream is the endpoint's failure, not the success its headers promised):
    /// its verdict is kept. Any other result is judged now.
    pub(super) fn judged_now_or_at_body_end(self, result: &AttemptResult) -> Option<Verdict> {
        match result {
            Ok(Ok(resp))
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS && !resp.body().is_end_stream() =>
            {
                Some(self)
            }
            _ => {
                self.settle();
                None
            }
        }
    }

    pub(super) fn settle(self) {
        if let Some(p) = self.permit {
            p.record(self.breaker);
        }
        self.upstream
            .cluster
            .record(self.in_flight.endpoint(), self.outlier, self.latency);
        // Back to the pool (if the verdict came from a read body, the connection is
        // ready for the next request).
        drop(self.lease);
    }

    /// The body broke off: a gateway failure, whatever the status said.
    pub(super) fn body_failed(mut self) {
        self.breaker = Outcome::Failure;
        self.outlier = CallResult::GatewayFailure;
        self.settle();
    }
}

/// An endpoint's response body, passed through; its end settles the attempt's
/// [`Verdict`]. A body through which nothing has come for `idle` is cut off: the
/// client's answer ends with an error and the endpoint is judged to have failed.
pub(super) struct JudgedBody {
    pub(super) inner: Incoming,
    pub(super) verdict: Option<Verdict>,
    pub(super) idle: IdleTimer,
}

/// A response body that stalled longer than the route's `body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no response body data from the endpoint for {0:?} (body_idle_timeout)")]
pub(super) struct BodyIdle(Duration);

impl HttpBody for JudgedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) else {
            ready!(this.idle.poll_paused(cx));
            if let Some(v) = this.verdict.take() {
                v.body_failed();
            }
            metrics::counter!("palisade_body_idle_timeouts_total").increment(1);
            return Poll::Ready(Some(Err(BodyIdle(this.idle.idle()).into())));
        };
        this.idle.moved();
        // gRPC's status arrives in the trailers: an `unavailable` stream is the
        // endpoint's failure although its HTTP status said 200. Trailers can make a
        // verdict worse, never better (the answer's head may have declared a failure).
        if let Some(Ok(f)) = &frame
            && let Some(trailers) = f.trailers_ref()
            && let Some(s) = grpc_status_as_http(trailers)
            && let Some(v) = &mut self.verdict
        {
            let (breaker, outlier) = judge_status(&v.upstream, s, trailers);
            if breaker == Outcome::Failure {
                v.breaker = breaker;
            }
            if outlier != CallResult::Success {
                v.outlier = outlier;
            }
        }
        let failed = matches!(frame, Some(Err(_)));
        if (failed || frame.is_none() || self.inner.is_end_stream())
            && let Some(v) = self.verdict.take()
        {
            if failed { v.body_failed() } else { v.settle() }
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
