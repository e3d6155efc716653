//! A configuration turned into live objects: routes with their policies, clusters
//! with endpoints, breakers, clients and background tasks (health probes, DNS and
//! file discovery). A new [`Runtime`] is built for every reload and swapped in
//! whole; requests in flight keep the one they started with. Dropping a runtime
//! stops its tasks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use palisade_balance::failover::FailoverConfig;
use palisade_balance::health::HealthConfig;
use palisade_balance::outlier::{FailureRate, OutlierConfig};
use palisade_balance::{Cluster, ClusterConfig, EndpointInfo, LbPolicy};
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration};
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
use palisade_resilience::ratelimit::{Gcra, KeyedRateLimiter, Quota, RateLimiter};
use palisade_resilience::retry::{BudgetConfig, RetryBudget};
use palisade_resilience::window::WindowConfig;
use tokio::task::JoinHandle;

use crate::cause::Cause;
use crate::config::{
    BreakerSection, ClusterSection, Config, ConfigError, EndpointConfig, FallbackConfig, HashOn, Lb,
    LimitKey, MatchConfig, RateLimitConfig, RetryOn, RouteConfig, host_pattern, split_host_port,
};
use crate::connect::{Connector, UpstreamTls};
use crate::pool::Pool;

/// The live form of a configuration.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Config,
    /// Routes in match order.
    pub routes: Vec<Route>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<Upstream>>,
    /// The proxy listener's TLS, when `gateway.tls` is set.
    pub tls: Option<crate::tls::Tls>,
    /// Metrics of requests no route took.
    pub unrouted: RouteMetrics,
    /// Open tunnels; one set for the gateway's life, handed from runtime to runtime
    /// by reloads so the drain sees them all.
    pub tunnels: crate::tunnel::Tunnels,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("routes", &self.routes.len())
            .field("clusters", &self.clusters.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One route, ready to serve.
#[derive(Debug)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// What it matches.
    pub matcher: Matcher,
    /// Where it sends.
    pub upstream: Arc<Upstream>,
    /// Total timeout.
    pub timeout: Duration,
    /// Per-attempt timeout.
    pub per_try_timeout: Duration,
    /// Longest pause in a response body.
    pub body_idle_timeout: Duration,
    /// Retry settings.
    pub retry: Option<RouteRetry>,
    /// Rate limit.
    pub limiter: Option<RouteLimiter>,
    /// Fallback answer.
    pub fallback: Option<Fallback>,
    /// Hash key source.
    pub hash_on: Option<HashKey>,
    /// Its metric handles.
    pub metrics: RouteMetrics,
}

/// A route's match, compiled: names parsed, host pattern split.
#[derive(Debug, Default)]
pub struct Matcher {
    /// The host, lower case, without port.
    pub host: Option<HostMatch>,
    /// The exact path.
    pub path: Option<String>,
    /// The path prefix.
    pub path_prefix: Option<String>,
    /// Methods (any, if empty).
    pub methods: Vec<http::Method>,
    /// Headers with the values they must have.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// A route's host pattern.
#[derive(Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// This host (lower case).
    Exact(String),
    /// Any subdomain of this one: `.example.com` for `*.example.com` (lower case).
    Suffix(String),
}

impl HostMatch {
    /// Whether `host` (without port) matches, ignoring ASCII case.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

impl Matcher {
    /// Parses a route's match (`at`: its path in the file), reporting each value
    /// that does not parse to `p`: the one check of these values, so none can be
    /// dropped here after passing elsewhere (a dropped header condition would widen
    /// the route).
    fn compile(m: &MatchConfig, at: &str, p: &mut Vec<String>) -> Matcher {
        if let Some(host) = &m.host
            && let Err(e) = host_pattern(host)
        {
            p.push(format!("{at}.host: `{host}` {e}"));
        }
        for (field, path) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
            if path.as_ref().is_some_and(|path| !path.starts_with('/')) {
                p.push(format!("{at}.{field}: must start with `/`"));
            }
        }
        let mut methods = Vec::new();
        for x in &m.methods {
            match http::Method::from_bytes(x.to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => p.push(format!("{at}.methods: `{x}` is not a method")),
            }
        }
        let mut headers = Vec::new();
        for (k, v) in &m.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes());
            if name.is_err() {
                p.push(format!("{at}.headers: `{k}` is not a header name"));
            }
            let value = http::HeaderValue::from_str(v);
            if value.is_err() {
                p.push(format!(
                    "{at}.headers.{k}: not a header value (control characters such as NUL, CR, LF cannot be sent)"
                ));
            }
            if let (Ok(name), Ok(value)) = (name, value) {
                headers.push((name, value));
            }
        }
        Matcher {
            host: m.host.as_ref().map(|h| match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            }),
            path: m.path.clone(),
            path_prefix: m.path_prefix.clone(),
            methods,
            headers,
        }
    }
}

