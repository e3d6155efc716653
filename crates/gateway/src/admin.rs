//! The admin listener: liveness, readiness, Prometheus metrics, the effective
//! configuration (secrets redacted), the live state of every cluster, and the
//! dashboard.
//!
//! | path | answer |
//! |---|---|
//! | `/health/live` | 200 while the process serves |
//! | `/health/ready` | the version, uptime and each dependency's state; 200 when every cluster has a healthy endpoint (or may be empty), else 503 |
//! | `/metrics` | Prometheus text |
//! | `/admin/config` | the effective configuration, JSON |
//! | `/admin/clusters` | every endpoint's health, ejection, breaker, in flight, EWMA latency |
//! | `/dashboard` | the live dashboard (its script at `/dashboard/app.js`) |
//! | `/dashboard/events` | the dashboard's samples, as Server-Sent Events |
//! | `/dashboard/state` | the latest sample and the events kept, JSON |
//!
//! With `gateway.admin_token` set, every path but `/health/*` wants the token, as
//! `Authorization: Bearer <token>` or as the cookie `/dashboard?token=<token>`
//! sets for the page's own requests.

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::dashboard::Dashboard;
use crate::runtime::Runtime;
use crate::upstream::Upstream;
use crate::{Body, full};

/// The cookie that carries the admin token for the dashboard's page.
const TOKEN_COOKIE: &str = "palisade_admin";

/// What the admin listener serves besides the runtime: the metrics recorder's
/// handle and the dashboard.
#[derive(Debug, Default)]
pub struct Admin {
    /// The Prometheus recorder, when one is installed.
    pub metrics: Option<PrometheusHandle>,
    /// The dashboard's samples.
    pub dashboard: std::sync::Arc<Dashboard>,
}

/// Answers one admin request.
pub fn handle<B>(rt: &Runtime, admin: &Admin, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "only GET"}),
        );
    }
    let path = req.uri().path();
    if !path.starts_with("/health/")
        && let Some(token) = rt.config.gateway.admin_token.as_deref()
        && let Some(refused) = refusal(req, token)
    {
        return refused;
    }
    match path {
        "/health/live" => json(StatusCode::OK, &serde_json::json!({"status": "live"})),
        "/health/ready" => ready(rt, admin.dashboard.uptime()),
        "/metrics" => match &admin.metrics {
            Some(h) => with_type(full(h.render()), "text/plain; version=0.0.4"),
            None => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "no metrics recorder installed"}),
            ),
        },
        "/admin/config" => {
            let mut v = serde_json::to_value(&rt.config).unwrap_or_default();
            redact(&mut v);
            json(StatusCode::OK, &v)
        }
        "/admin/clusters" => json(StatusCode::OK, &clusters_json(rt)),
        "/dashboard" | "/dashboard/" => page(crate::dashboard::PAGE, "text/html; charset=utf-8"),
        "/dashboard/app.js" => page(crate::dashboard::SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/events" => {
            let events = admin
                .dashboard
                .subscribe()
                .map_err(|never| match never {})
                .boxed();
            let mut r = with_type(events, "text/event-stream");
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            r
        }
        "/dashboard/state" => json(StatusCode::OK, &admin.dashboard.state()),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such admin path"}),
        ),
    }
}

