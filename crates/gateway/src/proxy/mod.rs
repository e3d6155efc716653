//! The request path: route, limit, pick an endpoint per attempt (its breaker and the
//! cluster's bulkhead permitting), send with a per-attempt timeout inside the total
//! one, classify the answer, feed breakers and outlier detection, retry within the
//! budget on another endpoint, and answer, with every failure the gateway makes
//! saying why (`x-palisade-cause`).

mod admit;
mod client_body;
mod idle;

pub use admit::{PathError, normalize_path};
pub use client_body::{ClientBodyError, ClientFault};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use palisade_balance::endpoint::OwnedInFlight;
use palisade_balance::outlier::CallResult;
use palisade_balance::{EndpointState, PickError};
use palisade_resilience::breaker::{CircuitBreaker, Outcome, Permit};
use palisade_resilience::bulkhead::BulkheadPermit;
use tokio::time::Instant;

use crate::config::RetryOn;
use crate::conn::ActiveGuard;
use crate::pool::{Lease, SendError};
use crate::route::Route;
use crate::runtime::Runtime;
use crate::upstream::Upstream;

use self::admit::matches;
use self::idle::IdleTimer;
use crate::{Body, BoxError, full};

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
    endpoint: Option<SocketAddr>,
    /// Extra headers (`Retry-After`, `X-RateLimit-*`).
    headers: Vec<(&'static str, String)>,
    detail: String,
}

