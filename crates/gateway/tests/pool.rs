//! The upstream connection pool against real sockets: reuse once a body is read,
//! the idle cap, the sweep, endpoints that close connections, connect errors. Each
//! test counts the connections the upstream accepted and saw closed; none waits for
//! time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade_gateway::connect::Connector;
use palisade_gateway::pool::{Pool, SendError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Connections an upstream accepted and saw end.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    changed: Notify,
}

impl Counts {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have ended.
    async fn closed(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            if self.closed.load(Ordering::SeqCst) >= n {
                return;
            }
            changed.await;
        }
    }
}

/// A body larger than the socket buffers and hyper's read buffer: unread, it keeps
/// its connection busy.
const BIG: usize = 8 << 20;

/// An HTTP/1.1 upstream answering `ok` (`/big`: `BIG` bytes); `keep_alive: false`
/// closes each connection after one answer (saying so).
async fn upstream(keep_alive: bool) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        Bytes::from(vec![b'x'; BIG])
                    } else {
                        Bytes::from_static(b"ok")
                    };
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                c.closed.fetch_add(1, Ordering::SeqCst);
                c.changed.notify_waiters();
            });
        }
    });
    (addr, counts)
}

fn new_pool(max_idle: usize, idle_timeout: Duration) -> Pool {
    Pool::new(
        Connector::new(Duration::from_secs(5), None),
        false,
        max_idle,
        idle_timeout,
    )
}

fn pool(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
    Arc::new(new_pool(max_idle, idle_timeout))
}

/// Reads one request head from `s`; false if the connection ended first.
async fn read_head(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    true
}

fn get(path: &str) -> Request<palisade_gateway::Body> {
    Request::get(path)
        .header("host", "upstream")
        .body(palisade_gateway::empty())
        .unwrap()
}

/// Sends a GET and reads the whole answer; the connection is handed back after.
async fn fetch(pool: &Arc<Pool>, addr: SocketAddr) -> String {
    let (resp, lease) = pool.send(addr, get("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    drop(lease);
    String::from_utf8(body.to_vec()).unwrap()
}

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_connection_is_reused_once_its_answer_is_read() {
    let (addr, counts) = upstream(true).await;
    let pool = pool(8, LONG);
    for _ in 0..5 {
        assert_eq!(fetch(&pool, addr).await, "ok");
    }
    assert_eq!(counts.accepted(), 1);
    assert_eq!(pool.idle(), 1);
}

#[tokio::test]
async fn a_request_never_waits_on_a_connection_busy_with_an_unread_answer() {
    let (addr, counts) = upstream(true).await;
    let pool = pool(8, LONG);
    let (unread, lease) = pool.send(addr, get("/big")).await.unwrap();
    // Handed back early: the connection is still busy with the unread body.
    drop(lease);
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(counts.accepted(), 2, "the busy connection was not used");
    let body = unread.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), BIG);
}

#[tokio::test]
async fn no_more_than_the_idle_cap_is_kept_and_the_oldest_go() {
    let (addr, counts) = upstream(true).await;
    let pool = pool(2, LONG);
    // Four at once: four connections.
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(pool.send(addr, get("/")).await.unwrap());
    }
    assert_eq!(counts.accepted(), 4);
    for (resp, lease) in answers {
        resp.into_body().collect().await.unwrap();
        drop(lease);
    }
    assert_eq!(pool.idle(), 2);
    // The two beyond the cap are closed.
    counts.closed(2).await;
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(counts.accepted(), 4, "an idle one served");
}

