//! Retries as tower middleware. See [`RetryLayer`].

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use service::{Retry, RetryErrors, RetryPredicate};
