//! Circuit breaker: stop calling a dependency that is failing, probe it, and resume.
//!
//! ```text
//!            detector trips               open period ends
//!   Closed ─────────────────▶ Open ─────────────────────────▶ HalfOpen
//!     ▲                        ▲                                │  │
//!     │                        └──────── a probe fails ─────────┘  │
//!     └─────────────── success_threshold probes succeed ───────────┘
//! ```
//!
//! * Detection: [`Detector`] = consecutive failures, failure rate and slow-call rate
//!   over a count- or time-based [window](crate::window); any one trips.
//! * Permits: [`CircuitBreaker::try_acquire`] returns a [`Permit`] (RAII) or a
//!   [`Rejected`] error. The closed-state decision is one atomic load.
//! * Overrides: [`CircuitBreaker::force_open`], [`CircuitBreaker::disable`],
//!   [`CircuitBreaker::reset`], and metrics-only mode
//!   ([`CircuitBreaker::set_metrics_only`]), which runs the state machine for real
//!   but never rejects: for tuning thresholds on production traffic.
//! * Observability: [`CircuitBreaker::on_state_change`] subscribers and
//!   `palisade_breaker_*` metrics through the `metrics` facade.
//! * Many breakers: [`BreakerRegistry`] keeps one per key (endpoint, route).

mod config;
mod detector;
mod event;
mod permit;
mod registry;
mod state;

pub use crate::{ConfigError, ConfigErrors};
pub use config::{BreakerConfig, OpenDuration, RateThreshold, SlowCallThreshold};
pub use detector::{ConsecutiveFailures, Detector, FailureRate, SlowCallRate, Trip};
pub use event::{Cause, Listener, State, StateChange};
pub use permit::{Outcome, Permit};
pub use registry::BreakerRegistry;
pub use state::{BreakerError, BreakerStats, CircuitBreaker, Rejected};
