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

use serde::{Deserialize, Deserializer, Serialize};

pub use palisade_core::config::{Dur, MAX_DURATION, parse_duration};
pub use palisade_core::{ConfigError, ConfigErrors};

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
    /// The admin listener (health, metrics, state, dashboard); `None` turns it off.
    pub admin: Option<SocketAddr>,
    /// A token every admin path but `/health/*` wants (`Authorization: Bearer`),
    /// when set.
    pub admin_token: Option<String>,
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
    /// A client connection has this long to send a request's head: from its
    /// first byte, or from the connection's start for its first request.
    pub client_header_timeout: Dur,
    /// A client connection with no request in progress is closed after this long.
    pub client_idle_timeout: Dur,
    /// A request body through which nothing has come from the client for this
    /// long is a `408`.
    pub request_body_idle_timeout: Dur,
    /// HTTP/2 client connections are pinged this often ...
    pub h2_keepalive_interval: Dur,
    /// ... and closed when a ping is not answered within this.
    pub h2_keepalive_timeout: Dur,
    /// Most client connections open at once, per worker; more are closed at once.
    pub max_client_connections: usize,
    /// What an encoded `/` or `\` (`%2F`, `%5C`), or a raw `\`, in a request path
    /// does: `reject` (400), `keep` (passed as it is, not a separator), or
    /// `unescape` (decoded to `/`).
    pub escaped_slashes: EscapedSlashes,
    /// The durable queue that `mode = "async"` routes store requests in.
    pub queue: Option<QueueSection>,
    /// Where routes with a `cache` table keep answers.
    pub cache: Option<CacheSection>,
    /// Where routes with an `idempotency` table keep keys and answers.
    pub idempotency: Option<IdempotencySection>,
    /// Token issuers routes' `auth` tables name, by name.
    pub jwt: BTreeMap<String, JwtProviderSection>,
    /// Distributed tracing: spans exported to an OpenTelemetry collector.
    pub tracing: Option<TracingSection>,
    /// Services' own figures the dashboard draws beside the gateway's.
    pub panels: Vec<PanelSection>,
}

/// `[[gateway.panels]]`: a service's own figures on the dashboard. Once a second
/// the dashboard GETs each URL and draws the JSON it answers,
/// `{"counters": {name: total}, "gauges": {name: value}, "rows": [{column: value}],
/// "columns": [name]}` (each part optional; `columns` orders the table): the
/// counters as rates per second, summed across the
/// URLs (one per instance, each counting its own); the gauges and rows from the
/// first URL that answers (a view of state the instances share).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PanelSection {
    /// The panel's title.
    pub name: String,
    /// Where its JSON is read (`http://host:port/path`), one URL per instance.
    pub urls: Vec<String>,
    /// The longest wait for one URL's answer (at most a second: the dashboard
    /// samples once a second).
    #[serde(default = "default_panel_timeout")]
    pub timeout: Dur,
}

fn default_panel_timeout() -> Dur {
    Dur(Duration::from_millis(500))
}

/// `[gateway.tracing]`: W3C Trace Context passed upstream, and a span per request
/// with a child span per attempt, exported over OTLP/HTTP (JSON) in batches. A
/// collector that is slow or down never slows requests: spans past `max_queue`
/// are dropped and counted.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// The collector's OTLP/HTTP traces URL (`http://collector:4318/v1/traces`).
    pub otlp: String,
    /// The share of new traces recorded, 0 to 1; a client's context keeps its own
    /// sampled flag.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// The `service.name` the spans carry.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped.
    #[serde(default = "default_trace_queue")]
    pub max_queue: usize,
    /// Spans per export at most.
    #[serde(default = "default_trace_batch")]
    pub max_batch: usize,
    /// A batch goes this long after its first span at the latest.
    #[serde(default = "default_trace_flush")]
    pub flush_interval: Dur,
    /// The longest wait for the collector (connecting, and each export).
    #[serde(default = "default_trace_timeout")]
    pub timeout: Dur,
    /// Headers sent with each export (a collector's credentials).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_sample_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "palisade".into()
}
fn default_trace_queue() -> usize {
    4096
}
fn default_trace_batch() -> usize {
    512
}
fn default_trace_flush() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_trace_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

/// `[gateway.jwt.<name>]`: a token issuer and how its tokens are checked. Its keys
/// come from a JWKS file, a JWKS URL, or OIDC discovery; a URL's set is fetched
/// before its routes serve, refreshed every `refresh`, fetched again (at most once
/// per `min_refetch_interval`) when a token names a key it does not hold, and kept
/// when a fetch fails.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderSection {
    /// The `iss` its tokens must carry (unchecked when unset).
    #[serde(default)]
    pub issuer: Option<String>,
    /// A token's `aud` must name one of these (unchecked when empty).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The algorithms accepted (`none` is never one).
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// A JWKS document's URL (`https://`, or `http://` on a trusted network).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// An OpenID Connect issuer's URL: its `/.well-known/openid-configuration`
    /// names the JWKS URL.
    #[serde(default)]
    pub discovery: Option<String>,
    /// A JWKS document on disk (read at start and on reload).
    #[serde(default)]
    pub keys_file: Option<std::path::PathBuf>,
    /// PEM file of the CAs trusted for `https` fetches (default: the Mozilla roots).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_jwt_leeway")]
    pub leeway: Dur,
    /// Whether a token without `exp` is refused.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// How often a fetched key set is fetched again.
    #[serde(default = "default_jwt_refresh")]
    pub refresh: Dur,
    /// The least time between two fetches for tokens naming unknown keys.
    #[serde(default = "default_jwt_min_refetch")]
    pub min_refetch_interval: Dur,
    /// The longest a fetch may take.
    #[serde(default = "default_jwt_fetch_timeout")]
    pub fetch_timeout: Dur,
    /// The longest token accepted, in bytes (longer ones are a `401` unread).
    #[serde(default = "default_jwt_max_token")]
    pub max_token_bytes: usize,
    /// Verified tokens kept per route, so a token's signature is checked once.
    #[serde(default = "default_jwt_cached")]
    pub cached_tokens: usize,
}

fn default_jwt_algorithms() -> Vec<String> {
    vec!["ES256".into(), "RS256".into()]
}
fn default_jwt_leeway() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_jwt_refresh() -> Dur {
    Dur(Duration::from_secs(600))
}
fn default_jwt_min_refetch() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_jwt_fetch_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_jwt_max_token() -> usize {
    8192
}
fn default_jwt_cached() -> usize {
    10_000
}

/// A route's token authentication and access rules (`auth = { jwt = "<name>" }`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The `[gateway.jwt.<name>]` whose tokens the route takes.
    pub jwt: String,
    /// The rules, tried in order: the first covering a request decides.
    #[serde(default)]
    pub rules: Vec<AccessRule>,
    /// What a request no rule covers gets: `allow` (any valid token) or `deny`.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// The claim holding roles (dots go into objects: `realm_access.roles`).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The claim holding scopes (a space-separated string or an array).
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
    /// Claims forwarded upstream, claim to header (`{ sub = "x-user-id" }`); a
    /// client's own copies of those headers are removed.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Whether the client's `Authorization` header goes upstream too.
    #[serde(default = "default_true")]
    pub forward_token: bool,
}

