//! What a data call can come to besides its value.

use palisade_core::ConfigErrors;

/// Why a call through the data layer did not return its value.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The configuration is wrong; every problem names its field.
    #[error("invalid data configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// No replica can serve the read and the set is configured to refuse rather
    /// than read the primary.
    #[error("no replica of {set} can serve reads (when_no_replica = \"refuse\")")]
    NoReplica {
        /// The replica set's name.
        set: String,
    },
    /// A server could not be reached (connection refused or reset, pool timed out,
    /// the server shutting down), or its breaker is open.
    #[error("{target} is unavailable: {reason}")]
    Unavailable {
        /// The server: `primary`, a replica's or a shard's name.
        target: String,
        /// What happened.
        reason: String,
    },
    /// The shard that owns the key is unavailable (down, or its breaker open).
    #[error("shard {shard} is unavailable: {reason}")]
    ShardUnavailable {
        /// The shard's name.
        shard: String,
        /// What happened.
        reason: String,
    },
    /// A call spanning shards did not hear from enough of them in time.
    #[error("{failed} of {total} shards failed ({policy}): {first}")]
    Partial {
        /// Shards that failed or timed out.
        failed: usize,
        /// Shards asked.
        total: usize,
        /// The policy that judged it.
        policy: &'static str,
        /// The first failure, by shard.
        first: String,
    },
    /// A write carried a fencing token older than the lease's: another holder has
    /// taken the lease since, and the write was not made.
    #[error("lease {lease}: fencing token {token} is stale (the lease is at {current})")]
    Fenced {
        /// The lease's name.
        lease: String,
        /// The token the write carried.
        token: i64,
        /// The lease's token now.
        current: i64,
    },
    /// The lease is held by another holder.
    #[error("lease {lease} is held by {holder} for another {remaining_ms} ms")]
    LeaseHeld {
        /// The lease's name.
        lease: String,
        /// Its holder.
        holder: String,
        /// How long its hold lasts unless renewed.
        remaining_ms: i64,
    },
    /// The key is moving between shards and its writes are held for the moment
    /// the copies are made exact (the freeze before a resharding's cut): retry.
    #[error("set {set}: key is moving to another shard; writes resume within moments")]
    Resharding {
        /// The shard set's name.
        set: String,
    },
    /// The control database's record of the shard set is unusable.
    #[error("control database: {0}")]
    Control(String),
    /// The query itself failed (a database error, a row missing, a decode error):
    /// the server was there and answered.
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// Whether `e` says the server is not there (rather than that the query was
/// wrong): another server may answer the same read.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_unavailable_state(&c)),
        _ => false,
    }
}

/// SQLSTATEs of a server that cannot serve: connection exceptions (class 08), a
/// shutdown or a server starting (57P01-57P03), too many connections (53300).
fn is_unavailable_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Whether `e` is a replica cancelling a read that conflicted with replay
/// (SQLSTATE 40001 on a hot standby): the same read may succeed elsewhere, and
/// the replica is not at fault.
pub(crate) fn is_recovery_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40001"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_states_are_unavailability_and_query_errors_are_not() {
        assert!(is_unavailable_state("08006"));
        assert!(is_unavailable_state("57P01"));
        assert!(is_unavailable_state("53300"));
        assert!(
            !is_unavailable_state("42P01"),
            "undefined table is the query's fault"
        );
        assert!(!is_unavailable_state("23505"));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
    }
}
