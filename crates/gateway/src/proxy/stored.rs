//! The request path of `mode = "async"` routes: the request stored in the
//! gateway's queue and answered `202 Accepted`; the status URL's answers; and the
//! delivery of a stored request to its route's cluster (run by the queue).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use palisade_balance::PickError;
use palisade_core::{Clock, SystemClock};
use palisade_queue::{NewJob, Queue, QueueError, Unique};

use super::answer::Verdict;
use super::classify::{classify, error_chain};
use super::headers::strip_hop_by_hop;
use super::{Cause, Downstream, Failure, REQUEST_ID, take_lease, upstream_uri};
use crate::conn::ActiveGuard;
use crate::jobs::{HTTP_DELIVERY, HTTP_QUEUE, StoredAnswer, StoredBody, StoredRequest, token};
use crate::route::Route;
use crate::runtime::Runtime;
use crate::upstream::Upstream;
use crate::{Body, full};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The request path of a gateway with a queue: a status URL is answered, an async
/// route's request stored; anything else goes on to the proxy path ([`super::handle`],
/// which admits it again: normalising a normalised path changes nothing).
pub(super) async fn handle(
    rt: Arc<Runtime>,
    mut req: Request<Incoming>,
    client: Downstream,
    active: ActiveGuard,
) -> Result<Response<Body>, Infallible> {
    let r = &*rt;
    let started = SystemClock.now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .cloned()
        .unwrap_or_else(super::new_request_id);
    let host = match super::admit::admit(&mut req, r.config.gateway.escaped_slashes) {
        Ok(host) => host,
        Err(_) => return super::handle(rt, req, client, active).await,
    };
    if let Some(answer) = status(r, req.method(), req.uri().path()).await {
        let resp = answer.unwrap_or_else(|f| super::failure_response(&f, &request_id));
        let line = super::Record::of(r, &mut req, client.addr.ip());
        return Ok(super::finish(r, None, line, started, resp));
    }
    let Some(route) = r.routes.iter().find(|x| super::matches(x, &req)) else {
        return super::handle(rt, req, client, active).await;
    };
    if route.mode != crate::config::RouteMode::Async {
        return super::handle(rt, req, client, active).await;
    }
    let line = super::Record::of(r, &mut req, client.addr.ip());
    if let Some(guard) = &route.guard
        && let Err(f) = Box::pin(super::guard::check(guard, &mut req, client.addr.ip())).await
    {
        return Ok(super::finish(
            r,
            Some(route),
            line,
            started,
            super::failure_response(&f, &request_id),
        ));
    }
    let resp = match store(r, route, req, (client, host), &request_id).await {
        Ok(resp) => resp,
        Err(f) => super::fallback_or_failure(route, &f, &request_id, true),
    };
    drop(active);
    Ok(super::finish(r, Some(route), line, started, resp))
}

/// The queue, when it is connected.
fn queue(rt: &Runtime) -> Result<std::sync::Arc<Queue>, Failure> {
    rt.queue
        .get()
        .ok_or_else(|| Failure::new(Cause::QueueUnavailable, "the gateway's queue is not connected"))
}

fn unavailable(e: &QueueError) -> Failure {
    Failure::new(Cause::QueueUnavailable, format!("the gateway's queue: {e}"))
}

