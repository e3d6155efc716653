//! Protocols through the gateway, against real sockets: WebSocket pass-through
//! (HTTP/1.1 upgrade, and HTTP/2 extended CONNECT to an HTTP/1.1 upstream),
//! gRPC-style bidirectional streaming with trailers over h2c on both sides, and TLS with ALPN choosing HTTP/2 or HTTP/1.1 on the listener. Each test
//! waits for events (a frame echoed back), never for time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_gateway::{Config, Handle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A body fed frame by frame from a channel; it ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(8);
    (tx, ChannelBody(rx))
}

async fn gateway(cluster_extra: &str, upstream: SocketAddr) -> Handle {
    gateway_with("", cluster_extra, upstream).await
}

async fn gateway_with(gateway_extra: &str, cluster_extra: &str, upstream: SocketAddr) -> Handle {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n{gateway_extra}\n\
         [[routes]]\nname = \"r\"\ncluster = \"c\"\n\
         [clusters.c]\nendpoints = [\"{upstream}\"]\n{cluster_extra}\n"
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

/// Binds a loopback listener and hands every accepted connection to `serve`.
async fn upstream(serve: impl Fn(TcpStream) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            serve(stream);
        }
    });
    addr
}

/// Sends `request` on a new connection to `addr` and reads the answer's head.
async fn raw_head(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// An HTTP/1.1 upstream that accepts `Upgrade: websocket` and then echoes what it
/// reads, upper-cased (so the test knows the bytes went through it).
async fn websocket_upstream() -> SocketAddr {
    upstream(|stream| {
        let svc = service_fn(|mut req: Request<Incoming>| async move {
            // Like a real WebSocket server (RFC 6455 section 4.2.1), it wants a key
            // and version 13.
            let key = req.headers().get("sec-websocket-key").cloned();
            if req.headers().get("upgrade").is_none_or(|v| v != "websocket")
                || key.is_none()
                || req
                    .headers()
                    .get("sec-websocket-version")
                    .is_none_or(|v| v != "13")
            {
                let mut r = Response::new(http_body_util::Full::new(Bytes::from_static(b"no upgrade")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok::<_, Infallible>(r);
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on_upgrade.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    io.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
                }
            });
            let mut r = Response::new(http_body_util::Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("Upgrade"));
            if let Some(k) = key {
                r.headers_mut().insert("sec-websocket-accept", k);
            }
            Ok(r)
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades(),
        );
    })
    .await
}

/// Reads an HTTP/1.1 response head from `s`, byte by byte so nothing after it is
/// consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.expect("connection closed inside the head");
        head.push(b);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn websocket_upgrades_pass_through_both_ways() {
    let up = websocket_upstream().await;
    let gw = gateway("", up).await;
    let (mut s, head) = raw_head(
        gw.addr,
        b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: dghlihnhbxbszsbub25jzq=="),
        "the upstream's handshake answer passes: {head}"
    );
    // Bytes flow both ways through the upstream, more than once.
    for msg in [&b"hello"[..], b"again, longer"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.to_ascii_uppercase());
    }
    // Closing our side closes the tunnel: the upstream's echo loop ends and the
    // gateway closes the client side.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    gw.shutdown().await;
}

const WEBSOCKET_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Opens a WebSocket tunnel through `gw` and checks one message goes round.
async fn open_tunnel(gw: &Handle) -> TcpStream {
    let (mut s, head) = raw_head(gw.addr, WEBSOCKET_REQUEST).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"HI");
    s
}

