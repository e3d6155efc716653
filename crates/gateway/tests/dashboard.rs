//! The admin listener's dashboard, readiness and token: the page in a real
//! headless Chromium (no console errors, an endpoint made to fail shown open), the
//! sample stream, `/health/ready`'s dependencies, and the admin token.

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade_gateway::Handle;
use serde_json::Value;

use support::{get, serve_http1};

const TOKEN: &str = "dashboard-test-token-0123456789";
/// Longest wait for something the gateway does by itself (a sample a second).
const GUARD: Duration = Duration::from_secs(30);

/// An upstream answering every request with the status `status` holds.
async fn upstream(status: Arc<AtomicU16>) -> SocketAddr {
    serve_http1(move |_req: Request<Incoming>| {
        let status = status.load(Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::new(Bytes::from_static(b"hi")));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, std::convert::Infallible>(r)
        }
    })
    .await
}

/// A gateway with one route to cluster `c` of `eps` (round robin, a breaker that
/// opens after 2 failures in a row and stays open, no retries), and `gateway`
/// lines added to its `[gateway]` table.
async fn gateway(eps: &[SocketAddr], gateway: &str) -> Handle {
    let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n{gateway}\n\n\
         [[routes]]\nname = \"shop\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n\n\
         [clusters.c]\nendpoints = [{}]\n\
         breaker = {{ consecutive_failures = 2, failure_rate = 0.0, open = \"1h\", max_open = \"1h\" }}\n",
        eps.join(", ")
    );
    let config = palisade_gateway::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    palisade_gateway::start(config, None).await.unwrap()
}

/// GETs `path` from the admin listener with `headers`: status, headers, body.
async fn admin(gw: &Handle, path: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{}{path}", gw.admin_addr.unwrap()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::default()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Reads `/dashboard/events` until a sample satisfies `done`; that sample.
async fn sample_where(gw: &Handle, mut done: impl FnMut(&Value) -> bool) -> Value {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{}/dashboard/events", gw.admin_addr.unwrap());
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut pending = String::new();
    tokio::time::timeout(GUARD, async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.unwrap().into_data() else {
                continue;
            };
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = pending.find("\n\n") {
                let message: String = pending.drain(..end + 2).collect();
                if let Some(json) = message.strip_prefix("data: ") {
                    let sample: Value = serde_json::from_str(json.trim()).unwrap();
                    if done(&sample) {
                        return sample;
                    }
                }
            }
        }
        panic!("the stream ended")
    })
    .await
    .expect("no such sample came")
}

/// A closed port: nothing listens there.
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn endpoint(sample: &Value, addr: SocketAddr) -> &Value {
    sample["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_an_endpoint_made_to_fail_as_open_in_a_real_browser() {
    let bad_status = Arc::new(AtomicU16::new(200));
    let good = upstream(Arc::new(AtomicU16::new(200))).await;
    let bad = upstream(bad_status.clone()).await;
    let panel = panel_service().await;
    let gw = gateway(
        &[good, bad],
        &format!(
            "admin_token = \"{TOKEN}\"\n[[gateway.panels]]\nname = \"sale\"\nurls = [\"http://{panel}/p\"]"
        ),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(get(gw.addr, "/").await.status, StatusCode::OK);
    }
    let mut b = browser::Browser::launch().await;
    // The token in the address sets the page's cookie, which its own requests carry.
    b.open(&format!(
        "http://{}/dashboard?token={TOKEN}",
        gw.admin_addr.unwrap()
    ))
    .await;
    let row = format!("[data-endpoint=\"{bad}\"] .breaker");
    let wait_for_state = |state: &str| {
        format!(
            "new Promise(done => {{ const seen = () => document.querySelector('{row}')?.dataset.state === '{state}';
               const look = () => seen() ? done(true) : setTimeout(look, 50); look();
               setTimeout(() => done(seen()), 10000); }})"
        )
    };
    assert_eq!(
        b.eval(&wait_for_state("closed")).await,
        true,
        "the endpoint's row never showed closed"
    );
    let route = b
        .eval("document.querySelector('[data-route=\"shop\"] h3')?.textContent")
        .await;
    assert_eq!(route, "shop");
    // The service's panel: its table's row, then its counter's rate once read twice.
    let panel_drawn = "new Promise(done => { const seen = () =>
        document.querySelector('[data-panel=\"sale\"] td[data-column=\"item\"]')?.textContent === 'a'
        && document.querySelector('[data-panel=\"sale\"] [data-rate=\"reads\"]') !== null;
      const look = () => seen() ? done(true) : setTimeout(look, 50); look();
      setTimeout(() => done(seen()), 10000); })";
    assert_eq!(
        b.eval(panel_drawn).await,
        true,
        "the service's panel was never drawn"
    );

    // The endpoint fails: two failures in a row open its breaker.
    bad_status.store(500, Ordering::SeqCst);
    let mut failures = 0;
    while failures < 2 {
        if get(gw.addr, "/").await.status == StatusCode::INTERNAL_SERVER_ERROR {
            failures += 1;
        }
    }
    assert_eq!(support::endpoint_json(&gw, "c", bad)["breaker"], "open");
    assert_eq!(
        b.eval(&wait_for_state("open")).await,
        true,
        "the page never showed the breaker open"
    );
    let event = b
        .eval("document.querySelector('#events li[data-kind=\"breaker\"]')?.textContent")
        .await;
    assert!(event.as_str().unwrap_or("").contains("closed → open"), "{event}");

    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // For the record: target/tmp/dashboard.png.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    // Whatever came in while the page ran.
    b.eval("1").await;
    assert!(b.errors.is_empty(), "the page reported errors: {:#?}", b.errors);
    gw.shutdown().await;
}

