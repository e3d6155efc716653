//! Clusters compiled from their configuration: the balance crate's cluster (its
//! balancer, health, outlier detection, failover tiers), a breaker per endpoint
//! validated by the breaker core, a bulkhead, TLS and a connection pool per worker.

use std::sync::Arc;
use std::time::Duration;

use palisade_balance::failover::FailoverConfig;
use palisade_balance::health::HealthConfig;
use palisade_balance::outlier::{FailureRate, OutlierConfig};
use palisade_balance::{Cluster, ClusterConfig, LbPolicy};
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration};
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
use palisade_resilience::shed::{
    AdaptiveConcurrency, AdaptiveConfig, LimitAlgorithm, Priority, Shed, ShedPermit, TieredShedder, Tiers,
};
use palisade_resilience::window::WindowConfig;
use tokio::task::JoinHandle;

use crate::config::{
    AdaptiveConcurrencySection, BreakerSection, ClusterSection, ConcurrencyAlgorithm, Config, ConfigError,
    Lb, header_name,
};
use crate::connect::{Connector, UpstreamTls};
use crate::pool::Pool;

/// A cluster, ready to serve: balancing state, a pooled client, a bulkhead.
pub struct Upstream {
    /// The cluster's name.
    pub name: String,
    /// Endpoints, health, outliers, breakers, balancer.
    pub cluster: Cluster,
    /// Pooled connections to its endpoints: one pool per worker thread, and a
    /// last one for everything else (health probes), so a connection is only ever
    /// used on the thread whose runtime drives it. See [`Upstream::pool`].
    pools: Box<[Arc<Pool>]>,
    /// Requests in flight to the cluster, bounded.
    pub bulkhead: Option<Bulkhead>,
    /// Adaptive load shedding, when the cluster has it.
    pub shed: Option<ClusterShed>,
    /// `HTTP/1.1` or `HTTP/2` (h2c) to the endpoints.
    pub version: http::Version,
    /// Breaker counts 5xx as failures.
    pub breaker_counts_5xx: bool,
    /// Breaker counts 429 as failures.
    pub breaker_counts_429: bool,
    /// 4xx statuses that are the endpoint's failures (`failure_statuses`).
    pub failure_statuses: Box<[u16]>,
    /// Headers whose presence makes an answer the endpoint's failure
    /// (`failure_headers`).
    pub failure_headers: Box<[http::HeaderName]>,
    /// Ready even with no healthy endpoint.
    pub allow_empty: bool,
    /// TLS to the endpoints (`https` as HTTP/2's `:scheme`).
    pub tls: bool,
    /// What the cluster's background tasks have done so far, for whoever waits on
    /// them (the admin API, tests): a watch, so a waiter wakes on the change itself.
    pub events: tokio::sync::watch::Sender<UpstreamEvents>,
}

/// Counts of what a cluster's background tasks did (see [`Upstream::events`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamEvents {
    /// Rounds of active health probes completed (every endpoint probed, its
    /// result recorded).
    pub probe_rounds: u64,
    /// Endpoint sets installed by discovery (a DNS re-resolution or an endpoints
    /// file re-read).
    pub endpoint_sets: u64,
    /// Discovery refreshes that failed (the last good set was kept).
    pub refresh_failures: u64,
}