/// `None` when `req` carries `token`; else the answer: `401`, or for
/// `/dashboard?token=` with the right token a redirect that sets the page's cookie.
fn refusal<B>(req: &Request<B>, token: &str) -> Option<Response<Body>> {
    let bearer = (req.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = (req.headers().get_all(header::COOKIE).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
        .any(|t| same(t, token));
    if cookie || bearer.is_some_and(|b| same(b, token)) {
        return None;
    }
    let given = (req.uri().query().unwrap_or_default().split('&')).find_map(|kv| kv.strip_prefix("token="));
    if req.uri().path() == "/dashboard" && given.is_some_and(|t| same(t, token)) {
        let mut r = Response::new(crate::empty());
        *r.status_mut() = StatusCode::SEE_OTHER;
        let set = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        r.headers_mut()
            .insert(header::LOCATION, header::HeaderValue::from_static("/dashboard"));
        if let Ok(v) = header::HeaderValue::from_str(&set) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return Some(r);
    }
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "the admin listener wants its token (gateway.admin_token)"}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

/// `a == b`, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// `/health/ready`: the version, uptime and each dependency's state. Only a
/// cluster without a healthy endpoint makes the gateway not ready; a store that
/// is down degrades the routes using it as their options say, so it is reported
/// (`degraded`) but keeps the gateway in service.
fn ready(rt: &Runtime, uptime_s: u64) -> Response<Body> {
    let deps = dependencies(rt);
    let not_ready: Vec<&str> = rt
        .clusters
        .values()
        .filter(|u| !u.allow_empty && !u.cluster.has_healthy_endpoint())
        .map(|u| u.name.as_str())
        .collect();
    let degraded: Vec<String> = (deps.iter())
        .filter(|(_, state, _)| *state != DepState::Up)
        .map(|(n, _, _)| n.clone())
        .collect();
    let status = if !not_ready.is_empty() {
        "not ready"
    } else if degraded.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    let body = serde_json::json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": uptime_s,
        "clusters_without_healthy_endpoint": not_ready,
        "degraded": degraded,
        "dependencies": (deps.into_iter())
            .map(|(name, state, mut v)| {
                v["state"] = serde_json::Value::from(state.as_str());
                (name, v)
            })
            .collect::<serde_json::Map<_, _>>(),
    });
    let code = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &body)
}

/// A dependency's state in `/health/ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DepState {
    /// Answering.
    Up,
    /// Not answering (its breaker open, or no healthy endpoint).
    Down,
    /// Not connected yet (its background connection retrying).
    Connecting,
    /// Its breaker half-open: being tried again.
    Recovering,
}

impl DepState {
    fn as_str(self) -> &'static str {
        match self {
            DepState::Up => "up",
            DepState::Down => "down",
            DepState::Connecting => "connecting",
            DepState::Recovering => "recovering",
        }
    }

    fn of_breaker(s: palisade_resilience::breaker::State) -> DepState {
        use palisade_resilience::breaker::State;
        match s {
            State::Closed | State::Disabled => DepState::Up,
            State::HalfOpen => DepState::Recovering,
            State::Open | State::ForcedOpen => DepState::Down,
        }
    }

    fn connected(yes: bool) -> DepState {
        if yes { DepState::Up } else { DepState::Connecting }
    }
}

/// Each dependency by name (`cluster:<name>`, `queue`, `idempotency`, `cache`,
/// `global_limit:<route>`, `jwt:<issuer>`): its state, and what else it reports.
fn dependencies(rt: &Runtime) -> Vec<(String, DepState, serde_json::Value)> {
    let none = || serde_json::json!({});
    let mut deps = Vec::new();
    for (name, up) in &rt.clusters {
        let eps = up.cluster.endpoints();
        let healthy = eps.iter().filter(|e| e.is_healthy()).count();
        let serving = up.cluster.has_healthy_endpoint() || (up.allow_empty && eps.is_empty());
        let state = if serving { DepState::Up } else { DepState::Down };
        let counts = serde_json::json!({"healthy_endpoints": healthy, "endpoints": eps.len()});
        deps.push((format!("cluster:{name}"), state, counts));
    }
    let g = &rt.config.gateway;
    if g.queue.is_some() {
        deps.push((
            "queue".into(),
            DepState::connected(rt.queue.get().is_some()),
            none(),
        ));
    }
    if g.idempotency.is_some() {
        let state = DepState::connected(rt.idempotency.get().is_some());
        deps.push(("idempotency".into(), state, none()));
    }
    if let Some(b) = rt.responses.as_ref().and_then(|r| r.cache.redis_breaker()) {
        deps.push(("cache".into(), DepState::of_breaker(b.state()), none()));
    }
    for r in &rt.routes {
        if let Some(l) = &r.global_limit {
            let state = DepState::of_breaker(l.breaker().state());
            deps.push((format!("global_limit:{}", r.name), state, none()));
        }
    }
    for (name, p) in &rt.providers {
        deps.push((format!("jwt:{name}"), DepState::connected(p.has_keys()), none()));
    }
    deps.sort_by(|a, b| a.0.cmp(&b.0));
    deps
}

