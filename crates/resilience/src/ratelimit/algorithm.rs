//! The rate-limiting algorithms, as pure functions over one `u64` of state.
//!
//! Keeping each algorithm's whole state in a `u64` lets the direct limiter hold it in
//! one atomic (every decision is one compare-and-swap) and lets the keyed limiter
//! store a key's state in eight bytes.

use std::time::Duration;

use super::{Allowed, RateLimited};
use crate::clock::{Instant, duration_nanos};
use crate::{ConfigError, ConfigErrors};

/// What a rate-limiting algorithm decides for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; the state becomes `next`.
    Allow {
        /// The state to store.
        next: u64,
        /// What the caller is told.
        allowed: Allowed,
    },
    /// Refused; the state is unchanged.
    Deny(RateLimited),
}

/// A rate-limiting algorithm whose whole state is one `u64`.
///
/// Implementations are pure: `decide` computes, the limiter stores. State `0` is the
/// state of a key never seen.
pub trait Algorithm: Send + Sync + 'static {
    /// Decides a request of `cost` units arriving at `now` in state `state`.
    fn decide(&self, state: u64, now: Instant, cost: u32) -> Verdict;

    /// True when `state` at `now` is indistinguishable from a fresh key (state `0`),
    /// so forgetting it changes no future decision.
    fn is_idle(&self, state: u64, now: Instant) -> bool;

    /// How close to its limit `state` is at `now`: higher is busier. When a keyed
    /// limiter must forget keys that are not idle, it forgets the least busy.
    fn pressure(&self, state: u64, now: Instant) -> u64;

    /// The nominal limit, for the `X-RateLimit-Limit` header.
    fn limit(&self) -> u32;
}

/// How many requests per how long, and how many at once: the size of a token bucket.
///
/// ```
/// use palisade_resilience::ratelimit::Quota;
/// use std::time::Duration;
///
/// let q = Quota::per_second(100).burst(20);
/// assert_eq!(q.interval(), Duration::from_millis(10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Requests allowed per `period` on average.
    pub limit: u32,
    /// The period `limit` is counted over.
    pub period: Duration,
    /// Requests that may arrive at once after a quiet spell (the bucket's size).
    /// Defaults to `limit`.
    pub burst: u32,
}

impl Quota {
    /// `limit` requests per `period`, with a burst of `limit`.
    pub const fn new(limit: u32, period: Duration) -> Self {
        Quota {
            limit,
            period,
            burst: limit,
        }
    }

    /// `limit` requests per second.
    pub const fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` requests per minute.
    pub const fn per_minute(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// Sets the burst size.
    pub const fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Time between two requests at the sustained rate.
    pub fn interval(&self) -> Duration {
        self.period / self.limit.max(1)
    }

    /// Every problem with this quota, fields prefixed with `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if self.limit == 0 {
            errors.push(ConfigError::new(format!("{prefix}limit"), "must be at least 1"));
        }
        if self.burst == 0 {
            errors.push(ConfigError::new(format!("{prefix}burst"), "must be at least 1"));
        }
        if self.period.is_zero() {
            errors.push(ConfigError::new(
                format!("{prefix}period"),
                "must be longer than zero",
            ));
        } else if self.limit > 0 && duration_nanos(self.period) / u64::from(self.limit) == 0 {
            errors.push(ConfigError::new(
                format!("{prefix}limit"),
                "more than one request per nanosecond cannot be paced",
            ));
        }
        errors
    }
}

fn ok_or_errors<T>(value: T, errors: Vec<ConfigError>) -> Result<T, ConfigErrors> {
    ConfigErrors::result(errors).map(|()| value)
}

/// The generic cell rate algorithm: a token bucket kept as one timestamp.
///
/// The state is the *theoretical arrival time* (TAT): when the bucket would be full
/// again if nothing else arrived. A request is admitted when moving the TAT one
/// interval later keeps it within `burst` intervals of now. With `max_wait` above
/// zero it becomes a leaky bucket that paces: a request that would overflow is
/// admitted with a [`wait`](Allowed::wait) if the wait is at most `max_wait`
/// (Sentinel's rate limiter behaviour), and refused otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    interval: u64,
    tolerance: u64,
    max_wait: u64,
    limit: u32,
}

impl Gcra {
    /// A token bucket of `quota`.
    pub fn new(quota: Quota) -> Result<Self, ConfigErrors> {
        let interval = duration_nanos(quota.period) / u64::from(quota.limit.max(1));
        ok_or_errors(
            Gcra {
                interval,
                tolerance: interval.saturating_mul(u64::from(quota.burst)),
                max_wait: 0,
                limit: quota.limit,
            },
            quota.problems(""),
        )
    }

    /// A leaky bucket: requests leave evenly spaced at `quota`'s rate (its burst is
    /// ignored), each waiting its turn for at most `max_wait`.
    pub fn pacing(quota: Quota, max_wait: Duration) -> Result<Self, ConfigErrors> {
        let mut gcra = Self::new(quota.burst(1))?;
        gcra.max_wait = duration_nanos(max_wait);
        Ok(gcra)
    }

