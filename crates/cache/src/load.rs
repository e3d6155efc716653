//! One flight: the L2 lookup, the lease, the loader, and the write-back.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::Inner;
use crate::entry::{self, Entry};
use crate::flight::{Flight, LandOnDrop, LoadError, RetryOnDrop};
use crate::l2::{L2, Lease};

/// What a cache holds: cloned out on hits, encoded for L2.
pub(crate) trait Cacheable: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static> Cacheable for V {}

/// A caller's loader, as the flight carries it: called once, on a task of its own.
pub(crate) trait Loader<V>: Send + 'static {
    type Load: Future<Output = Result<Option<V>, Self::Error>> + Send + 'static;
    type Error: Into<Box<dyn Error + Send + Sync>> + 'static;

    fn call(self) -> Self::Load;
}

impl<V, F, Fut, E> Loader<V> for F
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    E: Into<Box<dyn Error + Send + Sync>> + 'static,
{
    type Load = Fut;
    type Error = E;

    fn call(self) -> Fut {
        self()
    }
}

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

/// How a flight ends.
pub(crate) enum Outcome<V> {
    /// A new or L2 entry: goes into L1 (unless superseded), its value to the waiters.
    Entry(Entry<V>),
    /// An answer not to cache (a stale stand-in, or "absent" without a loader).
    Value(Option<V>),
    Failed(LoadError),
}

/// What L2 decided for a flight.
pub(crate) enum Step<V, F> {
    /// The flight can land now.
    Done(Outcome<V>),
    /// The loader must run; a value it loads is written back against `generation`
    /// (none: Redis was not reached, the value stays in L1), and `token` is the
    /// lease held, if any.
    Load {
        loader: F,
        stale: Option<Entry<V>>,
        generation: Option<String>,
        token: Option<String>,
    },
}

/// A whole flight on a task of its own (an early refresh): L2, then the loader.
pub(crate) async fn fly<V: Cacheable, F: Loader<V>>(
    inner: Arc<Inner<V>>,
    key: Box<str>,
    flight: Arc<Flight<V>>,
    loader: F,
    stale: Entry<V>,
    min_fresh: u64,
) {
    let guard = RetryOnDrop::new(&inner.local.flights, &key, &flight);
    let step = consult_l2(&inner, &key, Some(loader), Some(stale), min_fresh).await;
    guard.disarm();
    if let Some(load) = after_l2(&inner, &key, &flight, step) {
        load.await;
    }
}

/// Lands a flight that L2 decided, or gives back its loader's half to run.
pub(crate) fn after_l2<V: Cacheable, F: Loader<V>>(
    inner: &Arc<Inner<V>>,
    key: &str,
    flight: &Arc<Flight<V>>,
    step: Step<V, F>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    match step {
        Step::Done(outcome) => {
            inner.land(key, flight, outcome);
            None
        }
        Step::Load {
            loader,
            stale,
            generation,
            token,
        } => Some(land_load(
            inner.clone(),
            key.into(),
            flight.clone(),
            loader,
            stale,
            generation,
            token,
        )),
    }
}

/// The loader's half of a flight, on a task of its own so that a caller giving up
/// does not cancel the load the others wait for.
async fn land_load<V: Cacheable, F: Loader<V>>(
    inner: Arc<Inner<V>>,
    key: Box<str>,
    flight: Arc<Flight<V>>,
    loader: F,
    stale: Option<Entry<V>>,
    generation: Option<String>,
    token: Option<String>,
) {
    let guard = LandOnDrop {
        flights: &inner.local.flights,
        key: &key,
        flight: &flight,
    };
    let outcome = load_and_write(&inner, &key, loader, stale, generation, token).await;
    inner.land(&key, &flight, outcome);
    drop(guard);
}

/// Calls the loader, and writes what it loaded to L2 before the flight lands, so
/// that when `get_or_load` returns other instances can read it.
async fn load_and_write<V: Cacheable, F: Loader<V>>(
    inner: &Inner<V>,
    key: &str,
    loader: F,
    stale: Option<Entry<V>>,
    generation: Option<String>,
    token: Option<String>,
) -> Outcome<V> {
    let outcome = inner.load(loader, stale).await;
    if let Some(l2) = &inner.l2 {
        match (&outcome, &generation) {
            (Outcome::Entry(entry), Some(g)) => write_back(inner, l2, key, g, entry, token.as_deref()).await,
            _ => {
                if let Some(t) = &token {
                    let _ = l2.release(key, t).await;
                }
            }
        }
    }
    outcome
}

