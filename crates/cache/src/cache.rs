//! The cache: L1, L2 and the loader behind one `get_or_load`.

use std::error::Error;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_core::{ConfigError, ConfigErrors, SharedClock, clock::duration_nanos};
use palisade_resilience::breaker::CircuitBreaker;
use redis::{PushInfo, PushKind, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::builder::{CacheBuilder, KeyFilter, Settings};
use crate::entry::{self, Decoded, Entry};
use crate::flight::{Flights, LoadError, RetryOnDrop};
use crate::l1::{self, L1};
use crate::l2::{L2, L2Error, millis};
use crate::load::{self, Cacheable, Loader};
use crate::stats::{CacheStats, Stats};

/// What a cache call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The loader failed and no stale value could stand in. Every caller that
    /// waited on the same load gets the same error (downcast it to the loader's).
    #[error("the loader failed: {0}")]
    Load(LoadError),
    /// The value could not be encoded for L2.
    #[error("the value could not be encoded: {0}")]
    Encode(#[from] postcard::Error),
    /// Redis could not be told: this instance applied the change, the others (and
    /// L2) did not. They catch up when their entries expire.
    #[error("Redis could not be reached; the change applies to this instance only: {0}")]
    Unavailable(String),
}

/// A two-level cache of `V` by string key: an in-process L1 in front of an optional
/// Redis L2 in front of the caller's loader.
///
/// Cheap to clone: clones share everything. See the crate documentation for what it
/// guards against and how.
pub struct Cache<V> {
    pub(crate) inner: Arc<Inner<V>>,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<V: Clone> std::fmt::Debug for Cache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("l1_entries", &self.inner.local.l1.len())
            .field("redis", &self.inner.l2.is_some())
            .finish()
    }
}

/// The future [`Cache::get_or_load`] returns: ready at once on an L1 hit.
#[must_use = "futures do nothing unless polled"]
pub struct Lookup<'a, V>(LookupState<'a, V>);

enum LookupState<'a, V> {
    Ready(Option<Option<V>>),
    Pending(Pin<Box<dyn Future<Output = Result<Option<V>, CacheError>> + Send + 'a>>),
}

// No state is pinned structurally: the ready value is moved out, never pinned, and
// the pending future is pinned in its own box.
impl<V> Unpin for Lookup<'_, V> {}

impl<V> Future for Lookup<'_, V> {
    type Output = Result<Option<V>, CacheError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.0 {
            LookupState::Ready(value) => match value.take() {
                Some(value) => Poll::Ready(Ok(value)),
                None => panic!("Lookup polled after it completed"),
            },
            LookupState::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl<V> std::fmt::Debug for Lookup<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            LookupState::Ready(_) => "Lookup(ready)",
            LookupState::Pending(_) => "Lookup(pending)",
        })
    }
}

/// What L1 said.
enum Probe<V, F> {
    /// Answered (a fresh entry, or a key the filter refuses).
    Hit(Option<V>),
    /// L2 and the loader must answer; `stale` may stand in if they fail.
    Miss {
        loader: Option<F>,
        stale: Option<Entry<V>>,
        now: u64,
    },
}

/// What the Redis connection's push handler needs: the L1 and the flights.
pub(crate) struct Local<V> {
    pub l1: L1<V>,
    pub flights: Flights<V>,
    pub stats: Arc<Stats>,
    /// Prefix of this instance's invalidation messages (`<id>:`).
    pub origin: String,
}

impl<V: Clone> Local<V> {
    /// Drops `key` here; a load of it already out must not put its value back.
    pub fn forget(&self, key: &str) {
        // Superseded first: a load landing between the two sees the mark after its
        // insert and takes the insert out again.
        self.flights.supersede(key);
        self.l1.remove(key);
    }

    /// Drops every entry: invalidations may have been missed.
    pub fn forget_all(&self) {
        self.flights.supersede_all();
        self.l1.clear();
    }

