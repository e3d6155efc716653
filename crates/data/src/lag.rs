//! How far behind a replica is, in time, from log positions.
//!
//! A replica reports the position it has replayed to; the primary reports the
//! position it has written to. Bytes behind say little (a bulk load is many bytes
//! quickly replayed, one small transaction may wait behind a long replay conflict),
//! and the replica's own `pg_last_xact_replay_timestamp()` grows while the primary
//! is idle. So the tracker keeps a short history of the primary's position over
//! time, and a replica is as far behind as the oldest moment the primary had
//! written something the replica has not replayed: if it has replayed everything
//! the primary had written at the last sample, it is not behind at all.

use std::collections::VecDeque;
use std::time::Duration;

use palisade_core::Instant;

use crate::Lsn;

/// The primary's positions over the last `horizon`.
#[derive(Debug)]
pub(crate) struct LagTracker {
    samples: VecDeque<(Instant, Lsn)>,
    horizon: Duration,
}

impl LagTracker {
    /// A tracker that remembers the primary's positions for `horizon` (lags longer
    /// than that are reported as at least `horizon`).
    pub fn new(horizon: Duration) -> Self {
        LagTracker {
            samples: VecDeque::new(),
            horizon,
        }
    }

    /// The primary was at `lsn` at `now`.
    pub fn primary_at(&mut self, now: Instant, lsn: Lsn) {
        if self.samples.back().is_some_and(|&(_, last)| last >= lsn) {
            // Nothing written since the last sample: that sample stays the moment
            // the primary reached this position.
            return;
        }
        self.samples.push_back((now, lsn));
        // Keep one sample older than the horizon: it bounds the lag of a replica
        // behind every sample kept.
        while self.samples.len() > 2 && now.saturating_duration_since(self.samples[1].0) > self.horizon {
            self.samples.pop_front();
        }
    }

    /// How long the replica that has replayed up to `replayed` has been missing
    /// something the primary had written; `None` before the first sample.
    pub fn lag(&self, now: Instant, replayed: Lsn) -> Option<Duration> {
        let &(_, newest) = self.samples.back()?;
        if replayed >= newest {
            return Some(Duration::ZERO);
        }
        let (since, _) = self.samples.iter().find(|&&(_, lsn)| lsn > replayed)?;
        Some(now.saturating_duration_since(*since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn a_replica_is_behind_since_the_primary_first_wrote_what_it_lacks() {
        let mut t = LagTracker::new(Duration::from_secs(10));
        assert_eq!(t.lag(at(0), Lsn(0)), None, "no sample yet");
        t.primary_at(at(0), Lsn(100));
        t.primary_at(at(1000), Lsn(200));
        t.primary_at(at(2000), Lsn(300));
        assert_eq!(t.lag(at(2500), Lsn(300)), Some(Duration::ZERO));
        assert_eq!(t.lag(at(2500), Lsn(400)), Some(Duration::ZERO));
        assert_eq!(t.lag(at(2500), Lsn(250)), Some(Duration::from_millis(500)));
        assert_eq!(t.lag(at(2500), Lsn(150)), Some(Duration::from_millis(1500)));
        assert_eq!(t.lag(at(2500), Lsn(50)), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn an_idle_primary_does_not_age_a_replica_that_has_everything() {
        let mut t = LagTracker::new(Duration::from_secs(10));
        t.primary_at(at(0), Lsn(100));
        for s in 1..100 {
            t.primary_at(at(s * 1000), Lsn(100));
        }
        assert_eq!(t.lag(at(100_000), Lsn(100)), Some(Duration::ZERO));
        // Behind the one write: behind since it was written, however long ago.
        assert_eq!(t.lag(at(100_000), Lsn(99)), Some(Duration::from_secs(100)));
    }

    #[test]
    fn history_is_bounded_and_a_replica_behind_all_of_it_is_at_least_the_horizon_behind() {
        let mut t = LagTracker::new(Duration::from_secs(2));
        for s in 0..1000u64 {
            t.primary_at(at(s * 100), Lsn(s + 1));
        }
        assert!(t.samples.len() <= 22, "{} samples kept", t.samples.len());
        let lag = t.lag(at(99_900), Lsn(0)).unwrap();
        assert!(lag >= Duration::from_secs(2), "{lag:?}");
    }
}
