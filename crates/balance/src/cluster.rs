//! A [`Cluster`]: a named set of endpoints and everything needed to pick one per
//! attempt. Its endpoint set can be replaced at any time (discovery): endpoints
//! that stay keep their state (breaker, ejection, latency); requests in flight on a
//! removed endpoint finish normally, since they hold their own reference to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use palisade_core::SharedClock;
use palisade_resilience::breaker::CircuitBreaker;

use crate::balancer::{LbPolicy, Picker};
use crate::endpoint::{EndpointInfo, EndpointState};
use crate::failover::{Failover, FailoverConfig};
use crate::health::{HealthConfig, Transition};
use crate::outlier::{CallResult, OutlierConfig};

/// A cluster's balancing configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// The cluster's name (logs, metrics, headers).
    pub name: Arc<str>,
    /// The load-balancing algorithm.
    pub lb: LbPolicy,
    /// Passive outlier detection (`None`: off).
    pub outlier: Option<OutlierConfig>,
    /// Active health-check thresholds (`None`: no active checks).
    pub health: Option<HealthConfig>,
    /// Failover between tiers.
    pub failover: FailoverConfig,
    /// Below this healthy share of the serving tier, health is ignored and traffic
    /// spreads over every endpoint of the tier (0.0 turns it off).
    pub panic_threshold: f64,
    /// The latency assumed for an endpoint before it has answered.
    pub default_rtt: Duration,
}

impl ClusterConfig {
    /// Defaults: least request, outlier detection on (5 consecutive 5xx or gateway
    /// failures, 30 s base ejection, at most 50% ejected), no active checks, panic
    /// below 50% healthy.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        ClusterConfig {
            name: name.into(),
            lb: LbPolicy::default(),
            outlier: Some(OutlierConfig::default()),
            health: None,
            failover: FailoverConfig::default(),
            panic_threshold: 0.5,
            default_rtt: Duration::from_millis(1),
        }
    }
}

/// Why no endpoint could be picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The cluster has no endpoints at all.
    #[error("cluster has no endpoints")]
    NoEndpoints,
    /// Every endpoint is unhealthy, ejected or behind an open breaker (and the panic
    /// threshold is off).
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
}

/// The endpoint chosen for one attempt.
#[derive(Clone, Debug)]
pub struct Pick {
    /// The endpoint.
    pub endpoint: Arc<EndpointState>,
    /// The tier it belongs to (its position in priority order).
    pub tier: u8,
    /// Whether the tier was in panic (health ignored) when it was picked.
    pub panic: bool,
}

/// The endpoint set and the per-tier balancer state built from it.
#[derive(Debug)]
struct Snapshot {
    endpoints: Vec<Arc<EndpointState>>,
    /// Tiers in priority order.
    tiers: Vec<Tier>,
}

#[derive(Debug)]
struct Tier {
    level: u8,
    members: Vec<usize>,
    picker: Picker,
}

type BreakerFactory = dyn Fn(&EndpointInfo) -> CircuitBreaker + Send + Sync;

