//! Appending and reading events.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool, Row};

use super::EventError;

const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS palisade_events (
        position bigserial PRIMARY KEY,
        tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
        stream text NOT NULL,
        version bigint NOT NULL,
        id text NOT NULL UNIQUE,
        kind text NOT NULL,
        data jsonb NOT NULL,
        metadata jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (stream, version)
    )",
    "CREATE INDEX IF NOT EXISTS palisade_events_order ON palisade_events (tx, position)",
    "CREATE TABLE IF NOT EXISTS palisade_snapshots (
        stream text PRIMARY KEY,
        version bigint NOT NULL,
        data jsonb NOT NULL,
        taken_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE TABLE IF NOT EXISTS palisade_checkpoints (
        name text PRIMARY KEY,
        tx xid8 NOT NULL,
        position bigint NOT NULL
    )",
];

/// The version a writer expects a stream to be at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Whatever it is.
    Any,
    /// It has no events yet.
    NoStream,
    /// Exactly this many events (the version of its last one).
    Exact(i64),
}

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// A unique id (consumers deduplicate by it); random unless set.
    pub id: String,
    /// Its type, as its consumers know it (`AccountOpened`).
    pub kind: String,
    /// Its data.
    pub data: serde_json::Value,
    /// Anything else (a correlation id, the user).
    pub metadata: serde_json::Value,
}

impl NewEvent {
    /// An event of `kind` with `data`, a random id and no metadata.
    pub fn new(kind: impl Into<String>, data: &impl Serialize) -> Result<Self, EventError> {
        Ok(NewEvent {
            id: format!("{:032x}", fastrand::u128(..)),
            kind: kind.into(),
            data: serde_json::to_value(data)?,
            metadata: serde_json::Value::Object(Default::default()),
        })
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    /// Its global position (unique, growing with insertion).
    pub position: i64,
    /// Where a reader of every stream stands after reading it.
    pub checkpoint: Checkpoint,
    /// Its stream.
    pub stream: String,
    /// Its version in the stream (from 1).
    pub version: i64,
    /// Its id.
    pub id: String,
    /// Its type.
    pub kind: String,
    /// Its data.
    pub data: serde_json::Value,
    /// Its metadata.
    pub metadata: serde_json::Value,
}

impl RecordedEvent {
    /// The data as `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        Ok(serde_json::from_value(self.data.clone())?)
    }
}

/// A place in the order of every event: the writing transaction and the position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Checkpoint {
    /// The writing transaction's id (0: the start).
    pub tx: u64,
    /// The event's position.
    pub position: i64,
}

/// A stream's state saved at a version, so loading it need not replay every event.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot<T> {
    /// The version it was taken at.
    pub version: i64,
    /// The state.
    pub state: T,
}

/// The event store in one PostgreSQL database.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
}

const SELECT: &str = "SELECT position, tx::text AS tx, stream, version, id, kind, data::text AS data,
    metadata::text AS metadata FROM palisade_events";

