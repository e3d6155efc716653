//! Failure detectors: when is a dependency unhealthy?
//!
//! Each detector is usable on its own (outlier detection in the gateway reuses them);
//! [`Detector`] combines them the way the breaker does: any one of them trips.

use super::config::{BreakerConfig, RateThreshold, SlowCallThreshold};
use crate::clock::Instant;
use crate::sync::{AtomicU32, Ordering};
use crate::window::{Sample, SlidingWindow, Snapshot};

/// Why a detector tripped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trip {
    /// `count` failures in a row reached the threshold.
    ConsecutiveFailures {
        /// Failures in a row.
        count: u32,
    },
    /// The failure rate over the window reached the threshold.
    FailureRate {
        /// Observed rate (0..=1).
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// The slow-call rate over the window reached the threshold.
    SlowCallRate {
        /// Observed rate (0..=1).
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
}

/// Counts failures in a row; a success resets the count.
#[derive(Debug)]
pub struct ConsecutiveFailures {
    threshold: u32,
    count: AtomicU32,
}

impl ConsecutiveFailures {
    /// Trips at `threshold` failures in a row (`threshold >= 1`).
    pub fn new(threshold: u32) -> Self {
        ConsecutiveFailures {
            threshold: threshold.max(1),
            count: AtomicU32::new(0),
        }
    }

    /// Records one outcome; returns the run length if it reached the threshold.
    #[inline]
    pub fn record(&self, failed: bool) -> Option<u32> {
        if failed {
            let count = self.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            (count >= self.threshold).then_some(count)
        } else {
            // Read first: a healthy service must not write this line on every call.
            if self.count.load(Ordering::Relaxed) != 0 {
                self.count.store(0, Ordering::Relaxed);
            }
            None
        }
    }

    /// Failures in a row so far.
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    /// Back to zero.
    pub fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
    }
}

/// Judges a window's failure rate.
#[derive(Clone, Copy, Debug)]
pub struct FailureRate(pub RateThreshold);

impl FailureRate {
    /// `Some(rate)` when the window holds enough calls and the rate reaches the threshold.
    #[inline]
    pub fn judge(&self, s: &Snapshot) -> Option<f64> {
        judge(s.failures, s.total, self.0.threshold, self.0.min_calls)
    }
}

/// Judges a window's slow-call rate.
#[derive(Clone, Copy, Debug)]
pub struct SlowCallRate(pub SlowCallThreshold);

impl SlowCallRate {
    /// `Some(rate)` when the window holds enough calls and the slow rate reaches the threshold.
    #[inline]
    pub fn judge(&self, s: &Snapshot) -> Option<f64> {
        judge(s.slow, s.total, self.0.rate, self.0.min_calls)
    }
}

#[inline]
fn judge(part: u64, total: u64, threshold: f64, min_calls: u32) -> Option<f64> {
    if total < u64::from(min_calls) || total == 0 {
        return None;
    }
    let rate = part as f64 / total as f64;
    (rate >= threshold).then_some(rate)
}

/// The combined detector: a window plus every configured detector; any one trips.
///
/// Rates are judged when a failed or slow call is recorded: a healthy call can lower
/// a rate but never raise it, so the breaker never opens on a success.
#[derive(Debug)]
pub struct Detector {
    window: SlidingWindow,
    consecutive: Option<ConsecutiveFailures>,
    failure_rate: Option<FailureRate>,
    slow_rate: Option<SlowCallRate>,
}

impl Detector {
    /// The detectors a breaker config asks for.
    pub fn from_config(config: &BreakerConfig) -> Self {
        Detector {
            window: SlidingWindow::new(config.window),
            consecutive: config.consecutive_failures.map(ConsecutiveFailures::new),
            failure_rate: config.failure_rate.map(FailureRate),
            slow_rate: config.slow_call.map(SlowCallRate),
        }
    }

    /// Records one call finished at `now`; says whether (and why) to trip.
    #[inline]
    pub fn record(&self, now: Instant, sample: Sample) -> Option<Trip> {
        self.window.record(now, sample);
        let run = self.consecutive.as_ref().and_then(|c| c.record(sample.failed));
        if let Some(count) = run {
            return Some(Trip::ConsecutiveFailures { count });
        }
        if !(sample.failed || sample.slow) {
            return None;
        }
        self.judge_window(now)
    }

    #[cold]
    fn judge_window(&self, now: Instant) -> Option<Trip> {
        let s = self.window.snapshot(now);
        if let Some(rate) = self.failure_rate.and_then(|d| d.judge(&s)) {
            return Some(Trip::FailureRate { rate, calls: s.total });
        }
        self.slow_rate
            .and_then(|d| d.judge(&s))
            .map(|rate| Trip::SlowCallRate { rate, calls: s.total })
    }

    /// The window's totals at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        self.window.snapshot(now)
    }

    /// Failures in a row so far (0 without a consecutive detector).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.as_ref().map_or(0, ConsecutiveFailures::count)
    }

    /// Forgets everything.
    pub fn reset(&self) {
        self.window.reset();
        if let Some(c) = &self.consecutive {
            c.reset();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_consecutive_failure_table() {
        // Consecutive-failure method: threshold 5; F F S F F F F F trips at request 8.
        let d = ConsecutiveFailures::new(5);
        let outcomes = [true, true, false, true, true, true, true, true];
        let runs = [1, 2, 0, 1, 2, 3, 4, 5];
        for (i, (&failed, &run)) in outcomes.iter().zip(&runs).enumerate() {
            let tripped = d.record(failed);
            assert_eq!(d.count(), run, "request {}", i + 1);
            assert_eq!(tripped.is_some(), i == 7, "request {}", i + 1);
        }
    }

    #[test]
    fn rate_needs_min_calls() {
        let r = FailureRate(RateThreshold {
            threshold: 0.5,
            min_calls: 10,
        });
        // Failure-rate method: 1 of 1 failed is 100% but below the minimum volume.
        assert_eq!(
            r.judge(&Snapshot {
                total: 1,
                failures: 1,
                slow: 0
            }),
            None
        );
        assert_eq!(
            r.judge(&Snapshot {
                total: 10,
                failures: 6,
                slow: 0
            }),
            Some(0.6)
        );
        assert_eq!(
            r.judge(&Snapshot {
                total: 10,
                failures: 4,
                slow: 0
            }),
            None
        );
    }

    #[test]
    fn combined_trips_on_whichever_comes_first() {
        let cfg = BreakerConfig::empty()
            .consecutive_failures(3)
            .failure_rate(0.5, 4)
            .window(crate::window::WindowConfig::Count { size: 10 });
        let d = Detector::from_config(&cfg);
        let t = Instant::ZERO;
        assert_eq!(d.record(t, Sample::FAILURE), None);
        assert_eq!(d.record(t, Sample::SUCCESS), None);
        assert_eq!(d.record(t, Sample::FAILURE), None);
        // 4 calls, 3 failed: 75% >= 50% with min 4 -> the rate detector trips first.
        assert_eq!(
            d.record(t, Sample::FAILURE),
            Some(Trip::FailureRate { rate: 0.75, calls: 4 })
        );
        d.reset();
        let d2 = Detector::from_config(&cfg.clone().failure_rate(0.9, 100));
        assert_eq!(d2.record(t, Sample::FAILURE), None);
        assert_eq!(d2.record(t, Sample::FAILURE), None);
        assert_eq!(
            d2.record(t, Sample::FAILURE),
            Some(Trip::ConsecutiveFailures { count: 3 })
        );
    }
}
