use std::sync::Arc;

use super::{Algorithm, Allowed, Gcra, Quota, RateLimited, Verdict};
use crate::ConfigErrors;
use crate::clock::{Instant, SharedClock};
use crate::sync::{AtomicU64, CachePadded, Ordering};

/// One rate limit for everything that shares it (clones share the state).
///
/// A decision is one clock read, one load and one compare-and-swap; no locks, no
/// allocation.
///
/// ```
/// use palisade_resilience::ratelimit::{Quota, RateLimiter};
/// use palisade_resilience::ManualClock;
///
/// let clock = ManualClock::new();
/// let limiter = RateLimiter::gcra(Quota::per_second(2)).unwrap().with_clock(clock);
/// assert!(limiter.check().is_ok());
/// assert!(limiter.check().is_ok());
/// let refused = limiter.check().unwrap_err();
/// assert_eq!(refused.retry_after().as_millis(), 500);
/// ```
#[derive(Clone)]
pub struct RateLimiter<A = Gcra> {
    inner: Arc<Inner<A>>,
}

struct Inner<A> {
    state: CachePadded<AtomicU64>,
    algorithm: A,
    clock: SharedClock,
}

impl<A> std::fmt::Debug for RateLimiter<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter<Gcra> {
    /// A token bucket of `quota` on the system clock.
    pub fn gcra(quota: Quota) -> Result<Self, ConfigErrors> {
        Ok(Self::new(Gcra::new(quota)?))
    }
}

impl<A: Algorithm> RateLimiter<A> {
    /// A limiter running `algorithm` on the system clock.
    pub fn new(algorithm: A) -> Self {
        RateLimiter {
            inner: Arc::new(Inner {
                state: CachePadded(AtomicU64::new(0)),
                algorithm,
                clock: SharedClock::system(),
            }),
        }
    }

    /// The same limiter on another clock (call before sharing it).
    pub fn with_clock(self, clock: impl crate::Clock) -> Self {
        self.with_shared_clock(SharedClock::new(clock))
    }

    /// The same limiter on a shared clock (call before sharing it).
    pub fn with_shared_clock(self, clock: SharedClock) -> Self {
        let inner =
            Arc::try_unwrap(self.inner).unwrap_or_else(|_| panic!("with_clock after the limiter was shared"));
        RateLimiter {
            inner: Arc::new(Inner { clock, ..inner }),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> &A {
        &self.inner.algorithm
    }

    /// Admits or refuses one request now.
    #[inline]
    pub fn check(&self) -> Result<Allowed, RateLimited> {
        self.check_n_at(self.inner.clock.now(), 1)
    }

    /// Admits or refuses a request of `cost` units now.
    #[inline]
    pub fn check_n(&self, cost: u32) -> Result<Allowed, RateLimited> {
        self.check_n_at(self.inner.clock.now(), cost)
    }

    /// Admits or refuses a request of `cost` units at `now` (sans-I/O use: replay,
    /// or a caller that already read the clock).
    #[inline]
    pub fn check_n_at(&self, now: Instant, cost: u32) -> Result<Allowed, RateLimited> {
        decide_atomic(&self.inner.state, &self.inner.algorithm, now, cost)
    }

    /// The clock the limiter reads.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }
}

/// The one compare-and-swap loop every `u64`-state limiter shares.
#[inline]
pub(super) fn decide_atomic<A: Algorithm>(
    state: &AtomicU64,
    algorithm: &A,
    now: Instant,
    cost: u32,
) -> Result<Allowed, RateLimited> {
    let mut current = state.load(Ordering::Acquire);
    loop {
        match algorithm.decide(current, now, cost) {
            Verdict::Deny(limited) => return Err(limited),
            Verdict::Allow { next, allowed } => {
                match state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(allowed),
                    Err(actual) => current = actual,
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::ratelimit::SlidingWindowCounter;
    use std::time::Duration;

    #[test]
    fn clones_share_one_bucket_and_it_refills_with_time() {
        let clock = ManualClock::new();
        let a = RateLimiter::gcra(Quota::per_second(10).burst(5))
            .unwrap()
            .with_clock(clock.clone());
        let b = a.clone();
        assert_eq!(
            (0..10)
                .filter(|i| if i % 2 == 0 { a.check() } else { b.check() }.is_ok())
                .count(),
            5
        );
        clock.advance(Duration::from_millis(300));
        assert_eq!((0..10).filter(|_| a.check().is_ok()).count(), 3);
    }

    #[test]
    fn two_threads_never_admit_more_than_the_burst() {
        let limiter = RateLimiter::new(SlidingWindowCounter::new(1000, Duration::from_secs(3600)).unwrap())
            .with_clock(ManualClock::new());
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| s.spawn(|| (0..5000).filter(|_| limiter.check().is_ok()).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
    }
}
