//! Routes compiled from their configuration: matchers with names parsed, fallback
//! answers built, hash keys, limiters with their quota validated by the rate-limit
//! core, retry settings with their budget, and metric handles registered once.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use palisade_resilience::layer::chaos::{Chaos, Injection};
use palisade_resilience::ratelimit::{
    Algorithm, Allowed, Gcra, KeyedRateLimiter, Quota, RateLimited, RateLimiter, SlidingWindowCounter,
    WarmUp, WarmUpLimiter,
};
use palisade_resilience::retry::{Backoff, BudgetConfig, RetryBudget, RetryPolicy};
use palisade_resilience::timeout::{AdaptiveConfig, AdaptiveTimeout};

use crate::cause::Cause;
use crate::config::{
    AdaptiveTimeoutConfig, ConfigError, DeadlineConfig, FallbackConfig, FaultConfig, HashOn, LimitAlgorithm,
    LimitKey, MatchConfig, RateLimitConfig, RetryConfig, RetryOn, RouteConfig, header_name, host_pattern,
};
use crate::load::{RouteHedge, RoutePriority};
use crate::upstream::Upstream;

/// One route, ready to serve.
#[derive(Debug)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// What it matches.
    pub matcher: Matcher,
    /// Where it sends (none for a route that serves files).
    pub upstream: Option<Arc<Upstream>>,
    /// The directory it serves, when it serves files.
    pub files: Option<crate::files::StaticFiles>,
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
    /// Rate limit shared through Redis, when it has one (then `limiter` is none).
    pub global_limit: Option<crate::global_limit::GlobalLimit>,
    /// Fallback answer.
    pub fallback: Option<Fallback>,
    /// Hash key source.
    pub hash_on: Option<HashKey>,
    /// Fault injection, when the route has it.
    pub fault: Option<RouteFault>,
    /// Deadline propagation, when the route has it.
    pub deadline: Option<RouteDeadline>,
    /// Adaptive per-try timeouts, when the route has them.
    pub adaptive: Option<AdaptiveTimeouts>,
    /// Its priority when its cluster sheds load.
    pub priority: RoutePriority,
    /// Hedged requests, when the route has them.
    pub hedge: Option<RouteHedge>,
    /// Proxied, or stored in the queue and delivered later.
    pub mode: crate::config::RouteMode,
    /// Its response cache's rules, when it has one.
    pub cache: Option<crate::responses::RouteCache>,
    /// Its idempotency keys, when it has them.
    pub idempotency: Option<crate::idempotent::RouteIdempotency>,
    /// Its traffic split, when it has one.
    pub split: Option<crate::split::RouteSplit>,
    /// Its mirror, when it has one.
    pub mirror: Option<crate::split::RouteMirror>,
    /// Its signed URLs and token checks, when it has them.
    pub guard: Option<crate::guard::RouteGuard>,
    /// Its metric handles.
    pub metrics: RouteMetrics,
}

