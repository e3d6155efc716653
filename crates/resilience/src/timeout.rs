//! Timeouts: fixed, adaptive, and deadlines passed from outer to inner layers.
//!
//! * A fixed timeout is just a `Duration` given to
//!   [`TimeoutLayer`](crate::layer::timeout::TimeoutLayer).
//! * [`AdaptiveTimeout`] = a recent latency quantile (p95 by default) x a multiplier,
//!   clamped to `[min, max]`, using `initial` until it has `min_samples` samples
//!   (p95 x k, the usual adaptive rule). Latencies go into a windowed log-linear histogram
//!   (8 sub-buckets per power of two: at most 12.5% above the true quantile), so the
//!   timeout follows the service as it speeds up or slows down.
//! * [`Deadline`]: an outer timeout publishes its deadline to everything it wraps, so
//!   an inner retry never starts an attempt that cannot finish in time, and an inner
//!   per-attempt timeout never outlives the outer one.

use std::future::Future;
use std::time::Duration;

use crate::clock::{Instant, SharedClock, SystemClock, duration_nanos};
use crate::sync::{AtomicU64, Ordering};
use crate::window::Buckets;
use crate::{ConfigError, ConfigErrors};
use tokio::task::futures::TaskLocalFuture;

// --- deadline --------------------------------------------------------------------

tokio::task_local! {
    static DEADLINE: tokio::time::Instant;
}

/// The deadline of the request being served on this task, as set by an outer
/// timeout layer.
#[derive(Debug, Clone, Copy)]
pub struct Deadline;

impl Deadline {
    /// The deadline in force, if any.
    pub fn current() -> Option<tokio::time::Instant> {
        DEADLINE.try_with(|d| *d).ok()
    }

    /// Time left before the deadline in force (zero if passed), if any.
    pub fn remaining() -> Option<Duration> {
        Self::current().map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
    }

    /// Runs `fut` under `deadline`, or under the deadline already in force if that
    /// is earlier: a deadline can only shrink as it is passed inwards.
    pub fn scope<F: Future>(
        deadline: tokio::time::Instant,
        fut: F,
    ) -> TaskLocalFuture<tokio::time::Instant, F> {
        DEADLINE.scope(Self::effective(deadline), fut)
    }

    /// Runs `f` synchronously under `deadline` (or the earlier one in force), e.g. a
    /// service's `call`, which builds its future before the future is first polled.
    pub fn sync_scope<R>(deadline: tokio::time::Instant, f: impl FnOnce() -> R) -> R {
        DEADLINE.sync_scope(Self::effective(deadline), f)
    }

    fn effective(deadline: tokio::time::Instant) -> tokio::time::Instant {
        Self::current().map_or(deadline, |outer| outer.min(deadline))
    }
}

// --- adaptive timeout ------------------------------------------------------------

/// Configuration of an [`AdaptiveTimeout`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// Which latency quantile to follow (0 < q < 1; 0.95 = p95).
    pub quantile: f64,
    /// Timeout = quantile x multiplier (at least 1).
    pub multiplier: f64,
    /// Lower clamp.
    pub min: Duration,
    /// Upper clamp.
    pub max: Duration,
    /// Timeout used until `min_samples` latencies are in the window.
    pub initial: Duration,
    /// Samples needed before adapting.
    pub min_samples: u32,
    /// How far back latencies count.
    pub window: Duration,
}

impl Default for AdaptiveConfig {
    /// p95 x 2, clamped to [50 ms, 30 s], 10 s until 100 samples, over the last 60 s.
    fn default() -> Self {
        AdaptiveConfig {
            quantile: 0.95,
            multiplier: 2.0,
            min: Duration::from_millis(50),
            max: Duration::from_secs(30),
            initial: Duration::from_secs(10),
            min_samples: 100,
            window: Duration::from_secs(60),
        }
    }
}

impl AdaptiveConfig {
    /// Checks every field; the errors name them.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut e = Vec::new();
        if !(self.quantile > 0.0 && self.quantile < 1.0) {
            e.push(ConfigError::new("quantile", "must be in (0, 1), e.g. 0.95"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            e.push(ConfigError::new("multiplier", "must be a number >= 1"));
        }
        if self.min.is_zero() {
            e.push(ConfigError::new("min", "must be greater than zero"));
        }
        if self.max < self.min {
            e.push(ConfigError::new("max", "must be at least min"));
        }
        if self.window < Duration::from_millis(u64::from(SLICES)) {
            e.push(ConfigError::new("window", "must be at least 6ms"));
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(e))
        }
    }
}