fn default_roles_claim() -> String {
    "roles".into()
}
fn default_scopes_claim() -> String {
    "scope".into()
}

/// What a request no access rule covers gets.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    /// Served with any valid token.
    #[default]
    Allow,
    /// A `403`.
    Deny,
}

/// One access rule: the requests it covers (`methods`, `path_prefix`) and what
/// their token must carry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Methods covered (every one when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// The path prefix covered (every path when unset).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Roles the token must hold.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Scopes the token must hold.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `any` (default) or `all` of the roles, and of the scopes.
    #[serde(default)]
    pub need: NeedConfig,
}

/// Any or all (see [`AccessRule::need`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NeedConfig {
    /// One of them.
    #[default]
    Any,
    /// Every one.
    All,
}

/// A route serving a directory (`static_files = { root = "/srv/www" }`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticFilesConfig {
    /// The directory served (must exist; read at start and on reload).
    pub root: std::path::PathBuf,
    /// The path prefix taken off before a path is looked up under `root`
    /// (default: the route's `match.path_prefix`, else nothing).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// The file served for a directory (none: a directory is a `404`).
    #[serde(default = "default_index")]
    pub index: Option<String>,
    /// `Cache-Control` of every answer (none: not sent).
    #[serde(default)]
    pub cache_control: Option<String>,
    /// Serve `<file>.br` / `<file>.gz` when the client accepts them and they exist.
    #[serde(default = "default_true")]
    pub precompressed: bool,
    /// Symbolic links: `deny` (any link on the way is a `404`), `within-root`
    /// (followed when they lead inside `root`) or `follow` (followed anywhere).
    #[serde(default)]
    pub symlinks: SymlinkPolicy,
    /// Whether names starting with `.` (`.git`, `.env`) are served.
    #[serde(default)]
    pub hidden: bool,
}

fn default_index() -> Option<String> {
    Some("index.html".into())
}

/// How a static route treats symbolic links.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SymlinkPolicy {
    /// Any link on the way is a `404`.
    #[default]
    Deny,
    /// Followed when it leads inside the root.
    WithinRoot,
    /// Followed anywhere.
    Follow,
}

/// One way of a route's split: requests carrying `header` (or `cookie`) with
/// `value` go to `cluster`; without them, a `weight` percent of the others do.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Where they go.
    pub cluster: String,
    /// The percent of requests (0 to 100) not matched by a header or cookie rule.
    #[serde(default)]
    pub weight: Option<f64>,
    /// A request header that sends a request here when it has `value`.
    #[serde(default)]
    pub header: Option<String>,
    /// A cookie that sends a request here when it has `value`.
    #[serde(default)]
    pub cookie: Option<String>,
    /// The header's or cookie's value.
    #[serde(default)]
    pub value: Option<String>,
}

/// A route's mirror (shadow traffic).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The shadow cluster.
    pub cluster: String,
    /// The share of requests copied (0 to 1).
    #[serde(default = "default_mirror_share")]
    pub share: f64,
    /// Copies in flight at once, at most; more are not sent (counted).
    #[serde(default = "default_mirror_in_flight")]
    pub max_in_flight: usize,
}

fn default_mirror_share() -> f64 {
    1.0
}
fn default_mirror_in_flight() -> usize {
    64
}

/// A route's signed URLs (valet keys): a request must carry a link signed with
/// one of `keys` (`palisade sign-url` prints one).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignedUrlConfig {
    /// Keys by id; each secret (at least 32 bytes) read from a file or an
    /// environment variable, never written in this file.
    pub keys: BTreeMap<String, SecretSource>,
    /// The key new links are signed with; the others still verify (rotation).
    pub current: String,
}

/// Where a secret is read from: `{ file = "/path" }` (its bytes, a final newline
/// dropped) or `{ env = "NAME" }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file holding the secret.
    #[serde(default)]
    pub file: Option<std::path::PathBuf>,
    /// An environment variable holding it.
    #[serde(default)]
    pub env: Option<String>,
}

/// `[gateway.idempotency]`: the store of the routes' idempotency keys (every route
/// with an `idempotency` table shares it, each under keys of its own). Read at
/// start only (a reload keeps the store it has); connected in the background, so a
/// store that is down at start delays nothing but those routes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySection {
    /// `postgres://user@host/db` (a table, `palisade_idempotency`, created if
    /// missing) or `redis://host:port/db`.
    pub store: String,
    /// The longest wait for one store call; past it the call has failed.
    #[serde(default = "default_idempotency_timeout")]
    pub timeout: Dur,
    /// The prefix of the store's Redis keys.
    #[serde(default = "default_idempotency_prefix")]
    pub prefix: String,
}

fn default_idempotency_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_idempotency_prefix() -> String {
    "palisade:idempotency:".into()
}

/// A route's idempotency keys, with Stripe's semantics: the first request with a
/// key runs and its answer is kept; a repeat with the same request gets that
/// answer (`idempotent-replayed: true`) without running again; the key with
/// another request is a `422`; a repeat while the first runs a `409`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// The request header carrying the key (1 to 255 visible ASCII characters).
    #[serde(default = "default_idempotency_header")]
    pub header: String,
    /// The methods keys apply to; other methods pass through untouched.
    #[serde(default = "default_idempotency_methods")]
    pub methods: Vec<String>,
    /// Whether a request of those methods without a key is refused (`400`).
    #[serde(default)]
    pub required: bool,
    /// How long an answer is kept.
    #[serde(default = "default_idempotency_ttl")]
    pub ttl: Dur,
    /// How long a running request holds its key if its gateway dies before
    /// answering (then the key may run again): at least the route's `timeout`.
    /// Default: the route's `timeout` and 10 s.
    #[serde(default)]
    pub lock: Option<Dur>,
    /// A repeat while the first runs waits this long for its answer (unset: a
    /// `409` at once).
    #[serde(default)]
    pub wait: Option<Dur>,
    /// The largest request body (`413` beyond) and the largest answer body kept
    /// (a larger answer is passed on whole and kept without its body, marked
    /// `idempotent-body-omitted: true`).
    #[serde(default = "default_idempotency_max_body")]
    pub max_body_bytes: u64,
    /// Whether a `5xx` answer from upstream is kept (by default it is not: the
    /// key is released and a retry runs again).
    #[serde(default)]
    pub store_server_errors: bool,
    /// What a request with a key does while the store cannot be reached:
    /// `refuse` (`503 idempotency_unavailable`, not run) or `proceed` (run
    /// without the key's protection, counted).
    #[serde(default)]
    pub when_store_down: StoreDown,
}

/// What an idempotent route does while its store is down (see
/// [`IdempotencyConfig::when_store_down`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StoreDown {
    /// `503 idempotency_unavailable`: the request is not run.
    #[default]
    Refuse,
    /// The request runs without the key's protection.
    Proceed,
}

fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}
fn default_idempotency_methods() -> Vec<String> {
    vec!["POST".into(), "PATCH".into()]
}
fn default_idempotency_ttl() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn default_idempotency_max_body() -> u64 {
    1 << 20
}

/// `[gateway.cache]`: the store of the routes' response caches (every route with a
/// `cache` table shares it, under keys of its own). Read at start only (a reload
/// keeps the store it has). Without it, a route's `cache` uses 64 MiB in memory.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// The most the in-memory level holds, in bytes (bodies and headers).
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: u64,
    /// A Redis shared by every gateway instance (`redis://host:port/db`): answers
    /// one instance stored are hits for the others.
    #[serde(default)]
    pub redis: Option<String>,
    /// The longest wait for one Redis call; past it (and once Redis's breaker
    /// opens, at once) the cache goes on in memory.
    #[serde(default = "default_cache_redis_timeout")]
    pub redis_timeout: Dur,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            max_bytes: default_cache_bytes(),
            redis: None,
            redis_timeout: default_cache_redis_timeout(),
        }
    }
}

fn default_cache_bytes() -> u64 {
    64 << 20
}
fn default_cache_redis_timeout() -> Dur {
    Dur(Duration::from_millis(50))
}

/// A route's response cache: answers to `GET` (and `HEAD`, from a stored `GET`)
/// kept as HTTP caching allows (`Cache-Control`, `Expires`, `Vary`, validators),
/// never a `private` or `no-store` one.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Freshness for answers that state none (status 200, 203, 204, 300, 301,
    /// 308, 404, 405, 410, 414 or 501); unset, such answers are not stored.
    #[serde(default)]
    pub default_ttl: Option<Dur>,
    /// The longest an answer is kept fresh, whatever it says.
    #[serde(default = "default_cache_max_ttl")]
    pub max_ttl: Dur,
    /// `stale-while-revalidate` for answers that name none: past its freshness an
    /// answer is served this long while one request revalidates it.
    #[serde(default)]
    pub stale_while_revalidate: Option<Dur>,
    /// `stale-if-error` for answers that name none: past its freshness an answer
    /// stands in this long for an upstream that fails.
    #[serde(default)]
    pub stale_if_error: Option<Dur>,
    /// Bodies larger than this are passed on but not stored.
    #[serde(default = "default_cache_max_body")]
    pub max_body_bytes: u64,
    /// Whether the query string is part of the key (default: yes).
    #[serde(default = "default_true")]
    pub key_query: bool,
    /// Request headers whose values are part of the key: each value keeps an
    /// answer of its own (where `Vary` alone keeps the latest variant).
    #[serde(default)]
    pub key_headers: Vec<String>,
}

fn default_cache_max_ttl() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn default_cache_max_body() -> u64 {
    1 << 20
}
fn default_true() -> bool {
    true
}

/// `[gateway.queue]`: where `mode = "async"` routes store requests, and who
/// delivers them. Read at start only (a reload keeps the queue it has).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// The queue's database: `sqlite:path` (created if missing) or
    /// `postgres://user@host/db`.
    #[serde(default = "default_queue_database")]
    pub database: String,
    /// Requests this gateway delivers at once (0: it only stores them, and
    /// `palisade worker` delivers).
    #[serde(default = "default_queue_workers")]
    pub workers: usize,
    /// Attempts a stored request gets before it is given up (discarded).
    #[serde(default = "default_queue_attempts")]
    pub max_attempts: i32,
    /// A stored request's status is read at `GET <status_path>/<id>.<token>` on the
    /// gateway's listener.
    #[serde(default = "default_status_path")]
    pub status_path: String,
}

fn default_queue_database() -> String {
    "sqlite:palisade-jobs.db".into()
}
fn default_queue_workers() -> usize {
    16
}
fn default_queue_attempts() -> i32 {
    10
}
fn default_status_path() -> String {
    "/jobs".into()
}

/// How a route answers (see [`RouteConfig::mode`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RouteMode {
    /// Sends the request on and passes the answer back.
    #[default]
    Proxy,
    /// Stores the request in the gateway's queue and answers `202 Accepted` with
    /// where to read its status; the queue delivers it (queue-based load leveling).
    Async,
}

/// What an escaped slash in a path does (see [`GatewaySection::escaped_slashes`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EscapedSlashes {
    /// The request is a `400`.
    #[default]
    Reject,
    /// Left as it is: not a path separator for routing.
    Keep,
    /// Decoded to `/` before routing and forwarding.
    Unescape,
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
            admin_token: None,
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
            client_header_timeout: Dur(Duration::from_secs(10)),
            client_idle_timeout: Dur(Duration::from_secs(60)),
            request_body_idle_timeout: Dur(Duration::from_secs(30)),
            h2_keepalive_interval: Dur(Duration::from_secs(30)),
            h2_keepalive_timeout: Dur(Duration::from_secs(10)),
            max_client_connections: 10_000,
            escaped_slashes: EscapedSlashes::Reject,
            queue: None,
            cache: None,
            idempotency: None,
            jwt: BTreeMap::new(),
            tracing: None,
            panels: Vec::new(),
        }
    }
}

/// `etcd = { url, prefix }`: a cluster's endpoints from a registry in etcd.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdRegistryConfig {
    /// The etcd member (`http://host:2379`).
    pub url: String,
    /// The keys' prefix (`/services/orders/`); each key's value is
    /// `{"address": "ip:port", "weight": 1, "tier": 0}` or a bare `ip:port`.
    pub prefix: String,
    /// The longest wait for one etcd call.
    #[serde(default = "default_etcd_timeout")]
    pub timeout: Dur,
}

fn default_etcd_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

