//! A cluster's endpoints as the running gateway keeps them, against real sockets:
//! active HTTP and TCP health probes, the endpoints file re-read, host names
//! re-resolved, outlier ejection, failover between tiers, and `/admin/clusters`.
//!
//! No sleeps: a test waits for what it needs to have happened, a probe round
//! completed or an endpoint set installed (the cluster's `events` watch), or a
//! request answered; a guard fails a test that would hang.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade_gateway::upstream::UpstreamEvents;

mod support;
use palisade_gateway::{Config, Handle};

/// Fails a test that has not seen its event in a generous time, instead of hanging.
const GUARD: Duration = Duration::from_secs(30);

/// An HTTP/1.1 upstream: `/health` answers `health`, anything else `status`.
/// Counts both.
struct Upstream {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
    /// Answers carry `x-overloaded: 1` while set.
    overloaded: Arc<AtomicBool>,
    probes: Arc<AtomicU32>,
    hits: Arc<AtomicU32>,
}

impl Upstream {
    async fn start() -> Upstream {
        let (health, status) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicU16::new(200)));
        let (probes, hits) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let overloaded = Arc::new(AtomicBool::new(false));
        let (h, st, p, n) = (health.clone(), status.clone(), probes.clone(), hits.clone());
        let o = overloaded.clone();
        let addr = support::serve_http1(move |req: Request<Incoming>| {
            let (h, st, p, n, o) = (h.clone(), st.clone(), p.clone(), n.clone(), o.clone());
            async move {
                let status = if req.uri().path() == "/health" {
                    p.fetch_add(1, Ordering::SeqCst);
                    h.load(Ordering::SeqCst)
                } else {
                    n.fetch_add(1, Ordering::SeqCst);
                    st.load(Ordering::SeqCst)
                };
                let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                if o.load(Ordering::SeqCst) {
                    r.headers_mut()
                        .insert("x-overloaded", http::HeaderValue::from_static("1"));
                }
                Ok::<_, std::convert::Infallible>(r)
            }
        })
        .await;
        Upstream {
            addr,
            health,
            status,
            overloaded,
            probes,
            hits,
        }
    }

    fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A gateway with one route `r` (with `route` added) to round-robin cluster `c`
/// (with `cluster` added).
async fn start_with(route: &str, cluster: &str) -> Handle {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\n[[routes]]\nname = \"r\"\ncluster = \"c\"\n{route}\n\n[clusters.c]\nlb = \"round-robin\"\n{cluster}"
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

async fn start(cluster: &str) -> Handle {
    start_with("", cluster).await
}

/// GETs `path` and returns the status and body.
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the cluster's events satisfy `done`.
async fn wait_for(gw: &Handle, done: impl FnMut(&UpstreamEvents) -> bool) -> UpstreamEvents {
    let mut events = gw.runtime().clusters["c"].events.subscribe();
    let seen = tokio::time::timeout(GUARD, events.wait_for(done))
        .await
        .expect("the cluster's event did not come")
        .expect("the cluster was dropped");
    *seen
}

/// Waits for `n` more probe rounds than have completed now.
async fn probe_rounds(gw: &Handle, n: u64) {
    let now = gw.runtime().clusters["c"].events.borrow().probe_rounds;
    wait_for(gw, |e| e.probe_rounds >= now + n).await;
}

fn endpoint(gw: &Handle, addr: SocketAddr) -> serde_json::Value {
    support::endpoint_json(gw, "c", addr)
}

/// Sends `n` GETs and returns how many each of `ups` answered.
async fn spread(gw: &Handle, n: usize, ups: &[&Upstream]) -> Vec<u32> {
    let before: Vec<u32> = ups.iter().map(|u| u.hits()).collect();
    for _ in 0..n {
        let (status, _) = get(gw.addr, "/").await;
        assert_eq!(status, StatusCode::OK);
    }
    ups.iter().zip(before).map(|(u, b)| u.hits() - b).collect()
}

fn endpoints(ups: &[&Upstream]) -> String {
    let eps: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!("endpoints = [{}]\n", eps.join(", "))
}

#[tokio::test]
async fn http_probes_take_a_failing_endpoint_out_and_bring_it_back() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    a.health.store(503, Ordering::SeqCst);
    let gw = start(&format!(
        "{}health = {{ path = \"/health\", interval = \"10ms\", timeout = \"5s\", healthy_threshold = 1, unhealthy_threshold = 2 }}",
        endpoints(&[&a, &b])
    ))
    .await;
    probe_rounds(&gw, 2).await;
    assert_eq!(endpoint(&gw, a.addr)["healthy"], false);
    assert_eq!(endpoint(&gw, b.addr)["healthy"], true);
    assert!(a.probes.load(Ordering::SeqCst) >= 2);
    assert_eq!(spread(&gw, 6, &[&a, &b]).await, [0, 6]);

    a.health.store(200, Ordering::SeqCst);
    // The round under way may have probed `a` before the change; the next one did not.
    probe_rounds(&gw, 2).await;
    assert_eq!(endpoint(&gw, a.addr)["healthy"], true);
    assert_eq!(spread(&gw, 6, &[&a, &b]).await, [3, 3]);
    gw.shutdown().await;
}

