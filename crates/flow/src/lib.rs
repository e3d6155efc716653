//! # palisade-flow
//!
//! Consistency tools for a service's writes, on PostgreSQL (and Redis):
//!
//! - [`idempotency`]: idempotency keys with Stripe's semantics (a repeat gets the
//!   stored answer, the key with another request is a 422, a repeat while the first
//!   runs a 409), in PostgreSQL or Redis, and a tower layer for HTTP services.
//! - [`optimistic`]: versioned updates retried on conflict with backoff and jitter.
//! - [`saga`]: durable sagas whose steps run as jobs of `palisade-queue`, the
//!   completed steps compensated in reverse order when one fails for good.
//! - [`events`]: an event store (streams with expected versions, a global order
//!   safe to checkpoint, snapshots) and projections fed exactly once, rebuildable
//!   from zero.
//! - [`outbox`]: the transactional outbox, relayed at least once to NATS JetStream
//!   (or a bus inside the process), duplicates dropped by message id.
//! - [`reconcile`]: two sources of truth compared now and then (as a periodic
//!   queue job), differences counted and repaired by the caller's policy.
//!
//! A crate of its own rather than part of `palisade-data`: these tools hold the
//! write side's workflows, and they need Redis, the job queue and an event bus,
//! none of which a service that only routes queries should build.

pub mod events;
pub mod idempotency;
pub mod optimistic;
pub mod outbox;
pub mod reconcile;
pub mod saga;

pub use idempotency::{
    Claim, Concurrent, Idempotency, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, Outcome, PgStore,
    RedisStore, Stored,
};
pub use optimistic::{Attempt, OptimisticError, OptimisticRetry};
