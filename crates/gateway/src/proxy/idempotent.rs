//! A request on a route with idempotency keys (`crate::idempotent`), of one of
//! the methods they apply to. Without a key it goes on as any request (or is a
//! `400` when the route requires one). With one, its body is read whole (up to the
//! route's bound), fingerprinted with its method and target, and run at most once
//! per key: a repeat gets the kept answer (`idempotent-replayed: true`), a repeat
//! while the first runs a `409 idempotency_conflict`, the key with another request
//! a `422 idempotency_mismatch`.
//!
//! What is kept: upstream's answer, read whole. Not kept (the key released, a
//! retry runs again): an answer the gateway made itself (a failure, a fallback:
//! the request may never have reached upstream) and, unless the route says
//! otherwise, a `5xx`. An answer larger than the bound is passed on whole and kept
//! without its body (`idempotent-body-omitted: true`), so a repeat still does not
//! run it twice.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use palisade_flow::idempotency::{Outcome, RunError, Stored, fingerprint, valid_key};

use super::admit::{Inbound, read_whole};
use super::cached::Asker;
use super::{CAUSE_HEADER, Failure, REQUEST_ID, failure_response, respond};
use crate::cause::Cause;
use crate::config::StoreDown;
use crate::conn::ActiveGuard;
use crate::idempotent::RouteIdempotency;
use crate::route::Route;
use crate::runtime::Runtime;
use crate::{Body, BoxError};

const BODY_OMITTED: HeaderName = HeaderName::from_static("idempotent-body-omitted");
const FALLBACK: HeaderName = HeaderName::from_static("x-palisade-fallback");

/// An answer passed on but not kept (the key is released).
struct NotKept(Response<Body>);

/// Answers a request of a method `keys` apply to.
pub(super) async fn serve(
    runtime: &Arc<Runtime>,
    route: &Route,
    keys: &RouteIdempotency,
    req: Request<Incoming>,
    asker: Asker<'_>,
    active: &mut Option<ActiveGuard>,
) -> Response<Body> {
    let request_id = asker.request_id;
    let key = match req.headers().get(&keys.header) {
        Some(v) => match valid_key(v) {
            Some(key) => key,
            None => {
                let detail = format!("{} must be 1 to 255 visible ASCII characters", keys.header);
                return failure_response(&Failure::new(Cause::BadRequest, detail), request_id);
            }
        },
        None if keys.required => {
            let detail = format!("this route needs an {} header on a {}", keys.header, req.method());
            return failure_response(&Failure::new(Cause::BadRequest, detail), request_id);
        }
        None => return respond(runtime, route, req.map(Inbound::Streaming), asker, active).await,
    };
    let g = &runtime.config.gateway;
    let max = keys
        .max_body
        .min(usize::try_from(g.max_body_bytes).unwrap_or(usize::MAX));
    let (parts, body) = req.into_parts();
    let bytes = match read_whole(body, max as u64, g.request_body_idle_timeout.get()).await {
        Ok(bytes) => bytes,
        Err(f) => return failure_response(&f, request_id),
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fp = fingerprint([parts.method.as_str().as_bytes(), target.as_bytes(), &bytes[..]]);
    let mut request = Some(Request::from_parts(parts, Inbound::Read(bytes)));
    let Some(idem) = keys.keys(&runtime.idempotency) else {
        return store_down(runtime, route, keys, request, asker, active, "not connected").await;
    };
    // The answer passed on when it is not the kept one (its body omitted there).
    let mut passed = None;
    let (pending, passing, again, act) = (&mut request, &mut passed, asker.clone(), &mut *active);
    let handler = move || async move {
        let Some(req) = pending.take() else {
            return Err(NotKept(failure_response(
                &Failure::new(Cause::BadRequest, "the request was taken"),
                again.request_id,
            )));
        };
        keep(respond(runtime, route, req, again, act).await, max, passing).await
    };
    let outcome = idem.run(&key, &fp, handler).await;
    let answer = match outcome {
        Ok(Outcome::Fresh(kept)) => passed.unwrap_or_else(|| replay(kept, false)),
        Ok(Outcome::Replayed(kept)) => replay(kept, true),
        Ok(Outcome::Running) => failure_response(
            &Failure::new(
                Cause::IdempotencyConflict,
                "a request with this idempotency key is still running",
            ),
            request_id,
        ),
        Ok(Outcome::Mismatch) => failure_response(
            &Failure::new(
                Cause::IdempotencyMismatch,
                "this idempotency key was used with a different request",
            ),
            request_id,
        ),
        Err(RunError::Handler(NotKept(resp))) => resp,
        Err(RunError::Store(e)) => {
            return store_down(runtime, route, keys, request, asker, active, &e.to_string()).await;
        }
    };
    with_request_id(answer, request_id)
}

/// The store could not be asked: the request is refused, or (`proceed`) runs
/// without the key's protection.
async fn store_down(
    runtime: &Arc<Runtime>,
    route: &Route,
    keys: &RouteIdempotency,
    request: Option<Request<Inbound>>,
    asker: Asker<'_>,
    active: &mut Option<ActiveGuard>,
    why: &str,
) -> Response<Body> {
    let outcome = match (keys.when_store_down, request) {
        (StoreDown::Proceed, Some(req)) => {
            count(route, "unprotected");
            tracing::warn!(route = %route.name, why, "idempotency store unavailable; the request runs without its key's protection");
            return respond(runtime, route, req, asker, active).await;
        }
        _ => "store_down",
    };
    count(route, outcome);
    let f = Failure::new(
        Cause::IdempotencyUnavailable,
        format!("the idempotency store is unavailable ({why}); the request was not run"),
    );
    failure_response(&f, asker.request_id)
}

fn count(route: &Route, outcome: &'static str) {
    metrics::counter!("palisade_idempotency_total", "scope" => route.name.clone(), "outcome" => outcome)
        .increment(1);
}

/// Upstream's answer as it is kept: read whole up to `max` bytes; a larger one is
/// put in `passing` whole and kept without its body. An answer the gateway made
/// itself is not kept.
async fn keep(
    resp: Response<Body>,
    max: usize,
    passing: &mut Option<Response<Body>>,
) -> Result<Stored, NotKept> {
    let h = resp.headers();
    if h.contains_key(CAUSE_HEADER) || h.contains_key(FALLBACK) {
        return Err(NotKept(resp));
    }
    let (mut head, mut body) = resp.into_parts();
    // Each request's own.
    head.headers.remove(REQUEST_ID);
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map(Frame::into_data) else {
            let f = Failure::new(Cause::Upstream, "the answer's body failed before its end");
            return Err(NotKept(failure_response(&f, &HeaderValue::from_static(""))));
        };
        // Trailers are not kept.
        let Ok(data) = data else { continue };
        read.extend_from_slice(&data);
        if read.len() > max {
            let mut kept = Stored::of(&head, Bytes::new());
            kept.headers.push((BODY_OMITTED.to_string(), b"true".to_vec()));
            let whole = Prefixed {
                prefix: Some(read.freeze()),
                rest: body,
            };
            *passing = Some(Response::from_parts(head, whole.boxed()));
            return Ok(kept);
        }
    }
    Ok(Stored::of(&head, read.freeze()))
}

fn replay(kept: Stored, replayed: bool) -> Response<Body> {
    kept.into_response(replayed)
        .map(|b| b.map_err(|never| match never {}).boxed())
}

fn with_request_id(mut resp: Response<Body>, request_id: &HeaderValue) -> Response<Body> {
    resp.headers_mut().insert(REQUEST_ID, request_id.clone());
    resp
}

/// A body whose first bytes were read already.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}