/// Stores the request of an async route (its route's gates and admission applied,
/// its body read whole up to `max_body_bytes`) and answers `202 Accepted` with
/// its status URL. A client's `Idempotency-Key` stores it once per route: a repeat
/// gets the first one's status URL.
pub(super) async fn store(
    rt: &Runtime,
    route: &Route,
    req: Request<Incoming>,
    (from, host): (Downstream, Option<HeaderValue>),
    request_id: &HeaderValue,
) -> Result<Response<Body>, Failure> {
    if super::upgrade_protocol(&req).is_some() {
        return Err(Failure::new(
            Cause::BadRequest,
            "an async route stores requests; upgrades and WebSockets are not stored",
        ));
    }
    let key = req
        .headers()
        .get(&IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    super::admit::global_limit(route, &req, from.addr).await?;
    let req = req.map(super::admit::Inbound::Streaming);
    let up = (route.upstream.as_ref())
        .ok_or_else(|| Failure::new(Cause::NoHealthyEndpoint, "the route has no cluster"))?;
    let (prepared, pending) = super::admit::prepare(rt, route, (up, false), req, from, host, request_id)?;
    let parts = prepared.into_head();
    let body = pending.map(super::admit::PendingBody::into_incoming);
    let max = rt.config.gateway.max_body_bytes;
    let bytes = match body {
        Some(body) => Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    Failure::new(Cause::BodyTooLarge, format!("body over the limit of {max} bytes"))
                } else {
                    Failure::new(
                        Cause::BadRequest,
                        format!("the request body could not be read: {e}"),
                    )
                }
            })?
            .to_bytes(),
        None => Bytes::new(),
    };
    let stored = StoredRequest {
        route: route.name.clone(),
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        headers: text_headers(&parts.headers),
        body: StoredBody::new(&bytes),
        token: token(),
    };
    let q = queue(rt)?;
    let section = rt.config.gateway.queue.as_ref();
    let mut job = NewJob::new(HTTP_DELIVERY, &stored)
        .map_err(|e| Failure::new(Cause::BadRequest, e.to_string()))?
        .queue(HTTP_QUEUE)
        .max_attempts(section.map_or(10, |s| s.max_attempts))
        .tag(route.name.clone());
    if let Some(k) = &key {
        job = job.unique(Unique::by_key(format!("{}\u{1f}{k}", route.name)));
    }
    let enqueued = q.enqueue(job).await.map_err(|e| unavailable(&e))?;
    let token = if enqueued.duplicate {
        let existing = q.job(enqueued.id).await.map_err(|e| unavailable(&e))?;
        existing
            .and_then(|j| j.args["token"].as_str().map(str::to_string))
            .ok_or_else(|| Failure::new(Cause::QueueUnavailable, "the stored request vanished"))?
    } else {
        stored.token
    };
    metrics::counter!("palisade_route_stored_total", "route" => route.name.clone(), "duplicate" => if enqueued.duplicate { "true" } else { "false" })
        .increment(1);
    let status_path = section.map_or("/jobs", |s| s.status_path.as_str());
    let location = format!("{status_path}/{}.{token}", enqueued.id);
    Ok(accepted(enqueued.id, &location, enqueued.duplicate, request_id))
}

/// `202 Accepted`, with the stored request's status URL.
fn accepted(id: i64, location: &str, duplicate: bool, request_id: &HeaderValue) -> Response<Body> {
    let body = serde_json::json!({
        "id": id,
        "status": location,
        "duplicate": duplicate,
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::ACCEPTED;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(REQUEST_ID, request_id.clone());
    resp
}

/// `GET <status_path>/<id>.<token>`: the stored request's state, its errors, and
/// once delivered the upstream's answer. `None` when `path` is not a status URL.
pub(super) async fn status(
    rt: &Runtime,
    method: &Method,
    path: &str,
) -> Option<Result<Response<Body>, Failure>> {
    let section = rt.config.gateway.queue.as_ref()?;
    let rest = path
        .strip_prefix(section.status_path.as_str())?
        .strip_prefix('/')?;
    Some(status_of(rt, method, rest).await)
}

async fn status_of(rt: &Runtime, method: &Method, rest: &str) -> Result<Response<Body>, Failure> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Failure::new(Cause::BadRequest, "a status URL answers GET only"));
    }
    let not_found = || Failure::new(Cause::NoRoute, "no such stored request");
    let (id, token) = rest.split_once('.').ok_or_else(not_found)?;
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let job = queue(rt)?
        .job(id)
        .await
        .map_err(|e| unavailable(&e))?
        .ok_or_else(not_found)?;
    // The token is compared in full; a job of another kind is no stored request.
    if job.kind != HTTP_DELIVERY || job.args["token"].as_str() != Some(token) {
        return Err(not_found());
    }
    let body = serde_json::json!({
        "id": job.id,
        "state": job.state.as_str(),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "errors": job.errors,
        "answer": job.output,
    });
    let mut resp = Response::new(full(body.to_string()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !job.state.is_final() {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// Headers whose values are UTF-8, as text.
fn text_headers(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_string(), v.to_string())))
        .collect()
}

