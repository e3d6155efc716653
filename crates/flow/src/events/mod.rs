//! An event store on PostgreSQL, and projections fed from it.
//!
//! Events are appended to a stream (an aggregate: an account, an order) with the
//! version the writer expects the stream to be at; a writer that read an older
//! state meets [`EventError::Conflict`] and nothing is written. Every event also
//! has a global position, and [`EventStore::read_all`] reads them in an order in
//! which no event can appear later behind one already read: by the writing
//! transaction's id, and only transactions older than every one still running, so
//! a reader that checkpoints where it stopped never skips an event committed late.
//!
//! [`Projector`] feeds a [`Projection`] (a read model, a materialized view) and
//! moves its checkpoint in the same transaction as the rows it writes, so each
//! event is applied exactly once; [`Projector::rebuild`] empties the read model and
//! replays everything from the start.

mod projection;
mod store;

pub use projection::{Projection, Projector};
pub use store::{Checkpoint, EventStore, Expected, NewEvent, RecordedEvent, Snapshot};

/// Why an event store call failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The stream was not at the expected version: nothing was appended.
    #[error("stream {stream} is at version {actual}, not {expected}")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: String,
        /// Where it is.
        actual: i64,
    },
    /// The database.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A snapshot's or an event's data that does not (de)serialize.
    #[error("event data: {0}")]
    Data(#[from] serde_json::Error),
}
