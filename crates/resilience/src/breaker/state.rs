use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge};

use super::config::BreakerConfig;
use super::detector::{Detector, Trip};
use super::event::{Cause, Listener, State, StateChange};
use super::permit::{Kind, Outcome, Permit, Ticket};
use crate::ConfigErrors;
use crate::clock::{Instant, SharedClock, duration_nanos};
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, CachePadded, Ordering};
use crate::window::{Sample, Snapshot, WindowConfig};

// The whole state machine lives in one word, so every transition is one CAS:
//   bits 0..3   state
//   bits 8..24  half-open probes in flight
//   bits 24..40 half-open probes that succeeded
//   bits 40..64 generation: +1 on every transition, so an outcome that belongs to
//               an earlier period (a call started before a trip) is recognised.
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
const STATE_MASK: u64 = 0x7;
const PROBE_ONE: u64 = 1 << 8;
const SUCCESS_ONE: u64 = 1 << 24;
const GEN_SHIFT: u32 = 40;

#[inline]
fn state_of(w: u64) -> u64 {
    w & STATE_MASK
}
#[inline]
fn probes_of(w: u64) -> u32 {
    ((w >> 8) & 0xFFFF) as u32
}
#[inline]
fn successes_of(w: u64) -> u32 {
    ((w >> 24) & 0xFFFF) as u32
}
#[inline]
fn gen_of(w: u64) -> u32 {
    (w >> GEN_SHIFT) as u32
}
/// The word for a fresh period in `state`, one generation after `w`.
#[inline]
fn next_period(w: u64, state: u64) -> u64 {
    let generation = u64::from(gen_of(w).wrapping_add(1) & 0xFF_FFFF);
    (generation << GEN_SHIFT) | state
}

fn public_state(w: u64) -> State {
    match state_of(w) {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::Disabled,
    }
}

/// A call was not made because the breaker would not let it through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {}{}", reason(.state), retry_hint(.retry_after))]
pub struct Rejected {
    /// The state that rejected the call.
    pub state: State,
    /// When the breaker will next let a probe through, if known.
    pub retry_after: Option<Duration>,
}

/// A [`Rejected`] packed in one word, so that the slow acquire path's result fits
/// two registers: 0 is half-open, 1 forced open, `2 + n` open for `n` more
/// nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Refusal(u64);

impl Refusal {
    const HALF_OPEN: Refusal = Refusal(0);
    const FORCED_OPEN: Refusal = Refusal(1);

    fn open(wait: Duration) -> Refusal {
        Refusal(duration_nanos(wait).saturating_add(2))
    }

    #[cold]
    fn into_rejected(self) -> Rejected {
        let (state, retry_after) = match self.0 {
            0 => (State::HalfOpen, None),
            1 => (State::ForcedOpen, None),
            n => (State::Open, Some(Duration::from_nanos(n - 2))),
        };
        Rejected { state, retry_after }
    }
}

const _: () = assert!(std::mem::size_of::<Result<Ticket, Refusal>>() <= 16);

fn reason(state: &State) -> &'static str {
    match state {
        State::HalfOpen => "is half-open and all probe slots are taken",
        State::ForcedOpen => "is forced open by an operator",
        _ => "is open",
    }
}

fn retry_hint(after: &Option<Duration>) -> String {
    after.map_or_else(String::new, |d| format!("; next probe in {d:?}"))
}

/// The error of a call made through a breaker: rejected, or the call's own error.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker rejected the call; it was not made.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The call was made and failed.
    #[error("{0}")]
    Inner(E),
}

impl<E> BreakerError<E> {
    /// The call's own error, if it was made.
    pub fn into_inner(self) -> Option<E> {
        match self {
            BreakerError::Inner(e) => Some(e),
            BreakerError::Rejected(_) => None,
        }
    }
}

/// A point-in-time view of a breaker, for admin pages and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerStats {
    /// Current state.
    pub state: State,
    /// The detector window's totals.
    pub window: Snapshot,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Half-open probes in flight.
    pub probes_in_flight: u32,
    /// Time left in the open period (Open only).
    pub open_remaining: Option<Duration>,
    /// Re-opens in a row (drives the open-duration backoff).
    pub reopens: u32,
    /// Metrics-only mode: decides as if live, never rejects.
    pub metrics_only: bool,
}