/// Reads until the gateway closes the connection (a guard fails the test if it
/// never does).
async fn closed_by_gateway(s: &mut TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut rest))
        .await
        .expect("the gateway never closed the tunnel")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn an_idle_tunnel_is_closed() {
    let up = websocket_upstream().await;
    let gw = gateway_with("tunnel_idle_timeout = \"300ms\"", "", up).await;
    let mut s = open_tunnel(&gw).await;
    assert_eq!(gw.runtime().tunnels.open(), 1);
    // Nothing more is sent: the gateway closes the tunnel on its own.
    closed_by_gateway(&mut s).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_waits_for_open_tunnels_then_closes_them() {
    let up = websocket_upstream().await;
    let gw = gateway_with("drain_timeout = \"300ms\"", "", up).await;
    let mut s = open_tunnel(&gw).await;
    let tunnels = gw.runtime().tunnels.clone();
    gw.shutdown().await;
    // The drain counted the tunnel and, its time over, closed it.
    closed_by_gateway(&mut s).await;
    tunnels.drained().await;
    assert_eq!(tunnels.open(), 0);
}

#[tokio::test]
async fn an_open_tunnel_holds_its_clusters_bulkhead_slot() {
    let up = websocket_upstream().await;
    // (A short drain: the tunnel is still open when the test shuts the gateway down.)
    let gw = gateway_with("drain_timeout = \"100ms\"", "max_concurrent = 1", up).await;
    let _tunnel = open_tunnel(&gw).await;
    let (_, head) = raw_head(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("x-palisade-cause: bulkhead_full"), "{head}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_the_upstream_refuses_is_an_ordinary_answer() {
    let up = websocket_upstream().await;
    let gw = gateway("", up).await;
    let (_, head) = raw_head(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c-nonsense\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    gw.shutdown().await;
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// An HTTP/2 (h2c) client connection to `gw`, past a first exchange: once an answer
/// is in, the gateway's SETTINGS, which allow extended CONNECT, have been read.
async fn h2_client(gw: &Handle) -> H2Sender {
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let plain = Request::get(format!("http://{}/", gw.addr))
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.send_request(plain).await.unwrap();
    sender
}

/// Asks for a WebSocket over HTTP/2 (RFC 8441) of the given version.
async fn websocket_over_h2(sender: &mut H2Sender, gw: &Handle, version: &str) -> Response<Incoming> {
    let mut connect = Request::connect(format!("http://{}/chat", gw.addr))
        .header("sec-websocket-version", version)
        .body(http_body_util::Empty::new())
        .unwrap();
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    sender.send_request(connect).await.unwrap()
}

#[tokio::test]
async fn websocket_over_http2_reaches_an_http1_upstream_as_an_upgrade() {
    let up = websocket_upstream().await;
    // The extended CONNECT is routed as the GET it stands for.
    let gw = gateway("[routes.match]\nmethods = [\"GET\"]", up).await;
    let mut sender = h2_client(&gw).await;
    let mut tunnels = Vec::new();
    // Two tunnels on one HTTP/2 connection, both open at once.
    for text in [&b"over h2"[..], b"two"] {
        let mut resp = websocket_over_h2(&mut sender, &gw, "13").await;
        // The upstream switched only for a key the gateway made up; HTTP/2 hears 200.
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("sec-websocket-accept").is_none());
        let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
        io.write_all(text).await.unwrap();
        let mut buf = vec![0u8; text.len()];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, text.to_ascii_uppercase());
        tunnels.push(io);
    }
    drop(tunnels);
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_over_http2_refused_by_the_upstream_is_its_answer() {
    let up = websocket_upstream().await;
    let gw = gateway("", up).await;
    let mut sender = h2_client(&gw).await;
    // Version 8 is not one the upstream speaks: its 400 passes through.
    let resp = websocket_over_h2(&mut sender, &gw, "8").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "no upgrade");
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_over_http2_answered_200_without_switching_is_a_502() {
    let up = plain_upstream().await;
    let gw = gateway("", up).await;
    let mut sender = h2_client(&gw).await;
    let resp = websocket_over_h2(&mut sender, &gw, "13").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["x-palisade-cause"], "protocol_error");
    gw.shutdown().await;
}

/// An h2c upstream in the manner of a gRPC bidirectional stream: it answers at once
/// and echoes every request frame as it arrives, then ends with trailers.
async fn grpc_upstream() -> SocketAddr {
    upstream(|stream| {
        let svc = service_fn(|req: Request<Incoming>| async move {
            let (tx, body) = channel_body();
            let te = req.headers().get("te").cloned();
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        let echo = [b"echo:".as_slice(), &data].concat();
                        if tx.send(Frame::data(Bytes::from(echo))).await.is_err() {
                            return;
                        }
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let saw_te = te.is_some_and(|v| v == "trailers");
                trailers.insert(
                    "x-saw-te-trailers",
                    HeaderValue::from_static(if saw_te { "yes" } else { "no" }),
                );
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            let mut r = Response::new(body);
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok::<_, Infallible>(r)
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc),
        );
    })
    .await
}

/// Runs one bidirectional stream over `sender`: each message is echoed before the
/// next is sent (so nothing is buffered on the way), then the trailers arrive.
async fn grpc_chat(sender: &mut hyper::client::conn::http2::SendRequest<ChannelBody>, authority: &str) {
    let (tx, body) = channel_body();
    let req = Request::post(format!("https://{authority}/echo.Echo/Chat"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    tx.send(Frame::data(Bytes::from_static(b"one"))).await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    let mut next_data = async || loop {
        let frame = body.frame().await.expect("stream ended early").unwrap();
        if let Ok(d) = frame.into_data() {
            return d;
        }
    };
    assert_eq!(next_data().await, "echo:one");
    tx.send(Frame::data(Bytes::from_static(b"two"))).await.unwrap();
    assert_eq!(next_data().await, "echo:two");
    drop(tx);
    let trailers = loop {
        let frame = body.frame().await.expect("no trailers").unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-saw-te-trailers"], "yes",
        "TE: trailers reaches the upstream"
    );
}

#[tokio::test]
async fn grpc_bidirectional_streaming_and_trailers_pass_over_h2c() {
    let up = grpc_upstream().await;
    let gw = gateway("protocol = \"h2c\"", up).await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Two streams on one client connection, one after the other.
    grpc_chat(&mut sender, &gw.addr.to_string()).await;
    grpc_chat(&mut sender, &gw.addr.to_string()).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_to_an_h2c_cluster_is_a_502_that_says_why() {
    let up = grpc_upstream().await;
    let gw = gateway("protocol = \"h2c\"", up).await;
    let (_, head) = raw_head(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("x-palisade-cause: protocol_error"), "{head}");
    gw.shutdown().await;
}

/// A plain HTTP/1.1 upstream answering with the `x-forwarded-proto` it was sent.
async fn plain_upstream() -> SocketAddr {
    upstream(|stream| {
        let svc = service_fn(|req: Request<Incoming>| async move {
            let proto = req.headers().get("x-forwarded-proto").cloned();
            let body = format!("proto={}", proto.as_ref().map_or("-", |v| v.to_str().unwrap()));
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(body))))
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
    })
    .await
}

mod tls {
    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use super::*;

    /// A self-signed certificate for `localhost`, written as PEM files.
    struct TestCert {
        cert_file: PathBuf,
        key_file: PathBuf,
        der: CertificateDer<'static>,
    }

    fn test_cert(tag: &str) -> TestCert {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!("palisade-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, made.cert.pem()).unwrap();
        std::fs::write(&key_file, made.signing_key.serialize_pem()).unwrap();
        TestCert {
            cert_file,
            key_file,
            der: made.cert.der().clone(),
        }
    }

    fn tls_section(c: &TestCert) -> String {
        format!(
            "[gateway.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            c.cert_file.display().to_string(),
            c.key_file.display().to_string()
        )
    }

    fn tls_config(c: &TestCert, upstream: SocketAddr) -> Config {
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
             {}\n[[routes]]\nname = \"r\"\ncluster = \"c\"\n\
             [clusters.c]\nendpoints = [\"{upstream}\"]\n",
            tls_section(c)
        );
        Config::from_toml(&text).unwrap()
    }

    /// Connects trusting only `trusted`, offering `alpn`.
    async fn connect(
        addr: SocketAddr,
        trusted: &CertificateDer<'static>,
        alpn: &[u8],
    ) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    async fn get_h2(stream: TlsStream<TcpStream>) -> String {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://localhost/x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn alpn_picks_h2_or_http1_and_the_upstream_hears_https() {
        let cert = test_cert("alpn");
        let gw = palisade_gateway::start(tls_config(&cert, plain_upstream().await), None)
            .await
            .unwrap();

        let s = connect(gw.addr, &cert.der, b"h2").await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(get_h2(s).await, "proto=https");

        let s = connect(gw.addr, &cert.der, b"http/1.1").await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/x")
            .header("host", "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_11);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "proto=https");
        gw.shutdown().await;
    }

    #[tokio::test]
    async fn plaintext_on_the_tls_port_is_refused_and_the_gateway_keeps_serving() {
        let cert = test_cert("plain");
        let gw = palisade_gateway::start(tls_config(&cert, plain_upstream().await), None)
            .await
            .unwrap();
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        assert!(!answer.starts_with(b"HTTP/"), "no HTTP answer in the clear");
        let s = connect(gw.addr, &cert.der, b"h2").await;
        assert_eq!(get_h2(s).await, "proto=https");
        gw.shutdown().await;
    }

    #[tokio::test]
    async fn a_reload_rotates_the_certificate_for_new_connections() {
        let first = test_cert("rotate-1");
        let second = test_cert("rotate-2");
        let upstream = plain_upstream().await;
        let gw = palisade_gateway::start(tls_config(&first, upstream), None)
            .await
            .unwrap();
        let old = connect(gw.addr, &first.der, b"h2").await;
        gw.reload(tls_config(&second, upstream)).await.unwrap();
        let new = connect(gw.addr, &second.der, b"h2").await;
        assert_eq!(new.get_ref().1.peer_certificates().unwrap()[0], second.der);
        assert_eq!(get_h2(new).await, "proto=https");
        // The connection made before the reload keeps its certificate and works.
        assert_eq!(old.get_ref().1.peer_certificates().unwrap()[0], first.der);
        assert_eq!(get_h2(old).await, "proto=https");
        gw.shutdown().await;
    }

    #[tokio::test]
    async fn a_missing_or_wrong_key_is_a_config_error_naming_the_field() {
        let cert = test_cert("bad");
        let upstream = plain_upstream().await;
        let mut config = tls_config(&cert, upstream);
        config.gateway.tls.as_mut().unwrap().key_file = cert.cert_file.clone();
        let err = palisade_gateway::start(config, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.tls.key_file"), "{err}");
        let mut config = tls_config(&cert, upstream);
        config.gateway.tls.as_mut().unwrap().cert_file = "/nonexistent/cert.pem".into();
        let err = palisade_gateway::start(config, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.tls.cert_file"), "{err}");
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }

    /// An upstream serving TLS with `c` (ALPN `h2`, `http/1.1`) that answers with
    /// the HTTP version it heard.
    async fn tls_upstream(c: &TestCert) -> SocketAddr {
        let tls = palisade_gateway::tls::acceptor(&palisade_gateway::config::TlsConfig {
            cert_file: c.cert_file.clone(),
            key_file: c.key_file.clone(),
            alpn: vec!["h2".into(), "http/1.1".into()],
            handshake_timeout: palisade_gateway::config::Dur(std::time::Duration::from_secs(10)),
        })
        .unwrap();
        upstream(move |stream| {
            let acceptor = tls.acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let heard = format!("{:?}", req.version());
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(heard))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        })
        .await
    }

    async fn get_text(addr: SocketAddr) -> (StatusCode, HeaderMap, String) {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>();
        let resp = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn upstream_tls(ca: &TestCert, name: &str) -> String {
        format!(
            "tls = {{ ca_file = {:?}, server_name = \"{name}\" }}",
            ca.cert_file.display().to_string()
        )
    }

    #[tokio::test]
    async fn clusters_reach_endpoints_over_tls_and_check_their_certificate() {
        let cert = test_cert("upstream");
        let up = tls_upstream(&cert).await;
        for (protocol, heard) in [("http1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
            let gw = gateway(
                &format!("protocol = \"{protocol}\"\n{}", upstream_tls(&cert, "localhost")),
                up,
            )
            .await;
            for _ in 0..2 {
                let (status, _, body) = get_text(gw.addr).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                assert_eq!(body, heard);
            }
            gw.shutdown().await;
        }
        // A certificate the cluster does not trust, or one for another name: a 502
        // that says why, and nothing is sent in the clear.
        let stranger = test_cert("stranger");
        for (tls, why) in [
            // (rcgen's self-signed certificates share one issuer name, so webpki
            // finds the stranger as issuer and rejects the signature.)
            (
                upstream_tls(&stranger, "localhost"),
                "invalid peer certificate: BadSignature",
            ),
            (
                upstream_tls(&cert, "elsewhere.example"),
                "certificate not valid for name",
            ),
        ] {
            let gw = gateway(&tls, up).await;
            let (status, headers, body) = get_text(gw.addr).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert_eq!(headers["x-palisade-cause"], "connect_error");
            assert!(body.contains(why), "{body}");
            gw.shutdown().await;
        }
    }

    #[tokio::test]
    async fn upstream_tls_mistakes_are_named() {
        let up = plain_upstream().await;
        let text = |cluster: &str| {
            format!(
                "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
                 [[routes]]\nname = \"r\"\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{up}\"]\n{cluster}\n"
            )
        };
        let err = Config::from_toml(&text("protocol = \"h2\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clusters.c.protocol: `h2` is HTTP/2 over TLS"),
            "{err}"
        );
        let config = Config::from_toml(&text("tls = { ca_file = \"/nonexistent/ca.pem\" }")).unwrap();
        let err = palisade_gateway::start(config, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clusters.c.tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }
}

/// An h2c gRPC upstream that fails every call with `grpc-status: 14` (unavailable):
/// after a message and in trailers, or, with `trailers_only`, in the response's
/// headers with no body at all.
async fn unavailable_grpc_upstream(trailers_only: bool) -> SocketAddr {
    upstream(move |stream| {
        let svc = service_fn(move |_req: Request<Incoming>| async move {
            let (tx, body) = channel_body();
            let mut r = Response::new(body);
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            if trailers_only {
                r.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("14"));
                drop(tx);
            } else {
                tokio::spawn(async move {
                    let _ = tx.send(Frame::data(Bytes::from_static(b"partial"))).await;
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("14"));
                    let _ = tx.send(Frame::trailers(trailers)).await;
                });
            }
            Ok::<_, Infallible>(r)
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc),
        );
    })
    .await
}

/// One unary call through the gateway: the answer's status, its cause header and
/// the `grpc-status` it carried (in trailers or headers).
async fn grpc_call(addr: SocketAddr) -> (StatusCode, Option<String>, Option<String>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}/svc.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let text = |v: &HeaderValue| v.to_str().unwrap().to_string();
    let cause = resp.headers().get("x-palisade-cause").map(text);
    let mut grpc = resp.headers().get("grpc-status").map(text);
    let collected = resp.into_body().collect().await.unwrap();
    if let Some(t) = collected.trailers() {
        grpc = t.get("grpc-status").map(text).or(grpc);
    }
    (status, cause, grpc)
}

#[tokio::test]
async fn grpc_unavailable_in_trailers_or_headers_opens_the_endpoints_breaker() {
    for trailers_only in [false, true] {
        let up = unavailable_grpc_upstream(trailers_only).await;
        let gw = gateway(
            "protocol = \"h2c\"\nbreaker = { consecutive_failures = 2, failure_rate = 0.0, open = \"1h\", max_open = \"1h\" }",
            up,
        )
        .await;
        // Both failures pass through as they are: HTTP 200 with grpc-status 14.
        for _ in 0..2 {
            let (status, cause, grpc) = grpc_call(gw.addr).await;
            assert_eq!(status, StatusCode::OK, "trailers_only={trailers_only}");
            assert_eq!(cause, None);
            assert_eq!(grpc.as_deref(), Some("14"));
        }
        // The breaker heard them as failures and is open now.
        let (status, cause, _) = grpc_call(gw.addr).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "trailers_only={trailers_only}"
        );
        assert_eq!(cause.as_deref(), Some("circuit_open"));
        gw.shutdown().await;
    }
}
