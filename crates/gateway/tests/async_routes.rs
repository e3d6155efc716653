//! Queue-based load leveling at the gateway, against real sockets and a real queue
//! (a SQLite file): an async route stores the request and answers `202` with a
//! status URL, the queue delivers it to the cluster, the status URL reports the
//! upstream's answer; an `Idempotency-Key` stores a request once; a queue that
//! cannot be reached is a `503 queue_unavailable` while the other routes serve on.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use palisade_gateway::{Config, Handle};
use palisade_queue::{JobState, Queue};
use tokio::sync::mpsc;

mod support;

use support::{get, send};

/// A temporary directory, removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    let d = std::env::temp_dir().join(format!(
        "palisade-async-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// What the upstream received.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    body: String,
    test_header: Option<String>,
}

/// An upstream answering `status` with body `made` and `x-upstream: yes`, telling
/// the test what it received.
async fn upstream(status: u16) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let _ = tx.send(Seen {
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                body: String::from_utf8_lossy(&body).into_owned(),
                test_header: parts
                    .headers
                    .get("x-test")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            });
            let mut resp = Response::new(Full::new(Bytes::from_static(b"made")));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            resp.headers_mut().insert("x-upstream", "yes".parse().unwrap());
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
    .await;
    (addr, rx)
}

async fn start(database: &str, workers: usize, up: SocketAddr) -> Handle {
    let text = format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false
queue = {{ database = "{database}", workers = {workers}, max_attempts = 3 }}

[[routes]]
name = "orders"
match = {{ path_prefix = "/orders" }}
cluster = "shop"
mode = "async"

[[routes]]
name = "browse"
cluster = "shop"

[clusters.shop]
endpoints = ["{up}"]
"#
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

fn order(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/orders?rush=1").header("x-test", "1");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::from("two apples")).unwrap()
}

/// Waits until the gateway's queue is connected.
async fn until_connected(gw: &Handle) {
    gw.runtime().queue.clone().connected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_route_answers_202_and_the_queue_delivers_the_request() {
    let d = dir();
    let db = format!("sqlite:{}", d.0.join("jobs.db").display());
    let (up, mut seen) = upstream(201).await;
    let gw = start(&db, 2, up).await;
    until_connected(&gw).await;
    let a = send(gw.addr, order(None)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let location = a.headers["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/jobs/"), "{location}");
    let reply: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(reply["status"], location.as_str());

    // Delivered by the queue, as the client sent it.
    let s = seen.recv().await.unwrap();
    assert_eq!(
        (s.method.as_str(), s.path.as_str(), s.body.as_str()),
        ("POST", "/orders?rush=1", "two apples")
    );
    assert_eq!(s.test_header.as_deref(), Some("1"));
    gw.shutdown().await; // its runner records the delivery

    let q = Queue::connect(&db).await.unwrap();
    let id: i64 = reply["id"].as_i64().unwrap();
    let job = q.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(job.output.as_ref().unwrap()["status"], 201);

    // Another gateway on the same queue (storing only) reports it.
    let gw = start(&db, 0, up).await;
    until_connected(&gw).await;
    let status = get(gw.addr, &location).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.body);
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["state"], "completed");
    assert_eq!(status["answer"]["status"], 201);
    assert_eq!(status["answer"]["body"], "made");
    let headers = status["answer"]["headers"].as_array().unwrap();
    assert!(
        headers.iter().any(|h| h[0] == "x-upstream" && h[1] == "yes"),
        "{headers:?}"
    );
    // Without its token, or with another's, there is nothing to see.
    let (base, _) = location.rsplit_once('.').unwrap();
    assert_eq!(
        get(gw.addr, &format!("{base}.0000")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(gw.addr, base).await.status, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_stores_a_request_once() {
    let d = dir();
    let db = format!("sqlite:{}", d.0.join("jobs.db").display());
    let (up, _seen) = upstream(200).await;
    let gw = start(&db, 0, up).await;
    until_connected(&gw).await;
    let first = send(gw.addr, order(Some("order-7"))).await;
    let again = send(gw.addr, order(Some("order-7"))).await;
    let other = send(gw.addr, order(Some("order-8"))).await;
    for a in [&first, &again, &other] {
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    }
    assert_eq!(first.headers["location"], again.headers["location"]);
    assert_ne!(first.headers["location"], other.headers["location"]);
    let again: serde_json::Value = serde_json::from_str(&again.body).unwrap();
    assert_eq!(again["duplicate"], true);
    let status = get(gw.addr, first.headers["location"].to_str().unwrap()).await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["state"], "available", "stored, waiting for a worker");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_cannot_be_reached_is_a_503_and_the_other_routes_serve_on() {
    let (up, _seen) = upstream(200).await;
    let gw = start("postgres://nobody@127.0.0.1:1/none", 4, up).await;
    let a = send(gw.addr, order(None)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.cause(), "queue_unavailable");
    assert_eq!(get(gw.addr, "/browse").await.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_5xx_is_retried_with_its_error_kept() {
    let d = dir();
    let db = format!("sqlite:{}", d.0.join("jobs.db").display());
    let (up, mut seen) = upstream(503).await;
    let gw = start(&db, 1, up).await;
    until_connected(&gw).await;
    let a = send(gw.addr, order(None)).await;
    let id = serde_json::from_str::<serde_json::Value>(&a.body).unwrap()["id"]
        .as_i64()
        .unwrap();
    seen.recv().await.unwrap();
    gw.shutdown().await;
    let job = Queue::connect(&db).await.unwrap().job(id).await.unwrap().unwrap();
    assert_ne!(job.state, JobState::Completed);
    assert!(job.errors[0].error.ends_with("answered 503"), "{:?}", job.errors);
}