impl EtcdRegistryConfig {
    fn problems(&self, at: &str, p: &mut Vec<ConfigError>) {
        if !self
            .url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some())
        {
            p.push(ConfigError::new(
                format!("{at}.url"),
                format!("`{}` is not an http:// URL of an etcd member", self.url),
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            p.push(ConfigError::new(
                format!("{at}.prefix"),
                "must start with / and name something",
            ));
        }
        if self.timeout.get().is_zero() {
            p.push(ConfigError::new(format!("{at}.timeout"), "must be more than 0"));
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
    /// The cluster requests go to (none for a route that serves `static_files`).
    #[serde(default)]
    pub cluster: String,
    /// Files served from a directory instead of a cluster: off unless this table
    /// is set.
    #[serde(default)]
    pub static_files: Option<StaticFilesConfig>,
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
    /// Fault injection (chaos drills): off unless this table is set.
    #[serde(default)]
    pub fault: Option<FaultConfig>,
    /// Deadline propagation: off unless this table is set.
    #[serde(default)]
    pub deadline: Option<DeadlineConfig>,
    /// Adaptive per-try timeouts: off unless this table is set.
    #[serde(default)]
    pub adaptive_timeout: Option<AdaptiveTimeoutConfig>,
    /// The route's priority under load shedding (its cluster's
    /// `adaptive_concurrency`): `normal` unless this table is set.
    #[serde(default)]
    pub shed: Option<ShedConfig>,
    /// Hedged requests: off unless this table is set.
    #[serde(default)]
    pub hedge: Option<HedgeConfig>,
    /// A response cache: off unless this table is set.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Idempotency keys: off unless this table is set (needs
    /// `[gateway.idempotency]`).
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// A traffic split (canary): requests sent to other clusters by weight, or by
    /// a header's or cookie's value; the rest go to `cluster`.
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// A copy of a share of requests sent to a shadow cluster, its answers
    /// discarded: off unless this table is set.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Token authentication and access rules: off unless this table is set.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Signed URLs: off unless this table is set.
    #[serde(default)]
    pub signed_urls: Option<SignedUrlConfig>,
    /// `proxy` (default), or `async`: the request is stored in `[gateway.queue]`
    /// and answered `202 Accepted` with a status URL; a client `Idempotency-Key`
    /// stores it once.
    #[serde(default)]
    pub mode: RouteMode,
}

/// A route's place in its cluster's load shedding: its priority, and a header that
/// may choose another for one request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShedConfig {
    /// `critical` (served while anything is), `normal` (served degraded, then
    /// refused, as load grows) or `sheddable` (refused first).
    #[serde(default)]
    pub priority: PriorityName,
    /// A request header naming the request's own priority (`critical`, `normal`,
    /// `sheddable`); an unknown value is ignored.
    #[serde(default)]
    pub header: Option<String>,
    /// Whether the header may raise a request above the route's priority. Off: a
    /// client can only lower its own (mark a prefetch `sheddable`), never claim
    /// `critical`.
    #[serde(default)]
    pub trust_header: bool,
}

/// A request priority's name in the file.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityName {
    /// Dropped first.
    Sheddable,
    /// Served degraded, then refused, as load grows.
    #[default]
    Normal,
    /// Served while anything is.
    Critical,
}

/// A route's hedged requests: an attempt slower than `delay` (or, with `quantile`,
/// than that quantile of the route's recent latency) gets a second copy sent to
/// another endpoint; the first good answer wins and the other is cancelled. Hedges
/// follow the route's `retry` table: its budget, its body buffer, its idempotency
/// rule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HedgeConfig {
    /// The wait before the hedge; with `quantile`, the wait until enough latencies
    /// are known.
    pub delay: Dur,
    /// Hedge after this quantile of the route's recent answer latency (0.95: the
    /// slowest 5% are hedged).
    #[serde(default)]
    pub quantile: Option<f64>,
    /// The shortest adaptive wait.
    #[serde(default = "default_hedge_min")]
    pub min_delay: Dur,
    /// The longest adaptive wait (default: the route's per-try timeout).
    #[serde(default)]
    pub max_delay: Option<Dur>,
    /// Answers needed before the wait adapts.
    #[serde(default = "default_hedge_samples")]
    pub min_samples: u32,
    /// How far back latencies count.
    #[serde(default = "default_adaptive_window")]
    pub window: Dur,
}

fn default_hedge_min() -> Dur {
    Dur(Duration::from_millis(1))
}
fn default_hedge_samples() -> u32 {
    20
}

/// A route's adaptive per-try timeout: each endpoint's recent latency quantile
/// times `multiplier`, clamped to [`min`, `max`]; the fixed `per_try_timeout` until
/// `min_samples` answers are in the `window` (and as `max` unless set).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveTimeoutConfig {
    /// The latency quantile followed (0.95: p95).
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// The timeout is the quantile times this (at least 1).
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// The shortest timeout given.
    #[serde(default = "default_adaptive_min")]
    pub min: Dur,
    /// The longest timeout given (default: the route's per-try timeout).
    #[serde(default)]
    pub max: Option<Dur>,
    /// Answers needed before the timeout adapts.
    #[serde(default = "default_adaptive_samples")]
    pub min_samples: u32,
    /// How far back latencies count.
    #[serde(default = "default_adaptive_window")]
    pub window: Dur,
}

fn default_quantile() -> f64 {
    0.95
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_adaptive_min() -> Dur {
    Dur(Duration::from_millis(50))
}
fn default_adaptive_samples() -> u32 {
    100
}
fn default_adaptive_window() -> Dur {
    Dur(Duration::from_secs(60))
}

/// A route's deadline propagation: a deadline the client sends shortens the
/// route's timeout, and each attempt tells the endpoint how long it has. gRPC
/// requests use `grpc-timeout`; others the header named here (milliseconds), if any.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadlineConfig {
    /// The header carrying a deadline in milliseconds for requests that are not
    /// gRPC (e.g. `x-request-timeout-ms`).
    #[serde(default)]
    pub header: Option<String>,
}

/// A route's fault injection, Envoy's fault filter as the model: a share of the
/// route's requests delayed, a share answered with an error status by the gateway
/// itself (never sent), optionally only requests carrying a header.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Added before the request is sent.
    #[serde(default)]
    pub delay: Option<Dur>,
    /// Share of requests delayed (0 to 1).
    #[serde(default)]
    pub delay_rate: f64,
    /// The status an aborted request is answered with.
    #[serde(default = "default_abort_status")]
    pub abort_status: u16,
    /// Share of requests aborted (0 to 1).
    #[serde(default)]
    pub abort_rate: f64,
    /// Only requests carrying this header are candidates (a drill's own traffic).
    #[serde(default)]
    pub header: Option<String>,
}

fn default_abort_status() -> u16 {
    503
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
    #[serde(default)]
    pub key: LimitKey,
    /// For keyed limits: most keys remembered.
    #[serde(default = "default_limit_keys")]
    pub max_keys: usize,
    /// How the limit is kept: `gcra` (default; a token bucket of `burst`),
    /// `sliding-window` (at most `requests` in any window of `per`), `pacing` (GCRA
    /// that delays a request over the rate by up to `max_wait` instead of refusing
    /// it) or `warm-up` (one global limit that starts at a third of the rate after a
    /// quiet spell and reaches it over `warm_up`).
    #[serde(default)]
    pub algorithm: LimitAlgorithm,
    /// `pacing` and `warm-up`: the longest a request waits for its turn (counted in
    /// the route's timeout); `warm-up` without it refuses instead.
    #[serde(default)]
    pub max_wait: Option<Dur>,
    /// `warm-up`: how long a cold limit takes to reach the full rate.
    #[serde(default)]
    pub warm_up: Option<Dur>,
    /// One limit shared by every gateway instance, kept in Redis (GCRA only).
    #[serde(default)]
    pub global: Option<GlobalLimitConfig>,
}

