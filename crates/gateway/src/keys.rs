//! Token issuers (`[gateway.jwt.<name>]`): their rules, and their key sets read
//! from a file or fetched (a JWKS URL, or OIDC discovery) over HTTP(S), refreshed
//! on an interval and on demand for an unknown key, the last good set kept when a
//! fetch fails. A failed fetch is logged and counted, never fatal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use palisade_edge::{KeyRing, KeySet, Rules};

use crate::config::{ConfigError, JwtProviderSection, UpstreamTlsConfig};
use crate::connect::UpstreamTls;

/// The largest key set or discovery document read.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// One issuer: its rules, its key ring, and where its keys come from.
pub struct Provider {
    /// Its name in the file.
    pub name: String,
    /// The rules its tokens are checked by.
    pub rules: Rules,
    /// Its keys.
    pub ring: Arc<KeyRing>,
    /// Verified tokens each route keeps.
    pub cached_tokens: usize,
    source: Source,
    section: JwtProviderSection,
    tls: Option<UpstreamTls>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Where an issuer's keys come from.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Jwks(Uri),
    Discovery(Uri),
}

impl Provider {
    /// Builds issuer `name` from `s`, a key file read now; problems go to `p`.
    pub(crate) fn compile(name: &str, s: &JwtProviderSection, p: &mut Vec<ConfigError>) -> Option<Provider> {
        let at = format!("gateway.jwt.{name}");
        let before = p.len();
        let mut algorithms = Vec::new();
        for (i, a) in s.algorithms.iter().enumerate() {
            match palisade_edge::jwt::algorithm(a) {
                Some(alg) => algorithms.push(alg),
                None => p.push(ConfigError::new(
                    format!("{at}.algorithms[{i}]"),
                    format!("`{a}` is not an algorithm (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
                )),
            }
        }
        if s.algorithms.is_empty() {
            p.push(ConfigError::new(
                format!("{at}.algorithms"),
                "name at least one algorithm",
            ));
        }
        let source = source(s, &at, p);
        for (field, d) in [
            ("refresh", s.refresh),
            ("min_refetch_interval", s.min_refetch_interval),
            ("fetch_timeout", s.fetch_timeout),
        ] {
            if d.get().is_zero() {
                p.push(ConfigError::new(format!("{at}.{field}"), "must be more than 0"));
            }
        }
        if !(256..=1 << 20).contains(&s.max_token_bytes) {
            p.push(ConfigError::new(
                format!("{at}.max_token_bytes"),
                "must be between 256 and 1048576",
            ));
        }
        let tls = match (&source, &s.ca_file) {
            (Some(Source::Jwks(u) | Source::Discovery(u)), ca) if u.scheme_str() == Some("https") => {
                let c = UpstreamTlsConfig {
                    ca_file: ca.clone(),
                    server_name: u.host().map(str::to_owned),
                    cert_file: None,
                    key_file: None,
                };
                UpstreamTls::new(&at, &c, false).map_err(|e| p.push(e)).ok()
            }
            _ => None,
        };
        let ring = Arc::new(KeyRing::new(s.min_refetch_interval.get()));
        if let Some(Source::File(path)) = &source {
            match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| KeySet::from_jwks(&b, &algorithms).map_err(|e| e.to_string()))
            {
                Ok(set) => ring.install(set),
                Err(e) => p.push(ConfigError::new(
                    format!("{at}.keys_file"),
                    format!("{}: {e}", path.display()),
                )),
            }
        }
        if p.len() > before {
            return None;
        }
        let rules = Rules {
            issuer: s.issuer.clone(),
            audiences: s.audiences.clone(),
            algorithms,
            leeway: s.leeway.get().as_secs(),
            require_exp: s.require_exp,
            max_token_bytes: s.max_token_bytes,
        };
        Some(Provider {
            name: name.to_owned(),
            rules,
            ring,
            cached_tokens: s.cached_tokens,
            source: source?,
            section: s.clone(),
            tls,
        })
    }

    /// Whether it holds a key set (read, fetched, or kept from before a reload).
    pub fn has_keys(&self) -> bool {
        self.ring.generation() > 0
    }

    /// Whether its keys are fetched (not read from a file).
    pub fn fetches(&self) -> bool {
        !matches!(self.source, Source::File(_))
    }

