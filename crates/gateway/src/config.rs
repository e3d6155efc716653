//! The gateway's configuration: TOML, every table closed to unknown keys, durations
//! written as `"250ms"`, `"30s"`, `"5m"`. [`Config::from_toml`] parses and then
//! validates the whole file, reporting every problem with its path at once;
//! environment variables `PALISADE_<SECTION>__<KEY>` override values
//! ([`Config::load`]). The reference is `docs/configuration.md`; an annotated example
//! is `examples/gateway.toml`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and limits.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// Routes, matched in order; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterSection>,
}

/// `[gateway]`: listeners and request limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Where clients connect (HTTP/1.1 and h2c on one port).
    pub listen: SocketAddr,
    /// The admin listener (health, metrics, state); `None` turns it off.
    pub admin: Option<SocketAddr>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers) accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Idle keep-alive connections to each upstream endpoint, per worker.
    pub pool_idle_per_endpoint: usize,
    /// How long idle upstream connections are kept.
    pub pool_idle_timeout: Dur,
    /// How long shutdown waits for requests in flight and open tunnels.
    pub drain_timeout: Dur,
    /// An upgraded connection (WebSocket) through which nothing has moved for this
    /// long is closed.
    pub tunnel_idle_timeout: Dur,
    /// Log one line per request.
    pub access_log: bool,
    /// Watch the config file and reload when it changes (also on SIGHUP).
    pub watch_config: bool,
    /// TLS on the proxy listener (`None`: plain HTTP/1.1 and h2c).
    pub tls: Option<TlsConfig>,
    /// Proxy worker threads, each a single-threaded runtime (0: one per core). Read
    /// at start only.
    pub workers: usize,
}

/// `[gateway.tls]`: the proxy listener's certificate.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
    /// Protocols offered by ALPN, in order of preference.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Time allowed for a client's handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

fn default_alpn() -> Vec<String> {
    vec!["h2".into(), "http/1.1".into()]
}

fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            max_body_bytes: 4 << 20,
            max_header_bytes: 16 << 10,
            pool_idle_per_endpoint: 64,
            pool_idle_timeout: Dur(Duration::from_secs(90)),
            drain_timeout: Dur(Duration::from_secs(15)),
            tunnel_idle_timeout: Dur(Duration::from_secs(300)),
            access_log: false,
            watch_config: true,
            tls: None,
            workers: 0,
        }
    }
}

/// `[[routes]]`: which requests go to which cluster, and the policies on the way.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// What the route matches.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// The cluster requests go to.
    pub cluster: String,
    /// Total time for the request, retries included (504 beyond).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Time for one attempt (`None`: the total timeout).
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// A response body through which nothing has come for this long is cut off
    /// (the endpoint's failure). `timeout` ends at the response's headers; this
    /// bounds a body that stalls after them.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout: Dur,
    /// Retries (`None`: one attempt).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// A rate limit on the route.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// The answer when the request fails (instead of the error).
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// For hash balancers: what the request is hashed on.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(15))
}

fn default_body_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

/// A route's match: every given condition must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// The `Host` (or `:authority`), without port; `*.example.com` matches subdomains.
    pub host: Option<String>,
    /// The path starts with this.
    pub path_prefix: Option<String>,
    /// The path is exactly this.
    pub path: Option<String>,
    /// The method is one of these.
    #[serde(default)]
    pub methods: Vec<String>,
    /// These headers have these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Retry policy for a route.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (2 = one retry).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// What is retried: `connect-failure`, `reset`, `timeout`, `5xx`,
    /// `gateway-error` (502/503/504), `retriable-status` (the statuses below),
    /// `refused` (the endpoint's breaker refused; another endpoint is tried).
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Statuses retried under `retriable-status`.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// First backoff (full jitter, doubling).
    #[serde(default = "default_backoff")]
    pub backoff: Dur,
    /// Largest backoff.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Dur,
    /// Also retry methods that are not idempotent (POST, PATCH).
    #[serde(default)]
    pub non_idempotent: bool,
    /// Retries at most this share of requests (over 10 s) ...
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// ... but always allow this many per second.
    #[serde(default = "default_budget_min")]
    pub budget_min_per_second: u32,
    /// Request bodies up to this size are kept so they can be sent again; larger
    /// ones are sent once.
    #[serde(default = "default_retry_buffer")]
    pub buffer_bytes: u64,
}

