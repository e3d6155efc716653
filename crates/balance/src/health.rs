//! Active health: the verdicts of periodic probes, turned into healthy / unhealthy
//! with thresholds (as in Envoy, HAProxy and pingora): an endpoint becomes unhealthy
//! after `unhealthy_threshold` failed probes in a row, and healthy again after
//! `healthy_threshold` passing probes in a row. One probe never flips it.
//!
//! The probing itself (an HTTP request or a TCP connect, with a timeout, every
//! interval) is the gateway's; this module only counts.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Probe thresholds and timing.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthConfig {
    /// Time between probes of one endpoint.
    pub interval: Duration,
    /// A probe that takes longer has failed.
    pub timeout: Duration,
    /// Passing probes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Failed probes in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// A change of an endpoint's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// It passed enough probes in a row.
    BecameHealthy,
    /// It failed enough probes in a row.
    BecameUnhealthy,
}

const UNHEALTHY: u32 = 1 << 31;

/// One endpoint's active-health state: a flag and a streak counter in one atomic.
/// Endpoints start healthy (a new endpoint is not punished before its first probe).
#[derive(Debug, Default)]
pub struct HealthState {
    /// Bit 31: unhealthy. Bits 0..31: the current streak of probes that disagree
    /// with the flag.
    word: AtomicU32,
}

impl HealthState {
    /// Healthy, no streak.
    pub fn new() -> Self {
        HealthState::default()
    }

    /// Whether the endpoint is healthy.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.word.load(Ordering::Relaxed) & UNHEALTHY == 0
    }

    /// Records one probe's verdict; returns the transition it caused, if any.
    pub fn record(&self, passed: bool, config: &HealthConfig) -> Option<Transition> {
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let unhealthy = cur & UNHEALTHY != 0;
            let (next, transition) = if passed != unhealthy {
                // The probe agrees with the current state: the streak resets.
                (cur & UNHEALTHY, None)
            } else {
                let streak = (cur & !UNHEALTHY) + 1;
                let threshold = if unhealthy {
                    config.healthy_threshold
                } else {
                    config.unhealthy_threshold
                };
                if streak >= threshold.max(1) {
                    let t = if unhealthy {
                        Transition::BecameHealthy
                    } else {
                        Transition::BecameUnhealthy
                    };
                    ((cur & UNHEALTHY) ^ UNHEALTHY, Some(t))
                } else {
                    ((cur & UNHEALTHY) | streak, None)
                }
            };
            match self
                .word
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return transition,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_streaks() {
        let c = HealthConfig {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthConfig::default()
        };
        let h = HealthState::new();
        assert!(h.is_healthy());
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(true, &c), None, "a pass breaks the failing streak");
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), Some(Transition::BecameUnhealthy));
        assert!(!h.is_healthy());
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(false, &c), None, "a failure breaks the passing streak");
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(true, &c), Some(Transition::BecameHealthy));
        assert!(h.is_healthy());
    }
}
