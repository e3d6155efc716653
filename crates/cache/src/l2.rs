//! L2: Redis, behind a timeout and a circuit breaker.
//!
//! Every call is bounded by [`RedisOptions::timeout`] and goes through a circuit
//! breaker, so a Redis that is down or hung costs one fast refusal per call once the
//! breaker has opened, not a timeout per call. The connection is a `redis-rs`
//! [`ConnectionManager`]: one multiplexed RESP3 connection (concurrent calls are
//! pipelined on it), reconnected by itself, which also carries the invalidation
//! channel's messages.
//!
//! Keys: a value lives at `<prefix>{<key>}`, its generation at `<prefix>{<key>}:g`
//! and its load lease at `<prefix>{<key>}:l` (the braces keep the three in one
//! Redis Cluster slot, so the scripts may touch them together).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use palisade_core::SharedClock;
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration};
use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ProtocolVersion, RedisError, Script, Value};

use crate::stats::Stats;

/// Redis settings of a cache's L2.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prepended to every key and to the invalidation channel (default:
    /// `palisade:cache:<name>:`). Caches that share a prefix share entries.
    pub prefix: Option<String>,
    /// Longest wait for one Redis call (default 100 ms).
    pub timeout: Duration,
    /// The breaker in front of Redis (default: open after 3 failures in a row, for 5
    /// seconds, then one probe).
    pub breaker: BreakerConfig,
    /// A short lease so one process loads a missing key while the others wait for it
    /// or serve a stale value (off by default).
    pub lease: Option<LeaseOptions>,
    /// How long a key's generation counter outlives its last change (default a day).
    /// A load slower than this could write back a value an invalidation replaced.
    pub generation_ttl: Duration,
}

impl RedisOptions {
    /// Defaults for the Redis at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            prefix: None,
            timeout: Duration::from_millis(100),
            breaker: BreakerConfig::empty()
                .consecutive_failures(3)
                .open_duration(OpenDuration::Fixed(Duration::from_secs(5)))
                .half_open(1, 1),
            lease: None,
            generation_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The cross-process load lease (`SET NX PX` with a random token).
#[derive(Clone, Copy, Debug)]
pub struct LeaseOptions {
    /// How long a lease lasts if its holder never releases it (it died).
    pub ttl: Duration,
    /// How long a process without a stale value waits for the holder's value before
    /// loading it itself.
    pub wait: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: Duration::from_secs(5),
            wait: Duration::from_secs(1),
        }
    }
}

/// Why an L2 call gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum L2Error {
    #[error("Redis's circuit breaker is open")]
    Refused,
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
}

/// What the lease script found.
pub(crate) enum Lease {
    /// A fresh value was there after all.
    Filled(Vec<u8>),
    /// This process holds the lease; the generation it loads against.
    Held(String),
    /// Another process holds it.
    Busy(String),
}

/// Reads the value's "fresh until" from its header (see `entry.rs`) and compares it
/// with the caller's clock; then takes the lease if the value is missing or stale.
const LEASE: &str = r"
local g = redis.call('GET', KEYS[2]) or '0'
local v = redis.call('GET', KEYS[1])
if v and string.len(v) >= 14 and string.byte(v, 1) == 1 then
  local t = 0
  for i = 3, 10 do t = t * 256 + string.byte(v, i) end
  if t > tonumber(ARGV[3]) then return {1, g, v} end
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, g} end
return {3, g}
";

/// Writes a loaded value only if no invalidation came since the load began (the
/// generation is unchanged), and releases the lease if the caller holds it.
const FILL: &str = r"
local ok = (redis.call('GET', KEYS[2]) or '0') == ARGV[1]
if ok then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
if ok then return 1 end
return 0
";

/// A `set` (a value) or an invalidation (no value): bumps the generation, so a load
/// already out cannot write back what it read before, and tells the other instances.
const CHANGE: &str = r"
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[1] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

pub(crate) struct L2 {
    conn: ConnectionManager,
    breaker: CircuitBreaker,
    timeout: Duration,
    prefix: String,
    pub channel: String,
    pub lease: Option<LeaseOptions>,
    generation_ttl_ms: u64,
    scripts: [Script; 4],
    stats: Arc<Stats>,
    /// How many disconnections the reconnected connection has caught up with.
    caught_up: AtomicU64,
    on_reconnect: Box<dyn Fn() + Send + Sync>,
}

