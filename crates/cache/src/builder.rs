//! Building a [`Cache`]: every setting, its default, and its validation.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use palisade_core::{Clock, ConfigError, ConfigErrors, SharedClock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Cache;
use crate::l2::RedisOptions;

/// How much room an entry takes in L1 (its weight); the default weighs every entry 1.
pub type WeighFn<V> = Arc<dyn Fn(&str, &V) -> u64 + Send + Sync>;
/// Says whether a key can exist at all; a key it refuses is answered "absent" at once.
pub type KeyFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The settings a built cache runs with.
pub(crate) struct Settings<V> {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub jitter: f64,
    pub l1_ttl: Option<Duration>,
    pub stale_if_error: Duration,
    pub early_refresh: Option<f64>,
    pub max_weight: u64,
    pub estimated_items: usize,
    pub weigh: Option<WeighFn<V>>,
    pub filter: Option<KeyFilter>,
    pub redis: Option<RedisOptions>,
    pub clock: SharedClock,
}

/// Builds a [`Cache`]; see [`Cache::builder`].
pub struct CacheBuilder<V> {
    pub(crate) name: String,
    pub(crate) settings: Settings<V>,
    _value: PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for CacheBuilder<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.settings;
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("ttl", &s.ttl)
            .field("negative_ttl", &s.negative_ttl)
            .field("jitter", &s.jitter)
            .field("stale_if_error", &s.stale_if_error)
            .field("early_refresh", &s.early_refresh)
            .field("max_weight", &s.max_weight)
            .field("redis", &s.redis)
            .finish_non_exhaustive()
    }
}

impl<V> CacheBuilder<V>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(crate) fn new(name: String) -> Self {
        CacheBuilder {
            name,
            settings: Settings {
                ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(5),
                jitter: 0.1,
                l1_ttl: None,
                stale_if_error: Duration::ZERO,
                early_refresh: Some(1.0),
                max_weight: 10_000,
                estimated_items: 0,
                weigh: None,
                filter: None,
                redis: None,
                clock: SharedClock::system(),
            },
            _value: PhantomData,
        }
    }

    /// How long a loaded value is served without a load (default 60 s), before jitter.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long a confirmed absence is remembered (default 5 s): repeated lookups of
    /// a key that does not exist reach the loader once per this period, not once per
    /// lookup (the guard against cache penetration).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.settings.negative_ttl = ttl;
        self
    }

    /// Spreads each entry's lifetime uniformly over `ttl × (1 ± jitter)` (default
    /// 0.1), so keys loaded together do not expire together (the guard against a
    /// cache avalanche). `0` turns it off.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.settings.jitter = jitter;
        self
    }

    /// Caps how long L1 serves an entry without asking L2 again, below its TTL: the
    /// bound on how stale another instance can be if an invalidation message is lost.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.settings.l1_ttl = Some(ttl);
        self
    }

    /// How long past its expiry a value is still served when its load (or Redis)
    /// fails: stale-if-error (default zero: a failed load is an error).
    pub fn stale_if_error(mut self, grace: Duration) -> Self {
        self.settings.stale_if_error = grace;
        self
    }

    /// Probabilistic early refresh ("XFetch", Vattani et al., VLDB 2015): a hit on an
    /// entry near its expiry starts a background reload with a probability that
    /// grows as expiry nears and with how long the last load took, scaled by `beta`
    /// (default `Some(1.0)`; larger refreshes earlier; `None` turns it off).
    pub fn early_refresh(mut self, beta: Option<f64>) -> Self {
        self.settings.early_refresh = beta;
        self
    }

    /// The most L1 holds, in weight (default 10,000; with the default weigher, entries).
    pub fn max_weight(mut self, weight: u64) -> Self {
        self.settings.max_weight = weight;
        self
    }

    /// How many entries L1 is expected to hold (default: `max_weight` when every entry
    /// weighs 1); sizes its tables.
    pub fn estimated_items(mut self, items: usize) -> Self {
        self.settings.estimated_items = items;
        self
    }

    /// How much of [`max_weight`](Self::max_weight) an entry takes (bytes, say).
    /// Negative entries weigh 1.
    pub fn weigher(mut self, weigh: impl Fn(&str, &V) -> u64 + Send + Sync + 'static) -> Self {
        self.settings.weigh = Some(Arc::new(weigh));
        self
    }

    /// Refuses keys that cannot exist before any lookup (a Bloom filter of valid ids,
    /// a format check): they are answered "absent" without reaching L2 or the loader.
    pub fn filter(mut self, filter: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.settings.filter = Some(Arc::new(filter));
        self
    }

    /// Adds Redis as L2 (shared by every instance with the same key prefix).
    pub fn redis(mut self, options: RedisOptions) -> Self {
        self.settings.redis = Some(options);
        self
    }

    /// The clock TTLs are measured on (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.settings.clock = SharedClock::new(clock);
        self
    }

    /// Every problem with the settings, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let s = &self.settings;
        let mut errors = Vec::new();
        let mut check = |ok: bool, field: &str, problem: &str| {
            if !ok {
                errors.push(ConfigError::new(field, problem));
            }
        };
        check(!s.ttl.is_zero(), "ttl", "must be longer than zero");
        check(
            !s.negative_ttl.is_zero(),
            "negative_ttl",
            "must be longer than zero",
        );
        check(
            (0.0..1.0).contains(&s.jitter),
            "jitter",
            "must be at least 0 and below 1 (a fraction of the TTL)",
        );
        check(
            s.l1_ttl.is_none_or(|t| !t.is_zero()),
            "l1_ttl",
            "must be longer than zero",
        );
        check(
            s.early_refresh.is_none_or(|b| b.is_finite() && b > 0.0),
            "early_refresh",
            "must be a number above zero",
        );
        check(s.max_weight > 0, "max_weight", "must be at least 1");
        if let Some(redis) = &s.redis {
            check(
                !redis.timeout.is_zero(),
                "redis.timeout",
                "must be longer than zero",
            );
            check(
                redis::Client::open(redis.url.as_str()).is_ok(),
                "redis.url",
                "is not a Redis URL (redis://host:port/db)",
            );
            if let Some(lease) = &redis.lease {
                check(
                    !lease.ttl.is_zero(),
                    "redis.lease.ttl",
                    "must be longer than zero",
                );
                check(
                    !lease.wait.is_zero(),
                    "redis.lease.wait",
                    "must be longer than zero",
                );
            }
            check(
                redis.generation_ttl > s.ttl,
                "redis.generation_ttl",
                "must be longer than the TTL",
            );
        }
        if let Some(Err(e)) = s.redis.as_ref().map(|r| r.breaker.validate()) {
            errors.extend(e.under("redis.breaker").0);
        }
        ConfigErrors::result(errors)
    }

    /// Validates the settings and builds the cache. Must be called inside a tokio
    /// runtime when Redis is configured (the invalidation subscription runs on it);
    /// Redis itself need not be up: the cache connects, and reconnects, by itself.
    pub fn build(self) -> Result<Cache<V>, ConfigErrors> {
        self.validate()?;
        if self.settings.redis.is_some() && tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigErrors(vec![ConfigError::new(
                "redis",
                "a cache with Redis must be built inside a tokio runtime",
            )]));
        }
        Cache::from_builder(self)
    }
}