struct Metrics {
    success: Counter,
    failure: Counter,
    ignored: Counter,
    cancelled: Counter,
    slow: Counter,
    rejected: Counter,
    would_reject: Counter,
    state: Gauge,
}

impl Metrics {
    fn new(name: &Arc<str>) -> Self {
        let calls = |outcome: &'static str| metrics::counter!("palisade_breaker_calls_total", "breaker" => name.to_string(), "outcome" => outcome);
        Metrics {
            success: calls("success"),
            failure: calls("failure"),
            ignored: calls("ignored"),
            cancelled: calls("cancelled"),
            slow: metrics::counter!("palisade_breaker_slow_calls_total", "breaker" => name.to_string()),
            rejected: metrics::counter!("palisade_breaker_rejections_total", "breaker" => name.to_string()),
            would_reject: metrics::counter!("palisade_breaker_shadow_rejections_total", "breaker" => name.to_string()),
            state: metrics::gauge!("palisade_breaker_state", "breaker" => name.to_string()),
        }
    }

    #[inline]
    fn count(&self, outcome: Option<Outcome>) {
        match outcome {
            Some(Outcome::Success) => self.success.increment(1),
            Some(Outcome::Failure) => self.failure.increment(1),
            Some(Outcome::Ignored) => self.ignored.increment(1),
            None => self.cancelled.increment(1),
        }
    }
}

struct Inner {
    state: CachePadded<AtomicU64>,
    open_until: AtomicU64,
    reopens: AtomicU32,
    metrics_only: AtomicBool,
    detector: Detector,
    slow_nanos: Option<u64>,
    needs_clock_on_record: bool,
    config: BreakerConfig,
    clock: SharedClock,
    name: Arc<str>,
    listeners: Mutex<Vec<Listener>>,
    metrics: Metrics,
}

/// A circuit breaker. Cheap to clone: clones share one state.
///
/// ```
/// use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, State};
/// use palisade_resilience::ManualClock;
///
/// let clock = ManualClock::new();
/// let breaker = CircuitBreaker::builder("payments")
///     .config(BreakerConfig::empty().consecutive_failures(2))
///     .clock(clock.clone())
///     .build()
///     .unwrap();
/// breaker.try_acquire().unwrap().failure();
/// breaker.try_acquire().unwrap().failure();
/// assert_eq!(breaker.state(), State::Open);
/// assert!(breaker.try_acquire().is_err());
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl AsRef<CircuitBreaker> for CircuitBreaker {
    fn as_ref(&self) -> &CircuitBreaker {
        self
    }
}

/// Builds a [`CircuitBreaker`]; see [`CircuitBreaker::builder`].
#[derive(Debug)]
pub struct Builder {
    name: Arc<str>,
    config: BreakerConfig,
    clock: SharedClock,
}

impl Builder {
    /// Sets the configuration (default: [`BreakerConfig::default`]).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the clock (default: [`SystemClock`]).
    pub fn clock(mut self, clock: impl crate::Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// Sets a shared clock.
    pub fn shared_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Validates the configuration and builds the breaker.
    pub fn build(self) -> Result<CircuitBreaker, ConfigErrors> {
        self.config.validate()?;
        let config = self.config;
        Ok(CircuitBreaker {
            inner: Arc::new(Inner {
                state: CachePadded(AtomicU64::new(CLOSED)),
                open_until: AtomicU64::new(0),
                reopens: AtomicU32::new(0),
                metrics_only: AtomicBool::new(false),
                detector: Detector::from_config(&config),
                slow_nanos: config.slow_call.map(|s| duration_nanos(s.duration)),
                needs_clock_on_record: config.slow_call.is_some()
                    || matches!(config.window, WindowConfig::Time { .. }),
                metrics: Metrics::new(&self.name),
                name: self.name,
                clock: self.clock,
                listeners: Mutex::new(Vec::new()),
                config,
            }),
        })
    }
}

impl CircuitBreaker {
    /// A breaker with the system clock. Panics if `config` is invalid; use
    /// [`CircuitBreaker::builder`] to get the errors instead.
    pub fn new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Self {
        match Self::builder(name).config(config).build() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts building a breaker named `name` (the name labels metrics and events).
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            config: BreakerConfig::default(),
            clock: SharedClock::system(),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// Asks leave to make one call.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<&Self>, Rejected> {
        self.acquire().map(|t| Permit::new(self, t))
    }

