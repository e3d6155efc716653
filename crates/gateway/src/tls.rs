//! TLS on the proxy listener: rustls with the `ring` provider, the certificate chain
//! and key read from PEM files, ALPN offering `h2` then `http/1.1` (the connection
//! then speaks what was agreed; HTTP/2 is also recognised by its preface). The
//! acceptor is part of the [`Runtime`](crate::runtime::Runtime), so a reload with
//! new files rotates the certificate for new connections.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// The listener's TLS: the acceptor and how long a client has to finish its handshake.
#[derive(Clone)]
pub struct Tls {
    /// Accepts a connection's handshake.
    pub acceptor: TlsAcceptor,
    /// Time allowed for the handshake.
    pub handshake_timeout: std::time::Duration,
}

/// Builds the listener's TLS for `c`, or says what is wrong, naming the field.
pub fn acceptor(c: &TlsConfig) -> Result<Tls, ConfigError> {
    let at = "gateway.tls";
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert_file)
        .and_then(Iterator::collect)
        .map_err(|e| {
            ConfigError::new(
                format!("{at}.cert_file"),
                format!("cannot read {}: {e}", c.cert_file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.cert_file"),
            format!("{} holds no certificate", c.cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| {
        ConfigError::new(
            format!("{at}.key_file"),
            format!("cannot read a private key from {}: {e}", c.key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(at, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::new(at, format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = c.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        handshake_timeout: c.handshake_timeout.get(),
    })
}