fn default_attempts() -> u32 {
    2
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::Refused,
        RetryOn::GatewayError,
    ]
}
fn default_backoff() -> Dur {
    Dur(Duration::from_millis(25))
}
fn default_max_backoff() -> Dur {
    Dur(Duration::from_millis(250))
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min() -> u32 {
    10
}
fn default_retry_buffer() -> u64 {
    64 << 10
}

/// A retry condition.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the endpoint could not be made.
    ConnectFailure,
    /// The connection was reset or closed before a response.
    Reset,
    /// The attempt timed out.
    Timeout,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    Status5xx,
    /// 502, 503, 504.
    GatewayError,
    /// The statuses listed in `statuses`.
    RetriableStatus,
    /// The endpoint's breaker refused the attempt.
    Refused,
}

/// A route's rate limit.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period.
    #[serde(default = "one_second")]
    pub per: Dur,
    /// Burst (defaults to `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Who the limit is per: `global`, `client-ip`, or `header:<name>`.
    #[serde(default = "default_limit_key")]
    pub key: String,
    /// For keyed limits: most keys remembered.
    #[serde(default = "default_limit_keys")]
    pub max_keys: usize,
}

fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_limit_key() -> String {
    "global".into()
}
fn default_limit_keys() -> usize {
    100_000
}

/// A fixed answer when a route's request fails.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Status of the answer.
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// Body of the answer.
    #[serde(default)]
    pub body: String,
    /// Its content type.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Which failures fall back (by cause, e.g. `circuit_open`, `timeout`); empty:
    /// all of them.
    #[serde(default)]
    pub on: Vec<String>,
}

fn default_fallback_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "application/json".into()
}

/// What a hash balancer hashes a request on.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum HashOn {
    /// A header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

/// `[clusters.<name>]`: endpoints and how to treat them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Endpoints: `"host:port"` strings or tables with `address`, `weight`, `tier`.
    /// Host names are resolved by DNS and re-resolved every `dns_refresh`.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// A file listing endpoints (one `host:port [weight] [tier]` per line),
    /// re-read when it changes; used in addition to `endpoints`.
    #[serde(default)]
    pub endpoints_file: Option<String>,
    /// How often host names are resolved again.
    #[serde(default = "default_dns_refresh")]
    pub dns_refresh: Dur,
    /// Load balancing: `round-robin`, `weighted-round-robin`, `random`,
    /// `least-request`, `peak-ewma`, `ring-hash`, `maglev`.
    #[serde(default = "default_lb")]
    pub lb: String,
    /// Virtual nodes per endpoint for `ring-hash`.
    #[serde(default = "default_vnodes")]
    pub ring_vnodes: u32,
    /// Upstream protocol: `http1`, `h2c` (HTTP/2 without TLS, also for gRPC) or
    /// `h2` (HTTP/2 over TLS, agreed by ALPN; needs `tls`).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// TLS to the endpoints (`None`: cleartext).
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Bulkhead: most requests in flight to the cluster (503 `bulkhead_full` beyond).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Below this healthy share of the serving tier, health is ignored (0 = never).
    #[serde(default = "default_panic")]
    pub panic_threshold: f64,
    /// May the cluster have no healthy endpoint and still be ready?
    #[serde(default)]
    pub allow_empty: bool,
    /// A circuit breaker per endpoint.
    #[serde(default)]
    pub breaker: Option<BreakerSection>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: Option<OutlierSection>,
    /// Active health checks.
    #[serde(default)]
    pub health: Option<HealthSection>,
    /// Failover between tiers.
    #[serde(default)]
    pub failover: Option<FailoverSection>,
}

/// `[clusters.<name>.tls]`: TLS to a cluster's endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CAs trusted to sign the endpoints' certificates (default: the
    /// Mozilla roots bundled with the binary).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The name the endpoints' certificates must carry, also sent as SNI (default:
    /// the endpoint's IP address, which its certificate must then list).
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for endpoints that require mutual TLS.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
}

