//! Projections: read models fed from the event store, exactly once.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use super::EventError;
use super::store::{Checkpoint, EventStore, RecordedEvent, frontier, read_all};

/// A read model built from events (a table of balances, a search index row).
pub trait Projection: Send + Sync {
    /// Its name: its checkpoint's key.
    fn name(&self) -> &str;

    /// Applies one event, in the transaction that also moves the checkpoint.
    fn apply<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        event: &'c RecordedEvent,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;

    /// Empties the read model (a rebuild starts from nothing).
    fn reset<'c>(&'c self, conn: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>;
}

/// Feeds a projection from the store, batch by batch, each batch and its
/// checkpoint in one transaction (two projectors of one projection take turns).
pub struct Projector<P> {
    store: EventStore,
    projection: P,
    batch: i64,
    applied: metrics::Counter,
}

impl<P> std::fmt::Debug for Projector<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> Projector<P> {
    /// Feeds `projection` from `store`, 500 events per transaction.
    pub fn new(store: EventStore, projection: P) -> Self {
        let applied = metrics::counter!("palisade_projection_events_total", "projection" => projection.name().to_string());
        Projector {
            store,
            projection,
            batch: 500,
            applied,
        }
    }

    /// Events per transaction.
    pub fn batch(mut self, events: i64) -> Self {
        self.batch = events.max(1);
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Applies every event not yet applied; how many.
    pub async fn catch_up(&self) -> Result<u64, EventError> {
        let mut total = 0;
        loop {
            let n = self.step().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Empties the read model and applies every event from the start.
    pub async fn rebuild(&self) -> Result<u64, EventError> {
        let mut tx = palisade_queue::begin(self.store.pool()).await?;
        self.lock(&mut tx).await?;
        self.projection.reset(&mut tx).await?;
        sqlx::query("UPDATE palisade_checkpoints SET tx = '0'::xid8, position = 0 WHERE name = $1")
            .bind(self.projection.name())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.catch_up().await
    }

    /// Catches up every `interval` until an error, which it returns.
    pub async fn run(&self, interval: Duration) -> Result<(), EventError> {
        loop {
            self.catch_up().await?;
            tokio::time::sleep(interval).await;
        }
    }

    /// One batch: the checkpoint locked, the events after it applied, the
    /// checkpoint moved, all in one transaction.
    async fn step(&self) -> Result<u64, EventError> {
        let mut tx = palisade_queue::begin(self.store.pool()).await?;
        let frontier = frontier(&mut tx).await?;
        let at = self.lock(&mut tx).await?;
        let events = read_all(&mut tx, at, Some(frontier), self.batch).await?;
        let Some(last) = events.last().map(|e| e.checkpoint) else {
            return Ok(0);
        };
        for event in &events {
            self.projection.apply(&mut tx, event).await?;
        }
        sqlx::query("UPDATE palisade_checkpoints SET tx = $2::text::xid8, position = $3 WHERE name = $1")
            .bind(self.projection.name())
            .bind(last.tx.to_string())
            .bind(last.position)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.applied.increment(events.len() as u64);
        Ok(events.len() as u64)
    }

    /// The projection's checkpoint, locked for this transaction (created at the
    /// start if missing).
    async fn lock(&self, conn: &mut PgConnection) -> Result<Checkpoint, EventError> {
        sqlx::query("INSERT INTO palisade_checkpoints (name, tx, position) VALUES ($1, '0'::xid8, 0) ON CONFLICT DO NOTHING")
            .bind(self.projection.name())
            .execute(&mut *conn)
            .await?;
        let (tx, position): (String, i64) =
            sqlx::query_as("SELECT tx::text, position FROM palisade_checkpoints WHERE name = $1 FOR UPDATE")
                .bind(self.projection.name())
                .fetch_one(&mut *conn)
                .await?;
        Ok(Checkpoint {
            tx: tx.parse().unwrap_or(0),
            position,
        })
    }
}