/// A rate limit kept in Redis, shared by every instance (`rate_limit.global`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GlobalLimitConfig {
    /// The Redis (`redis://host:port/db`).
    pub redis: String,
    /// What the route does while Redis cannot answer (no default: say which).
    pub when_redis_down: WhenRedisDown,
    /// How many instances share the quota: with `local`, each applies
    /// `requests / instances` (rounded up) on its own while Redis is down.
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// The longest wait for Redis; past it (and once its breaker is open, at once)
    /// `when_redis_down` applies.
    #[serde(default = "default_global_timeout")]
    pub timeout: Dur,
    /// The prefix of the limit's Redis keys (the route's name follows).
    #[serde(default = "default_global_prefix")]
    pub prefix: String,
}

fn default_instances() -> u32 {
    1
}
fn default_global_timeout() -> Dur {
    Dur(Duration::from_millis(25))
}
fn default_global_prefix() -> String {
    "palisade:ratelimit:".into()
}

/// What a global limit does while Redis cannot answer.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WhenRedisDown {
    /// Every request passes (counted).
    FailOpen,
    /// Each instance applies its share of the quota on its own.
    Local,
}

/// How a route's rate limit is kept.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LimitAlgorithm {
    /// GCRA: a token bucket of `burst`, refusing past it.
    #[default]
    Gcra,
    /// A sliding window counter.
    SlidingWindow,
    /// GCRA that delays rather than refuses, up to `max_wait`.
    Pacing,
    /// A smooth limit with a cold start.
    WarmUp,
}

fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}

/// Who a rate limit is per.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum LimitKey {
    /// One limit for all.
    #[default]
    Global,
    /// One per client address.
    ClientIp,
    /// One per value of this header (requests without it share one).
    Header(http::HeaderName),
}

impl TryFrom<String> for LimitKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "global" => Ok(LimitKey::Global),
            "client-ip" => Ok(LimitKey::ClientIp),
            other => other
                .strip_prefix("header:")
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .map(LimitKey::Header)
                .ok_or_else(|| format!("`{s}` is not `global`, `client-ip` or `header:<name>`")),
        }
    }
}

impl From<LimitKey> for String {
    fn from(k: LimitKey) -> String {
        match k {
            LimitKey::Global => "global".into(),
            LimitKey::ClientIp => "client-ip".into(),
            LimitKey::Header(h) => format!("header:{h}"),
        }
    }
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
    /// all of the endpoints' and the gateway's own (a client's bad request never
    /// falls back).
    #[serde(default)]
    pub on: Vec<crate::cause::Cause>,
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
    /// A service registry in etcd: the endpoints are the keys under a prefix
    /// (each written with a lease by the service, or by `palisade register`),
    /// watched. Instead of `endpoints` and `endpoints_file`.
    #[serde(default)]
    pub etcd: Option<EtcdRegistryConfig>,
    /// How often host names are resolved again.
    #[serde(default = "default_dns_refresh")]
    pub dns_refresh: Dur,
    /// Load balancing: `round-robin`, `weighted-round-robin`, `random`,
    /// `least-request`, `peak-ewma`, `ring-hash`, `maglev`.
    #[serde(default)]
    pub lb: Lb,
    /// Virtual nodes per endpoint for `ring-hash`.
    #[serde(default = "default_vnodes")]
    pub ring_vnodes: u32,
    /// Upstream protocol: `http1`, `h2c` (HTTP/2 without TLS, also for gRPC) or
    /// `h2` (HTTP/2 over TLS, agreed by ALPN; needs `tls`).
    #[serde(default)]
    pub protocol: Protocol,
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
    /// 4xx statuses that count as the endpoint's failures (for its breaker and for
    /// outlier detection, as a 5xx would), e.g. `[409]` from a service that answers
    /// 409 when its own store is overloaded.
    #[serde(default)]
    pub failure_statuses: Vec<u16>,
    /// Response headers whose presence makes an answer, whatever its status, the
    /// endpoint's failure (an upstream's own overload signal, e.g.
    /// `x-overloaded`).
    #[serde(default)]
    pub failure_headers: Vec<String>,
    /// Adaptive load shedding: a concurrency limit that follows the cluster's
    /// latency, and the load levels at which lower priorities are refused.
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrencySection>,
}

/// `[clusters.<name>.adaptive_concurrency]`: how many requests the cluster is sent
/// at once, found from its latency (the resilience crate's `AdaptiveConcurrency`),
/// and the load levels (in flight over that limit) of tiered shedding.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrencySection {
    /// The limit before anything is measured.
    #[serde(default = "default_ac_initial")]
    pub initial: u32,
    /// The limit never falls below this.
    #[serde(default = "default_ac_min")]
    pub min: u32,
    /// The limit never rises above this.
    #[serde(default = "default_ac_max")]
    pub max: u32,
    /// `gradient` (latency against its long-run level) or `aimd` (grow by
    /// `increase`, shrink by `backoff` after a window with a timeout or an overload
    /// answer).
    #[serde(default)]
    pub algorithm: ConcurrencyAlgorithm,
    /// Gradient: the latency growth tolerated before the limit shrinks (2.0).
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// Gradient: the weight of each new estimate (0.2).
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// Gradient: how many windows the latency baseline spans (20).
    #[serde(default)]
    pub long_windows: Option<u32>,
    /// AIMD: added after a good window (1).
    #[serde(default)]
    pub increase: Option<u32>,
    /// AIMD: the multiplier after a bad window (0.9).
    #[serde(default)]
    pub backoff: Option<f64>,
    /// AIMD: an average latency above this makes a window bad.
    #[serde(default)]
    pub latency_threshold: Option<Dur>,
    /// The limit is updated once per window of this length ...
    #[serde(default = "default_ac_window")]
    pub window: Dur,
    /// ... holding at least this many answers.
    #[serde(default = "default_ac_samples")]
    pub min_samples: u32,
    /// Load (in flight / limit) at which `sheddable` requests are refused.
    #[serde(default = "default_elevated")]
    pub elevated: f64,
    /// Load at which `normal` requests get the route's fallback, where it has one.
    #[serde(default = "default_high")]
    pub high: f64,
    /// Load at which only `critical` requests are served.
    #[serde(default = "default_critical")]
    pub critical: f64,
}

/// How an adaptive concurrency limit moves.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ConcurrencyAlgorithm {
    /// Latency against its long-run level (Envoy's adaptive concurrency, Netflix's
    /// Gradient2).
    #[default]
    Gradient,
    /// Additive increase, multiplicative decrease.
    Aimd,
}

fn default_ac_initial() -> u32 {
    20
}
fn default_ac_min() -> u32 {
    1
}
fn default_ac_max() -> u32 {
    1000
}
fn default_ac_window() -> Dur {
    Dur(Duration::from_millis(100))
}
fn default_ac_samples() -> u32 {
    10
}
fn default_elevated() -> f64 {
    0.6
}
fn default_high() -> f64 {
    0.8
}
fn default_critical() -> f64 {
    0.9
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
        self.protocol != Protocol::Http1
    }
}

