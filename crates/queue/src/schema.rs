//! The queue's schema, shipped with the crate and applied on connect: each version
//! a step, run once, in a transaction that holds the database's lock on the schema
//! (two processes starting at once apply it once); a database at a newer version
//! than this build knows is refused.

use sqlx::{PgPool, SqlitePool};

use crate::QueueError;

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = 1;

/// PostgreSQL, version by version. Times are milliseconds since the Unix epoch by
/// the database's clock (`palisade_now_ms()`), so processes whose clocks disagree
/// still agree on leases and schedules. States are small integers (see
/// `JobState::code`); a unique job's `unique_states` is a bit mask of the states in
/// which it blocks another with its key, which the partial unique index enforces.
const POSTGRES: [&str; 1] = [r#"
CREATE TABLE palisade_jobs (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue         TEXT     NOT NULL,
    kind          TEXT     NOT NULL,
    args          JSONB    NOT NULL,
    priority      SMALLINT NOT NULL,
    state         SMALLINT NOT NULL,
    attempt       INT      NOT NULL DEFAULT 0,
    max_attempts  INT      NOT NULL,
    timeout_ms    BIGINT,
    tags          JSONB    NOT NULL DEFAULT '[]',
    errors        JSONB    NOT NULL DEFAULT '[]',
    unique_key    TEXT,
    unique_states SMALLINT NOT NULL DEFAULT 0,
    inserted_at   BIGINT   NOT NULL,
    scheduled_at  BIGINT   NOT NULL,
    attempted_at  BIGINT,
    finished_at   BIGINT,
    lease_until   BIGINT,
    worker        TEXT,
    output        JSONB
);
CREATE INDEX palisade_jobs_fetch ON palisade_jobs (queue, priority, scheduled_at, id) WHERE state IN (0, 1, 3);
CREATE INDEX palisade_jobs_leases ON palisade_jobs (lease_until) WHERE state = 2;
CREATE INDEX palisade_jobs_finished ON palisade_jobs (finished_at) WHERE state IN (4, 5, 6);
CREATE UNIQUE INDEX palisade_jobs_unique ON palisade_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND ((unique_states >> state) & 1) = 1;
CREATE FUNCTION palisade_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
CREATE FUNCTION palisade_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('palisade_jobs', q) FROM (SELECT DISTINCT queue AS q FROM inserted WHERE state = 0) s;
    RETURN NULL;
END $$;
CREATE TRIGGER palisade_jobs_notify AFTER INSERT ON palisade_jobs
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION palisade_jobs_notify();
"#];

/// SQLite, version by version: the same table, JSON as text; times come from the
/// process (one machine shares one clock).
const SQLITE: [&str; 1] = [r#"
CREATE TABLE palisade_jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    args          TEXT    NOT NULL,
    priority      INTEGER NOT NULL,
    state         INTEGER NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    timeout_ms    INTEGER,
    tags          TEXT    NOT NULL DEFAULT '[]',
    errors        TEXT    NOT NULL DEFAULT '[]',
    unique_key    TEXT,
    unique_states INTEGER NOT NULL DEFAULT 0,
    inserted_at   INTEGER NOT NULL,
    scheduled_at  INTEGER NOT NULL,
    attempted_at  INTEGER,
    finished_at   INTEGER,
    lease_until   INTEGER,
    worker        TEXT,
    output        TEXT
);
CREATE INDEX palisade_jobs_fetch ON palisade_jobs (queue, priority, scheduled_at, id) WHERE state IN (0, 1, 3);
CREATE INDEX palisade_jobs_leases ON palisade_jobs (lease_until) WHERE state = 2;
CREATE INDEX palisade_jobs_finished ON palisade_jobs (finished_at) WHERE state IN (4, 5, 6);
CREATE UNIQUE INDEX palisade_jobs_unique ON palisade_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND ((unique_states >> state) & 1) = 1;
"#];

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS palisade_queue_schema (version BIGINT NOT NULL)";

/// Brings a PostgreSQL database to [`SCHEMA_VERSION`].
pub(crate) async fn migrate_postgres(pool: &PgPool) -> Result<(), QueueError> {
    let mut tx = crate::begin(pool).await?;
    // One process at a time; released at commit.
    sqlx::query("SELECT pg_advisory_xact_lock(7336501224937205)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(VERSION_TABLE).execute(&mut *tx).await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM palisade_queue_schema")
        .fetch_one(&mut *tx)
        .await?;
    let found = found.unwrap_or(0);
    for (step, sql) in steps(found, &POSTGRES)? {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO palisade_queue_schema (version) VALUES ($1)")
            .bind(step)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Brings a SQLite database to [`SCHEMA_VERSION`].
pub(crate) async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), QueueError> {
    let mut conn = pool.acquire().await?;
    // IMMEDIATE: the write lock first, so two processes cannot both read version 0.
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let result = async {
        sqlx::query(VERSION_TABLE).execute(&mut *conn).await?;
        let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM palisade_queue_schema")
            .fetch_one(&mut *conn)
            .await?;
        for (step, sql) in steps(found.unwrap_or(0), &SQLITE)? {
            sqlx::raw_sql(sql).execute(&mut *conn).await?;
            sqlx::query("INSERT INTO palisade_queue_schema (version) VALUES (?1)")
                .bind(step)
                .execute(&mut *conn)
                .await?;
        }
        Ok::<_, QueueError>(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    sqlx::raw_sql(end).execute(&mut *conn).await?;
    result
}

/// The steps after version `found`, numbered; an error when `found` is newer than
/// this build.
fn steps(found: i64, all: &'static [&'static str]) -> Result<Vec<(i64, &'static str)>, QueueError> {
    if found > SCHEMA_VERSION {
        return Err(QueueError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok((found + 1..=SCHEMA_VERSION)
        .zip(all.iter().skip(usize::try_from(found).unwrap_or(0)).copied())
        .collect())
}