impl ClusterSection {
    /// Whether the endpoints speak HTTP/2 (`h2c` or `h2`), else HTTP/1.1.
    pub fn speaks_h2(&self) -> bool {
        self.protocol != "http1"
    }
}

fn default_dns_refresh() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_lb() -> String {
    "least-request".into()
}
fn default_vnodes() -> u32 {
    160
}
fn default_protocol() -> String {
    "http1".into()
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_panic() -> f64 {
    0.5
}

/// One endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// `"host:port"`.
    Address(String),
    /// `{ address = "host:port", weight = 2, tier = 1 }`.
    Detailed {
        /// `host:port`.
        address: String,
        /// Relative weight.
        #[serde(default = "one")]
        weight: u32,
        /// Failover tier (0 first).
        #[serde(default)]
        tier: u8,
    },
}

fn one() -> u32 {
    1
}

impl EndpointConfig {
    /// The `host:port` text.
    pub fn address(&self) -> &str {
        match self {
            EndpointConfig::Address(a) | EndpointConfig::Detailed { address: a, .. } => a,
        }
    }

    /// Weight and tier.
    pub fn weight_tier(&self) -> (u32, u8) {
        match self {
            EndpointConfig::Address(_) => (1, 0),
            EndpointConfig::Detailed { weight, tier, .. } => (*weight, *tier),
        }
    }
}

/// A per-endpoint circuit breaker.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    /// Open after this many failures in a row (0: off).
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Open when this share of the last `window` calls failed (0: off).
    #[serde(default = "default_rate")]
    pub failure_rate: f64,
    /// The rate is judged only with at least this many calls.
    #[serde(default = "default_min_calls")]
    pub minimum_calls: u32,
    /// Calls in the rate window.
    #[serde(default = "default_window")]
    pub window: u32,
    /// A call slower than this counts as slow (`None`: off) ...
    #[serde(default)]
    pub slow_call: Option<Dur>,
    /// ... and this share of slow calls opens the breaker.
    #[serde(default = "default_rate")]
    pub slow_call_rate: f64,
    /// How long it stays open first (doubling on re-opens up to `max_open`).
    #[serde(default = "default_open")]
    pub open: Dur,
    /// Longest open period.
    #[serde(default = "default_max_open")]
    pub max_open: Dur,
    /// Probes let through when half-open.
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
    /// Successful probes that close it.
    #[serde(default = "default_probes")]
    pub success_threshold: u32,
    /// Count 5xx responses as failures (not only connection errors and timeouts).
    #[serde(default = "yes")]
    pub count_5xx: bool,
    /// Count 429 responses as failures.
    #[serde(default)]
    pub count_429: bool,
}

fn default_consecutive() -> u32 {
    5
}
fn default_rate() -> f64 {
    0.5
}
fn default_min_calls() -> u32 {
    20
}
fn default_window() -> u32 {
    100
}
fn default_open() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_max_open() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_probes() -> u32 {
    3
}
fn yes() -> bool {
    true
}

/// Passive outlier detection.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    /// Eject after this many 5xx in a row (0: off).
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx: u32,
    /// Eject after this many gateway failures in a row (0: off).
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_failure: u32,
    /// Eject at this failure share over `failure_rate_window` (0: off).
    #[serde(default)]
    pub failure_rate: f64,
    /// Minimum requests in the window for the rate to count.
    #[serde(default = "default_min_calls")]
    pub failure_rate_minimum_requests: u32,
    /// The failure-rate window.
    #[serde(default = "default_rate_window")]
    pub failure_rate_window: Dur,
    /// First ejection time (n-th: n times this).
    #[serde(default = "default_open")]
    pub base_ejection_time: Dur,
    /// Longest ejection.
    #[serde(default = "default_max_open")]
    pub max_ejection_time: Dur,
    /// Most of the cluster ejected at once, in percent.
    #[serde(default = "default_max_eject")]
    pub max_ejection_percent: u8,
}

fn default_rate_window() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_eject() -> u8 {
    50
}

/// Active health checks.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// `http` (GET `path`, 2xx passes) or `tcp` (a connection passes).
    #[serde(default = "default_health_kind")]
    pub kind: String,
    /// Path for `http` checks.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between probes.
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Probe timeout.
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
    /// Passing probes in a row to become healthy.
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    /// Failing probes in a row to become unhealthy.
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
}

