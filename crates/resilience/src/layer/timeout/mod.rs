//! Fixed and adaptive timeouts as tower middleware. See [`TimeoutLayer`].

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::{TimeoutLayer, TimeoutSource};
pub use service::{Elapsed, Timeout, TimeoutError};
