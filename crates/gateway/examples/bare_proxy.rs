//! The floor under the gateway, for the load harness (`bench/gateway.sh`): hyper's
//! HTTP/1.1 server in front of hyper-util's pooled client, forwarding every request
//! to one upstream with no routing, policies, headers or metrics. The gap between
//! this and `palisade gateway` is what Palisade's own request path costs.
//!
//! `cargo run --release -p palisade-gateway --example bare_proxy -- LISTEN UPSTREAM [WORKERS]`

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

mod common;

fn main() {
    common::run("bare_proxy", worker);
}

fn worker(listener: std::net::TcpListener, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(128)
            .build(connector);
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: http::Request<Incoming>| {
                    let client = client.clone();
                    async move {
                        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        *req.uri_mut() = format!("http://{upstream}{pq}").parse().expect("a valid uri");
                        let resp = match client.request(req).await {
                            Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
                            Err(_) => {
                                let mut r = http::Response::new(palisade_gateway::empty());
                                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                r
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
