//! Retry: try again after a transient failure, without multiplying an outage.
//!
//! * [`Backoff`]: how long to wait: fixed, exponential, exponential with full
//!   jitter, decorrelated jitter.
//! * [`RetryPolicy`]: max attempts, max elapsed time, the deadline, the backoff and an
//!   optional shared [`RetryBudget`]. [`RetryPolicy::start`] returns a [`Retrying`]
//!   state that is told of each failure and answers [`Decision::Retry`] (after a
//!   delay) or [`Decision::Stop`] with a [`StopReason`].
//! * What is retryable, and a server's own hint (`Retry-After`), is decided by the
//!   caller: the tower layer takes a predicate that returns a [`RetryAction`].

mod backoff;
mod budget;
mod policy;

pub use backoff::Backoff;
pub(crate) use backoff::exponential;
pub use budget::{BudgetConfig, RetryBudget};
pub use policy::{Decision, RetryAction, RetryPolicy, RetryState, Retrying, StopReason};
