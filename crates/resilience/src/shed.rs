//! Load shedding: refuse some work early so that the work accepted still finishes
//! in time (Envoy's adaptive concurrency, Netflix's
//! concurrency-limits).
//!
//! * [`AdaptiveConcurrency`] finds how many calls a dependency can take at once from
//!   the latency it shows, instead of a number guessed in a config file: when latency
//!   grows beyond its long-run level the limit shrinks, when it holds the limit grows.
//!   Calls above the limit are refused at once with [`Shed`].
//! * [`TieredShedder`] degrades by load level and request [`Priority`] (the
//!   degradation table): below 60% everything is served; 60-80% drops non-core requests; 80-90%
//!   also serves normal requests in a degraded form; above 90% serves core requests
//!   only. The load comes from any [`LoadSignal`]: the adaptive limit's utilization,
//!   a bulkhead's, or a [`LoadGauge`] a CPU sampler sets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bulkhead::Bulkhead;
use crate::clock::{Instant, SharedClock, SystemClock, duration_nanos};
use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};
use crate::{ConfigError, ConfigErrors};

/// A request was shed: refused to protect the work already accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("shed: load too high ({reason})")]
pub struct Shed {
    /// Why.
    pub reason: ShedReason,
}

/// Why a request was shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// The adaptive concurrency limit was reached.
    ConcurrencyLimit,
    /// The load level admits no request of this priority.
    Priority(LoadLevel),
}

impl std::fmt::Display for ShedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShedReason::ConcurrencyLimit => f.write_str("concurrency limit reached"),
            ShedReason::Priority(level) => write!(f, "load level {level:?} sheds this priority"),
        }
    }
}

// --- adaptive concurrency ------------------------------------------------------------

/// How an [`AdaptiveConcurrency`] limit moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LimitAlgorithm {
    /// Additive increase, multiplicative decrease: grow by `increase` after a window
    /// in which the limit was used and nothing was dropped; multiply by `backoff`
    /// after a window with a drop (a timeout, an overload answer) or, if set, an
    /// average latency above `latency_threshold`.
    Aimd {
        /// Added after a good window.
        increase: u32,
        /// Multiplier after a bad window (0 < backoff < 1).
        backoff: f64,
        /// Average latency above which a window counts as bad.
        latency_threshold: Option<Duration>,
    },
    /// Gradient (after Netflix's Gradient2 and Envoy's adaptive concurrency): compare
    /// the window's average latency with the baseline, the fastest window of the last
    /// `long_windows`; the new limit is
    /// `limit * clamp(tolerance * baseline / latency, 0.5, 1) + sqrt(limit)`, smoothed.
    /// Latency creeping up shrinks the limit before anything times out.
    Gradient {
        /// How much latency growth is tolerated before the limit shrinks (2.0 =
        /// twice the long-run latency).
        tolerance: f64,
        /// Weight of each new estimate (0 < smoothing <= 1).
        smoothing: f64,
        /// How many windows the baseline spans.
        long_windows: u32,
    },
}

impl LimitAlgorithm {
    /// AIMD with +1 and x0.9, no latency threshold.
    pub const fn aimd() -> Self {
        LimitAlgorithm::Aimd {
            increase: 1,
            backoff: 0.9,
            latency_threshold: None,
        }
    }

    /// Gradient with tolerance 2, smoothing 0.2, a long run of 20 windows.
    pub const fn gradient() -> Self {
        LimitAlgorithm::Gradient {
            tolerance: 2.0,
            smoothing: 0.2,
            long_windows: 20,
        }
    }
}

/// The configuration of an [`AdaptiveConcurrency`] limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// The limit before anything is measured.
    pub initial: u32,
    /// The limit never falls below this.
    pub min: u32,
    /// The limit never rises above this.
    pub max: u32,
    /// How the limit moves.
    pub algorithm: LimitAlgorithm,
    /// Samples are gathered over this long, then the limit is updated once.
    pub window: Duration,
    /// A window with fewer samples is extended rather than judged.
    pub min_samples: u32,
}

impl Default for AdaptiveConfig {
    /// Gradient, starting at 20, between 1 and 1000, updated every 100 ms of at
    /// least 10 samples.
    fn default() -> Self {
        AdaptiveConfig {
            initial: 20,
            min: 1,
            max: 1000,
            algorithm: LimitAlgorithm::gradient(),
            window: Duration::from_millis(100),
            min_samples: 10,
        }
    }
}

