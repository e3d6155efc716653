//! Sliding windows of call outcomes: the statistics failure detectors read.
//!
//! * [`CountWindow`]: the last `N` calls, as a ring of outcome codes.
//! * [`TimeWindow`]: the calls of the last `T`, in `B` buckets of `T / B` each.
//!
//! Both are lock-free: recording is a handful of relaxed atomic operations and two
//! threads recording at once never wait for each other. A snapshot taken while other
//! threads record may be off by the calls in flight; at rest it is exact (the loom
//! tests in `tests/loom.rs` check that).

mod buckets;
mod count;
mod time;

pub(crate) use buckets::Buckets;
pub use count::CountWindow;
pub use time::TimeWindow;

use std::time::Duration;

use crate::clock::Instant;

/// One finished call, as a window records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sample {
    /// The call failed (by the user's classifier).
    pub failed: bool,
    /// The call took at least the slow-call threshold.
    pub slow: bool,
}

impl Sample {
    /// A fast success.
    pub const SUCCESS: Sample = Sample {
        failed: false,
        slow: false,
    };
    /// A fast failure.
    pub const FAILURE: Sample = Sample {
        failed: true,
        slow: false,
    };
}

/// Totals over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Calls recorded.
    pub total: u64,
    /// Of those, failed calls.
    pub failures: u64,
    /// Of those, slow calls (failed or not).
    pub slow: u64,
}

impl Snapshot {
    /// `failures / total`, or 0 for an empty window.
    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.total)
    }

    /// `slow / total`, or 0 for an empty window.
    pub fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.total)
    }

    /// Builds a snapshot from racy signed counters: a counter may be briefly
    /// negative or ahead of `total` while other threads record; clamp it.
    pub(crate) fn from_raw(total: i64, failures: i64, slow: i64) -> Self {
        let total = total.max(0) as u64;
        Snapshot {
            total,
            failures: (failures.max(0) as u64).min(total),
            slow: (slow.max(0) as u64).min(total),
        }
    }
}

fn ratio(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

/// Which window a detector keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowConfig {
    /// The last `size` calls.
    Count {
        /// Number of calls kept (at least 1).
        size: u32,
    },
    /// The calls of the last `length`, in `buckets` buckets.
    Time {
        /// How far back the window reaches.
        length: Duration,
        /// Resolution: the window slides by `length / buckets` at a time.
        buckets: u32,
    },
}

impl Default for WindowConfig {
    /// The last 100 calls (Resilience4j's default).
    fn default() -> Self {
        WindowConfig::Count { size: 100 }
    }
}

/// The most calls a count window holds (each is a slot of the window's memory).
pub const MAX_COUNT_WINDOW: u32 = 100_000;

impl WindowConfig {
    /// Checks the numbers; the error names the field.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::ConfigError;
        match *self {
            WindowConfig::Count { size } if !(1..=MAX_COUNT_WINDOW).contains(&size) => Err(ConfigError::new(
                "window.size",
                format!("{size} is not between 1 and {MAX_COUNT_WINDOW}"),
            )),
            WindowConfig::Count { .. } => Ok(()),
            WindowConfig::Time { buckets: 0, .. } => {
                Err(ConfigError::new("window.buckets", "must be at least 1"))
            }
            WindowConfig::Time { length, buckets } => {
                if length < Duration::from_nanos(u64::from(buckets)) {
                    Err(ConfigError::new(
                        "window.length",
                        "must be at least one nanosecond per bucket",
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A count- or time-based window, chosen by [`WindowConfig`].
#[derive(Debug)]
pub enum SlidingWindow {
    /// See [`CountWindow`].
    Count(CountWindow),
    /// See [`TimeWindow`].
    Time(TimeWindow),
}

impl SlidingWindow {
    /// A window as configured. The config must be valid ([`WindowConfig::validate`]).
    pub fn new(config: WindowConfig) -> Self {
        match config {
            WindowConfig::Count { size } => SlidingWindow::Count(CountWindow::new(size)),
            WindowConfig::Time { length, buckets } => SlidingWindow::Time(TimeWindow::new(length, buckets)),
        }
    }

    /// Records one call that finished at `now`.
    #[inline]
    pub fn record(&self, now: Instant, sample: Sample) {
        match self {
            SlidingWindow::Count(w) => w.record(sample),
            SlidingWindow::Time(w) => w.record(now, sample),
        }
    }

    /// Totals as of `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        match self {
            SlidingWindow::Count(w) => w.snapshot(),
            SlidingWindow::Time(w) => w.snapshot(now),
        }
    }

    /// Forgets every call.
    pub fn reset(&self) {
        match self {
            SlidingWindow::Count(w) => w.reset(),
            SlidingWindow::Time(w) => w.reset(),
        }
    }
}