/// A route's fallback answer, ready to send.
#[derive(Debug)]
pub struct Fallback {
    /// Its status.
    pub status: http::StatusCode,
    /// Its body.
    pub body: bytes::Bytes,
    /// Its content type.
    pub content_type: http::HeaderValue,
    /// The causes it answers (empty: every cause but a client's).
    pub on: Vec<Cause>,
}

impl Fallback {
    /// Parses a route's fallback (`at`: its path in the file), reporting each
    /// value that does not parse to `p`.
    fn compile(f: &FallbackConfig, at: &str, p: &mut Vec<String>) -> Option<Fallback> {
        let status = http::StatusCode::from_u16(f.status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()));
        if status.is_none() {
            p.push(format!("{at}.status: {} is not between 200 and 599", f.status));
        }
        let content_type = http::HeaderValue::from_str(&f.content_type).ok();
        if content_type.is_none() {
            p.push(format!("{at}.content_type: not a header value"));
        }
        Some(Fallback {
            status: status?,
            body: bytes::Bytes::from(f.body.clone()),
            content_type: content_type?,
            on: f.on.clone(),
        })
    }

    /// Whether it answers a failure of `cause`.
    pub fn answers(&self, cause: Cause) -> bool {
        if self.on.is_empty() {
            !cause.is_client()
        } else {
            self.on.contains(&cause)
        }
    }
}

/// What a hash balancer hashes a request on, compiled.
#[derive(Debug)]
pub enum HashKey {
    /// A header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

impl HashKey {
    /// Parses a route's `hash_on` (`at`: its path in the file), reporting a name
    /// that does not parse to `p`.
    fn compile(h: &HashOn, at: &str, p: &mut Vec<String>) -> Option<HashKey> {
        match h {
            HashOn::Header(name) => match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => Some(HashKey::Header(name)),
                Err(_) => {
                    p.push(format!("{at}.header: `{name}` is not a header name"));
                    None
                }
            },
            HashOn::Cookie(name) if name.is_empty() || name.contains([';', '=', ' ']) => {
                p.push(format!("{at}.cookie: `{name}` is not a cookie name"));
                None
            }
            HashOn::Cookie(name) => Some(HashKey::Cookie(name.clone())),
            HashOn::ClientIp => Some(HashKey::ClientIp),
        }
    }
}

/// What a route's own settings compile to, before any cluster is built.
struct RouteParts {
    matcher: Matcher,
    fallback: Option<Fallback>,
    hash_on: Option<HashKey>,
}

impl RouteParts {
    fn compile(r: &RouteConfig, at: &str, p: &mut Vec<String>) -> RouteParts {
        RouteParts {
            matcher: Matcher::compile(&r.matcher, &format!("{at}.match"), p),
            fallback: r
                .fallback
                .as_ref()
                .and_then(|f| Fallback::compile(f, &format!("{at}.fallback"), p)),
            hash_on: r
                .hash_on
                .as_ref()
                .and_then(|h| HashKey::compile(h, &format!("{at}.hash_on"), p)),
        }
    }
}

