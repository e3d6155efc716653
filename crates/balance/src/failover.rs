//! Failover tiers (Envoy's priority levels): endpoints are grouped in priority tiers
//! (0 = local, 1 = standby, 2 = disaster recovery, ...). Traffic goes to the first
//! tier whose healthy share is at least `healthy_threshold`. It moves to a later
//! tier as soon as the current one falls below, and moves back to an earlier tier
//! only after that tier has stayed healthy for `stable_period` (no flapping between
//! data centres on every blip).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use palisade_core::Instant;

/// Failover settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverConfig {
    /// A tier serves while at least this share of its endpoints is healthy (0.0-1.0).
    pub healthy_threshold: f64,
    /// An earlier tier takes traffic back only after being healthy this long.
    pub stable_period: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            healthy_threshold: 0.5,
            stable_period: Duration::from_secs(30),
        }
    }
}

/// A change of the serving tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The tier that served before.
    pub from: usize,
    /// The tier that serves now.
    pub to: usize,
}

/// The failover state of one cluster: which tier serves, and since when each tier
/// has been healthy.
#[derive(Debug)]
pub struct Failover {
    active: AtomicUsize,
    /// Per tier: nanos + 1 since when it has been at or above the threshold; 0 if not.
    healthy_since: Vec<AtomicU64>,
}

impl Failover {
    /// State for `tiers` tiers, serving from the first.
    pub fn new(tiers: usize) -> Self {
        Failover {
            active: AtomicUsize::new(0),
            healthy_since: (0..tiers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The serving tier (an index into the tiers, in priority order).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Decides the serving tier from each tier's healthy share at `now`. Returns the
    /// tier, and the switch if this call made one (exactly one caller sees each).
    pub fn choose(&self, now: Instant, shares: &[f64], config: &FailoverConfig) -> (usize, Option<Switch>) {
        let tiers = shares.len().min(self.healthy_since.len());
        if tiers == 0 {
            return (0, None);
        }
        let stamp = now.as_nanos().saturating_add(1);
        let mut first_healthy = None;
        let mut first_stable = None;
        for (t, &share) in shares.iter().enumerate().take(tiers) {
            let since = &self.healthy_since[t];
            if share >= config.healthy_threshold && share > 0.0 {
                let s = match since.load(Ordering::Relaxed) {
                    0 => {
                        since.store(stamp, Ordering::Relaxed);
                        stamp
                    }
                    s => s,
                };
                first_healthy.get_or_insert(t);
                if Duration::from_nanos(stamp - s.min(stamp)) >= config.stable_period {
                    first_stable.get_or_insert(t);
                }
            } else {
                since.store(0, Ordering::Relaxed);
            }
        }
        let active = self.active().min(tiers - 1);
        let target = match first_healthy {
            // The serving tier is still healthy: move earlier only to a stable tier.
            Some(h) if h <= active && shares[active] >= config.healthy_threshold => {
                first_stable.filter(|&s| s < active).unwrap_or(active)
            }
            // The serving tier fell below: go to the first healthy one (later or, if
            // an earlier one is healthy but not yet stable, still the first healthy
            // one at or after the active tier when there is one).
            Some(h) => {
                let later =
                    (active..tiers).find(|&t| shares[t] >= config.healthy_threshold && shares[t] > 0.0);
                match (first_stable.filter(|&s| s < active), later) {
                    (Some(s), _) => s,
                    (None, Some(l)) => l,
                    (None, None) => h,
                }
            }
            // No tier is healthy enough: the one with the largest healthy share
            // (earliest on ties) is the best we have.
            None => {
                let mut best = 0;
                for t in 1..tiers {
                    if shares[t] > shares[best] {
                        best = t;
                    }
                }
                best
            }
        };
        if target != active
            && self
                .active
                .compare_exchange(active, target, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return (
                target,
                Some(Switch {
                    from: active,
                    to: target,
                }),
            );
        }
        (self.active().min(tiers - 1), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Instant {
        Instant::from_nanos(s * 1_000_000_000)
    }

    fn config() -> FailoverConfig {
        FailoverConfig {
            healthy_threshold: 0.5,
            stable_period: Duration::from_secs(30),
        }
    }

    #[test]
    fn fails_over_at_once_and_back_only_after_the_stable_period() {
        let f = Failover::new(3);
        let c = config();
        assert_eq!(f.choose(at(0), &[1.0, 1.0, 1.0], &c), (0, None));
        assert_eq!(
            f.choose(at(1), &[0.25, 1.0, 1.0], &c),
            (1, Some(Switch { from: 0, to: 1 }))
        );
        // Tier 0 recovers at 10 s; it must stay healthy until 40 s.
        assert_eq!(f.choose(at(10), &[1.0, 1.0, 1.0], &c), (1, None));
        assert_eq!(f.choose(at(39), &[1.0, 1.0, 1.0], &c), (1, None));
        assert_eq!(
            f.choose(at(40), &[1.0, 1.0, 1.0], &c),
            (0, Some(Switch { from: 1, to: 0 }))
        );
    }

    #[test]
    fn a_blip_restarts_the_stable_period() {
        let f = Failover::new(2);
        let c = config();
        f.choose(at(0), &[0.0, 1.0], &c);
        assert_eq!(f.active(), 1);
        f.choose(at(10), &[1.0, 1.0], &c);
        f.choose(at(20), &[0.0, 1.0], &c); // blip
        f.choose(at(25), &[1.0, 1.0], &c);
        assert_eq!(f.choose(at(50), &[1.0, 1.0], &c).0, 1, "healthy since 25 s only");
        assert_eq!(f.choose(at(55), &[1.0, 1.0], &c).0, 0);
    }

    #[test]
    fn skips_unhealthy_tiers_and_falls_to_the_best_when_none_is_healthy() {
        let f = Failover::new(3);
        let c = config();
        assert_eq!(f.choose(at(0), &[0.0, 0.2, 0.9], &c).0, 2);
        assert_eq!(
            f.choose(at(1), &[0.1, 0.4, 0.3], &c).0,
            1,
            "none healthy: the best share"
        );
        assert_eq!(f.choose(at(2), &[0.1, 0.2, 0.3], &c).0, 2);
    }

    #[test]
    fn moves_later_when_the_serving_tier_fails_even_if_an_earlier_one_is_unstable() {
        let f = Failover::new(3);
        let c = config();
        f.choose(at(0), &[0.0, 1.0, 1.0], &c);
        assert_eq!(f.active(), 1);
        // Tier 0 just recovered (not stable), tier 1 fails: go to tier 2, not 0.
        assert_eq!(f.choose(at(5), &[1.0, 0.0, 1.0], &c).0, 2);
    }
}
