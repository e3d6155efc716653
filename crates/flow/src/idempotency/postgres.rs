//! Idempotency keys in a PostgreSQL table, timed by the database's clock.

use std::time::Duration;

use sqlx::PgPool;

use super::{Claim, IdempotencyStore, StoreError, Stored, millis};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS palisade_idempotency (
    scope text NOT NULL,
    key text NOT NULL,
    fingerprint bytea NOT NULL,
    token bigint NOT NULL,
    done boolean NOT NULL,
    expires_at timestamptz NOT NULL,
    answer bytea,
    PRIMARY KEY (scope, key)
)";

/// Keys and answers in the table `palisade_idempotency` (created if missing). A
/// running claim's row expires after its lock, a stored answer's after the TTL;
/// expired rows are replaced on use and deleted by [`prune`](Self::prune).
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// The store in the database of `pool`.
    pub async fn new(pool: PgPool) -> Result<Self, StoreError> {
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(PgStore { pool })
    }

    /// Deletes expired rows; how many.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM palisade_idempotency WHERE expires_at < now()")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// What a claim's statement returns: its token if it claimed the key, else the
/// row as it was (fingerprint, done, answer).
type ClaimRow = (Option<i64>, Option<Vec<u8>>, Option<bool>, Option<Vec<u8>>);

impl IdempotencyStore for PgStore {
    async fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &[u8; 32],
        lock: Duration,
    ) -> Result<Claim, StoreError> {
        let token = fastrand::i64(1..i64::MAX);
        // One round trip: the claim, and the row as it was if the claim failed (the
        // statement's snapshot does not see its own insert).
        let (claimed, row_fingerprint, done, answer): ClaimRow = sqlx::query_as(
            "WITH claimed AS (
                     INSERT INTO palisade_idempotency AS t (scope, key, fingerprint, token, done, expires_at)
                     VALUES ($1, $2, $3, $4, false, now() + $5 * interval '1 millisecond')
                     ON CONFLICT (scope, key) DO UPDATE SET
                         fingerprint = excluded.fingerprint, token = excluded.token, done = false,
                         expires_at = excluded.expires_at, answer = NULL
                     WHERE t.expires_at < now()
                     RETURNING token
                 )
                 SELECT (SELECT token FROM claimed), t.fingerprint, t.done, t.answer
                 FROM (SELECT 1) AS one
                 LEFT JOIN palisade_idempotency t ON t.scope = $1 AND t.key = $2",
        )
        .bind(scope)
        .bind(key)
        .bind(&fingerprint[..])
        .bind(token)
        .bind(millis(lock))
        .fetch_one(&self.pool)
        .await?;
        if claimed.is_some() {
            return Ok(Claim::Acquired { token: token as u64 });
        }
        Ok(match (row_fingerprint, done) {
            // Claimed by a request that committed after this statement began, or
            // released meanwhile: running, as far as this request can tell.
            (None, _) | (_, None) => Claim::Running,
            (Some(fp), _) if fp != fingerprint[..] => Claim::Mismatch,
            (_, Some(false)) => Claim::Running,
            (_, Some(true)) => Claim::Done(
                answer
                    .as_deref()
                    .and_then(Stored::decode)
                    .ok_or(StoreError::Corrupt)?,
            ),
        })
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        token: u64,
        answer: &Stored,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE palisade_idempotency SET done = true, answer = $4,
                 expires_at = now() + $5 * interval '1 millisecond'
             WHERE scope = $1 AND key = $2 AND token = $3",
        )
        .bind(scope)
        .bind(key)
        .bind(token as i64)
        .bind(answer.encode())
        .bind(millis(ttl))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str, token: u64) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM palisade_idempotency WHERE scope = $1 AND key = $2 AND token = $3 AND NOT done",
        )
        .bind(scope)
        .bind(key)
        .bind(token as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
