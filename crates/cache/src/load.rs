//! One flight: the L2 lookup, the lease, the loader, and the write-back.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::Inner;
use crate::entry::{self, Entry};
use crate::flight::{Flight, LandOnDrop, LoadError};
use crate::l2::{L2, Lease};

/// What L2 said about a key.
enum Found<V> {
    /// A value fresher than the flight needs.
    Fresh(Entry<V>),
    /// A value only good as a stale stand-in.
    Stale(Entry<V>),
    Missing,
    /// Redis did not answer (or its breaker is open): go on without it.
    Down,
}

/// Runs the flight for `key` and lands it. `min_fresh`: an L2 value must be fresh
/// past this time to count (now, or for an early refresh the current entry's expiry).
pub(crate) async fn fly<V, F, Fut, E>(
    inner: Arc<Inner<V>>,
    key: Box<str>,
    flight: Arc<Flight<V>>,
    loader: Option<F>,
    stale: Option<Entry<V>>,
    min_fresh: u64,
) where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    E: Into<Box<dyn Error + Send + Sync>> + 'static,
{
    let guard = LandOnDrop {
        flights: &inner.local.flights,
        key: &key,
        flight: &flight,
    };
    match run(&inner, &key, loader, stale, min_fresh).await {
        Outcome::Entry(entry) => inner.land_entry(&key, &flight, entry),
        Outcome::Value(value) => inner.local.flights.land(&key, &flight, Ok(value)),
        Outcome::Failed(e) => inner.local.flights.land(&key, &flight, Err(e)),
    }
    drop(guard);
}

/// How a flight ends.
enum Outcome<V> {
    /// A new or L2 entry: goes into L1 (unless superseded), its value to the waiters.
    Entry(Entry<V>),
    /// An answer not to cache (a stale stand-in, or "absent" without a loader).
    Value(Option<V>),
    Failed(LoadError),
}

/// The flight's work; a loaded value is written to L2 before the flight lands, so
/// that when `get_or_load` returns, other instances can read it.
async fn run<V, F, Fut, E>(
    inner: &Inner<V>,
    key: &str,
    loader: Option<F>,
    mut stale: Option<Entry<V>>,
    min_fresh: u64,
) -> Outcome<V>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    E: Into<Box<dyn Error + Send + Sync>> + 'static,
{
    let Some(l2) = &inner.l2 else {
        return inner.load(loader, stale).await;
    };
    match look_up(inner, l2, key, min_fresh).await {
        Found::Fresh(entry) => return Outcome::Entry(entry),
        Found::Stale(entry) => {
            if stale.as_ref().is_none_or(|s| s.stale_until < entry.stale_until) {
                stale = Some(entry);
            }
        }
        Found::Missing => {}
        Found::Down => return inner.load(loader, stale).await,
    }
    if loader.is_none() {
        return Outcome::Value(None);
    }
    let mut generation = None;
    let mut token = None;
    if l2.lease.is_some() {
        let t = format!("{:032x}", fastrand::u128(..));
        match l2.lease(key, &t, inner.wall_ms(min_fresh)).await {
            Ok(Lease::Filled(bytes)) => match decode(inner, &bytes) {
                Some(entry) => return Outcome::Entry(entry),
                None => generation = l2.generation(key).await.ok(),
            },
            Ok(Lease::Held(g)) => {
                generation = Some(g);
                token = Some(t);
            }
            Ok(Lease::Busy(g)) => {
                inner.stats.lease_waits();
                let now = inner.now();
                if let Some(s) = stale.take_if(|s| s.is_usable_stale(now)) {
                    if !s.is_fresh(now) {
                        inner.stats.stale_served();
                    }
                    return Outcome::Value(s.value);
                }
                if let Some(entry) = wait_for_fill(inner, l2, key, min_fresh).await {
                    return Outcome::Entry(entry);
                }
                generation = Some(g);
            }
            Err(_) => {}
        }
    } else {
        generation = l2.generation(key).await.ok();
    }
    let outcome = inner.load(loader, stale).await;
    match (&outcome, &generation) {
        (Outcome::Entry(entry), Some(g)) => write_back(inner, l2, key, g, entry, token.as_deref()).await,
        _ => {
            if let Some(t) = &token {
                let _ = l2.release(key, t).await;
            }
        }
    }
    outcome
}