    /// Like [`try_acquire`](Self::try_acquire), but the permit owns a clone of the
    /// breaker, for `'static` futures.
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<Permit<Self>, Rejected> {
        Self::try_acquire_via(self)
    }

    /// Like [`try_acquire_owned`](Self::try_acquire_owned), but the permit holds a
    /// clone of `handle`, whatever reaches the breaker: an owned breaker (one
    /// reference-count increment) or a `&'static CircuitBreaker` (a plain copy). The
    /// handle is cloned only when the call is admitted.
    #[inline]
    pub fn try_acquire_via<B: AsRef<CircuitBreaker> + Clone>(handle: &B) -> Result<Permit<B>, Rejected> {
        handle.as_ref().acquire().map(|t| Permit::new(handle.clone(), t))
    }

    /// Runs `f` if the breaker allows it; an `Err` counts as a failure.
    pub fn call<T, E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, BreakerError<E>> {
        self.call_with(default_classify, f)
    }

    /// Runs `f` if the breaker allows it; `classify` says how the result counts.
    pub fn call_with<T, E>(
        &self,
        classify: impl FnOnce(&Result<T, E>) -> Outcome,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, BreakerError<E>> {
        let permit = self.try_acquire()?;
        let result = f();
        permit.record(classify(&result));
        result.map_err(BreakerError::Inner)
    }

    /// Awaits `f()` if the breaker allows it; an `Err` counts as a failure. Dropping
    /// the returned future before it finishes records the call as cancelled.
    pub async fn call_async<T, E, Fut>(&self, f: impl FnOnce() -> Fut) -> Result<T, BreakerError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_async_with(default_classify, f).await
    }

    /// Awaits `f()` if the breaker allows it; `classify` says how the result counts.
    pub async fn call_async_with<T, E, Fut>(
        &self,
        classify: impl FnOnce(&Result<T, E>) -> Outcome,
        f: impl FnOnce() -> Fut,
    ) -> Result<T, BreakerError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(classify(&result));
        result.map_err(BreakerError::Inner)
    }

    /// The current state.
    pub fn state(&self) -> State {
        public_state(self.inner.state.load(Ordering::Acquire))
    }

    /// Whether a call would be let through now, without asking for a permit: for a
    /// balancer choosing among endpoints. An open breaker whose open time is over
    /// says yes (its next call is a probe), a half-open one says yes while a probe
    /// slot is free. The answer can change before the caller acquires.
    pub fn would_admit(&self) -> bool {
        let inner = &*self.inner;
        if inner.metrics_only.load(Ordering::Relaxed) {
            return true;
        }
        let w = inner.state.load(Ordering::Acquire);
        match state_of(w) {
            CLOSED | DISABLED => true,
            FORCED_OPEN => false,
            OPEN => inner.clock.now().as_nanos() >= inner.open_until.load(Ordering::Acquire),
            _ => probes_of(w) < inner.config.half_open_probes,
        }
    }

    /// A snapshot of the state and counters.
    pub fn stats(&self) -> BreakerStats {
        let inner = &*self.inner;
        let w = inner.state.load(Ordering::Acquire);
        let now = inner.clock.now();
        let open_remaining = (state_of(w) == OPEN).then(|| {
            Duration::from_nanos(
                inner
                    .open_until
                    .load(Ordering::Acquire)
                    .saturating_sub(now.as_nanos()),
            )
        });
        BreakerStats {
            state: public_state(w),
            window: inner.detector.snapshot(now),
            consecutive_failures: inner.detector.consecutive_failures(),
            probes_in_flight: if state_of(w) == HALF_OPEN { probes_of(w) } else { 0 },
            open_remaining,
            reopens: inner.reopens.load(Ordering::Relaxed),
            metrics_only: inner.metrics_only.load(Ordering::Relaxed),
        }
    }

    /// Subscribes to state changes.
    pub fn on_state_change(&self, listener: impl Fn(&StateChange) + Send + Sync + 'static) {
        lock(&self.inner.listeners).push(Arc::new(listener));
    }

