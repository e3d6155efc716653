//! The request path: route, limit, pick an endpoint per attempt (its breaker and the
//! cluster's bulkhead permitting), send with a per-attempt timeout inside the total
//! one, classify the answer, feed breakers and outlier detection, retry within the
//! budget on another endpoint, and answer, with every failure the gateway makes
//! saying why (`x-palisade-cause`).

mod admit;
mod answer;
mod attempt;
mod cached;
mod classify;
mod client_body;
mod decide;
mod guard;
mod headers;
mod hedge;
mod idempotent;
mod idle;
mod stored;
mod upgrade;

pub use admit::{PathError, normalize_path};
pub use cached::CACHE_HEADER;
pub use client_body::{ClientBodyError, ClientFault};
pub(crate) use stored::deliver;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use palisade_balance::EndpointState;
use palisade_core::{Clock, SystemClock};
use palisade_resilience::breaker::{CircuitBreaker, Outcome, Permit};
use palisade_resilience::shed::ShedPermit;

use crate::conn::ActiveGuard;
use crate::pool::{Lease, SendError};
use crate::route::Route;
use crate::runtime::Runtime;
use crate::trace::RequestTrace;

use self::admit::{Inbound, matches};
use self::answer::Verdict;
use self::attempt::Attempts;
use self::classify::{AttemptResult, Classified, body_is_empty};
use self::headers::{prepare_headers, upstream_uri, write_addr};
use self::upgrade::{Upgrade, mark_extended_connect, upgrade_protocol, websocket_key};
use crate::{Body, full};

pub use crate::cause::Cause;

/// The header naming why the gateway answered itself.
pub const CAUSE_HEADER: HeaderName = HeaderName::from_static("x-palisade-cause");
/// The header naming the endpoint a gateway-made answer concerns.
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-palisade-endpoint");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A failure the gateway answers for.
#[derive(Debug)]
struct Failure {
    cause: Cause,
    /// The status answered, when not the cause's own (an injected fault's).
    status: Option<StatusCode>,
    endpoint: Option<SocketAddr>,
    /// Extra headers (`Retry-After`, `X-RateLimit-*`).
    headers: Vec<(&'static str, String)>,
    detail: String,
}

impl Failure {
    fn new(cause: Cause, detail: impl Into<String>) -> Self {
        Failure {
            cause,
            status: None,
            endpoint: None,
            headers: Vec::new(),
            detail: detail.into(),
        }
    }

