//! # palisade-core
//!
//! What every Palisade crate needs and no single feature owns:
//!
//! - [`clock`]: time as policies see it. Code asks a [`Clock`] for "now", so a test
//!   moves a [`ManualClock`] by hand instead of sleeping.
//! - [`Cause`]: why a policy answered a call rather than what it called, one
//!   vocabulary for the gateway's `x-palisade-cause` and the tower layers' errors.
//! - [`sync`]: the atomics lock-free cores use, swapped for loom's under `--cfg loom`.
//! - [`ConfigError`] and [`ConfigErrors`]: every problem in a configuration, each
//!   naming its field.
//! - [`config`] (feature `toml`): TOML files with durations written `"250ms"`,
//!   errors naming field and line, and environment overrides.
//! - [`db`] (feature `sqlx`): a transaction a cancelled caller cannot leave open.
//!
//! Dependencies point one way: every other crate of the workspace may use this one,
//! and this one uses none of them.

mod cause;
pub mod clock;
#[cfg(feature = "toml")]
pub mod config;
#[cfg(feature = "sqlx")]
pub mod db;
mod error;
pub mod sync;

pub use cause::Cause;
pub use clock::{Clock, Instant, ManualClock, SharedClock, SystemClock, TokioClock};
pub use error::{ConfigError, ConfigErrors};
