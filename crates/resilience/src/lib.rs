//! # palisade-resilience
//!
//! Resilience policies as **sans-I/O state machines** with thin [`tower`] layers.
//!
//! Every policy here is a plain value that takes "now" from a [`Clock`] and is told
//! the outcome of each call. Nothing in the cores sleeps, spawns or does I/O, so the
//! same code runs in a service, in a test driven by a [`ManualClock`], or in an offline
//! replay of a recorded trace. The [`layer`] module wraps the cores as tower
//! middleware for axum, tonic and hyper clients.
//!
//! | pattern | core | tower layer |
//! |---|---|---|
//! | circuit breaker | [`breaker::CircuitBreaker`] | [`layer::breaker::CircuitBreakerLayer`] |
//! | failure detection | [`breaker::Detector`], [`window`] | (inside the breaker) |
//! | retry | [`retry::RetryPolicy`], [`retry::Backoff`], [`retry::RetryBudget`] | [`layer::retry::RetryLayer`] |
//! | timeout | [`timeout::AdaptiveTimeout`], [`timeout::Deadline`] | [`layer::timeout::TimeoutLayer`] |
//!
//! The breaker is also usable without tower: [`breaker::CircuitBreaker::call`] for
//! synchronous code and [`breaker::CircuitBreaker::call_async`] for futures.
//!
//! ```
//! use palisade_resilience::breaker::{CircuitBreaker, BreakerConfig};
//!
//! let breaker = CircuitBreaker::new("inventory", BreakerConfig::default());
//! let answer: Result<u32, _> = breaker.call(|| Ok::<_, std::io::Error>(42));
//! assert_eq!(answer.unwrap(), 42);
//! ```
//!
//! [`tower`]: https://docs.rs/tower

pub mod breaker;
pub mod bulkhead;
pub mod layer;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod shed;
pub mod timeout;
pub mod window;

pub use palisade_core::clock;
pub(crate) use palisade_core::sync;
pub use palisade_core::{Cause, Clock, ConfigError, ConfigErrors, Instant, ManualClock, SystemClock};
