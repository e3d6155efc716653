//! Passive outlier detection (Envoy's vocabulary): every real response tells us
//! something about its endpoint. An endpoint that answers 5xx too often in a row,
//! fails at the connection level too often in a row, or fails too large a share of
//! its recent requests is **ejected**: taken out of rotation for a while.
//!
//! * The ejection time grows with repeated ejections: `base_ejection_time x n` for the
//!   n-th ejection, capped at `max_ejection_time`. An endpoint that stays clean for
//!   `max_ejection_time` after returning starts again at `n = 1`.
//! * At most `max_ejection_percent` of a cluster is ejected at once, so a bad
//!   deploy that makes every endpoint fail cannot eject them all.
//! * An ejected endpoint comes back by itself when its time is up (no probe needed);
//!   its streaks and window start empty.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use palisade_core::Instant;
use palisade_resilience::window::{Sample, SlidingWindow, WindowConfig};

/// Outlier detection settings for a cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// Eject after this many 5xx responses in a row (`None`: off).
    pub consecutive_5xx: Option<u32>,
    /// Eject after this many gateway failures in a row: connect errors, resets,
    /// timeouts, 502/503/504 (`None`: off).
    pub consecutive_gateway_failure: Option<u32>,
    /// Eject when the failure rate over a time window passes a threshold.
    pub failure_rate: Option<FailureRate>,
    /// The first ejection lasts this long; the n-th lasts n times as long.
    pub base_ejection_time: Duration,
    /// No ejection lasts longer.
    pub max_ejection_time: Duration,
    /// At most this share of the cluster's endpoints is ejected at once (0-100).
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: Some(5),
            failure_rate: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Failure-rate ejection.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureRate {
    /// Eject at or above this failure share (0.0-1.0).
    pub threshold: f64,
    /// Judge only with at least this many requests in the window.
    pub minimum_requests: u32,
    /// The window's length.
    pub window: Duration,
}

/// What one request told us about its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// A response that is not a server error.
    Success,
    /// A 5xx from the endpoint itself (500, 501, 505..).
    ServerError,
    /// A gateway failure: connect error, reset, timeout, or a 502/503/504 answer.
    GatewayFailure,
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectReason {
    /// Too many 5xx in a row.
    Consecutive5xx,
    /// Too many gateway failures in a row.
    ConsecutiveGatewayFailure,
    /// Failure rate over the threshold.
    FailureRate,
}

impl EjectReason {
    /// A stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectReason::FailureRate => "failure_rate",
        }
    }
}