/// A cluster's load-balancing policy.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Lb {
    /// In turn.
    RoundRobin,
    /// In turn, by weight.
    WeightedRoundRobin,
    /// At random.
    Random,
    /// The fewer requests in flight of two random picks.
    #[default]
    LeastRequest,
    /// The lower latency-times-load of two random picks.
    PeakEwma,
    /// Consistent hashing on a ring (`ring_vnodes` points per endpoint).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// The protocol spoken to a cluster's endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    #[default]
    #[serde(rename = "http1")]
    Http1,
    /// HTTP/2 in the clear (prior knowledge).
    #[serde(rename = "h2c")]
    H2c,
    /// HTTP/2 over TLS.
    #[serde(rename = "h2")]
    H2,
}

/// An active health check's kind.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// GET `path`; a 2xx passes.
    #[default]
    Http,
    /// A TCP connection passes.
    Tcp,
}

fn default_dns_refresh() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_vnodes() -> u32 {
    160
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_panic() -> f64 {
    0.5
}

/// One endpoint.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// `"host:port"`.
    Address(String),
    /// `{ address = "host:port", weight = 2, tier = 1 }`.
    Detailed {
        /// `host:port`.
        address: String,
        /// Relative weight.
        weight: u32,
        /// Failover tier (0 first).
        tier: u8,
    },
}

/// The table form of an endpoint, read on its own so that a wrong field is
/// reported as that field's error (an untagged enum says only that nothing matched).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetailedEndpoint {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    tier: u8,
}

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EndpointConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\" or { address = \"host:port\", weight = N, tier = N }")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EndpointConfig, E> {
                Ok(EndpointConfig::Address(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EndpointConfig, A::Error> {
                let e = DetailedEndpoint::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointConfig::Detailed {
                    address: e.address,
                    weight: e.weight,
                    tier: e.tier,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
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
    #[serde(default)]
    pub kind: HealthKind,
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

impl Config {
    /// Reads `path`, applies `PALISADE_*` environment overrides, parses and
    /// validates.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one(path.display().to_string(), format!("cannot read: {e}")))?;
        Config::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_with_env(text, std::iter::empty())
    }

    /// Parses TOML text, applies overrides from `(name, value)` pairs named
    /// `PALISADE_<SECTION>__<KEY>[__<KEY>..]` (e.g. `PALISADE_GATEWAY__LISTEN`,
    /// `PALISADE_CLUSTERS__API__LB`), and validates. Names without a `__` are not
    /// overrides (every key is in a section), so `PALISADE_LOG` and the like are
    /// left alone.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let env = env
            .into_iter()
            .filter(|(name, _)| name.strip_prefix(ENV_PREFIX).is_some_and(|k| k.contains("__")));
        let config: Config = palisade_core::config::from_toml(text, ENV_PREFIX, env)?;
        config.validate()?;
        Ok(config)
    }

    /// What route `r` (`at`: its path) names that the file lacks or that cannot go
    /// together: its clusters (its own, its split's, its mirror's), a static route's
    /// proxy-only keys, its issuer, its idempotency store, its queue.
    fn reference_problems(&self, r: &RouteConfig, at: &str, p: &mut Vec<ConfigError>) {
        let own = match (&r.static_files, r.cluster.is_empty()) {
            (Some(_), true) => {
                let proxy_only = [
                    ("mode", r.mode == RouteMode::Async),
                    ("split", !r.split.is_empty()),
                    ("mirror", r.mirror.is_some()),
                    ("cache", r.cache.is_some()),
                    ("idempotency", r.idempotency.is_some()),
                ];
                for (key, _) in proxy_only.iter().filter(|(_, set)| *set) {
                    p.push(ConfigError::new(
                        format!("{at}.{key}"),
                        "is for routes to a cluster; this one serves static_files",
                    ));
                }
                None
            }
            (Some(_), false) => {
                p.push(ConfigError::new(
                    format!("{at}.cluster"),
                    "a route serves static_files or proxies to a cluster, not both",
                ));
                None
            }
            (None, _) => Some((format!("{at}.cluster"), &r.cluster)),
        };
        let named = own
            .into_iter()
            .chain(
                (r.split.iter().enumerate()).map(|(j, w)| (format!("{at}.split[{j}].cluster"), &w.cluster)),
            )
            .chain((r.mirror.iter()).map(|m| (format!("{at}.mirror.cluster"), &m.cluster)));
        for (field, cluster) in named {
            if !self.clusters.contains_key(cluster) {
                p.push(ConfigError::new(field, format!("no cluster named `{cluster}`")));
            }
        }
        if let Some(a) = &r.auth
            && !self.gateway.jwt.contains_key(&a.jwt)
        {
            p.push(ConfigError::new(
                format!("{at}.auth.jwt"),
                format!("no [gateway.jwt.{}] table", a.jwt),
            ));
        }
        if r.idempotency.is_some() {
            if self.gateway.idempotency.is_none() {
                p.push(ConfigError::new(
                    format!("{at}.idempotency"),
                    "keys are kept in a store: add a [gateway.idempotency] table (its store URL)",
                ));
            }
            if r.mode == RouteMode::Async {
                p.push(ConfigError::new(
                    format!("{at}.idempotency"),
                    "an async route stores a request once per Idempotency-Key by itself",
                ));
            }
        }
        if r.mode == RouteMode::Async && self.gateway.queue.is_none() {
            p.push(ConfigError::new(
                format!("{at}.mode"),
                "`async` stores requests in a queue: add a [gateway.queue] table (its database)",
            ));
        }
    }

    /// Checks what serde cannot and no compiled part checks for itself:
    /// references, ranges, names. Reports every problem. The rest is checked where
    /// it is turned into what runs, by `Runtime::compile` (which `palisade check`,
    /// start-up and reload all call): route matches, fallbacks and hash keys are
    /// parsed there, and each policy core validates its own settings (a rate
    /// limit's quota, a breaker's thresholds).
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Vec::new();
        if self.routes.is_empty() {
            p.push(ConfigError::new("routes", "at least one route is needed"));
        }
        self.gateway.problems(&mut p);
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}] ({})", r.name);
            if r.name.is_empty() {
                p.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
            } else if !names.insert(r.name.as_str()) {
                p.push(ConfigError::new(
                    format!("{at}.name"),
                    format!("another route is called `{}`", r.name),
                ));
            }
            r.problems(&at, &mut p);
            self.reference_problems(r, &at, &mut p);
        }
        if let Some(q) = &self.gateway.queue {
            if !(q.database.starts_with("sqlite:")
                || q.database.starts_with("postgres:")
                || q.database.starts_with("postgresql:"))
            {
                p.push(ConfigError::new(
                    "gateway.queue.database",
                    "must be a sqlite:path or postgres://... URL",
                ));
            }
            if q.max_attempts < 1 {
                p.push(ConfigError::new(
                    "gateway.queue.max_attempts",
                    "must be at least 1",
                ));
            }
            if q.workers > 10_000 {
                p.push(ConfigError::new("gateway.queue.workers", "must be at most 10000"));
            }
            if !q.status_path.starts_with('/') || q.status_path.len() < 2 || q.status_path.ends_with('/') {
                p.push(ConfigError::new(
                    "gateway.queue.status_path",
                    "must be a path like /jobs (a leading /, none at the end)",
                ));
            }
        }
        if let Some(c) = &self.gateway.cache {
            if c.max_bytes == 0 {
                p.push(ConfigError::new("gateway.cache.max_bytes", "must be at least 1"));
            }
            positive(&mut p, "gateway.cache.redis_timeout", c.redis_timeout);
            if c.redis
                .as_deref()
                .is_some_and(|url| !url.starts_with("redis://") && !url.starts_with("rediss://"))
            {
                p.push(ConfigError::new(
                    "gateway.cache.redis",
                    "must be a redis://host:port/db URL",
                ));
            }
        }
        if let Some(i) = &self.gateway.idempotency {
            if let Err(e) = palisade_flow::idempotency::store_kind(&i.store) {
                p.push(ConfigError::new("gateway.idempotency.store", e));
            }
            positive(&mut p, "gateway.idempotency.timeout", i.timeout);
        }
        for (name, c) in &self.clusters {
            c.problems(&format!("clusters.{name}"), &mut p);
        }
        ConfigErrors::result(p)
    }
}

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "PALISADE_";

