//! Bulkhead: a cap on concurrent calls to one dependency, so that one slow
//! dependency cannot take every thread, connection or task of the caller with it.
//!
//! A full bulkhead refuses at once with [`BulkheadFull`] by default. A bounded wait
//! ([`BulkheadConfig::max_wait`]) lets a request wait that long for a slot; nothing
//! ever waits longer, so there is no unbounded queue (tower's `ConcurrencyLimit`
//! queues every caller until a slot frees; this one does not).
//!
//! [`KeyedBulkhead`] keeps one bulkhead per downstream (cluster, endpoint, tenant).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::pin::pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::sync::{AtomicU32, CachePadded, Ordering};
use crate::{ConfigError, ConfigErrors};

/// The size of a [`Bulkhead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkheadConfig {
    /// Calls allowed in flight at once.
    pub max_concurrent: u32,
    /// How long a call may wait for a slot when all are taken; zero (the default)
    /// refuses at once.
    pub max_wait: Duration,
}

impl BulkheadConfig {
    /// `max_concurrent` slots, no waiting.
    pub const fn new(max_concurrent: u32) -> Self {
        BulkheadConfig {
            max_concurrent,
            max_wait: Duration::ZERO,
        }
    }

    /// Every problem with this configuration, with its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        if self.max_concurrent == 0 {
            return Err(ConfigErrors(vec![ConfigError::new(
                "max_concurrent",
                "must be at least 1",
            )]));
        }
        Ok(())
    }
}

/// The bulkhead was full (and stayed full for `max_wait`, if one was set).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead {name} is full ({max_concurrent} calls in flight)")]
pub struct BulkheadFull {
    /// The bulkhead's name.
    pub name: Arc<str>,
    /// Its size.
    pub max_concurrent: u32,
}

/// A concurrency limit shared by its clones. See the [module docs](self).
///
/// ```
/// use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
///
/// let bulkhead = Bulkhead::new("payments", BulkheadConfig::new(2)).unwrap();
/// let a = bulkhead.try_acquire().unwrap();
/// let _b = bulkhead.try_acquire().unwrap();
/// assert!(bulkhead.try_acquire().is_err(), "full: refused at once");
/// drop(a);
/// assert!(bulkhead.try_acquire().is_ok(), "a finished call frees its slot");
/// ```
#[derive(Clone)]
pub struct Bulkhead {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: CachePadded<AtomicU32>,
    waiters: AtomicU32,
    notify: tokio::sync::Notify,
    config: BulkheadConfig,
    name: Arc<str>,
    rejected: metrics::Counter,
}

impl std::fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bulkhead")
            .field("name", &self.inner.name)
            .field("in_flight", &self.in_flight())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Bulkhead {
    /// A bulkhead named `name` (used in errors and metrics).
    pub fn new(name: impl Into<Arc<str>>, config: BulkheadConfig) -> Result<Self, ConfigErrors> {
        config.validate()?;
        let name = name.into();
        Ok(Bulkhead {
            inner: Arc::new(Inner {
                in_flight: CachePadded(AtomicU32::new(0)),
                waiters: AtomicU32::new(0),
                notify: tokio::sync::Notify::new(),
                config,
                rejected: metrics::counter!("palisade_bulkhead_rejected_total", "bulkhead" => name.to_string()),
                name,
            }),
        })
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its configuration.
    pub fn config(&self) -> &BulkheadConfig {
        &self.inner.config
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Calls in flight as a share of the limit (0.0 to 1.0), a load signal for
    /// [load shedding](crate::shed).
    pub fn utilization(&self) -> f64 {
        f64::from(self.in_flight()) / f64::from(self.inner.config.max_concurrent)
    }

    #[inline]
    fn try_take(&self) -> bool {
        let in_flight = &self.inner.in_flight;
        let max = self.inner.config.max_concurrent;
        let mut current = in_flight.load(Ordering::SeqCst);
        loop {
            if current >= max {
                return false;
            }
            match in_flight.compare_exchange_weak(current, current + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    fn release(&self) {
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        // SeqCst on both sides: either this load sees a waiter that registered, or
        // that waiter's retry (after registering) sees the slot this call freed.
        if self.inner.waiters.load(Ordering::SeqCst) > 0 {
            self.inner.notify.notify_one();
        }
    }

    /// Takes a slot without counting a refusal if there is none.
    #[inline]
    pub(crate) fn take(&self) -> Option<BulkheadPermit> {
        self.try_take().then(|| BulkheadPermit {
            bulkhead: self.clone(),
        })
    }

    /// Counts a refusal and describes it.
    pub(crate) fn full(&self) -> BulkheadFull {
        self.inner.rejected.increment(1);
        BulkheadFull {
            name: self.inner.name.clone(),
            max_concurrent: self.inner.config.max_concurrent,
        }
    }

    /// Takes a slot now, or refuses at once (whatever `max_wait` says).
    #[inline]
    pub fn try_acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        self.take().ok_or_else(|| self.full())
    }

    /// Takes a slot, waiting at most `max_wait` for one (on tokio's clock).
    pub async fn acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        if let Some(permit) = self.take() {
            return Ok(permit);
        }
        if self.inner.config.max_wait.is_zero() {
            return Err(self.full());
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.max_wait;
        self.inner.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaiterGuard(&self.inner.waiters);
        loop {
            let mut notified = pin!(self.inner.notify.notified());
            notified.as_mut().enable();
            if let Some(permit) = self.take() {
                return Ok(permit);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.full());
            }
        }
    }

    /// Runs `f` in a slot, or refuses at once.
    pub fn call<T>(&self, f: impl FnOnce() -> T) -> Result<T, BulkheadFull> {
        let _permit = self.try_acquire()?;
        Ok(f())
    }
}

struct WaiterGuard<'a>(&'a AtomicU32);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slot in a [`Bulkhead`], given back when dropped.
#[derive(Debug)]
#[must_use = "the slot is released when the permit is dropped"]
pub struct BulkheadPermit {
    bulkhead: Bulkhead,
}

impl BulkheadPermit {
    /// The bulkhead this slot belongs to.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.bulkhead
    }
}

impl Drop for BulkheadPermit {
    #[inline]
    fn drop(&mut self) {
        self.bulkhead.release();
    }
}

const SHARDS: usize = 16;

/// One [`Bulkhead`] per key (per downstream cluster, endpoint or tenant), all of the
/// same size.
///
/// Memory stays bounded: when a shard holds `capacity / 16` bulkheads, those that
/// are idle (no call in flight, no one holding them) are forgotten. Busy ones are
/// kept, so the map can exceed `capacity` only by keys that have calls in flight.
///
/// ```
/// use palisade_resilience::bulkhead::{BulkheadConfig, KeyedBulkhead};
///
/// let per_cluster = KeyedBulkhead::new("cluster", BulkheadConfig::new(1), 1_000).unwrap();
/// let _a = per_cluster.get(&"users").try_acquire().unwrap();
/// assert!(per_cluster.get(&"users").try_acquire().is_err());
/// assert!(per_cluster.get(&"orders").try_acquire().is_ok(), "isolated from users");
/// ```
pub struct KeyedBulkhead<K> {
    prefix: Arc<str>,
    config: BulkheadConfig,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<K, Bulkhead>>]>,
}

