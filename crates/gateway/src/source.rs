//! Where a gateway's configuration comes from: a file, or a key in etcd
//! (`etcd://host:port/key`, an external configuration store). Both are read by
//! the same function at start, by `palisade check` and on reload, so they cannot
//! disagree.
//!
//! A file is watched by comparing its bytes once a second; an etcd key by a watch
//! from the revision last read. Each new version is compiled first and applied
//! only when valid; a bad one is logged and counted and the running one keeps
//! serving. When etcd cannot be reached the last good configuration serves on and
//! the watch is opened again (after 1 s, doubling up to 30 s) from where it was,
//! so no version written meanwhile is missed.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

use crate::config::{Config, ConfigErrors};
use crate::etcd::{Etcd, Event, Watched};

/// The longest wait for etcd at start and for each read.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// A configuration's source.
#[derive(Debug)]
pub enum ConfigSource {
    /// A TOML file.
    File(PathBuf),
    /// A key in etcd holding the TOML text.
    Etcd {
        /// The etcd member.
        etcd: Box<Etcd>,
        /// The key.
        key: String,
    },
}

/// A configuration read from its source, and what identifies that version.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file's bytes, or the key's revision in etcd.
    pub version: Version,
}

/// What tells two versions of a configuration apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// A file's contents.
    Bytes(Vec<u8>),
    /// An etcd key's `mod_revision`.
    Revision(i64),
}

impl From<PathBuf> for ConfigSource {
    fn from(path: PathBuf) -> Self {
        ConfigSource::File(path)
    }
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Etcd { etcd, key } => {
                let authority = etcd.base().authority().map_or("", |a| a.as_str());
                write!(f, "etcd://{authority}{key}")
            }
        }
    }
}

impl ConfigSource {
    /// The source `--config` names: `etcd://host:port/key`, else a file's path.
    pub fn parse(arg: &str) -> Result<ConfigSource, ConfigErrors> {
        let Some(rest) = arg.strip_prefix("etcd://") else {
            return Ok(ConfigSource::File(PathBuf::from(arg)));
        };
        let bad = || ConfigErrors::one("--config", format!("`{arg}` is not etcd://host:port/key"));
        let (authority, key) = rest.split_once('/').ok_or_else(bad)?;
        if authority.is_empty() || key.is_empty() {
            return Err(bad());
        }
        let base: Uri = format!("http://{authority}").parse().map_err(|_| bad())?;
        Ok(ConfigSource::Etcd {
            etcd: Box::new(Etcd::new(base, ETCD_TIMEOUT)),
            key: format!("/{key}"),
        })
    }

    /// Reads and parses the configuration (it is not compiled here).
    pub async fn load(&self) -> Result<Loaded, ConfigErrors> {
        match self {
            ConfigSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    ConfigErrors::one(path.display().to_string(), format!("cannot read: {e}"))
                })?;
                Ok(Loaded {
                    config: parse(&bytes)?,
                    version: Version::Bytes(bytes),
                })
            }
            ConfigSource::Etcd { etcd, key } => {
                let (kv, _) = etcd
                    .get(key)
                    .await
                    .map_err(|e| ConfigErrors::one("--config", format!("etcd cannot be reached: {e}")))?;
                let kv =
                    kv.ok_or_else(|| ConfigErrors::one("--config", format!("etcd holds no key {key}")))?;
                Ok(Loaded {
                    config: parse(&kv.value)?,
                    version: Version::Revision(kv.mod_revision),
                })
            }
        }
    }

    /// Calls `apply` with each new version of the configuration after `last`
    /// (parsed, or why it does not parse); never returns (the caller drops it at
    /// shutdown).
    pub async fn follow<F, Fut>(&self, last: Version, mut apply: F)
    where
        F: FnMut(Result<Config, ConfigErrors>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        match self {
            ConfigSource::File(path) => {
                let Version::Bytes(mut seen) = last else { return };
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Ok(bytes) = std::fs::read(path) else { continue };
                    if bytes == seen {
                        continue;
                    }
                    seen = bytes;
                    apply(parse(&seen)).await;
                }
            }
            ConfigSource::Etcd { etcd, key } => {
                let Version::Revision(mut at) = last else { return };
                let mut backoff = Duration::from_secs(1);
                loop {
                    match follow_etcd(etcd, key, &mut at, &mut apply).await {
                        Ok(()) => backoff = Duration::from_secs(1),
                        Err(e) => {
                            metrics::counter!("palisade_config_source_errors_total").increment(1);
                            tracing::warn!(source = %self, error = %e, retry_in = ?backoff, "configuration watch failed; the running configuration keeps serving");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        }
    }
}

/// Logs and counts a configuration refused.
pub fn reject(source: &ConfigSource, e: &ConfigErrors) {
    metrics::counter!("palisade_config_reloads_total", "result" => "rejected").increment(1);
    tracing::error!(source = %source, errors = %e, "new configuration rejected; the old one keeps serving");
}

/// A version's text as a configuration, with the environment's overrides (as
/// [`Config::load`] applies them).
fn parse(value: &[u8]) -> Result<Config, ConfigErrors> {
    let text = std::str::from_utf8(value).map_err(|_| ConfigErrors::one("--config", "not UTF-8 text"))?;
    Config::from_toml_with_env(text, std::env::vars())
}

/// Watches `key` from revision `*at` + 1, applying each new value, until the
/// watch fails. A compacted history is read again whole.
async fn follow_etcd<F, Fut>(etcd: &Etcd, key: &str, at: &mut i64, apply: &mut F) -> Result<(), String>
where
    F: FnMut(Result<Config, ConfigErrors>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut watch = etcd.watch(key, false, *at + 1).await?;
    loop {
        let events = match watch.next().await? {
            Watched::Events(events) => events,
            Watched::Compacted => {
                let (kv, _) = etcd.get(key).await?;
                kv.into_iter().map(Event::Put).collect()
            }
        };
        for e in events {
            match e {
                Event::Put(kv) if kv.mod_revision > *at => {
                    *at = kv.mod_revision;
                    apply(parse(&kv.value)).await;
                }
                Event::Put(_) => {}
                Event::Delete { revision, .. } => {
                    *at = revision.max(*at);
                    tracing::warn!(
                        key,
                        "the configuration's key was deleted; the running configuration keeps serving"
                    );
                }
            }
        }
    }
}