/// Largest `gateway.workers`.
pub const MAX_WORKERS: usize = 1024;
/// Largest `gateway.max_client_connections`.
pub const MAX_CLIENT_CONNECTIONS: usize = 1 << 20;
/// Largest `ring_vnodes`.
pub const MAX_RING_VNODES: u32 = 4096;
/// Largest `rate_limit.max_keys`.
pub const MAX_LIMIT_KEYS: usize = 10_000_000;
/// Largest `gateway.max_header_bytes` (and the least: hyper's read buffer floor).
pub const HEADER_BYTES: std::ops::RangeInclusive<usize> = 8192..=(1 << 20);

fn positive(p: &mut Vec<ConfigError>, at: &str, d: Dur) {
    if d.0.is_zero() {
        p.push(ConfigError::new(at, "must be more than 0"));
    }
}

fn fraction(p: &mut Vec<ConfigError>, at: &str, x: f64) {
    if !(0.0..=1.0).contains(&x) {
        p.push(ConfigError::new(at, "must be between 0 and 1"));
    }
}

fn within<T: PartialOrd + fmt::Display>(p: &mut Vec<ConfigError>, at: &str, x: T, lo: T, hi: T) {
    if x < lo || x > hi {
        p.push(ConfigError::new(at, format!("{x} is not between {lo} and {hi}")));
    }
}

impl GatewaySection {
    fn problems(&self, p: &mut Vec<ConfigError>) {
        for (field, d) in [
            ("tunnel_idle_timeout", self.tunnel_idle_timeout),
            ("pool_idle_timeout", self.pool_idle_timeout),
            ("client_header_timeout", self.client_header_timeout),
            ("client_idle_timeout", self.client_idle_timeout),
            ("request_body_idle_timeout", self.request_body_idle_timeout),
            ("h2_keepalive_interval", self.h2_keepalive_interval),
            ("h2_keepalive_timeout", self.h2_keepalive_timeout),
        ] {
            positive(p, &format!("gateway.{field}"), d);
        }
        within(p, "gateway.workers", self.workers, 0, MAX_WORKERS);
        within(
            p,
            "gateway.max_client_connections",
            self.max_client_connections,
            1,
            MAX_CLIENT_CONNECTIONS,
        );
        within(
            p,
            "gateway.max_header_bytes",
            self.max_header_bytes,
            *HEADER_BYTES.start(),
            *HEADER_BYTES.end(),
        );
        within(
            p,
            "gateway.pool_idle_per_endpoint",
            self.pool_idle_per_endpoint,
            0,
            100_000,
        );
        if usize::try_from(self.max_body_bytes).is_err() {
            p.push(ConfigError::new(
                "gateway.max_body_bytes",
                "too large for this machine",
            ));
        }
        // The same port on the same address (port 0 is a fresh one each time).
        if let Some(admin) = self.admin
            && admin.port() != 0
            && admin.port() == self.listen.port()
            && (admin.ip() == self.listen.ip()
                || admin.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            p.push(ConfigError::new("gateway.admin", format!("{admin} is where the proxy listens (gateway.listen); give the admin listener its own port")));
        }
        if let Some(t) = &self.admin_token
            && (t.len() < 16
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)))
        {
            p.push(ConfigError::new(
                "gateway.admin_token",
                "must be at least 16 characters of letters, digits and `-._~+/=`",
            ));
        }
        if let Some(tls) = &self.tls {
            for proto in &tls.alpn {
                if !["h2", "http/1.1"].contains(&proto.as_str()) {
                    p.push(ConfigError::new(
                        "gateway.tls.alpn",
                        format!("`{proto}` is not `h2` or `http/1.1`"),
                    ));
                }
            }
            positive(p, "gateway.tls.handshake_timeout", tls.handshake_timeout);
        }
    }
}

impl RouteConfig {
    fn problems(&self, at: &str, p: &mut Vec<ConfigError>) {
        positive(p, &format!("{at}.timeout"), self.timeout);
        positive(p, &format!("{at}.body_idle_timeout"), self.body_idle_timeout);
        if let Some(t) = self.per_try_timeout
            && (t.0.is_zero() || t > self.timeout)
        {
            p.push(ConfigError::new(
                format!("{at}.per_try_timeout"),
                "must be more than 0 and at most `timeout`",
            ));
        }
        if let Some(retry) = &self.retry {
            within(p, &format!("{at}.retry.attempts"), retry.attempts, 1, 10);
            fraction(p, &format!("{at}.retry.budget_ratio"), retry.budget_ratio);
            for s in &retry.statuses {
                within(p, &format!("{at}.retry.statuses"), *s, 100, 599);
            }
        }
        if let Some(f) = &self.fault {
            fraction(p, &format!("{at}.fault.delay_rate"), f.delay_rate);
            fraction(p, &format!("{at}.fault.abort_rate"), f.abort_rate);
            within(p, &format!("{at}.fault.abort_status"), f.abort_status, 400, 599);
            if f.delay_rate > 0.0 && f.delay.is_none_or(Dur::is_zero) {
                p.push(ConfigError::new(
                    format!("{at}.fault.delay"),
                    "a delay_rate needs the delay (e.g. \"200ms\")",
                ));
            }
            if f.delay.is_some_and(|d| d >= self.timeout) {
                p.push(ConfigError::new(
                    format!("{at}.fault.delay"),
                    "must be shorter than the route's `timeout` (the delay is part of it)",
                ));
            }
        }
        if let Some(l) = &self.rate_limit {
            if l.max_wait.is_some_and(|w| w >= self.timeout) {
                p.push(ConfigError::new(
                    format!("{at}.rate_limit.max_wait"),
                    "must be shorter than the route's `timeout` (the wait is part of it)",
                ));
            }
            within(
                p,
                &format!("{at}.rate_limit.max_keys"),
                l.max_keys,
                1,
                MAX_LIMIT_KEYS,
            );
        }
    }
}

