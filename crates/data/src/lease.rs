//! Leader leases with fencing tokens, in PostgreSQL.
//!
//! A lease is a row: its name, its holder, when it runs out (by the database's
//! clock, so the holders' clocks do not matter), and a token that grows by one
//! each time the lease changes hands. A holder that was paused (a GC pause, a
//! stopped VM, SIGSTOP) past its lease may still believe it leads when it wakes;
//! its token is then older than the new holder's, and a fenced transaction
//! ([`Leases::fenced`]) refuses it: the transaction first reads the lease row
//! under a share lock and goes on only if the token is still the holder's. A
//! takeover updates that row, so it waits for a fenced transaction in progress
//! to end, and every fenced transaction after it sees the new token. The fenced
//! transaction also limits how long it may sit idle (the lease's duration), so a
//! holder paused inside one cannot block a takeover for longer than that.
//!
//! For storage outside this database, carry [`Lease::token`] with each write and
//! have the storage refuse tokens lower than the highest it has seen.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

use crate::DataError;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS palisade_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
)";

/// Takes, renews and releases leases in one database, as one holder.
#[derive(Clone, Debug)]
pub struct Leases {
    pool: PgPool,
    holder: String,
}

/// A lease held: its name, its fencing token, and how long it was granted for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    name: String,
    token: i64,
    ttl: Duration,
}

impl Lease {
    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token: higher for every later holder.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// How long each grant or renewal lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Leases {
    /// Leases in the database of `pool`, held as `holder` (unique per process: a
    /// host name and process id, say). Creates the lease table if missing.
    pub async fn new(pool: PgPool, holder: impl Into<String>) -> Result<Self, DataError> {
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(Leases {
            pool,
            holder: holder.into(),
        })
    }

    /// Takes lease `name` for `ttl`: when nobody holds it, its holder's time ran
    /// out, or this holder has it already (then it is renewed, same token).
    /// Another holder's live lease is [`DataError::LeaseHeld`].
    pub async fn acquire(&self, name: &str, ttl: Duration) -> Result<Lease, DataError> {
        let ms = ms(ttl)?;
        let mut tx = palisade_core::db::begin(&self.pool).await?;
        // A holder paused inside a fenced transaction holds the row; do not wait on
        // it for longer than a lease lasts.
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL lock_timeout = {ms}")))
            .execute(&mut *tx)
            .await?;
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO palisade_leases AS l (name, holder, token, expires_at)
             VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET
                 holder = excluded.holder,
                 token = CASE WHEN l.holder = excluded.holder AND l.expires_at > now()
                              THEN l.token ELSE l.token + 1 END,
                 expires_at = excluded.expires_at
             WHERE l.holder = excluded.holder OR l.expires_at <= now()
             RETURNING token",
        )
        .bind(name)
        .bind(&self.holder)
        .bind(ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.busy(name, e))?;
        match taken {
            Some(token) => {
                tx.commit().await?;
                Ok(Lease {
                    name: name.to_string(),
                    token,
                    ttl,
                })
            }
            None => {
                let (holder, remaining_ms): (String, i64) = sqlx::query_as(
                    "SELECT holder, (extract(epoch FROM expires_at - now()) * 1000)::bigint
                     FROM palisade_leases WHERE name = $1",
                )
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                Err(DataError::LeaseHeld {
                    lease: name.to_string(),
                    holder,
                    remaining_ms: remaining_ms.max(0),
                })
            }
        }
    }

    /// Extends `lease` by its duration if this holder still has it with the same
    /// token; otherwise [`DataError::Fenced`] (someone took it over: stop leading).
    pub async fn renew(&self, lease: &Lease) -> Result<(), DataError> {
        let current: Option<i64> = sqlx::query_scalar(
            "UPDATE palisade_leases SET expires_at = now() + $3 * interval '1 millisecond'
             WHERE name = $1 AND holder = $2 AND token = $4
             RETURNING token",
        )
        .bind(&lease.name)
        .bind(&self.holder)
        .bind(ms(lease.ttl)?)
        .bind(lease.token)
        .fetch_optional(&self.pool)
        .await?;
        match current {
            Some(_) => Ok(()),
            None => Err(self.fenced_error(lease).await),
        }
    }

    /// Gives `lease` up (if still held with its token), so another holder need not
    /// wait for it to run out.
    pub async fn release(&self, lease: Lease) -> Result<(), DataError> {
        sqlx::query(
            "UPDATE palisade_leases SET expires_at = now() WHERE name = $1 AND holder = $2 AND token = $3",
        )
        .bind(&lease.name)
        .bind(&self.holder)
        .bind(lease.token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A transaction that may write only while `lease` is current: begun, the
    /// lease row read under a share lock, and refused with [`DataError::Fenced`]
    /// if its token has moved on. Write in it and commit; a takeover waits for it.
    pub async fn fenced(&self, lease: &Lease) -> Result<Transaction<'static, Postgres>, DataError> {
        let mut tx = palisade_core::db::begin(&self.pool).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}",
            ms(lease.ttl)?
        )))
        .execute(&mut *tx)
        .await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT token FROM palisade_leases WHERE name = $1 FOR SHARE")
                .bind(&lease.name)
                .fetch_optional(&mut *tx)
                .await?;
        if current == Some(lease.token) {
            Ok(tx)
        } else {
            Err(DataError::Fenced {
                lease: lease.name.clone(),
                token: lease.token,
                current: current.unwrap_or(0),
            })
        }
    }

    async fn fenced_error(&self, lease: &Lease) -> DataError {
        let current: Result<Option<i64>, _> =
            sqlx::query_scalar("SELECT token FROM palisade_leases WHERE name = $1")
                .bind(&lease.name)
                .fetch_optional(&self.pool)
                .await;
        match current {
            Ok(current) => DataError::Fenced {
                lease: lease.name.clone(),
                token: lease.token,
                current: current.unwrap_or(0),
            },
            Err(e) => DataError::Query(e),
        }
    }

    /// A lock wait that ran out while another holder's fenced transaction held
    /// the row: the lease is busy.
    fn busy(&self, name: &str, e: sqlx::Error) -> DataError {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03") => DataError::LeaseHeld {
                lease: name.to_string(),
                holder: "(a holder in a fenced transaction)".into(),
                remaining_ms: 0,
            },
            _ => DataError::Query(e),
        }
    }
}

/// A lease duration in whole milliseconds, at least one.
fn ms(d: Duration) -> Result<i64, DataError> {
    match i64::try_from(d.as_millis()) {
        Ok(ms) if ms >= 1 => Ok(ms),
        _ => Err(DataError::Config(palisade_core::ConfigErrors::one(
            "ttl",
            "must be between 1 ms and 292 million years",
        ))),
    }
}