fn default_health_kind() -> String {
    "http".into()
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_interval() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_probe_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

/// Failover between tiers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// A tier serves while at least this share of it is healthy.
    #[serde(default = "default_panic")]
    pub healthy_threshold: f64,
    /// An earlier tier takes traffic back after being healthy this long.
    #[serde(default = "default_stable")]
    pub stable_period: Dur,
}

fn default_stable() -> Dur {
    Dur(Duration::from_secs(30))
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"1h"` (or a combination such
/// as `"1m30s"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"1m30s"`, `"2h"`, `"100us"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration (try \"250ms\", \"30s\", \"5m\")"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let d = match &rest[..unit] {
            "ns" => Duration::from_nanos(n),
            "us" | "µs" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "" => return Err(format!("`{text}` needs a unit (ms, s, m, h)")),
            u => return Err(format!("`{text}`: unknown unit `{u}` (use ms, s, m, h)")),
        };
        total += d;
        rest = &rest[unit..];
    }
    Ok(total)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Every problem found in a configuration, each with its path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

const LB_POLICIES: &[&str] = &[
    "round-robin",
    "weighted-round-robin",
    "random",
    "least-request",
    "peak-ewma",
    "ring-hash",
    "maglev",
];

/// A TOML or serde error as one line naming where it is: `gateway.listen (line 2):
/// invalid type: ...`. The path is the table the line is in and the key on it.
fn de_error(e: &toml::de::Error, text: &str, with_line: bool) -> String {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return message.to_string();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !line.starts_with('['));
    let at = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k.to_string(),
        (Some(t), None) => t.to_string(),
        (None, None) => format!("`{line}`"),
    };
    if with_line {
        format!("{at} (line {line_no}): {message}")
    } else {
        format!("{at}: {message}")
    }
}

/// Every wrong type and unknown key in `text`, in its order, starting from serde's
/// `first`. Serde stops at one, so the line it names is blanked out and the text read
/// again, until it reads or an error is not on a `key = value` line of its own.
/// Blanking keeps every line number. It stops rather than report what the blanking
/// itself caused: a text no longer valid TOML (a value over several lines), or a
/// field now missing.
fn type_errors(text: &str, first: toml::de::Error) -> Vec<toml::de::Error> {
    const MAX: usize = 32;
    let mut errors = vec![first];
    let mut text = text.to_string();
    while errors.len() < MAX {
        let e = errors.last().expect("one error at least");
        let Some(span) = e.span() else { break };
        let start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[start..end].trim_start();
        if line.starts_with('[') || !line.contains('=') {
            break;
        }
        text.replace_range(start..end, &" ".repeat(end - start));
        if text.parse::<toml::Table>().is_err() {
            break;
        }
        match toml::from_str::<Config>(&text) {
            Ok(_) => break,
            Err(next) if next.message().starts_with("missing field") => break,
            Err(next) => errors.push(next),
        }
    }
    // In the order of the file, not of serde's walk through it.
    errors.sort_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
    errors
}

