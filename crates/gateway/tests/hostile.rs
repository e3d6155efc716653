//! The gateway against hostile clients, with raw sockets: malformed, oversized,
//! abandoned and slow request bodies never count against a healthy endpoint; slow
//! and idle connections are closed; the connection cap holds; `Host` and the path
//! are unambiguous. No timing assertions: tests wait for events (an answer, the
//! gateway closing a socket), each bounded so a missing feature fails, not hangs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use palisade_gateway::{Config, Handle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

/// Long enough for anything the gateway does here; a test that needs it failed.
const PATIENCE: Duration = Duration::from_secs(20);

/// An upstream that reads each request's whole body and answers 200 with
/// `path host body-length`; `hits` counts the requests it saw.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicU32>,
}

impl Upstream {
    async fn start() -> Arc<Upstream> {
        let hits = Arc::new(AtomicU32::new(0));
        let seen = hits.clone();
        let addr = support::serve_http1(move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_string();
                let host = req
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let length = req.into_body().collect().await?.to_bytes().len();
                let text = format!("{path} {host} {length}");
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
            }
        })
        .await;
        Arc::new(Upstream { addr, hits })
    }

    fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }
}

fn config_text(gateway: &str, routes_and_clusters: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         max_body_bytes = 1024\nworkers = 1\n{gateway}\n{routes_and_clusters}"
    )
}

/// One route to one endpoint whose breaker opens after 2 failures in a row and
/// whose outlier detection ejects after 2 gateway failures.
fn guarded(up: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"r\"\ncluster = \"c\"\n\
         [clusters.c]\nendpoints = [\"{}\"]\n\
         breaker = {{ consecutive_failures = 2, failure_rate = 0.0, open = \"1h\", max_open = \"1h\" }}\n\
         outlier = {{ consecutive_5xx = 2, consecutive_gateway_failure = 2 }}\n",
        up.addr
    )
}

async fn start(gateway: &str, rest: &str) -> Handle {
    let config = Config::from_toml(&config_text(gateway, rest)).unwrap();
    palisade_gateway::start(config, None).await.unwrap()
}

/// Sends raw bytes on a new connection and reads until the gateway closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_all(&mut s).await
}

