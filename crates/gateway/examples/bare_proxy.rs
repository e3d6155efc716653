//! The floor under the gateway, for the load harness (`bench/gateway.sh`): hyper's
//! HTTP/1.1 server in front of Palisade's connection pool (hyper's client
//! connections), forwarding every request to one upstream with no routing,
//! policies, headers or metrics. The gap between this and `palisade gateway` is what
//! Palisade's own request path costs.
//!
//! `cargo run --release -p palisade-gateway --example bare_proxy -- LISTEN UPSTREAM [WORKERS]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade_gateway::connect::Connector;
use palisade_gateway::pool::Pool;

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
        let connector = Connector::new(Duration::from_secs(1), None);
        let pool = Arc::new(Pool::new(connector, false, 128, Duration::from_secs(90)));
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let pool = pool.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let pool = pool.clone();
                    async move {
                        let (mut parts, body) = req.into_parts();
                        parts.uri = parts
                            .uri
                            .path_and_query()
                            .map_or("/", |p| p.as_str())
                            .parse()
                            .expect("a path");
                        let req = http::Request::from_parts(parts, body.map_err(Into::into).boxed());
                        let resp = match pool.send(upstream, req).await {
                            // The connection goes back to the pool once the body is read.
                            Ok((resp, lease)) => resp.map(|b| {
                                b.map_frame(move |f| {
                                    let _ = &lease;
                                    f
                                })
                                .map_err(Into::into)
                                .boxed()
                            }),
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
