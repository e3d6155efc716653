//! Sharding: a pool per shard, a key's calls sent to the shard that owns it
//! behind that shard's breaker, and calls that span every shard gathered under a
//! per-shard timeout and an explicit policy for partial results.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use palisade_core::config::Dur;
use palisade_core::{ConfigError, ConfigErrors, SharedClock};
use palisade_resilience::breaker::CircuitBreaker;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::DataError;
use crate::config::{PoolConfig, server};
use crate::error::is_unavailable;
use crate::shard_map::{KeyRange, Placement, ShardMap};

/// One shard: its name and its server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// The shard's name (placement hashes it: renaming a shard moves its keys).
    pub name: String,
    /// Its PostgreSQL URL.
    pub url: String,
}

/// A sharded database: its shards, how keys are placed on them, and the patience
/// each shard gets.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// The set's name, in metrics and errors.
    pub name: String,
    /// How keys are placed.
    pub placement: Placement,
    /// Points per shard on the ring (`placement = "ring"`).
    pub vnodes: u32,
    /// The shards, in order (the order matters to `jump`).
    pub shards: Vec<ShardConfig>,
    /// The hash ranges each shard owns (`placement = "ranges"`).
    pub ranges: Vec<KeyRange>,
    /// How long one shard's call may take.
    pub timeout: Dur,
    /// Every shard's pool and breaker.
    pub pool: PoolConfig,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            name: "main".into(),
            placement: Placement::Ring,
            vnodes: 150,
            shards: Vec::new(),
            ranges: Vec::new(),
            timeout: Dur(Duration::from_secs(5)),
            pool: PoolConfig::default(),
        }
    }
}

impl ShardsConfig {
    /// The shard map, or every problem with the settings, each naming its field.
    pub fn map(&self) -> Result<ShardMap, ConfigErrors> {
        let mut errors = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            if let Err(p) = server(&s.url) {
                errors.push(ConfigError::new(format!("shards[{i}].url"), p));
            } else if self.shards[..i].iter().any(|o| o.url == s.url) {
                errors.push(ConfigError::new(
                    format!("shards[{i}].url"),
                    "is another shard's database too",
                ));
            }
        }
        if self.timeout.is_zero() {
            errors.push(ConfigError::new("timeout", "must be more than zero"));
        }
        let names: Vec<String> = self.shards.iter().map(|s| s.name.clone()).collect();
        let map = ShardMap::new(&names, self.placement, self.vnodes, &self.ranges);
        self.pool.validate(&mut errors);
        match map {
            Ok(map) if errors.is_empty() => Ok(map),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(e) => {
                errors.extend(e.0);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Every problem with the settings, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.map().map(drop)
    }
}

/// How a call across every shard treats shards that fail or time out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// Every shard must answer; one failure fails the call
    /// ([`DataError::Partial`]).
    All,
    /// Whatever answered, with the failures listed beside it.
    Partial,
    /// At least this many shards must answer.
    AtLeast(usize),
}

impl Gather {
    fn name(self) -> &'static str {
        match self {
            Gather::All => "all shards required",
            Gather::Partial => "partial results allowed",
            Gather::AtLeast(_) => "a minimum of shards required",
        }
    }
}

/// What a call across shards gathered.
#[derive(Debug)]
pub struct Gathered<T> {
    /// Each shard that answered, by name, with its answer, in shard order.
    pub answers: Vec<(String, T)>,
    /// Each shard that did not, with why.
    pub failures: Vec<(String, DataError)>,
}

/// A sharded database: the map, and a pool and a breaker per shard.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("name", &self.inner.name)
            .field("shards", &self.inner.map.names())
            .finish_non_exhaustive()
    }
}

struct Inner {
    name: String,
    map: ShardMap,
    shards: Vec<Shard>,
    timeout: Duration,
}

struct Shard {
    name: String,
    pool: PgPool,
    breaker: CircuitBreaker,
    calls: metrics::Counter,
}

impl Shards {
    /// The shards of `config`, their pools connecting on first use (a shard that is
    /// down at start is no error: its keys fail until it answers).
    pub fn connect(config: &ShardsConfig) -> Result<Self, DataError> {
        Self::connect_with_clock(config, SharedClock::system())
    }

