//! The gateway's own HTTP/1.1 calls to the services around it (a token issuer's
//! keys, the trace collector, etcd): one connection to one server, opened when a
//! call needs it and kept while it works, through the same connector (and TLS) as
//! the upstreams.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::connect::{Connector, UpstreamTls};

/// A connection to the server of a URL.
pub struct Client {
    base: Uri,
    connector: Connector,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the server `base` (an `http` or `https` URL; TLS with `tls`),
    /// whose connections must open within `connect_timeout`.
    pub fn new(base: Uri, tls: Option<UpstreamTls>, connect_timeout: Duration) -> Client {
        let https = base.scheme_str() == Some("https");
        Client {
            connector: Connector::new(connect_timeout, tls.filter(|_| https)),
            base,
            conn: None,
        }
    }

    /// The server's URL.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Sends `req` (its target a path, its `Host` set here) on the open
    /// connection, or a new one; the error says what failed.
    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Result<Response<Incoming>, String> {
        let base = &self.base;
        if let Some(a) = base.authority()
            && let Ok(host) = header::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let ready = match self.conn.as_mut() {
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            self.conn = Some(self.open().await?);
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.send_request(req).await.map_err(|e| {
            self.conn = None;
            format!("{base}: {e}")
        })
    }

    /// `GET uri` (on this client's server): its body if the answer is a `200`, up
    /// to `limit` bytes.
    pub async fn get(&mut self, uri: &Uri, limit: usize) -> Result<Bytes, String> {
        let req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::ACCEPT, "application/json")
            .body(Full::default())
            .map_err(|e| e.to_string())?;
        let resp = self.send(req).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{uri} answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("{uri}: {e}"))?;
        Ok(body.to_bytes())
    }

    /// Drops the open connection (after a call given up half way).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let base = &self.base;
        let host = base.host().ok_or_else(|| format!("{base}: no host"))?;
        let https = base.scheme_str() == Some("https");
        let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let conn = self
            .connector
            .connect(addr)
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        let (send, connection) = hyper::client::conn::http1::handshake(conn)
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        tokio::spawn(connection);
        Ok(send)
    }
}

/// `s` as an `http` or `https` URL with a host; otherwise a problem for `at`.
pub fn http_url(s: &str, at: &str, p: &mut Vec<crate::config::ConfigError>) -> Option<Uri> {
    match s.parse::<Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Some(u),
        _ => {
            p.push(crate::config::ConfigError::new(
                at,
                format!("`{s}` is not an http(s) URL"),
            ));
            None
        }
    }
}