impl AdaptiveConfig {
    /// Every problem with this configuration, with its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.min == 0 {
            errors.push(ConfigError::new("min", "must be at least 1"));
        }
        if self.max < self.min {
            errors.push(ConfigError::new("max", "must be at least min"));
        }
        if self.initial < self.min || self.initial > self.max {
            errors.push(ConfigError::new("initial", "must be between min and max"));
        }
        if self.window.is_zero() {
            errors.push(ConfigError::new("window", "must be longer than zero"));
        }
        match self.algorithm {
            LimitAlgorithm::Aimd { backoff, .. } if !(backoff > 0.0 && backoff < 1.0) => {
                errors.push(ConfigError::new(
                    "algorithm.backoff",
                    "must be between 0 and 1 (exclusive)",
                ));
            }
            LimitAlgorithm::Gradient {
                tolerance,
                smoothing,
                long_windows,
            } => {
                if !(tolerance >= 1.0 && tolerance.is_finite()) {
                    errors.push(ConfigError::new(
                        "algorithm.tolerance",
                        "must be a finite number of at least 1",
                    ));
                }
                if !(smoothing > 0.0 && smoothing <= 1.0) {
                    errors.push(ConfigError::new("algorithm.smoothing", "must be in (0, 1]"));
                }
                if long_windows == 0 {
                    errors.push(ConfigError::new("algorithm.long_windows", "must be at least 1"));
                }
            }
            LimitAlgorithm::Aimd { .. } => {}
        }
        ConfigErrors::result(errors)
    }
}

/// A concurrency limit that adapts to the latency it observes. See the
/// [module docs](self).
///
/// Acquiring and releasing are a few atomics; the limit is recomputed once per
/// window by whichever completion closes it.
///
/// ```
/// use palisade_resilience::shed::{AdaptiveConcurrency, AdaptiveConfig, LimitAlgorithm};
/// use palisade_resilience::ManualClock;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let config = AdaptiveConfig { initial: 10, algorithm: LimitAlgorithm::aimd(), min_samples: 1, ..Default::default() };
/// let limit = AdaptiveConcurrency::with_clock(config, clock.clone()).unwrap();
/// let permits: Vec<_> = (0..10).map(|_| limit.try_acquire().unwrap()).collect();
/// assert!(limit.try_acquire().is_err(), "at the limit: shed at once");
/// clock.advance(Duration::from_millis(100));
/// for p in permits { p.dropped(); } // the dependency is overloaded
/// assert_eq!(limit.limit(), 9);
/// ```
#[derive(Clone)]
pub struct AdaptiveConcurrency {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: CachePadded<AtomicU32>,
    limit: AtomicU32,
    window: CachePadded<Window>,
    estimator: Mutex<Estimator>,
    config: AdaptiveConfig,
    clock: SharedClock,
}

/// Samples of the current window, lock-free.
#[derive(Default)]
struct Window {
    started: AtomicU64,
    samples: AtomicU64,
    rtt_sum: AtomicU64,
    dropped: AtomicU64,
    peak_in_flight: AtomicU32,
}

struct Estimator {
    limit: f64,
    /// Average latency of the last `long_windows` windows (gradient only).
    recent: VecDeque<f64>,
}

