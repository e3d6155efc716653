//! A route's running totals for the dashboard: answers, server errors, refusals
//! (`429`) and a latency histogram, cumulative and lock-free. The dashboard's
//! sampler takes their differences once a second, so the request path pays a few
//! relaxed atomic additions and nothing else.
//!
//! The histogram is log-linear: values below 8 µs have a bucket each, then every
//! power of two is cut into 8 buckets, so a percentile read from it is within
//! 12.5% of the true value, up to about 19 hours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets: values 0..8 µs, then 8 per power of two up to 2^36 µs.
pub const BUCKETS: usize = (SUB as usize) * 34;

/// A route's cumulative counts.
#[derive(Debug)]
pub struct RouteTotals {
    answered: AtomicU64,
    server_errors: AtomicU64,
    refused: AtomicU64,
    latency: Box<[AtomicU64; BUCKETS]>,
}

impl Default for RouteTotals {
    fn default() -> Self {
        RouteTotals {
            answered: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            latency: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

/// A copy of a route's counts at one moment; two of them subtract to what
/// happened between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Requests answered.
    pub answered: u64,
    /// Of them, answered `5xx`.
    pub server_errors: u64,
    /// Of them, refused with `429` (rate limits, shedding).
    pub refused: u64,
    /// Answers per latency bucket (see [`bucket_of`]).
    pub latency: Vec<u64>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            answered: 0,
            server_errors: 0,
            refused: 0,
            latency: vec![0; BUCKETS],
        }
    }
}

impl RouteTotals {
    /// Counts one answer with `status` after `elapsed`.
    #[inline]
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        } else if status == 429 {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> Counts {
        Counts {
            answered: self.answered.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            latency: self.latency.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        }
    }
}

impl Counts {
    /// What happened from `before` to `self`; when `before` is later (the route
    /// was rebuilt by a reload and started again from zero), `self` whole.
    pub fn since(&self, before: &Counts) -> Counts {
        if self.answered < before.answered {
            return self.clone();
        }
        Counts {
            answered: self.answered - before.answered,
            server_errors: self.server_errors.saturating_sub(before.server_errors),
            refused: self.refused.saturating_sub(before.refused),
            latency: (self.latency.iter().zip(&before.latency))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The latency at quantile `q` (0..=1) in microseconds, the middle of its
    /// bucket; `None` with no answers.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the answer wanted, 1-based.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(i);
                return Some((low + high) as f64 / 2.0);
            }
        }
        None
    }
}

/// The bucket of a latency of `us` microseconds.
#[inline]
pub fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    // `us` is in [2^p, 2^(p+1)); its SUB_BITS bits after the leading one pick
    // the sub-bucket.
    let p = 63 - us.leading_zeros();
    let sub = (us >> (p - SUB_BITS)) & (SUB - 1);
    let i = (p - SUB_BITS + 1) as usize * SUB as usize + sub as usize;
    i.min(BUCKETS - 1)
}

/// The values bucket `i` holds: `[low, high)` in microseconds.
pub fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i + 1);
    }
    let p = i / SUB + u64::from(SUB_BITS) - 1;
    let sub = i % SUB;
    let step = 1 << (p - u64::from(SUB_BITS));
    ((SUB + sub) * step, (SUB + sub + 1) * step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_its_own_buckets_range() {
        let mut v = 0u64;
        while v < 1 << 36 {
            let (low, high) = bucket_range(bucket_of(v));
            assert!(low <= v && v < high, "{v} in [{low}, {high})");
            // Within 12.5% of the value, past the exact ones.
            assert!(high - low <= (low / 8).max(1), "{v}: [{low}, {high})");
            v = v * 9 / 8 + 1;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_come_from_the_differences() {
        let t = RouteTotals::default();
        for ms in 1..=100 {
            t.record(200, Duration::from_millis(ms));
        }
        let before = t.counts();
        for _ in 0..99 {
            t.record(200, Duration::from_millis(2));
        }
        t.record(503, Duration::from_millis(900));
        t.record(429, Duration::from_micros(3));
        let d = t.counts().since(&before);
        assert_eq!((d.answered, d.server_errors, d.refused), (101, 1, 1));
        let p50 = d.quantile_us(0.5).unwrap();
        assert!((1_750.0..=2_250.0).contains(&p50), "{p50}");
        let p999 = d.quantile_us(1.0).unwrap();
        assert!((800_000.0..=1_000_000.0).contains(&p999), "{p999}");
        // A reload's fresh totals are taken whole.
        let fresh = RouteTotals::default();
        fresh.record(200, Duration::from_millis(1));
        assert_eq!(fresh.counts().since(&before).answered, 1);
        assert_eq!(Counts::default().quantile_us(0.5), None);
    }
}
