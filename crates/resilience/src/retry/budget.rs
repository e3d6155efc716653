use std::sync::Arc;
use std::time::Duration;

use crate::clock::{SharedClock, SystemClock, duration_nanos};
use crate::window::Buckets;

const REQUESTS: usize = 0;
const RETRIES: usize = 1;
const BUCKETS: u32 = 10;

/// The size of a [`RetryBudget`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per original request over the window (0.2 = 20% extra load).
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic, so a quiet service can
    /// still retry.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    pub window: Duration,
}

impl Default for BudgetConfig {
    /// linkerd's defaults: 20% extra, at least 10 retries per second, over 10 s.
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// A retry budget, shared by every policy that holds a clone: retries may add at
/// most `ratio` of the recent request rate (plus a small floor), so that when a
/// dependency fails outright, retries cannot multiply the load on it.
///
/// Like linkerd's and Finagle's budgets. Each original request deposits; each retry
/// withdraws one if the budget allows it. Two threads withdrawing at the same instant
/// can both pass the check and overspend by one; the budget is a limit on rates, not a
/// semaphore.
///
/// ```
/// use palisade_resilience::retry::{BudgetConfig, RetryBudget};
/// use palisade_resilience::ManualClock;
/// use std::time::Duration;
///
/// let budget = RetryBudget::with_clock(
///     BudgetConfig { ratio: 0.1, min_per_second: 0, window: Duration::from_secs(10) },
///     ManualClock::new(),
/// );
/// for _ in 0..100 { budget.deposit(); }
/// let granted = (0..50).filter(|_| budget.try_withdraw()).count();
/// assert_eq!(granted, 10);
/// ```
#[derive(Clone, Debug)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    counts: Buckets<2>,
    config: BudgetConfig,
    floor: f64,
    clock: SharedClock,
}

impl RetryBudget {
    /// A budget on the system clock.
    pub fn new(config: BudgetConfig) -> Self {
        Self::with_clock(config, SystemClock)
    }

    /// A budget on `clock`.
    pub fn with_clock(config: BudgetConfig, clock: impl crate::Clock) -> Self {
        let window = config.window.max(Duration::from_millis(BUCKETS as u64));
        RetryBudget {
            inner: Arc::new(Inner {
                counts: Buckets::new(BUCKETS, duration_nanos(window) / u64::from(BUCKETS)),
                floor: f64::from(config.min_per_second) * window.as_secs_f64(),
                config,
                clock: SharedClock::new(clock),
            }),
        }
    }

    /// The budget's configuration.
    pub fn config(&self) -> &BudgetConfig {
        &self.inner.config
    }

    /// Records one original request.
    #[inline]
    pub fn deposit(&self) {
        let now = self.inner.clock.now();
        self.inner.counts.add(now, REQUESTS, 1);
    }

    /// Takes one retry from the budget if it has one.
    pub fn try_withdraw(&self) -> bool {
        let now = self.inner.clock.now();
        if self.remaining_at(now) >= 1.0 {
            self.inner.counts.add(now, RETRIES, 1);
            true
        } else {
            metrics::counter!("palisade_retry_budget_exhausted_total").increment(1);
            false
        }
    }

    /// Retries the budget would allow now.
    pub fn remaining(&self) -> u64 {
        self.remaining_at(self.inner.clock.now()).max(0.0) as u64
    }

    fn remaining_at(&self, now: crate::Instant) -> f64 {
        let [requests, retries] = self.inner.counts.sum(now);
        let allowed = self.inner.floor + self.inner.config.ratio * requests.max(0) as f64;
        allowed - retries.max(0) as f64
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;

    #[test]
    fn floor_allows_retries_without_traffic_and_refills_as_the_window_slides() {
        let clock = ManualClock::new();
        let budget = RetryBudget::with_clock(
            BudgetConfig {
                ratio: 0.0,
                min_per_second: 1,
                window: Duration::from_secs(10),
            },
            clock.clone(),
        );
        assert_eq!((0..20).filter(|_| budget.try_withdraw()).count(), 10);
        clock.advance(Duration::from_secs(5));
        assert!(!budget.try_withdraw(), "still spent");
        clock.advance(Duration::from_secs(6));
        assert_eq!(budget.remaining(), 10, "the spent retries left the window");
    }
}
