//! Time, as the policies see it.
//!
//! Policies never call `std::time::Instant::now()` themselves: they ask a [`Clock`].
//! Production code uses [`SystemClock`] (or [`TokioClock`] so that paused tokio time
//! in tests also pauses the policies); tests use [`ManualClock`] and move time by hand.

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::sync::{AtomicU64, Ordering};

/// A point in monotonic time: nanoseconds since the clock's origin.
///
/// Kept as a `u64` so that policies can store it in an atomic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The origin of every clock.
    pub const ZERO: Instant = Instant(0);

    /// An instant `nanos` nanoseconds after the origin.
    #[inline]
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// Nanoseconds since the origin.
    #[inline]
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    #[inline]
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Converts a duration to whole nanoseconds, saturating at `u64::MAX` (584 years).
#[inline]
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Instant {
    type Output = Instant;
    #[inline]
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_add(duration_nanos(rhs)))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    /// Saturating: never panics when `rhs` is later.
    #[inline]
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_duration_since(rhs)
    }
}

/// A source of monotonic time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant. Never goes backwards.
    fn now(&self) -> Instant;
}

/// A shared, type-erased clock, as the policies hold it.
///
/// The system clock is held without an allocation or a virtual call, so a policy on
/// the default clock reads time as cheaply as if it were generic over it.
#[derive(Clone)]
pub struct SharedClock(Repr);

#[derive(Clone)]
enum Repr {
    System,
    Other(Arc<dyn Clock>),
}

impl SharedClock {
    /// Shares `clock` (a `SharedClock` is not wrapped twice).
    pub fn new<C: Clock>(clock: C) -> Self {
        let any: &dyn std::any::Any = &clock;
        if any.is::<SystemClock>() {
            SharedClock(Repr::System)
        } else if let Some(shared) = any.downcast_ref::<SharedClock>() {
            shared.clone()
        } else {
            SharedClock(Repr::Other(Arc::new(clock)))
        }
    }

    /// The system clock.
    pub const fn system() -> Self {
        SharedClock(Repr::System)
    }

    /// The current instant.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.0 {
            Repr::System => SystemClock.now(),
            Repr::Other(c) => c.now(),
        }
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::System => f.write_str("SystemClock"),
            Repr::Other(c) => c.fmt(f),
        }
    }
}

impl Clock for SharedClock {
    #[inline]
    fn now(&self) -> Instant {
        SharedClock::now(self)
    }
}

/// The default clock: the CPU's time-stamp counter where it is invariant (read in a
/// few nanoseconds, scaled to nanoseconds by `quanta`), otherwise the operating
/// system's monotonic clock.
///
/// All `SystemClock`s share one origin (the first time any of them was read), so
/// instants from two of them can be compared. The first read calibrates the counter
/// (up to 200 ms, once per process).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

struct Origin {
    clock: quanta::Clock,
    raw: u64,
}

fn process_origin() -> &'static Origin {
    static ORIGIN: OnceLock<Origin> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        let clock = quanta::Clock::new();
        let raw = clock.raw();
        Origin { clock, raw }
    })
}

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Instant {
        let origin = process_origin();
        Instant(origin.clock.delta_as_nanos(origin.raw, origin.clock.raw()))
    }
}

/// A clock that follows tokio's time, so `tokio::time::pause()` and `advance()`
/// in tests move the policies' time too.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's "now" at creation.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant(duration_nanos(
            tokio::time::Instant::now().saturating_duration_since(self.origin),
        ))
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// use palisade_core::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(clock.now() - t0, Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock at the origin.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(duration_nanos(by), Ordering::SeqCst);
    }

    /// Sets the time; panics if that would move it backwards (clocks are monotonic).
    pub fn set(&self, to: Instant) {
        let prev = self.nanos.swap(to.0, Ordering::SeqCst);
        assert!(prev <= to.0, "ManualClock::set moved time backwards");
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant(self.nanos.load(Ordering::SeqCst))
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    #[inline]
    fn now(&self) -> Instant {
        (**self).now()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_between_clones() {
        let a = ManualClock::new();
        let b = a.clone();
        a.advance(Duration::from_millis(5));
        assert_eq!(b.now(), Instant::from_nanos(5_000_000));
    }

    #[test]
    fn instant_arithmetic_saturates() {
        let t = Instant::from_nanos(10);
        assert_eq!(Instant::ZERO - t, Duration::ZERO);
        assert_eq!((t + Duration::MAX).as_nanos(), u64::MAX);
    }

    #[test]
    fn system_clock_is_monotonic() {
        let a = SystemClock.now();
        let b = SystemClock.now();
        assert!(b >= a);
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(clock.now(), Instant::from_nanos(3_000_000_000));
    }
}
