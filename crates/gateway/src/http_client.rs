//! The gateway's own HTTP/1.1 calls to the services around it (a token issuer's
//! keys, the trace collector, etcd): one connection to one server, opened when a
//! call needs it and kept while it works, through the same connector (and TLS) as
//! the upstreams.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri, header};
use http_body_util::Full;
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