    /// Time between requests at the sustained rate.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }
}

impl Algorithm for Gcra {
    #[inline]
    fn decide(&self, tat: u64, now: Instant, cost: u32) -> Verdict {
        let now = now.as_nanos();
        let start = tat.max(now);
        let next = start.saturating_add(self.interval.saturating_mul(u64::from(cost)));
        let ahead = next - now;
        if ahead <= self.tolerance.saturating_add(self.max_wait) {
            let wait = ahead.saturating_sub(self.tolerance);
            let headroom = if wait == 0 { self.tolerance - ahead } else { 0 };
            Verdict::Allow {
                next,
                allowed: Allowed::new(self.limit, ahead, wait, headroom, self.interval),
            }
        } else {
            Verdict::Deny(RateLimited::new(
                self.limit,
                ahead - self.tolerance - self.max_wait,
                start - now,
            ))
        }
    }

    #[inline]
    fn is_idle(&self, tat: u64, now: Instant) -> bool {
        tat <= now.as_nanos()
    }

    #[inline]
    fn pressure(&self, tat: u64, now: Instant) -> u64 {
        tat.saturating_sub(now.as_nanos())
    }

    fn limit(&self) -> u32 {
        self.limit
    }
}

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const EPOCH_MASK: u64 = (1 << (64 - 2 * COUNT_BITS)) - 1;
/// The largest limit a [`SlidingWindowCounter`] can count to.
pub const SLIDING_WINDOW_MAX_LIMIT: u32 = COUNT_MASK as u32;

/// A sliding-window counter: at most `limit` requests in any window of `window`,
/// estimated from the counts of the current and the previous fixed window (the
/// previous one weighted by how much of it still overlaps the sliding window).
///
/// Cheaper and smoother than a log of timestamps; exact at window boundaries and an
/// estimate in between (it assumes the previous window's requests were spread evenly).
/// State: window number (24 bits, compared modulo 2^24), previous count (20 bits),
/// current count (20 bits), so `limit` is at most [`SLIDING_WINDOW_MAX_LIMIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindowCounter {
    window: u64,
    limit: u32,
}

impl SlidingWindowCounter {
    /// At most `limit` requests in any `window`.
    pub fn new(limit: u32, window: Duration) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        if limit == 0 || limit > SLIDING_WINDOW_MAX_LIMIT {
            errors.push(ConfigError::new(
                "limit",
                format!("must be between 1 and {SLIDING_WINDOW_MAX_LIMIT} (use a token bucket above that)"),
            ));
        }
        if window < Duration::from_millis(1) {
            errors.push(ConfigError::new("window", "must be at least 1ms"));
        }
        ok_or_errors(
            SlidingWindowCounter {
                window: duration_nanos(window),
                limit,
            },
            errors,
        )
    }

    #[inline]
    fn unpack(&self, state: u64, now: u64) -> (u64, u64, u64) {
        let epoch = (now / self.window) & EPOCH_MASK;
        let (stored, prev, curr) = (
            state >> (2 * COUNT_BITS),
            (state >> COUNT_BITS) & COUNT_MASK,
            state & COUNT_MASK,
        );
        if state == 0 {
            (epoch, 0, 0)
        } else if stored == epoch {
            (epoch, prev, curr)
        } else if stored == epoch.wrapping_sub(1) & EPOCH_MASK {
            (epoch, curr, 0)
        } else {
            (epoch, 0, 0)
        }
    }
}

impl Algorithm for SlidingWindowCounter {
    #[inline]
    fn decide(&self, state: u64, now: Instant, cost: u32) -> Verdict {
        let now = now.as_nanos();
        let (epoch, prev, curr) = self.unpack(state, now);
        let into = now % self.window;
        let to_end = self.window - into;
        // prev * (window - into) / window, rounded up so the estimate never undercounts.
        let weighted = (u128::from(prev) * u128::from(to_end)).div_ceil(u128::from(self.window)) as u64;
        let limit = u64::from(self.limit);
        let after = weighted + curr + u64::from(cost);
        if after <= limit {
            let next = (epoch << (2 * COUNT_BITS)) | (prev << COUNT_BITS) | (curr + u64::from(cost));
            Verdict::Allow {
                // A zero state means "never seen"; an epoch of zero with counts is
                // never zero because the count just grew.
                next,
                allowed: Allowed::new(self.limit, to_end, 0, limit - after, 1),
            }
        } else {
            let retry_after = if curr + u64::from(cost) <= limit && prev > 0 {
                // Wait until the previous window's weight has fallen enough:
                // prev * (to_end - t) / window <= limit - curr - cost.
                let room = limit - curr - u64::from(cost);
                let needed_to_end = (u128::from(room) * u128::from(self.window) / u128::from(prev)) as u64;
                (to_end - needed_to_end.min(to_end)).max(1)
            } else {
                to_end
            };
            Verdict::Deny(RateLimited::new(self.limit, retry_after, to_end))
        }
    }