/// The live state of every cluster.
pub fn clusters_json(rt: &Runtime) -> serde_json::Value {
    let out: serde_json::Map<String, serde_json::Value> = (rt.clusters.iter())
        .map(|(name, up)| (name.clone(), cluster_json(up)))
        .collect();
    serde_json::Value::Object(out)
}

/// The live state of one cluster.
pub fn cluster_json(up: &Upstream) -> serde_json::Value {
    let now = up.cluster.clock().now();
    let events = *up.events.borrow();
    let eps: Vec<_> = up
        .cluster
        .endpoints()
        .iter()
        .map(|e| endpoint_json(e, now))
        .collect();
    serde_json::json!({
        "active_tier": up.cluster.active_tier(),
        "panic": up.cluster.is_panicking(),
        "in_flight": up.bulkhead.as_ref().map(|b| b.in_flight()),
        "max_concurrent": up.bulkhead.as_ref().map(|b| b.config().max_concurrent),
        "adaptive_limit": up.shed.as_ref().map(|s| s.limit.limit()),
        "adaptive_in_flight": up.shed.as_ref().map(|s| s.limit.in_flight()),
        "probe_rounds": events.probe_rounds,
        "endpoint_sets": events.endpoint_sets,
        "refresh_failures": events.refresh_failures,
        "endpoints": eps,
    })
}

/// A JSON view of one endpoint.
fn endpoint_json(
    ep: &palisade_balance::EndpointState,
    now: palisade_resilience::Instant,
) -> serde_json::Value {
    let (requests, failures) = ep.totals();
    serde_json::json!({
        "address": ep.addr().to_string(),
        "weight": ep.info().weight,
        "tier": ep.info().tier,
        "healthy": ep.is_healthy(),
        "ejected": ep.is_ejected(now),
        "ejections": ep.ejections(),
        "breaker": ep.breaker_state().as_str(),
        "available": ep.is_available(now),
        "in_flight": ep.in_flight(),
        "ewma_ms": ep.latency().as_secs_f64() * 1e3,
        "requests": requests,
        "failures": failures,
    })
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = with_type(full(v.to_string()), "application/json");
    *r.status_mut() = status;
    r
}

fn with_type(body: Body, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// One of the dashboard's files, which may not be framed or load others' code.
fn page(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = with_type(full(text), content_type);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// Whether a header's value is a credential: `authorization`, `proxy-authorization`,
/// `cookie`, `set-cookie`, and any name with `auth`, `token`, `secret`, `key`,
/// `session`, `password` or `signature` in it (`x-api-key`, `x-auth-token`).
pub fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "cookie",
        "auth",
        "token",
        "secret",
        "key",
        "session",
        "password",
        "signature",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Redacts the configuration's secrets for `/admin/config`: the value of any key
/// that names a secret (`secret`, `password`, `token`, `key_file`, `private`), the
/// values of route header matches on credential headers
/// ([`is_credential_header`]), and fallback bodies (an operator may put anything
/// in one; its length is shown).
fn redact(v: &mut serde_json::Value) {
    const REDACTED: &str = "[redacted]";
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let k = k.to_ascii_lowercase();
                if ["secret", "password", "token", "key_file", "private"]
                    .iter()
                    .any(|s| k.contains(s))
                {
                    *val = serde_json::Value::String(REDACTED.into());
                } else if k == "headers"
                    && let Some(headers) = val.as_object_mut()
                {
                    for (name, value) in headers.iter_mut() {
                        if is_credential_header(name) {
                            *value = serde_json::Value::String(REDACTED.into());
                        }
                    }
                } else if k == "fallback"
                    && let Some(body) = val.get_mut("body")
                {
                    let len = body.as_str().map_or(0, str::len);
                    *body = serde_json::Value::String(format!("[redacted: {len} bytes]"));
                } else {
                    redact(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}