/// A route's metric handles, registered once so the request path does not build
/// label sets and look them up in the registry on every request.
pub struct RouteMetrics {
    name: String,
    duration: metrics::Histogram,
    retries: metrics::Counter,
    /// `palisade_requests_total` by status, registered on first use (index: status - 100).
    by_status: Box<[OnceLock<metrics::Counter>]>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// The handles for the route called `name` (`none` for requests no route took).
    pub fn new(name: &str) -> Self {
        RouteMetrics {
            name: name.to_string(),
            duration: metrics::histogram!("palisade_request_duration_seconds", "route" => name.to_string()),
            retries: metrics::counter!("palisade_retries_total", "route" => name.to_string()),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, status: http::StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        let counter = self.by_status[usize::from(code - 100)].get_or_init(|| {
            metrics::counter!("palisade_requests_total", "route" => self.name.clone(), "status" => code.to_string())
        });
        counter.increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }

    /// Counts one retry.
    pub fn retried(&self) {
        self.retries.increment(1);
    }
}

/// A route's retry settings, with its budget.
#[derive(Debug)]
pub struct RouteRetry {
    /// Attempts in all.
    pub attempts: u32,
    /// Conditions.
    pub retry_on: Vec<RetryOn>,
    /// Statuses for `retriable-status`.
    pub statuses: Vec<u16>,
    /// First backoff.
    pub backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// Retry POST / PATCH too.
    pub non_idempotent: bool,
    /// Bodies kept for replay up to this size.
    pub buffer_bytes: u64,
    /// The route's retry budget.
    pub budget: RetryBudget,
}

/// A route's rate limiter.
#[derive(Debug)]
pub enum RouteLimiter {
    /// One limit for everyone.
    Global(RateLimiter),
    /// One limit per client address.
    ClientIp(KeyedRateLimiter<IpAddr>),
    /// One limit per value of a header (requests without it share one).
    Header(http::HeaderName, KeyedRateLimiter<String>),
}

impl RouteLimiter {
    /// Builds a route's limiter, the rate-limit core validating its quota; its
    /// problems go to `p` under the file's names (`at`: the table's path).
    fn compile(l: &RateLimitConfig, at: &str, p: &mut Vec<String>) -> Option<RouteLimiter> {
        let quota = Quota::new(l.requests, l.per.get()).burst(l.burst.unwrap_or(l.requests));
        match Gcra::new(quota) {
            Ok(gcra) => Some(match &l.key {
                LimitKey::Global => RouteLimiter::Global(RateLimiter::new(gcra)),
                LimitKey::ClientIp => RouteLimiter::ClientIp(KeyedRateLimiter::new(gcra, l.max_keys)),
                LimitKey::Header(h) => {
                    RouteLimiter::Header(h.clone(), KeyedRateLimiter::new(gcra, l.max_keys))
                }
            }),
            Err(errors) => {
                p.extend(errors.0.iter().map(|e| {
                    let field = match e.field.as_str() {
                        "limit" => "requests",
                        "period" => "per",
                        other => other,
                    };
                    format!("{at}.{field}: {}", e.problem)
                }));
                None
            }
        }
    }
}

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
    /// `HTTP/1.1` or `HTTP/2` (h2c) to the endpoints.
    pub version: http::Version,
    /// Breaker counts 5xx as failures.
    pub breaker_counts_5xx: bool,
    /// Breaker counts 429 as failures.
    pub breaker_counts_429: bool,
    /// Ready even with no healthy endpoint.
    pub allow_empty: bool,
    /// TLS to the endpoints (`https` as HTTP/2's `:scheme`).
    pub tls: bool,
}