impl Config {
    /// Reads `path`, applies `PALISADE_*` environment overrides, parses and
    /// validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Config::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, std::iter::empty())
    }

    /// Parses TOML text, applies overrides from `(name, value)` pairs named
    /// `PALISADE_<SECTION>__<KEY>[__<KEY>..]` (e.g. `PALISADE_GATEWAY__LISTEN`,
    /// `PALISADE_CLUSTERS__API__LB`), and validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(vec![de_error(&e, text, true)]))?;
        let mut problems = Vec::new();
        let mut overrides = false;
        for (name, value) in env {
            let Some(path) = name.strip_prefix("PALISADE_") else {
                continue;
            };
            if !path.contains("__") {
                continue;
            }
            overrides = true;
            let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            if let Err(e) = set_path(&mut table, &keys, &value) {
                problems.push(format!("{name}: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        // Deserialise from text, not from the table, so an error keeps its place in
        // the file; with overrides, the place is in the file as overridden.
        let overridden;
        let text = if overrides {
            overridden = toml::to_string(&table).map_err(|e| ConfigError(vec![e.to_string()]))?;
            overridden.as_str()
        } else {
            text
        };
        let config: Config = toml::from_str(text).map_err(|e| {
            ConfigError(
                type_errors(text, e)
                    .iter()
                    .map(|e| {
                        // Line numbers of the re-written text would not match the file.
                        if overrides {
                            format!("{} (after PALISADE_* overrides)", de_error(e, text, false))
                        } else {
                            de_error(e, text, true)
                        }
                    })
                    .collect(),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: references, ranges, names. Reports every
    /// problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if self.routes.is_empty() {
            p.push("routes: at least one route is needed".to_string());
        }
        if self.gateway.tunnel_idle_timeout.0.is_zero() {
            p.push("gateway.tunnel_idle_timeout: must be more than 0".to_string());
        }
        if self.gateway.pool_idle_timeout.0.is_zero() {
            p.push("gateway.pool_idle_timeout: must be more than 0".to_string());
        }
        if let Some(tls) = &self.gateway.tls {
            for proto in &tls.alpn {
                if !["h2", "http/1.1"].contains(&proto.as_str()) {
                    p.push(format!("gateway.tls.alpn: `{proto}` is not `h2` or `http/1.1`"));
                }
            }
            if tls.handshake_timeout.0.is_zero() {
                p.push("gateway.tls.handshake_timeout: must be more than 0".to_string());
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}] ({})", r.name);
            if !self.clusters.contains_key(&r.cluster) {
                p.push(format!("{at}.cluster: no cluster named `{}`", r.cluster));
            }
            if r.timeout.0.is_zero() {
                p.push(format!("{at}.timeout: must be more than 0"));
            }
            if r.body_idle_timeout.0.is_zero() {
                p.push(format!("{at}.body_idle_timeout: must be more than 0"));
            }
            if let Some(t) = r.per_try_timeout
                && (t.0.is_zero() || t > r.timeout)
            {
                p.push(format!(
                    "{at}.per_try_timeout: must be more than 0 and at most `timeout`"
                ));
            }
            if let Some(prefix) = &r.matcher.path_prefix
                && !prefix.starts_with('/')
            {
                p.push(format!("{at}.match.path_prefix: must start with `/`"));
            }
            for m in &r.matcher.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    p.push(format!("{at}.match.methods: `{m}` is not a method"));
                }
            }
            for h in r.matcher.headers.keys() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    p.push(format!("{at}.match.headers: `{h}` is not a header name"));
                }
            }
            if let Some(retry) = &r.retry {
                if retry.attempts == 0 {
                    p.push(format!("{at}.retry.attempts: must be at least 1"));
                }
                if !(0.0..=1.0).contains(&retry.budget_ratio) {
                    p.push(format!("{at}.retry.budget_ratio: must be between 0 and 1"));
                }
                if retry.backoff > retry.max_backoff {
                    p.push(format!("{at}.retry.backoff: must be at most max_backoff"));
                }
            }
            if let Some(l) = &r.rate_limit {
                if l.requests == 0 {
                    p.push(format!("{at}.rate_limit.requests: must be at least 1"));
                }
                if l.per.0.is_zero() {
                    p.push(format!("{at}.rate_limit.per: must be more than 0"));
                }
                let key_ok = l.key == "global"
                    || l.key == "client-ip"
                    || l.key
                        .strip_prefix("header:")
                        .is_some_and(|h| http::HeaderName::from_bytes(h.as_bytes()).is_ok());
                if !key_ok {
                    p.push(format!(
                        "{at}.rate_limit.key: `{}` is not `global`, `client-ip` or `header:<name>`",
                        l.key
                    ));
                }
            }
            if let Some(f) = &r.fallback
                && http::StatusCode::from_u16(f.status).is_err()
            {
                p.push(format!("{at}.fallback.status: {} is not a status", f.status));
            }
        }
        for (name, c) in &self.clusters {
            let at = format!("clusters.{name}");
            if c.endpoints.is_empty() && c.endpoints_file.is_none() && !c.allow_empty {
                p.push(format!(
                    "{at}.endpoints: no endpoints (set allow_empty = true if that is meant)"
                ));
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                if let Err(msg) = split_host_port(e.address()) {
                    p.push(format!("{at}.endpoints[{j}]: {msg}"));
                }
                if e.weight_tier().0 == 0 {
                    p.push(format!("{at}.endpoints[{j}].weight: must be at least 1"));
                }
            }
            if !LB_POLICIES.contains(&c.lb.as_str()) {
                p.push(format!(
                    "{at}.lb: `{}` is not one of {}",
                    c.lb,
                    LB_POLICIES.join(", ")
                ));
            }
            if let Some(t) = &c.tls
                && t.cert_file.is_some() != t.key_file.is_some()
            {
                p.push(format!("{at}.tls: cert_file and key_file go together"));
            }
            match (c.protocol.as_str(), &c.tls) {
                ("http1", _) | ("h2c", None) | ("h2", Some(_)) => {}
                ("h2c", Some(_)) => p.push(format!(
                    "{at}.protocol: `h2c` is HTTP/2 in the clear; with `tls` use `h2`"
                )),
                ("h2", None) => p.push(format!(
                    "{at}.protocol: `h2` is HTTP/2 over TLS and needs [{at}.tls]; in the clear use `h2c`"
                )),
                (other, _) => p.push(format!("{at}.protocol: `{other}` is not `http1`, `h2c` or `h2`")),
            }
            if !(0.0..=1.0).contains(&c.panic_threshold) {
                p.push(format!("{at}.panic_threshold: must be between 0 and 1"));
            }
            if c.max_concurrent == Some(0) {
                p.push(format!("{at}.max_concurrent: must be at least 1"));
            }
            if let Some(b) = &c.breaker {
                if !(0.0..=1.0).contains(&b.failure_rate) || !(0.0..=1.0).contains(&b.slow_call_rate) {
                    p.push(format!("{at}.breaker: rates must be between 0 and 1"));
                }
                if b.half_open_probes == 0 || b.success_threshold == 0 {
                    p.push(format!(
                        "{at}.breaker: half_open_probes and success_threshold must be at least 1"
                    ));
                }
                if b.window == 0 {
                    p.push(format!("{at}.breaker.window: must be at least 1"));
                }
                if b.open > b.max_open {
                    p.push(format!(
                        "{at}.breaker.open: must be at most max_open ({})",
                        b.max_open
                    ));
                }
            }
            if let Some(o) = &c.outlier
                && (o.max_ejection_percent > 100 || !(0.0..=1.0).contains(&o.failure_rate))
            {
                p.push(format!(
                    "{at}.outlier: max_ejection_percent <= 100 and failure_rate in [0, 1]"
                ));
            }
            if let Some(h) = &c.health {
                if h.kind != "http" && h.kind != "tcp" {
                    p.push(format!("{at}.health.kind: `{}` is not `http` or `tcp`", h.kind));
                }
                if h.interval.0.is_zero() || h.timeout.0.is_zero() {
                    p.push(format!("{at}.health: interval and timeout must be more than 0"));
                }
                if !h.path.starts_with('/') {
                    p.push(format!("{at}.health.path: must start with `/`"));
                }
            }
            if let Some(f) = &c.failover
                && !(0.0..=1.0).contains(&f.healthy_threshold)
            {
                p.push(format!(
                    "{at}.failover.healthy_threshold: must be between 0 and 1"
                ));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(ConfigError(p)) }
    }
}

