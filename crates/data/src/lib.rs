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
//!
//! Every setting is validated up front and every problem names its field
//! ([`ReplicaSetConfig::validate`]).

mod config;
mod error;
mod lag;
mod lsn;
mod replicas;

pub use config::{PoolConfig, ReadBalance, ReplicaSetConfig, WhenNoReplica};
pub use error::DataError;
pub use lsn::{Lsn, LsnParseError};
pub use replicas::ReplicaSet;
