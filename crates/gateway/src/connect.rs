//! Connections to upstream endpoints: TCP (with the cluster's connect timeout and
//! `TCP_NODELAY`), and for clusters with `[clusters.<name>.tls]`, TLS on
//! top (rustls, `ring`): the endpoint's certificate is checked against the
//! configured CAs (or the Mozilla roots of `webpki-roots`) and the configured server
//! name (or the endpoint's IP address); ALPN offers `h2` or `http/1.1` to match the
//! cluster's protocol; a client certificate is presented when configured.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{ConfigError, UpstreamTlsConfig};

/// TLS settings of one cluster, ready to connect with.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    h2: bool,
}

impl UpstreamTls {
    /// Builds the TLS client configured by `c` (`at`: its path in the file); `h2`
    /// offers HTTP/2 by ALPN (else HTTP/1.1). Errors name the field.
    pub fn new(at: &str, c: &UpstreamTlsConfig, h2: bool) -> Result<Self, ConfigError> {
        let mut roots = RootCertStore::empty();
        match &c.ca_file {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(Iterator::collect)
                    .map_err(|e| {
                        ConfigError::new(
                            format!("{at}.ca_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.ca_file"),
                        format!("{} holds no usable certificate", path.display()),
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(at, e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect)
                    .map_err(|e| {
                        ConfigError::new(
                            format!("{at}.cert_file"),
                            format!("cannot read {}: {e}", cert.display()),
                        )
                    })?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    ConfigError::new(
                        format!("{at}.key_file"),
                        format!("cannot read a private key from {}: {e}", key.display()),
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConfigError::new(at, format!("the key does not fit the certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(ConfigError::new(at, "cert_file and key_file go together")),
        };
        config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let server_name = match &c.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| ConfigError::new(format!("{at}.server_name"), format!("`{name}`: {e}")))?,
            ),
            None => None,
        };
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            h2,
        })
    }
}

/// Why a connection to an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP did not connect within the cluster's `connect_timeout`.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// TCP or TLS failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The endpoint's TLS did not agree to HTTP/2, which the cluster speaks.
    #[error("the endpoint did not agree to HTTP/2 (ALPN h2)")]
    NoH2,
}

/// Connects to an endpoint: TCP (within the cluster's connect timeout, with
/// `TCP_NODELAY`), then TLS when the cluster has it.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl Connector {
    /// A connector giving up on TCP after `connect_timeout`, with TLS when `tls` is
    /// set.
    pub fn new(connect_timeout: Duration, tls: Option<UpstreamTls>) -> Self {
        Connector { connect_timeout, tls }
    }

    /// A connection to the endpoint at `addr`. TLS checks the configured server
    /// name, or else the address itself.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, ConnectError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(tcp) => tcp?,
            Err(_) => return Err(ConnectError::Timeout(self.connect_timeout)),
        };
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Conn::Plain(TokioIo::new(tcp)));
        };
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let stream = tls.connector.connect(name, tcp).await?;
        if tls.h2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoH2);
        }
        Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
    }
}

/// A connection to an endpoint.
pub enum Conn {
    /// Cleartext.
    Plain(TokioIo<TcpStream>),
    /// TLS (boxed: a TLS session is some hundreds of bytes, a socket a few).
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }
}