/// `GET` and decode.
async fn look_up<V>(inner: &Inner<V>, l2: &L2, key: &str, min_fresh: u64) -> Found<V>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    match l2.get(key).await {
        Ok(Some(bytes)) => match decode(inner, &bytes) {
            Some(entry) if entry.fresh_until > min_fresh => {
                inner.stats.l2_hits();
                Found::Fresh(entry)
            }
            Some(entry) => Found::Stale(entry),
            None => Found::Missing,
        },
        Ok(None) => Found::Missing,
        Err(_) => Found::Down,
    }
}

fn decode<V>(inner: &Inner<V>, bytes: &[u8]) -> Option<Entry<V>>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    match entry::decode(bytes) {
        Ok(decoded) => Some(inner.entry_of(decoded, inner.now())),
        Err(e) => {
            inner.stats.decode_errors();
            tracing::debug!(cache = %inner.name, error = %e, "cache: an L2 value did not decode; treated as a miss");
            None
        }
    }
}

/// While another process holds the lease: polls L2 for its value, up to the lease's
/// wait (2 ms, doubling to 50 ms between reads).
async fn wait_for_fill<V>(inner: &Inner<V>, l2: &L2, key: &str, min_fresh: u64) -> Option<Entry<V>>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let wait = l2.lease.map_or(Duration::ZERO, |l| l.wait);
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(2);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
        pause = (pause * 2).min(Duration::from_millis(50));
        match look_up(inner, l2, key, min_fresh).await {
            Found::Fresh(entry) => return Some(entry),
            Found::Down => return None,
            Found::Stale(_) | Found::Missing => {}
        }
    }
    None
}

/// Writes a loaded entry to L2 if no invalidation came since the load began.
async fn write_back<V>(
    inner: &Inner<V>,
    l2: &L2,
    key: &str,
    generation: &str,
    entry: &Entry<V>,
    token: Option<&str>,
) where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let blob = match inner.encode(entry) {
        Ok(blob) => blob,
        Err(e) => {
            tracing::warn!(cache = %inner.name, error = %e, "cache: a loaded value did not encode; kept in L1 only");
            if let Some(t) = token {
                let _ = l2.release(key, t).await;
            }
            return;
        }
    };
    let ttl = inner.l2_ttl_ms(entry, inner.now());
    let _ = l2.fill(key, generation, blob, ttl, token).await;
}

impl<V> Inner<V>
where
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Puts `entry` in L1 (unless the flight was superseded) and lands the flight.
    fn land_entry(&self, key: &str, flight: &Arc<Flight<V>>, entry: Entry<V>) {
        let value = entry.value.clone();
        self.fill_l1(key, flight, entry);
        self.local.flights.land(key, flight, Ok(value));
    }

    fn fill_l1(&self, key: &str, flight: &Flight<V>, entry: Entry<V>) {
        if flight.is_superseded() {
            return;
        }
        self.local.l1.insert(key.to_owned(), entry);
        // An invalidation between the check and the insert marked the flight before
        // removing the key: seen here, the insert is taken back.
        if flight.is_superseded() {
            self.local.l1.remove(key);
        }
    }

    /// Calls the loader: a new entry, a stale stand-in for a failure, or the failure.
    async fn load<F, Fut, E>(&self, loader: Option<F>, stale: Option<Entry<V>>) -> Outcome<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn Error + Send + Sync>> + 'static,
    {
        let Some(loader) = loader else {
            return Outcome::Value(None);
        };
        let started = self.now();
        let result = loader().await;
        let now = self.now();
        match result {
            Ok(value) => {
                if value.is_some() {
                    self.stats.loads();
                } else {
                    self.stats.loads_absent();
                }
                Outcome::Entry(self.new_entry(value, now - started, now))
            }
            Err(e) => {
                self.stats.load_errors();
                match stale.filter(|s| s.is_usable_stale(now)) {
                    Some(s) => {
                        self.stats.stale_served();
                        Outcome::Value(s.value)
                    }
                    None => Outcome::Failed(Arc::from(e.into())),
                }
            }
        }
    }
}
