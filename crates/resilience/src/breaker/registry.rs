use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt::Display;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{BreakerConfig, CircuitBreaker, ConfigErrors, Listener, State, StateChange};
use crate::clock::{SharedClock, duration_nanos};
use crate::sync::{AtomicU64, Ordering};

const SHARDS: usize = 16;
/// `last_used` is refreshed at most this often, so lookups stay read-only.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

struct Entry {
    breaker: CircuitBreaker,
    last_used: AtomicU64,
}

/// One breaker per key: per endpoint or per route, never one for a whole service
/// (one shared breaker would let one bad instance open it for all), with memory bounded by `capacity`.
///
/// When a shard is full, the least recently used breakers are evicted, closed ones
/// before open ones (an open breaker carries knowledge worth keeping). A later
/// lookup of an evicted key starts a fresh, closed breaker.
///
/// ```
/// use palisade_resilience::breaker::{BreakerConfig, BreakerRegistry};
///
/// let registry = BreakerRegistry::new("upstream", BreakerConfig::default(), 10_000).unwrap();
/// let a = registry.get(&"10.0.0.1:80");
/// let b = registry.get(&"10.0.0.2:80");
/// assert_ne!(a.name(), b.name());
/// assert_eq!(registry.len(), 2);
/// ```
pub struct BreakerRegistry<K> {
    prefix: Arc<str>,
    config: BreakerConfig,
    clock: SharedClock,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<K, Entry>>]>,
    listeners: RwLock<Vec<Listener>>,
}

impl<K> std::fmt::Debug for BreakerRegistry<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("prefix", &self.prefix)
            .field("capacity", &(self.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Display> BreakerRegistry<K> {
    /// A registry whose breakers are named `prefix/key`, built from `config`,
    /// holding at most about `capacity` breakers.
    pub fn new(
        prefix: impl Into<Arc<str>>,
        config: BreakerConfig,
        capacity: usize,
    ) -> Result<Self, ConfigErrors> {
        Self::with_clock(prefix, config, capacity, SharedClock::system())
    }

    /// Like [`new`](Self::new), with a clock shared by every breaker.
    pub fn with_clock(
        prefix: impl Into<Arc<str>>,
        config: BreakerConfig,
        capacity: usize,
        clock: SharedClock,
    ) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(BreakerRegistry {
            prefix: prefix.into(),
            config,
            clock,
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            listeners: RwLock::new(Vec::new()),
        })
    }

    /// The breaker for `key`, created on first use.
    pub fn get(&self, key: &K) -> CircuitBreaker {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let now = self.clock.now().as_nanos();
        if let Some(entry) = read(shard).get(key) {
            touch(entry, now);
            return entry.breaker.clone();
        }
        let mut map = write(shard);
        if let Some(entry) = map.get(key) {
            return entry.breaker.clone();
        }
        if map.len() >= self.per_shard {
            evict(&mut map);
        }
        let breaker = self.make(key);
        map.insert(
            key.clone(),
            Entry {
                breaker: breaker.clone(),
                last_used: AtomicU64::new(now),
            },
        );
        breaker
    }

    /// The breaker for `key` if one exists; creates nothing.
    pub fn peek(&self, key: &K) -> Option<CircuitBreaker> {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        read(shard).get(key).map(|e| e.breaker.clone())
    }

    /// Drops the breaker for `key` (e.g. an endpoint left discovery).
    pub fn remove(&self, key: &K) -> Option<CircuitBreaker> {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        write(shard).remove(key).map(|e| e.breaker)
    }

    /// Breakers held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    /// True when no breaker is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key with its breaker's state.
    pub fn states(&self) -> Vec<(K, State)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(read(shard).iter().map(|(k, e)| (k.clone(), e.breaker.state())));
        }
        out
    }

    /// Subscribes to state changes of every breaker, present and future.
    pub fn on_state_change(&self, listener: impl Fn(&StateChange) + Send + Sync + 'static) {
        let listener: Listener = Arc::new(listener);
        for shard in self.shards.iter() {
            for entry in read(shard).values() {
                let l = listener.clone();
                entry.breaker.on_state_change(move |c| l(c));
            }
        }
        self.listeners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(listener);
    }

    fn make(&self, key: &K) -> CircuitBreaker {
        let breaker = CircuitBreaker::builder(format!("{}/{}", self.prefix, key))
            .config(self.config.clone())
            .shared_clock(self.clock.clone())
            .build()
            .expect("config validated when the registry was built");
        for listener in self
            .listeners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let l = listener.clone();
            breaker.on_state_change(move |c| l(c));
        }
        breaker
    }
}

fn touch(entry: &Entry, now: u64) {
    let last = entry.last_used.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= duration_nanos(TOUCH_EVERY) {
        entry.last_used.store(now, Ordering::Relaxed);
    }
}

/// Evicts a quarter of a full shard: closed breakers first, least recently used first.
fn evict<K: Hash + Eq + Clone>(map: &mut HashMap<K, Entry>) {
    let mut order: Vec<(bool, u64, K)> = map
        .iter()
        .map(|(k, e)| {
            let busy = e.breaker.state() != State::Closed;
            (busy, e.last_used.load(Ordering::Relaxed), k.clone())
        })
        .collect();
    order.sort_unstable_by_key(|(busy, last, _)| (*busy, *last));
    let n = (map.len() / 4).max(1);
    for (_, _, k) in order.into_iter().take(n) {
        map.remove(&k);
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn registry(capacity: usize, clock: &ManualClock) -> BreakerRegistry<u32> {
        let config = BreakerConfig::empty().consecutive_failures(1);
        BreakerRegistry::with_clock("ep", config, capacity, SharedClock::new(clock.clone())).unwrap()
    }

    #[test]
    fn one_breaker_per_key_shared_between_lookups() {
        let r = registry(100, &ManualClock::new());
        r.get(&1).try_acquire().unwrap().failure();
        assert_eq!(r.get(&1).state(), State::Open);
        assert_eq!(r.get(&2).state(), State::Closed, "another endpoint is unaffected");
        assert_eq!(r.get(&1).name(), "ep/1");
    }

    #[test]
    fn memory_stays_bounded_and_open_breakers_are_kept() {
        let clock = ManualClock::new();
        let r = registry(64, &clock);
        r.get(&0).try_acquire().unwrap().failure(); // open: worth keeping
        for key in 1..100_000 {
            clock.advance(Duration::from_secs(1));
            r.get(&key);
        }
        assert!(r.len() <= 64, "{} breakers held", r.len());
        assert_eq!(
            r.peek(&0).map(|b| b.state()),
            Some(State::Open),
            "the open breaker survived"
        );
        assert!(r.peek(&1).is_none(), "an old closed breaker was evicted");
        assert!(r.peek(&99_999).is_some(), "the newest is held");
    }

    #[test]
    fn registry_listeners_reach_breakers_made_later() {
        let r = registry(10, &ManualClock::new());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        r.on_state_change(move |c| s.lock().unwrap().push(c.breaker.to_string()));
        r.get(&7).try_acquire().unwrap().failure();
        assert_eq!(*seen.lock().unwrap(), ["ep/7"]);
    }
}
