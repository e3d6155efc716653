use super::{Sample, Snapshot};
use crate::sync::{AtomicI64, AtomicU8, AtomicU64, CachePadded, Ordering};

/// The outcomes of the last `N` calls.
///
/// A ring of one-byte outcome codes plus running totals. Recording takes a ticket
/// (one `fetch_add`), swaps the new code into its slot and adjusts the totals by the
/// difference between the old and new code, so the totals are always the sum of the
/// slots once writers are done; when a success replaces a success (the steady state
/// of a healthy service) the totals do not change and are not written.
#[derive(Debug)]
pub struct CountWindow {
    head: CachePadded<AtomicU64>,
    totals: CachePadded<Totals>,
    slots: Box<[AtomicU8]>,
}

#[derive(Debug)]
struct Totals {
    total: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

const PRESENT: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

#[inline]
fn encode(s: Sample) -> u8 {
    PRESENT | if s.failed { FAILED } else { 0 } | if s.slow { SLOW } else { 0 }
}

#[inline]
fn bit(code: u8, mask: u8) -> i64 {
    i64::from(code & mask != 0)
}

impl CountWindow {
    /// A window of the last `size` calls (`size` of at least 1).
    pub fn new(size: u32) -> Self {
        assert!(size > 0, "CountWindow::new: size must be at least 1");
        CountWindow {
            head: CachePadded(AtomicU64::new(0)),
            totals: CachePadded(Totals {
                total: AtomicI64::new(0),
                failures: AtomicI64::new(0),
                slow: AtomicI64::new(0),
            }),
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// How many calls the window holds when full.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Records one call, evicting the oldest once full.
    #[inline]
    pub fn record(&self, sample: Sample) {
        let ticket = self.head.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[(ticket % self.slots.len() as u64) as usize];
        let new = encode(sample);
        let old = slot.swap(new, Ordering::Relaxed);
        if old != new {
            self.apply(old, new);
        }
    }

    #[cold]
    fn apply(&self, old: u8, new: u8) {
        for (counter, mask) in [
            (&self.totals.total, PRESENT),
            (&self.totals.failures, FAILED),
            (&self.totals.slow, SLOW),
        ] {
            let delta = bit(new, mask) - bit(old, mask);
            if delta != 0 {
                counter.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// Totals over the calls held.
    #[inline]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::from_raw(
            self.totals.total.load(Ordering::Relaxed),
            self.totals.failures.load(Ordering::Relaxed),
            self.totals.slow.load(Ordering::Relaxed),
        )
    }

    /// Forgets every call.
    pub fn reset(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Ordering::Relaxed);
            if old != 0 {
                self.apply(old, 0);
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_n() {
        let w = CountWindow::new(3);
        for s in [Sample::FAILURE, Sample::FAILURE, Sample::SUCCESS] {
            w.record(s);
        }
        assert_eq!(
            w.snapshot(),
            Snapshot {
                total: 3,
                failures: 2,
                slow: 0
            }
        );
        w.record(Sample::SUCCESS); // evicts the first failure
        assert_eq!(
            w.snapshot(),
            Snapshot {
                total: 3,
                failures: 1,
                slow: 0
            }
        );
        w.record(Sample {
            failed: false,
            slow: true,
        });
        assert_eq!(
            w.snapshot(),
            Snapshot {
                total: 3,
                failures: 0,
                slow: 1
            }
        );
    }

    #[test]
    fn reset_empties() {
        let w = CountWindow::new(4);
        w.record(Sample::FAILURE);
        w.reset();
        assert_eq!(w.snapshot(), Snapshot::default());
        w.record(Sample::SUCCESS);
        assert_eq!(w.snapshot().total, 1);
    }
}