impl std::fmt::Debug for AdaptiveConcurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdaptiveConcurrency")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl AdaptiveConcurrency {
    /// An adaptive limit on the system clock.
    pub fn new(config: AdaptiveConfig) -> Result<Self, ConfigErrors> {
        Self::with_clock(config, SystemClock)
    }

    /// An adaptive limit on `clock`.
    pub fn with_clock(config: AdaptiveConfig, clock: impl crate::Clock) -> Result<Self, ConfigErrors> {
        config.validate()?;
        let clock = SharedClock::new(clock);
        let window = Window::default();
        window.started.store(clock.now().as_nanos(), Ordering::Relaxed);
        Ok(AdaptiveConcurrency {
            inner: Arc::new(Inner {
                in_flight: CachePadded(AtomicU32::new(0)),
                limit: AtomicU32::new(config.initial),
                window: CachePadded(window),
                estimator: Mutex::new(Estimator {
                    limit: f64::from(config.initial),
                    recent: VecDeque::new(),
                }),
                config,
                clock,
            }),
        })
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a slot if the limit allows, or sheds at once.
    #[inline]
    pub fn try_acquire(&self) -> Result<ShedPermit, Shed> {
        let inner = &*self.inner;
        let limit = inner.limit.load(Ordering::Relaxed);
        let mut current = inner.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                metrics::counter!("palisade_shed_total", "reason" => "concurrency").increment(1);
                return Err(Shed {
                    reason: ShedReason::ConcurrencyLimit,
                });
            }
            match inner.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        inner
            .window
            .peak_in_flight
            .fetch_max(current + 1, Ordering::Relaxed);
        Ok(ShedPermit {
            limiter: self.clone(),
            started: inner.clock.now(),
            done: false,
        })
    }

    fn finish(&self, started: Instant, dropped: bool) {
        let inner = &*self.inner;
        inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        let now = inner.clock.now();
        let w = &inner.window;
        w.rtt_sum
            .fetch_add(duration_nanos(now - started), Ordering::Relaxed);
        if dropped {
            w.dropped.fetch_add(1, Ordering::Relaxed);
        }
        let samples = w.samples.fetch_add(1, Ordering::AcqRel) + 1;
        let started_window = w.started.load(Ordering::Acquire);
        if samples >= u64::from(inner.config.min_samples)
            && now.as_nanos().saturating_sub(started_window) >= duration_nanos(inner.config.window)
        {
            // One completion closes the window; the others keep recording into it.
            if let Ok(mut estimator) = inner.estimator.try_lock() {
                if w.started.load(Ordering::Acquire) == started_window {
                    self.close_window(&mut estimator, now);
                }
            }
        }
    }

    fn close_window(&self, est: &mut Estimator, now: Instant) {
        let inner = &*self.inner;
        let w = &inner.window;
        w.started.store(now.as_nanos(), Ordering::Release);
        let samples = w.samples.swap(0, Ordering::AcqRel).max(1);
        let rtt = w.rtt_sum.swap(0, Ordering::AcqRel) as f64 / samples as f64;
        let dropped = w.dropped.swap(0, Ordering::AcqRel) > 0;
        let peak = f64::from(w.peak_in_flight.swap(0, Ordering::AcqRel));
        let config = &inner.config;
        let limit = est.limit;
        // A limit that was not used tells nothing about growing it.
        let used = peak >= limit / 2.0;
        let next = match config.algorithm {
            LimitAlgorithm::Aimd {
                increase,
                backoff,
                latency_threshold,
            } => {
                let slow = latency_threshold.is_some_and(|t| rtt > t.as_nanos() as f64);
                if dropped || slow {
                    limit * backoff
                } else if used {
                    limit + f64::from(increase)
                } else {
                    limit
                }
            }
            LimitAlgorithm::Gradient {
                tolerance,
                smoothing,
                long_windows,
            } => {
                // The baseline is the fastest window of the recent span: the latency
                // of the dependency when it is not queueing.
                if est.recent.len() == long_windows as usize {
                    est.recent.pop_front();
                }
                est.recent.push_back(rtt);
                let long = est.recent.iter().copied().fold(f64::INFINITY, f64::min);
                let gradient = (tolerance * long / rtt.max(1.0)).clamp(0.5, 1.0);
                let mut estimate = limit * gradient + limit.sqrt();
                if dropped {
                    estimate = estimate.min(limit * 0.9);
                }
                if !used {
                    estimate = estimate.min(limit);
                }
                limit * (1.0 - smoothing) + estimate * smoothing
            }
        };
        est.limit = next.clamp(f64::from(config.min), f64::from(config.max));
        let rounded = est.limit as u32;
        if inner.limit.swap(rounded, Ordering::Relaxed) != rounded {
            metrics::gauge!("palisade_adaptive_limit").set(f64::from(rounded));
        }
    }
}

/// A slot in an [`AdaptiveConcurrency`] limit. Report how the call went with
/// [`success`](Self::success) or [`dropped`](Self::dropped); dropping it unreported
/// (a cancelled call) frees the slot and records no sample.
#[derive(Debug)]
#[must_use = "report the outcome, or the call's latency is lost"]
pub struct ShedPermit {
    limiter: AdaptiveConcurrency,
    started: Instant,
    done: bool,
}

impl ShedPermit {
    /// The call finished normally; its latency is a sample.
    pub fn success(mut self) {
        self.done = true;
        self.limiter.finish(self.started, false);
    }

    /// The call was dropped by the dependency (timeout, overload answer): a signal to
    /// lower the limit.
    pub fn dropped(mut self) {
        self.done = true;
        self.limiter.finish(self.started, true);
    }
}

impl Drop for ShedPermit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

// --- tiered degradation --------------------------------------------------------------

/// How important a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Non-core: recommendations, analytics, prefetch. Dropped first.
    Sheddable,
    /// Ordinary requests. Served degraded under high load.
    #[default]
    Normal,
    /// Core: checkout, login, health. Served while anything is.
    Critical,
}

