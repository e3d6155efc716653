//! The admin listener: liveness, readiness, Prometheus metrics, the effective
//! configuration (secrets redacted) and the live state of every cluster.
//!
//! | path | answer |
//! |---|---|
//! | `/health/live` | 200 while the process serves |
//! | `/health/ready` | 200 when every cluster has a healthy endpoint (or may be empty), else 503 with the clusters that are not |
//! | `/metrics` | Prometheus text |
//! | `/admin/config` | the effective configuration, JSON |
//! | `/admin/clusters` | every endpoint's health, ejection, breaker, in flight, EWMA latency |

use http::{Method, Request, Response, StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::runtime::Runtime;
use crate::{Body, full};

/// Answers one admin request.
pub fn handle<B>(rt: &Runtime, metrics: Option<&PrometheusHandle>, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "only GET"}),
        );
    }
    match req.uri().path() {
        "/health/live" => json(StatusCode::OK, &serde_json::json!({"status": "live"})),
        "/health/ready" => {
            let not_ready: Vec<&str> = rt
                .clusters
                .values()
                .filter(|u| !u.allow_empty && !u.cluster.has_healthy_endpoint())
                .map(|u| u.name.as_str())
                .collect();
            if not_ready.is_empty() {
                json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "not ready", "clusters_without_healthy_endpoint": not_ready}),
                )
            }
        }
        "/metrics" => match metrics {
            Some(h) => {
                let mut r = Response::new(full(h.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
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
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such admin path"}),
        ),
    }
}

/// The live state of every cluster.
pub fn clusters_json(rt: &Runtime) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, up) in &rt.clusters {
        let now = up.cluster.clock().now();
        let events = *up.events.borrow();
        let eps: Vec<_> = up
            .cluster
            .endpoints()
            .iter()
            .map(|e| endpoint_json(e, now))
            .collect();
        out.insert(
            name.clone(),
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
            }),
        );
    }
    serde_json::Value::Object(out)
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
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
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
