//! Canary splits and mirroring against real sockets: upstreams that count what
//! reaches them (and a shadow that can hang), behind gateways with `split` and
//! `mirror`, reloaded while requests run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use palisade_gateway::{Config, Handle};

mod support;

use support::send;

/// An upstream answering its name, counting requests and keeping their bodies;
/// with `hold`, each request waits for a permit first.
struct Counting {
    seen: AtomicU32,
    bodies: Mutex<Vec<(String, Option<String>)>>,
    hold: Option<tokio::sync::Semaphore>,
}

async fn counting(name: &'static str, hold: bool) -> (Arc<Counting>, SocketAddr) {
    let c = Arc::new(Counting {
        seen: AtomicU32::new(0),
        bodies: Mutex::default(),
        hold: hold.then(|| tokio::sync::Semaphore::new(0)),
    });
    let state = c.clone();
    let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
        let c = state.clone();
        async move {
            c.seen.fetch_add(1, Ordering::SeqCst);
            let mark = req
                .headers()
                .get("x-palisade-mirror")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = req.into_body().collect().await?.to_bytes();
            c.bodies
                .lock()
                .unwrap()
                .push((String::from_utf8_lossy(&body).into_owned(), mark));
            if let Some(hold) = &c.hold {
                hold.acquire().await.unwrap().forget();
            }
            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(name.as_bytes()))))
        }
    })
    .await;
    (c, addr)
}

fn config(v1: SocketAddr, v2: SocketAddr, route_lines: &str) -> Config {
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false

[[routes]]
name = "api"
match = {{ path_prefix = "/" }}
cluster = "v1"
timeout = "30s"
{route_lines}

[clusters.v1]
endpoints = ["{v1}"]

[clusters.v2]
endpoints = ["{v2}"]
"#
    );
    Config::from_toml(&text).unwrap()
}

async fn get(gw: &Handle, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut req = Request::get("/");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let a = send(gw.addr, req.body(Full::default()).unwrap()).await;
    (a.status, a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_sends_its_share_and_headers_or_cookies_pick_a_side() {
    let (one, v1) = counting("v1", false).await;
    let (two, v2) = counting("v2", false).await;
    let lines = r#"split = [
  { cluster = "v2", header = "x-canary", value = "1" },
  { cluster = "v2", cookie = "canary", value = "yes" },
  { cluster = "v2", weight = 30 },
]"#;
    let gw = palisade_gateway::start(config(v1, v2, lines), None)
        .await
        .unwrap();
    for _ in 0..1000 {
        assert_eq!(get(&gw, &[]).await.0, StatusCode::OK);
    }
    let to_v2 = two.seen.load(Ordering::SeqCst);
    // 30% of 1000: 300 expected, 14.5 its standard deviation; 7 of them either side.
    assert!((200..=400).contains(&to_v2), "{to_v2} of 1000 went to v2");
    assert_eq!(one.seen.load(Ordering::SeqCst) + to_v2, 1000);
    for _ in 0..20 {
        assert_eq!(get(&gw, &[("x-canary", "1")]).await.1, "v2");
        assert_eq!(get(&gw, &[("cookie", "theme=dark; canary=yes")]).await.1, "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_split_without_dropping_a_request() {
    let (one, v1) = counting("v1", false).await;
    let (two, v2) = counting("v2", false).await;
    let gw = palisade_gateway::start(config(v1, v2, ""), None).await.unwrap();
    let addr = gw.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..150 {
                    let a = send(addr, Request::get("/").body(Full::default()).unwrap()).await;
                    statuses.push(a.status);
                }
                statuses
            })
        })
        .collect();
    // While they run: all to v2, then back to v1, then half and half.
    let served = || one.seen.load(Ordering::SeqCst) + two.seen.load(Ordering::SeqCst);
    let splits = [
        "split = [{ cluster = \"v2\", weight = 100 }]",
        "",
        "split = [{ cluster = \"v2\", weight = 50 }]",
    ];
    for (k, lines) in (1..).zip(splits) {
        // Each reload lands among requests in flight.
        while served() < k * 120 {
            tokio::task::yield_now().await;
        }
        gw.reload(config(v1, v2, lines)).await.unwrap();
    }
    for c in clients {
        assert!(c.await.unwrap().iter().all(|s| *s == StatusCode::OK));
    }
    assert_eq!(served(), 600);
    gw.reload(config(v1, v2, "split = [{ cluster = \"v2\", weight = 100 }]"))
        .await
        .unwrap();
    let before = two.seen.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(get(&gw, &[]).await.1, "v2");
    }
    assert_eq!(two.seen.load(Ordering::SeqCst), before + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_copies_reach_the_shadow_and_its_failures_are_never_felt() {
    let (primary, v1) = counting("v1", false).await;
    // The shadow takes every copy and answers none until the test lets it.
    let (shadow, v2) = counting("shadow", true).await;
    let gw = palisade_gateway::start(config(v1, v2, "mirror = { cluster = \"v2\", share = 1.0 }"), None)
        .await
        .unwrap();
    for i in 0..10 {
        let req = Request::post("/orders")
            .body(Full::new(Bytes::from(format!("order {i}"))))
            .unwrap();
        let a = send(gw.addr, req).await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "v1"));
    }
    assert_eq!(primary.seen.load(Ordering::SeqCst), 10);
    // Every copy arrives (on tasks of their own: wait for them), with its body.
    while shadow.bodies.lock().unwrap().len() < 10 {
        tokio::task::yield_now().await;
    }
    let mut copies = shadow.bodies.lock().unwrap().clone();
    copies.sort();
    let expected: Vec<(String, Option<String>)> = (0..10)
        .map(|i| (format!("order {i}"), Some("1".into())))
        .collect();
    assert_eq!(copies, expected);
    // The primary never saw the mirror's mark.
    assert!(
        primary
            .bodies
            .lock()
            .unwrap()
            .iter()
            .all(|(_, mark)| mark.is_none())
    );
    shadow.hold.as_ref().unwrap().add_permits(10);

    // A shadow that is down: copies fail, clients never notice.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let gw = palisade_gateway::start(config(v1, dead, "mirror = { cluster = \"v2\" }"), None)
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(get(&gw, &[]).await, (StatusCode::OK, "v1".to_owned()));
    }
}

#[test]
fn split_and_mirror_config_errors_name_their_fields() {
    let text = r#"
[[routes]]
name = "r"
cluster = "c"
split = [{ cluster = "missing", weight = 10 }, { cluster = "c", weight = 0 }, { cluster = "c", header = "x" }]
mirror = { cluster = "c", share = 2.0 }

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let errors = Config::from_toml(text).expect_err("refused").to_string();
    assert!(errors.contains("routes[0] (r).split[0].cluster"), "{errors}");
    let text = text.replace("\"missing\"", "\"c\"");
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(&text).unwrap())
        .expect_err("refused")
        .to_string();
    for field in [
        "routes[0] (r).split[1].weight",
        "routes[0] (r).split[2]",
        "routes[0] (r).mirror.share",
    ] {
        assert!(errors.contains(field), "{field} not named in: {errors}");
    }
}