/// Everything until the gateway closes the connection (a reset ends it too).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the gateway should have closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one answer's head and its body (by `content-length`).
async fn read_answer(s: &mut TcpStream) -> String {
    let read = async {
        let mut out = Vec::new();
        while !out.ends_with(b"\r\n\r\n") {
            out.push(s.read_u8().await.unwrap());
        }
        let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        out.extend_from_slice(&body);
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(PATIENCE, read).await.expect("an answer")
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// The endpoint's state as `/admin/clusters` shows it.
fn endpoint(gw: &Handle) -> serde_json::Value {
    palisade_gateway::admin::clusters_json(&gw.runtime())["c"]["endpoints"][0].clone()
}

/// The endpoint is untouched: breaker closed, not ejected, no failure counted, and
/// a well-behaved client is served.
async fn assert_endpoint_healthy(gw: &Handle, up: &Upstream) {
    let ep = endpoint(gw);
    assert_eq!(ep["breaker"], "closed", "{ep}");
    assert_eq!(ep["ejected"], false, "{ep}");
    assert_eq!(ep["failures"], 0, "{ep}");
    let before = up.hits();
    let answer = exchange(
        gw.addr,
        b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(up.hits(), before + 1);
}

#[tokio::test]
async fn malformed_chunked_bodies_are_400s_that_never_reach_the_endpoint() {
    let up = Upstream::start().await;
    let gw = start("", &guarded(&up)).await;
    for _ in 0..5 {
        let answer = exchange(
            gw.addr,
            b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(status(&answer), 400, "{answer}");
        assert!(answer.contains("x-palisade-cause: bad_request"), "{answer}");
    }
    assert_eq!(
        up.hits(),
        0,
        "a bad first chunk is refused before anything goes upstream"
    );
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_bad_chunk_after_a_good_one_is_the_clients_failure() {
    let up = Upstream::start().await;
    let gw = start("", &guarded(&up)).await;
    for _ in 0..5 {
        let answer = exchange(
            gw.addr,
            b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await;
        assert_eq!(status(&answer), 400, "{answer}");
    }
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn chunked_bodies_over_the_limit_are_413s_not_the_endpoints() {
    let up = Upstream::start().await;
    let gw = start("", &guarded(&up)).await;
    let chunk = format!("320\r\n{}\r\n", "a".repeat(0x320));
    for _ in 0..5 {
        let request = format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
        );
        let answer = exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(status(&answer), 413, "{answer}");
        assert!(answer.contains("x-palisade-cause: body_too_large"), "{answer}");
    }
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn abandoned_uploads_do_not_count_against_the_endpoint() {
    let up = Upstream::start().await;
    let gw = start("", &guarded(&up)).await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly ten b")
            .await
            .unwrap();
        // The client stops sending: the gateway sees its body end early.
        s.shutdown().await.unwrap();
        let answer = read_all(&mut s).await;
        assert!(answer.is_empty() || status(&answer) == 400, "{answer}");
    }
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_too_slow_with_its_body_gets_a_408_and_the_endpoint_is_untouched() {
    let up = Upstream::start().await;
    let gw = start("request_body_idle_timeout = \"200ms\"", &guarded(&up)).await;
    for (i, sent) in ["", "first bytes"].into_iter().enumerate() {
        for _ in 0..3 {
            let mut s = TcpStream::connect(gw.addr).await.unwrap();
            let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{sent}");
            s.write_all(head.as_bytes()).await.unwrap();
            // ... and nothing more.
            let answer = read_answer(&mut s).await;
            assert_eq!(status(&answer), 408, "case {i}: {answer}");
            assert!(answer.contains("x-palisade-cause: client_timeout"), "{answer}");
        }
    }
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_silent_and_idle_client_connections_are_closed() {
    let up = Upstream::start().await;
    let gw = start(
        "client_header_timeout = \"300ms\"\nclient_idle_timeout = \"300ms\"",
        &guarded(&up),
    )
    .await;
    // Silent from the start.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // A head trickled and never finished (slowloris).
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // Idle after one request on a keep-alive connection.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /once HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status(&read_answer(&mut idle).await), 200);
    for s in [&mut silent, &mut slow, &mut idle] {
        assert_eq!(read_all(s).await, "", "closed without an answer");
    }
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_for_idle_ones_to_be_reclaimed() {
    let up = Upstream::start().await;
    let gw = start(
        "max_client_connections = 4\nclient_header_timeout = \"500ms\"",
        &guarded(&up),
    )
    .await;
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Over the cap: closed at once, unanswered.
    let refused = exchange(gw.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(refused, "", "a fifth connection is refused");
    // The flood's silent connections are reclaimed by their header timeout ...
    for s in &mut flood {
        assert_eq!(read_all(s).await, "");
    }
    // ... and a well-behaved client is served again.
    assert_endpoint_healthy(&gw, &up).await;
    gw.shutdown().await;
}

fn two_hosts(a: &Upstream, b: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"a\"\ncluster = \"a\"\nmatch = {{ host = \"a.test\" }}\n\
         [[routes]]\nname = \"b\"\ncluster = \"b\"\nmatch = {{ host = \"b.test\" }}\n\
         [[routes]]\nname = \"public\"\ncluster = \"a\"\nmatch = {{ path_prefix = \"/public\" }}\n\
         [clusters.a]\nendpoints = [\"{}\"]\n[clusters.b]\nendpoints = [\"{}\"]\n",
        a.addr, b.addr
    )
}

#[tokio::test]
async fn host_must_be_one_and_the_absolute_forms_authority_wins() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = start("", &two_hosts(&a, &b)).await;
    let two = exchange(
        gw.addr,
        b"GET /x HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&two), 400, "{two}");
    let none = exchange(gw.addr, b"GET /x HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status(&none), 400, "{none}");
    let garbage = exchange(
        gw.addr,
        b"GET /x HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&garbage), 400, "{garbage}");
    assert_eq!(a.hits() + b.hits(), 0);
    let absolute = exchange(
        gw.addr,
        b"GET http://b.test/abs HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&absolute), 200, "{absolute}");
    assert!(
        absolute.ends_with("/abs b.test 0"),
        "b's cluster, with b's Host: {absolute}"
    );
    assert_eq!((a.hits(), b.hits()), (0, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn paths_are_normalised_before_routing_and_forwarded_as_routed() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = start("", &two_hosts(&a, &b)).await;
    let get = |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n");
        let addr = gw.addr;
        async move { exchange(addr, request.as_bytes()).await }
    };
    // Climbing out of /public is not /public.
    for path in [
        "/public/../admin/secret",
        "/public/%2e%2e/admin/secret",
        "/public/%2E%2e/admin/secret",
    ] {
        let answer = get(path).await;
        assert_eq!(status(&answer), 404, "{path}: {answer}");
    }
    // An escaped slash is refused by default.
    let answer = get("/public/..%2fadmin/secret").await;
    assert_eq!(status(&answer), 400, "{answer}");
    // Above the root.
    let answer = get("/public/../../etc/passwd").await;
    assert_eq!(status(&answer), 400, "{answer}");
    assert_eq!(a.hits(), 0);
    // What is routed is what is forwarded.
    let answer = get("/public/./docs/../%7Euser/a%20b?q=/../x").await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.ends_with("/public/~user/a%20b other.test 0"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_config_redacts_credentials_and_fallback_bodies() {
    let up = Upstream::start().await;
    let text = config_text(
        "",
        &format!(
            "[[routes]]\nname = \"r\"\ncluster = \"c\"\n\
             match = {{ headers = {{ authorization = \"Bearer hunter2\", x-api-key = \"k-123\", x-tenant = \"acme\" }} }}\n\
             fallback = {{ status = 200, body = \"internal-token-xyz\" }}\n\
             [clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    );
    let gw = palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap();
    let admin = gw.admin_addr.unwrap();
    let answer = exchange(
        admin,
        b"GET /admin/config HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    for secret in ["hunter2", "k-123", "internal-token-xyz"] {
        assert!(!answer.contains(secret), "{secret} shown: {answer}");
    }
    assert!(answer.contains("acme"), "non-credential values stay: {answer}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_its_idle_timeout() {
    let up = Upstream::start().await;
    let gw = start("client_idle_timeout = \"300ms\"", &guarded(&up)).await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{}/h2", gw.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, format!("/h2 {} 0", gw.addr).as_bytes());
    // Nothing more is sent: the gateway closes the connection.
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the gateway should have closed the idle HTTP/2 connection")
        .unwrap()
        .ok();
    assert!(sender.is_closed());
    gw.shutdown().await;
}
