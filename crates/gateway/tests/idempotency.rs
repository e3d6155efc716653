//! Idempotency keys on a route against real sockets and real stores (the Redis and
//! PostgreSQL `scripts/test` starts): an upstream counting what reaches it behind
//! gateways whose route has an `idempotency` table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade_gateway::{Config, Handle};

mod support;

use support::{Answer, send};

/// An upstream answering by path, counting requests per path; `/slow` waits for
/// a permit, after telling `arrived`.
struct Origin {
    seen: Mutex<HashMap<String, u32>>,
    arrived: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl Origin {
    fn seen(&self, path: &str) -> u32 {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn count(&self, path: &str) -> u32 {
        let mut seen = self.seen.lock().unwrap();
        let n = seen.entry(path.to_owned()).or_insert(0);
        *n += 1;
        *n
    }
}

async fn origin() -> (Arc<Origin>, SocketAddr) {
    let origin = Arc::new(Origin {
        seen: Mutex::default(),
        arrived: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let o = origin.clone();
    let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
        let o = o.clone();
        async move {
            let path = req.uri().path().to_owned();
            let n = o.count(&path);
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await?
                .to_bytes();
            let reply = |status: u16, body: Bytes| {
                Response::builder()
                    .status(status)
                    .header("x-run", n.to_string())
                    .body(Full::new(body))
                    .unwrap()
            };
            let resp = match path.as_str() {
                "/slow" => {
                    o.arrived.notify_one();
                    o.release.acquire().await.unwrap().forget();
                    reply(201, Bytes::from(format!("slow {n}")))
                }
                // A server error the first time, then a success.
                "/flaky" if n == 1 => reply(500, Bytes::from_static(b"down")),
                "/large" => reply(200, Bytes::from(vec![b'x'; 4096])),
                _ => reply(
                    201,
                    Bytes::from(format!("run {n}: {}", String::from_utf8_lossy(&body))),
                ),
            };
            Ok::<_, hyper::Error>(resp)
        }
    })
    .await;
    (origin, addr)
}

use palisade_testkit::unique;

fn redis_url() -> String {
    std::env::var("PALISADE_TEST_REDIS_URL")
        .expect("PALISADE_TEST_REDIS_URL is not set: run the tests through scripts/test, which starts Redis")
}

fn postgres_url() -> String {
    std::env::var("PALISADE_TEST_POSTGRES_URL").expect(
        "PALISADE_TEST_POSTGRES_URL is not set: run the tests through scripts/test, which starts PostgreSQL",
    )
}

/// A gateway whose route `route` (to `up`) has `idempotency = { <keys> }`, its
/// keys in `store`.
fn config(up: SocketAddr, store: &str, route: &str, keys: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false
idempotency = {{ store = "{store}", prefix = "{prefix}:" }}

[[routes]]
name = "{route}"
match = {{ path_prefix = "/" }}
cluster = "c"
idempotency = {{ {keys} }}

[clusters.c]
endpoints = ["{up}"]
"#,
        prefix = unique("test")
    )
}

async fn gateway(text: &str) -> Handle {
    let gw = palisade_gateway::start(Config::from_toml(text).unwrap(), None)
        .await
        .unwrap();
    gw.runtime().idempotency.connected().await;
    gw
}

async fn post(gw: &Handle, path: &str, key: Option<&str>, body: &str) -> Answer {
    let mut req = Request::post(path);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    send(
        gw.addr,
        req.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await
}

fn replayed(a: &Answer) -> bool {
    a.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_runs_its_request_once_and_repeats_get_the_kept_answer() {
    let (origin, up) = origin().await;
    let gw = gateway(&config(up, &redis_url(), &unique("pay"), "")).await;
    let first = post(&gw, "/pay", Some("k1"), "10 EUR").await;
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::CREATED, "run 1: 10 EUR")
    );
    assert!(!replayed(&first));
    for _ in 0..3 {
        let again = post(&gw, "/pay", Some("k1"), "10 EUR").await;
        assert_eq!(
            (again.status, again.body.as_str()),
            (StatusCode::CREATED, "run 1: 10 EUR")
        );
        assert_eq!(again.headers["x-run"], "1");
        assert!(replayed(&again));
        // Its own request id.
        assert_ne!(again.headers["x-request-id"], first.headers["x-request-id"]);
    }
    assert_eq!(origin.seen("/pay"), 1);
    // The key with another request: refused, not run.
    let other = post(&gw, "/pay", Some("k1"), "99 EUR").await;
    assert_eq!(
        (other.status, other.cause()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_mismatch")
    );
    let elsewhere = post(&gw, "/refund", Some("k1"), "10 EUR").await;
    assert_eq!(elsewhere.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(origin.seen("/pay") + origin.seen("/refund"), 1);
    // Another key runs; no key passes through, every time.
    assert_eq!(
        post(&gw, "/pay", Some("k2"), "10 EUR").await.body,
        "run 2: 10 EUR"
    );
    assert_eq!(post(&gw, "/pay", None, "10 EUR").await.body, "run 3: 10 EUR");
    assert_eq!(post(&gw, "/pay", None, "10 EUR").await.body, "run 4: 10 EUR");
    // A GET is not a method keys apply to (POST and PATCH by default).
    let get = send(
        gw.addr,
        Request::get("/pay")
            .header("idempotency-key", "k1")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(get.body, "run 5: ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_missing_required_keys_are_400s_and_never_sent() {
    let (origin, up) = origin().await;
    let gw = gateway(&config(up, &redis_url(), &unique("orders"), "required = true")).await;
    let missing = post(&gw, "/orders", None, "x").await;
    assert_eq!(
        (missing.status, missing.cause()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let long = "k".repeat(256);
    assert_eq!(
        post(&gw, "/orders", Some(&long), "x").await.status,
        StatusCode::BAD_REQUEST
    );
    let spaced = post(&gw, "/orders", Some("a key"), "x").await;
    assert_eq!(spaced.status, StatusCode::BAD_REQUEST);
    assert_eq!(origin.seen("/orders"), 0);
    assert_eq!(
        post(&gw, "/orders", Some("ok"), "x").await.status,
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_while_the_first_runs_is_a_409_then_gets_its_answer() {
    let (origin, up) = origin().await;
    let gw = gateway(&config(up, &redis_url(), &unique("slow"), "")).await;
    let addr = gw.addr;
    let first = tokio::spawn(async move {
        let req = Request::post("/slow")
            .header("idempotency-key", "s1")
            .body(Full::new(Bytes::from_static(b"a")));
        send(addr, req.unwrap()).await
    });
    origin.arrived.notified().await;
    let during = post(&gw, "/slow", Some("s1"), "a").await;
    assert_eq!(
        (during.status, during.cause()),
        (StatusCode::CONFLICT, "idempotency_conflict")
    );
    origin.release.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::CREATED, "slow 1")
    );
    let after = post(&gw, "/slow", Some("s1"), "a").await;
    assert_eq!((after.body.as_str(), replayed(&after)), ("slow 1", true));
    assert_eq!(origin.seen("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_with_wait_gets_the_first_answer_when_it_comes() {
    let (origin, up) = origin().await;
    let route = unique("wait");
    let gw = gateway(&config(up, &redis_url(), &route, "wait = \"30s\"")).await;
    let addr = gw.addr;
    let first = tokio::spawn(async move {
        let req = Request::post("/slow")
            .header("idempotency-key", "w1")
            .body(Full::new(Bytes::from_static(b"a")));
        send(addr, req.unwrap()).await
    });
    origin.arrived.notified().await;
    let second = tokio::spawn(async move {
        let req = Request::post("/slow")
            .header("idempotency-key", "w1")
            .body(Full::new(Bytes::from_static(b"a")));
        send(addr, req.unwrap()).await
    });
    // The second is waiting before the first may answer.
    let metrics = palisade_gateway::server::metrics_handle().expect("the gateway's recorder");
    let waiting = format!("palisade_idempotency_total{{scope=\"{route}\",outcome=\"waited\"}} 1");
    while !metrics.render().contains(&waiting) {
        tokio::task::yield_now().await;
    }
    origin.release.add_permits(1);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.body, "slow 1");
    assert_eq!(second.body, "slow 1");
    assert_eq!(origin.seen("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_the_gateways_own_failures_are_not_kept() {
    let (origin, up) = origin().await;
    let gw = gateway(&config(up, &redis_url(), &unique("flaky"), "")).await;
    // A 500 releases the key: the retry runs, and its success is kept.
    assert_eq!(
        post(&gw, "/flaky", Some("f1"), "x").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(post(&gw, "/flaky", Some("f1"), "x").await.body, "run 2: x");
    assert!(replayed(&post(&gw, "/flaky", Some("f1"), "x").await));
    assert_eq!(origin.seen("/flaky"), 2);

    // An upstream nobody answers on: the gateway's 502 is not kept either.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let gw = gateway(&config(dead, &redis_url(), &unique("dead"), "")).await;
    let a = post(&gw, "/pay", Some("d1"), "x").await;
    assert_eq!((a.status, a.cause()), (StatusCode::BAD_GATEWAY, "connect_error"));
    let b = post(&gw, "/pay", Some("d1"), "x").await;
    assert_eq!(b.cause(), "connect_error");
    assert!(!replayed(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_bound_is_passed_whole_and_kept_without_its_body() {
    let (origin, up) = origin().await;
    let gw = gateway(&config(
        up,
        &redis_url(),
        &unique("large"),
        "max_body_bytes = 1024",
    ))
    .await;
    let first = post(&gw, "/large", Some("l1"), "x").await;
    assert_eq!((first.status, first.body.len()), (StatusCode::OK, 4096));
    let again = post(&gw, "/large", Some("l1"), "x").await;
    assert_eq!(
        (again.status, again.body.as_str(), replayed(&again)),
        (StatusCode::OK, "", true)
    );
    assert_eq!(again.headers["idempotent-body-omitted"], "true");
    assert_eq!(origin.seen("/large"), 1);
    // A request body over it is a 413, never sent.
    let big = post(&gw, "/pay", Some("l2"), &"y".repeat(2048)).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(origin.seen("/pay"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_a_postgresql_store_run_a_key_once() {
    let (origin, up) = origin().await;
    let text = config(up, &postgres_url(), &unique("shared"), "");
    let (a, b) = (gateway(&text).await, gateway(&text).await);
    let first = post(&a, "/pay", Some("p1"), "5 EUR").await;
    assert_eq!(first.body, "run 1: 5 EUR");
    let other = post(&b, "/pay", Some("p1"), "5 EUR").await;
    assert_eq!((other.body.as_str(), replayed(&other)), ("run 1: 5 EUR", true));
    assert_eq!(
        post(&b, "/pay", Some("p1"), "6 EUR").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(origin.seen("/pay"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_reached_refuses_or_proceeds_as_the_route_says() {
    let (origin, up) = origin().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let refuse = config(up, &nowhere, "refusing", "");
    let gw = palisade_gateway::start(Config::from_toml(&refuse).unwrap(), None)
        .await
        .unwrap();
    let a = post(&gw, "/pay", Some("n1"), "x").await;
    assert_eq!(
        (a.status, a.cause()),
        (StatusCode::SERVICE_UNAVAILABLE, "idempotency_unavailable")
    );
    assert_eq!(origin.seen("/pay"), 0);
    // Without a key, the route serves.
    assert_eq!(post(&gw, "/pay", None, "x").await.status, StatusCode::CREATED);

    let proceed = config(up, &nowhere, "proceeding", "when_store_down = \"proceed\"");
    let gw = palisade_gateway::start(Config::from_toml(&proceed).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(post(&gw, "/pay", Some("n1"), "x").await.body, "run 2: x");
    assert_eq!(post(&gw, "/pay", Some("n1"), "x").await.body, "run 3: x");
}

#[test]
fn idempotency_config_errors_name_their_fields() {
    let text = r#"
[gateway]
idempotency = { store = "mysql://h/db", timeout = "0s" }

[[routes]]
name = "r"
cluster = "c"
timeout = "30s"
idempotency = { header = "bad header", methods = ["P OST"], lock = "5s", ttl = "0s", wait = "0s" }

[[routes]]
name = "queued"
cluster = "c"
mode = "async"
idempotency = {}

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let errors = Config::from_toml(text).expect_err("refused").to_string();
    for field in [
        "gateway.idempotency.store",
        "gateway.idempotency.timeout",
        "routes[1] (queued).idempotency",
    ] {
        assert!(errors.contains(field), "{field} not named in: {errors}");
    }
    // The route's own values, once the file's checks pass.
    let text = text
        .replace("mysql://h/db\", timeout = \"0s\"", "redis://127.0.0.1:1\"")
        .replace("mode = \"async\"\n", "");
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(&text).unwrap())
        .expect_err("the configuration is refused")
        .to_string();
    for field in [
        "routes[0] (r).idempotency.header",
        "routes[0] (r).idempotency.methods[0]",
        "routes[0] (r).idempotency.lock",
        "routes[0] (r).idempotency.ttl",
        "routes[0] (r).idempotency.wait",
    ] {
        assert!(errors.contains(field), "{field} not named in: {errors}");
    }
    // A route with keys needs the store.
    let text = text.replace("idempotency = { store = \"redis://127.0.0.1:1\" }", "");
    let errors = Config::from_toml(&text).expect_err("refused").to_string();
    assert!(errors.contains("routes[0] (r).idempotency"), "{errors}");
    assert!(errors.contains("[gateway.idempotency]"), "{errors}");
}