/// An ejection that just happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Why.
    pub reason: EjectReason,
    /// For how long.
    pub duration: Duration,
    /// The how-many-th ejection of this endpoint it is.
    pub count: u32,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    window: Option<SlidingWindow>,
    /// Nanos; the endpoint is ejected while `now < ejected_until`.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl OutlierState {
    pub(crate) fn new(config: Option<&OutlierConfig>) -> Self {
        let window = config.and_then(|c| c.failure_rate.as_ref()).map(|f| {
            SlidingWindow::new(WindowConfig::Time {
                length: f.window,
                buckets: 10,
            })
        });
        OutlierState {
            window,
            ..OutlierState::default()
        }
    }

    /// Whether the endpoint is ejected at `now`.
    #[inline]
    pub fn is_ejected(&self, now: Instant) -> bool {
        now.as_nanos() < self.ejected_until.load(Ordering::Relaxed)
    }

    /// When the current (or last) ejection ends.
    pub fn ejected_until(&self) -> Instant {
        Instant::from_nanos(self.ejected_until.load(Ordering::Relaxed))
    }

    /// How many times it has been ejected (since it last stayed clean for
    /// `max_ejection_time`).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Records one result. Returns the ejection to perform if a detector trips and
    /// `may_eject()` (the cluster's cap) agrees; the caller then calls
    /// [`eject`](Self::eject). Results that arrive while ejected are ignored (they
    /// were sent before the ejection).
    pub fn record(&self, now: Instant, result: CallResult, config: &OutlierConfig) -> Option<EjectReason> {
        if self.is_ejected(now) {
            return None;
        }
        let (c5, cgw) = match result {
            CallResult::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                (0, 0)
            }
            CallResult::ServerError => {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                (self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1, 0)
            }
            CallResult::GatewayFailure => (
                // A gateway failure is also a 5xx as far as the client is concerned.
                self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
                self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
            ),
        };
        if let Some(w) = &self.window {
            let sample = if result == CallResult::Success {
                Sample::SUCCESS
            } else {
                Sample::FAILURE
            };
            w.record(now, sample);
        }
        if config.consecutive_gateway_failure.is_some_and(|n| cgw >= n) {
            return Some(EjectReason::ConsecutiveGatewayFailure);
        }
        if config.consecutive_5xx.is_some_and(|n| c5 >= n) {
            return Some(EjectReason::Consecutive5xx);
        }
        if result != CallResult::Success
            && let (Some(w), Some(f)) = (&self.window, &config.failure_rate)
        {
            let s = w.snapshot(now);
            if s.total >= u64::from(f.minimum_requests) && s.failure_rate() >= f.threshold {
                return Some(EjectReason::FailureRate);
            }
        }
        None
    }

    /// Ejects the endpoint from `now`; returns how long for. The streaks and the
    /// window start again empty.
    pub fn eject(&self, now: Instant, reason: EjectReason, config: &OutlierConfig) -> Ejection {
        let last_end = self.ejected_until.load(Ordering::Relaxed);
        let clean_for = now.as_nanos().saturating_sub(last_end);
        let count = if last_end != 0 && Duration::from_nanos(clean_for) >= config.max_ejection_time {
            self.ejections.store(1, Ordering::Relaxed);
            1
        } else {
            self.ejections.fetch_add(1, Ordering::Relaxed) + 1
        };
        let duration = config
            .base_ejection_time
            .saturating_mul(count)
            .min(config.max_ejection_time);
        self.ejected_until
            .store((now + duration).as_nanos(), Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        if let Some(w) = &self.window {
            w.reset();
        }
        Ejection {
            reason,
            duration,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: Some(3),
            consecutive_gateway_failure: Some(2),
            failure_rate: None,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_5xx_trips_and_a_success_resets() {
        let c = config();
        let o = OutlierState::new(Some(&c));
        assert_eq!(o.record(at(0), CallResult::ServerError, &c), None);
        assert_eq!(o.record(at(0), CallResult::ServerError, &c), None);
        assert_eq!(o.record(at(0), CallResult::Success, &c), None);
        assert_eq!(o.record(at(0), CallResult::ServerError, &c), None);
        assert_eq!(o.record(at(0), CallResult::ServerError, &c), None);
        assert_eq!(
            o.record(at(0), CallResult::ServerError, &c),
            Some(EjectReason::Consecutive5xx)
        );
    }

    #[test]
    fn gateway_failures_trip_their_own_streak() {
        let c = config();
        let o = OutlierState::new(Some(&c));
        assert_eq!(o.record(at(0), CallResult::GatewayFailure, &c), None);
        assert_eq!(
            o.record(at(0), CallResult::GatewayFailure, &c),
            Some(EjectReason::ConsecutiveGatewayFailure)
        );
    }

    #[test]
    fn ejection_time_grows_caps_and_resets_after_a_clean_spell() {
        let c = config();
        let o = OutlierState::new(Some(&c));
        let e = o.eject(at(0), EjectReason::Consecutive5xx, &c);
        assert_eq!((e.count, e.duration), (1, Duration::from_secs(10)));
        assert!(o.is_ejected(at(9_999)));
        assert!(!o.is_ejected(at(10_000)));
        assert_eq!(
            o.record(at(5_000), CallResult::ServerError, &c),
            None,
            "ignored while ejected"
        );
        let e = o.eject(at(11_000), EjectReason::Consecutive5xx, &c);
        assert_eq!((e.count, e.duration), (2, Duration::from_secs(20)));
        let e = o.eject(at(32_000), EjectReason::Consecutive5xx, &c);
        assert_eq!((e.count, e.duration), (3, Duration::from_secs(25)), "capped");
        // Back at 57 s; clean until 82 s (25 s = max_ejection_time): starts again at 1.
        let e = o.eject(at(82_000), EjectReason::Consecutive5xx, &c);
        assert_eq!((e.count, e.duration), (1, Duration::from_secs(10)));
    }

    #[test]
    fn failure_rate_needs_volume() {
        let c = OutlierConfig {
            consecutive_5xx: None,
            consecutive_gateway_failure: None,
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                minimum_requests: 4,
                window: Duration::from_secs(10),
            }),
            ..config()
        };
        let o = OutlierState::new(Some(&c));
        assert_eq!(o.record(at(0), CallResult::ServerError, &c), None);
        assert_eq!(o.record(at(1), CallResult::Success, &c), None);
        assert_eq!(o.record(at(2), CallResult::ServerError, &c), None, "3 calls < 4");
        assert_eq!(
            o.record(at(3), CallResult::ServerError, &c),
            Some(EjectReason::FailureRate)
        );
    }
}