/// Splits `host:port`, checking both parts.
pub fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("`{address}` is not host:port"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{address}`: `{port}` is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{address}` has no host"));
    }
    Ok((host, port))
}

fn set_path(table: &mut toml::Table, keys: &[String], value: &str) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut t = table;
    for k in parents {
        let entry = t
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a table"))?;
    }
    // A TOML literal if it parses as one (numbers, booleans, arrays), else a string.
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    t.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[routes]]
name = "all"
cluster = "web"

[clusters.web]
endpoints = ["127.0.0.1:9000"]
"#;

    #[test]
    fn the_annotated_example_is_valid() {
        let c = Config::from_toml(include_str!("../../../examples/gateway.toml")).unwrap();
        assert!(c.clusters["api"].breaker.is_some());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("30").unwrap_err().contains("unit"));
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.routes[0].timeout, Dur(Duration::from_secs(15)));
        assert_eq!(c.clusters["web"].lb, "least-request");
        assert_eq!(c.gateway.listen.port(), 8080);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml(&format!("{MINIMAL}\nlisten = 1\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listen"), "{text}");
        let err =
            Config::from_toml(&MINIMAL.replace("cluster = \"web\"", "cluster = \"web\"\ntimout = \"1s\""))
                .unwrap_err();
        assert!(err.to_string().contains("timout"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_table_key_and_line() {
        let text = format!("[gateway]\nlisten = 12\n{MINIMAL}");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("gateway.listen (line 2)"), "{err}");
        assert!(err.contains("expected socket address"), "{err}");
        let env = [("PALISADE_GATEWAY__LISTEN".to_string(), "nowhere".to_string())];
        let err = Config::from_toml_with_env(MINIMAL, env).unwrap_err().to_string();
        assert!(err.contains("gateway.listen:"), "{err}");
        assert!(err.contains("after PALISADE_* overrides"), "{err}");
    }

    #[test]
    fn every_wrong_type_and_unknown_key_is_reported_with_its_line() {
        let text = format!(
            "[gateway]\nlisten = 12\nworkers = \"two\"\nlisten_backlog = 5\n{}",
            MINIMAL.replace("name = \"all\"", "name = \"all\"\ntimeout = 5")
        );
        let err = Config::from_toml(&text).unwrap_err();
        let lines: Vec<&str> = err.0.iter().map(String::as_str).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("gateway.listen (line 2)"), "{lines:#?}");
        assert!(lines[1].starts_with("gateway.workers (line 3)"), "{lines:#?}");
        assert!(
            lines[2].starts_with("gateway.listen_backlog (line 4)"),
            "{lines:#?}"
        );
        assert!(lines[2].contains("unknown field"), "{lines:#?}");
        assert!(lines[3].starts_with("routes.timeout (line"), "{lines:#?}");
    }

    #[test]
    fn a_zero_pool_idle_timeout_is_refused() {
        let text = format!("[gateway]\npool_idle_timeout = \"0s\"\n{MINIMAL}");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("gateway.pool_idle_timeout: must be more than 0"),
            "{err}"
        );
    }

    #[test]
    fn blanking_a_line_never_reports_what_the_blanking_caused() {
        // `cluster` is required: with its bad line blanked it would be missing.
        let err = Config::from_toml(&MINIMAL.replace("cluster = \"web\"", "cluster = 5")).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].contains("routes.cluster"), "{err}");
        // A value over several lines: blanking its first line breaks the TOML.
        let text = MINIMAL.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\n  5,\n]\nlb = 7",
        );
        let err = Config::from_toml(&text).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