impl<K> std::fmt::Debug for KeyedBulkhead<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedBulkhead")
            .field("prefix", &self.prefix)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + std::fmt::Display> KeyedBulkhead<K> {
    /// Bulkheads named `prefix/key`, each of `config`, about `capacity` idle ones kept.
    pub fn new(
        prefix: impl Into<Arc<str>>,
        config: BulkheadConfig,
        capacity: usize,
    ) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(KeyedBulkhead {
            prefix: prefix.into(),
            config,
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        })
    }

    /// The bulkhead for `key`, created on first use.
    pub fn get(&self, key: &K) -> Bulkhead {
        let shard = &self.shards[(self.hasher.hash_one(key) >> 32) as usize % SHARDS];
        if let Some(b) = shard.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return b.clone();
        }
        let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        if map.len() >= self.per_shard {
            map.retain(|_, b| Arc::strong_count(&b.inner) > 1 || b.in_flight() > 0);
        }
        let bulkhead =
            Bulkhead::new(format!("{}/{key}", self.prefix), self.config).expect("config validated in new");
        map.insert(key.clone(), bulkhead.clone());
        bulkhead
    }

    /// Bulkheads currently kept.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_slot_a_finished_call_frees() {
        let bulkhead = Bulkhead::new(
            "db",
            BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::from_secs(1),
            },
        )
        .unwrap();
        let held = bulkhead.try_acquire().unwrap();
        let waiter = tokio::spawn({
            let b = bulkhead.clone();
            async move { b.acquire().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(bulkhead.inner.waiters.load(Ordering::SeqCst), 1);
        drop(held);
        waiter.await.unwrap().expect("the freed slot went to the waiter");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_max_wait() {
        let bulkhead = Bulkhead::new(
            "db",
            BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::from_millis(50),
            },
        )
        .unwrap();
        let _held = bulkhead.try_acquire().unwrap();
        let start = tokio::time::Instant::now();
        let err = bulkhead.acquire().await.unwrap_err();
        assert_eq!(err.max_concurrent, 1);
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(bulkhead.inner.waiters.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn no_wait_means_refused_at_once() {
        let bulkhead = Bulkhead::new("db", BulkheadConfig::new(1)).unwrap();
        let _held = bulkhead.try_acquire().unwrap();
        assert!(bulkhead.acquire().await.is_err());
    }

    #[test]
    fn keyed_bulkheads_forget_idle_keys_but_never_busy_ones() {
        let keyed = KeyedBulkhead::new("c", BulkheadConfig::new(1), 16).unwrap();
        let held: Vec<_> = (0..8).map(|k| keyed.get(&k).try_acquire().unwrap()).collect();
        for k in 100..10_000 {
            drop(keyed.get(&k).try_acquire().unwrap());
        }
        assert!(keyed.len() <= 16 + 8, "{}", keyed.len());
        for k in 0..8 {
            assert!(keyed.get(&k).try_acquire().is_err(), "busy bulkhead {k} was kept");
        }
        drop(held);
    }

    #[test]
    fn zero_slots_is_a_config_error() {
        let err = Bulkhead::new("x", BulkheadConfig::new(0)).unwrap_err();
        assert_eq!(err.0[0].field, "max_concurrent");
    }
}
