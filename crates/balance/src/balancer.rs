//! Load balancers: given the endpoints of one tier and which of them may take this
//! request, pick one.
//!
//! | policy | picks | state |
//! |---|---|---|
//! | `RoundRobin` | each in turn | one counter |
//! | `WeightedRoundRobin` | nginx's smooth weighted round robin (weights 5,1,1 give a a b a c a a, not a a a a a b c) | a small mutex |
//! | `Random` | uniformly | none |
//! | `LeastRequest` | the less loaded of two random picks (power of two choices) | none |
//! | `PeakEwma` | the cheaper of two random picks by peak-EWMA latency x (in flight + 1) (linkerd) | none |
//! | `RingHash` | by request key on a ring with virtual nodes | the ring |
//! | `Maglev` | by request key in a maglev table | the table |
//!
//! Requests without a key under a hash policy are balanced randomly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_core::Instant;

use crate::endpoint::EndpointState;
use crate::hash::{Maglev, Ring};

/// Which load-balancing algorithm a cluster uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LbPolicy {
    /// Each endpoint in turn.
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of two choices on requests in flight.
    #[default]
    LeastRequest,
    /// Power of two choices on peak-EWMA latency x load.
    PeakEwma,
    /// Consistent hashing on a ring with this many virtual nodes per unit of weight.
    RingHash {
        /// Virtual nodes per endpoint (times its weight).
        vnodes: u32,
    },
    /// Maglev consistent hashing with a table of this many slots (a prime).
    Maglev {
        /// Table size.
        table_size: u32,
    },
}

impl LbPolicy {
    /// Whether the policy uses a request key.
    pub fn is_hash(&self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// The per-tier state of a policy, built when the endpoint set changes.
#[derive(Debug)]
pub(crate) enum Picker {
    RoundRobin(AtomicUsize),
    Weighted(Mutex<Vec<i64>>),
    Random,
    LeastRequest,
    PeakEwma,
    Ring(Ring),
    Maglev(Maglev),
}

impl Picker {
    /// Builds the picker for `members` (indices into `endpoints`).
    pub(crate) fn new(
        policy: &LbPolicy,
        endpoints: &[std::sync::Arc<EndpointState>],
        members: &[usize],
    ) -> Self {
        let names: Vec<Vec<u8>> = members
            .iter()
            .map(|&i| endpoints[i].addr().to_string().into_bytes())
            .collect();
        let weighted = || {
            names
                .iter()
                .zip(members)
                .map(|(n, &i)| (n.as_slice(), endpoints[i].info().weight))
        };
        match policy {
            LbPolicy::RoundRobin => Picker::RoundRobin(AtomicUsize::new(fastrand::usize(..=members.len()))),
            LbPolicy::WeightedRoundRobin => Picker::Weighted(Mutex::new(vec![0; members.len()])),
            LbPolicy::Random => Picker::Random,
            LbPolicy::LeastRequest => Picker::LeastRequest,
            LbPolicy::PeakEwma => Picker::PeakEwma,
            LbPolicy::RingHash { vnodes } => Picker::Ring(Ring::new(weighted(), *vnodes)),
            LbPolicy::Maglev { table_size } => Picker::Maglev(Maglev::new(weighted(), *table_size)),
        }
    }

    /// Picks a position in `members` that `ok` accepts.
    pub(crate) fn pick(
        &self,
        endpoints: &[std::sync::Arc<EndpointState>],
        members: &[usize],
        key: Option<u64>,
        now: Instant,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let ep = |pos: usize| &endpoints[members[pos]];
        match self {
            Picker::RoundRobin(next) => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&p| ok(p))
            }
            Picker::Weighted(current) => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for p in 0..n {
                    if !ok(p) {
                        continue;
                    }
                    let w = i64::from(ep(p).info().weight);
                    current[p] += w;
                    total += w;
                    if best.is_none_or(|b| current[p] > current[b]) {
                        best = Some(p);
                    }
                }
                let b = best?;
                current[b] -= total;
                Some(b)
            }
            Picker::Random => random_ok(n, &ok),
            Picker::LeastRequest => two_choices(n, &ok, |p| f64::from(ep(p).in_flight())),
            Picker::PeakEwma => two_choices(n, &ok, |p| ep(p).ewma_cost(now)),
            Picker::Ring(ring) => match key {
                Some(k) => ring.lookup(k, &ok),
                None => random_ok(n, &ok),
            },
            Picker::Maglev(table) => match key {
                Some(k) => table.lookup(k, &ok),
                None => random_ok(n, &ok),
            },
        }
    }
}