    fn at(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint = Some(endpoint);
        self
    }
}

/// Answers `failure` as a small JSON document with the cause headers.
fn failure_response(f: &Failure, request_id: &HeaderValue) -> Response<Body> {
    let body = serde_json::json!({
        "error": f.cause.as_str(),
        "status": f.status.map_or(f.cause.http_status(), |s| s.as_u16()),
        "detail": f.detail,
        "endpoint": f.endpoint.map(|e| e.to_string()),
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = f.status.unwrap_or_else(|| crate::cause::status(f.cause));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CAUSE_HEADER, HeaderValue::from_static(f.cause.as_str()));
    if let Some(e) = f.endpoint
        && let Ok(v) = HeaderValue::from_str(&e.to_string())
    {
        h.insert(ENDPOINT_HEADER, v);
    }
    for (name, value) in &f.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    h.insert(REQUEST_ID, request_id.clone());
    resp
}

/// Where a request came from.
#[derive(Clone, Copy, Debug)]
pub struct Downstream {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS (`x-forwarded-proto: https`).
    pub tls: bool,
}

/// Handles one client request (never an error: every failure is an answer).
///
/// It owns its runtime and returns what a hyper service does, so the server calls
/// it without an async block around it: each layer of future would be another copy
/// of its state (some 3.5 KiB) per request.
///
/// `active` marks the request in progress on its connection (for the connection's
/// idle timeout) until its answer is complete.
pub async fn handle(
    runtime: Arc<Runtime>,
    mut req: Request<Incoming>,
    client: Downstream,
    active: ActiveGuard,
) -> Result<Response<Body>, Infallible> {
    let mut active = Some(active);
    let rt = &*runtime;
    // Durations measured here are read from the CPU's counter (a few instructions a
    // read); timers and deadlines stay on tokio's clock.
    let started = SystemClock.now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .cloned()
        .unwrap_or_else(new_request_id);
    let line = Record::of(rt, &mut req, client.addr.ip());
    let extended_connect = mark_extended_connect(&mut req);
    let host = match admit::admit(&mut req, rt.config.gateway.escaped_slashes) {
        Ok(host) => host,
        Err(f) => {
            metrics::counter!("palisade_client_failures_total", "reason" => "bad_request").increment(1);
            return Ok(finish(rt, None, line, started, failure_response(&f, &request_id)));
        }
    };
    let Some(route) = rt.routes.iter().find(|r| matches(r, &req)) else {
        let f = Failure::new(
            Cause::NoRoute,
            format!("no route for {} {}", req.method(), req.uri().path()),
        );
        return Ok(finish(rt, None, line, started, failure_response(&f, &request_id)));
    };
    // Boxed, and asked only of routes that have a gatekeeper or serve files.
    if (route.guard.is_some() || route.files.is_some())
        && let Some(resp) = Box::pin(gatekeep(route, &mut req, client, &request_id, &mut active)).await
    {
        return Ok(finish(rt, Some(route), line, started, resp));
    }
    // A 2xx to an extended CONNECT would open a tunnel with nothing behind it.
    let asker = cached::Asker {
        from: (client, host),
        request_id: &request_id,
        may_fall_back: !extended_connect,
    };
    let keys = route.idempotency.as_ref().filter(|keys| keys.applies(&req));
    let resp = match (keys, &route.cache) {
        // Boxed: the keys' and the cache's state stay off the plain path's future.
        (Some(keys), _) => Box::pin(idempotent::serve(&runtime, route, keys, req, asker, &mut active)).await,
        (None, Some(rules)) => {
            let req = req.map(Inbound::Streaming);
            Box::pin(cached::serve(
                runtime.clone(),
                route,
                rules,
                req,
                asker,
                &mut active,
            ))
            .await
        }
        // `respond`'s plain arm, inlined: one less future around the hot path.
        (None, None) => {
            let req = req.map(Inbound::Streaming);
            match route_request(rt, route, req, asker.from, asker.request_id, &mut active).await {
                Ok(resp) => resp,
                Err(f) => fallback_or_failure(route, &f, asker.request_id, asker.may_fall_back),
            }
        }
    };
    Ok(finish(rt, Some(route), line, started, resp))
}

/// A route's gatekeeper and, for a route that serves files, its answer: the
/// answer when the request goes no further (refused, or served from the
/// directory), else `None` with the request as it goes upstream.
async fn gatekeep(
    route: &Route,
    req: &mut Request<Incoming>,
    client: Downstream,
    request_id: &HeaderValue,
    active: &mut Option<ActiveGuard>,
) -> Option<Response<Body>> {
    if let Some(guard) = &route.guard
        && let Err(f) = guard::check(guard, req, client.addr.ip()).await
    {
        return Some(failure_response(&f, request_id));
    }
    let files = route.files.as_ref()?;
    let limited = async {
        admit::global_limit(route, req, client.addr).await?;
        admit::local_limit(route, req, client.addr)
    };
    let mut resp = match limited.await {
        Ok(pace) => {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            files.serve(req, active.take()).await
        }
        Err(f) => failure_response(&f, request_id),
    };
    resp.headers_mut().insert(REQUEST_ID, request_id.clone());
    Some(resp)
}

/// A route's answer to a request (past its idempotency keys): from its cache, or
/// upstream (or its fallback, or the failure).
async fn respond(
    runtime: &Arc<Runtime>,
    route: &Route,
    req: Request<Inbound>,
    asker: cached::Asker<'_>,
    active: &mut Option<ActiveGuard>,
) -> Response<Body> {
    match &route.cache {
        // Boxed: the cache's state stays off the uncached path's future.
        Some(rules) => Box::pin(cached::serve(runtime.clone(), route, rules, req, asker, active)).await,
        None => match route_request(runtime, route, req, asker.from, asker.request_id, active).await {
            Ok(resp) => resp,
            Err(f) => fallback_or_failure(route, &f, asker.request_id, asker.may_fall_back),
        },
    }
}

/// The route's fallback for failure `f` when it has one for its cause (and
/// `may_fall_back`), else the failure's own answer.
fn fallback_or_failure(
    route: &Route,
    f: &Failure,
    request_id: &HeaderValue,
    may_fall_back: bool,
) -> Response<Body> {
    match &route.fallback {
        Some(fb) if may_fall_back && fb.answers(f.cause) => {
            metrics::counter!("palisade_route_fallbacks_total", "route" => route.name.clone(), "cause" => f.cause.as_str())
                .increment(1);
            let mut resp = Response::new(full(fb.body.clone()));
            *resp.status_mut() = fb.status;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, fb.content_type.clone());
            h.insert(
                HeaderName::from_static("x-palisade-fallback"),
                HeaderValue::from_static(f.cause.as_str()),
            );
            h.insert(REQUEST_ID, request_id.clone());
            resp
        }
        _ => failure_response(f, request_id),
    }
}

/// Handles one client request on a gateway with a queue: a status URL is
/// answered, an async route's request stored; anything else goes on to
/// [`handle`]. The server serves with this instead of [`handle`] when the gateway
/// started with `[gateway.queue]`, so a gateway without one carries none of it.
pub async fn handle_queued(
    rt: Arc<Runtime>,
    req: Request<Incoming>,
    client: Downstream,
    active: ActiveGuard,
) -> Result<Response<Body>, Infallible> {
    stored::handle(rt, req, client, active).await
}

/// What is recorded of a request once it is answered, besides its metrics.
struct Record {
    /// Its method and path, for the access log.
    access: Option<(Method, String)>,
    /// Its span, when the gateway traces and the request is sampled.
    trace: Option<Box<RequestTrace>>,
}

impl Record {
    /// What `rt` records of `req` from `client` (its trace context put in its
    /// extensions).
    fn of<B>(rt: &Runtime, req: &mut Request<B>, client: std::net::IpAddr) -> Record {
        Record {
            access: (rt.config.gateway.access_log)
                .then(|| (req.method().clone(), req.uri().path().to_owned())),
            trace: (rt.tracer.as_ref()).and_then(|t| RequestTrace::start(t, req, client).map(Box::new)),
        }
    }
}

fn finish(
    rt: &Runtime,
    route: Option<&Route>,
    record: Record,
    started: palisade_core::Instant,
    resp: Response<Body>,
) -> Response<Body> {
    let elapsed = SystemClock.now() - started;
    let status = resp.status();
    route
        .map_or(&rt.unrouted, |r| &r.metrics)
        .answered(status, elapsed);
    let route_name = route.map(|r| r.name.as_str());
    if let Some((method, path)) = record.access {
        let cause = resp
            .headers()
            .get(&CAUSE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let status = status.as_u16();
        let route = route_name.unwrap_or("none");
        tracing::info!(target: "palisade::access", route, %method, path, status, cause, ms = elapsed.as_secs_f64() * 1e3, "request");
    }
    if let Some(t) = record.trace {
        t.end(route_name, status, elapsed, resp.headers().get(&REQUEST_ID));
    }
    resp
}

/// 32 random hex digits.
fn new_request_id() -> HeaderValue {
    let mut id = [0u8; 32];
    crate::trace::write_hex(&mut id, &fastrand::u128(..).to_be_bytes());
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
}

/// The request's body, as sent on each attempt.
enum SendBody {
    /// Kept in memory: can be sent again.
    Buffered(Bytes),
    /// Streamed: one attempt only (taken by the first send).
    Streaming(Option<Body>),
}

/// The request path after admission: attempts until one is answered or the
/// request cannot go on, each phase a function of its own (admit, attempt, decide,
/// answer), as pingora names its phases.
async fn route_request(
    rt: &Runtime,
    route: &Route,
    req: Request<Inbound>,
    (from, host): (Downstream, Option<HeaderValue>),
    request_id: &HeaderValue,
    active: &mut Option<ActiveGuard>,
) -> Result<Response<Body>, Failure> {
    if route.mode == crate::config::RouteMode::Async {
        // Served by a gateway that started without a queue (one added by a reload).
        return Err(Failure::new(
            Cause::QueueUnavailable,
            "this gateway started without [gateway.queue]: restart it to store requests",
        ));
    }
    if route.global_limit.is_some() {
        admit::global_limit(route, &req, from.addr).await?;
    }
    let Some(up) = route.upstream_for(&req) else {
        return Err(Failure::new(Cause::NoHealthyEndpoint, "the route has no cluster"));
    };
    // A copy for the mirror, decided first: its body is then read whole if small.
    let copy = route.mirror.as_ref().and_then(|m| Some((m, m.take()?)));
    let (mut req, pending) = admit::prepare(rt, route, (up, copy.is_some()), req, from, host, request_id)?;
    let complete = pending.is_none();
    if let Some(body) = pending {
        (req.body, req.client_side) = body.watch().await?;
    }
    if let Some((m, slot)) = copy {
        mirror(route, (m, slot), &mut req, complete);
    }
    // Held until the answer is complete: a streaming body or an open tunnel still
    // occupies the cluster.
    let slot = admit::bulkhead_slot(up)?;
    let mut attempts = Attempts::new(route, req.client_deadline);
    attempts.trace = req.trace();
    // A pacing limit's wait or an injected delay, within the route's timeout (its
    // deadline is set).
    if !req.pace.is_zero() {
        tokio::time::sleep(req.pace).await;
    }
    // Asked last, so the adaptive limit measures the cluster alone.
    let mut shed = (up.shed.as_ref())
        .map(|cluster| admit::shed(route, cluster, &req))
        .transpose()?;
    let replayable = req.replayable_method && matches!(req.body, SendBody::Buffered(_));
    let hedge = route.hedge.as_ref().filter(|_| replayable);
    loop {
        let Some((ep, permit)) = attempts.pick(route, up, req.hash_key)? else {
            continue;
        };
        // A hedge may follow: the request's head is then kept for its copy.
        let last_chance = attempts.last_chance(route) && hedge.is_none();
        let request = req.next_request(ep.addr(), up, last_chance);
        let launch = attempts.timed(route, ep, permit, request);
        let mut attempted = match hedge {
            // Boxed: two attempts' state, kept off the unhedged path's future.
            Some(h) => Box::pin(hedge::race(route, up, h, &mut attempts, &mut req, launch)).await?,
            None => launch.send(up, req.client_side.as_deref()).await?,
        };
        if let Some(delay) = attempts.retry_delay(route, replayable, &attempted.result, &attempted.outcome) {
            // The answer is dropped unread: it is judged by its headers.
            attempted.settle();
            route.metrics.retried();
            attempts.retrying(attempted.addr);
            tokio::time::sleep(delay).await;
            continue;
        }
        if let Some(permit) = shed.take() {
            attempted.report_to(permit);
        }
        let exchange = Exchange {
            rt,
            route,
            request_id,
        };
        return exchange.answer(attempted, &mut req.upgrade, slot, active);
    }
}

/// Sends a copy of `req` to the route's shadow cluster (the request was in the
/// mirror's share and `slot` is its place among the copies in flight) when its
/// body can be sent twice (read whole, or empty from the start: a streaming body,
/// one over `MIRROR_BUFFER_BYTES` or of unknown length, goes to the cluster alone). The copy runs on a task of
/// its own within the route's timeout; its answer is dropped and its failures are
/// only counted, so the client never feels them.
fn mirror(
    route: &Route,
    (m, slot): (&crate::split::RouteMirror, crate::split::MirrorSlot),
    req: &mut admit::Prepared,
    complete: bool,
) {
    if !(complete || matches!(req.body, SendBody::Buffered(_))) {
        m.count("streaming");
        return;
    }
    let up = m.upstream.clone();
    let Ok(pick) = up.cluster.pick(req.hash_key, &[]) else {
        m.count("no_endpoint");
        return;
    };
    let addr = pick.endpoint.addr();
    let mut copy = req.next_request(addr, &up, false);
    copy.headers_mut().insert(
        HeaderName::from_static("x-palisade-mirror"),
        HeaderValue::from_static("1"),
    );
    let (sent, failed) = (m.counter("sent"), m.counter("failed"));
    let timeout = route.timeout;
    tokio::spawn(async move {
        let _slot = slot;
        match tokio::time::timeout(timeout, up.pool().send(addr, copy)).await {
            Ok(Ok((resp, lease))) => {
                // Read to its end, so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                drop(lease);
                sent.increment(1);
            }
            _ => failed.increment(1),
        }
    });
}

/// What the gateway knows of the request being answered.
struct Exchange<'a> {
    rt: &'a Runtime,
    route: &'a Route,
    request_id: &'a HeaderValue,
}

/// One attempt's result, as the decide and answer phases see it.
struct Attempted {
    addr: SocketAddr,
    result: AttemptResult,
    outcome: Classified,
    /// Kept for an answer whose body is still to come.
    verdict: Option<Verdict>,
    per_try: Duration,
    /// From the send to the answer's headers (or the error).
    latency: Duration,
}

impl Attempted {
    /// An answer the endpoint's breaker counts as good.
    fn succeeded(&self) -> bool {
        matches!(self.result, Ok(Ok(_))) && self.outcome.breaker != Outcome::Failure
    }

