//! The gateway's answers to load, against real sockets: tiered load shedding on a
//! cluster's adaptive concurrency limit, and hedged requests. Upstreams hold
//! requests until the test releases them; the tests wait for the upstream to have
//! seen a request, never for time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade_gateway::{Config, Handle};
use tokio::sync::{Notify, Semaphore};

mod support;

use support::{get, send};

/// An upstream that holds requests whose path ends in `/hold` until released and
/// answers the others at once, naming itself.
struct Holding {
    held: AtomicU32,
    arrived: Notify,
    release: Semaphore,
}

impl Holding {
    fn new() -> Arc<Holding> {
        Arc::new(Holding {
            held: AtomicU32::new(0),
            arrived: Notify::new(),
            release: Semaphore::new(0),
        })
    }

    /// Serves on a fresh port; requests held while `hold(path)` says so.
    async fn serve(self: &Arc<Self>, hold: impl Fn(&str) -> bool + Send + Sync + 'static) -> SocketAddr {
        let (h, hold) = (self.clone(), Arc::new(hold));
        let me = Arc::new(std::sync::OnceLock::<SocketAddr>::new());
        let name = me.clone();
        let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
            let (h, name) = (h.clone(), name.clone());
            let held = hold(req.uri().path());
            async move {
                if held {
                    h.held.fetch_add(1, Ordering::SeqCst);
                    h.arrived.notify_waiters();
                    h.release.acquire().await.unwrap().forget();
                }
                let body = format!("from {}", name.get().unwrap());
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        })
        .await;
        me.set(addr).unwrap();
        addr
    }

    /// Waits until `n` requests are held.
    async fn until_held(&self, n: u32) {
        loop {
            let arrived = self.arrived.notified();
            if self.held.load(Ordering::SeqCst) >= n {
                return;
            }
            arrived.await;
        }
    }
}

async fn start(text: &str) -> Handle {
    let text =
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n{text}");
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

/// Four routes of four priorities on one cluster whose adaptive limit is pinned
/// at 10 (it never moves: its window is an hour).
fn tiered(up: SocketAddr) -> String {
    format!(
        r#"
[[routes]]
name = "checkout"
match = {{ path_prefix = "/checkout" }}
cluster = "c"
shed = {{ priority = "critical" }}

[[routes]]
name = "browse"
match = {{ path_prefix = "/browse" }}
cluster = "c"
fallback = {{ status = 200, body = "cached", on = ["shed"] }}

[[routes]]
name = "search"
match = {{ path_prefix = "/search" }}
cluster = "c"
shed = {{ header = "x-priority" }}

[[routes]]
name = "analytics"
match = {{ path_prefix = "/analytics" }}
cluster = "c"
shed = {{ priority = "sheddable" }}

[clusters.c]
endpoints = ["{up}"]
adaptive_concurrency = {{ initial = 10, min = 10, max = 10, window = "1h", min_samples = 1000 }}
"#
    )
}

/// What each tier gets now: (status, cause or fallback) for analytics, search,
/// browse, checkout.
async fn tiers_now(gw: SocketAddr) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for path in ["/analytics", "/search", "/browse", "/checkout"] {
        let a = get(gw, path).await;
        let why = match a.headers.get("x-palisade-fallback") {
            Some(f) => format!("fallback:{}", f.to_str().unwrap()),
            None => a.cause().to_string(),
        };
        out.push((a.status.as_u16(), why));
    }
    out
}