    /// [`connect`](Self::connect) with the breakers on `clock`.
    pub fn connect_with_clock(config: &ShardsConfig, clock: SharedClock) -> Result<Self, DataError> {
        let map = config.map()?;
        let mut shards = Vec::with_capacity(config.shards.len());
        for (i, s) in config.shards.iter().enumerate() {
            let server = server(&s.url).map_err(|p| ConfigErrors::one(format!("shards[{i}].url"), p))?;
            let breaker = CircuitBreaker::builder(format!("data:{}:{}", config.name, s.name))
                .config(config.pool.breaker())
                .shared_clock(clock.clone())
                .build()?;
            shards.push(Shard {
                name: s.name.clone(),
                pool: PgPoolOptions::new()
                    .max_connections(config.pool.max_connections)
                    .acquire_timeout(config.pool.acquire_timeout.get())
                    .connect_lazy_with(server.options),
                breaker,
                calls: metrics::counter!(
                    "palisade_data_shard_calls_total",
                    &[("set", config.name.clone()), ("shard", s.name.clone())]
                ),
            });
        }
        Ok(Shards {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                map,
                shards,
                timeout: config.timeout.get(),
            }),
        })
    }

    /// The placement of keys.
    pub fn map(&self) -> &ShardMap {
        &self.inner.map
    }

    /// The name of the shard that owns `key`.
    pub fn shard_for(&self, key: &[u8]) -> &str {
        &self.inner.shards[self.inner.map.shard_of(key)].name
    }

    /// The pool of the shard that owns `key`, for a transaction on it (no breaker,
    /// no timeout: [`run`](Self::run) has both).
    pub fn pool_for(&self, key: &[u8]) -> &PgPool {
        &self.inner.shards[self.inner.map.shard_of(key)].pool
    }

    /// Runs `query` on the shard that owns `key`, within the shard timeout and
    /// behind its breaker: a shard that is down fails with
    /// [`DataError::ShardUnavailable`] naming it, at once while its breaker is open.
    pub async fn run<T, F, Fut>(&self, key: &[u8], query: F) -> Result<T, DataError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let shard = &self.inner.shards[self.inner.map.shard_of(key)];
        self.inner.call(shard, query).await
    }

    /// Runs `query` on every shard at once (given each shard's name and pool) and
    /// gathers the answers as `gather` requires; each shard has the shard timeout.
    pub async fn scatter<T, F, Fut>(&self, gather: Gather, query: F) -> Result<Gathered<T>, DataError>
    where
        F: Fn(&str, PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let inner = &*self.inner;
        let calls = inner
            .shards
            .iter()
            .map(|s| async { (s.name.clone(), inner.call(s, |pool| query(&s.name, pool)).await) });
        let mut gathered = Gathered {
            answers: Vec::new(),
            failures: Vec::new(),
        };
        for (name, result) in futures_util::future::join_all(calls).await {
            match result {
                Ok(v) => gathered.answers.push((name, v)),
                Err(e) => gathered.failures.push((name, e)),
            }
        }
        let total = inner.shards.len();
        let enough = match gather {
            Gather::All => gathered.failures.is_empty(),
            Gather::Partial => true,
            Gather::AtLeast(n) => gathered.answers.len() >= n,
        };
        if enough {
            return Ok(gathered);
        }
        let first = gathered
            .failures
            .first()
            .map(|(name, e)| format!("{name}: {e}"))
            .unwrap_or_default();
        Err(DataError::Partial {
            failed: gathered.failures.len(),
            total,
            policy: gather.name(),
            first,
        })
    }
}

impl Inner {
    async fn call<T, F, Fut>(&self, shard: &Shard, query: F) -> Result<T, DataError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let unavailable = |reason: String| DataError::ShardUnavailable {
            shard: shard.name.clone(),
            reason,
        };
        let Ok(permit) = shard.breaker.try_acquire() else {
            return Err(unavailable("its breaker is open after failures".into()));
        };
        shard.calls.increment(1);
        match tokio::time::timeout(self.timeout, query(shard.pool.clone())).await {
            Ok(Ok(v)) => {
                permit.success();
                Ok(v)
            }
            Ok(Err(e)) if is_unavailable(&e) => {
                permit.failure();
                tracing::warn!(set = %self.name, shard = %shard.name, error = %e, "shard unavailable");
                Err(unavailable(e.to_string()))
            }
            Ok(Err(e)) => {
                permit.success();
                Err(DataError::Query(e))
            }
            Err(_) => {
                permit.failure();
                Err(unavailable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }
}