impl Route {
    /// Builds route `r` (`at`: its path in the file) from its parts and its cluster,
    /// each policy validated by its core and its problems reported to `p`; `None`
    /// when its cluster was not built (its problems are reported all the same).
    pub(crate) fn compile(
        r: &RouteConfig,
        parts: RouteParts,
        clusters: &std::collections::HashMap<String, Arc<Upstream>>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<Route> {
        let upstream = clusters.get(&r.cluster).cloned();
        let split = crate::split::RouteSplit::compile(&r.split, clusters, &format!("{at}.split"), p);
        let mirror = (r.mirror.as_ref()).and_then(|m| {
            crate::split::RouteMirror::compile(&r.name, m, clusters, &format!("{at}.mirror"), p)
        });
        let per_try_timeout = r.per_try_timeout.map_or(r.timeout.get(), |d| d.get());
        let retry = (r.retry.as_ref()).and_then(|c| RouteRetry::compile(c, &format!("{at}.retry"), p));
        let fault = (r.fault.as_ref()).and_then(|f| RouteFault::compile(f, &format!("{at}.fault"), p));
        let deadline =
            (r.deadline.as_ref()).and_then(|d| RouteDeadline::compile(d, &format!("{at}.deadline"), p));
        let adaptive = (r.adaptive_timeout.as_ref()).and_then(|c| {
            AdaptiveTimeouts::compile(c, per_try_timeout, &format!("{at}.adaptive_timeout"), p)
        });
        let priority = (r.shed.as_ref()).map_or_else(RoutePriority::default, |c| {
            let at = format!("{at}.shed");
            if upstream.as_ref().is_some_and(|u| u.shed.is_none()) {
                p.push(ConfigError::new(
                    at.clone(),
                    format!(
                        "cluster {} has no adaptive_concurrency: a priority needs its cluster to shed load",
                        r.cluster
                    ),
                ));
            }
            RoutePriority::compile(c, &at, p)
        });
        let hedge = (r.hedge.as_ref()).and_then(|c| {
            RouteHedge::compile(c, per_try_timeout, r.retry.is_some(), &format!("{at}.hedge"), p)
        });
        let cache = (r.cache.as_ref())
            .and_then(|c| crate::responses::RouteCache::compile(c, &r.name, &format!("{at}.cache"), p));
        let idempotency = (r.idempotency.as_ref()).and_then(|c| {
            crate::idempotent::RouteIdempotency::compile(c, r, &format!("{at}.idempotency"), p)
        });
        Some(Route {
            name: r.name.clone(),
            matcher: parts.matcher,
            upstream: match &parts.files {
                Some(_) => None,
                None => Some(upstream?),
            },
            files: parts.files,
            timeout: r.timeout.get(),
            per_try_timeout,
            body_idle_timeout: r.body_idle_timeout.get(),
            retry,
            limiter: parts.limiter,
            global_limit: parts.global_limit,
            fallback: parts.fallback,
            hash_on: parts.hash_on,
            fault,
            deadline,
            adaptive,
            priority,
            hedge,
            mode: r.mode,
            cache,
            idempotency,
            split,
            mirror,
            guard: parts.guard,
            metrics: RouteMetrics::new(&r.name),
        })
    }
}

impl Route {
    /// The cluster `req` goes to: its split's choice, else the route's own (none
    /// for a route that serves files).
    pub fn upstream_for<B>(&self, req: &http::Request<B>) -> Option<&Arc<Upstream>> {
        match &self.split {
            Some(split) => split.pick(req).or(self.upstream.as_ref()),
            None => self.upstream.as_ref(),
        }
    }
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
    fn compile(m: &MatchConfig, at: &str, p: &mut Vec<ConfigError>) -> Matcher {
        if let Some(host) = &m.host
            && let Err(e) = host_pattern(host)
        {
            p.push(ConfigError::new(format!("{at}.host"), format!("`{host}` {e}")));
        }
        for (field, path) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
            if path.as_ref().is_some_and(|path| !path.starts_with('/')) {
                p.push(ConfigError::new(format!("{at}.{field}"), "must start with `/`"));
            }
        }
        let mut methods = Vec::new();
        for x in &m.methods {
            match http::Method::from_bytes(x.to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => p.push(ConfigError::new(
                    format!("{at}.methods"),
                    format!("`{x}` is not a method"),
                )),
            }
        }
        let mut headers = Vec::new();
        for (k, v) in &m.headers {
            let name = header_name(k, &format!("{at}.headers"), p);
            let value = http::HeaderValue::from_str(v);
            if value.is_err() {
                p.push(ConfigError::new(
                    format!("{at}.headers.{k}"),
                    "not a header value (control characters such as NUL, CR, LF cannot be sent)",
                ));
            }
            if let (Some(name), Ok(value)) = (name, value) {
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
    fn compile(f: &FallbackConfig, at: &str, p: &mut Vec<ConfigError>) -> Option<Fallback> {
        let status = http::StatusCode::from_u16(f.status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()));
        if status.is_none() {
            p.push(ConfigError::new(
                format!("{at}.status"),
                format!("{} is not between 200 and 599", f.status),
            ));
        }
        let content_type = http::HeaderValue::from_str(&f.content_type).ok();
        if content_type.is_none() {
            p.push(ConfigError::new(
                format!("{at}.content_type"),
                "not a header value",
            ));
        }
        // The endpoint's own answers are passed on, never `upstream` failures.
        if f.on.contains(&Cause::Upstream) {
            p.push(ConfigError::new(
                format!("{at}.on"),
                "`upstream` is not a cause the gateway answers for (an endpoint's own answer is passed on; name connect_error, upstream_reset, protocol_error or timeout)",
            ));
            return None;
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
    fn compile(h: &HashOn, at: &str, p: &mut Vec<ConfigError>) -> Option<HashKey> {
        match h {
            HashOn::Header(name) => header_name(name, &format!("{at}.header"), p).map(HashKey::Header),
            HashOn::Cookie(name) if name.is_empty() || name.contains([';', '=', ' ']) => {
                p.push(ConfigError::new(
                    format!("{at}.cookie"),
                    format!("`{name}` is not a cookie name"),
                ));
                None
            }
            HashOn::Cookie(name) => Some(HashKey::Cookie(name.clone())),
            HashOn::ClientIp => Some(HashKey::ClientIp),
        }
    }
}

/// What a route's own settings compile to, before any cluster is built.
pub(crate) struct RouteParts {
    pub(crate) matcher: Matcher,
    pub(crate) fallback: Option<Fallback>,
    pub(crate) hash_on: Option<HashKey>,
    pub(crate) guard: Option<crate::guard::RouteGuard>,
    pub(crate) files: Option<crate::files::StaticFiles>,
    pub(crate) limiter: Option<RouteLimiter>,
    pub(crate) global_limit: Option<crate::global_limit::GlobalLimit>,
}

impl RouteParts {
    /// Compiles route `r` (at `at`) for a gateway of `workers` proxy workers, with
    /// the JWT `providers`; problems to `p`.
    pub(crate) fn compile(
        r: &RouteConfig,
        at: &str,
        (providers, workers): (
            &std::collections::HashMap<String, Arc<crate::keys::Provider>>,
            usize,
        ),
        p: &mut Vec<ConfigError>,
    ) -> RouteParts {
        let limit_at = format!("{at}.rate_limit");
        RouteParts {
            files: (r.static_files.as_ref()).and_then(|f| {
                let prefix = r.matcher.path_prefix.as_deref();
                crate::files::StaticFiles::compile(f, prefix, &format!("{at}.static_files"), p)
            }),
            // A global limit keeps the quota in Redis; its local share is its own.
            global_limit: (r.rate_limit.as_ref()).and_then(|l| {
                let g = l.global.as_ref()?;
                crate::global_limit::GlobalLimit::compile(&r.name, (l, g), &limit_at, workers, p)
            }),
            limiter: (r.rate_limit.as_ref())
                .filter(|l| l.global.is_none())
                .and_then(|l| RouteLimiter::compile(l, &limit_at, p)),
            guard: crate::guard::RouteGuard::compile(
                &r.name,
                r.auth.as_ref(),
                r.signed_urls.as_ref(),
                providers,
                at,
                p,
            ),
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
    /// The same answers, for the dashboard.
    pub totals: crate::totals::RouteTotals,
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
            totals: crate::totals::RouteTotals::default(),
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
        self.totals.record(code, elapsed);
    }

    /// Counts one retry.
    pub fn retried(&self) {
        self.retries.increment(1);
    }
}

/// A route's retry settings: what is retried (the gateway's conditions), and the
/// resilience crate's retry policy deciding how often and after how long (attempts,
/// full-jitter exponential backoff, the route's budget, the server's `Retry-After`).
#[derive(Debug)]
pub struct RouteRetry {
    /// Conditions.
    pub retry_on: Vec<RetryOn>,
    /// Statuses for `retriable-status`.
    pub statuses: Vec<u16>,
    /// Retry POST / PATCH too.
    pub non_idempotent: bool,
    /// Bodies kept for replay up to this size.
    pub buffer_bytes: u64,
    /// Attempts, backoff and the route's budget.
    pub policy: RetryPolicy,
}

impl RouteRetry {
    /// Builds a route's retry settings, the retry core validating its policy; its
    /// problems go to `p` under the file's names (`at`: the table's path).
    pub(crate) fn compile(c: &RetryConfig, at: &str, p: &mut Vec<ConfigError>) -> Option<RouteRetry> {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: c.budget_ratio,
            min_per_second: c.budget_min_per_second,
            window: Duration::from_secs(10),
        });
        let policy = RetryPolicy::new(c.attempts)
            .backoff(Backoff::ExponentialJitter {
                initial: c.backoff.get(),
                multiplier: 2.0,
                max: c.max_backoff.get(),
            })
            .budget(budget);
        if let Err(errors) = policy.validate() {
            p.extend(errors.into_iter().map(|mut e| {
                let key = match e.field.as_str() {
                    "max_attempts" => "attempts",
                    "backoff.max" => "max_backoff",
                    "budget.ratio" => "budget_ratio",
                    other => other,
                };
                e.field = format!("{at}.{key}");
                e
            }));
            return None;
        }
        Some(RouteRetry {
            retry_on: c.retry_on.clone(),
            statuses: c.statuses.clone(),
            non_idempotent: c.non_idempotent,
            buffer_bytes: c.buffer_bytes,
            policy,
        })
    }
}

/// A route's rate limiter: one of the library's algorithms, for one key.
#[derive(Debug)]
pub enum RouteLimiter {
    /// GCRA, refusing past its burst or (pacing) delaying up to its `max_wait`.
    Gcra(Keyed<Gcra>),
    /// A sliding window counter.
    Window(Keyed<SlidingWindowCounter>),
    /// One global limit with a cold start.
    WarmUp(WarmUpLimiter),
}

/// The file's key for a rate-limit core's field: the quota's `limit` is
/// `requests`, its period (a window's too) `per`, a warm-up's period `warm_up`.
fn limit_key(algorithm: LimitAlgorithm, core: &str) -> &str {
    match core {
        "limit" | "quota.limit" => "requests",
        "window" | "quota.period" => "per",
        "period" if algorithm == LimitAlgorithm::WarmUp => "warm_up",
        "period" => "per",
        other => other.trim_start_matches("quota."),
    }
}

/// A limiter of algorithm `A` for everyone, per client address, or per value of a
/// header.
#[derive(Debug)]
pub enum Keyed<A> {
    /// One limit for everyone.
    Global(RateLimiter<A>),
    /// One limit per client address.
    ClientIp(KeyedRateLimiter<IpAddr, A>),
    /// One limit per value of a header (requests without it share one).
    Header(http::HeaderName, KeyedRateLimiter<String, A>),
}

impl<A: Algorithm> Keyed<A> {
    fn new(algorithm: A, key: &LimitKey, max_keys: usize) -> Self {
        match key {
            LimitKey::Global => Keyed::Global(RateLimiter::new(algorithm)),
            LimitKey::ClientIp => Keyed::ClientIp(KeyedRateLimiter::new(algorithm, max_keys)),
            LimitKey::Header(h) => Keyed::Header(h.clone(), KeyedRateLimiter::new(algorithm, max_keys)),
        }
    }

    fn check<B>(&self, req: &http::Request<B>, client: IpAddr) -> Result<Allowed, RateLimited> {
        match self {
            Keyed::Global(l) => l.check(),
            Keyed::ClientIp(l) => l.check(&client),
            Keyed::Header(name, l) => {
                let key = req
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                l.check(&key)
            }
        }
    }
}

impl RouteLimiter {
    /// Asks the limit for `req` from `client`: allowed now, allowed after a wait
    /// ([`Allowed::wait`], pacing), or refused.
    pub fn check<B>(&self, req: &http::Request<B>, client: IpAddr) -> Result<Allowed, RateLimited> {
        match self {
            RouteLimiter::Gcra(k) => k.check(req, client),
            RouteLimiter::Window(k) => k.check(req, client),
            RouteLimiter::WarmUp(l) => l.check(),
        }
    }

    /// Builds a route's limiter, the rate-limit core validating its settings; its
    /// problems go to `p` under the file's names (`at`: the table's path).
    pub(crate) fn compile(l: &RateLimitConfig, at: &str, p: &mut Vec<ConfigError>) -> Option<RouteLimiter> {
        let bad = |p: &mut Vec<ConfigError>, field: &str, problem: &str| {
            p.push(ConfigError::new(format!("{at}.{field}"), problem));
        };
        let quota = Quota::new(l.requests, l.per.get()).burst(l.burst.unwrap_or(l.requests));
        let built = match l.algorithm {
            LimitAlgorithm::Gcra | LimitAlgorithm::Pacing if l.warm_up.is_some() => {
                bad(p, "warm_up", "is for `algorithm = \"warm-up\"`");
                return None;
            }
            LimitAlgorithm::Gcra if l.max_wait.is_some() => {
                bad(
                    p,
                    "max_wait",
                    "is for `pacing` and `warm-up` (gcra refuses at once)",
                );
                return None;
            }
            LimitAlgorithm::Gcra => {
                Gcra::new(quota).map(|a| RouteLimiter::Gcra(Keyed::new(a, &l.key, l.max_keys)))
            }
            LimitAlgorithm::Pacing => {
                let Some(wait) = l.max_wait.filter(|w| !w.is_zero()) else {
                    bad(
                        p,
                        "max_wait",
                        "pacing needs the longest a request may wait (e.g. \"500ms\")",
                    );
                    return None;
                };
                Gcra::pacing(quota, wait.get()).map(|a| RouteLimiter::Gcra(Keyed::new(a, &l.key, l.max_keys)))
            }
            LimitAlgorithm::SlidingWindow => {
                if l.burst.is_some() || l.max_wait.is_some() || l.warm_up.is_some() {
                    bad(
                        p,
                        "algorithm",
                        "a sliding window takes `requests` and `per` only (no burst, max_wait or warm_up)",
                    );
                    return None;
                }
                SlidingWindowCounter::new(l.requests, l.per.get())
                    .map(|a| RouteLimiter::Window(Keyed::new(a, &l.key, l.max_keys)))
            }
            LimitAlgorithm::WarmUp => {
                if l.key != LimitKey::Global {
                    bad(
                        p,
                        "key",
                        "a warm-up limit is one global limit (its ramp is the service's, not a client's)",
                    );
                    return None;
                }
                let Some(period) = l.warm_up else {
                    bad(
                        p,
                        "warm_up",
                        "a warm-up limit needs its warm-up period (e.g. \"2m\")",
                    );
                    return None;
                };
                let config = WarmUp {
                    max_wait: l.max_wait.map_or(Duration::ZERO, |w| w.get()),
                    ..WarmUp::new(quota, period.get())
                };
                WarmUpLimiter::new(config).map(RouteLimiter::WarmUp)
            }
        };
        built
            .map_err(|errors| {
                p.extend(errors.into_iter().map(|mut e| {
                    e.field = format!("{at}.{}", limit_key(l.algorithm, &e.field));
                    e
                }));
            })
            .ok()
    }
}

/// A route's fault injection on the library's chaos core ([`Chaos`]): a share of
/// requests delayed, a share aborted with a status, optionally only requests
/// carrying a header.
#[derive(Debug)]
pub struct RouteFault {
    /// The rates and the delay.
    pub chaos: Chaos,
    /// The status of an aborted request.
    pub abort_status: http::StatusCode,
    /// Only requests carrying this header are candidates.
    pub header: Option<http::HeaderName>,
}

/// What a route's fault table does to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing.
    None,
    /// Sent after this delay.
    Delay(Duration),
    /// Answered by the gateway with this status, never sent.
    Abort(http::StatusCode),
}

impl RouteFault {
    /// Builds a route's fault table (`at`: its path in the file).
    pub(crate) fn compile(f: &FaultConfig, at: &str, p: &mut Vec<ConfigError>) -> Option<RouteFault> {
        let header = header_field(f.header.as_deref(), at, p).ok()?;
        let chaos = Chaos::new();
        let set = chaos
            .set_outcome_rate(f.abort_rate)
            .and_then(|()| chaos.set_latency(f.delay_rate, f.delay.map_or(Duration::ZERO, |d| d.get())));
        if let Err(errors) = set {
            p.extend(errors.into_iter().map(|mut e| {
                e.field = format!("{at}.{}", e.field);
                e
            }));
            return None;
        }
        chaos.enable();
        Some(RouteFault {
            chaos,
            abort_status: http::StatusCode::from_u16(f.abort_status).ok()?,
            header,
        })
    }

