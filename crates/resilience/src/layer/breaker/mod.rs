//! A circuit breaker as tower middleware. See [`CircuitBreakerLayer`].

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use service::{CircuitBreakerService, Classify, DefaultClassifier};
