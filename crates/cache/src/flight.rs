//! Single-flight: concurrent misses of one key share one load.
//!
//! The first caller to miss a key starts a flight (the L2 lookup and, if that misses,
//! the loader); later callers for the same key wait for its result instead of
//! loading again. A flight ends by writing its result once and waking every waiter.
//!
//! An invalidation or a `set` while a flight is out *supersedes* it: the flight is
//! taken out of the table at once (so later callers start a fresh load, never
//! joining the old one) and, when it lands, it must not write its now-old value into
//! L1. Its own waiters still get it: they asked before the invalidation.

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;

/// A load failure, shared by every caller that waited on the flight.
pub type LoadError = Arc<dyn Error + Send + Sync + 'static>;

/// What a flight produced: a value, a confirmed absence, or the loader's failure.
pub(crate) type Landed<V> = Result<Option<V>, LoadError>;

/// One load in progress.
pub(crate) struct Flight<V> {
    /// `None`: its leader gave up before handing the load to a task; try again.
    landed: OnceLock<Option<Landed<V>>>,
    notify: Notify,
    superseded: AtomicBool,
}

impl<V: Clone> Flight<V> {
    fn new() -> Arc<Self> {
        Arc::new(Flight {
            landed: OnceLock::new(),
            notify: Notify::new(),
            superseded: AtomicBool::new(false),
        })
    }

    /// Waits for the flight to land; `None` if its leader gave up (join again).
    pub async fn wait(&self) -> Option<Landed<V>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a landing between the two still wakes us.
            notified.as_mut().enable();
            if let Some(landed) = self.landed.get() {
                return landed.clone();
            }
            notified.await;
        }
    }

    /// Whether an invalidation came while it was out: its result must not be cached.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }
}

/// The flights in progress, by key.
type Table<V> = HashMap<Box<str>, Arc<Flight<V>>, quick_cache::DefaultHashBuilder>;

pub(crate) struct Flights<V> {
    table: Mutex<Table<V>>,
}

impl<V: Clone> Flights<V> {
    pub fn new() -> Self {
        Flights {
            table: Mutex::new(HashMap::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table<V>> {
        // A panic while the lock is held cannot leave the map half-changed: every
        // critical section is a single insert, lookup or removal.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins the flight for `key`, or starts one. `true` means the caller leads it:
    /// it must run the load and [`land`](Self::land) it.
    pub fn join(&self, key: &str) -> (Arc<Flight<V>>, bool) {
        let mut table = self.table();
        if let Some(flight) = table.get(key) {
            return (flight.clone(), false);
        }
        let flight = Flight::new();
        table.insert(key.into(), flight.clone());
        (flight, true)
    }

    /// Starts a flight for `key` only if none is out (for a background refresh).
    pub fn start(&self, key: &str) -> Option<Arc<Flight<V>>> {
        let mut table = self.table();
        if table.contains_key(key) {
            return None;
        }
        let flight = Flight::new();
        table.insert(key.into(), flight.clone());
        Some(flight)
    }

    /// Lands `flight`: takes it out of the table (if it is still the one there) and
    /// wakes its waiters with `landed`.
    pub fn land(&self, key: &str, flight: &Arc<Flight<V>>, landed: Landed<V>) {
        self.settle(key, flight, Some(landed));
    }

    fn settle(&self, key: &str, flight: &Arc<Flight<V>>, landed: Option<Landed<V>>) {
        {
            let mut table = self.table();
            if table.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                table.remove(key);
            }
        }
        let _ = flight.landed.set(landed);
        flight.notify.notify_waiters();
    }

    /// Supersedes the flight for `key`, if one is out.
    pub fn supersede(&self, key: &str) {
        if let Some(flight) = self.table().remove(key) {
            flight.superseded.store(true, Ordering::Release);
        }
    }

    /// Supersedes every flight (the L1 was cleared).
    pub fn supersede_all(&self) {
        for (_, flight) in self.table().drain() {
            flight.superseded.store(true, Ordering::Release);
        }
    }
}

/// Lands a flight with an error if the task running it ends without landing it (the
/// loader panicked, or the runtime shut down), so that no waiter waits forever.
pub(crate) struct LandOnDrop<'a, V: Clone> {
    pub flights: &'a Flights<V>,
    pub key: &'a str,
    pub flight: &'a Arc<Flight<V>>,
}

impl<V: Clone> Drop for LandOnDrop<'_, V> {
    fn drop(&mut self) {
        if self.flight.landed.get().is_none() {
            let err: LoadError = Arc::new(Abandoned);
            self.flights.land(self.key, self.flight, Err(err));
        }
    }
}

/// Sends a flight's waiters back to join again if its leader gives up (its caller
/// dropped the lookup) before the load was handed to a task of its own.
pub(crate) struct RetryOnDrop<'a, V: Clone> {
    flights: &'a Flights<V>,
    key: &'a str,
    flight: &'a Arc<Flight<V>>,
    armed: bool,
}

impl<'a, V: Clone> RetryOnDrop<'a, V> {
    pub fn new(flights: &'a Flights<V>, key: &'a str, flight: &'a Arc<Flight<V>>) -> Self {
        RetryOnDrop {
            flights,
            key,
            flight,
            armed: true,
        }
    }

    /// The flight is handed on: dropping the guard does nothing.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl<V: Clone> Drop for RetryOnDrop<'_, V> {
    fn drop(&mut self) {
        if self.armed && self.flight.landed.get().is_none() {
            self.flights.settle(self.key, self.flight, None);
        }
    }
}

/// The load ended without a result (the loader panicked or its runtime shut down).
#[derive(Debug, thiserror::Error)]
#[error("the load ended without a result (the loader panicked or its runtime shut down)")]
pub struct Abandoned;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_share_the_leaders_result() {
        let flights = Flights::<u32>::new();
        let (leader, lead) = flights.join("k");
        let (follower, lead2) = flights.join("k");
        assert!(lead && !lead2);
        let waiting = tokio::spawn(async move { follower.wait().await });
        flights.land("k", &leader, Ok(Some(7)));
        assert_eq!(waiting.await.unwrap().unwrap().unwrap(), Some(7));
        // Landed flights leave the table: the next miss leads again.
        assert!(flights.join("k").1);
    }

    #[tokio::test]
    async fn superseded_flight_is_not_joined_and_is_marked() {
        let flights = Flights::<u32>::new();
        let (old, _) = flights.join("k");
        flights.supersede("k");
        assert!(old.is_superseded());
        let (new, lead) = flights.join("k");
        assert!(lead && !Arc::ptr_eq(&old, &new));
        // The old flight landing does not take the new one out.
        flights.land("k", &old, Ok(Some(1)));
        assert!(!flights.join("k").1);
    }

    #[tokio::test]
    async fn a_dropped_leader_lands_an_error() {
        let flights = Flights::<u32>::new();
        let (flight, _) = flights.join("k");
        drop(LandOnDrop {
            flights: &flights,
            key: "k",
            flight: &flight,
        });
        let err = flight.wait().await.unwrap().unwrap_err();
        assert!(err.downcast_ref::<Abandoned>().is_some());
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_sends_its_waiters_back() {
        let flights = Flights::<u32>::new();
        let (flight, _) = flights.join("k");
        drop(RetryOnDrop::new(&flights, "k", &flight));
        assert!(flight.wait().await.is_none());
        assert!(flights.join("k").1, "the flight was left in the table");
    }
}
