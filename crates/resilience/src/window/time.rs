use std::time::Duration;

use super::{Buckets, Sample, Snapshot};
use crate::clock::{Instant, duration_nanos};

const TOTAL: usize = 0;
const FAILURES: usize = 1;
const SLOW: usize = 2;

/// The calls of the last `length`, kept in `buckets` buckets.
///
/// The window slides one bucket at a time: with a 10 s window in 10 buckets, a call
/// counts for between 9 and 10 seconds. Recording costs one clock reading (done by
/// the caller) and one or two `fetch_add`s; a snapshot sums the live buckets.
#[derive(Debug)]
pub struct TimeWindow {
    buckets: Buckets<3>,
    length: Duration,
}

impl TimeWindow {
    /// A window of `length` split into `buckets` buckets (`buckets >= 1`,
    /// `length >= buckets` nanoseconds).
    pub fn new(length: Duration, buckets: u32) -> Self {
        assert!(buckets > 0, "TimeWindow::new: at least one bucket");
        let bucket_nanos = duration_nanos(length) / u64::from(buckets);
        TimeWindow {
            buckets: Buckets::new(buckets, bucket_nanos.max(1)),
            length,
        }
    }

    /// How far back the window reaches.
    pub fn length(&self) -> Duration {
        self.length
    }

    /// Records one call that finished at `now`.
    #[inline]
    pub fn record(&self, now: Instant, sample: Sample) {
        self.buckets
            .add_all(now, [1, i64::from(sample.failed), i64::from(sample.slow)]);
    }

    /// Totals over the buckets live at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let s = self.buckets.sum(now);
        Snapshot::from_raw(s[TOTAL], s[FAILURES], s[SLOW])
    }

    /// Forgets every call.
    pub fn reset(&self) {
        self.buckets.reset();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn calls_expire_bucket_by_bucket() {
        // 1 s window, 4 buckets of 250 ms.
        let w = TimeWindow::new(Duration::from_secs(1), 4);
        w.record(at(0), Sample::FAILURE);
        w.record(at(300), Sample::SUCCESS);
        w.record(
            at(600),
            Sample {
                failed: true,
                slow: true,
            },
        );
        assert_eq!(
            w.snapshot(at(999)),
            Snapshot {
                total: 3,
                failures: 2,
                slow: 1
            }
        );
        // At 1000 ms the first bucket [0,250) has left the window.
        assert_eq!(
            w.snapshot(at(1000)),
            Snapshot {
                total: 2,
                failures: 1,
                slow: 1
            }
        );
        // At 1250 the [250,500) bucket has gone too.
        assert_eq!(
            w.snapshot(at(1250)),
            Snapshot {
                total: 1,
                failures: 1,
                slow: 1
            }
        );
        // Long idle: everything gone, without any timer.
        assert_eq!(w.snapshot(at(60_000)), Snapshot::default());
    }

    #[test]
    fn a_reused_bucket_is_zeroed_first() {
        let w = TimeWindow::new(Duration::from_secs(1), 4);
        w.record(at(10), Sample::FAILURE);
        // 1010 ms maps to the same ring slot as 10 ms.
        w.record(at(1010), Sample::SUCCESS);
        assert_eq!(
            w.snapshot(at(1010)),
            Snapshot {
                total: 1,
                failures: 0,
                slow: 0
            }
        );
    }
}
