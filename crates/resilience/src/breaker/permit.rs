use super::CircuitBreaker;
use crate::clock::Instant;

/// How a call ended, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Counts as healthy.
    Success,
    /// Counts as a failure.
    Failure,
    /// Not counted either way (e.g. a 404 that is the caller's fault). A probe that
    /// ends `Ignored` frees its slot without deciding anything.
    Ignored,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A normal call in the closed state.
    Closed,
    /// A half-open probe.
    Probe,
    /// Disabled: not counted.
    Passive,
    /// A call a metrics-only breaker would have rejected, let through: not counted.
    WouldReject,
    /// Already recorded: the permit's drop does nothing.
    Done,
}

/// What a permit remembers about its call. Private: only a [`Permit`] hands it back.
///
/// The permit holds it directly and the breaker reads it by reference, field by
/// field: moving the whole ticket (an `Option<Ticket>` taken, or a ticket passed by
/// value) compiled to narrow stores read back by one wide load, a store-forwarding
/// stall that was the largest single cost of the closed path.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) kind: Kind,
    pub(crate) generation: u32,
    pub(crate) start: Instant,
}

/// Leave to make one call. Tell the breaker how it went with [`Permit::record`];
/// dropping the permit unrecorded (a cancelled future, a panic) records
/// "cancelled": the call is not counted and a half-open probe slot is given back.
///
/// `B` is how the permit reaches its breaker: `&CircuitBreaker` from
/// [`CircuitBreaker::try_acquire`], or an owned clone from
/// [`CircuitBreaker::try_acquire_owned`] for futures that must be `'static`.
#[must_use = "a permit must be recorded (or dropped, which records it as cancelled)"]
#[derive(Debug)]
pub struct Permit<B: AsRef<CircuitBreaker>> {
    breaker: B,
    ticket: Ticket,
}

impl<B: AsRef<CircuitBreaker>> Permit<B> {
    #[inline]
    pub(crate) fn new(breaker: B, ticket: Ticket) -> Self {
        Permit { breaker, ticket }
    }

    /// Whether the breaker would have rejected this call, had it not been in
    /// metrics-only mode ([`CircuitBreaker::set_metrics_only`]).
    #[inline]
    pub fn would_have_been_rejected(&self) -> bool {
        self.ticket.kind == Kind::WouldReject
    }

    /// Records how the call went.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.record_in_place(outcome);
    }

    /// Records how the call went, if nothing was recorded yet; later calls and the
    /// drop then do nothing. For a permit kept in a field (a response future's
    /// state), where moving it out to call [`record`](Self::record) would copy it.
    #[inline]
    pub fn record_in_place(&mut self, outcome: Outcome) {
        self.finish_once(Some(outcome));
    }

    /// Hands the outcome (`None`: cancelled) to the breaker the first time only.
    #[inline]
    fn finish_once(&mut self, outcome: Option<Outcome>) {
        let kind = std::mem::replace(&mut self.ticket.kind, Kind::Done);
        if kind != Kind::Done {
            self.breaker.as_ref().finish(kind, &self.ticket, outcome);
        }
    }

    /// Records a success.
    #[inline]
    pub fn success(self) {
        self.record(Outcome::Success)
    }

    /// Records a failure.
    #[inline]
    pub fn failure(self) {
        self.record(Outcome::Failure)
    }

    /// True if this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.ticket.kind == Kind::Probe
    }
}

impl<B: AsRef<CircuitBreaker>> Drop for Permit<B> {
    #[inline]
    fn drop(&mut self) {
        self.finish_once(None);
    }
}