    #[inline]
    fn is_idle(&self, state: u64, now: Instant) -> bool {
        let (_, prev, curr) = self.unpack(state, now.as_nanos());
        prev == 0 && curr == 0
    }

    #[inline]
    fn pressure(&self, state: u64, now: Instant) -> u64 {
        let (_, prev, curr) = self.unpack(state, now.as_nanos());
        prev + curr
    }

    fn limit(&self) -> u32 {
        self.limit
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    /// Runs requests at `times_ms` from a fresh state; returns which were allowed.
    fn run(alg: &impl Algorithm, times_ms: &[u64]) -> Vec<bool> {
        let mut state = 0;
        times_ms
            .iter()
            .map(|&t| match alg.decide(state, at(t), 1) {
                Verdict::Allow { next, .. } => {
                    state = next;
                    true
                }
                Verdict::Deny(_) => false,
            })
            .collect()
    }

    #[test]
    fn gcra_allows_a_burst_then_the_sustained_rate() {
        let g = Gcra::new(Quota::per_second(10).burst(3)).unwrap();
        // 3 at once, the 4th refused; one more every 100 ms.
        assert_eq!(
            run(&g, &[0, 0, 0, 0, 100, 150, 200]),
            [true, true, true, false, true, false, true]
        );
    }

    #[test]
    fn gcra_reports_headers() {
        let g = Gcra::new(Quota::per_second(10).burst(3)).unwrap();
        let Verdict::Allow { next, allowed } = g.decide(0, at(1000), 1) else {
            panic!()
        };
        assert_eq!((allowed.limit(), allowed.remaining()), (10, 2));
        assert_eq!(allowed.reset_after(), Duration::from_millis(100));
        let Verdict::Allow { next, .. } = g.decide(next, at(1000), 1) else {
            panic!()
        };
        let Verdict::Allow { next, allowed } = g.decide(next, at(1000), 1) else {
            panic!()
        };
        assert_eq!(allowed.remaining(), 0);
        let Verdict::Deny(limited) = g.decide(next, at(1000), 1) else {
            panic!()
        };
        assert_eq!(limited.retry_after(), Duration::from_millis(100));
        assert_eq!(limited.reset_after(), Duration::from_millis(300));
    }

    #[test]
    fn gcra_cost_above_burst_is_never_allowed() {
        let g = Gcra::new(Quota::per_second(10).burst(3)).unwrap();
        assert!(matches!(g.decide(0, at(0), 4), Verdict::Deny(_)));
        assert!(matches!(g.decide(0, at(0), 3), Verdict::Allow { .. }));
    }

    #[test]
    fn pacing_spaces_requests_and_bounds_the_wait() {
        let p = Gcra::pacing(Quota::per_second(10), Duration::from_millis(250)).unwrap();
        let mut state = 0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            match p.decide(state, at(0), 1) {
                Verdict::Allow { next, allowed } => {
                    state = next;
                    waits.push(allowed.wait().as_millis());
                }
                Verdict::Deny(limited) => {
                    // At 50 ms the 4th would wait exactly 250 ms.
                    assert_eq!(limited.retry_after(), Duration::from_millis(50));
                    break;
                }
            }
        }
        // Evenly spaced: 0, 100, 200 ms; the 4th would wait 300 ms > 250 ms.
        assert_eq!(waits, [0, 100, 200]);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let w = SlidingWindowCounter::new(10, Duration::from_secs(1)).unwrap();
        let mut state = 0;
        for _ in 0..10 {
            let Verdict::Allow { next, .. } = w.decide(state, at(500), 1) else {
                panic!()
            };
            state = next;
        }
        assert!(matches!(w.decide(state, at(999), 1), Verdict::Deny(_)));
        // 25% into the next window, 75% of the previous 10 still count: 8 (rounded up).
        let Verdict::Allow { next, allowed } = w.decide(state, at(1250), 1) else {
            panic!()
        };
        assert_eq!(allowed.remaining(), 1);
        let Verdict::Allow { next, .. } = w.decide(next, at(1250), 1) else {
            panic!()
        };
        let Verdict::Deny(limited) = w.decide(next, at(1250), 1) else {
            panic!()
        };
        // Room for one more when the previous weight is <= 7: after 1300 ms.
        assert_eq!(limited.retry_after(), Duration::from_millis(50));
        // Two windows later, everything is forgotten.
        assert!(w.is_idle(next, at(3000)));
        assert!(!w.is_idle(next, at(1999)));
    }

    #[test]
    fn bad_quotas_name_their_fields() {
        let errors = Gcra::new(Quota {
            limit: 0,
            period: Duration::ZERO,
            burst: 0,
        })
        .unwrap_err();
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["limit", "burst", "period"]);
        assert_eq!(
            SlidingWindowCounter::new(0, Duration::ZERO).unwrap_err().0.len(),
            2
        );
    }
}