impl EventStore {
    /// The store in the database of `pool` (its tables created if missing).
    pub async fn new(pool: PgPool) -> Result<Self, EventError> {
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(EventStore { pool })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream` if it is at `expected`; the stream's new
    /// version.
    pub async fn append(
        &self,
        stream: &str,
        expected: Expected,
        events: &[NewEvent],
    ) -> Result<i64, EventError> {
        // One statement, its own transaction: numbered after the stream's current
        // version if that is the expected one. Two appends to one stream at once
        // meet on the (stream, version) key: with `Any` the loser tries again.
        for attempt in 1.. {
            match insert(&self.pool, stream, expected, events).await {
                Err(e) if is_version_taken(&e) && expected == Expected::Any && attempt < 20 => continue,
                other => return self.appended(stream, expected, events, other).await,
            }
        }
        unreachable!("the loop returns by its 20th attempt")
    }

    /// [`append`](Self::append) within the caller's transaction (with the state
    /// change the events record, or an outbox row). Appends to one stream take
    /// turns there (a lock on the stream's hash, held to the end of the
    /// transaction), so a transaction is never aborted by another's append.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        expected: Expected,
        events: &[NewEvent],
    ) -> Result<i64, EventError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(stream)
            .execute(&mut *conn)
            .await?;
        let inserted = insert(&mut *conn, stream, expected, events).await;
        self.appended(stream, expected, events, inserted).await
    }

    /// The stream's new version, or why there is none.
    async fn appended(
        &self,
        stream: &str,
        expected: Expected,
        events: &[NewEvent],
        inserted: Result<Option<i64>, sqlx::Error>,
    ) -> Result<i64, EventError> {
        match inserted {
            Ok(Some(version)) => Ok(version),
            Ok(None) if events.is_empty() => self.version(stream).await,
            Ok(None) => Err(conflict(stream, expected, self.version(stream).await?)),
            Err(e) if is_version_taken(&e) => Err(conflict(stream, expected, self.version(stream).await?)),
            Err(e) => Err(e.into()),
        }
    }

    /// The stream's version now (0: no events).
    async fn version(&self, stream: &str) -> Result<i64, EventError> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM palisade_events WHERE stream = $1")
                .bind(stream)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The events of `stream` after version `after` (0: all of them), in order.
    pub async fn read_stream(&self, stream: &str, after: i64) -> Result<Vec<RecordedEvent>, EventError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE stream = $1 AND version > $2 ORDER BY version"
        )))
        .bind(stream)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    /// Up to `limit` events of every stream after `after`, in an order no later
    /// commit can insert into behind them (see the module's documentation).
    pub async fn read_all(&self, after: Checkpoint, limit: i64) -> Result<Vec<RecordedEvent>, EventError> {
        read_all(&mut *self.pool.acquire().await?, after, None, limit).await
    }

    /// Saves `state` as `stream`'s state at `version`.
    pub async fn save_snapshot<T: Serialize>(
        &self,
        stream: &str,
        version: i64,
        state: &T,
    ) -> Result<(), EventError> {
        sqlx::query(
            "INSERT INTO palisade_snapshots (stream, version, data) VALUES ($1, $2, $3::jsonb)
             ON CONFLICT (stream) DO UPDATE SET version = excluded.version, data = excluded.data, taken_at = now()
             WHERE palisade_snapshots.version < excluded.version",
        )
        .bind(stream)
        .bind(version)
        .bind(serde_json::to_string(state)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `stream`'s latest snapshot, if any, and the events after it.
    pub async fn load<T: DeserializeOwned>(
        &self,
        stream: &str,
    ) -> Result<(Option<Snapshot<T>>, Vec<RecordedEvent>), EventError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT version, data::text FROM palisade_snapshots WHERE stream = $1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?;
        let snapshot = match row {
            Some((version, data)) => Some(Snapshot {
                version,
                state: serde_json::from_str(&data)?,
            }),
            None => None,
        };
        let after = snapshot.as_ref().map_or(0, |s| s.version);
        Ok((snapshot, self.read_stream(stream, after).await?))
    }
}

/// The oldest transaction still running: every event of an older one is
/// committed (or never will be). Read it before the reading transaction takes an
/// id of its own, which would hold it back.
pub(crate) async fn frontier(conn: &mut PgConnection) -> Result<u64, EventError> {
    let xmin: String = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .fetch_one(conn)
        .await?;
    Ok(xmin.parse().unwrap_or(0))
}

/// Inserts `events` numbered after `stream`'s current version, if that is the
/// expected one; the new version, or `None` when the expectation failed (or there
/// was nothing to insert).
async fn insert<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    stream: &str,
    expected: Expected,
    events: &[NewEvent],
) -> Result<Option<i64>, sqlx::Error> {
    if events.is_empty() {
        return Ok(None);
    }
    let text = |f: fn(&NewEvent) -> String| events.iter().map(f).collect::<Vec<String>>();
    let expected = match expected {
        Expected::Any => None,
        Expected::NoStream => Some(0),
        Expected::Exact(v) => Some(v),
    };
    sqlx::query_scalar(
        "WITH current AS (SELECT coalesce(max(version), 0) AS v FROM palisade_events WHERE stream = $1)
         INSERT INTO palisade_events (stream, version, id, kind, data, metadata)
         SELECT $1, current.v + t.n, t.i, t.k, t.d::jsonb, t.m::jsonb
         FROM current, UNNEST($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS t(i, k, d, m, n)
         WHERE $6::bigint IS NULL OR current.v = $6
         RETURNING version",
    )
    .bind(stream)
    .bind(text(|e| e.id.clone()))
    .bind(text(|e| e.kind.clone()))
    .bind(text(|e| e.data.to_string()))
    .bind(text(|e| e.metadata.to_string()))
    .bind(expected)
    .fetch_all(conn)
    .await
    .map(|versions: Vec<i64>| versions.into_iter().max())
}

/// Whether `e` is another append having taken the versions first.
fn is_version_taken(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.constraint() == Some("palisade_events_stream_version_key"))
}

fn conflict(stream: &str, expected: Expected, actual: i64) -> EventError {
    EventError::Conflict {
        stream: stream.to_string(),
        expected: match expected {
            Expected::Any => "any".into(),
            Expected::NoStream => "no stream".into(),
            Expected::Exact(v) => v.to_string(),
        },
        actual,
    }
}

/// [`EventStore::read_all`] on a connection, below `frontier` (by default the
/// oldest transaction running now).
pub(crate) async fn read_all(
    conn: &mut PgConnection,
    after: Checkpoint,
    frontier: Option<u64>,
    limit: i64,
) -> Result<Vec<RecordedEvent>, EventError> {
    // Only transactions below the oldest one still running are read: every one of
    // them has ended, so nothing can be committed behind the checkpoint later. The
    // order is the column's (xid8), not the selected text's: "1000" sorts before
    // "999" as text, which skipped events once ids grew a digit.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE (tx, position) > ($1::text::xid8, $2)
           AND tx < coalesce($4::text::xid8, pg_snapshot_xmin(pg_current_snapshot()))
         ORDER BY palisade_events.tx, position LIMIT $3"
    )))
    .bind(after.tx.to_string())
    .bind(after.position)
    .bind(limit)
    .bind(frontier.map(|f| f.to_string()))
    .fetch_all(conn)
    .await?;
    rows.iter().map(recorded).collect()
}

fn recorded(row: &sqlx::postgres::PgRow) -> Result<RecordedEvent, EventError> {
    let tx: String = row.try_get("tx")?;
    let position: i64 = row.try_get("position")?;
    let data: String = row.try_get("data")?;
    let metadata: String = row.try_get("metadata")?;
    Ok(RecordedEvent {
        position,
        checkpoint: Checkpoint {
            tx: tx.parse().unwrap_or(0),
            position,
        },
        stream: row.try_get("stream")?,
        version: row.try_get("version")?,
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        data: serde_json::from_str(&data)?,
        metadata: serde_json::from_str(&metadata)?,
    })
}