/// A named set of endpoints with health, outlier detection, breakers, failover and a
/// load balancer.
pub struct Cluster {
    config: ClusterConfig,
    clock: SharedClock,
    snapshot: ArcSwap<Snapshot>,
    failover: ArcSwap<Failover>,
    panicking: AtomicBool,
    breakers: Option<Box<BreakerFactory>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .field("endpoints", &self.snapshot.load().endpoints.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// An empty cluster on the system clock.
    pub fn new(config: ClusterConfig) -> Self {
        Cluster::with_clock(config, SharedClock::system())
    }

    /// An empty cluster reading time from `clock`.
    pub fn with_clock(config: ClusterConfig, clock: SharedClock) -> Self {
        Cluster {
            config,
            clock,
            snapshot: ArcSwap::from_pointee(Snapshot {
                endpoints: Vec::new(),
                tiers: Vec::new(),
            }),
            failover: ArcSwap::from_pointee(Failover::new(1)),
            panicking: AtomicBool::new(false),
            breakers: None,
        }
    }

    /// Gives every endpoint (present and future) its own circuit breaker made by
    /// `factory`. Set it before the first [`set_endpoints`](Self::set_endpoints).
    pub fn with_breakers(
        mut self,
        factory: impl Fn(&EndpointInfo) -> CircuitBreaker + Send + Sync + 'static,
    ) -> Self {
        self.breakers = Some(Box::new(factory));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The clock it reads.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Replaces the endpoint set. Endpoints whose info is unchanged keep their state;
    /// new ones start healthy with empty statistics. Duplicate addresses keep the
    /// first.
    pub fn set_endpoints(&self, infos: impl IntoIterator<Item = EndpointInfo>) {
        let old = self.snapshot.load();
        let mut endpoints: Vec<Arc<EndpointState>> = Vec::new();
        for info in infos {
            if endpoints.iter().any(|e| e.addr() == info.addr) {
                continue;
            }
            let kept = old.endpoints.iter().find(|e| *e.info() == info).cloned();
            endpoints.push(kept.unwrap_or_else(|| {
                Arc::new(EndpointState::new(
                    info.clone(),
                    self.breakers.as_ref().map(|f| f(&info)),
                    self.config.default_rtt,
                    self.config.outlier.as_ref(),
                ))
            }))
        }
        let mut levels: Vec<u8> = endpoints.iter().map(|e| e.info().tier).collect();
        levels.sort_unstable();
        levels.dedup();
        let tiers: Vec<Tier> = levels
            .into_iter()
            .map(|level| {
                let members: Vec<usize> = (0..endpoints.len())
                    .filter(|&i| endpoints[i].info().tier == level)
                    .collect();
                let picker = Picker::new(&self.config.lb, &endpoints, &members);
                Tier {
                    level,
                    members,
                    picker,
                }
            })
            .collect();
        let old_levels: Vec<u8> = old.tiers.iter().map(|t| t.level).collect();
        let new_levels: Vec<u8> = tiers.iter().map(|t| t.level).collect();
        if old_levels != new_levels {
            self.failover.store(Arc::new(Failover::new(tiers.len())));
        }
        self.snapshot.store(Arc::new(Snapshot { endpoints, tiers }));
    }

    /// How many endpoints the cluster has.
    pub fn len(&self) -> usize {
        self.snapshot.load().endpoints.len()
    }

    /// Whether the cluster has no endpoints.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Vec<Arc<EndpointState>> {
        self.snapshot.load().endpoints.clone()
    }

    /// The tier level now serving traffic.
    pub fn active_tier(&self) -> Option<u8> {
        let snap = self.snapshot.load();
        snap.tiers.get(self.failover.load().active()).map(|t| t.level)
    }

    /// Whether the serving tier is in panic (health ignored).
    pub fn is_panicking(&self) -> bool {
        self.panicking.load(Ordering::Relaxed)
    }

    /// Whether at least one endpoint would take traffic now.
    pub fn has_healthy_endpoint(&self) -> bool {
        let now = self.clock.now();
        self.snapshot.load().endpoints.iter().any(|e| e.is_available(now))
    }

    /// Picks the endpoint for an attempt. `key` is the request's hash key (for the
    /// hash balancers); `tried` lists endpoints earlier attempts of this request
    /// used: they are avoided while another endpoint is available.
    pub fn pick(&self, key: Option<u64>, tried: &[SocketAddr]) -> Result<Pick, PickError> {
        let snap = self.snapshot.load();
        if snap.endpoints.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let now = self.clock.now();
        let eps = &snap.endpoints;
        let (tier_index, share) = if snap.tiers.len() == 1 {
            (0, healthy_share(eps, &snap.tiers[0].members, now))
        } else {
            let shares: Vec<f64> = snap
                .tiers
                .iter()
                .map(|t| healthy_share(eps, &t.members, now))
                .collect();
            let failover = self.failover.load();
            let (active, switch) = failover.choose(now, &shares, &self.config.failover);
            if let Some(s) = switch {
                let (from, to) = (snap.tiers[s.from].level, snap.tiers[s.to].level);
                tracing::warn!(cluster = %self.config.name, from, to, "failover: serving tier changed");
                metrics::counter!("palisade_failover_switches_total", "cluster" => self.config.name.to_string())
                    .increment(1);
                metrics::gauge!("palisade_failover_active_tier", "cluster" => self.config.name.to_string())
                    .set(f64::from(to));
            }
            (active, shares[active])
        };
        let tier = &snap.tiers[tier_index];
        let panic = share < self.config.panic_threshold;
        self.note_panic(panic, share);
        let member = |p: usize| &eps[tier.members[p]];
        let untried = |p: usize| !tried.contains(&member(p).addr());
        let pos = if panic {
            tier.picker
                .pick(eps, &tier.members, key, now, untried)
                .or_else(|| tier.picker.pick(eps, &tier.members, key, now, |_| true))
        } else {
            tier.picker
                .pick(eps, &tier.members, key, now, |p| {
                    untried(p) && member(p).is_available(now)
                })
                .or_else(|| {
                    tier.picker
                        .pick(eps, &tier.members, key, now, |p| member(p).is_available(now))
                })
        };
        let pos = pos.ok_or(PickError::NoHealthyEndpoint)?;
        Ok(Pick {
            endpoint: member(pos).clone(),
            tier: tier.level,
            panic,
        })
    }

    fn note_panic(&self, panic: bool, share: f64) {
        if self.panicking.load(Ordering::Relaxed) != panic
            && self.panicking.swap(panic, Ordering::Relaxed) != panic
        {
            let name = self.config.name.to_string();
            metrics::gauge!("palisade_cluster_panic", "cluster" => name.clone()).set(if panic {
                1.0
            } else {
                0.0
            });
            if panic {
                tracing::warn!(
                    cluster = %name,
                    healthy_share = share,
                    threshold = self.config.panic_threshold,
                    "panic mode: too few healthy endpoints, ignoring health and spreading traffic over all of them"
                );
            } else {
                tracing::info!(cluster = %name, healthy_share = share, "panic mode over");
            }
        }
    }

    /// Reports how an attempt on `endpoint` went: feeds latency and outlier
    /// detection (ejecting the endpoint if a detector trips and the cap allows).
    pub fn record(&self, endpoint: &EndpointState, result: CallResult, latency: Duration) {
        let now = self.clock.now();
        endpoint.observe(now, latency, result != CallResult::Success);
        let Some(config) = &self.config.outlier else {
            return;
        };
        let Some(reason) = endpoint.outlier.record(now, result, config) else {
            return;
        };
        let snap = self.snapshot.load();
        let total = snap.endpoints.len();
        let ejected = snap.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        if (ejected + 1) * 100 > usize::from(config.max_ejection_percent) * total {
            metrics::counter!("palisade_outlier_ejections_skipped_total", "cluster" => self.config.name.to_string())
                .increment(1);
            tracing::info!(
                cluster = %self.config.name, endpoint = %endpoint.addr(), reason = reason.as_str(),
                ejected, total, "outlier not ejected: max_ejection_percent reached"
            );
            return;
        }
        let e = endpoint.outlier.eject(now, reason, config);
        metrics::counter!(
            "palisade_outlier_ejections_total",
            "cluster" => self.config.name.to_string(),
            "reason" => reason.as_str()
        )
        .increment(1);
        tracing::warn!(
            cluster = %self.config.name, endpoint = %endpoint.addr(), reason = reason.as_str(),
            duration_ms = e.duration.as_millis() as u64, count = e.count, "endpoint ejected"
        );
    }

    /// Reports an active health probe's verdict for `endpoint`.
    pub fn record_probe(&self, endpoint: &EndpointState, passed: bool) -> Option<Transition> {
        let config = self.config.health.as_ref()?;
        let t = endpoint.health.record(passed, config)?;
        match t {
            Transition::BecameUnhealthy => {
                tracing::warn!(cluster = %self.config.name, endpoint = %endpoint.addr(), "endpoint unhealthy")
            }
            Transition::BecameHealthy => {
                tracing::info!(cluster = %self.config.name, endpoint = %endpoint.addr(), "endpoint healthy")
            }
        }
        Some(t)
    }
}

fn healthy_share(eps: &[Arc<EndpointState>], members: &[usize], now: palisade_core::Instant) -> f64 {
    if members.is_empty() {
        return 0.0;
    }
    let healthy = members.iter().filter(|&&i| eps[i].is_available(now)).count();
    healthy as f64 / members.len() as f64
}
