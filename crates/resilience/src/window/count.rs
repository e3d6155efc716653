use super::{Sample, Snapshot};
use crate::sync::{AtomicI64, AtomicU8, AtomicU32, CachePadded, Ordering};

/// The outcomes of the last `N` calls.
///
/// A ring of one-byte outcome codes plus running totals. Recording takes a ticket
/// (one `fetch_add`), swaps the new code into its slot and adjusts the totals by the
/// difference between the old and new code, so the totals are always the sum of the
/// slots once writers are done.
///
/// The steady state of a healthy service costs no write at all: when the window is
/// full of fast successes, recording another one would replace a fast success with a
/// fast success, so it is skipped (three loads of one cache line, which every core
/// can keep shared). Which slot is "oldest" does not matter while all are equal.
#[derive(Debug)]
pub struct CountWindow {
    head: CachePadded<AtomicU32>,
    totals: CachePadded<Totals>,
    slots: Box<[AtomicU8]>,
    /// Lemire's fastmod constant for `slots.len()`: `ticket % len` without a division.
    fastmod: u64,
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
            fastmod: (u64::MAX / u64::from(size)).wrapping_add(1),
            head: CachePadded(AtomicU32::new(0)),
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
        if sample == Sample::SUCCESS && self.all_fast_successes() {
            return;
        }
        self.record_slow(encode(sample));
    }

    #[inline]
    fn all_fast_successes(&self) -> bool {
        let t = &self.totals;
        t.failures.load(Ordering::Relaxed) == 0
            && t.slow.load(Ordering::Relaxed) == 0
            && t.total.load(Ordering::Relaxed) == self.slots.len() as i64
    }

    fn record_slow(&self, new: u8) {
        let ticket = self.head.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[self.index(ticket)];
        // The 2^32 wrap of `ticket` skips part of a lap when the size is not a power
        // of two; harmless: the totals stay the exact sum of the slots.
        if slot.load(Ordering::Relaxed) == new {
            return;
        }
        let old = slot.swap(new, Ordering::Relaxed);
        if old != new {
            self.apply(old, new);
        }
    }

    /// `ticket % len` by Lemire's fastmod (two multiplications).
    #[inline]
    fn index(&self, ticket: u32) -> usize {
        let low = self.fastmod.wrapping_mul(u64::from(ticket));
        ((u128::from(low) * self.slots.len() as u128) >> 64) as usize
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
    fn fastmod_is_modulo() {
        for size in [1u32, 2, 3, 7, 10, 100, 1000, 65_537] {
            let w = CountWindow::new(size);
            for t in [
                0u32,
                1,
                2,
                size - 1,
                size,
                size + 1,
                12_345,
                u32::MAX - 1,
                u32::MAX,
            ] {
                assert_eq!(w.index(t), (t % size) as usize, "{t} % {size}");
            }
        }
    }

    #[test]
    fn a_clean_window_still_takes_in_a_failure_and_ages_it_out() {
        let w = CountWindow::new(3);
        for _ in 0..10 {
            w.record(Sample::SUCCESS);
        }
        w.record(Sample::FAILURE);
        assert_eq!(
            w.snapshot(),
            Snapshot {
                total: 3,
                failures: 1,
                slow: 0
            }
        );
        w.record(Sample::SUCCESS);
        w.record(Sample::SUCCESS);
        assert_eq!(w.snapshot().failures, 1, "still one of the last three");
        w.record(Sample::SUCCESS);
        assert_eq!(w.snapshot().failures, 0, "aged out after three more calls");
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
