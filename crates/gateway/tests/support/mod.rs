//! What several of the gateway's test files need: an HTTP/1.1 upstream serving a
//! handler on a real socket, and an endpoint's state as `/admin/clusters` shows it.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use palisade_gateway::Handle;
use tokio::net::TcpListener;

/// Serves `handler` over HTTP/1.1 on a fresh loopback port, one task per
/// connection, for as long as the test's runtime runs; returns the address.
/// A handler's error closes the connection without an answer.
pub async fn serve_http1<F, Fut, E>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handler))
                    .await;
            });
        }
    });
    addr
}

/// Endpoint `addr` of cluster `cluster` as `/admin/clusters` shows it.
pub fn endpoint_json(gw: &Handle, cluster: &str, addr: SocketAddr) -> serde_json::Value {
    let clusters = palisade_gateway::admin::clusters_json(&gw.runtime());
    clusters[cluster]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no endpoint {addr} in {clusters}"))
        .clone()
}

/// A client's view of an answer.
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: http::HeaderMap,
    /// Its body, as text.
    pub body: String,
}

impl Answer {
    /// Its `x-palisade-cause`, or empty.
    pub fn cause(&self) -> &str {
        self.headers
            .get("x-palisade-cause")
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// Sends `req` (its path and query) to the gateway at `addr` and reads the answer.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(parts, body);
    let pq = req.uri().path_and_query().unwrap().as_str().to_string();
    *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `GET path` from the gateway at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(addr, Request::get(path).body(Full::default()).unwrap()).await
}

/// A Redis server of the test's own on a free loopback port (the binary
/// `scripts/test` exports), for tests that stop or kill it.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port).await
    }

    /// Starts one on `port` and waits until it answers.
    pub async fn start_on(port: u16) -> RedisServer {
        let bin = std::env::var("PALISADE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let child = std::process::Command::new(bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server could not be started");
        let server = RedisServer { port, child };
        let client = redis::Client::open(server.url()).unwrap();
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return server;
            }
            tokio::task::yield_now().await;
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends it `signal` (`-STOP`, `-CONT`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a gateway on fresh loopback ports with one route, `route` (its name),
/// matching every path, to one cluster of endpoint `up`; `route_lines` add to the
/// route's table.
pub async fn one_route_gateway(up: SocketAddr, route: &str, route_lines: &str) -> Handle {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\n\
         [[routes]]\nname = \"{route}\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n{route_lines}\n\n\
         [clusters.c]\nendpoints = [\"{up}\"]\n"
    );
    palisade_gateway::start(palisade_gateway::Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

/// An etcd member of the test's own on free loopback ports with its data in a
/// temporary directory (the binary `scripts/test` exports), for tests that kill
/// and restart it.
pub struct EtcdServer {
    /// Its client port.
    pub port: u16,
    peer: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl EtcdServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> EtcdServer {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let dir = std::env::temp_dir().join(format!(
            "palisade-etcd-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let mut server = EtcdServer {
            port: free(),
            peer: free(),
            dir,
            child: None,
        };
        server.restart().await;
        server
    }

    /// Starts it again (on the same ports, with the same data) after a kill.
    pub async fn restart(&mut self) {
        let bin = std::env::var("PALISADE_TEST_ETCD_SERVER").unwrap_or_else(|_| "etcd".to_owned());
        let (client, peer) = (
            format!("http://127.0.0.1:{}", self.port),
            format!("http://127.0.0.1:{}", self.peer),
        );
        let child = std::process::Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .arg(format!("--initial-cluster=t={peer}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd could not be started");
        self.child = Some(child);
        let etcd =
            palisade_gateway::etcd::Etcd::new(self.url().parse().unwrap(), std::time::Duration::from_secs(1));
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while etcd.get("/").await.is_err() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("etcd did not answer");
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
