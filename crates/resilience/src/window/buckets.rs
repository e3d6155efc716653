//! A ring of time buckets, each with `K` counters, tagged with the epoch it holds.
//!
//! The building block of [`TimeWindow`](super::TimeWindow), the retry budget and the
//! adaptive timeout's latency histogram. A bucket whose tag is older than the current
//! epoch is stale: the first writer to see that claims it (one CAS), zeroes it and
//! re-tags it; readers skip buckets outside the window, so idle time needs no timer.

use crate::clock::Instant;
use crate::sync::{AtomicI64, AtomicU64, Ordering, spin_wait};

/// Tag of a bucket being zeroed by the writer that claimed it.
const RESETTING: u64 = u64::MAX;

#[derive(Debug)]
struct Bucket<const K: usize> {
    /// `epoch + 1` of the data held; 0 = never used.
    tag: AtomicU64,
    counts: [AtomicI64; K],
}

/// `len` buckets of `bucket_nanos` each, `K` counters per bucket.
#[derive(Debug)]
pub(crate) struct Buckets<const K: usize> {
    bucket_nanos: u64,
    buckets: Box<[Bucket<K>]>,
}

impl<const K: usize> Buckets<K> {
    /// A ring covering `len * bucket_nanos`. Both must be non-zero.
    pub(crate) fn new(len: u32, bucket_nanos: u64) -> Self {
        assert!(len > 0 && bucket_nanos > 0, "Buckets::new: zero length");
        let buckets = (0..len)
            .map(|_| Bucket {
                tag: AtomicU64::new(0),
                counts: std::array::from_fn(|_| AtomicI64::new(0)),
            })
            .collect();
        Buckets {
            bucket_nanos,
            buckets,
        }
    }

    #[inline]
    fn tag_at(&self, now: Instant) -> u64 {
        now.as_nanos() / self.bucket_nanos + 1
    }

    /// Adds `n` to counter `k` of the bucket for `now`.
    #[inline]
    pub(crate) fn add(&self, now: Instant, k: usize, n: i64) {
        self.current(now).counts[k].fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `deltas` to the bucket for `now` (zero entries are skipped).
    #[inline]
    pub(crate) fn add_all(&self, now: Instant, deltas: [i64; K]) {
        let bucket = self.current(now);
        for (counter, delta) in bucket.counts.iter().zip(deltas) {
            if delta != 0 {
                counter.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// The bucket for `now`, claimed and zeroed first if it holds an older epoch.
    #[inline]
    fn current(&self, now: Instant) -> &Bucket<K> {
        let tag = self.tag_at(now);
        let bucket = &self.buckets[(tag % self.buckets.len() as u64) as usize];
        loop {
            let seen = bucket.tag.load(Ordering::Acquire);
            if seen == tag {
                return bucket;
            }
            if seen == RESETTING {
                // Another writer is zeroing it: K relaxed stores, then a release.
                spin_wait();
                continue;
            }
            if seen > tag {
                // We were descheduled for a whole window; count the call as current.
                return bucket;
            }
            if bucket
                .tag
                .compare_exchange(seen, RESETTING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                for c in &bucket.counts {
                    c.store(0, Ordering::Relaxed);
                }
                bucket.tag.store(tag, Ordering::Release);
                return bucket;
            }
        }
    }

    /// Sums every counter over the buckets that lie inside the window at `now`.
    pub(crate) fn sum(&self, now: Instant) -> [i64; K] {
        let mut out = [0i64; K];
        self.for_each_live(now, |bucket| {
            for (o, c) in out.iter_mut().zip(&bucket.counts) {
                *o += c.load(Ordering::Relaxed);
            }
        });
        out
    }

    fn for_each_live(&self, now: Instant, mut f: impl FnMut(&Bucket<K>)) {
        let current = self.tag_at(now);
        let oldest = current.saturating_sub(self.buckets.len() as u64 - 1).max(1);
        for bucket in self.buckets.iter() {
            let tag = bucket.tag.load(Ordering::Acquire);
            if tag != RESETTING && (oldest..=current).contains(&tag) {
                f(bucket);
            }
        }
    }

    /// Forgets everything (a concurrent writer may land in a zeroed bucket).
    pub(crate) fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.tag.store(0, Ordering::Release);
            for c in &bucket.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}