    /// Rejects every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.set_override(FORCED_OPEN);
    }

    /// Lets every call through, recording nothing, until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.set_override(DISABLED);
    }

    /// Back to Closed with an empty window, from any state.
    pub fn reset(&self) {
        let inner = &*self.inner;
        inner.detector.reset();
        inner.reopens.store(0, Ordering::Relaxed);
        inner.open_until.store(0, Ordering::Release);
        self.set_override(CLOSED);
    }

    /// Metrics-only mode: the state machine runs as if live (it trips, probes and
    /// closes, and emits events), but calls it would reject are let through and
    /// counted in `palisade_breaker_shadow_rejections_total` instead.
    pub fn set_metrics_only(&self, on: bool) {
        self.inner.metrics_only.store(on, Ordering::Relaxed);
    }

    // --- the state machine -------------------------------------------------------

    #[inline]
    fn start_time(&self) -> Instant {
        if self.inner.slow_nanos.is_some() {
            self.inner.clock.now()
        } else {
            Instant::ZERO
        }
    }

    #[inline]
    fn acquire(&self) -> Result<Ticket, Rejected> {
        let w = self.inner.state.load(Ordering::Acquire);
        if state_of(w) == CLOSED {
            return Ok(Ticket {
                kind: Kind::Closed,
                generation: gen_of(w),
                start: self.start_time(),
            });
        }
        // The slow path returns at most 16 bytes, in registers. Were it to return a
        // `Result<Ticket, Rejected>` (24 bytes) through memory, the fast path's
        // ticket would be merged with it there and read back by a wide load from
        // narrow stores: a store-forwarding stall on every call.
        self.acquire_slow(w).map_err(Refusal::into_rejected)
    }

    #[cold]
    fn acquire_slow(&self, mut w: u64) -> Result<Ticket, Refusal> {
        let inner = &*self.inner;
        loop {
            let ticket = |kind| Ticket {
                kind,
                generation: gen_of(w),
                start: self.start_time(),
            };
            match state_of(w) {
                CLOSED => return Ok(ticket(Kind::Closed)),
                DISABLED => return Ok(ticket(Kind::Passive)),
                FORCED_OPEN => return self.reject(Refusal::FORCED_OPEN, ticket(Kind::WouldReject)),
                OPEN => {
                    let now = inner.clock.now();
                    let until = inner.open_until.load(Ordering::Acquire);
                    if now.as_nanos() < until {
                        let wait = Duration::from_nanos(until - now.as_nanos());
                        return self.reject(Refusal::open(wait), ticket(Kind::WouldReject));
                    }
                    let next = next_period(w, HALF_OPEN);
                    match inner
                        .state
                        .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => {
                            self.emit(w, next, Cause::OpenElapsed, now, None);
                            w = next;
                        }
                        Err(actual) => w = actual,
                    }
                }
                _ => {
                    if probes_of(w) >= inner.config.half_open_probes {
                        return self.reject(Refusal::HALF_OPEN, ticket(Kind::WouldReject));
                    }
                    match inner.state.compare_exchange_weak(
                        w,
                        w + PROBE_ONE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Ok(ticket(Kind::Probe)),
                        Err(actual) => w = actual,
                    }
                }
            }
        }
    }

    #[cold]
    fn reject(&self, refusal: Refusal, shadow: Ticket) -> Result<Ticket, Refusal> {
        if self.inner.metrics_only.load(Ordering::Relaxed) {
            self.inner.metrics.would_reject.increment(1);
            Ok(shadow)
        } else {
            self.inner.metrics.rejected.increment(1);
            Err(refusal)
        }
    }

    /// Called by a permit exactly once: `None` means cancelled.
    #[inline]
    pub(crate) fn finish(&self, kind: Kind, ticket: &Ticket, outcome: Option<Outcome>) {
        let inner = &*self.inner;
        inner.metrics.count(outcome);
        match kind {
            Kind::Closed => {
                let failed = match outcome {
                    Some(Outcome::Success) => false,
                    Some(Outcome::Failure) => true,
                    Some(Outcome::Ignored) | None => return,
                };
                let now = if inner.needs_clock_on_record {
                    inner.clock.now()
                } else {
                    Instant::ZERO
                };
                let slow = self.is_slow(ticket, now);
                let w = inner.state.load(Ordering::Acquire);
                if state_of(w) != CLOSED || gen_of(w) != ticket.generation {
                    return; // started before the breaker tripped: not this period's data
                }
                if let Some(trip) = inner.detector.record(now, Sample { failed, slow }) {
                    self.trip(w, trip);
                }
            }
            Kind::Probe => self.finish_probe(ticket, outcome),
            Kind::Passive | Kind::WouldReject | Kind::Done => {}
        }
    }

    #[inline]
    fn is_slow(&self, ticket: &Ticket, now: Instant) -> bool {
        match self.inner.slow_nanos {
            Some(threshold) => {
                let slow = now.as_nanos().saturating_sub(ticket.start.as_nanos()) >= threshold;
                if slow {
                    self.inner.metrics.slow.increment(1);
                }
                slow
            }
            None => false,
        }
    }

    #[cold]
    fn trip(&self, w: u64, trip: Trip) {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let until = now + inner.config.open_duration.after_reopens(0);
        inner.open_until.fetch_max(until.as_nanos(), Ordering::AcqRel);
        let next = next_period(w, OPEN);
        if inner
            .state
            .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.emit(w, next, Cause::Tripped(trip), now, Some(until));
        }
    }

    #[cold]
    fn finish_probe(&self, ticket: &Ticket, outcome: Option<Outcome>) {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let slow = self.is_slow(ticket, now);
        let mut w = inner.state.load(Ordering::Acquire);
        loop {
            if state_of(w) != HALF_OPEN || gen_of(w) != ticket.generation {
                return; // the breaker has moved on
            }
            let (next, cause, until) = match outcome {
                None | Some(Outcome::Ignored) => (w - PROBE_ONE, None, None),
                Some(Outcome::Failure) => self.reopen_word(w, now),
                Some(Outcome::Success) if slow => self.reopen_word(w, now),
                Some(Outcome::Success) => {
                    if successes_of(w) + 1 >= inner.config.success_threshold {
                        // Empty the window before publishing Closed; closed-state
                        // outcomes recorded meanwhile are stale and dropped anyway.
                        inner.detector.reset();
                        (next_period(w, CLOSED), Some(Cause::ProbesSucceeded), None)
                    } else {
                        (w - PROBE_ONE + SUCCESS_ONE, None, None)
                    }
                }
            };
            match inner
                .state
                .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if let Some(cause) = cause {
                        match state_of(next) {
                            OPEN => {
                                inner.reopens.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => inner.reopens.store(0, Ordering::Relaxed),
                        }
                        self.emit(w, next, cause, now, until);
                    }
                    return;
                }
                Err(actual) => w = actual,
            }
        }
    }

    fn reopen_word(&self, w: u64, now: Instant) -> (u64, Option<Cause>, Option<Instant>) {
        let inner = &*self.inner;
        let reopens = inner.reopens.load(Ordering::Relaxed).saturating_add(1);
        let until = now + inner.config.open_duration.after_reopens(reopens);
        inner.open_until.fetch_max(until.as_nanos(), Ordering::AcqRel);
        (next_period(w, OPEN), Some(Cause::ProbeFailed), Some(until))
    }

    fn set_override(&self, to: u64) {
        let inner = &*self.inner;
        let mut w = inner.state.load(Ordering::Acquire);
        loop {
            let next = next_period(w, to);
            match inner
                .state
                .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if state_of(w) != to {
                        self.emit(w, next, Cause::Manual, inner.clock.now(), None);
                    }
                    return;
                }
                Err(actual) => w = actual,
            }
        }
    }

    #[cold]
    fn emit(&self, from: u64, to: u64, cause: Cause, at: Instant, open_until: Option<Instant>) {
        let inner = &*self.inner;
        let (from, to) = (public_state(from), public_state(to));
        inner.metrics.state.set(to.gauge_value());
        metrics::counter!(
            "palisade_breaker_transitions_total",
            "breaker" => inner.name.to_string(),
            "from" => from.as_str(),
            "to" => to.as_str()
        )
        .increment(1);
        let listeners = lock(&inner.listeners).clone();
        if listeners.is_empty() {
            return;
        }
        let change = StateChange {
            breaker: inner.name.clone(),
            from,
            to,
            cause,
            at,
            open_until,
        };
        for listener in &listeners {
            listener(&change);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `Ok` is a success, `Err` a failure.
pub(crate) fn default_classify<T, E>(result: &Result<T, E>) -> Outcome {
    if result.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failure
    }
}