#[tokio::test]
async fn samples_count_a_routes_answers_and_note_breaker_changes() {
    let bad_status = Arc::new(AtomicU16::new(500));
    let good = upstream(Arc::new(AtomicU16::new(200))).await;
    let bad = upstream(bad_status).await;
    let gw = gateway(&[good, bad], "").await;
    // A first sample, with both breakers closed, before any request.
    let first = sample_where(&gw, |_| true).await;
    assert_eq!(endpoint(&first, bad)["breaker"], "closed");
    // Requests until `bad` has failed twice, which opens its breaker.
    let (mut sent, mut failed) = (0, 0);
    while failed < 2 {
        assert!(sent < 1000, "the balancer never picked `bad` twice");
        sent += 1;
        if get(gw.addr, "/").await.status == StatusCode::INTERNAL_SERVER_ERROR {
            failed += 1;
        }
    }
    // The stream starts with every sample kept (all of them, this early), so the
    // answers add up to what was sent.
    let (mut answered, mut errors) = (0, 0);
    let s = sample_where(&gw, |s| {
        answered += s["routes"][0]["answered"].as_u64().unwrap();
        errors += s["routes"][0]["server_errors"].as_u64().unwrap();
        answered == sent && endpoint(s, bad)["breaker"] == "open"
    })
    .await;
    assert_eq!(errors, 2);
    assert_eq!(endpoint(&s, good)["breaker"], "closed");
    assert_eq!(s["routes"][0]["name"], "shop");
    assert_eq!(s["routes"][0]["cluster"], "c");
    assert!(
        s["routes"][0]["p99_ms"].is_f64() || s["routes"][0]["answered"] == 0,
        "{s}"
    );
    // The change was noted as an event, kept for `/dashboard/state`.
    let (_, _, state) = admin(&gw, "/dashboard/state", &[]).await;
    let state: Value = serde_json::from_str(&state).unwrap();
    let events = state["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "breaker"
            && e["endpoint"] == bad.to_string()
            && e["from"] == "closed"
            && e["to"] == "open"),
        "{state}"
    );
    assert!(state["uptime_s"].is_u64(), "{state}");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_health() {
    let up = upstream(Arc::new(AtomicU16::new(200))).await;
    let gw = gateway(&[up], &format!("admin_token = \"{TOKEN}\"")).await;
    for path in [
        "/metrics",
        "/admin/config",
        "/admin/clusters",
        "/dashboard",
        "/dashboard/state",
        "/dashboard/events",
    ] {
        let (status, headers, _) = admin(&gw, path, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer", "{path}");
        let wrong = admin(
            &gw,
            path,
            &[("authorization", "Bearer dashboard-test-token-0123456788")],
        )
        .await;
        assert_eq!(wrong.0, StatusCode::UNAUTHORIZED, "{path}");
    }
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = admin(&gw, "/admin/config", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("[redacted]") && !body.contains(TOKEN), "{body}");
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(admin(&gw, path, &[]).await.0, StatusCode::OK, "{path}");
    }
    // The page's sign-in: the right token sets the cookie, a wrong one does not.
    let (status, headers, _) = admin(&gw, &format!("/dashboard?token={TOKEN}"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let (status, headers, page) = admin(&gw, "/dashboard", &[("cookie", pair)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("/dashboard/app.js"), "{page}");
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let (status, _, _) = admin(&gw, "/dashboard?token=nope", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_short_admin_token_is_refused_by_name() {
    let text = "[gateway]\nadmin_token = \"short\"\n";
    let err = palisade_gateway::Config::from_toml(text)
        .and_then(|c| palisade_gateway::runtime::Runtime::compile(c).map(drop))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gateway.admin_token"), "{err}");
}

#[tokio::test]
async fn readiness_reports_the_version_uptime_and_each_dependency() {
    let up = upstream(Arc::new(AtomicU16::new(200))).await;
    let closed = closed_port();
    let gw = gateway(
        &[up],
        &format!(
            "\n[[routes]]\nname = \"limited\"\nmatch = {{ path = \"/limited\" }}\ncluster = \"c\"\n\
             rate_limit = {{ requests = 100, per = \"1s\", global = {{ redis = \"redis://{closed}\", timeout = \"50ms\", when_redis_down = \"fail-open\" }} }}\n"
        ),
    )
    .await;
    let (status, _, body) = admin(&gw, "/health/ready", &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64());
    assert_eq!(v["dependencies"]["cluster:c"]["state"], "up", "{v}");
    assert_eq!(v["dependencies"]["cluster:c"]["healthy_endpoints"], 1, "{v}");
    assert_eq!(v["dependencies"]["global_limit:limited"]["state"], "up", "{v}");
    // Three calls fail against the closed port: the limit's breaker opens, and
    // the gateway is degraded, not out of service.
    for _ in 0..3 {
        assert_eq!(get(gw.addr, "/limited").await.status, StatusCode::OK);
    }
    let (status, _, body) = admin(&gw, "/health/ready", &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "degraded", "{v}");
    assert_eq!(v["dependencies"]["global_limit:limited"]["state"], "down", "{v}");
    assert_eq!(v["degraded"], serde_json::json!(["global_limit:limited"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn answers_durations_are_exported_as_buckets_for_the_latency_alert() {
    let up = upstream(Arc::new(AtomicU16::new(200))).await;
    let gw = gateway(&[up], "").await;
    assert_eq!(get(gw.addr, "/").await.status, StatusCode::OK);
    let (status, _, text) = admin(&gw, "/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    for le in ["0.001", "1", "30", "+Inf"] {
        let line = format!("palisade_request_duration_seconds_bucket{{route=\"shop\",le=\"{le}\"}}");
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_lag_this_processs_data_routers_report_is_shown() {
    let up = upstream(Arc::new(AtomicU16::new(200))).await;
    let gw = gateway(&[up], "").await;
    // What palisade-data's replica set records for each replica it checks.
    metrics::gauge!("palisade_data_replica_lag_seconds", "set" => "main", "replica" => "10.0.0.5:5432")
        .set(2.5);
    let s = sample_where(&gw, |s| s["replicas"].is_array()).await;
    let r = &s["replicas"][0];
    assert_eq!(
        (r["set"].as_str(), r["replica"].as_str(), r["lag_s"].as_f64()),
        (Some("main"), Some("10.0.0.5:5432"), Some(2.5)),
        "{s}"
    );
    gw.shutdown().await;
}

/// A service's panel: each read adds 10 to its `reads` counter; a gauge and a
/// table row.
async fn panel_service() -> SocketAddr {
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    serve_http1(move |_req: Request<Incoming>| {
        let n = reads.fetch_add(10, Ordering::SeqCst) + 10;
        async move {
            let doc = serde_json::json!({
                "counters": {"reads": n},
                "gauges": {"stock": 5, "label": "not a number"},
                "rows": [{"item": "a", "stock": 5}],
            });
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(doc.to_string()))))
        }
    })
    .await
}

#[tokio::test]
async fn a_services_panel_shows_its_counters_as_rates_summed_across_instances() {
    let up = upstream(Arc::new(AtomicU16::new(200))).await;
    let (one, two) = (panel_service().await, panel_service().await);
    let closed = closed_port();
    let gw = gateway(
        &[up],
        &format!(
            "[[gateway.panels]]\nname = \"sale\"\nurls = [\"http://{one}/p\", \"http://{two}/p\", \"http://{closed}/p\"]\n\
             [[gateway.panels]]\nname = \"one\"\nurls = [\"http://{one}/p\"]\n"
        ),
    )
    .await;
    // Rates need two readings of each URL.
    let s = sample_where(&gw, |s| {
        s["panels"][0]["rates"]["reads"].is_number() && s["panels"][1]["rates"]["reads"].is_number()
    })
    .await;
    let (sale, single) = (&s["panels"][0], &s["panels"][1]);
    assert_eq!(sale["name"], "sale");
    // A URL two panels name is read once a sample; each read adds 10, so the
    // panel summing two instances counts exactly twice the one reading one.
    let rate = |p: &Value| p["rates"]["reads"].as_f64().unwrap();
    assert!(rate(single) > 0.0, "{single}");
    assert_eq!(rate(sale), 2.0 * rate(single), "{s}");
    assert_eq!(
        sale["gauges"],
        serde_json::json!({"stock": 5}),
        "only numbers are kept"
    );
    assert_eq!(sale["rows"], serde_json::json!([{"item": "a", "stock": 5}]));
    assert_eq!(
        (sale["urls"].as_u64(), sale["answered"].as_u64()),
        (Some(3), Some(2))
    );
    let errors = sale["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].as_str().unwrap().contains(&closed.to_string()),
        "{errors:?}"
    );
    gw.shutdown().await;
}

#[test]
fn a_bad_panel_is_refused_by_its_fields() {
    let text = "[gateway]\n\
        [[gateway.panels]]\nname = \"a\"\nurls = [\"ftp://x/\"]\ntimeout = \"5s\"\n\
        [[gateway.panels]]\nname = \"a\"\nurls = []\n\
        [[routes]]\nname = \"r\"\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"127.0.0.1:1\"]\n";
    let err = palisade_gateway::Config::from_toml(text)
        .and_then(|c| palisade_gateway::runtime::Runtime::compile(c).map(drop))
        .unwrap_err()
        .to_string();
    for field in [
        "gateway.panels[0].urls[0]",
        "gateway.panels[0].timeout",
        "gateway.panels[1].name",
        "gateway.panels[1].urls",
    ] {
        assert!(err.contains(field), "{field} not named in: {err}");
    }
}