#[tokio::test]
async fn the_sweep_closes_connections_idle_past_the_timeout() {
    let (addr, counts) = upstream(true).await;
    // Every connection is past a zero timeout as soon as it is handed back.
    let pool = pool(8, Duration::ZERO);
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(pool.idle(), 1);
    pool.sweep();
    assert_eq!(pool.idle(), 0);
    counts.closed(1).await;
    // And an expired one is never lent: a new connection serves.
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn connections_the_endpoint_closes_are_replaced() {
    let (addr, counts) = upstream(false).await;
    let pool = pool(8, LONG);
    for _ in 0..3 {
        assert_eq!(fetch(&pool, addr).await, "ok");
    }
    assert_eq!(counts.accepted(), 3);
}

#[tokio::test]
async fn a_request_on_a_pooled_connection_closed_silently_goes_on_a_new_one() {
    // Answers one request as if to keep the connection, then closes it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                assert!(read_head(&mut s).await);
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            });
        }
    });
    let pool = pool(8, LONG);
    assert_eq!(fetch(&pool, addr).await, "ok");
    // The pool may or may not have seen the close yet; either way the request is
    // not lost to it.
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_closed_as_it_is_lent_breaks_the_request_or_is_replaced() {
    // A blocking upstream, so the test can have it close the pooled connection
    // while the pool's runtime (this thread) runs nothing: the pool cannot have
    // seen the close when it lends the connection. This is the race every HTTP/1.1
    // pool has with an endpoint's own keep-alive timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let answer = |s: &mut std::net::TcpStream| {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                n += s.read(&mut buf[n..]).unwrap();
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
        };
        let (mut first, _) = listener.accept().unwrap();
        answer(&mut first);
        close_rx.recv().unwrap();
        first.shutdown(std::net::Shutdown::Both).unwrap();
        drop(first);
        closed_tx.send(()).unwrap();
        let (mut second, _) = listener.accept().unwrap();
        answer(&mut second);
    });
    let pool = pool(8, LONG);
    assert_eq!(fetch(&pool, addr).await, "ok");
    close_tx.send(()).unwrap();
    closed_rx.recv().unwrap();
    // If the connection's task sees the close before it writes, the request comes
    // back unsent and goes on a new connection. If it writes first, the request
    // has left and only the caller may send it again: the error says the
    // connection broke (the gateway judges it a reset, retried where the route
    // allows), never that the endpoint answered badly.
    match pool.send(addr, get("/")).await {
        Ok((resp, _lease)) => assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok"),
        Err(SendError::Http(e)) => {
            assert!(
                e.is_incomplete_message() || e.is_closed() || e.is_canceled(),
                "{e}"
            );
            assert_eq!(fetch(&pool, addr).await, "ok");
        }
        Err(e) => panic!("{e}"),
    }
}

/// An upstream whose first connection answers one request and then, having read
/// the next, closes without answering (as an endpoint closing an idle connection
/// does when a request arrives just then); later connections answer every request.
/// Counts connections and request heads read.
async fn closes_under_the_second_request() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, h) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let first = a.fetch_add(1, Ordering::SeqCst) == 0;
            let h = h.clone();
            tokio::spawn(async move {
                for answered in 0.. {
                    if !read_head(&mut s).await {
                        return;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    if first && answered == 1 {
                        return;
                    }
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (addr, accepted, heads)
}

#[tokio::test]
async fn a_get_that_an_idle_connection_breaks_under_is_sent_again_on_a_new_one() {
    let (addr, accepted, heads) = closes_under_the_second_request().await;
    // Every pooled connection counts as idle long enough.
    let pool = Arc::new(new_pool(8, LONG).replay_after(Duration::ZERO));
    assert_eq!(fetch(&pool, addr).await, "ok");
    assert_eq!(
        fetch(&pool, addr).await,
        "ok",
        "the broken request was sent again"
    );
    assert_eq!(heads.load(Ordering::SeqCst), 3);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_with_a_body_or_on_a_briefly_idle_connection_is_not_sent_again() {
    for (replay_after, with_body) in [(Duration::ZERO, true), (LONG, false)] {
        let (addr, accepted, heads) = closes_under_the_second_request().await;
        let pool = Arc::new(new_pool(8, LONG).replay_after(replay_after));
        assert_eq!(fetch(&pool, addr).await, "ok");
        let req = if with_body {
            Request::post("/")
                .header("host", "upstream")
                .header("content-length", "4")
                .body(
                    http_body_util::Full::new(Bytes::from_static(b"data"))
                        .map_err(Into::into)
                        .boxed(),
                )
                .unwrap()
        } else {
            get("/")
        };
        match pool.send(addr, req).await {
            Err(SendError::Http(e)) => {
                // The endpoint's close comes as an end of stream, or as a reset
                // when the body it left unread was still in its socket.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text = format!("{text}: {s}");
                    source = s.source();
                }
                let text = text.to_lowercase();
                assert!(
                    e.is_incomplete_message() || text.contains("reset") || text.contains("broken pipe"),
                    "{text}"
                );
            }
            Err(e) => panic!("{e}"),
            Ok((resp, _)) => panic!("sent again: {}", resp.status()),
        }
        assert_eq!(heads.load(Ordering::SeqCst), 2, "body {with_body}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "body {with_body}");
    }
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = pool(8, LONG);
    match pool.send(addr, get("/")).await {
        Err(SendError::Connect(e)) => assert!(e.to_string().contains("refused"), "{e}"),
        other => panic!(
            "expected a connect error, got {:?}",
            other.map(|(r, _)| r.status())
        ),
    }
}