    /// Judges the attempt now, its answer (if any) dropped unread.
    fn settle(&mut self) {
        if let Some(v) = self.verdict.take() {
            v.settle();
        }
    }

    /// Tells the cluster's adaptive concurrency limit how the request went: a
    /// timeout or an overload answer (503, 429) is a drop, which lowers the limit;
    /// any other answer is a latency sample; an error that is neither says nothing.
    fn report_to(&self, permit: ShedPermit) {
        match &self.result {
            Ok(Ok(resp)) if matches!(resp.status().as_u16(), 429 | 503) => permit.dropped(),
            Ok(Ok(_)) => permit.success(),
            Err(_) => permit.dropped(),
            Ok(Err(_)) => drop(permit),
        }
    }
}

/// An endpoint picked for an attempt, with its breaker's permit (if it has one).
type Picked = (Arc<EndpointState>, Option<Permit<CircuitBreaker>>);

/// What the pool's send came to within the attempt's timeout.
type Sent = Result<Result<(Response<Incoming>, Option<Lease>), SendError>, tokio::time::error::Elapsed>;

/// Takes the pooled connection's lease off an answer: it goes back to the pool
/// when the verdict is settled (once the body is read); an upgraded connection is
/// no longer the pool's.
fn take_lease(result: Sent) -> (AttemptResult, Option<Lease>) {
    match result {
        Ok(Ok((resp, lease))) => {
            let lease = match lease {
                Some(l) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    l.discard();
                    None
                }
                other => other,
            };
            (Ok(Ok(resp)), lease)
        }
        Ok(Err(e)) => (Ok(Err(e)), None),
        Err(elapsed) => (Err(elapsed), None),
    }
}

/// `Retry-After` as delta-seconds (dates are not honoured).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: u64 = h.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}