thread_local! {
    /// The index of the worker thread this is, if it is one.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as proxy worker `index` (see [`Upstream::pool`]).
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// Which of `len` per-worker slots the calling thread uses: its worker's own on a
/// proxy worker, the last (shared) one elsewhere.
pub(crate) fn worker_slot(len: usize) -> usize {
    let last = len.saturating_sub(1);
    WORKER.with(std::cell::Cell::get).map_or(last, |w| w.min(last))
}

/// The number of proxy worker threads `gateway.workers` asks for (0: one per core).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

impl Upstream {
    /// The connection pool of the calling thread: its worker's own on a proxy
    /// worker, the shared last one elsewhere. Each worker is a single-threaded
    /// runtime; a pooled connection is driven by a task on the runtime that opened
    /// it, so keeping pools per worker keeps every request and its connection on
    /// one thread (no cross-thread wake-ups, and a lock nobody else takes).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[worker_slot(self.pools.len())]
    }

    /// Closes every pool's connections idle past the idle timeout.
    pub fn sweep_pools(&self) {
        for p in &self.pools {
            p.sweep();
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Closes pooled connections idle past `idle_timeout`, every `idle_timeout`, so a
/// gateway without traffic lets go of them (a busy pool also drops them as it meets
/// them).
pub(crate) fn spawn_pool_sweeper(up: &Arc<Upstream>, idle_timeout: Duration) -> JoinHandle<()> {
    let up = Arc::downgrade(up);
    let idle_timeout = idle_timeout.max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + idle_timeout, idle_timeout);
        loop {
            tick.tick().await;
            let Some(up) = up.upgrade() else { return };
            up.sweep_pools();
        }
    })
}

/// The balancing side of a cluster's section, for the balance crate.
fn cluster_config(name: &str, s: &ClusterSection) -> ClusterConfig {
    let mut cc = ClusterConfig::new(name);
    cc.lb = match s.lb {
        Lb::RoundRobin => LbPolicy::RoundRobin,
        Lb::WeightedRoundRobin => LbPolicy::WeightedRoundRobin,
        Lb::Random => LbPolicy::Random,
        Lb::LeastRequest => LbPolicy::LeastRequest,
        Lb::PeakEwma => LbPolicy::PeakEwma,
        Lb::RingHash => LbPolicy::RingHash {
            vnodes: s.ring_vnodes,
        },
        Lb::Maglev => LbPolicy::Maglev {
            table_size: palisade_balance::hash::Maglev::DEFAULT_SIZE,
        },
    };
    cc.panic_threshold = s.panic_threshold;
    cc.outlier = s.outlier.as_ref().map(|o| OutlierConfig {
        consecutive_5xx: (o.consecutive_5xx > 0).then_some(o.consecutive_5xx),
        consecutive_gateway_failure: (o.consecutive_gateway_failure > 0)
            .then_some(o.consecutive_gateway_failure),
        failure_rate: (o.failure_rate > 0.0).then(|| FailureRate {
            threshold: o.failure_rate,
            minimum_requests: o.failure_rate_minimum_requests,
            window: o.failure_rate_window.get(),
        }),
        base_ejection_time: o.base_ejection_time.get(),
        max_ejection_time: o.max_ejection_time.get(),
        max_ejection_percent: o.max_ejection_percent,
    });
    cc.health = s.health.as_ref().map(|h| HealthConfig {
        interval: h.interval.get(),
        timeout: h.timeout.get(),
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    });
    if let Some(f) = &s.failover {
        cc.failover = FailoverConfig {
            healthy_threshold: f.healthy_threshold,
            stable_period: f.stable_period.get(),
        };
    }
    cc
}

/// The breaker of each endpoint of cluster `name`, checked by the breaker's own
/// validation, its problems named by the file's keys under `clusters.<name>.breaker`.
/// A rate of 0 (or a count of 0) turns its detector off; any other value, negative
/// ones too, goes to the breaker to be judged.
fn breaker_config(name: &str, b: &BreakerSection) -> Result<BreakerConfig, Vec<ConfigError>> {
    let mut bc = BreakerConfig::empty()
        .window(WindowConfig::Count { size: b.window })
        .half_open(b.half_open_probes, b.success_threshold)
        .open_duration(OpenDuration::Backoff {
            initial: b.open.get(),
            multiplier: 2.0,
            max: b.max_open.get(),
        });
    if b.consecutive_failures > 0 {
        bc = bc.consecutive_failures(b.consecutive_failures);
    }
    if b.failure_rate != 0.0 {
        bc = bc.failure_rate(b.failure_rate, b.minimum_calls);
    }
    if let Some(slow) = b.slow_call {
        bc = bc.slow_calls(slow.get(), b.slow_call_rate, b.minimum_calls);
    }
    bc.validate().map(|()| bc).map_err(|e| {
        e.into_iter()
            .map(|mut e| {
                let key = match e.field.as_str() {
                    "window.size" => "window",
                    "failure_rate.threshold" => "failure_rate",
                    "failure_rate.min_calls" | "slow_call.min_calls" => "minimum_calls",
                    "slow_call.rate" => "slow_call_rate",
                    "slow_call.duration" => "slow_call",
                    "open_duration.initial" => "open",
                    "open_duration.max" => "max_open",
                    other => other,
                };
                e.field = format!("clusters.{name}.breaker.{key}");
                e
            })
            .collect()
    })
}