impl Failure {
    fn new(cause: Cause, detail: impl Into<String>) -> Self {
        Failure {
            cause,
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
        "status": f.cause.status().as_u16(),
        "detail": f.detail,
        "endpoint": f.endpoint.map(|e| e.to_string()),
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = f.cause.status();
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
    rt: Arc<Runtime>,
    mut req: Request<Incoming>,
    client: Downstream,
    active: ActiveGuard,
) -> Result<Response<Body>, Infallible> {
    let mut active = Some(active);
    let rt = &*rt;
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .cloned()
        .unwrap_or_else(new_request_id);
    // Kept for the access log only.
    let line = rt
        .config
        .gateway
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let extended_connect = mark_extended_connect(&mut req);
    if let Err(f) = admit::admit(&mut req, rt.config.gateway.escaped_slashes) {
        metrics::counter!("palisade_client_failures_total", "reason" => "bad_request").increment(1);
        return Ok(finish(rt, None, line, started, failure_response(&f, &request_id)));
    }
    let Some(route) = rt.routes.iter().find(|r| matches(r, &req)) else {
        let f = Failure::new(
            Cause::NoRoute,
            format!("no route for {} {}", req.method(), req.uri().path()),
        );
        return Ok(finish(rt, None, line, started, failure_response(&f, &request_id)));
    };
    let resp = match route_request(rt, route, req, client, &request_id, &mut active).await {
        Ok(resp) => resp,
        Err(f) => match &route.fallback {
            // A 2xx to an extended CONNECT would open a tunnel with nothing behind it.
            Some(fb) if !extended_connect && fb.answers(f.cause) => {
                metrics::counter!("palisade_fallback_total", "route" => route.name.clone(), "cause" => f.cause.as_str())
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
            _ => failure_response(&f, &request_id),
        },
    };
    Ok(finish(rt, Some(route), line, started, resp))
}

fn finish(
    rt: &Runtime,
    route: Option<&Route>,
    line: Option<(Method, String)>,
    started: Instant,
    resp: Response<Body>,
) -> Response<Body> {
    let elapsed = started.elapsed();
    let status = resp.status();
    route
        .map_or(&rt.unrouted, |r| &r.metrics)
        .answered(status, elapsed);
    if let Some((method, path)) = line {
        let route_name = route.map_or("none", |r| r.name.as_str());
        let cause = resp
            .headers()
            .get(&CAUSE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let status = status.as_u16();
        tracing::info!(target: "palisade::access", route = route_name, %method, path, status, cause, ms = elapsed.as_secs_f64() * 1e3, "request");
    }
    resp
}

/// 32 random hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let bits = fastrand::u128(..);
    for (i, b) in id.iter_mut().enumerate() {
        *b = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
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
    req: Request<Incoming>,
    from: Downstream,
    request_id: &HeaderValue,
    active: &mut Option<ActiveGuard>,
) -> Result<Response<Body>, Failure> {
    let (mut req, pending) = admit::prepare(rt, route, req, from, request_id)?;
    if let Some(body) = pending {
        (req.body, req.client_side) = body.watch().await?;
    }
    let up = &route.upstream;
    // Held until the answer is complete: a streaming body or an open tunnel still
    // occupies the cluster.
    let slot = match &up.bulkhead {
        Some(b) => Some(
            b.try_acquire()
                .map_err(|e| Failure::new(Cause::BulkheadFull, e.to_string()))?,
        ),
        None => None,
    };
    let retry = route.retry.as_ref();
    if let Some(r) = retry {
        r.budget.deposit();
    }
    let mut attempts = Attempts::new(route);
    loop {
        let Some((ep, permit)) = attempts.pick(route, req.hash_key)? else {
            continue;
        };
        let addr = ep.addr();
        let upstream_req = req.next_request(addr, up, attempts.last_chance());
        let per_try = attempts.per_try(route);
        let attempt_start = Instant::now();
        let in_flight = ep.start_owned();
        let result = tokio::time::timeout(per_try, up.pool().send(addr, upstream_req)).await;
        let latency = attempt_start.elapsed();
        // A failure the client's body caused (or a timeout while the gateway waited
        // for it) is the client's: the endpoint is not judged, and dropping the
        // breaker's permit counts the call as cancelled.
        if !matches!(result, Ok(Ok(_)))
            && let Some(fault) = req.client_side.as_ref().and_then(|s| s.fault(result.is_err()))
        {
            drop((permit, in_flight));
            return Err(fault.failure());
        }
        let (result, lease) = take_lease(result);
        let outcome = classify(up, &result);
        let verdict = Verdict {
            upstream: up.clone(),
            slot: None,
            permit,
            breaker: outcome.breaker,
            outlier: outcome.outlier,
            latency,
            in_flight,
            lease,
            active: None,
        };
        let mut attempted = Attempted {
            addr,
            verdict: verdict.judged_now_or_at_body_end(&result),
            result,
            outcome,
            per_try,
        };
        let replayable = req.replayable_method && matches!(req.body, SendBody::Buffered(_));
        if let Some(delay) = attempts.retry_delay(route, replayable, &attempted) {
            // The answer is dropped unread: it is judged by its headers.
            if let Some(v) = attempted.verdict.take() {
                v.settle();
            }
            route.metrics.retried();
            attempts.retrying(addr, route);
            tokio::time::sleep(delay).await;
            continue;
        }
        let exchange = Exchange {
            rt,
            route,
            request_id,
        };
        return exchange.answer(attempted, &mut req.upgrade, slot, active);
    }
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
}

/// An endpoint picked for an attempt, with its breaker's permit (if it has one).
type Picked = (Arc<EndpointState>, Option<Permit<CircuitBreaker>>);

/// What the pool's send came to within the attempt's timeout.
type Sent = Result<Result<(Response<Incoming>, Option<Lease>), SendError>, tokio::time::error::Elapsed>;

/// The attempts of one request: its deadline, the endpoints tried, the backoff.
struct Attempts {
    deadline: Instant,
    max: u32,
    made: u32,
    refusals: usize,
    tried: Vec<SocketAddr>,
    backoff: Duration,
}

impl Attempts {
    fn new(route: &Route) -> Self {
        let retry = route.retry.as_ref();
        Attempts {
            deadline: Instant::now() + route.timeout,
            max: retry.map_or(1, |r| r.attempts.max(1)),
            made: 0,
            refusals: 0,
            tried: Vec::new(),
            backoff: retry.map_or(Duration::ZERO, |r| r.backoff),
        }
    }

    /// Picks an endpoint and asks its breaker. `None`: the breaker refused and
    /// another endpoint may be tried at once (a refusal sends nothing; bounded by
    /// the number of endpoints). An attempt is counted when the breaker permits.
    fn pick(&mut self, route: &Route, hash_key: Option<u64>) -> Result<Option<Picked>, Failure> {
        let up = &route.upstream;
        let pick = up.cluster.pick(hash_key, &self.tried).map_err(|e| match e {
            PickError::NoEndpoints => Failure::new(
                Cause::NoHealthyEndpoint,
                format!("cluster {} has no endpoints", up.name),
            ),
            PickError::NoHealthyEndpoint => Failure::new(
                Cause::NoHealthyEndpoint,
                format!("no healthy endpoint in cluster {}", up.name),
            ),
        })?;
        let ep = pick.endpoint;
        let addr = ep.addr();
        let permit = match ep.breaker().map(|b| b.try_acquire_owned()) {
            Some(Err(rejected)) => {
                self.tried.push(addr);
                self.refusals += 1;
                let may_retry = route
                    .retry
                    .as_ref()
                    .is_some_and(|r| r.retry_on.contains(&RetryOn::Refused));
                if may_retry && self.refusals < up.cluster.len() && Instant::now() < self.deadline {
                    return Ok(None);
                }
                let mut f = Failure::new(Cause::CircuitOpen, format!("circuit open for {addr}")).at(addr);
                if let Some(after) = rejected.retry_after {
                    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                    f.headers.push(("retry-after", secs.max(1).to_string()));
                }
                return Err(f);
            }
            Some(Ok(p)) => Some(p),
            None => None,
        };
        self.made += 1;
        Ok(Some((ep, permit)))
    }

    /// Whether this attempt is the last one allowed.
    fn last_chance(&self) -> bool {
        self.made >= self.max
    }

    /// The attempt's timeout: the per-attempt one, within what is left of the total.
    fn per_try(&self, route: &Route) -> Duration {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        route.per_try_timeout.min(remaining)
    }

    /// The decide phase: the wait before another attempt, if the route retries this
    /// result, the request can be sent again, time is left and the retry budget
    /// allows one.
    fn retry_delay(&self, route: &Route, replayable: bool, attempted: &Attempted) -> Option<Duration> {
        let (result, outcome) = (&attempted.result, &attempted.outcome);
        let r = route.retry.as_ref()?;
        let status_listed = matches!(result, Ok(Ok(resp))
            if r.retry_on.contains(&RetryOn::RetriableStatus) && r.statuses.contains(&resp.status().as_u16()));
        let wanted = replayable
            && self.made < self.max
            && (status_listed || outcome.retry_on.iter().any(|c| r.retry_on.contains(c)));
        if !wanted {
            return None;
        }
        let server_hint = match result {
            Ok(Ok(resp)) => retry_after(resp.headers()),
            _ => None,
        };
        let delay = server_hint
            .unwrap_or_else(|| jitter(self.backoff))
            .min(r.max_backoff.max(server_hint.unwrap_or_default()));
        if Instant::now() + delay >= self.deadline {
            return None;
        }
        if !r.budget.try_withdraw() {
            metrics::counter!("palisade_retry_budget_exhausted_total", "route" => route.name.clone())
                .increment(1);
            return None;
        }
        Some(delay)
    }

    /// Notes a retry away from `addr`: it is not picked again, and the backoff
    /// doubles.
    fn retrying(&mut self, addr: SocketAddr, route: &Route) {
        self.tried.push(addr);
        if let Some(r) = &route.retry {
            self.backoff = (self.backoff * 2).min(r.max_backoff);
        }
    }
}

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

impl Exchange<'_> {
    /// The answer phase: the endpoint's answer passed on (taking the cluster's
    /// bulkhead slot and the connection's request guard to its body's end), its
    /// tunnel opened, or the failure the attempt came to.
    fn answer(
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

struct Classified {
    breaker: Outcome,
    outlier: CallResult,
    cause: Option<Cause>,
    retry_on: Vec<RetryOn>,
}

type AttemptResult = Result<Result<Response<Incoming>, SendError>, tokio::time::error::Elapsed>;

fn classify(up: &Upstream, result: &AttemptResult) -> Classified {
    match result {
        Ok(Ok(resp)) => {
            // A gRPC answer with no body ("trailers-only") carries its status in
            // its headers: judged as the HTTP status it stands for.
            let s = match resp.status() {
                StatusCode::OK => grpc_status_as_http(resp.headers()).unwrap_or(StatusCode::OK),
                other => other,
            };
            let (breaker, outlier) = judge_status(up, s);
            let mut retry_on = Vec::new();
            if s.is_server_error() {
                retry_on.push(RetryOn::Status5xx);
            }
            if outlier == CallResult::GatewayFailure {
                retry_on.push(RetryOn::GatewayError);
            }
            Classified {
                breaker,
                outlier,
                cause: None,
                retry_on,
            }
        }
        Ok(Err(e)) => {
            let (cause, on) = if matches!(e, SendError::Connect(_)) {
                (Cause::ConnectError, RetryOn::ConnectFailure)
            } else if is_reset(e) {
                (Cause::Reset, RetryOn::Reset)
            } else {
                (Cause::ProtocolError, RetryOn::Reset)
            };
            Classified {
                breaker: Outcome::Failure,
                outlier: CallResult::GatewayFailure,
                cause: Some(cause),
                retry_on: vec![on],
            }
        }
        Err(_) => Classified {
            breaker: Outcome::Failure,
            outlier: CallResult::GatewayFailure,
            cause: Some(Cause::Timeout),
            retry_on: vec![RetryOn::Timeout],
        },
    }
}

/// What an answer with status `s` tells the endpoint's breaker (5xx, and 429 when
/// configured, are failures) and outlier detection (502-504 are gateway failures,
/// other 5xx server errors).
fn judge_status(up: &Upstream, s: StatusCode) -> (Outcome, CallResult) {
    let breaker = if (s.is_server_error() && up.breaker_counts_5xx)
        || (s == StatusCode::TOO_MANY_REQUESTS && up.breaker_counts_429)
    {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    let outlier = if matches!(s.as_u16(), 502..=504) {
        CallResult::GatewayFailure
    } else if s.is_server_error() {
        CallResult::ServerError
    } else {
        CallResult::Success
    };
    (breaker, outlier)
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The HTTP status a `grpc-status` in `h` stands for (the mapping Envoy uses):
/// `14` (unavailable) is a 503, `4` (deadline exceeded) a 504, `13` (internal) a
/// 500, `8` (resource exhausted) a 429, `0` a 200; client-side codes map to 4xx.
fn grpc_status_as_http(h: &HeaderMap) -> Option<StatusCode> {
    let code: u16 = h.get(&GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()?;
    let http = match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        // 2 unknown, 13 internal, 15 data loss, and codes not yet defined.
        _ => 500,
    };
    StatusCode::from_u16(http).ok()
}

/// Whether the connection broke (reset, closed mid-answer) rather than the
/// endpoint breaking the protocol.
fn is_reset(e: &SendError) -> bool {
    matches!(e, SendError::Http(h) if crate::pool::broke_before_answer(h))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn body_is_empty(parts: &http::request::Parts) -> bool {
    !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        )
}

/// Full jitter: uniformly between zero and `base`.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(fastrand::f64())
}

/// `Retry-After` as delta-seconds (dates are not honoured).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: u64 = h.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
];

/// The tokens of every `Connection` header, trimmed. Tokens are ASCII (RFC 9110
/// section 5.6.2): bytes are split and trimmed, without decoding text.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds which hop-by-hop ones are here (most messages
    // carry none, or only `Connection`); only those are removed, each removal being
    // a hash and a probe.
    const TE: u16 = 1 << 7; // after HOP_BY_HOP's bits
    const TRANSFER_ENCODING: u16 = TE << 1;
    let mut present = 0u16;
    for k in h.keys() {
        // Matched as text: a length test rules out almost every name at once, where
        // comparing `HeaderName`s costs a call per candidate.
        present |= match k.as_str() {
            "connection" => 1,
            "keep-alive" => 1 << 1,
            "proxy-connection" => 1 << 2,
            "proxy-authenticate" => 1 << 3,
            "proxy-authorization" => 1 << 4,
            "trailer" => 1 << 5,
            "upgrade" => 1 << 6,
            "te" => TE,
            "transfer-encoding" => TRANSFER_ENCODING,
            _ => 0,
        };
    }
    if present == 0 {
        return;
    }
    // Headers the Connection header names are hop-by-hop too. The usual tokens
    // (`keep-alive`, `close`, `upgrade`) name none beyond the fixed list, and then
    // nothing is allocated.
    let fixed = |t: &[u8]| {
        let same = |n: &str| n.len() == t.len() && n.as_bytes().eq_ignore_ascii_case(t);
        same("close") || HOP_BY_HOP.iter().any(|n| same(n.as_str()))
    };
    let named: Vec<HeaderName> = if present & 1 == 0 {
        Vec::new()
    } else {
        connection_tokens(h)
            .filter(|t| !fixed(t))
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect()
    };
    for n in &named {
        h.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if present & TRANSFER_ENCODING != 0 {
        h.remove(header::TRANSFER_ENCODING);
    }
    // TE: only "trailers" may pass (gRPC needs it).
    if present & TE != 0
        && let Some(te) = h.get(header::TE)
    {
        let trailers = te
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

/// Turns the client's headers into those sent upstream: hop-by-hop headers removed,
/// `Host` kept for HTTP/1.1 (HTTP/2 carries the authority), `x-forwarded-*` and
/// `x-request-id` set.
fn prepare_headers(
    parts: &mut http::request::Parts,
    version: Version,
    from: Downstream,
    request_id: &HeaderValue,
) {
    let authority = parts.uri.authority().map(|a| a.as_str());
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    // HTTP/2 carries the authority instead of `Host`; HTTP/1.1 needs one.
    let sent = if version == Version::HTTP_11 {
        h.get(header::HOST).cloned()
    } else {
        h.remove(header::HOST)
    };
    let host = match sent {
        Some(host) => Some(host),
        None => authority
            .and_then(|a| HeaderValue::from_str(a).ok())
            .inspect(|host| {
                if version == Version::HTTP_11 {
                    h.insert(header::HOST, host.clone());
                }
            }),
    };
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST, host);
    }
    let mut xff = Vec::with_capacity(16);
    if let Some(prev) = h.get(&X_FORWARDED_FOR) {
        xff.extend_from_slice(prev.as_bytes());
        xff.extend_from_slice(b", ");
    }
    write_ip(&mut xff, from.addr.ip());
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    let proto = if from.tls { "https" } else { "http" };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    h.insert(REQUEST_ID, request_id.clone());
}

/// The request target sent upstream: the path and query alone for HTTP/1.1
/// (origin-form; `Host` says the rest), the whole URI for HTTP/2, whose `:scheme`
/// (`https` over TLS) and `:authority` come from it.
fn upstream_uri(addr: SocketAddr, original: &Uri, version: Version, tls: bool) -> Uri {
    let mut parts = http::uri::Parts::default();
    if version == Version::HTTP_2 {
        parts.scheme = Some(if tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        let mut text = Vec::with_capacity(24);
        write_addr(&mut text, addr);
        parts.authority = http::uri::Authority::from_maybe_shared(Bytes::from(text)).ok();
    }
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Appends `ip` as text: IPv4 by hand (this runs on every request, and the
/// formatting machinery costs more than the rest of building the upstream URI).
fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_decimal(out, u16::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// Appends `addr` as `ip:port` (`[ip]:port` for IPv6).
fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    if addr.is_ipv6() {
        out.push(b'[');
        write_ip(out, addr.ip());
        out.push(b']');
    } else {
        write_ip(out, addr.ip());
    }
    out.push(b':');
    write_decimal(out, addr.port());
}

fn write_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A request to leave HTTP for another protocol on the same connection.
struct Upgrade {
    /// What `Upgrade` names (`websocket`, ...).
    protocol: HeaderValue,
    /// Asked by HTTP/2's extended CONNECT, not by an HTTP/1.1 `Upgrade`.
    over_h2: bool,
}

/// Marks an HTTP/2 extended CONNECT (RFC 8441: WebSocket over HTTP/2) and turns its
/// method into the `GET` of the HTTP/1.1 upgrade it is sent upstream as, so routes
/// match both alike. Returns whether `req` was one.
fn mark_extended_connect<B>(req: &mut Request<B>) -> bool {
    if req.method() != Method::CONNECT {
        return false;
    }
    let Some(protocol) = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
    else {
        return false;
    };
    *req.method_mut() = Method::GET;
    req.extensions_mut().insert(ExtendedConnect(protocol));
    true
}

/// The protocol an HTTP/2 extended CONNECT asked for.
#[derive(Clone)]
struct ExtendedConnect(HeaderValue);

/// The protocol a request asks to switch to: an HTTP/1.1 request's `Upgrade` header
/// when `Connection` names `upgrade`, or what an extended CONNECT asked for.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<Upgrade> {
    match req.version() {
        Version::HTTP_11 => {
            let protocol = req.headers().get(header::UPGRADE)?;
            if !connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case(b"upgrade")) {
                return None;
            }
            let protocol = protocol.clone();
            Some(Upgrade {
                protocol,
                over_h2: false,
            })
        }
        Version::HTTP_2 => req.extensions().get::<ExtendedConnect>().map(|e| Upgrade {
            protocol: e.0.clone(),
            over_h2: true,
        }),
        _ => None,
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 section 4.1).
fn websocket_key() -> HeaderValue {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bits = fastrand::u128(..);
    let mut key = [b'='; 24];
    // 128 bits are 21 whole sextets and 2 bits, padded to a 22nd sextet.
    for (i, c) in key.iter_mut().take(22).enumerate() {
        let sextet = if i < 21 {
            (bits >> (122 - 6 * i)) & 0x3f
        } else {
            (bits & 0x3) << 4
        };
        *c = B64[sextet as usize];
    }
    HeaderValue::from_bytes(&key).expect("base64 is a valid header value")
}

/// Answers the client with the endpoint's 101 and joins the two upgraded
/// connections, copying bytes both ways until either side closes.
fn tunnel(
    rt: &Runtime,
    route: &Route,
    addr: SocketAddr,
    mut resp: Response<Incoming>,
    (upgrade, client_half): (Upgrade, hyper::upgrade::OnUpgrade),
    request_id: &HeaderValue,
    slot: Option<BulkheadPermit>,
) -> Response<Body> {
    let upstream_half = hyper::upgrade::on(&mut resp);
    let proto = resp.headers().get(header::UPGRADE).cloned();
    let mut out = downstream_response(resp, request_id, None);
    if upgrade.over_h2 {
        // HTTP/2 opens the tunnel with a 200 and has no key to accept (RFC 8441).
        *out.status_mut() = StatusCode::OK;
        out.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        if let Some(proto) = proto {
            out.headers_mut().insert(header::UPGRADE, proto);
        }
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let route_name = route.name.clone();
    metrics::counter!("palisade_upgrades_total", "route" => route_name.clone()).increment(1);
    let tunnels = rt.tunnels.clone();
    let idle = rt.config.gateway.tunnel_idle_timeout.get();
    tokio::spawn(async move {
        // The cluster's bulkhead slot is held for as long as the tunnel is open.
        let _slot = slot;
        let (client, upstream) = match tokio::try_join!(client_half, upstream_half) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, route = route_name, %addr, "upgrade failed");
                return;
            }
        };
        let active = metrics::gauge!("palisade_tunnels_active");
        active.increment(1.0);
        let client = hyper_util::rt::TokioIo::new(client);
        let upstream = hyper_util::rt::TokioIo::new(upstream);
        match tunnels.join(client, upstream, idle).await {
            Ok((up, down)) => tracing::debug!(route = route_name, %addr, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(error = %e, route = route_name, %addr, "tunnel ended"),
        }
        active.decrement(1.0);
    });
    out
}

/// The endpoint's answer as sent to the client; with a verdict, its body settles
/// the verdict when it ends and is cut off after `idle` without a frame.
fn downstream_response(
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
struct Verdict {
    upstream: Arc<Upstream>,
    /// The cluster's bulkhead slot, on the attempt that answers the client.
    slot: Option<BulkheadPermit>,
    permit: Option<Permit<CircuitBreaker>>,
    breaker: Outcome,
    outlier: CallResult,
    latency: Duration,
    in_flight: OwnedInFlight,
    /// The HTTP/1.1 connection the answer comes on, handed back to its pool with
    /// the verdict: once the body is read.
    lease: Option<Lease>,
    /// The client connection's request in progress, until the answer is complete.
    active: Option<ActiveGuard>,
}

impl Verdict {
    /// An answer whose body is still to come is judged when it ends (a body cut
    /// mid-stream is the endpoint's failure, not the success its headers promised):
    /// its verdict is kept. Any other result is judged now.
    fn judged_now_or_at_body_end(self, result: &AttemptResult) -> Option<Verdict> {
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

    fn settle(self) {
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
    fn body_failed(mut self) {
        self.breaker = Outcome::Failure;
        self.outlier = CallResult::GatewayFailure;
        self.settle();
    }
}

/// An endpoint's response body, passed through; its end settles the attempt's
/// [`Verdict`]. A body through which nothing has come for `idle` is cut off: the
/// client's answer ends with an error and the endpoint is judged to have failed.
struct JudgedBody {
    inner: Incoming,
    verdict: Option<Verdict>,
    idle: IdleTimer,
}

/// A response body that stalled longer than the route's `body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no response body data from the endpoint for {0:?} (body_idle_timeout)")]
struct BodyIdle(Duration);

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
        // endpoint's failure although its HTTP status said 200.
        if let Some(Ok(f)) = &frame
            && let Some(s) = f.trailers_ref().and_then(grpc_status_as_http)
            && let Some(v) = &mut self.verdict
        {
            (v.breaker, v.outlier) = judge_status(&v.upstream, s);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_text(addr: &str) -> String {
        let mut out = Vec::new();
        write_addr(&mut out, addr.parse().unwrap());
        String::from_utf8(out).unwrap()
    }

    fn stripped(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        left.sort();
        left
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let own = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            stripped(&[("content-type", "text/plain"), ("x-a", "1")]),
            [own("content-type", "text/plain"), own("x-a", "1")]
        );
        assert_eq!(
            stripped(&[
                ("connection", "keep-alive, X-Secret"),
                ("connection", "close"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authorization", "Basic eA=="),
                ("trailer", "x-t"),
                ("upgrade", "websocket"),
                ("transfer-encoding", "chunked"),
                ("x-secret", "hop"),
                ("x-kept", "end to end"),
            ]),
            [own("x-kept", "end to end")]
        );
        // TE passes only as `trailers` (gRPC needs it), and not at all without it.
        assert_eq!(stripped(&[("te", "trailers, deflate")]), [own("te", "trailers")]);
        assert_eq!(stripped(&[("te", "gzip")]), []);
        assert_eq!(stripped(&[("connection", "te"), ("te", "trailers")]), []);
        // Each name alone: the pass that finds them and the removal agree on which is which.
        for name in HOP_BY_HOP
            .iter()
            .map(HeaderName::as_str)
            .chain(["te", "transfer-encoding"])
        {
            assert_eq!(
                stripped(&[(name, "x"), ("x-kept", "1")]),
                [own("x-kept", "1")],
                "{name}"
            );
        }
    }

    #[test]
    fn websocket_keys_are_16_random_bytes_in_base64() {
        const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for seed in [1, 2, 3, 0xdead_beef] {
            fastrand::seed(seed);
            let key = websocket_key();
            fastrand::seed(seed);
            let bits = fastrand::u128(..);
            let text = key.to_str().unwrap();
            assert_eq!(text.len(), 24, "{text}");
            assert!(text.ends_with("=="), "{text}");
            // 21 sextets hold the first 126 bits; the 22nd the last 2 and 4 zeros.
            let sextet = |i: usize| B64.find(text.as_bytes()[i] as char).unwrap() as u128;
            let head = (0..21).fold(0u128, |acc, i| (acc << 6) | sextet(i));
            assert_eq!(head, bits >> 2, "{text}");
            assert_eq!(sextet(21), (bits & 0x3) << 4, "{text}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_would() {
        for a in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:9",
            "[::1]:443",
            "[2001:db8::7]:10",
        ] {
            assert_eq!(addr_text(a), a.parse::<SocketAddr>().unwrap().to_string());
        }
        let ep: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let uri = upstream_uri(ep, &"/a/b?c=d".parse().unwrap(), Version::HTTP_2, false);
        assert_eq!(uri.to_string(), "http://10.0.0.2:81/a/b?c=d");
        let uri = upstream_uri(
            ep,
            &Uri::from_static("http://example.com"),
            Version::HTTP_2,
            false,
        );
        assert_eq!(uri.to_string(), "http://10.0.0.2:81/");
        let uri = upstream_uri(ep, &"/a".parse().unwrap(), Version::HTTP_2, true);
        assert_eq!(uri.to_string(), "https://10.0.0.2:81/a");
    }

    #[test]
    fn http1_upstreams_get_the_origin_form() {
        let ep: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let uri = upstream_uri(
            ep,
            &"http://example.com/a?b=c".parse().unwrap(),
            Version::HTTP_11,
            true,
        );
        assert_eq!(uri.to_string(), "/a?b=c");
        let uri = upstream_uri(
            ep,
            &Uri::from_static("http://example.com"),
            Version::HTTP_11,
            false,
        );
        assert_eq!(uri.to_string(), "/");
    }
}
