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