/// The L2 half of a flight (run by the caller that leads it): a fresh L2 value
/// ends the flight; otherwise the generation to write back against and, with the
/// lease, the lease or another process's value.
pub(crate) async fn consult_l2<V: Cacheable, F: Loader<V>>(
    inner: &Inner<V>,
    key: &str,
    loader: Option<F>,
    mut stale: Option<Entry<V>>,
    min_fresh: u64,
) -> Step<V, F> {
    let load = |loader: Option<F>, stale, generation, token| match loader {
        Some(loader) => Step::Load {
            loader,
            stale,
            generation,
            token,
        },
        None => Step::Done(Outcome::Value(None)),
    };
    let Some(l2) = &inner.l2 else {
        return load(loader, stale, None, None);
    };
    match look_up(inner, l2, key, min_fresh).await {
        Found::Fresh(entry) => return Step::Done(Outcome::Entry(entry)),
        Found::Stale(entry) => {
            if stale.as_ref().is_none_or(|s| s.stale_until < entry.stale_until) {
                stale = Some(entry);
            }
        }
        Found::Missing => {}
        Found::Down => return load(loader, stale, None, None),
    }
    match loader {
        // Boxed: an L2 hit's future stays small without the lease's states.
        Some(loader) => Box::pin(prepare_load(inner, l2, key, loader, stale, min_fresh)).await,
        None => Step::Done(Outcome::Value(None)),
    }
}

/// A miss in L2: the generation to write back against, and with the lease, the
/// lease or another process's value.
async fn prepare_load<V: Cacheable, F: Loader<V>>(
    inner: &Inner<V>,
    l2: &L2,
    key: &str,
    loader: F,
    mut stale: Option<Entry<V>>,
    min_fresh: u64,
) -> Step<V, F> {
    let load = |loader, stale, generation, token| Step::Load {
        loader,
        stale,
        generation,
        token,
    };
    if l2.lease.is_none() {
        let generation = l2.generation(key).await.ok();
        return load(loader, stale, generation, None);
    }
    let token = format!("{:032x}", fastrand::u128(..));
    match l2.lease(key, &token, inner.wall_ms(min_fresh)).await {
        Ok(Lease::Filled(bytes)) => match decode(inner, &bytes) {
            Some(entry) => Step::Done(Outcome::Entry(entry)),
            None => load(loader, stale, l2.generation(key).await.ok(), None),
        },
        Ok(Lease::Held(g)) => load(loader, stale, Some(g), Some(token)),
        Ok(Lease::Busy(g)) => {
            inner.stats.lease_waits();
            let now = inner.now();
            if let Some(s) = stale.take_if(|s| s.is_usable_stale(now)) {
                if !s.is_fresh(now) {
                    inner.stats.stale_served();
                }
                return Step::Done(Outcome::Value(s.value));
            }
            match wait_for_fill(inner, l2, key, min_fresh).await {
                Some(entry) => Step::Done(Outcome::Entry(entry)),
                None => load(loader, stale, Some(g), None),
            }
        }
        Err(_) => load(loader, stale, None, None),
    }
}

/// `GET` and decode.
async fn look_up<V: Cacheable>(inner: &Inner<V>, l2: &L2, key: &str, min_fresh: u64) -> Found<V> {
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

fn decode<V: Cacheable>(inner: &Inner<V>, bytes: &[u8]) -> Option<Entry<V>> {
    match entry::decode(bytes) {
        Ok(decoded) => Some(inner.entry_of(decoded)),
        Err(e) => {
            inner.stats.decode_errors();
            tracing::debug!(cache = %inner.name, error = %e, "cache: an L2 value did not decode; treated as a miss");
            None
        }
    }
}

/// While another process holds the lease: polls L2 for its value, up to the lease's
/// wait (2 ms, doubling to 50 ms between reads).
async fn wait_for_fill<V: Cacheable>(
    inner: &Inner<V>,
    l2: &L2,
    key: &str,
    min_fresh: u64,
) -> Option<Entry<V>> {
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
async fn write_back<V: Cacheable>(
    inner: &Inner<V>,
    l2: &L2,
    key: &str,
    generation: &str,
    entry: &Entry<V>,
    token: Option<&str>,
) {
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

impl<V: Cacheable> Inner<V> {
    /// Lands the flight; an entry goes into L1 first (unless the flight was superseded).
    pub(crate) fn land(&self, key: &str, flight: &Arc<Flight<V>>, outcome: Outcome<V>) {
        let landed = match outcome {
            Outcome::Entry(entry) => {
                let value = entry.value.clone();
                self.fill_l1(key, flight, entry);
                Ok(value)
            }
            Outcome::Value(value) => Ok(value),
            Outcome::Failed(e) => Err(e),
        };
        // Out of the table only once L1 has the entry: a caller arriving in between
        // must find one or the other, never start a second load.
        self.local.flights.land(key, flight, landed);
    }

    fn fill_l1(&self, key: &str, flight: &Flight<V>, entry: Entry<V>) {
        if flight.is_superseded() {
            return;
        }
        self.local
            .l1
            .insert(key.to_owned(), self.for_l1(entry, self.now()));
        // An invalidation between the check and the insert marked the flight before
        // removing the key: seen here, the insert is taken back.
        if flight.is_superseded() {
            self.local.l1.remove(key);
        }
    }

    /// Calls the loader: a new entry, a stale stand-in for a failure, or the failure.
    async fn load<F: Loader<V>>(&self, loader: F, stale: Option<Entry<V>>) -> Outcome<V> {
        let started = self.now();
        let result = loader.call().await;
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
