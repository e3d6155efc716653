//! # palisade-data
//!
//! Data routing for a service on PostgreSQL, as a library it links:
//!
//! - [`ReplicaSet`]: the read/write split. Writes and transactions go to the
//!   primary; reads go to a streaming replica chosen by `palisade-balance`, each
//!   behind its own circuit breaker. Each replica's lag is measured on an interval
//!   (its replayed log position against the primary's, turned into time) and a
//!   replica behind by more than `max_lag` gets no reads until it catches up. A
//!   write returns a causality token ([`Lsn`]); a read given it is served only by a
//!   server that has replayed it (read-your-writes).
//! - [`Shards`]: a key's calls go to the shard that owns it ([`ShardMap`]: a
//!   consistent-hash ring with 150 virtual nodes by default, jump hash,
//!   rendezvous hashing, or explicit key ranges), each shard behind its own
//!   breaker and timeout; [`Shards::scatter`] asks every shard at once under an
//!   explicit policy for partial results ([`Gather`]). With a control database
//!   the layout can change while writes go on ([`Resharder`]: double-write,
//!   backfill, verify, freeze and cut over, clean up; resumable after a crash).
//! - [`IdGenerator`]: globally unique, time-ordered 64-bit ids (the Snowflake
//!   layout), a worker id per process, safe against a clock going backwards.
//! - [`Leases`]: leader leases in PostgreSQL with fencing tokens; a transaction
//!   fenced by a lease is refused once another holder has taken it over.
//!
//! Every setting is validated up front and every problem names its field
//! ([`ReplicaSetConfig::validate`], [`ShardsConfig::validate`]).

mod config;
mod control;
mod error;
pub mod id;
mod lag;
mod lease;
mod lsn;
mod replicas;
mod reshard;
pub mod shard_map;
mod shards;
mod task;

pub use config::{PoolConfig, ReadBalance, ReplicaSetConfig, WhenNoReplica};
pub use control::{Phase, Progress, TableKey};
pub use error::DataError;
pub use id::IdGenerator;
pub use lease::{Lease, Leases};
pub use lsn::{Lsn, LsnParseError};
pub use replicas::ReplicaSet;
pub use reshard::{ReshardPlan, Resharder};
pub use shard_map::{KeyRange, Layout, Placement, ShardMap};
pub use shards::{Gather, Gathered, ShardConfig, Shards, ShardsConfig, Tx};