    /// Handles one push from the Redis connection.
    fn on_push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(message)) = push.data.get(1) else {
                    return;
                };
                let Ok(message) = std::str::from_utf8(message) else {
                    return;
                };
                if message.starts_with(&self.origin) {
                    return;
                }
                if let Some((_, key)) = message.split_once(':') {
                    self.forget(key);
                    // Counted once done: whoever sees the count sees the key gone.
                    self.stats.remote_invalidations();
                }
            }
            // Invalidations sent while the connection is down are lost; L1 goes on
            // serving through the outage (bounded by its TTL) and is dropped when
            // Redis answers again (see `L2::guarded`).
            PushKind::Disconnection => self.stats.disconnections(),
            _ => {}
        }
    }
}

pub(crate) struct Inner<V> {
    pub name: String,
    pub local: Arc<Local<V>>,
    pub l2: Option<L2>,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub jitter: f64,
    pub l1_ttl: Option<u64>,
    pub grace: u64,
    pub early_refresh: Option<f64>,
    pub filter: Option<KeyFilter>,
    pub clock: SharedClock,
    /// The clock's reading and the wall clock (ms since the epoch) at build time.
    wall_base: (u64, u64),
    pub stats: Arc<Stats>,
}

impl<V> Cache<V>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts building a cache named `name` (it labels metrics and, by default,
    /// prefixes its Redis keys).
    pub fn builder(name: impl Into<String>) -> CacheBuilder<V> {
        CacheBuilder::new(name.into())
    }

    pub(crate) fn from_builder(builder: CacheBuilder<V>) -> Result<Self, ConfigErrors> {
        let Settings {
            ttl,
            negative_ttl,
            jitter,
            l1_ttl,
            stale_if_error,
            early_refresh,
            max_weight,
            estimated_items,
            weigh,
            filter,
            redis,
            clock,
        } = builder.settings;
        let name = builder.name;
        let stats = Arc::new(Stats::new(&name));
        let local = Arc::new(Local {
            l1: l1::new(max_weight, estimated_items, weigh, stats.clone()),
            flights: Flights::new(),
            stats: stats.clone(),
            origin: format!("{:016x}:", fastrand::u64(..)),
        });
        let l2 = match &redis {
            Some(options) => {
                let weak: Weak<Local<V>> = Arc::downgrade(&local);
                let on_push = move |push: PushInfo| -> Result<(), ()> {
                    if let Some(local) = weak.upgrade() {
                        local.on_push(&push);
                    }
                    Ok(())
                };
                let weak: Weak<Local<V>> = Arc::downgrade(&local);
                let on_reconnect = move || {
                    if let Some(local) = weak.upgrade() {
                        local.forget_all();
                    }
                };
                let l2 = L2::new(
                    &name,
                    options,
                    clock.clone(),
                    stats.clone(),
                    on_push,
                    on_reconnect,
                )
                .map_err(|e| ConfigErrors(vec![ConfigError::new("redis.url", e.to_string())]))?;
                Some(l2)
            }
            None => None,
        };
        let wall_now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis);
        let inner = Arc::new(Inner {
            wall_base: (clock.now().as_nanos(), wall_now),
            name,
            local,
            l2,
            ttl,
            negative_ttl,
            jitter,
            l1_ttl: l1_ttl.map(duration_nanos),
            grace: duration_nanos(stale_if_error),
            early_refresh,
            filter,
            clock,
            stats,
        });
        if inner.l2.is_some() {
            tokio::spawn(subscribe(Arc::downgrade(&inner)));
        }
        Ok(Cache { inner })
    }

    /// The value for `key`: from L1, else from L2, else from `loader` (whose result
    /// is written back to both levels). `Ok(None)` is an absence the loader
    /// confirmed (or the key filter refused); it is cached for the negative TTL.
    ///
    /// Concurrent misses of one key in this process share one L2 lookup and one
    /// loader call; with a lease, processes share one loader call too. The loader
    /// runs on a task of its own, so a caller that gives up does not cancel the load
    /// the others wait for.
    ///
    /// When the loader fails, a value expired less than `stale_if_error` ago is
    /// served instead; otherwise every waiting caller gets [`CacheError::Load`].
    pub fn get_or_load<'a, F, Fut, E>(&'a self, key: &'a str, loader: F) -> Lookup<'a, V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn Error + Send + Sync>> + 'static,
    {
        // L1 is read when the call is made: a hit is a ready future of a few words;
        // only a miss builds (and boxes) the suspended lookup.
        match self.probe(key, Some(loader)) {
            Probe::Hit(value) => Lookup(LookupState::Ready(Some(value))),
            Probe::Miss { loader, stale, now } => {
                Lookup(LookupState::Pending(Box::pin(self.miss(key, loader, stale, now))))
            }
        }
    }

    /// The value for `key` from L1 or L2, without loading it. `None` when neither
    /// has it (or has it as a confirmed absence).
    pub async fn get(&self, key: &str) -> Option<V> {
        type NoLoader<V> = fn() -> std::future::Ready<Result<Option<V>, std::convert::Infallible>>;
        match self.probe(key, None::<NoLoader<V>>) {
            Probe::Hit(value) => value,
            Probe::Miss { loader, stale, now } => self.miss(key, loader, stale, now).await.ok().flatten(),
        }
    }

    /// The key filter and L1.
    #[inline]
    fn probe<F: Loader<V>>(&self, key: &str, loader: Option<F>) -> Probe<V, F> {
        let inner = &*self.inner;
        if let Some(filter) = &inner.filter
            && !filter(key)
        {
            inner.stats.filtered();
            return Probe::Hit(None);
        }
        let now = inner.now();
        let mut stale = None;
        if let Some(entry) = inner.local.l1.get(key) {
            if entry.is_fresh(now) {
                inner.stats.l1_hit();
                if entry.fresh_until - now < entry.refresh_window
                    && let Some(loader) = loader
                {
                    self.maybe_refresh(key, &entry, now, loader);
                }
                return Probe::Hit(entry.value);
            }
            if entry.is_usable_stale(now) {
                stale = Some(entry);
            }
        }
        Probe::Miss { loader, stale, now }
    }

    /// L2 and the loader, in a flight shared with the other callers missing `key`.
    async fn miss<F: Loader<V>>(
        &self,
        key: &str,
        loader: Option<F>,
        stale: Option<Entry<V>>,
        now: u64,
    ) -> Result<Option<V>, CacheError> {
        let inner = &*self.inner;
        inner.stats.misses();
        let (mut loader, mut stale) = (loader, stale);
        loop {
            let (flight, lead) = inner.local.flights.join(key);
            if lead {
                // The L2 half runs here (no task to hand it to, no thread to wake);
                // the loader gets a task of its own.
                let guard = RetryOnDrop::new(&inner.local.flights, key, &flight);
                let step = load::consult_l2(inner, key, loader.take(), stale.take(), now).await;
                guard.disarm();
                if let Some(load) = load::after_l2(&self.inner, key, &flight, step) {
                    tokio::spawn(load);
                }
            } else {
                inner.stats.coalesced();
            }
            if let Some(landed) = flight.wait().await {
                return landed.map_err(CacheError::Load);
            }
        }
    }

    /// XFetch: refreshes in the background with probability growing as expiry nears.
    #[cold]
    fn maybe_refresh<F: Loader<V>>(&self, key: &str, entry: &Entry<V>, now: u64, loader: F) {
        let beta = self.inner.early_refresh.unwrap_or(0.0);
        // -ln(u) for u uniform in (0, 1]: exponentially distributed, mean 1.
        let draw = -(1.0 - fastrand::f64()).ln();
        let ahead = entry.load_nanos as f64 * beta * draw;
        if (now as f64) + ahead < entry.fresh_until as f64 {
            return;
        }
        if let Some(flight) = self.inner.local.flights.start(key) {
            self.inner.stats.early_refreshes();
            tokio::spawn(load::fly(
                self.inner.clone(),
                key.into(),
                flight,
                loader,
                entry.clone(),
                entry.fresh_until,
            ));
        }
    }

    /// Puts `value` in both levels and tells the other instances to drop their copy;
    /// a load of `key` already out cannot overwrite it.
    pub async fn set(&self, key: &str, value: V) -> Result<(), CacheError> {
        let now = self.inner.now();
        let entry = self.inner.new_entry(Some(value), 0, now);
        self.store(key, entry, now).await
    }

    /// Like [`set`](Self::set), fresh for exactly `ttl` (no jitter), for values whose
    /// lifetime their source decides (an HTTP answer's `max-age`). This instance's
    /// L1 has the value when the call returns; the future writes L2 and tells the
    /// other instances (it owns what it needs, so it can be spawned).
    pub fn set_for(
        &self,
        key: &str,
        value: V,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static {
        let now = self.inner.now();
        let fresh_until = now.saturating_add(duration_nanos(ttl).max(1));
        let entry = Entry {
            value: Some(value),
            fresh_until,
            stale_until: fresh_until.saturating_add(self.inner.grace),
            refresh_window: 0,
            load_nanos: 0,
        };
        let change = self.store_local(key, entry, now);
        let (inner, key) = (self.inner.clone(), key.to_owned());
        async move {
            if let Some((blob, ttl)) = change? {
                inner.tell_l2(&key, blob, ttl).await?;
            }
            Ok(())
        }
    }

    async fn store(&self, key: &str, entry: Entry<V>, now: u64) -> Result<(), CacheError> {
        if let Some((blob, ttl)) = self.store_local(key, entry, now)? {
            self.inner.tell_l2(key, blob, ttl).await?;
        }
        Ok(())
    }

    /// Puts `entry` in L1 now; the L2 encoding and TTL to write, if there is an L2.
    fn store_local(
        &self,
        key: &str,
        entry: Entry<V>,
        now: u64,
    ) -> Result<Option<(Vec<u8>, u64)>, CacheError> {
        let inner = &*self.inner;
        inner.local.forget(key);
        let blob = match &inner.l2 {
            Some(_) => Some((inner.encode(&entry)?, inner.l2_ttl_ms(&entry, now))),
            None => None,
        };
        inner.local.l1.insert(key.to_owned(), inner.for_l1(entry, now));
        Ok(blob)
    }

    /// Drops `key` from both levels, and from every other instance's L1; a load of it
    /// already out (here or elsewhere) cannot put the old value back.
    pub async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        let inner = &*self.inner;
        inner.local.forget(key);
        if let Some(l2) = &inner.l2 {
            l2.change(key, None, 1, &inner.message(key))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Counts of this cache's events (L1 hits are counted in Prometheus only).
    pub fn stats(&self) -> CacheStats {
        self.inner.stats.snapshot()
    }

    /// The circuit breaker in front of Redis, when there is one.
    pub fn redis_breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.l2.as_ref().map(|l2| l2.breaker())
    }

    /// How many entries L1 holds (including expired ones not yet replaced).
    pub fn l1_len(&self) -> usize {
        self.inner.local.l1.len()
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

fn unavailable(e: L2Error) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

/// Subscribes to the invalidation channel, trying again while Redis is away.
async fn subscribe<V: Clone>(inner: Weak<Inner<V>>) {
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(cache) = inner.upgrade() else { return };
        let Some(l2) = &cache.l2 else { return };
        match l2.subscribe().await {
            Ok(()) => return,
            Err(e) => tracing::debug!(cache = %cache.name, error = %e, "cache: subscribing to invalidations"),
        }
        drop(cache);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

impl<V: Cacheable> Inner<V> {
    /// The cache clock's reading, in nanoseconds.
    #[inline]
    pub fn now(&self) -> u64 {
        self.clock.now().as_nanos()
    }

    /// A clock reading as wall-clock milliseconds since the epoch.
    pub fn wall_ms(&self, nanos: u64) -> u64 {
        let (base, wall) = self.wall_base;
        let delta = (i128::from(nanos) - i128::from(base)) / 1_000_000;
        u64::try_from(i128::from(wall) + delta).unwrap_or(0)
    }

    /// Wall-clock milliseconds as a clock reading.
    pub fn clock_of_wall_ms(&self, ms: u64) -> u64 {
        let (base, wall) = self.wall_base;
        let delta = (i128::from(ms) - i128::from(wall)) * 1_000_000;
        u64::try_from((i128::from(base) + delta).max(0)).unwrap_or(u64::MAX)
    }

    /// A new entry for a value just loaded (or set) at `now`.
    pub fn new_entry(&self, value: Option<V>, load_nanos: u64, now: u64) -> Entry<V> {
        let base = if value.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        let factor = 1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0);
        let ttl = (duration_nanos(base) as f64 * factor) as u64;
        let fresh_until = now.saturating_add(ttl.max(1));
        Entry {
            refresh_window: self.refresh_window(load_nanos),
            value,
            fresh_until,
            stale_until: fresh_until.saturating_add(self.grace),
            load_nanos,
        }
    }

    /// How close to expiry a hit starts rolling the early-refresh dice: beyond eight
    /// times the expected head start, the chance is below one in three thousand.
    fn refresh_window(&self, load_nanos: u64) -> u64 {
        match self.early_refresh {
            Some(beta) if load_nanos > 0 => (load_nanos as f64 * beta * 8.0) as u64,
            _ => 0,
        }
    }

    /// `entry` as L1 keeps it: fresh no longer than the L1 TTL from `now`.
    pub fn for_l1(&self, mut entry: Entry<V>, now: u64) -> Entry<V> {
        if let Some(t) = self.l1_ttl {
            entry.fresh_until = entry.fresh_until.min(now.saturating_add(t));
        }
        entry
    }

    /// An entry read from L2.
    pub fn entry_of(&self, d: Decoded<V>) -> Entry<V> {
        let fresh_until = self.clock_of_wall_ms(d.fresh_until_ms);
        let load_nanos = u64::from(d.load_ms) * 1_000_000;
        Entry {
            value: d.value,
            fresh_until,
            stale_until: fresh_until.saturating_add(self.grace),
            refresh_window: self.refresh_window(load_nanos),
            load_nanos,
        }
    }

    /// The L2 encoding of `entry`.
    pub fn encode(&self, entry: &Entry<V>) -> Result<Vec<u8>, postcard::Error> {
        let load_ms = u32::try_from(entry.load_nanos / 1_000_000).unwrap_or(u32::MAX);
        entry::encode(entry.value.as_ref(), self.wall_ms(entry.fresh_until), load_ms)
    }

    /// How long Redis keeps `entry`: its freshness plus the stale-if-error grace.
    pub fn l2_ttl_ms(&self, entry: &Entry<V>, now: u64) -> u64 {
        (entry.stale_until.saturating_sub(now) / 1_000_000).max(1)
    }

    /// Replaces `key`'s value in L2 and tells the other instances.
    async fn tell_l2(&self, key: &str, blob: Vec<u8>, ttl_ms: u64) -> Result<(), CacheError> {
        match &self.l2 {
            Some(l2) => l2
                .change(key, Some(blob), ttl_ms, &self.message(key))
                .await
                .map_err(unavailable),
            None => Ok(()),
        }
    }

    /// The invalidation message for `key`.
    fn message(&self, key: &str) -> String {
        format!("{}{key}", self.local.origin)
    }
}
