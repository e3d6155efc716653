//! The transactional outbox, and the event bus it relays to.
//!
//! A service that changes its state and must tell others cannot do both
//! atomically: the database commits and the broker is down, or the message goes
//! out and the transaction rolls back. The outbox writes the message into the
//! same transaction as the change ([`Outbox::add_in`]); a [`Relay`] then publishes
//! what was committed to an [`EventBus`] and deletes it once the bus has
//! acknowledged it. Delivery is at least once: a relay that dies after publishing
//! and before deleting publishes again. Every message carries its id, which
//! JetStream uses to drop duplicates within its window ([`JetStreamBus`] sends it
//! as `Nats-Msg-Id`) and consumers use to drop the rest ([`Inbox`]).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use sqlx::{PgConnection, PgPool};

#[cfg(feature = "jetstream")]
mod jetstream;
#[cfg(feature = "jetstream")]
pub use jetstream::JetStreamBus;

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS palisade_outbox (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        subject text NOT NULL,
        payload bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE TABLE IF NOT EXISTS palisade_inbox (
        consumer text NOT NULL,
        id text NOT NULL,
        seen_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, id)
    )",
];

/// A message for the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its id: consumers drop a message whose id they have seen.
    pub id: String,
    /// Where it goes (a NATS subject: `orders.created`).
    pub subject: String,
    /// What it says.
    pub payload: Bytes,
}

impl Message {
    /// A message to `subject` with a random id.
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: format!("{:032x}", fastrand::u128(..)),
            subject: subject.into(),
            payload: payload.into(),
        }
    }
}

/// A bus failed to take a message.
#[derive(Debug, thiserror::Error)]
#[error("event bus: {0}")]
pub struct BusError(pub String);

/// Where a relay publishes.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes `message`, returning once the bus has it (stored, for a durable
    /// bus).
    fn publish(&self, message: &Message) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Publishes `messages` in order; how many of them, from the first, the bus
    /// has, and the error that stopped it short. (Later ones may have reached the
    /// bus too: they are sent again, and dropped as duplicates by id.) One at a
    /// time unless the bus does better.
    fn publish_all(&self, messages: &[Message]) -> impl Future<Output = (usize, Option<BusError>)> + Send {
        async move {
            for (i, m) in messages.iter().enumerate() {
                if let Err(e) = self.publish(m).await {
                    return (i, Some(e));
                }
            }
            (messages.len(), None)
        }
    }
}

/// Why a relay pass failed (nothing it had not published is lost: the pass's
/// messages stay in the outbox).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The bus.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The outbox table (`palisade_outbox`) in one database.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: PgPool,
}

impl Outbox {
    /// The outbox in the database of `pool` (its tables created if missing).
    pub async fn new(pool: PgPool) -> Result<Self, sqlx::Error> {
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Outbox { pool })
    }

    /// Adds `messages` in the caller's transaction: they are relayed if, and only
    /// if, it commits.
    pub async fn add_in(conn: &mut PgConnection, messages: &[Message]) -> Result<(), sqlx::Error> {
        let col = |f: fn(&Message) -> String| messages.iter().map(f).collect::<Vec<String>>();
        let payloads: Vec<Vec<u8>> = messages.iter().map(|m| m.payload.to_vec()).collect();
        sqlx::query(
            "INSERT INTO palisade_outbox (id, subject, payload)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])",
        )
        .bind(col(|m| m.id.clone()))
        .bind(col(|m| m.subject.clone()))
        .bind(payloads)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Messages not yet relayed.
    pub async fn pending(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM palisade_outbox")
            .fetch_one(&self.pool)
            .await
    }

    /// A relay of this outbox to `bus`.
    pub fn relay<B: EventBus>(&self, bus: B) -> Relay<B> {
        Relay {
            pool: self.pool.clone(),
            bus,
            batch: 100,
            relayed: metrics::counter!("palisade_outbox_relayed_total"),
        }
    }
}

/// Publishes what the outbox holds, oldest first, and deletes what the bus took.
/// Several relays may run at once: each locks its batch (`SKIP LOCKED`).
pub struct Relay<B> {
    pool: PgPool,
    bus: B,
    batch: i64,
    relayed: metrics::Counter,
}

impl<B> std::fmt::Debug for Relay<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<B: EventBus> Relay<B> {
    /// Messages per pass.
    pub fn batch(mut self, n: i64) -> Self {
        self.batch = n.max(1);
        self
    }

    /// One pass: a batch locked, published in order, deleted; how many.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let mut tx = palisade_queue::begin(&self.pool).await?;
        let rows: Vec<(i64, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, id, subject, payload FROM palisade_outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let (seqs, messages): (Vec<i64>, Vec<Message>) = rows
            .into_iter()
            .map(|(seq, id, subject, payload)| {
                let payload = Bytes::from(payload);
                (seq, Message { id, subject, payload })
            })
            .unzip();
        let (taken, error) = self.bus.publish_all(&messages).await;
        // What the bus took need not go again, whatever stopped the rest.
        self.forget(&mut tx, &seqs[..taken]).await?;
        tx.commit().await?;
        match error {
            Some(e) => Err(e.into()),
            None => Ok(taken),
        }
    }

    async fn forget(&self, conn: &mut PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
        if !seqs.is_empty() {
            sqlx::query("DELETE FROM palisade_outbox WHERE seq = ANY($1)")
                .bind(seqs)
                .execute(conn)
                .await?;
            self.relayed.increment(seqs.len() as u64);
        }
        Ok(())
    }

    /// Relays until the outbox is empty, then every `interval`, for ever; a failed
    /// pass (the bus down) is logged and tried again after `interval`.
    pub async fn run(&self, interval: Duration) {
        loop {
            match self.relay_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay: pass failed; retrying"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// A bus inside the process: every subscriber gets every message published after
/// it subscribed (for tests and single-process deployments; nothing is kept).
#[derive(Clone, Debug)]
pub struct InProcessBus {
    sender: tokio::sync::broadcast::Sender<Message>,
}

impl InProcessBus {
    /// A bus holding up to `capacity` messages a slow subscriber has not read.
    pub fn new(capacity: usize) -> Self {
        InProcessBus {
            sender: tokio::sync::broadcast::channel(capacity.max(1)).0,
        }
    }

    /// A new subscriber.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Message> {
        self.sender.subscribe()
    }
}

impl EventBus for InProcessBus {
    async fn publish(&self, message: &Message) -> Result<(), BusError> {
        // No subscriber is no failure: nobody is listening yet.
        let _ = self.sender.send(message.clone());
        Ok(())
    }
}

/// A consumer's record of the messages it has handled, for dropping duplicates.
#[derive(Clone, Copy, Debug)]
pub struct Inbox;

impl Inbox {
    /// Records that `consumer` handles message `id`, in the caller's transaction
    /// (with the handling's own writes): `false` if it was handled before (skip
    /// it). Needs the outbox's tables ([`Outbox::new`]) in the consumer's database.
    pub async fn first_time(conn: &mut PgConnection, consumer: &str, id: &str) -> Result<bool, sqlx::Error> {
        let done =
            sqlx::query("INSERT INTO palisade_inbox (consumer, id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(consumer)
                .bind(id)
                .execute(conn)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