/// A header name from the file, or `None` with the problem reported to `p` under
/// `field`: the one parse of every header name a configuration holds.
pub(crate) fn header_name(name: &str, field: &str, p: &mut Vec<ConfigError>) -> Option<http::HeaderName> {
    let parsed = http::HeaderName::from_bytes(name.as_bytes()).ok();
    if parsed.is_none() {
        p.push(ConfigError::new(field, format!("`{name}` is not a header name")));
    }
    parsed
}

/// Checks a route's host pattern: a host name (labels of letters, digits, `-`),
/// `*.` and a host name, or an IP address.
pub(crate) fn host_pattern(host: &str) -> Result<(), &'static str> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.parse::<std::net::IpAddr>().is_ok() && name.len() == host.len() {
        return Ok(());
    }
    if host.contains(':') {
        return Err("has a port or is not a host name (routes match the host without its port)");
    }
    host_name(name)
}

/// Checks a DNS host name (RFC 1123 labels; `_` allowed, as resolvers do).
fn host_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("is not a host name (1 to 253 characters)");
    }
    let labels_ok = name.trim_end_matches('.').split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    if !labels_ok {
        return Err("is not a host name (dot-separated labels of letters, digits and `-`)");
    }
    // All digits and dots, yet not an IPv4 address (`256.1.1.1`).
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("is not an IPv4 address");
    }
    Ok(())
}

impl ClusterSection {
    fn problems(&self, at: &str, p: &mut Vec<ConfigError>) {
        if let Some(e) = &self.etcd {
            e.problems(&format!("{at}.etcd"), p);
            if !self.endpoints.is_empty() || self.endpoints_file.is_some() {
                p.push(ConfigError::new(
                    format!("{at}.etcd"),
                    "a cluster's endpoints come from etcd or from endpoints / endpoints_file, not both",
                ));
            }
        } else if self.endpoints.is_empty() && self.endpoints_file.is_none() && !self.allow_empty {
            p.push(ConfigError::new(
                format!("{at}.endpoints"),
                "no endpoints (set allow_empty = true if that is meant)",
            ));
        }
        for (j, e) in self.endpoints.iter().enumerate() {
            if let Err(msg) = split_host_port(e.address()) {
                p.push(ConfigError::new(format!("{at}.endpoints[{j}]"), msg));
            }
            if e.weight_tier().0 == 0 {
                p.push(ConfigError::new(
                    format!("{at}.endpoints[{j}].weight"),
                    "must be at least 1",
                ));
            }
        }
        within(
            p,
            &format!("{at}.ring_vnodes"),
            self.ring_vnodes,
            1,
            MAX_RING_VNODES,
        );
        positive(p, &format!("{at}.connect_timeout"), self.connect_timeout);
        positive(p, &format!("{at}.dns_refresh"), self.dns_refresh);
        if let Some(t) = &self.tls
            && t.cert_file.is_some() != t.key_file.is_some()
        {
            p.push(ConfigError::new(
                format!("{at}.tls"),
                "cert_file and key_file go together",
            ));
        }
        match (self.protocol, &self.tls) {
            (Protocol::Http1, _) | (Protocol::H2c, None) | (Protocol::H2, Some(_)) => {}
            (Protocol::H2c, Some(_)) => p.push(ConfigError::new(
                format!("{at}.protocol"),
                "`h2c` is HTTP/2 in the clear; with `tls` use `h2`",
            )),
            (Protocol::H2, None) => p.push(ConfigError::new(
                format!("{at}.protocol"),
                format!("`h2` is HTTP/2 over TLS and needs [{at}.tls]; in the clear use `h2c`"),
            )),
        }
        fraction(p, &format!("{at}.panic_threshold"), self.panic_threshold);
        for s in &self.failure_statuses {
            within(p, &format!("{at}.failure_statuses"), *s, 400, 499);
        }
        self.policy_problems(at, p);
    }

    /// Outlier detection's, health checks' and failover's problems (the breaker's
    /// and the bulkhead's are their cores' own, found when the cluster is built).
    fn policy_problems(&self, at: &str, p: &mut Vec<ConfigError>) {
        if let Some(o) = &self.outlier {
            within(
                p,
                &format!("{at}.outlier.max_ejection_percent"),
                o.max_ejection_percent,
                0,
                100,
            );
            fraction(p, &format!("{at}.outlier.failure_rate"), o.failure_rate);
            positive(
                p,
                &format!("{at}.outlier.failure_rate_window"),
                o.failure_rate_window,
            );
        }
        if let Some(h) = &self.health {
            positive(p, &format!("{at}.health.interval"), h.interval);
            positive(p, &format!("{at}.health.timeout"), h.timeout);
            if !h.path.starts_with('/') || http::uri::PathAndQuery::try_from(h.path.as_str()).is_err() {
                p.push(ConfigError::new(
                    format!("{at}.health.path"),
                    "must be a path starting with `/`",
                ));
            }
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                p.push(ConfigError::new(
                    format!("{at}.health"),
                    "healthy_threshold and unhealthy_threshold must be at least 1",
                ));
            }
        }
        if let Some(f) = &self.failover {
            fraction(
                p,
                &format!("{at}.failover.healthy_threshold"),
                f.healthy_threshold,
            );
        }
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
    if host.parse::<std::net::IpAddr>().is_err()
        && let Err(e) = host_name(host)
    {
        return Err(format!("`{address}`: `{host}` {e}"));
    }
    Ok((host, port))
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
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.routes[0].timeout, Dur(Duration::from_secs(15)));
        assert_eq!(c.clusters["web"].lb, Lb::LeastRequest);
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
        let lines: Vec<String> = err.iter().map(ToString::to_string).collect();
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
    fn an_error_inside_an_inline_table_names_its_inner_key() {
        let unknown = MINIMAL.replace(
            "cluster = \"web\"",
            "cluster = \"web\"\nretry = { attempts = 2, tries = 1 }",
        );
        let err = Config::from_toml(&unknown).unwrap_err().to_string();
        assert!(err.starts_with("routes.retry.tries (line"), "{err}");
        let wrong = MINIMAL.replace(
            "cluster = \"web\"",
            "cluster = \"web\"\nretry = { attempts = \"two\" }",
        );
        let err = Config::from_toml(&wrong).unwrap_err().to_string();
        assert!(err.starts_with("routes.retry.attempts (line"), "{err}");
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
        assert_eq!(err.fields(), ["routes.cluster"]);
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
ring_vnodes = 0
"#;
        let err = Config::from_toml(text).unwrap_err();
        let all = err.to_string();
        for needle in [
            "routes[0] (a).cluster: no cluster named `nope`",
            "routes[0] (a).per_try_timeout",
            "routes[0] (a).retry.attempts",
            "clusters.web.endpoints[0]: `localhost` is not host:port",
            "clusters.web.ring_vnodes: 0 is not between 1 and 4096",
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
        assert_eq!(c.clusters["web"].lb, Lb::Maglev);
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
