//! palisade-gateway: a resilient reverse proxy for HTTP/1.1 and HTTP/2 (TLS with ALPN
//! or h2c), gRPC and WebSocket.
//!
//! Configuration ([`config`]) becomes a live [`runtime::Runtime`] (routes, clusters,
//! breakers, clients, probes); [`server::start`] runs the proxy listener and the
//! admin listener and swaps runtimes on reload without dropping requests;
//! [`proxy::handle`] is the request path.

pub mod admin;
pub mod cause;
pub mod config;
pub mod conn;
pub mod connect;
pub mod dashboard;
pub mod discovery;
pub mod etcd;
pub mod files;
pub mod global_limit;
pub mod guard;
pub mod health;
pub mod http_client;
pub mod idempotent;
pub mod jobs;
pub mod keys;
pub mod load;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod responses;
pub mod route;
pub mod runtime;
pub mod script_conn;
pub mod server;
pub mod source;
pub mod split;
pub mod tls;
pub mod totals;
pub mod trace;
pub mod tunnel;
pub mod upstream;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the gateway handles.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub use config::{Config, ConfigError, ConfigErrors};
pub use server::{Handle, Reloads, start};