thread_local! {
    /// The index of the worker thread this is, if it is one.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as proxy worker `index` (see [`Upstream::pool`]).
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
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
        let last = self.pools.len() - 1;
        let i = WORKER.with(std::cell::Cell::get).map_or(last, |w| w.min(last));
        &self.pools[i]
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
fn spawn_pool_sweeper(up: &Arc<Upstream>, idle_timeout: Duration) -> JoinHandle<()> {
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

impl Runtime {
    /// Compiles a configuration into a runtime that does not run yet: every
    /// route, limiter, breaker, bulkhead, pool and TLS context built, each core
    /// validating its own settings, and the files the configuration names (TLS,
    /// endpoints file) read. Host names are not resolved and no task is started.
    /// `palisade check` is this function; start-up and reload are this function,
    /// then [`Runtime::build`]'s resolution and tasks, so a configuration `check`
    /// accepts cannot fail start-up for a reason of its own.
    pub fn compile(config: Config) -> Result<Runtime, ConfigError> {
        // The file's own checks and the routes' values parsed, all reported at once;
        // clusters are built only from a configuration that passed both.
        let mut problems = config.validate().err().map_or_else(Vec::new, |e| e.0);
        let route_at = |i: usize, name: &str| format!("routes[{i}] ({name})");
        let mut parts: Vec<RouteParts> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| RouteParts::compile(r, &route_at(i, &r.name), &mut problems))
            .collect();
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let mut clusters = HashMap::new();
        let tls = match config.gateway.tls.as_ref().map(crate::tls::acceptor) {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                problems.push(e);
                None
            }
            None => None,
        };
        for (name, section) in &config.clusters {
            match build_upstream(name, section, &config) {
                Ok(up) => {
                    clusters.insert(name.clone(), Arc::new(up));
                }
                Err(e) => problems.extend(e),
            }
        }
        let mut routes = Vec::new();
        for ((i, r), parts) in config.routes.iter().enumerate().zip(parts.drain(..)) {
            let at = route_at(i, &r.name);
            let limiter = r
                .rate_limit
                .as_ref()
                .and_then(|l| RouteLimiter::compile(l, &format!("{at}.rate_limit"), &mut problems));
            let Some(upstream) = clusters.get(&r.cluster) else {
                continue;
            };
            routes.push(Route {
                name: r.name.clone(),
                matcher: parts.matcher,
                upstream: upstream.clone(),
                timeout: r.timeout.get(),
                per_try_timeout: r.per_try_timeout.map_or(r.timeout.get(), |d| d.get()),
                body_idle_timeout: r.body_idle_timeout.get(),
                retry: r.retry.as_ref().map(|c| RouteRetry {
                    attempts: c.attempts,
                    retry_on: c.retry_on.clone(),
                    statuses: c.statuses.clone(),
                    backoff: c.backoff.get(),
                    max_backoff: c.max_backoff.get(),
                    non_idempotent: c.non_idempotent,
                    buffer_bytes: c.buffer_bytes,
                    budget: RetryBudget::new(BudgetConfig {
                        ratio: c.budget_ratio,
                        min_per_second: c.budget_min_per_second,
                        window: Duration::from_secs(10),
                    }),
                }),
                limiter,
                fallback: parts.fallback,
                hash_on: parts.hash_on,
                metrics: RouteMetrics::new(&r.name),
            });
        }
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        Ok(Runtime {
            config,
            routes,
            clusters,
            tls,
            unrouted: RouteMetrics::new("none"),
            tunnels: crate::tunnel::Tunnels::default(),
            tasks: Vec::new(),
        })
    }

    /// Builds a runtime that serves: [`Runtime::compile`], then every host name
    /// resolved, and health, discovery and pool tasks started. Fails (starting
    /// nothing) if an endpoint cannot be resolved.
    pub async fn build(config: Config) -> Result<Runtime, ConfigError> {
        let mut rt = Runtime::compile(config)?;
        let mut problems = Vec::new();
        for (name, up) in &rt.clusters {
            let section = &rt.config.clusters[name];
            match resolve_endpoints(name, section).await {
                Ok(infos) => up.cluster.set_endpoints(infos),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let idle = rt.config.gateway.pool_idle_timeout.get();
        for (name, up) in &rt.clusters {
            let section = &rt.config.clusters[name];
            rt.tasks.extend(crate::health::spawn(up, section));
            rt.tasks.extend(crate::discovery::spawn(up, section));
            rt.tasks.push(spawn_pool_sweeper(up, idle));
        }
        Ok(rt)
    }

    /// Ready: every cluster has a healthy endpoint or may be empty.
    pub fn is_ready(&self) -> bool {
        self.clusters
            .values()
            .all(|u| u.allow_empty || u.cluster.has_healthy_endpoint())
    }
}

/// The endpoints of a cluster as configured: addresses resolved, the endpoints
/// file read.
async fn resolve_endpoints(name: &str, s: &ClusterSection) -> Result<Vec<EndpointInfo>, String> {
    let mut infos = Vec::new();
    for e in &s.endpoints {
        infos.extend(
            resolve(e)
                .await
                .map_err(|m| format!("clusters.{name}.endpoints: {m}"))?,
        );
    }
    if let Some(path) = &s.endpoints_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("clusters.{name}.endpoints_file: {path}: {e}"))?;
        infos.extend(
            crate::discovery::parse_endpoints_file(&text)
                .map_err(|m| format!("clusters.{name}.endpoints_file: {m}"))?,
        );
    }
    Ok(infos)
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
/// validation (its problems named under `clusters.<name>.breaker`).
fn breaker_config(name: &str, b: &BreakerSection) -> Result<BreakerConfig, Vec<String>> {
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
    if b.failure_rate > 0.0 {
        bc = bc.failure_rate(b.failure_rate, b.minimum_calls);
    }
    if let Some(slow) = b.slow_call {
        bc = bc.slow_calls(slow.get(), b.slow_call_rate, b.minimum_calls);
    }
    bc.validate().map(|()| bc).map_err(|e| {
        e.0.iter()
            .map(|e| format!("clusters.{name}.breaker.{}: {}", e.field, e.problem))
            .collect()
    })
}

fn build_upstream(name: &str, s: &ClusterSection, config: &Config) -> Result<Upstream, Vec<String>> {
    let mut problems = Vec::new();
    let mut cluster = Cluster::new(cluster_config(name, s));
    match s.breaker.as_ref().map(|b| breaker_config(name, b)) {
        Some(Ok(bc)) => {
            let cluster_name = name.to_string();
            cluster = cluster.with_breakers(move |info| {
                let breaker = CircuitBreaker::builder(format!("{cluster_name}/{}", info.addr))
                    .config(bc.clone())
                    .build();
                match breaker {
                    Ok(b) => b,
                    // Unreachable: the same config passed the breaker's validation in
                    // `breaker_config`; a breaker that never opens would hide it.
                    Err(e) => unreachable!("validated breaker config refused: {e}"),
                }
            });
        }
        Some(Err(e)) => problems.extend(e),
        None => {}
    }
    let h2 = s.speaks_h2();
    let tls = match &s.tls {
        Some(t) => match UpstreamTls::new(name, t, h2) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(e);
                None
            }
        },
        None => None,
    };
    let connector = Connector::new(s.connect_timeout.get(), tls);
    let pools = (0..=worker_count(config.gateway.workers))
        .map(|_| {
            Arc::new(Pool::new(
                connector.clone(),
                h2,
                config.gateway.pool_idle_per_endpoint,
                config.gateway.pool_idle_timeout.get(),
            ))
        })
        .collect();
    let bulkhead = match s.max_concurrent {
        Some(n) => Some(
            Bulkhead::new(
                name.to_string(),
                BulkheadConfig {
                    max_concurrent: n,
                    max_wait: Duration::ZERO,
                },
            )
            .map_err(|e| vec![format!("clusters.{name}.max_concurrent: {e}")])?,
        ),
        None => None,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Upstream {
        name: name.to_string(),
        cluster,
        pools,
        bulkhead,
        version: if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        },
        breaker_counts_5xx: s.breaker.as_ref().is_none_or(|b| b.count_5xx),
        breaker_counts_429: s.breaker.as_ref().is_some_and(|b| b.count_429),
        allow_empty: s.allow_empty,
        tls: s.tls.is_some(),
    })
}

/// Resolves one configured endpoint to endpoint infos (a host name may give several
/// addresses).
pub async fn resolve(e: &EndpointConfig) -> Result<Vec<EndpointInfo>, String> {
    let (host, port) = split_host_port(e.address())?;
    let (weight, tier) = e.weight_tier();
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|err| format!("cannot resolve `{}`: {err}", e.address()))?
            .collect(),
    };
    Ok(addrs
        .into_iter()
        .map(|a| EndpointInfo::new(a).weight(weight).tier(tier))
        .collect())
}
