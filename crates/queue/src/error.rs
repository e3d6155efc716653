//! The queue's errors, sorted by what a caller can do about them.

/// What went wrong with a queue operation.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database could not be reached (refused, reset, timed out, shutting
    /// down): try again later, or degrade (the gateway answers `503
    /// queue_unavailable`).
    #[error("the queue's database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused the operation.
    #[error("the queue's database refused: {0}")]
    Database(#[source] sqlx::Error),
    /// The database holds a newer schema than this build knows.
    #[error(
        "the queue's schema in this database is version {found}, newer than this build's {supported}: run a newer palisade"
    )]
    SchemaTooNew {
        /// The database's version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// The job cannot be enqueued as it is (no kind, `max_attempts` below 1, ...).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The database URL names no backend the queue has.
    #[error("unsupported database URL {0:?}: use postgres://... or sqlite:...")]
    UnsupportedUrl(String),
    /// A stored row does not read as a job.
    #[error("a stored job is malformed: {0}")]
    Corrupt(String),
}

impl QueueError {
    /// Whether the database was unreachable (as opposed to refusing).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL shutting down or restarting (class 57: operator
            // intervention), or out of connections (53300).
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("57") || c == "53300" || c == "08006"),
            _ => false,
        };
        if unavailable {
            QueueError::Unavailable(e)
        } else {
            QueueError::Database(e)
        }
    }
}