impl L2 {
    /// A lazily connected L2; `on_push` receives the connection's pushes (channel
    /// messages, and a `Disconnection` when the connection drops).
    pub fn new(
        name: &str,
        options: &RedisOptions,
        clock: SharedClock,
        stats: Arc<Stats>,
        on_push: impl AsyncPushSender,
        on_reconnect: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(options.url.as_str())?;
        let info = client.get_connection_info().clone();
        let redis_settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(redis_settings))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout.max(Duration::from_millis(250))))
            // Each call is bounded by `guarded`'s timeout, which also covers waiting
            // for a connection; a second timer per call here would only cost.
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
            .set_push_sender(on_push)
            .set_automatic_resubscription();
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let breaker = CircuitBreaker::builder(format!("cache:{name}:redis"))
            .config(options.breaker.clone())
            .shared_clock(clock)
            .build()
            .map_err(|e| RedisError::from((redis::ErrorKind::Client, "breaker", e.to_string())))?;
        let prefix = options
            .prefix
            .clone()
            .unwrap_or_else(|| format!("palisade:cache:{name}:"));
        Ok(L2 {
            conn,
            breaker,
            timeout: options.timeout,
            channel: format!("{prefix}invalidations"),
            prefix,
            lease: options.lease,
            generation_ttl_ms: millis(options.generation_ttl),
            scripts: [
                Script::new(LEASE),
                Script::new(FILL),
                Script::new(CHANGE),
                Script::new(RELEASE),
            ],
            stats,
            caught_up: AtomicU64::new(0),
            on_reconnect: Box::new(on_reconnect),
        })
    }

    /// The breaker in front of Redis.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// `<prefix>{<key>}`, with room for a suffix.
    fn value_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len() + 4);
        k.push_str(&self.prefix);
        k.push('{');
        k.push_str(key);
        k.push('}');
        k
    }

    fn keys(&self, key: &str) -> [String; 3] {
        let value = self.value_key(key);
        let generation = value.clone() + ":g";
        let lease = value.clone() + ":l";
        [value, generation, lease]
    }

    /// Runs one call through the breaker and the timeout, counting what went wrong.
    async fn guarded<T>(&self, call: impl Future<Output = Result<T, RedisError>>) -> Result<T, L2Error> {
        let Ok(permit) = self.breaker.try_acquire() else {
            self.stats.redis_refused();
            return Err(L2Error::Refused);
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => {
                permit.success();
                self.catch_up();
                Ok(v)
            }
            Ok(Err(e)) => {
                permit.failure();
                if e.is_timeout() {
                    self.stats.redis_timeouts();
                } else {
                    self.stats.redis_errors();
                }
                tracing::debug!(error = %e, "cache: Redis call failed");
                Err(L2Error::Redis(e))
            }
            Err(_) => {
                permit.failure();
                self.stats.redis_timeouts();
                Err(L2Error::Timeout)
            }
        }
    }

    /// After a disconnection, the first answer from Redis (on the new connection,
    /// subscribed again before it is used) drops L1: invalidations sent while it was
    /// down never arrived.
    #[inline]
    fn catch_up(&self) {
        let lost = self.stats.snapshot_disconnections();
        if lost != self.caught_up.load(Ordering::Relaxed) {
            self.caught_up.store(lost, Ordering::Relaxed);
            (self.on_reconnect)();
        }
    }

    /// `GET` of the value.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error> {
        let mut conn = self.conn.clone();
        let value_key = self.value_key(key);
        self.guarded(async move { Cmd::get(value_key).query_async(&mut conn).await })
            .await
    }

    /// The key's generation: a load writes back only if it is unchanged.
    pub async fn generation(&self, key: &str) -> Result<String, L2Error> {
        let mut conn = self.conn.clone();
        let [_, generation, _] = self.keys(key);
        let g: Option<String> = self
            .guarded(async move { Cmd::get(generation).query_async(&mut conn).await })
            .await?;
        Ok(g.unwrap_or_else(|| "0".to_owned()))
    }

    /// Takes the key's load lease unless a fresh value is there (`now_ms` judges it).
    pub async fn lease(&self, key: &str, token: &str, now_ms: u64) -> Result<Lease, L2Error> {
        let ttl = self.lease.map_or(0, |l| millis(l.ttl));
        let mut conn = self.conn.clone();
        let keys = self.keys(key);
        let mut invocation = self.scripts[0].prepare_invoke();
        invocation.key(&keys[..]).arg(token).arg(ttl).arg(now_ms);
        let reply: Vec<Value> = self
            .guarded(async move { invocation.invoke_async(&mut conn).await })
            .await?;
        let text = |v: &Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
        match reply.as_slice() {
            [Value::Int(1), _, v] => Ok(Lease::Filled(redis::from_redis_value_ref(v).unwrap_or_default())),
            [Value::Int(2), g] => Ok(Lease::Held(text(g))),
            [_, g, ..] => Ok(Lease::Busy(text(g))),
            _ => Err(L2Error::Redis(RedisError::from((
                redis::ErrorKind::Client,
                "unexpected reply from the lease script",
            )))),
        }
    }

    /// Writes a loaded value if the generation is still `generation`; releases the
    /// lease if `token` holds it. `Ok(false)`: an invalidation came first.
    pub async fn fill(
        &self,
        key: &str,
        generation: &str,
        blob: Vec<u8>,
        ttl_ms: u64,
        token: Option<&str>,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let keys = self.keys(key);
        let mut invocation = self.scripts[1].prepare_invoke();
        invocation
            .key(&keys[..])
            .arg(generation)
            .arg(blob)
            .arg(ttl_ms.max(1))
            .arg(token.unwrap_or(""));
        let written: i64 = self
            .guarded(async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(written == 1)
    }

    /// Gives the lease back without a value (the load failed).
    pub async fn release(&self, key: &str, token: &str) -> Result<(), L2Error> {
        let mut conn = self.conn.clone();
        let [_, _, lease] = self.keys(key);
        let mut invocation = self.scripts[3].prepare_invoke();
        invocation.key(lease).arg(token);
        let _: i64 = self
            .guarded(async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(())
    }

    /// Replaces (`Some`) or removes (`None`) the value, bumps its generation and
    /// publishes `message` on the invalidation channel, in one step.
    pub async fn change(
        &self,
        key: &str,
        blob: Option<Vec<u8>>,
        ttl_ms: u64,
        message: &str,
    ) -> Result<(), L2Error> {
        let mut conn = self.conn.clone();
        let keys = self.keys(key);
        let mut invocation = self.scripts[2].prepare_invoke();
        invocation
            .key(&keys[..2])
            .arg(blob.unwrap_or_default())
            .arg(ttl_ms.max(1))
            .arg(self.generation_ttl_ms.max(1))
            .arg(&self.channel)
            .arg(message);
        let _: i64 = self
            .guarded(async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(())
    }

    /// Subscribes to the invalidation channel (the connection resubscribes by itself
    /// after a reconnect once this has succeeded).
    pub async fn subscribe(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        conn.subscribe(&self.channel).await
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