    /// Takes `old`'s keys when it is the same issuer, configured the same, so a
    /// reload serves at once with the last good set.
    pub(crate) fn adopt(&self, old: &Provider) {
        if self.fetches() && old.section == self.section && old.ring.generation() > 0 {
            self.ring.install((*old.ring.keys()).clone());
        }
    }

    /// Fetches the key set now and installs it; the error says what failed.
    pub async fn fetch(&self) -> Result<(), String> {
        let timeout = self.section.fetch_timeout.get();
        let fetched = tokio::time::timeout(timeout, self.fetch_set()).await;
        let result = fetched.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("palisade_jwks_fetches_total", "provider" => self.name.clone(), "outcome" => outcome)
            .increment(1);
        match result {
            Ok(set) => {
                tracing::info!(provider = %self.name, keys = set.len(), "key set fetched");
                self.ring.install(set);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(provider = %self.name, error = %e, "key set fetch failed; the last good set stays");
                Err(e)
            }
        }
    }

    async fn fetch_set(&self) -> Result<KeySet, String> {
        let jwks = match &self.source {
            Source::File(_) => return Ok((*self.ring.keys()).clone()),
            Source::Jwks(u) => u.clone(),
            Source::Discovery(u) => {
                let doc = get(u, self.tls.as_ref()).await?;
                let doc: serde_json::Value =
                    serde_json::from_slice(&doc).map_err(|e| format!("discovery document: {e}"))?;
                let url = doc["jwks_uri"]
                    .as_str()
                    .ok_or("the discovery document names no jwks_uri")?;
                url.parse::<Uri>().map_err(|e| format!("jwks_uri {url:?}: {e}"))?
            }
        };
        let body = get(&jwks, self.tls.as_ref()).await?;
        KeySet::from_jwks(&body, &self.rules.algorithms).map_err(|e| e.to_string())
    }

    /// Fetches again for a token naming an unknown key (or while it has no keys),
    /// unless one went out within `min_refetch_interval`; whether the set was
    /// replaced.
    pub async fn refetch_for_unknown_key(&self) -> bool {
        self.fetches() && self.ring.may_refetch(Instant::now()) && self.fetch().await.is_ok()
    }

    /// Fetches until `stop`: at once when it holds no keys yet, then every
    /// `refresh` (after a failure, sooner: doubling from a second up to `refresh`).
    pub(crate) async fn refresh(self: Arc<Self>) {
        if !self.fetches() {
            return;
        }
        let every = self.section.refresh.get();
        let mut wait = if self.ring.generation() == 0 {
            Duration::ZERO
        } else {
            every
        };
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(wait).await;
            match self.fetch().await {
                Ok(()) => {
                    failures = 0;
                    wait = every;
                }
                Err(_) => {
                    failures += 1;
                    wait = Duration::from_secs(1u64 << failures.min(10)).min(every);
                }
            }
        }
    }
}

/// The key source `s` names: exactly one of `keys_file`, `jwks_url`, `discovery`.
fn source(s: &JwtProviderSection, at: &str, p: &mut Vec<ConfigError>) -> Option<Source> {
    let url = |field: &str, u: &str, p: &mut Vec<ConfigError>| {
        crate::http_client::http_url(u, &format!("{at}.{field}"), p)
    };
    match (&s.keys_file, &s.jwks_url, &s.discovery) {
        (Some(f), None, None) => Some(Source::File(f.clone())),
        (None, Some(u), None) => url("jwks_url", u, p).map(Source::Jwks),
        (None, None, Some(u)) => {
            let base = u.trim_end_matches('/');
            url(
                "discovery",
                &format!("{base}/.well-known/openid-configuration"),
                p,
            )
            .map(Source::Discovery)
        }
        _ => {
            p.push(ConfigError::new(
                at,
                "name exactly one of keys_file, jwks_url, discovery",
            ));
            None
        }
    }
}

/// `GET uri`, its body if the answer is a `200` (up to 1 MiB).
async fn get(uri: &Uri, tls: Option<&UpstreamTls>) -> Result<Bytes, String> {
    let mut client = crate::http_client::Client::new(uri.clone(), tls.cloned(), Duration::from_secs(5));
    client.get(uri, MAX_DOCUMENT_BYTES).await
}
