use std::time::Duration;

use crate::window::WindowConfig;
use crate::{ConfigError, ConfigErrors};

/// Upper bound of `half_open_probes` and `success_threshold`: each is a 16-bit
/// field of the breaker's packed state word.
pub(crate) const MAX_PROBES: u32 = 0xFFFF;

/// How a [`CircuitBreaker`](super::CircuitBreaker) decides and recovers.
///
/// The default is the usual "combined strategy": trip on 5 consecutive failures
/// **or** a failure rate of 50% over the last 100 calls once at least 20 were seen;
/// stay open 30 s; then let up to 3 probes through and close after 3 successes.
///
/// ```
/// use palisade_resilience::breaker::{BreakerConfig, OpenDuration};
/// use palisade_resilience::window::WindowConfig;
/// use std::time::Duration;
///
/// let config = BreakerConfig::default()
///     .window(WindowConfig::Time { length: Duration::from_secs(10), buckets: 10 })
///     .failure_rate(0.5, 10)
///     .slow_calls(Duration::from_secs(2), 0.8, 10)
///     .open_duration(OpenDuration::backoff(Duration::from_secs(5), 2.0, Duration::from_secs(120)));
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// The window the rate detectors read.
    pub window: WindowConfig,
    /// Trip after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    /// Trip when the failure rate over the window reaches a threshold.
    pub failure_rate: Option<RateThreshold>,
    /// Trip when the share of slow calls over the window reaches a threshold.
    pub slow_call: Option<SlowCallThreshold>,
    /// How long to stay open before probing.
    pub open_duration: OpenDuration,
    /// At most this many half-open probes in flight at once.
    pub half_open_probes: u32,
    /// Successful probes needed to close again.
    pub success_threshold: u32,
}

/// A rate threshold with a minimum number of calls before it is judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateThreshold {
    /// Trip when the rate is at least this (0 < threshold <= 1).
    pub threshold: f64,
    /// Judge only once the window holds at least this many calls.
    pub min_calls: u32,
}

/// What a slow call is, and what share of them trips the breaker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowCallThreshold {
    /// A call taking at least this long is slow (whatever its outcome).
    pub duration: Duration,
    /// Trip when the share of slow calls is at least this (0 < rate <= 1).
    pub rate: f64,
    /// Judge only once the window holds at least this many calls.
    pub min_calls: u32,
}

/// How long the breaker stays open.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpenDuration {
    /// Always the same.
    Fixed(Duration),
    /// `initial x multiplier^n` after the n-th re-open in a row (a half-open probe
    /// failed), capped at `max`; back to `initial` once the breaker closes.
    Backoff {
        /// First open period.
        initial: Duration,
        /// Growth per re-open (at least 1).
        multiplier: f64,
        /// Upper bound.
        max: Duration,
    },
}

impl OpenDuration {
    /// Shorthand for [`OpenDuration::Backoff`].
    pub fn backoff(initial: Duration, multiplier: f64, max: Duration) -> Self {
        OpenDuration::Backoff {
            initial,
            multiplier,
            max,
        }
    }

    /// The open period after `reopens` re-opens in a row.
    pub fn after_reopens(&self, reopens: u32) -> Duration {
        match *self {
            OpenDuration::Fixed(d) => d,
            OpenDuration::Backoff {
                initial,
                multiplier,
                max,
            } => crate::retry::exponential(initial, multiplier, max, reopens.saturating_add(1)),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: WindowConfig::default(),
            consecutive_failures: Some(5),
            failure_rate: Some(RateThreshold {
                threshold: 0.5,
                min_calls: 20,
            }),
            slow_call: None,
            open_duration: OpenDuration::Fixed(Duration::from_secs(30)),
            half_open_probes: 3,
            success_threshold: 3,
        }
    }
}

impl BreakerConfig {
    /// A config with no detector at all: add at least one before use.
    pub fn empty() -> Self {
        BreakerConfig {
            consecutive_failures: None,
            failure_rate: None,
            ..Self::default()
        }
    }

    /// Sets the sliding window.
    pub fn window(mut self, window: WindowConfig) -> Self {
        self.window = window;
        self
    }

    /// Trips after `n` failures in a row.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Trips when at least `threshold` of the window's calls failed, once it holds `min_calls`.
    pub fn failure_rate(mut self, threshold: f64, min_calls: u32) -> Self {
        self.failure_rate = Some(RateThreshold { threshold, min_calls });
        self
    }

    /// Calls of at least `duration` are slow; trips when at least `rate` of the
    /// window's calls were slow, once it holds `min_calls`.
    pub fn slow_calls(mut self, duration: Duration, rate: f64, min_calls: u32) -> Self {
        self.slow_call = Some(SlowCallThreshold {
            duration,
            rate,
            min_calls,
        });
        self
    }