[gateway]
tunnel_idle_timeout = "0s"

[[routes]]
name = "a"
cluster = "nope"
per_try_timeout = "20s"
retry = { attempts = 0 }

[clusters.web]
endpoints = ["localhost"]
lb = "fastest"
"#;
        let err = Config::from_toml(text).unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "routes[0] (a).cluster: no cluster named `nope`",
            "routes[0] (a).per_try_timeout",
            "routes[0] (a).retry.attempts",
            "clusters.web.endpoints[0]: `localhost` is not host:port",
            "clusters.web.lb: `fastest`",
            "gateway.tunnel_idle_timeout: must be more than 0",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
    }

    #[test]
    fn environment_overrides_values() {
        let env = [
            (
                "PALISADE_GATEWAY__LISTEN".to_string(),
                "127.0.0.1:7000".to_string(),
            ),
            ("PALISADE_CLUSTERS__WEB__LB".to_string(), "maglev".to_string()),
            (
                "PALISADE_CLUSTERS__WEB__MAX_CONCURRENT".to_string(),
                "7".to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = Config::from_toml_with_env(MINIMAL, env).unwrap();
        assert_eq!(c.gateway.listen.port(), 7000);
        assert_eq!(c.clusters["web"].lb, "maglev");
        assert_eq!(c.clusters["web"].max_concurrent, Some(7));
    }

    #[test]
    fn bad_durations_name_the_field() {
        let err =
            Config::from_toml(&MINIMAL.replace("cluster = \"web\"", "cluster = \"web\"\ntimeout = \"5\""))
                .unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        assert!(err.to_string().contains("unit"), "{err}");
    }
}