/// Delivers a stored request to one endpoint of its route's cluster (its breaker
/// asked, the route's per-try timeout), recording the attempt with the endpoint's
/// breaker and outlier detection as a proxied request's is. The answer's body is
/// kept up to `max_body_bytes`. `Err`: no answer (the error, to retry on).
pub(crate) async fn deliver(
    rt: &Runtime,
    route: &Route,
    stored: StoredRequest,
) -> Result<StoredAnswer, String> {
    let up = route.upstream.as_ref().ok_or("the route has no cluster")?;
    let pick = up.cluster.pick(None, &[]).map_err(|e| match e {
        PickError::NoEndpoints => format!("cluster {} has no endpoints", up.name),
        PickError::NoHealthyEndpoint => format!("no healthy endpoint in cluster {}", up.name),
    })?;
    let ep = pick.endpoint;
    let addr = ep.addr();
    let permit = match ep.breaker().map(|b| b.try_acquire_owned()) {
        Some(Err(_)) => return Err(format!("circuit open for {addr}")),
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let request = upstream_request(addr, up, stored)?;
    let start = SystemClock.now();
    let in_flight = ep.start_owned();
    let sent = tokio::time::timeout(route.per_try_timeout, up.pool().send(addr, request)).await;
    let latency = SystemClock.now() - start;
    let (result, lease) = take_lease(sent);
    let outcome = classify(up, &result);
    let verdict = Verdict::new(up, permit, &outcome, latency, in_flight, lease);
    let resp = match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            verdict.settle();
            return Err(format!("{addr}: {}", error_chain(&e)));
        }
        Err(_) => {
            verdict.settle();
            return Err(format!("{addr}: no answer within {:?}", route.per_try_timeout));
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let max = usize::try_from(rt.config.gateway.max_body_bytes).unwrap_or(usize::MAX);
    let read = tokio::time::timeout(
        route.body_idle_timeout.max(Duration::from_millis(1)),
        read_up_to(body, max),
    )
    .await;
    let (bytes, truncated) = match read {
        Ok(Ok(read)) => {
            verdict.settle();
            read
        }
        Ok(Err(e)) => {
            verdict.body_failed();
            return Err(format!("{addr}: the answer's body broke off: {e}"));
        }
        Err(_) => {
            verdict.body_failed();
            return Err(format!("{addr}: the answer's body stalled"));
        }
    };
    Ok(StoredAnswer {
        status: parts.status.as_u16(),
        headers: text_headers(&parts.headers),
        body: StoredBody::new(&bytes),
        truncated,
        endpoint: addr.to_string(),
    })
}

/// The request a stored one makes to the endpoint at `addr` of `up`.
fn upstream_request(
    addr: std::net::SocketAddr,
    up: &Upstream,
    stored: StoredRequest,
) -> Result<Request<Body>, String> {
    let mut request = Request::new(
        Full::new(stored.body.into_bytes())
            .map_err(crate::BoxError::from)
            .boxed(),
    );
    *request.method_mut() = Method::from_bytes(stored.method.as_bytes()).map_err(|e| e.to_string())?;
    *request.version_mut() = up.version;
    let uri: http::Uri = stored
        .path
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    *request.uri_mut() = upstream_uri(addr, &uri, up.version, up.tls);
    let h = request.headers_mut();
    for (n, v) in &stored.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            h.append(n, v);
        }
    }
    if up.version != http::Version::HTTP_11 {
        h.remove(header::HOST);
    }
    Ok(request)
}

/// Reads `body` up to `max` bytes: the bytes, and whether there was more.
async fn read_up_to(mut body: Incoming, max: usize) -> Result<(Vec<u8>, bool), hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = max.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                return Ok((out, true));
            }
        }
    }
    Ok((out, false))
}