    /// What to do to `req`.
    pub fn decide<B>(&self, req: &http::Request<B>) -> Fault {
        if self
            .header
            .as_ref()
            .is_some_and(|h| !req.headers().contains_key(h))
        {
            return Fault::None;
        }
        match self.chaos.decide() {
            Injection::Outcome | Injection::Error => Fault::Abort(self.abort_status),
            Injection::Latency(d) => Fault::Delay(d),
            Injection::None => Fault::None,
        }
    }
}

/// A route's deadline propagation (see [`DeadlineConfig`]).
#[derive(Debug)]
pub struct RouteDeadline {
    /// The header carrying a deadline in milliseconds for requests that are not
    /// gRPC.
    pub header: Option<http::HeaderName>,
}

/// A table's optional `header` field (`at`: the table's path): `Err` when it is
/// set and not a header name (reported to `p`).
fn header_field(
    header: Option<&str>,
    at: &str,
    p: &mut Vec<ConfigError>,
) -> Result<Option<http::HeaderName>, ()> {
    header
        .map(|h| header_name(h, &format!("{at}.header"), p).ok_or(()))
        .transpose()
}

const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

impl RouteDeadline {
    /// Builds a route's deadline propagation (`at`: its path in the file).
    pub(crate) fn compile(d: &DeadlineConfig, at: &str, p: &mut Vec<ConfigError>) -> Option<RouteDeadline> {
        let header = header_field(d.header.as_deref(), at, p).ok()?;
        Some(RouteDeadline { header })
    }

