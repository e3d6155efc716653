//! The control database of a sharded set: its layout, and the resharding in
//! progress, in one row every router reads; and the epoch row on each shard that
//! fences writes made under an outdated view of it.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

use crate::DataError;
use crate::shard_map::Layout;

/// Where a resharding is. Writes and reads follow it:
///
/// | phase | writes | reads |
/// |---|---|---|
/// | `idle` | the owner | the owner |
/// | `copy`, `verify` | the old owner, then the new one (best effort) | the old owner |
/// | `freeze` | moving keys refused ([`DataError::Resharding`]), others the owner | the old owner |
/// | `cut` | the new owner | the new owner |
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No resharding: one layout.
    Idle,
    /// Double-writing while moving keys' rows are copied to their new shards.
    Copy,
    /// Double-writing while the copies are compared with their sources and mended.
    Verify,
    /// Moving keys' writes refused while a last comparison makes the copies exact.
    Freeze,
    /// The new layout serves; the old copies are being deleted.
    Cut,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Copy => "copy",
            Phase::Verify => "verify",
            Phase::Freeze => "freeze",
            Phase::Cut => "cut",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        [Phase::Idle, Phase::Copy, Phase::Verify, Phase::Freeze, Phase::Cut]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A table resharding moves, and its key column (the shard key: its text form
/// is what placement hashes, so the router must be given the same bytes).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct TableKey {
    /// The table (schema-qualified if need be, as written in SQL without quotes).
    pub table: String,
    /// Its primary-key column.
    pub key: String,
}

/// The set's row in the control database.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub epoch: i64,
    pub phase: Phase,
    pub layout: Layout,
    pub next: Option<Layout>,
    pub tables: Vec<TableKey>,
    pub progress: Progress,
}

/// How far a resharding has got, recorded after every batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Progress {
    /// Rows copied to their new shard.
    pub copied: u64,
    /// Rows compared with their copy.
    pub verified: u64,
    /// Copies mended (different from, or missing beside, their source).
    pub repaired: u64,
    /// Old copies deleted after the cut.
    pub cleaned: u64,
    /// The last key done per table and shard in the current phase (resumption).
    pub cursors: std::collections::BTreeMap<String, String>,
}

pub(crate) const CONTROL_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS palisade_shard_layouts (
    set_name text PRIMARY KEY,
    epoch bigint NOT NULL,
    phase text NOT NULL,
    layout jsonb NOT NULL,
    next jsonb,
    tables jsonb NOT NULL DEFAULT '[]',
    progress jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
)";

pub(crate) const EPOCH_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS palisade_shard_epoch (
    set_name text PRIMARY KEY,
    epoch bigint NOT NULL
)";

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| unreachable!("plain data serializes: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Control(format!("the control row's {what} does not parse: {e}"))
}

/// Creates the control table and the set's row (with `layout`) if missing, and
/// reads the row.
pub(crate) async fn load_or_init(pool: &PgPool, set: &str, layout: &Layout) -> Result<State, DataError> {
    sqlx::query(CONTROL_SCHEMA).execute(pool).await?;
    sqlx::query(
        "INSERT INTO palisade_shard_layouts (set_name, epoch, phase, layout) VALUES ($1, 0, 'idle', $2::jsonb)
         ON CONFLICT (set_name) DO NOTHING",
    )
    .bind(set)
    .bind(json(layout))
    .execute(pool)
    .await?;
    load(pool, set).await
}

/// Reads the set's row.
pub(crate) async fn load(pool: &PgPool, set: &str) -> Result<State, DataError> {
    let (epoch, phase, layout, next, tables, progress): (
        i64,
        String,
        String,
        Option<String>,
        String,
        String,
    ) = sqlx::query_as(
        "SELECT epoch, phase, layout::text, next::text, tables::text, progress::text
             FROM palisade_shard_layouts WHERE set_name = $1",
    )
    .bind(set)
    .fetch_one(pool)
    .await?;
    Ok(State {
        epoch,
        phase: Phase::parse(&phase).ok_or_else(|| corrupt("phase", &phase))?,
        layout: serde_json::from_str(&layout).map_err(|e| corrupt("layout", e))?,
        next: next
            .map(|n| serde_json::from_str(&n))
            .transpose()
            .map_err(|e| corrupt("next layout", e))?,
        tables: serde_json::from_str(&tables).map_err(|e| corrupt("tables", e))?,
        progress: serde_json::from_str(&progress).map_err(|e| corrupt("progress", e))?,
    })
}

/// Moves the row from `from` (its epoch now) to `to`, one epoch on; `false` if
/// the row was not at `from.epoch` (another resharder moved it).
pub(crate) async fn advance(pool: &PgPool, set: &str, from: &State, to: &State) -> Result<bool, DataError> {
    let done = sqlx::query(
        "UPDATE palisade_shard_layouts
         SET epoch = $3, phase = $4, layout = $5::jsonb, next = $6::jsonb, tables = $7::jsonb,
             progress = $8::jsonb, updated_at = now()
         WHERE set_name = $1 AND epoch = $2",
    )
    .bind(set)
    .bind(from.epoch)
    .bind(to.epoch)
    .bind(to.phase.as_str())
    .bind(json(&to.layout))
    .bind(to.next.as_ref().map(json))
    .bind(json(&to.tables))
    .bind(json(&to.progress))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records progress within the current epoch.
pub(crate) async fn record(
    pool: &PgPool,
    set: &str,
    epoch: i64,
    progress: &Progress,
) -> Result<(), DataError> {
    sqlx::query(
        "UPDATE palisade_shard_layouts SET progress = $3::jsonb, updated_at = now()
         WHERE set_name = $1 AND epoch = $2",
    )
    .bind(set)
    .bind(epoch)
    .bind(json(progress))
    .execute(pool)
    .await?;
    Ok(())
}

/// Creates the epoch table on a shard and the set's row, if missing.
pub(crate) async fn prepare_shard(pool: &PgPool, set: &str) -> Result<(), sqlx::Error> {
    // Two sessions creating the table at once: one of them is told it exists (or
    // meets the other's type), which is what it wanted.
    if let Err(e) = sqlx::query(EPOCH_SCHEMA).execute(pool).await {
        let raced = matches!(&e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("23505" | "42P07")));
        if !raced {
            return Err(e);
        }
    }
    sqlx::query("INSERT INTO palisade_shard_epoch (set_name, epoch) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(set)
        .execute(pool)
        .await?;
    Ok(())
}

/// Raises a shard's epoch to `epoch`: waits for the writes fenced under an
/// older one to end, and refuses them from then on.
pub(crate) async fn bump(pool: &PgPool, set: &str, epoch: i64) -> Result<(), sqlx::Error> {
    prepare_shard(pool, set).await?;
    sqlx::query("UPDATE palisade_shard_epoch SET epoch = greatest(epoch, $2) WHERE set_name = $1")
        .bind(set)
        .bind(epoch)
        .execute(pool)
        .await?;
    Ok(())
}

/// The shard's epoch, read under a share lock in the write's transaction (an
/// epoch bump waits for the transaction to end).
pub(crate) async fn fence(conn: &mut PgConnection, set: &str) -> Result<i64, sqlx::Error> {
    let epoch: Option<i64> =
        sqlx::query_scalar("SELECT epoch FROM palisade_shard_epoch WHERE set_name = $1 FOR SHARE")
            .bind(set)
            .fetch_optional(conn)
            .await?;
    Ok(epoch.unwrap_or(0))
}
