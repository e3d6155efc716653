//! Globally unique, time-ordered 64-bit ids (the Snowflake layout).
//!
//! An id is 41 bits of milliseconds since 2024-01-01 UTC (good until 2093), 10
//! bits of worker id (0-1023, from configuration: each process that makes ids
//! needs its own), and 12 bits of sequence (4,096 ids per millisecond per
//! worker). Ids from one worker only ever grow; ids from different workers are
//! ordered by time to within the clocks' skew.
//!
//! A clock that goes backwards (an NTP step) does not make the generator go back
//! or repeat: it carries on from the last millisecond it used, as a logical
//! clock, until real time passes it again; a millisecond whose 4,096 ids are used
//! up borrows the next one the same way. Both are counted
//! (`palisade_data_id_clock_behind_total`). Across a restart the generator cannot
//! know what it issued before: [`IdGenerator::resume_after`] takes the highest id
//! the service has stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
const WORKER_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
/// The highest worker id.
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

/// A source of milliseconds since the id epoch.
type Millis = Box<dyn Fn() -> u64 + Send + Sync>;

/// Where the generator reads the time: the wall clock, or a source of its own.
enum Time {
    Wall,
    Source(Millis),
}

/// Makes ids for one worker. Lock-free: many threads may share one.
pub struct IdGenerator {
    worker: u64,
    /// The last id's millisecond and sequence: `ms << 12 | sequence`.
    last: AtomicU64,
    time: Time,
    behind: metrics::Counter,
}

impl std::fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdGenerator")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// A worker id out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("worker id {0} is out of range (0-1023)")]
pub struct WorkerOutOfRange(pub u16);

impl IdGenerator {
    /// A generator for `worker` (0-1023) on the wall clock.
    pub fn new(worker: u16) -> Result<Self, WorkerOutOfRange> {
        Self::with_time(worker, Time::Wall)
    }

    /// A generator that reads the milliseconds since the id epoch from `source`
    /// (tests move it by hand, backwards too).
    pub fn with_millis(
        worker: u16,
        source: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self, WorkerOutOfRange> {
        Self::with_time(worker, Time::Source(Box::new(source)))
    }

    fn with_time(worker: u16, time: Time) -> Result<Self, WorkerOutOfRange> {
        if worker > MAX_WORKER {
            return Err(WorkerOutOfRange(worker));
        }
        Ok(IdGenerator {
            worker: u64::from(worker),
            last: AtomicU64::new(0),
            time,
            behind: metrics::counter!("palisade_data_id_clock_behind_total", "worker" => worker.to_string()),
        })
    }

    /// Never issues an id at or below `id` (the highest this worker issued before
    /// a restart, read from storage).
    pub fn resume_after(self, id: i64) -> Self {
        let id = u64::try_from(id).unwrap_or(0);
        let state = (id >> (WORKER_BITS + SEQUENCE_BITS)) << SEQUENCE_BITS | (id & SEQUENCE_MASK);
        self.last.fetch_max(state, Ordering::AcqRel);
        self
    }

    /// The next id.
    pub fn next_id(&self) -> i64 {
        let now = self.now_ms();
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let last_ms = last >> SEQUENCE_BITS;
            let next = if now > last_ms {
                now << SEQUENCE_BITS
            } else {
                // Same millisecond, a clock behind, or a millisecond used up: the
                // next sequence number (carrying into the next millisecond).
                last + 1
            };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if now < next >> SEQUENCE_BITS {
                        self.behind.increment(1);
                    }
                    return self.compose(next);
                }
                Err(seen) => last = seen,
            }
        }
    }

    fn compose(&self, state: u64) -> i64 {
        let ms = state >> SEQUENCE_BITS;
        let id =
            (ms << (WORKER_BITS + SEQUENCE_BITS)) | (self.worker << SEQUENCE_BITS) | (state & SEQUENCE_MASK);
        // 41 bits of milliseconds keep the sign bit clear until 2093.
        (id & (u64::MAX >> 1)) as i64
    }

    fn now_ms(&self) -> u64 {
        match &self.time {
            Time::Wall => {
                let since = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO);
                u64::try_from(since.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_sub(EPOCH_MS)
            }
            Time::Source(millis) => millis(),
        }
    }
}

/// What an id says: when it was made (milliseconds since the Unix epoch), by which
/// worker, its sequence within that millisecond.
pub fn decompose(id: i64) -> (u64, u16, u16) {
    let id = id as u64;
    let ms = (id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS;
    let worker = ((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER)) as u16;
    (ms, worker, (id & SEQUENCE_MASK) as u16)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use std::sync::Arc;

    use super::*;

    /// A hand-moved millisecond source starting at `ms`.
    fn manual(ms: u64) -> (Arc<AtomicU64>, impl Fn() -> u64 + Send + Sync + 'static) {
        let t = Arc::new(AtomicU64::new(ms));
        let read = t.clone();
        (t, move || read.load(Ordering::Relaxed))
    }

    #[test]
    fn ids_grow_carry_the_worker_and_decompose() {
        let g = IdGenerator::new(7).unwrap();
        let a = g.next_id();
        let b = g.next_id();
        assert!(b > a && a > 0);
        let (ms, worker, _) = decompose(b);
        assert_eq!(worker, 7);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(ms <= wall && wall - ms < 60_000, "{ms} vs {wall}");
        assert_eq!(IdGenerator::new(1024).unwrap_err(), WorkerOutOfRange(1024));
    }

    #[test]
    fn a_clock_going_backwards_never_repeats_or_lowers_an_id() {
        let (clock, source) = manual(1_000_000);
        let g = IdGenerator::with_millis(3, source).unwrap();
        let mut seen = HashSet::new();
        let mut last = 0;
        for step in 0..3000u32 {
            match step % 3 {
                0 => {
                    clock.fetch_add(2, Ordering::Relaxed);
                }
                // A step back of 5 ms every third id.
                1 => {
                    clock.fetch_sub(5, Ordering::Relaxed);
                }
                _ => {}
            }
            let id = g.next_id();
            assert!(id > last, "id {id} after {last} at step {step}");
            assert!(seen.insert(id));
            last = id;
        }
    }

    #[test]
    fn a_used_up_millisecond_borrows_the_next() {
        let (_clock, source) = manual(5);
        let g = IdGenerator::with_millis(0, source).unwrap();
        let ids: Vec<i64> = (0..5000).map(|_| g.next_id()).collect();
        assert!(ids.windows(2).all(|w| w[1] > w[0]));
        assert_eq!(decompose(ids[0]), (EPOCH_MS + 5, 0, 0));
        assert_eq!(decompose(ids[4095]), (EPOCH_MS + 5, 0, 4095));
        assert_eq!(
            decompose(ids[4096]),
            (EPOCH_MS + 6, 0, 0),
            "the 4097th id borrows the next millisecond"
        );
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let g = std::sync::Arc::new(IdGenerator::new(1).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..20_000).map(|_| g.next_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn resuming_after_a_stored_id_issues_only_higher_ones() {
        let (clock, source) = manual(10_000);
        let high = IdGenerator::with_millis(2, source).unwrap().next_id();
        // The process restarts with its clock 5 s behind.
        clock.store(5_000, Ordering::Relaxed);
        let read = clock.clone();
        let again = IdGenerator::with_millis(2, move || read.load(Ordering::Relaxed))
            .unwrap()
            .resume_after(high);
        assert!(again.next_id() > high);
    }
}