    /// Sets the open period.
    pub fn open_duration(mut self, open: OpenDuration) -> Self {
        self.open_duration = open;
        self
    }

    /// Sets the half-open probe limit and the successes needed to close.
    pub fn half_open(mut self, probes: u32, success_threshold: u32) -> Self {
        self.half_open_probes = probes;
        self.success_threshold = success_threshold;
        self
    }

    /// Checks every field and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if let Err(e) = self.window.validate() {
            errors.push(e);
        }
        if self.consecutive_failures == Some(0) {
            errors.push(ConfigError::new("consecutive_failures", "must be at least 1"));
        }
        if let Some(r) = &self.failure_rate {
            check_rate(&mut errors, "failure_rate.threshold", r.threshold);
            check_min_calls(&mut errors, "failure_rate.min_calls", r.min_calls);
        }
        if let Some(s) = &self.slow_call {
            check_rate(&mut errors, "slow_call.rate", s.rate);
            check_min_calls(&mut errors, "slow_call.min_calls", s.min_calls);
            if s.duration.is_zero() {
                errors.push(ConfigError::new(
                    "slow_call.duration",
                    "must be greater than zero",
                ));
            }
        }
        if self.consecutive_failures.is_none() && self.failure_rate.is_none() && self.slow_call.is_none() {
            errors.push(ConfigError::new(
                "consecutive_failures",
                "no detector configured: set consecutive_failures, failure_rate or slow_call",
            ));
        }
        match self.open_duration {
            OpenDuration::Fixed(d) if d.is_zero() => {
                errors.push(ConfigError::new("open_duration", "must be greater than zero"))
            }
            OpenDuration::Backoff {
                initial,
                multiplier,
                max,
            } => {
                if initial.is_zero() {
                    errors.push(ConfigError::new(
                        "open_duration.initial",
                        "must be greater than zero",
                    ));
                }
                if !(multiplier.is_finite() && multiplier >= 1.0) {
                    errors.push(ConfigError::new(
                        "open_duration.multiplier",
                        "must be a number >= 1",
                    ));
                }
                if max < initial {
                    errors.push(ConfigError::new(
                        "open_duration.max",
                        "must be at least open_duration.initial",
                    ));
                }
            }
            OpenDuration::Fixed(_) => {}
        }
        if !(1..=MAX_PROBES).contains(&self.half_open_probes) {
            errors.push(ConfigError::new(
                "half_open_probes",
                format!("must be between 1 and {}", MAX_PROBES),
            ));
        }
        if !(1..=MAX_PROBES).contains(&self.success_threshold) {
            errors.push(ConfigError::new(
                "success_threshold",
                format!("must be between 1 and {}", MAX_PROBES),
            ));
        }
        ConfigErrors::result(errors)
    }
}

fn check_rate(errors: &mut Vec<ConfigError>, field: &'static str, rate: f64) {
    if !(rate > 0.0 && rate <= 1.0) {
        errors.push(ConfigError::new(field, "must be in (0, 1], e.g. 0.5 for 50%"));
    }
}

fn check_min_calls(errors: &mut Vec<ConfigError>, field: &'static str, n: u32) {
    if n == 0 {
        errors.push(ConfigError::new(field, "must be at least 1"));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let bad = BreakerConfig {
            window: WindowConfig::Count { size: 0 },
            consecutive_failures: Some(0),
            failure_rate: Some(RateThreshold {
                threshold: 1.5,
                min_calls: 0,
            }),
            slow_call: None,
            open_duration: OpenDuration::Backoff {
                initial: Duration::from_secs(10),
                multiplier: 0.5,
                max: Duration::from_secs(1),
            },
            half_open_probes: 0,
            success_threshold: 1,
        };
        let errors = bad.validate().unwrap_err();
        let fields = errors.fields();
        assert_eq!(
            fields,
            [
                "window.size",
                "consecutive_failures",
                "failure_rate.threshold",
                "failure_rate.min_calls",
                "open_duration.multiplier",
                "open_duration.max",
                "half_open_probes"
            ]
        );
    }

    #[test]
    fn default_is_valid_and_empty_is_not() {
        BreakerConfig::default().validate().unwrap();
        let err = BreakerConfig::empty().validate().unwrap_err();
        assert!(err.to_string().contains("no detector configured"), "{err}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let o = OpenDuration::backoff(Duration::from_secs(1), 2.0, Duration::from_secs(5));
        let got: Vec<_> = (0..5).map(|n| o.after_reopens(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        assert_eq!(o.after_reopens(u32::MAX), Duration::from_secs(5));
    }
}
