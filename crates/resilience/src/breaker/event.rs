use std::sync::Arc;

use super::detector::Trip;
use crate::clock::Instant;

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are watched.
    Closed,
    /// Calls are rejected until the open period ends.
    Open,
    /// A few probe calls test whether the dependency has recovered.
    HalfOpen,
    /// Rejects every call until reset (an operator's override).
    ForcedOpen,
    /// Lets every call through and records nothing (an operator's override).
    Disabled,
}

impl State {
    /// Lower-case name, as used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    /// Value of the `palisade_breaker_state` gauge.
    pub fn gauge_value(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
            State::ForcedOpen => 3.0,
            State::Disabled => 4.0,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cause {
    /// A detector tripped (Closed to Open).
    Tripped(Trip),
    /// The open period ended (Open to HalfOpen).
    OpenElapsed,
    /// Enough probes succeeded (HalfOpen to Closed).
    ProbesSucceeded,
    /// A probe failed or was slow (HalfOpen to Open).
    ProbeFailed,
    /// An operator called `force_open`, `disable` or `reset`.
    Manual,
}

/// A state change, as given to subscribers.
#[derive(Clone, Debug)]
pub struct StateChange {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Why.
    pub cause: Cause,
    /// When, by the breaker's clock.
    pub at: Instant,
    /// When the breaker will probe again (transitions to Open only).
    pub open_until: Option<Instant>,
}

/// A subscriber to state changes. Called on the thread that made the change; keep
/// it short (send to a channel for anything slow).
pub type Listener = Arc<dyn Fn(&StateChange) + Send + Sync>;