#[tokio::test]
async fn tcp_probes_take_a_closed_port_out_and_readiness_follows() {
    let live = Upstream::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = start(&format!(
        "endpoints = [\"{closed}\", \"{}\"]\nhealth = {{ kind = \"tcp\", interval = \"10ms\", timeout = \"5s\", unhealthy_threshold = 1 }}",
        live.addr
    ))
    .await;
    probe_rounds(&gw, 1).await;
    assert_eq!(endpoint(&gw, closed)["healthy"], false);
    assert_eq!(endpoint(&gw, live.addr)["healthy"], true);
    assert_eq!(spread(&gw, 4, &[&live]).await, [4]);
    // No request was for `/health`: a TCP probe only connects.
    assert_eq!(live.probes.load(Ordering::SeqCst), 0);
    let admin = gw.admin_addr.unwrap();
    assert_eq!(get(admin, "/health/ready").await.0, StatusCode::OK);
    gw.shutdown().await;

    // With no endpoint left, the gateway says it is not ready.
    let gw = start(&format!(
        "endpoints = [\"{closed}\"]\nhealth = {{ kind = \"tcp\", interval = \"10ms\", timeout = \"5s\", unhealthy_threshold = 1 }}"
    ))
    .await;
    probe_rounds(&gw, 1).await;
    let admin = gw.admin_addr.unwrap();
    assert_eq!(
        get(admin, "/health/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_endpoints_file_edit_replaces_the_set_and_a_bad_edit_keeps_the_last() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let dir = std::env::temp_dir().join(format!("palisade-clusters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints");
    std::fs::write(&file, format!("# the api\n{}\n", a.addr)).unwrap();
    let gw = start(&format!("endpoints_file = \"{}\"", file.display())).await;
    assert_eq!(spread(&gw, 2, &[&a, &b]).await, [2, 0]);

    std::fs::write(&file, format!("{} 1 0\n", b.addr)).unwrap();
    wait_for(&gw, |e| e.endpoint_sets >= 1).await;
    assert_eq!(spread(&gw, 2, &[&a, &b]).await, [0, 2]);

    std::fs::write(&file, "not an address\n").unwrap();
    wait_for(&gw, |e| e.refresh_failures >= 1).await;
    assert_eq!(spread(&gw, 2, &[&a, &b]).await, [0, 2]);
    gw.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn host_names_are_re_resolved_and_an_endpoint_that_stays_keeps_its_state() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    // `localhost` may also resolve to ::1, where nothing listens: a connect
    // failure there is retried on the other address.
    let gw = start_with(
        "retry = { attempts = 2, retry_on = [\"connect-failure\"] }",
        &format!("endpoints = [\"localhost:{port}\"]\ndns_refresh = \"10ms\""),
    )
    .await;
    let mine = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..3 {
        get(gw.addr, "/").await;
    }
    let before = endpoint(&gw, mine)["requests"].as_u64().unwrap();
    assert!(before >= 1, "{before}");
    wait_for(&gw, |e| e.endpoint_sets >= 2).await;
    // The same address after two re-resolutions: the same endpoint, its counts kept.
    assert!(endpoint(&gw, mine)["requests"].as_u64().unwrap() >= before);
    assert_eq!(get(gw.addr, "/").await.0, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_answering_5xx() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    a.status.store(500, Ordering::SeqCst);
    let gw = start(&format!(
        "{}outlier = {{ consecutive_5xx = 2, base_ejection_time = \"1h\", max_ejection_time = \"1h\", max_ejection_percent = 50 }}",
        endpoints(&[&a, &b])
    ))
    .await;
    // Round robin: the first four requests give `a` its two 500s.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(gw.addr, "/").await.0.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 500, 500]);
    let a_state = endpoint(&gw, a.addr);
    assert_eq!(a_state["ejected"], true, "{a_state}");
    assert_eq!(a_state["ejections"], 1);
    assert_eq!(spread(&gw, 6, &[&a, &b]).await, [0, 6]);
    gw.shutdown().await;
}

#[tokio::test]
async fn traffic_fails_over_to_the_next_tier_when_the_first_has_no_endpoint_left() {
    let (primary, backup) = (Upstream::start().await, Upstream::start().await);
    let gw = start(&format!(
        "endpoints = [{{ address = \"{}\", tier = 0 }}, {{ address = \"{}\", tier = 1 }}]\noutlier = {{ consecutive_5xx = 1, base_ejection_time = \"1h\", max_ejection_time = \"1h\", max_ejection_percent = 100 }}",
        primary.addr, backup.addr
    ))
    .await;
    assert_eq!(spread(&gw, 3, &[&primary, &backup]).await, [3, 0]);
    let clusters = palisade_gateway::admin::clusters_json(&gw.runtime());
    assert_eq!(clusters["c"]["active_tier"], 0);

    primary.status.store(503, Ordering::SeqCst);
    assert_eq!(get(gw.addr, "/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(spread(&gw, 3, &[&primary, &backup]).await, [0, 3]);
    let clusters = palisade_gateway::admin::clusters_json(&gw.runtime());
    assert_eq!(clusters["c"]["active_tier"], 1, "{clusters}");
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_clusters_shows_each_endpoint_and_the_clusters_tasks() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let gw = start(&format!(
        "{}max_concurrent = 8\nbreaker = {{ consecutive_failures = 3 }}\nhealth = {{ interval = \"10ms\", timeout = \"5s\" }}",
        endpoints(&[&a, &b])
    ))
    .await;
    assert_eq!(spread(&gw, 4, &[&a, &b]).await, [2, 2]);
    probe_rounds(&gw, 1).await;
    let (status, body) = get(gw.admin_addr.unwrap(), "/admin/clusters").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = &v["c"];
    assert_eq!(c["max_concurrent"], 8);
    assert_eq!(c["in_flight"], 0);
    assert!(c["probe_rounds"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["endpoint_sets"], 0);
    let eps = c["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    for (ep, up) in eps.iter().zip([&a, &b]) {
        assert_eq!(ep["address"], up.addr.to_string(), "{c}");
        assert_eq!(ep["requests"], 2, "{ep}");
        assert_eq!(ep["failures"], 0, "{ep}");
        assert_eq!(ep["breaker"], "closed", "{ep}");
        assert_eq!(ep["healthy"], true, "{ep}");
        assert_eq!(ep["in_flight"], 0, "{ep}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn chosen_4xx_statuses_count_against_the_endpoints_breaker() {
    let breaker =
        "breaker = { consecutive_failures = 2, failure_rate = 0.0, open = \"1h\", max_open = \"1h\" }";
    for (extra, opens) in [("", false), ("failure_statuses = [409]", true)] {
        let up = Upstream::start().await;
        up.status.store(409, Ordering::SeqCst);
        let gw = start(&format!("{}{breaker}\n{extra}", endpoints(&[&up]))).await;
        for _ in 0..2 {
            assert_eq!(
                get(gw.addr, "/").await.0,
                StatusCode::CONFLICT,
                "passed on as it is"
            );
        }
        let state = endpoint(&gw, up.addr);
        let expected = if opens { "open" } else { "closed" };
        assert_eq!(state["breaker"], expected, "{extra:?}: {state}");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn an_upstreams_own_overload_header_makes_its_answers_failures_for_outlier_detection() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    a.overloaded.store(true, Ordering::SeqCst);
    let gw = start(&format!(
        "{}failure_headers = [\"x-overloaded\"]\noutlier = {{ consecutive_5xx = 2, base_ejection_time = \"1h\", max_ejection_time = \"1h\", max_ejection_percent = 50 }}",
        endpoints(&[&a, &b])
    ))
    .await;
    // Round robin: four requests give `a` two 200s that carry the header.
    assert_eq!(spread(&gw, 4, &[&a, &b]).await, [2, 2]);
    assert_eq!(endpoint(&gw, a.addr)["ejected"], true);
    assert_eq!(endpoint(&gw, b.addr)["ejected"], false);
    assert_eq!(spread(&gw, 4, &[&a, &b]).await, [0, 4]);
    gw.shutdown().await;
}