    /// The time the client gives the request, if it says: `grpc-timeout` on a gRPC
    /// request, else the configured header in milliseconds. Unreadable values are
    /// ignored (the route's own timeout holds).
    pub fn incoming(&self, h: &http::HeaderMap) -> Option<Duration> {
        if is_grpc(h) {
            h.get(GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()))
        } else {
            let v = h.get(self.header.as_ref()?)?;
            v.to_str().ok()?.trim().parse().ok().map(Duration::from_millis)
        }
    }

    /// Tells the endpoint it has `left`: `grpc-timeout` (in milliseconds, rounded
    /// up) on a gRPC request, else the configured header.
    pub fn outgoing(&self, h: &mut http::HeaderMap, left: Duration) {
        let ms = left
            .as_millis()
            .saturating_add(u128::from(left.subsec_nanos() % 1_000_000 > 0));
        let (name, value) = if is_grpc(h) {
            // At most 8 digits (the gRPC wire format).
            (GRPC_TIMEOUT, format!("{}m", ms.min(99_999_999)))
        } else if let Some(name) = &self.header {
            (name.clone(), ms.to_string())
        } else {
            return;
        };
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `grpc-timeout`: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_refuse_the_rest() {
        let ms = |v: &str| parse_grpc_timeout(v.as_bytes()).map(|d| d.as_millis());
        assert_eq!(ms("2H"), Some(7_200_000));
        assert_eq!(ms("1M"), Some(60_000));
        assert_eq!(ms("3S"), Some(3_000));
        assert_eq!(ms("250m"), Some(250));
        assert_eq!(ms("5000u"), Some(5));
        assert_eq!(ms("7000000n"), Some(7));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_time_left_is_written_in_the_requests_own_form() {
        let d = RouteDeadline {
            header: Some(http::HeaderName::from_static("x-request-timeout-ms")),
        };
        let mut grpc = http::HeaderMap::new();
        grpc.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        d.outgoing(&mut grpc, Duration::from_micros(1500));
        assert_eq!(grpc["grpc-timeout"], "2m");
        assert_eq!(d.incoming(&grpc), Some(Duration::from_millis(2)));
        let mut plain = http::HeaderMap::new();
        d.outgoing(&mut plain, Duration::from_millis(250));
        assert_eq!(plain["x-request-timeout-ms"], "250");
        assert_eq!(d.incoming(&plain), Some(Duration::from_millis(250)));
    }
}

/// A route's adaptive per-try timeouts: one [`AdaptiveTimeout`] per endpoint,
/// made on the endpoint's first attempt.
#[derive(Debug)]
pub struct AdaptiveTimeouts {
    config: AdaptiveConfig,
    by_endpoint: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Arc<AdaptiveTimeout>>>,
}

impl AdaptiveTimeouts {
    /// Builds a route's adaptive timeouts, the timeout core validating them (`at`:
    /// the table's path; `per_try`: the route's fixed per-try timeout, the cold
    /// start and default ceiling).
    pub(crate) fn compile(
        c: &AdaptiveTimeoutConfig,
        per_try: Duration,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<AdaptiveTimeouts> {
        let config = AdaptiveConfig {
            quantile: c.quantile,
            multiplier: c.multiplier,
            min: c.min.get(),
            max: c.max.map_or(per_try, |m| m.get()),
            initial: per_try,
            min_samples: c.min_samples,
            window: c.window.get(),
        };
        if let Err(errors) = config.validate() {
            p.extend(errors.into_iter().map(|mut e| {
                e.field = format!("{at}.{}", e.field);
                e
            }));
            return None;
        }
        Some(AdaptiveTimeouts {
            config,
            by_endpoint: std::sync::Mutex::default(),
        })
    }

    /// The adaptive timeout of the endpoint at `addr`.
    pub fn for_endpoint(&self, addr: std::net::SocketAddr) -> Arc<AdaptiveTimeout> {
        let mut map = self.by_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(addr)
            .or_insert_with(|| match AdaptiveTimeout::new(self.config) {
                Ok(t) => Arc::new(t),
                // Unreachable: the same config passed the core's validation in
                // `compile`.
                Err(e) => unreachable!("validated adaptive timeout refused: {e}"),
            })
            .clone()
    }
}