/// `cluster` with a breaker of `config` per endpoint, named `<cluster>/<address>`.
fn with_breakers(cluster: Cluster, name: &str, config: BreakerConfig) -> Cluster {
    let cluster_name = name.to_string();
    cluster.with_breakers(move |info| {
        let breaker = CircuitBreaker::builder(format!("{cluster_name}/{}", info.addr))
            .config(config.clone())
            .build();
        match breaker {
            Ok(b) => b,
            // Unreachable: the same config passed the breaker's validation in
            // `breaker_config`; a breaker that never opens would hide it.
            Err(e) => unreachable!("validated breaker config refused: {e}"),
        }
    })
}

impl Upstream {
    /// Builds cluster `name` from its section: every problem reported, each named
    /// by its field.
    pub(crate) fn compile(
        name: &str,
        s: &ClusterSection,
        config: &Config,
    ) -> Result<Upstream, Vec<ConfigError>> {
        let mut problems = Vec::new();
        let mut cluster = Cluster::new(cluster_config(name, s));
        match s.breaker.as_ref().map(|b| breaker_config(name, b)) {
            Some(Ok(bc)) => cluster = with_breakers(cluster, name, bc),
            Some(Err(e)) => problems.extend(e),
            None => {}
        }
        let failure_headers: Vec<http::HeaderName> = s
            .failure_headers
            .iter()
            .filter_map(|h| header_name(h, &format!("clusters.{name}.failure_headers"), &mut problems))
            .collect();
        let h2 = s.speaks_h2();
        let tls = match &s.tls {
            Some(t) => match UpstreamTls::new(&format!("clusters.{name}.tls"), t, h2) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        let connector = Connector::new(s.connect_timeout.get(), tls);
        let g = &config.gateway;
        let pools = (0..=worker_count(g.workers))
            .map(|_| {
                Arc::new(Pool::new(
                    connector.clone(),
                    h2,
                    g.pool_idle_per_endpoint,
                    g.pool_idle_timeout.get(),
                ))
            })
            .collect();
        let bulkhead = s.max_concurrent.and_then(|n| {
            let config = BulkheadConfig {
                max_concurrent: n,
                max_wait: Duration::ZERO,
            };
            Bulkhead::new(name.to_string(), config)
                .map_err(|e| {
                    let at = format!("clusters.{name}.max_concurrent");
                    problems.extend(e.into_iter().map(|e| ConfigError::new(at.clone(), e.problem)));
                })
                .ok()
        });
        let shed = (s.adaptive_concurrency.as_ref()).and_then(|a| {
            ClusterShed::compile(a, &format!("clusters.{name}.adaptive_concurrency"), &mut problems)
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Upstream {
            name: name.to_string(),
            cluster,
            pools,
            bulkhead,
            shed,
            version: if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            },
            breaker_counts_5xx: s.breaker.as_ref().is_none_or(|b| b.count_5xx),
            breaker_counts_429: s.breaker.as_ref().is_some_and(|b| b.count_429),
            failure_statuses: s.failure_statuses.clone().into(),
            failure_headers: failure_headers.into(),
            allow_empty: s.allow_empty,
            tls: s.tls.is_some(),
            events: tokio::sync::watch::Sender::new(UpstreamEvents::default()),
        })
    }
}

/// A cluster's adaptive load shedding: a concurrency limit that follows the
/// cluster's latency, and admission by priority at that limit's load (in flight
/// over limit), the resilience crate's `AdaptiveConcurrency` and `TieredShedder`.
#[derive(Debug)]
pub struct ClusterShed {
    /// The limit.
    pub limit: AdaptiveConcurrency,
    tiers: TieredShedder,
}

impl ClusterShed {
    /// Builds a cluster's shedding from its table (`at`: the table's path), the
    /// shedding core validating it; its problems go to `p` under the file's names.
    fn compile(a: &AdaptiveConcurrencySection, at: &str, p: &mut Vec<ConfigError>) -> Option<ClusterShed> {
        let before = p.len();
        let misplaced = |key: &str, set: bool, p: &mut Vec<ConfigError>| {
            if set {
                let (own, other) = match a.algorithm {
                    ConcurrencyAlgorithm::Gradient => ("gradient", "aimd"),
                    ConcurrencyAlgorithm::Aimd => ("aimd", "gradient"),
                };
                p.push(ConfigError::new(
                    format!("{at}.{key}"),
                    format!("is an {other} setting; this limit's algorithm is {own}"),
                ));
            }
        };
        let mut algorithm = match a.algorithm {
            ConcurrencyAlgorithm::Gradient => LimitAlgorithm::gradient(),
            ConcurrencyAlgorithm::Aimd => LimitAlgorithm::aimd(),
        };
        match &mut algorithm {
            LimitAlgorithm::Gradient {
                tolerance,
                smoothing,
                long_windows,
            } => {
                misplaced("increase", a.increase.is_some(), p);
                misplaced("backoff", a.backoff.is_some(), p);
                misplaced("latency_threshold", a.latency_threshold.is_some(), p);
                *tolerance = a.tolerance.unwrap_or(*tolerance);
                *smoothing = a.smoothing.unwrap_or(*smoothing);
                *long_windows = a.long_windows.unwrap_or(*long_windows);
            }
            LimitAlgorithm::Aimd {
                increase,
                backoff,
                latency_threshold,
            } => {
                misplaced("tolerance", a.tolerance.is_some(), p);
                misplaced("smoothing", a.smoothing.is_some(), p);
                misplaced("long_windows", a.long_windows.is_some(), p);
                *increase = a.increase.unwrap_or(*increase);
                *backoff = a.backoff.unwrap_or(*backoff);
                *latency_threshold = a.latency_threshold.map(|d| d.get());
            }
        }
        let config = AdaptiveConfig {
            initial: a.initial,
            min: a.min,
            max: a.max,
            algorithm,
            window: a.window.get(),
            min_samples: a.min_samples,
        };
        let tiers = Tiers {
            elevated: a.elevated,
            high: a.high,
            critical: a.critical,
        };
        let under = |e: palisade_core::ConfigErrors| {
            e.into_iter().map(|mut e| {
                e.field = match e.field.strip_prefix("algorithm.") {
                    Some(key) => format!("{at}.{key}"),
                    None if e.field == "tiers" => format!("{at}.elevated"),
                    None => format!("{at}.{}", e.field),
                };
                e
            })
        };
        let limit = AdaptiveConcurrency::new(config)
            .map_err(|e| p.extend(under(e)))
            .ok();
        let shedder = limit
            .clone()
            .and_then(|l| TieredShedder::new(l, tiers).map_err(|e| p.extend(under(e))).ok());
        if p.len() > before {
            return None;
        }
        Some(ClusterShed {
            limit: limit?,
            tiers: shedder?,
        })
    }

    /// Admits a request of `priority`: a slot in the limit, and whether the load
    /// asks for its degraded form; or the reason it is refused.
    pub fn admit(&self, priority: Priority) -> Result<(ShedPermit, bool), Shed> {
        let degraded = self.tiers.check(priority)?;
        Ok((self.limit.try_acquire()?, degraded))
    }
}