/// Sub-buckets per power of two (3 bits: 8).
const SUB_BITS: u32 = 3;
/// Values below this (in microseconds) get one bucket each.
const LINEAR: u64 = 2 << SUB_BITS;
/// Largest exponent kept: 2^37 us is about 38 hours; longer latencies clamp.
const MAX_EXP: u32 = 37;
const HIST: usize = LINEAR as usize + ((MAX_EXP - SUB_BITS) as usize) * (1 << SUB_BITS);
const SLICES: u32 = 6;

#[inline]
fn hist_index(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    let micros = micros.min((1u64 << (MAX_EXP + 1)) - 1);
    let exp = 63 - micros.leading_zeros(); // >= SUB_BITS + 1
    let sub = (micros >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((exp - SUB_BITS - 1) as usize) * (1 << SUB_BITS) + sub as usize
}

/// Upper bound (exclusive, in microseconds) of histogram bucket `index`.
fn hist_upper(index: usize) -> u64 {
    if (index as u64) < LINEAR {
        return index as u64 + 1;
    }
    let i = index - LINEAR as usize;
    let exp = (i >> SUB_BITS) as u32 + SUB_BITS + 1;
    let sub = (i & ((1 << SUB_BITS) - 1)) as u64;
    ((1 << SUB_BITS) + sub + 1) << (exp - SUB_BITS)
}

/// A timeout that follows a recent latency quantile. Share it (`Arc`) between the
/// calls it times.
///
/// ```
/// use palisade_resilience::timeout::{AdaptiveConfig, AdaptiveTimeout};
/// use palisade_resilience::ManualClock;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let t = AdaptiveTimeout::with_clock(
///     AdaptiveConfig { min_samples: 10, ..AdaptiveConfig::default() },
///     clock.clone(),
/// ).unwrap();
/// assert_eq!(t.timeout(), Duration::from_secs(10)); // initial, too few samples
/// for _ in 0..100 { t.record(Duration::from_millis(100)); }
/// clock.advance(Duration::from_secs(1)); // the cached value refreshes once a second
/// // p95 = 100 ms (within one histogram bucket) x 2
/// let got = t.timeout();
/// assert!(got >= Duration::from_millis(200) && got <= Duration::from_millis(225), "{got:?}");
/// ```
#[derive(Debug)]
pub struct AdaptiveTimeout {
    hist: Buckets<HIST>,
    config: AdaptiveConfig,
    clock: SharedClock,
    refresh_nanos: u64,
    cached: AtomicU64,
    /// `computed_at + 1` in nanos; 0 = never.
    computed_at: AtomicU64,
}

impl AdaptiveTimeout {
    /// An adaptive timeout on the system clock.
    pub fn new(config: AdaptiveConfig) -> Result<Self, ConfigErrors> {
        Self::with_clock(config, SystemClock)
    }

    /// An adaptive timeout on `clock`.
    pub fn with_clock(config: AdaptiveConfig, clock: impl crate::Clock) -> Result<Self, ConfigErrors> {
        config.validate()?;
        let slice = duration_nanos(config.window) / u64::from(SLICES);
        Ok(AdaptiveTimeout {
            hist: Buckets::new(SLICES, slice),
            refresh_nanos: slice.min(1_000_000_000),
            clock: SharedClock::new(clock),
            cached: AtomicU64::new(duration_nanos(config.initial)),
            computed_at: AtomicU64::new(0),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Records one call's latency. A call cut off by the timeout should be recorded
    /// with the timeout it was given: it took at least that long.
    #[inline]
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.add(self.clock.now(), hist_index(micros), 1);
    }

    /// The timeout to give the next call. Recomputed at most once per refresh period
    /// (a sixth of the window, at most 1 s); otherwise one atomic load.
    #[inline]
    pub fn timeout(&self) -> Duration {
        let now = self.clock.now().as_nanos();
        let at = self.computed_at.load(Ordering::Acquire);
        if at == 0 || now.saturating_sub(at - 1) >= self.refresh_nanos {
            // One caller recomputes; the others keep using the cached value.
            if self
                .computed_at
                .compare_exchange(at, now + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let fresh = self.compute(Instant::from_nanos(now));
                self.cached.store(duration_nanos(fresh), Ordering::Release);
                return fresh;
            }
        }
        Duration::from_nanos(self.cached.load(Ordering::Acquire))
    }

    /// The observed quantile now, or `None` below `min_samples`.
    pub fn quantile(&self) -> Option<Duration> {
        self.quantile_at(self.clock.now())
    }

    fn quantile_at(&self, now: Instant) -> Option<Duration> {
        let counts = self.hist.sum(now);
        let total: i64 = counts.iter().map(|c| (*c).max(0)).sum();
        if total == 0 || total < i64::from(self.config.min_samples) {
            return None;
        }
        let rank = (self.config.quantile * total as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += (*c).max(0);
            if seen >= rank {
                return Some(Duration::from_micros(hist_upper(i)));
            }
        }
        Some(Duration::from_micros(hist_upper(HIST - 1)))
    }

    fn compute(&self, now: Instant) -> Duration {
        let c = &self.config;
        match self.quantile_at(now) {
            None => c.initial,
            Some(q) => q.mul_f64(c.multiplier).clamp(c.min, c.max),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut prev_upper = 0;
        for i in 0..HIST {
            let upper = hist_upper(i);
            assert!(upper > prev_upper, "bucket {i}");
            // every value in the bucket maps back to it
            assert_eq!(hist_index(upper - 1), i);
            assert_eq!(hist_index(prev_upper), i);
            // relative width at most 1/8 above LINEAR
            if prev_upper >= LINEAR {
                assert!((upper - prev_upper) * 8 <= prev_upper, "bucket {i} too wide");
            }
            prev_upper = upper;
        }
        assert_eq!(hist_index(u64::MAX), HIST - 1);
    }

    fn adaptive(clock: &ManualClock) -> AdaptiveTimeout {
        AdaptiveTimeout::with_clock(
            AdaptiveConfig {
                quantile: 0.95,
                multiplier: 2.0,
                min: Duration::from_millis(10),
                max: Duration::from_secs(5),
                initial: Duration::from_secs(1),
                min_samples: 20,
                window: Duration::from_secs(60),
            },
            clock.clone(),
        )
        .unwrap()
    }

    #[test]
    fn follows_p95_and_clamps() {
        let clock = ManualClock::new();
        let t = adaptive(&clock);
        for _ in 0..19 {
            t.record(Duration::from_millis(100));
        }
        assert_eq!(t.timeout(), Duration::from_secs(1), "19 samples < 20: initial");
        clock.advance(Duration::from_secs(1));
        // 95 fast calls, 5 slow ones: p95 is still a fast call.
        for i in 0..81 {
            t.record(Duration::from_millis(if i < 76 { 100 } else { 400 }));
        }
        let q = t.quantile().unwrap();
        assert!(
            q >= Duration::from_millis(100) && q < Duration::from_millis(113),
            "{q:?}"
        );
        // more slow calls move p95 up
        for _ in 0..20 {
            t.record(Duration::from_millis(400));
        }
        clock.advance(Duration::from_secs(1));
        let got = t.timeout();
        assert!(
            got >= Duration::from_millis(800) && got <= Duration::from_millis(900),
            "{got:?}"
        );
        // very slow: clamped at max
        for _ in 0..1000 {
            t.record(Duration::from_secs(60));
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(t.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn old_latencies_leave_the_window() {
        let clock = ManualClock::new();
        let t = adaptive(&clock);
        for _ in 0..100 {
            t.record(Duration::from_secs(2));
        }
        clock.advance(Duration::from_secs(61));
        for _ in 0..100 {
            t.record(Duration::from_millis(1));
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            t.timeout(),
            Duration::from_millis(10),
            "2 ms x 2 clamped up to min"
        );
    }

    #[test]
    fn cached_between_refreshes() {
        let clock = ManualClock::new();
        let t = adaptive(&clock);
        assert_eq!(t.timeout(), Duration::from_secs(1));
        for _ in 0..100 {
            t.record(Duration::from_millis(100));
        }
        assert_eq!(t.timeout(), Duration::from_secs(1), "not refreshed yet");
        clock.advance(Duration::from_secs(1));
        assert!(t.timeout() < Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_only_shrink_inwards() {
        let now = tokio::time::Instant::now();
        assert_eq!(Deadline::current(), None);
        let outer = now + Duration::from_secs(1);
        Deadline::scope(outer, async move {
            assert_eq!(Deadline::current(), Some(outer));
            Deadline::scope(outer + Duration::from_secs(5), async move {
                assert_eq!(Deadline::current(), Some(outer), "inner cannot extend");
            })
            .await;
            Deadline::scope(now + Duration::from_millis(10), async move {
                assert_eq!(Deadline::remaining(), Some(Duration::from_millis(10)));
            })
            .await;
        })
        .await;
    }
}