/// How loaded the service is, by the thresholds of a [`Tiers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoadLevel {
    /// Below `tiers.elevated`: serve everything.
    Normal,
    /// Drop sheddable requests.
    Elevated,
    /// Also serve normal requests degraded.
    High,
    /// Above `tiers.critical`: core requests only.
    Critical,
}

/// What to do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Serve it fully.
    Full,
    /// Serve it, in its degraded form (cached, simplified, without extras).
    Degraded,
    /// Refuse it.
    Shed,
}

/// Load thresholds (fractions of capacity) between the levels; the common defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiers {
    /// Elevated at or above this (0.6).
    pub elevated: f64,
    /// High at or above this (0.8).
    pub high: f64,
    /// Critical at or above this (0.9).
    pub critical: f64,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers {
            elevated: 0.6,
            high: 0.8,
            critical: 0.9,
        }
    }
}

impl Tiers {
    /// Every problem with these thresholds, with its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let ordered = 0.0 <= self.elevated && self.elevated <= self.high && self.high <= self.critical;
        if ordered && self.critical.is_finite() {
            Ok(())
        } else {
            Err(ConfigErrors(vec![ConfigError::new(
                "tiers",
                "thresholds must satisfy 0 <= elevated <= high <= critical",
            )]))
        }
    }

    /// The level of `load`.
    pub fn level(&self, load: f64) -> LoadLevel {
        if load >= self.critical {
            LoadLevel::Critical
        } else if load >= self.high {
            LoadLevel::High
        } else if load >= self.elevated {
            LoadLevel::Elevated
        } else {
            LoadLevel::Normal
        }
    }
}

impl LoadLevel {
    /// The admission of a request of `priority` at this level (the degradation table).
    pub fn admit(self, priority: Priority) -> Admission {
        use {Admission::*, Priority::*};
        match (self, priority) {
            (_, Critical) => Full,
            (LoadLevel::Normal, _) => Full,
            (LoadLevel::Elevated, Normal) => Full,
            (LoadLevel::High, Normal) => Degraded,
            (_, _) => Shed,
        }
    }
}

/// A measure of load, as a fraction of capacity (1.0 = full).
pub trait LoadSignal: Send + Sync + 'static {
    /// The load now.
    fn load(&self) -> f64;
}

impl LoadSignal for AdaptiveConcurrency {
    fn load(&self) -> f64 {
        f64::from(self.in_flight()) / f64::from(self.limit().max(1))
    }
}

impl LoadSignal for Bulkhead {
    fn load(&self) -> f64 {
        self.utilization()
    }
}

/// A load value set from outside (a CPU or queue-depth sampler), read by shedders.
#[derive(Clone, Debug, Default)]
pub struct LoadGauge(Arc<AtomicU64>);

impl LoadGauge {
    /// A gauge at zero load.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the load.
    pub fn set(&self, load: f64) {
        self.0.store(load.to_bits(), Ordering::Relaxed);
    }
}

impl LoadSignal for LoadGauge {
    fn load(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Admits requests by priority according to the load level. See the
/// [module docs](self).
///
/// ```
/// use palisade_resilience::shed::{Admission, LoadGauge, Priority, Tiers, TieredShedder};
///
/// let cpu = LoadGauge::new();
/// let shedder = TieredShedder::new(cpu.clone(), Tiers::default()).unwrap();
/// cpu.set(0.85);
/// assert_eq!(shedder.admit(Priority::Sheddable), Admission::Shed);
/// assert_eq!(shedder.admit(Priority::Normal), Admission::Degraded);
/// assert_eq!(shedder.admit(Priority::Critical), Admission::Full);
/// ```
#[derive(Clone)]
pub struct TieredShedder {
    signal: Arc<dyn LoadSignal>,
    tiers: Tiers,
}

impl std::fmt::Debug for TieredShedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredShedder")
            .field("tiers", &self.tiers)
            .field("load", &self.signal.load())
            .finish()
    }
}

impl TieredShedder {
    /// A shedder reading `signal`.
    pub fn new(signal: impl LoadSignal, tiers: Tiers) -> Result<Self, ConfigErrors> {
        tiers.validate()?;
        Ok(TieredShedder {
            signal: Arc::new(signal),
            tiers,
        })
    }

    /// The load level now.
    pub fn level(&self) -> LoadLevel {
        self.tiers.level(self.signal.load())
    }

    /// What to do with a request of `priority` now.
    pub fn admit(&self, priority: Priority) -> Admission {
        match self.check(priority) {
            Ok(false) => Admission::Full,
            Ok(true) => Admission::Degraded,
            Err(_) => Admission::Shed,
        }
    }