/// A uniformly random acceptable position: a random start, then the first
/// acceptable one after it.
fn random_ok(n: usize, ok: &impl Fn(usize) -> bool) -> Option<usize> {
    let start = fastrand::usize(..n);
    (0..n).map(|k| (start + k) % n).find(|&p| ok(p))
}

/// Power of two choices: two distinct random acceptable positions, the cheaper wins
/// (ties to the first). With one acceptable position, that one.
fn two_choices(n: usize, ok: &impl Fn(usize) -> bool, cost: impl Fn(usize) -> f64) -> Option<usize> {
    let a = random_ok(n, ok)?;
    if n == 1 {
        return Some(a);
    }
    let offset = fastrand::usize(1..n);
    let b = (0..n - 1)
        .map(|k| (a + offset + k) % n)
        .find(|&p| p != a && ok(p));
    match b {
        Some(b) if cost(b) < cost(a) => Some(b),
        _ => Some(a),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::endpoint::EndpointInfo;

    fn endpoints(weights: &[u32]) -> Vec<Arc<EndpointState>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(EndpointState::new(
                    EndpointInfo::new(addr).weight(w),
                    None,
                    Duration::from_millis(1),
                    None,
                ))
            })
            .collect()
    }

    fn run(
        policy: LbPolicy,
        eps: &[Arc<EndpointState>],
        picks: usize,
        ok: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let members: Vec<usize> = (0..eps.len()).collect();
        let p = Picker::new(&policy, eps, &members);
        (0..picks)
            .map(|_| p.pick(eps, &members, None, Instant::ZERO, &ok).unwrap())
            .collect()
    }

    #[test]
    fn round_robin_takes_turns_and_skips_the_unavailable() {
        let eps = endpoints(&[1, 1, 1]);
        let seq = run(LbPolicy::RoundRobin, &eps, 6, |_| true);
        assert_eq!(seq[3..], seq[..3]);
        let mut first3 = seq[..3].to_vec();
        first3.sort_unstable();
        assert_eq!(first3, [0, 1, 2]);
        assert!(
            run(LbPolicy::RoundRobin, &eps, 10, |p| p != 1)
                .iter()
                .all(|&p| p != 1)
        );
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        let eps = endpoints(&[5, 1, 1]);
        let seq = run(LbPolicy::WeightedRoundRobin, &eps, 7, |_| true);
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0], "nginx's documented sequence");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(&[1, 1]);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        let seq = run(LbPolicy::LeastRequest, &eps, 50, |_| true);
        assert!(
            seq.iter().all(|&p| p == 1),
            "with two endpoints both are always compared"
        );
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        eps[2].observe(Instant::from_nanos(1), Duration::from_millis(500), false);
        let seq = run(LbPolicy::PeakEwma, &eps, 300, |_| true);
        let slow = seq.iter().filter(|&&p| p == 2).count();
        // Two distinct choices are always compared, and the slow one always loses.
        assert_eq!(slow, 0, "{seq:?}");
    }

    #[test]
    fn hash_policies_are_sticky_per_key() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let members: Vec<usize> = (0..4).collect();
        for policy in [
            LbPolicy::RingHash { vnodes: 100 },
            LbPolicy::Maglev { table_size: 1021 },
        ] {
            let p = Picker::new(&policy, &eps, &members);
            for key in [1u64, 99, 12345] {
                let first = p.pick(&eps, &members, Some(key), Instant::ZERO, |_| true);
                for _ in 0..5 {
                    assert_eq!(p.pick(&eps, &members, Some(key), Instant::ZERO, |_| true), first);
                }
            }
        }
    }

    #[test]
    fn nothing_acceptable_picks_nothing() {
        let eps = endpoints(&[1, 1]);
        let members: Vec<usize> = (0..2).collect();
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::WeightedRoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
            LbPolicy::PeakEwma,
            LbPolicy::RingHash { vnodes: 10 },
            LbPolicy::Maglev { table_size: 101 },
        ] {
            let p = Picker::new(&policy, &eps, &members);
            assert_eq!(
                p.pick(&eps, &members, Some(7), Instant::ZERO, |_| false),
                None,
                "{policy:?}"
            );
        }
    }
}
