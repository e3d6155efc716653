use std::collections::HashMap;
use std::collections::hash_map::RandomState;

use hashbrown::HashTable;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, RwLock};

use super::direct::decide_atomic;
use super::{Algorithm, Allowed, Gcra, RateLimited};
use crate::clock::{Instant, SharedClock};
use crate::sync::{AtomicU64, CachePadded, Ordering};

const SHARDS: usize = 32;

/// One rate limit per key (per client, per route, per value of a parameter), in
/// memory bounded by `capacity` keys whatever the number of distinct keys seen.
///
/// Memory stays bounded by itself, with no pruning task to run:
///
/// 1. A key whose state is *idle* (its bucket is full again, its windows empty) is
///    indistinguishable from a key never seen, so forgetting it is lossless. When a
///    shard is full, a new key first sweeps the idle keys out.
/// 2. If the shard is still nearly full (more than `capacity` busy keys at once), the
///    least busy quarter is forgotten. Those keys start again with a full allowance:
///    the limiter fails open for them rather than growing without bound. The
///    `palisade_ratelimit_keys_evicted_total` counter says when that happens.
///
/// Known hot keys can carry their own algorithm ([`with_override`](Self::with_override)),
/// like Sentinel's per-value exceptions for hot parameters.
///
/// Each key costs its own size plus 8 bytes of state plus about one control byte,
/// inside hash tables sized at most to the next power of two of their share of
/// `capacity`; the memory test in `tests/keyed_memory.rs` holds 10 million distinct
/// keys to the bound stated in `docs/patterns/rate-limiting.md`.
///
/// ```
/// use palisade_resilience::ratelimit::{Gcra, KeyedRateLimiter, Quota};
///
/// let per_client = KeyedRateLimiter::new(Gcra::new(Quota::per_second(1)).unwrap(), 100_000);
/// assert!(per_client.check(&"10.0.0.1").is_ok());
/// assert!(per_client.check(&"10.0.0.1").is_err());
/// assert!(per_client.check(&"10.0.0.2").is_ok(), "another client has its own bucket");
/// ```
pub struct KeyedRateLimiter<K, A = Gcra, S = RandomState> {
    inner: Arc<Inner<K, A, S>>,
}

struct Inner<K, A, S> {
    algorithm: A,
    overrides: HashMap<K, A, S>,
    shards: Box<[Shard<K>]>,
    per_shard: usize,
    hasher: S,
    clock: SharedClock,
}

/// One lock-striped part of the key space.
type Shard<K> = CachePadded<RwLock<HashTable<Entry<K>>>>;

struct Entry<K> {
    key: K,
    state: AtomicU64,
}

impl<K, A, S> Clone for KeyedRateLimiter<K, A, S> {
    fn clone(&self) -> Self {
        KeyedRateLimiter {
            inner: self.inner.clone(),
        }
    }
}

