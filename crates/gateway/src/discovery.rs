//! Endpoint discovery beyond static addresses: host names re-resolved by DNS every
//! `dns_refresh`, and an endpoints file re-read when it changes. Each refresh
//! replaces the cluster's endpoint set; endpoints that stay keep their state and
//! requests in flight are not disturbed. A failed refresh keeps the last good set.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use palisade_balance::EndpointInfo;
use tokio::task::JoinHandle;

use crate::config::{ClusterSection, ConfigError, EndpointConfig, split_host_port};
use crate::upstream::Upstream;

/// Starts the discovery task of `upstream` when it has host names or a file.
pub fn spawn(upstream: &Arc<Upstream>, section: &ClusterSection) -> Option<JoinHandle<()>> {
    let has_names = section
        .endpoints
        .iter()
        .any(|e| split_host_port(e.address()).is_ok_and(|(h, _)| h.parse::<std::net::IpAddr>().is_err()));
    if !has_names && section.endpoints_file.is_none() {
        return None;
    }
    let up = Arc::downgrade(upstream);
    let section = section.clone();
    let file_poll = std::time::Duration::from_secs(1);
    Some(tokio::spawn(async move {
        let mut last_mtime = file_mtime(section.endpoints_file.as_deref());
        let mut since_dns = std::time::Duration::ZERO;
        loop {
            let step = if section.endpoints_file.is_some() {
                file_poll.min(section.dns_refresh.get())
            } else {
                section.dns_refresh.get()
            };
            tokio::time::sleep(step).await;
            since_dns += step;
            let Some(up) = up.upgrade() else { return };
            let mtime = file_mtime(section.endpoints_file.as_deref());
            let file_changed = mtime != last_mtime;
            let dns_due = has_names && since_dns >= section.dns_refresh.get();
            if !file_changed && !dns_due {
                continue;
            }
            last_mtime = mtime;
            if dns_due {
                since_dns = std::time::Duration::ZERO;
            }
            match collect(&section).await {
                Ok(infos) => {
                    up.cluster.set_endpoints(infos);
                    up.events.send_modify(|e| e.endpoint_sets += 1);
                }
                Err(e) => {
                    tracing::warn!(cluster = %up.name, error = %e, "discovery failed; keeping the last endpoint set");
                    up.events.send_modify(|e| e.refresh_failures += 1);
                }
            }
        }
    }))
}

/// Why a cluster's endpoints could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// An entry of `endpoints` is not `host:port`.
    #[error("{0}")]
    Address(String),
    /// A host name did not resolve.
    #[error("cannot resolve `{address}`: {source}")]
    Resolve {
        /// The entry, as configured.
        address: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The endpoints file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Lines of the endpoints file that are not endpoints, each named.
    #[error("{}", .0.join("; "))]
    File(Vec<String>),
}

impl DiscoveryError {
    /// The cluster's field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            DiscoveryError::Address(_) | DiscoveryError::Resolve { .. } => "endpoints",
            DiscoveryError::Read { .. } | DiscoveryError::File(_) => "endpoints_file",
        }
    }
}

/// A cluster's endpoints as configured: addresses resolved, the endpoints file read.
async fn collect(section: &ClusterSection) -> Result<Vec<EndpointInfo>, DiscoveryError> {
    let mut infos = Vec::new();
    for e in &section.endpoints {
        infos.extend(resolve(e).await?);
    }
    if let Some(path) = &section.endpoints_file {
        let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
            path: path.clone(),
            source,
        })?;
        infos.extend(parse_endpoints_file(&text)?);
    }
    Ok(infos)
}

fn file_mtime(path: Option<&str>) -> Option<SystemTime> {
    std::fs::metadata(path?).and_then(|m| m.modified()).ok()
}

/// Parses an endpoints file: one `ip:port [weight] [tier]` per line; blank lines
/// and `#` comments are skipped. Every bad line is reported.
pub fn parse_endpoints_file(text: &str) -> Result<Vec<EndpointInfo>, DiscoveryError> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let parsed = (|| {
            let addr = parts.next()?.parse().ok()?;
            let weight = parts.next().map_or(Some(1), |w| w.parse().ok())?;
            let tier = parts.next().map_or(Some(0), |t| t.parse().ok())?;
            Some(EndpointInfo::new(addr).weight(weight).tier(tier))
        })();
        match parsed {
            Some(info) if parts.next().is_none() => out.push(info),
            _ => bad.push(format!(
                "line {}: `{line}` is not `ip:port [weight] [tier]`",
                n + 1
            )),
        }
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(DiscoveryError::File(bad))
    }
}

/// The endpoints of cluster `name` as configured, for start-up: a failure is a
/// configuration problem naming the field.
pub(crate) async fn resolve_endpoints(
    name: &str,
    s: &ClusterSection,
) -> Result<Vec<EndpointInfo>, ConfigError> {
    collect(s)
        .await
        .map_err(|e| ConfigError::new(format!("clusters.{name}.{}", e.field()), e.to_string()))
}

/// Resolves one configured endpoint to endpoint infos (a host name may give several
/// addresses).
pub async fn resolve(e: &EndpointConfig) -> Result<Vec<EndpointInfo>, DiscoveryError> {
    let (host, port) = split_host_port(e.address()).map_err(DiscoveryError::Address)?;
    let (weight, tier) = e.weight_tier();
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| DiscoveryError::Resolve {
                address: e.address().to_string(),
                source,
            })?
            .collect(),
    };
    Ok(addrs
        .into_iter()
        .map(|a| EndpointInfo::new(a).weight(weight).tier(tier))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_file_parses_and_names_bad_lines() {
        let ok = parse_endpoints_file("# web\n127.0.0.1:80\n\n127.0.0.1:81 3 1 # standby\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!((ok[1].weight, ok[1].tier), (3, 1));
        let err = parse_endpoints_file("127.0.0.1:80\nnot-an-address\n127.0.0.1:81 x\n").unwrap_err();
        assert_eq!(err.field(), "endpoints_file");
        let DiscoveryError::File(lines) = &err else {
            panic!("{err:?}")
        };
        assert!(
            lines[0].starts_with("line 2:") && lines[1].starts_with("line 3:"),
            "{err}"
        );
    }
}