#[tokio::test]
async fn under_overload_the_lowest_tier_is_refused_first_and_checkout_is_served_longest() {
    let up = Holding::new();
    let addr = up.serve(|p| p.ends_with("/hold")).await;
    let gw = start(&tiered(addr)).await;
    let ok = (200, String::new());
    let shed = (503, "shed".to_string());
    let degraded = (200, "fallback:shed".to_string());
    assert_eq!(
        tiers_now(gw.addr).await,
        [ok.clone(), ok.clone(), ok.clone(), ok.clone()]
    );

    // Checkout requests the slow upstream holds: the load is what they occupy of
    // the limit of 10.
    let mut held = Vec::new();
    let mut hold = |n: u32| {
        for _ in 0..n {
            held.push(tokio::spawn(get(gw.addr, "/checkout/hold")));
        }
    };
    hold(6);
    up.until_held(6).await;
    assert_eq!(
        tiers_now(gw.addr).await,
        [shed.clone(), ok.clone(), ok.clone(), ok.clone()],
        "at 60%: sheddable refused"
    );
    hold(2);
    up.until_held(8).await;
    assert_eq!(
        tiers_now(gw.addr).await,
        [shed.clone(), ok.clone(), degraded.clone(), ok.clone()],
        "at 80%: normal served degraded where the route has a fallback, in full where not"
    );
    hold(1);
    up.until_held(9).await;
    assert_eq!(
        tiers_now(gw.addr).await,
        [shed.clone(), shed.clone(), degraded.clone(), ok.clone()],
        "at 90%: critical only"
    );
    hold(1);
    up.until_held(10).await;
    assert_eq!(
        tiers_now(gw.addr).await,
        [shed.clone(), shed.clone(), degraded, shed.clone()],
        "at the limit: nothing more is sent"
    );
    let refused = get(gw.addr, "/search").await;
    assert!(refused.body.contains("\"error\":\"shed\""), "{}", refused.body);

    up.release.add_permits(100);
    for h in held {
        assert_eq!(
            h.await.unwrap().status,
            StatusCode::OK,
            "the held requests finish"
        );
    }
    assert_eq!(tiers_now(gw.addr).await, [ok.clone(), ok.clone(), ok.clone(), ok]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_priority_header_lowers_a_request_but_never_raises_it_past_its_route() {
    let up = Holding::new();
    let addr = up.serve(|p| p.ends_with("/hold")).await;
    let gw = start(&tiered(addr)).await;
    let held: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get(gw.addr, "/checkout/hold")))
        .collect();
    up.until_held(6).await;
    let with = |p: &str| {
        Request::get("/search")
            .header("x-priority", p)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(
        send(gw.addr, with("sheddable")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(gw.addr, with("normal")).await.status, StatusCode::OK);
    up.release.add_permits(6);
    for h in held {
        h.await.unwrap();
    }
    // Untrusted: `critical` from the client is the route's `normal`.
    let held: Vec<_> = (0..9)
        .map(|_| tokio::spawn(get(gw.addr, "/checkout/hold")))
        .collect();
    up.until_held(6 + 9).await;
    assert_eq!(
        send(gw.addr, with("critical")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    up.release.add_permits(100);
    for h in held {
        h.await.unwrap();
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_adaptive_limit_falls_when_the_cluster_times_out() {
    let up = Holding::new();
    let addr = up.serve(|_| true).await;
    let gw = start(&format!(
        "[[routes]]\nname = \"r\"\ncluster = \"c\"\ntimeout = \"20ms\"\n\
         [clusters.c]\nendpoints = [\"{addr}\"]\n\
         adaptive_concurrency = {{ algorithm = \"aimd\", initial = 10, min = 2, window = \"1ms\", min_samples = 1 }}\n"
    ))
    .await;
    let limit = || palisade_gateway::admin::clusters_json(&gw.runtime())["c"]["adaptive_limit"].as_u64();
    assert_eq!(limit(), Some(10));
    for _ in 0..5 {
        let a = get(gw.addr, "/").await;
        assert_eq!((a.status, a.cause()), (StatusCode::GATEWAY_TIMEOUT, "timeout"));
    }
    let fallen = limit().unwrap();
    assert!(
        (2..10).contains(&fallen),
        "timeouts are drops; the limit is {fallen}"
    );
    up.release.add_permits(100);
    gw.shutdown().await;
}

/// A cluster of two endpoints of which the first request to arrive at either
/// stalls (until released) and every later one is answered at once.
async fn one_stall_of_two(up: &Arc<Holding>) -> [SocketAddr; 2] {
    let stalls = Arc::new(AtomicU32::new(1));
    let once = move || {
        let stalls = stalls.clone();
        move |_: &str| {
            stalls
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
    };
    [up.serve(once()).await, up.serve(once()).await]
}

fn hedged(eps: [SocketAddr; 2], retry: &str) -> String {
    format!(
        "[[routes]]\nname = \"r\"\ncluster = \"c\"\nper_try_timeout = \"500ms\"\n\
         retry = {{ {retry} }}\nhedge = {{ delay = \"20ms\" }}\n\
         [clusters.c]\nendpoints = [\"{}\", \"{}\"]\n",
        eps[0], eps[1]
    )
}

#[tokio::test]
async fn a_slow_attempt_is_hedged_to_the_other_endpoint_whose_answer_wins() {
    let up = Holding::new();
    let eps = one_stall_of_two(&up).await;
    let gw = start(&hedged(eps, "attempts = 1")).await;
    let a = get(gw.addr, "/").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.held.load(Ordering::SeqCst), 1, "the first attempt stalled");
    let stalled = eps.iter().find(|e| !a.body.ends_with(&e.to_string())).unwrap();
    // The loser was cancelled: its endpoint has nothing in flight.
    let json = support::endpoint_json(&gw, "c", *stalled);
    assert_eq!(json["in_flight"], 0, "{json}");
    up.release.add_permits(100);
    gw.shutdown().await;
}

#[tokio::test]
async fn hedges_spend_the_retry_budget_and_without_it_the_slow_attempt_runs_on() {
    let up = Holding::new();
    let eps = one_stall_of_two(&up).await;
    let gw = start(&hedged(
        eps,
        "attempts = 1, budget_ratio = 0.0, budget_min_per_second = 0",
    ))
    .await;
    let a = get(gw.addr, "/").await;
    assert_eq!(
        (a.status, a.cause()),
        (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        "{}",
        a.body
    );
    up.release.add_permits(100);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_post_is_not_hedged_unless_the_route_retries_posts() {
    let up = Holding::new();
    let eps = one_stall_of_two(&up).await;
    let gw = start(&hedged(eps, "attempts = 1")).await;
    let post = Request::post("/").body(Full::from("order")).unwrap();
    let a = send(gw.addr, post).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "sent once, timed out");
    up.release.add_permits(100);
    gw.shutdown().await;

    let up = Holding::new();
    let eps = one_stall_of_two(&up).await;
    let gw = start(&hedged(eps, "attempts = 1, non_idempotent = true")).await;
    let post = Request::post("/").body(Full::from("order")).unwrap();
    assert_eq!(send(gw.addr, post).await.status, StatusCode::OK);
    up.release.add_permits(100);
    gw.shutdown().await;
}
