//! A service registry in etcd: a service registers each of its endpoints as a key
//! under its prefix, written with a lease it keeps alive; a gateway's cluster with
//! `etcd = { url, prefix }` reads the keys and watches them. An endpoint whose
//! process dies stops renewing its lease, etcd deletes its key when the lease
//! runs out, and the gateway drops it. [`register`] is that service side, for
//! services that cannot do it themselves (`palisade register`, a sidecar).
//!
//! When etcd cannot be reached the cluster keeps its last set (and starts empty
//! when it never could), and the watch is opened again from where it was.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_balance::EndpointInfo;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::EtcdRegistryConfig;
use crate::etcd::{Etcd, Event, Kv, Watched};
use crate::upstream::Upstream;

/// One registered endpoint: a key's value.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Where it is reached.
    pub address: SocketAddr,
    /// Its load balancing weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// Its failover tier (0 first).
    #[serde(default)]
    pub tier: u8,
}

fn one() -> u32 {
    1
}

impl Registration {
    /// A key's value as a registration: its JSON, or a bare `ip:port`.
    pub fn parse(value: &[u8]) -> Option<Registration> {
        serde_json::from_slice(value).ok().or_else(|| {
            let text = std::str::from_utf8(value).ok()?;
            Some(Registration {
                address: text.trim().parse().ok()?,
                weight: 1,
                tier: 0,
            })
        })
    }

    fn info(&self) -> EndpointInfo {
        EndpointInfo::new(self.address)
            .weight(self.weight.max(1))
            .tier(self.tier)
    }
}

fn etcd_of(c: &EtcdRegistryConfig) -> Option<Etcd> {
    Some(Etcd::new(c.url.parse().ok()?, c.timeout.get()))
}

/// Reads the cluster's registry once (at start), so it serves at once; when
/// etcd cannot answer the cluster starts empty and its watch fills it.
pub async fn first_read(up: &Upstream, c: &EtcdRegistryConfig) {
    let Some(etcd) = etcd_of(c) else { return };
    match etcd.prefix(&c.prefix).await {
        Ok((kvs, _)) => up.cluster.set_endpoints(endpoints(&set_of(&up.name, kvs))),
        Err(e) => {
            tracing::warn!(cluster = %up.name, error = %e, "the registry cannot be read; the cluster starts empty")
        }
    }
}

/// Starts the watch of `upstream`'s registry, if it has one.
pub fn spawn(upstream: &Arc<Upstream>, c: Option<&EtcdRegistryConfig>) -> Option<JoinHandle<()>> {
    let c = c?.clone();
    let etcd = etcd_of(&c)?;
    let up = Arc::downgrade(upstream);
    Some(tokio::spawn(async move {
        let first = Duration::from_secs(1);
        let mut backoff = first;
        loop {
            let began = tokio::time::Instant::now();
            let Err(e) = follow(&etcd, &c.prefix, &up).await else {
                return;
            };
            let Some(up) = up.upgrade() else { return };
            tracing::warn!(cluster = %up.name, error = %e, retry_in = ?backoff, "registry watch failed; keeping the last endpoint set");
            up.events.send_modify(|e| e.refresh_failures += 1);
            drop(up);
            // A watch that had run a while starts its backoff over.
            if began.elapsed() > Duration::from_secs(30) {
                backoff = first;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }))
}

/// Reads the prefix whole, installs it, then applies each change, until the
/// watch fails or the cluster is gone.
async fn follow(etcd: &Etcd, prefix: &str, up: &std::sync::Weak<Upstream>) -> Result<(), String> {
    let (kvs, revision) = etcd.prefix(prefix).await?;
    let name = match up.upgrade() {
        Some(u) => u.name.clone(),
        None => return Ok(()),
    };
    let mut set = set_of(&name, kvs);
    install(up, &set);
    let mut watch = etcd.watch(prefix, true, revision + 1).await?;
    loop {
        match watch.next().await? {
            Watched::Compacted => return Err("the watched history was compacted".into()),
            Watched::Events(events) => {
                for e in events {
                    match e {
                        Event::Put(kv) => set.extend(set_of(&name, [kv])),
                        Event::Delete { key, .. } => {
                            set.remove(&key);
                        }
                    }
                }
            }
        }
        if !install(up, &set) {
            return Ok(());
        }
    }
}

/// The registrations among `kvs`, by key; a value that is none is logged.
fn set_of(cluster: &str, kvs: impl IntoIterator<Item = Kv>) -> BTreeMap<String, Registration> {
    kvs.into_iter()
        .filter_map(|kv| match Registration::parse(&kv.value) {
            Some(r) => Some((kv.key, r)),
            None => {
                tracing::warn!(cluster, key = %kv.key, "a registry entry that is no endpoint; skipped");
                None
            }
        })
        .collect()
}

fn endpoints(set: &BTreeMap<String, Registration>) -> Vec<EndpointInfo> {
    set.values().map(Registration::info).collect()
}

/// Installs `set` as the cluster's endpoints; `false` when the cluster is gone.
fn install(up: &std::sync::Weak<Upstream>, set: &BTreeMap<String, Registration>) -> bool {
    let Some(up) = up.upgrade() else { return false };
    up.cluster.set_endpoints(endpoints(set));
    up.events.send_modify(|e| e.endpoint_sets += 1);
    true
}

/// Registers `me` under `key` with a lease of `ttl`, renewed every third of it,
/// until `stop` resolves; then revokes the lease so the endpoint leaves at once.
/// When etcd cannot be reached it tries again every second; a lease that ran out
/// meanwhile is replaced and the key written again.
pub async fn register(
    etcd: &Etcd,
    key: &str,
    me: &Registration,
    ttl: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let value = serde_json::to_vec(me).unwrap_or_default();
    tokio::pin!(stop);
    let mut lease: Option<i64> = None;
    loop {
        let step = async {
            match lease {
                Some(id) => match etcd.keep_alive(id).await {
                    Ok(Some(_)) => Ok(Some(id)),
                    Ok(None) => {
                        tracing::warn!(key, "the lease ran out; registering again");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                },
                None => {
                    let id = etcd.grant(ttl).await?;
                    etcd.put(key, &value, Some(id)).await?;
                    tracing::info!(key, lease = id, "registered");
                    Ok(Some(id))
                }
            }
        };
        let wait = match step.await {
            Ok(l) => {
                lease = l;
                if lease.is_some() { ttl / 3 } else { Duration::ZERO }
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "etcd cannot be reached; trying again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(id) = lease
        && let Err(e) = etcd.revoke(id).await
    {
        tracing::warn!(key, error = %e, "the lease could not be revoked; the endpoint leaves when it runs out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_json_or_a_bare_address() {
        let r = Registration::parse(br#"{"address": "10.0.0.1:80", "weight": 3, "tier": 1}"#).unwrap();
        assert_eq!(
            (r.address.to_string().as_str(), r.weight, r.tier),
            ("10.0.0.1:80", 3, 1)
        );
        let r = Registration::parse(b"10.0.0.2:8080\n").unwrap();
        assert_eq!((r.weight, r.tier), (1, 0));
        assert_eq!(Registration::parse(b"not an address"), None);
        assert_eq!(
            Registration::parse(br#"{"address": "10.0.0.1:80", "colour": 1}"#),
            None
        );
    }
}
