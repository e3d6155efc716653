//! tower middleware around the policy cores, one folder per policy in tower's shape
//! (`layer.rs`, `service.rs`, `future.rs`).
//!
//! Compose them with `tower::ServiceBuilder` in this order (outermost first; the
//! reasons are in `docs/patterns/composition.md`):
//!
//! ```text
//! fallback > timeout (total) > hedge | retry > circuit breaker > bulkhead
//!          > timeout (per attempt) > rate limit > chaos > service
//! ```
//!
//! The total timeout publishes a [`Deadline`](crate::timeout::Deadline) that the retry
//! layer reads (no attempt starts that cannot finish in time) and that the per-attempt
//! timeout honours (never outlives the total). The breaker sits inside the retry so
//! each attempt is judged, and a rejected attempt is retried only if the predicate
//! says so.
//!
//! [`pipeline::PipelineBuilder`] builds this order from one value, with every stage
//! optional and the errors flattened into one [`pipeline::PolicyError`].
//!
//! Rejections and timeouts are decided in `call`, never in `poll_ready`: a rejected
//! request fails at once and never waits.

pub mod admit;
pub mod breaker;
pub mod bulkhead;
pub mod chaos;
pub mod fallback;
pub mod hedge;
pub mod pipeline;
pub mod ratelimit;
pub mod retry;
pub mod shed;
pub mod timeout;