impl<K, A, S> std::fmt::Debug for KeyedRateLimiter<K, A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("capacity", &(self.inner.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, A: Algorithm> KeyedRateLimiter<K, A, RandomState> {
    /// One `algorithm` state per key, at most about `capacity` keys at once.
    pub fn new(algorithm: A, capacity: usize) -> Self {
        Self::with_hasher(algorithm, capacity, RandomState::new())
    }
}

impl<K, A, S> KeyedRateLimiter<K, A, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    A: Algorithm,
    S: BuildHasher + Clone,
{
    /// Like [`new`](KeyedRateLimiter::new) with a chosen hasher (a faster one for
    /// trusted keys; keep the default `RandomState` for keys clients choose).
    pub fn with_hasher(algorithm: A, capacity: usize, hasher: S) -> Self {
        let shards = (0..SHARDS)
            .map(|_| CachePadded(RwLock::new(HashTable::new())))
            .collect();
        KeyedRateLimiter {
            inner: Arc::new(Inner {
                algorithm,
                overrides: HashMap::with_hasher(hasher.clone()),
                shards,
                per_shard: capacity.div_ceil(SHARDS).max(1),
                hasher,
                clock: SharedClock::system(),
            }),
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut Inner<K, A, S>)) -> Self {
        let mut inner =
            Arc::try_unwrap(self.inner).unwrap_or_else(|_| panic!("configure the limiter before sharing it"));
        f(&mut inner);
        KeyedRateLimiter {
            inner: Arc::new(inner),
        }
    }

    /// Gives `key` its own algorithm (a hot key with a tighter or looser limit).
    /// Call before sharing the limiter.
    pub fn with_override(self, key: K, algorithm: A) -> Self {
        self.rebuild(|inner| {
            inner.overrides.insert(key, algorithm);
        })
    }

    /// The same limiter on another clock. Call before sharing the limiter.
    pub fn with_clock(self, clock: impl crate::Clock) -> Self {
        self.rebuild(|inner| inner.clock = SharedClock::new(clock))
    }

    /// Admits or refuses one request for `key` now.
    #[inline]
    pub fn check(&self, key: &K) -> Result<Allowed, RateLimited> {
        self.check_n_at(key, self.inner.clock.now(), 1)
    }

    /// Admits or refuses a request of `cost` units for `key` at `now`.
    pub fn check_n_at(&self, key: &K, now: Instant, cost: u32) -> Result<Allowed, RateLimited> {
        let inner = &*self.inner;
        let algorithm = self.algorithm_for(key);
        // One hash per decision: it picks the shard (from bits the table does not
        // index with) and finds the entry.
        let hash = inner.hasher.hash_one(key);
        let shard = &inner.shards[(hash >> 32) as usize % SHARDS];
        let eq = |e: &Entry<K>| e.key == *key;
        {
            let table = shard.read().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = table.find(hash, eq) {
                return decide_atomic(&entry.state, algorithm, now, cost);
            }
        }
        // A fresh key: decide first, and store only what is not idle. A refused
        // fresh key (cost above the burst) costs no memory.
        let mut table = shard.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = table.find(hash, eq) {
            return decide_atomic(&entry.state, algorithm, now, cost);
        }
        let fresh = AtomicU64::new(0);
        let decision = decide_atomic(&fresh, algorithm, now, cost);
        let state = fresh.load(Ordering::Relaxed);
        if !algorithm.is_idle(state, now) {
            if table.len() >= inner.per_shard {
                self.make_room(&mut table, now);
            }
            let entry = Entry {
                key: key.clone(),
                state: AtomicU64::new(state),
            };
            table.insert_unique(hash, entry, |e| inner.hasher.hash_one(&e.key));
        }
        decision
    }

    /// The key's override, or the shared algorithm (without hashing when there are
    /// no overrides).
    #[inline]
    fn algorithm_for(&self, key: &K) -> &A {
        let inner = &*self.inner;
        if inner.overrides.is_empty() {
            &inner.algorithm
        } else {
            inner.overrides.get(key).unwrap_or(&inner.algorithm)
        }
    }

    /// Forgets idle keys; if that frees less than an eighth of the shard, forgets the
    /// least busy quarter too.
    fn is_idle(&self, e: &Entry<K>, now: Instant) -> bool {
        self.algorithm_for(&e.key)
            .is_idle(e.state.load(Ordering::Relaxed), now)
    }

    fn pressure(&self, e: &Entry<K>, now: Instant) -> u64 {
        self.algorithm_for(&e.key)
            .pressure(e.state.load(Ordering::Relaxed), now)
    }

    fn make_room(&self, map: &mut HashTable<Entry<K>>, now: Instant) {
        let before = map.len();
        map.retain(|e| !self.is_idle(e, now));
        let per_shard = self.inner.per_shard;
        if map.len() > per_shard - per_shard / 8 {
            let mut pressures: Vec<u64> = map.iter().map(|e| self.pressure(e, now)).collect();
            let quarter = (pressures.len() / 4).max(1);
            let (_, &mut cutoff, _) = pressures.select_nth_unstable(quarter - 1);
            let mut to_forget = quarter;
            map.retain(|e| {
                if to_forget > 0 && self.pressure(e, now) <= cutoff {
                    to_forget -= 1;
                    false
                } else {
                    true
                }
            });
            metrics::counter!("palisade_ratelimit_keys_evicted_total").increment(quarter as u64);
        }
        metrics::counter!("palisade_ratelimit_keys_pruned_total").increment((before - map.len()) as u64);
    }

    /// Forgets every idle key now (never needed for boundedness; useful before
    /// reading [`len`](Self::len)).
    pub fn prune(&self) {
        let now = self.inner.clock.now();
        for shard in self.inner.shards.iter() {
            let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|e| !self.is_idle(e, now));
        }
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys remembered at once.
    pub fn capacity(&self) -> usize {
        self.inner.per_shard * SHARDS
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::ratelimit::Quota;
    use std::time::Duration;

    fn limiter(clock: &ManualClock, capacity: usize) -> KeyedRateLimiter<u64> {
        KeyedRateLimiter::new(Gcra::new(Quota::per_second(1).burst(2)).unwrap(), capacity)
            .with_clock(clock.clone())
    }

    #[test]
    fn idle_keys_are_forgotten_and_busy_ones_kept() {
        let clock = ManualClock::new();
        let l = limiter(&clock, 4096);
        for key in 0..64 {
            l.check(&key).unwrap();
        }
        assert_eq!(l.len(), 64);
        clock.advance(Duration::from_secs(2));
        // Key 1000 is busy (bucket empty) while the others refill.
        l.check(&1000).unwrap();
        l.check(&1000).unwrap();
        l.prune();
        assert_eq!(l.len(), 1);
        assert!(l.check(&1000).is_err(), "a busy key keeps its state");
    }

    #[test]
    fn memory_stays_bounded_when_every_key_is_busy() {
        let clock = ManualClock::new();
        let l = limiter(&clock, 1024);
        for key in 0..100_000 {
            l.check(&key).unwrap();
        }
        assert!(
            l.len() <= l.capacity(),
            "{} keys > capacity {}",
            l.len(),
            l.capacity()
        );
    }

    #[test]
    fn overrides_give_hot_keys_their_own_limit() {
        let clock = ManualClock::new();
        let l = limiter(&clock, 4096).with_override(7, Gcra::new(Quota::per_second(1).burst(5)).unwrap());
        assert_eq!((0..10).filter(|_| l.check(&7).is_ok()).count(), 5);
        assert_eq!((0..10).filter(|_| l.check(&8).is_ok()).count(), 2);
    }
}