    /// Like [`admit`](Self::admit), as a `Result` for `?`: `Ok(degraded)`. The one
    /// place a priority refusal is counted.
    pub fn check(&self, priority: Priority) -> Result<bool, Shed> {
        let level = self.level();
        match level.admit(priority) {
            Admission::Full => Ok(false),
            Admission::Degraded => Ok(true),
            Admission::Shed => {
                metrics::counter!("palisade_shed_total", "reason" => "priority").increment(1);
                Err(Shed {
                    reason: ShedReason::Priority(level),
                })
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn limiter(clock: &ManualClock, algorithm: LimitAlgorithm) -> AdaptiveConcurrency {
        AdaptiveConcurrency::with_clock(
            AdaptiveConfig {
                initial: 20,
                min: 2,
                max: 200,
                algorithm,
                window: Duration::from_millis(100),
                min_samples: 5,
            },
            clock.clone(),
        )
        .unwrap()
    }

    /// Runs `windows` windows at full concurrency with calls taking `rtt(limit)`.
    fn drive(
        l: &AdaptiveConcurrency,
        clock: &ManualClock,
        windows: usize,
        rtt: impl Fn(u32) -> Duration,
    ) -> u32 {
        for _ in 0..windows {
            let limit = l.limit();
            let permits: Vec<_> = (0..limit).map_while(|_| l.try_acquire().ok()).collect();
            clock.advance(rtt(limit).max(Duration::from_millis(100)));
            for p in permits {
                p.success();
            }
        }
        l.limit()
    }

    #[test]
    fn gradient_finds_the_knee_of_a_service_that_slows_past_50_in_flight() {
        let clock = ManualClock::new();
        let l = limiter(&clock, LimitAlgorithm::gradient());
        // 100 ms up to 50 concurrent calls, then latency grows with the queue.
        let rtt = |n: u32| Duration::from_millis(if n <= 50 { 100 } else { 100 * u64::from(n) / 50 * 3 });
        let settled = drive(&l, &clock, 200, rtt);
        assert!((35..=80).contains(&settled), "settled at {settled}");
    }

    #[test]
    fn aimd_backs_off_on_drops_and_grows_when_used() {
        let clock = ManualClock::new();
        let l = limiter(&clock, LimitAlgorithm::aimd());
        let grown = drive(&l, &clock, 10, |_| Duration::from_millis(100));
        assert_eq!(grown, 30);
        let permits: Vec<_> = (0..10).map(|_| l.try_acquire().unwrap()).collect();
        clock.advance(Duration::from_millis(100));
        for p in permits {
            p.dropped();
        }
        assert_eq!(l.limit(), 27);
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let clock = ManualClock::new();
        let l = limiter(&clock, LimitAlgorithm::aimd());
        for _ in 0..10 {
            let permits: Vec<_> = (0..5).map(|_| l.try_acquire().unwrap()).collect();
            clock.advance(Duration::from_millis(100));
            permits.into_iter().for_each(ShedPermit::success);
        }
        assert_eq!(l.limit(), 20);
    }

    #[test]
    fn cancelled_permits_free_their_slot_without_a_sample() {
        let clock = ManualClock::new();
        let l = limiter(&clock, LimitAlgorithm::aimd());
        drop(l.try_acquire().unwrap());
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.inner.window.samples.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_degradation_table_of_levels_and_priorities() {
        let gauge = LoadGauge::new();
        let s = TieredShedder::new(gauge.clone(), Tiers::default()).unwrap();
        let row = |load: f64| {
            gauge.set(load);
            [Priority::Sheddable, Priority::Normal, Priority::Critical].map(|p| s.admit(p))
        };
        use Admission::*;
        assert_eq!(row(0.5), [Full, Full, Full]);
        assert_eq!(row(0.7), [Shed, Full, Full]);
        assert_eq!(row(0.85), [Shed, Degraded, Full]);
        assert_eq!(row(0.95), [Shed, Shed, Full]);
    }

    #[test]
    fn bad_configs_name_fields() {
        let bad = AdaptiveConfig {
            min: 0,
            max: 0,
            initial: 5,
            algorithm: LimitAlgorithm::Gradient {
                tolerance: 0.5,
                smoothing: 0.0,
                long_windows: 0,
            },
            ..Default::default()
        };
        let errors = bad.validate().unwrap_err();
        let fields = errors.fields();
        assert_eq!(
            fields,
            [
                "min",
                "initial",
                "algorithm.tolerance",
                "algorithm.smoothing",
                "algorithm.long_windows"
            ]
        );
        assert!(
            Tiers {
                elevated: 0.9,
                high: 0.8,
                critical: 0.95
            }
            .validate()
            .is_err()
        );
    }
}
