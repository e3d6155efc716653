//! The two backends' SQL behind one set of operations. PostgreSQL fetches with
//! `FOR UPDATE SKIP LOCKED` and takes batches in one statement (arrays, a JSON
//! record set); SQLite is one writer at a time, so its batches are a transaction of
//! small statements on a local file.

use std::time::Duration;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row, SqlitePool};

use crate::QueueError;
use crate::job::{AttemptError, Job, JobState, NewJob, millis, now_ms};

/// The columns a [`Job`] is read from (a macro, so queries stay literals).
macro_rules! columns {
    () => {
        "id, queue, kind, args, priority, state, attempt, max_attempts, timeout_ms, tags, errors, \
         unique_key, inserted_at, scheduled_at, attempted_at, finished_at, output"
    };
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "queue, ",
            $p,
            "kind, ",
            $p,
            "args, ",
            $p,
            "priority, ",
            $p,
            "state, ",
            $p,
            "attempt, ",
            $p,
            "max_attempts, ",
            $p,
            "timeout_ms, ",
            $p,
            "tags, ",
            $p,
            "errors, ",
            $p,
            "unique_key, ",
            $p,
            "inserted_at, ",
            $p,
            "scheduled_at, ",
            $p,
            "attempted_at, ",
            $p,
            "finished_at, ",
            $p,
            "output"
        )
    };
}

/// The error kept for a job whose worker's lease ran out.
pub(crate) const LOST: &str =
    "lease expired: its worker stopped without finishing it (crashed, killed, or lost the database)";

/// A job's row read as a [`Job`].
macro_rules! job_from_row {
    ($row:expr) => {{
        let r = $row;
        let code: i16 = r.try_get("state")?;
        let state = JobState::from_code(code).ok_or_else(|| QueueError::Corrupt(format!("state {code}")))?;
        let Json(errors): Json<Vec<AttemptError>> = r.try_get("errors")?;
        let Json(tags): Json<Vec<String>> = r.try_get("tags")?;
        let Json(args): Json<Value> = r.try_get("args")?;
        let timeout_ms: Option<i64> = r.try_get("timeout_ms")?;
        let output: Option<Json<Value>> = r.try_get("output")?;
        Job {
            id: r.try_get("id")?,
            queue: r.try_get("queue")?,
            kind: r.try_get("kind")?,
            args,
            priority: r.try_get("priority")?,
            state,
            attempt: r.try_get("attempt")?,
            max_attempts: r.try_get("max_attempts")?,
            timeout: timeout_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
            tags,
            errors,
            unique_key: r.try_get("unique_key")?,
            inserted_at: r.try_get("inserted_at")?,
            scheduled_at: r.try_get("scheduled_at")?,
            attempted_at: r.try_get("attempted_at")?,
            finished_at: r.try_get("finished_at")?,
            output: output.map(|Json(v)| v),
        }
    }};
}

/// How an attempt ended, as the store records it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Finish {
    /// Done, with its worker's output, if it gave one.
    Completed(Option<Value>),
    /// Failed: retried after `retry_in` while attempts remain (`discard`: never).
    Failed {
        error: String,
        retry_in: Duration,
        discard: bool,
    },
    /// Put back to run after this long; the attempt does not count.
    Snoozed(Duration),
    /// Cancelled by its worker.
    Cancelled(String),
    /// Handed back unfinished (a runner shutting down): available at once, the
    /// attempt not counted.
    Released,
}

/// One enqueued job: its id, and whether it was already there (a unique job).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the existing job's, for a duplicate).
    pub id: i64,
    /// A unique job already enqueued: nothing was inserted.
    pub duplicate: bool,
}

/// A filter for [`crate::Queue::list`].
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this kind.
    pub kind: Option<String>,
    /// At most this many (newest first; 100 when 0).
    pub limit: u32,
}

/// Jobs per queue and state, and how long the oldest due job has waited.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// How many jobs in each state (indexed by [`JobState::code`]).
    pub counts: [i64; 7],
    /// How long the oldest job that may run now has waited, in milliseconds (0
    /// when none is waiting).
    pub oldest_wait_ms: i64,
}

/// The database behind a queue.
#[derive(Clone, Debug)]
pub(crate) enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Store {
    /// Inserts `jobs` (one statement on PostgreSQL); a unique job already present is
    /// reported as a duplicate with the existing id.
    pub(crate) async fn insert(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>, QueueError> {
        match self {
            Store::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                insert_postgres(&mut conn, jobs).await
            }
            Store::Sqlite(pool) => {
                let mut tx = crate::begin(pool).await?;
                let mut out = Vec::with_capacity(jobs.len());
                let now = now_ms();
                for (i, job) in jobs.iter().enumerate() {
                    out.push(insert_sqlite(&mut tx, job, i, now).await?);
                }
                tx.commit().await?;
                Ok(out)
            }
        }
    }

    /// Takes up to `limit` jobs of `queue` and of one of `kinds` that may run now,
    /// for `worker`, leased for `lease`; most urgent first.
    pub(crate) async fn fetch(
        &self,
        queue: &str,
        kinds: &[String],
        limit: usize,
        worker: &str,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut jobs = match self {
            Store::Postgres(pool) => {
                let sql = concat!(
                    "WITH picked AS (
                         SELECT id FROM palisade_jobs
                         WHERE state IN (0, 1, 3) AND queue = $1 AND scheduled_at <= (SELECT palisade_now_ms())
                             AND kind = ANY($5)
                         ORDER BY priority, scheduled_at, id
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     UPDATE palisade_jobs j SET state = 2, attempt = j.attempt + 1, attempted_at = palisade_now_ms(),
                         lease_until = palisade_now_ms() + $3, worker = $4
                     FROM picked WHERE j.id = picked.id
                     RETURNING ",
                    columns!("j.")
                );
                let rows = sqlx::query(sql)
                    .bind(queue)
                    .bind(limit)
                    .bind(millis(lease))
                    .bind(worker)
                    .bind(kinds)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok(job_from_row!(r)))
                    .collect::<Result<Vec<_>, QueueError>>()?
            }
            Store::Sqlite(pool) => {
                let sql = concat!(
                    "UPDATE palisade_jobs SET state = 2, attempt = attempt + 1, attempted_at = ?1,
                         lease_until = ?1 + ?2, worker = ?3
                     WHERE id IN (SELECT id FROM palisade_jobs
                         WHERE state IN (0, 1, 3) AND queue = ?4 AND scheduled_at <= ?1
                             AND kind IN (SELECT value FROM json_each(?6))
                         ORDER BY priority, scheduled_at, id LIMIT ?5)
                     RETURNING ",
                    columns!()
                );
                let rows = sqlx::query(sql)
                    .bind(now_ms())
                    .bind(millis(lease))
                    .bind(worker)
                    .bind(queue)
                    .bind(limit)
                    .bind(serde_json::to_string(kinds).unwrap_or_default())
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok(job_from_row!(r)))
                    .collect::<Result<Vec<_>, QueueError>>()?
            }
        };
        jobs.sort_by_key(|j| (j.priority, j.scheduled_at, j.id));
        Ok(jobs)
    }

    /// Records how attempts ended; an attempt no longer the job's (rescued after
    /// its lease ran out, cancelled) changes nothing. Completions go in one
    /// statement on PostgreSQL.
    pub(crate) async fn finish(&self, done: &[(i64, i32, Finish)]) -> Result<(), QueueError> {
        match self {
            Store::Postgres(pool) => {
                let mut ids = Vec::new();
                let mut attempts = Vec::new();
                let mut outputs: Vec<Option<Json<&Value>>> = Vec::new();
                for (id, attempt, f) in done {
                    if let Finish::Completed(output) = f {
                        ids.push(*id);
                        attempts.push(*attempt);
                        outputs.push(output.as_ref().map(Json));
                    }
                }
                if !ids.is_empty() {
                    sqlx::query(
                        "UPDATE palisade_jobs j SET state = 4, finished_at = palisade_now_ms(), lease_until = NULL,
                             output = d.output
                         FROM unnest($1::bigint[], $2::int[], $3::jsonb[]) AS d(id, attempt, output)
                         WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 2",
                    )
                    .bind(&ids)
                    .bind(&attempts)
                    .bind(&outputs)
                    .execute(pool)
                    .await?;
                }
                for (id, attempt, f) in done.iter().filter(|(_, _, f)| !matches!(f, Finish::Completed(_))) {
                    finish_postgres(pool, *id, *attempt, f).await?;
                }
                Ok(())
            }
            Store::Sqlite(pool) => {
                let mut tx = crate::begin(pool).await?;
                let now = now_ms();
                for (id, attempt, f) in done {
                    finish_sqlite(&mut tx, *id, *attempt, f, now).await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Extends the leases of `held` (id, attempt) by `lease` from now; returns the
    /// ids still held (a job missing was cancelled or rescued: its attempt should
    /// stop).
    pub(crate) async fn heartbeat(
        &self,
        held: &[(i64, i32)],
        lease: Duration,
    ) -> Result<Vec<i64>, QueueError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(pool) => {
                let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
                Ok(sqlx::query_scalar(
                    "UPDATE palisade_jobs j SET lease_until = palisade_now_ms() + $3
                     FROM unnest($1::bigint[], $2::int[]) AS d(id, attempt)
                     WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 2
                     RETURNING j.id",
                )
                .bind(&ids)
                .bind(&attempts)
                .bind(millis(lease))
                .fetch_all(pool)
                .await?)
            }
            Store::Sqlite(pool) => {
                let mut tx = crate::begin(pool).await?;
                let until = now_ms() + millis(lease);
                let mut kept = Vec::with_capacity(held.len());
                for &(id, attempt) in held {
                    let r = sqlx::query(
                        "UPDATE palisade_jobs SET lease_until = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 2",
                    )
                    .bind(id)
                    .bind(attempt)
                    .bind(until)
                    .execute(&mut *tx)
                    .await?;
                    if r.rows_affected() > 0 {
                        kept.push(id);
                    }
                }
                tx.commit().await?;
                Ok(kept)
            }
        }
    }

    /// Takes back the jobs whose lease ran out (their worker died): retryable at
    /// once, or discarded when out of attempts, the loss recorded as an error.
    /// Returns how many.
    pub(crate) async fn rescue(&self) -> Result<u64, QueueError> {
        let r = match self {
            Store::Postgres(pool) => {
                sqlx::query(
                    "UPDATE palisade_jobs SET
                         state = CASE WHEN attempt >= max_attempts THEN 6 ELSE 3 END,
                         scheduled_at = palisade_now_ms(),
                         finished_at = CASE WHEN attempt >= max_attempts THEN palisade_now_ms() END,
                         lease_until = NULL,
                         errors = errors || jsonb_build_array(jsonb_build_object(
                             'attempt', attempt, 'at', palisade_now_ms(), 'error', $1::text))
                     WHERE state = 2 AND lease_until < (SELECT palisade_now_ms())",
                )
                .bind(LOST)
                .execute(pool)
                .await?
                .rows_affected()
            }
            Store::Sqlite(pool) => {
                sqlx::query(
                    "UPDATE palisade_jobs SET
                         state = CASE WHEN attempt >= max_attempts THEN 6 ELSE 3 END,
                         scheduled_at = ?1,
                         finished_at = CASE WHEN attempt >= max_attempts THEN ?1 END,
                         lease_until = NULL,
                         errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?1, 'error', ?2))
                     WHERE state = 2 AND lease_until < ?1",
                )
                .bind(now_ms())
                .bind(LOST)
                .execute(pool)
                .await?
                .rows_affected()
            }
        };
        Ok(r)
    }

    /// The job with `id`.
    pub(crate) async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let sql = concat!("SELECT ", columns!(), " FROM palisade_jobs WHERE id = $1");
        match self {
            Store::Postgres(pool) => {
                let row = sqlx::query(sql).bind(id).fetch_optional(pool).await?;
                row.map(|r| Ok(job_from_row!(&r))).transpose()
            }
            Store::Sqlite(pool) => {
                let row = sqlx::query(sql).bind(id).fetch_optional(pool).await?;
                row.map(|r| Ok(job_from_row!(&r))).transpose()
            }
        }
    }

    /// Jobs matching `f`, newest first.
    pub(crate) async fn list(&self, f: &ListFilter) -> Result<Vec<Job>, QueueError> {
        let limit = i64::from(if f.limit == 0 { 100 } else { f.limit });
        let state = f.state.map(JobState::code);
        match self {
            Store::Postgres(pool) => {
                let sql = concat!(
                    "SELECT ",
                    columns!(),
                    " FROM palisade_jobs
                     WHERE ($1::text IS NULL OR queue = $1) AND ($2::smallint IS NULL OR state = $2)
                         AND ($3::text IS NULL OR kind = $3)
                     ORDER BY id DESC LIMIT $4"
                );
                let rows = sqlx::query(sql)
                    .bind(&f.queue)
                    .bind(state)
                    .bind(&f.kind)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(|r| Ok(job_from_row!(r))).collect()
            }
            Store::Sqlite(pool) => {
                let sql = concat!(
                    "SELECT ",
                    columns!(),
                    " FROM palisade_jobs
                     WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR kind = ?3)
                     ORDER BY id DESC LIMIT ?4"
                );
                let rows = sqlx::query(sql)
                    .bind(&f.queue)
                    .bind(state)
                    .bind(&f.kind)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(|r| Ok(job_from_row!(r))).collect()
            }
        }
    }

    /// Cancels a job that has not finished; `false` when it had (or does not exist).
    /// A running job's worker finds out at its next heartbeat.
    pub(crate) async fn cancel(&self, id: i64) -> Result<bool, QueueError> {
        let n = match self {
            Store::Postgres(pool) => sqlx::query(
                "UPDATE palisade_jobs SET state = 5, finished_at = palisade_now_ms(), lease_until = NULL
                 WHERE id = $1 AND state IN (0, 1, 2, 3)",
            )
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
            Store::Sqlite(pool) => sqlx::query(
                "UPDATE palisade_jobs SET state = 5, finished_at = ?2, lease_until = NULL
                 WHERE id = ?1 AND state IN (0, 1, 2, 3)",
            )
            .bind(id)
            .bind(now_ms())
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(n > 0)
    }

    /// Makes a finished or waiting job available now, with at least one attempt
    /// left; `false` when it is running (or does not exist).
    pub(crate) async fn retry(&self, id: i64) -> Result<bool, QueueError> {
        let n = match self {
            Store::Postgres(pool) => {
                let queue: Option<String> = sqlx::query_scalar(
                    "UPDATE palisade_jobs SET state = 0, scheduled_at = palisade_now_ms(), finished_at = NULL,
                         max_attempts = GREATEST(max_attempts, attempt + 1)
                     WHERE id = $1 AND state IN (1, 3, 4, 5, 6)
                     RETURNING queue",
                )
                .bind(id)
                .fetch_optional(pool)
                .await?;
                if let Some(q) = &queue {
                    sqlx::query("SELECT pg_notify('palisade_jobs', $1)")
                        .bind(q)
                        .execute(pool)
                        .await?;
                }
                u64::from(queue.is_some())
            }
            Store::Sqlite(pool) => sqlx::query(
                "UPDATE palisade_jobs SET state = 0, scheduled_at = ?2, finished_at = NULL,
                     max_attempts = MAX(max_attempts, attempt + 1)
                 WHERE id = ?1 AND state IN (1, 3, 4, 5, 6)",
            )
            .bind(id)
            .bind(now_ms())
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(n > 0)
    }

    /// Jobs per queue and state, and each queue's oldest due wait.
    pub(crate) async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        const COUNTS: &str = "SELECT queue, state, count(*) AS n FROM palisade_jobs GROUP BY queue, state";
        type Counts = Vec<(String, i16, i64)>;
        let (counts, oldest): (Counts, Vec<(String, i64)>) = match self {
            Store::Postgres(pool) => (
                sqlx::query_as(COUNTS).fetch_all(pool).await?,
                sqlx::query_as(
                    "SELECT queue, palisade_now_ms() - min(scheduled_at) FROM palisade_jobs
                     WHERE state IN (0, 1, 3) AND scheduled_at <= (SELECT palisade_now_ms()) GROUP BY queue",
                )
                .fetch_all(pool)
                .await?,
            ),
            Store::Sqlite(pool) => (
                sqlx::query_as(COUNTS).fetch_all(pool).await?,
                sqlx::query_as(
                    "SELECT queue, ?1 - min(scheduled_at) FROM palisade_jobs
                     WHERE state IN (0, 1, 3) AND scheduled_at <= ?1 GROUP BY queue",
                )
                .bind(now_ms())
                .fetch_all(pool)
                .await?,
            ),
        };
        let mut out: Vec<QueueStats> = Vec::new();
        let entry = |out: &mut Vec<QueueStats>, q: &str| -> usize {
            match out.iter().position(|s| s.queue == q) {
                Some(i) => i,
                None => {
                    out.push(QueueStats {
                        queue: q.to_string(),
                        ..QueueStats::default()
                    });
                    out.len() - 1
                }
            }
        };
        for (q, state, n) in counts {
            let i = entry(&mut out, &q);
            if let Some(slot) = usize::try_from(state).ok().and_then(|s| out[i].counts.get_mut(s)) {
                *slot = n;
            }
        }
        for (q, wait) in oldest {
            let i = entry(&mut out, &q);
            out[i].oldest_wait_ms = wait.max(0);
        }
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    /// Deletes finished jobs that finished more than `age` ago; returns how many.
    pub(crate) async fn prune(&self, age: Duration) -> Result<u64, QueueError> {
        let n = match self {
            Store::Postgres(pool) => sqlx::query(
                "DELETE FROM palisade_jobs WHERE id IN (
                     SELECT id FROM palisade_jobs
                     WHERE state IN (4, 5, 6) AND finished_at < (SELECT palisade_now_ms()) - $1 LIMIT 10000)",
            )
            .bind(millis(age))
            .execute(pool)
            .await?
            .rows_affected(),
            Store::Sqlite(pool) => sqlx::query(
                "DELETE FROM palisade_jobs WHERE id IN (
                     SELECT id FROM palisade_jobs WHERE state IN (4, 5, 6) AND finished_at < ?1 LIMIT 10000)",
            )
            .bind(now_ms() - millis(age))
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(n)
    }
}

/// Inserts `jobs` on a PostgreSQL connection (a pool's, or the caller's
/// transaction: then the jobs exist only if it commits).
pub(crate) async fn insert_postgres(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<Enqueued>, QueueError> {
    for job in jobs {
        job.check().map_err(QueueError::InvalidJob)?;
    }
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let rows: Vec<Value> = jobs.iter().enumerate().map(|(i, j)| j.row(i, now)).collect();
    let keys: Vec<Option<String>> = rows
        .iter()
        .map(|r| r["unique_key"].as_str().map(str::to_string))
        .collect();
    let inserted: Vec<(i64, Option<String>)> = sqlx::query_as(
        "INSERT INTO palisade_jobs (queue, kind, args, priority, state, max_attempts, timeout_ms, tags,
             unique_key, unique_states, inserted_at, scheduled_at)
         SELECT x.queue, x.kind, coalesce(x.args, 'null'::jsonb), x.priority,
                CASE WHEN coalesce(x.at_ms, n.t + x.delay_ms) > n.t THEN 1 ELSE 0 END,
                x.max_attempts, x.timeout_ms, x.tags, x.unique_key, x.unique_states, n.t,
                coalesce(x.at_ms, n.t + x.delay_ms)
         FROM jsonb_to_recordset($1::jsonb) AS x(ord int, queue text, kind text, args jsonb, priority smallint,
                  max_attempts int, timeout_ms bigint, tags jsonb, unique_key text, unique_states smallint,
                  delay_ms bigint, at_ms bigint),
              (SELECT palisade_now_ms() AS t) n
         ORDER BY x.ord
         ON CONFLICT DO NOTHING
         RETURNING id, unique_key",
    )
    .bind(Json(Value::Array(rows)))
    .fetch_all(&mut *conn)
    .await?;
    // Inserted rows come back in input order (ids ascending); a unique job that
    // was not inserted takes the id of the one in its way.
    let mut inserted = inserted;
    inserted.sort_by_key(|(id, _)| *id);
    let missing: Vec<String> = keys
        .iter()
        .flatten()
        .filter(|k| !inserted.iter().any(|(_, ik)| ik.as_ref() == Some(*k)))
        .cloned()
        .collect();
    let existing: Vec<(i64, String)> = if missing.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT id, unique_key FROM palisade_jobs
             WHERE unique_key = ANY($1) AND ((unique_states >> state) & 1) = 1",
        )
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?
    };
    match_inserted(&keys, &inserted, &existing)
}

/// Each job's [`Enqueued`] from the rows inserted (in input order, with their
/// unique keys) and the existing rows that blocked the rest.
fn match_inserted(
    keys: &[Option<String>],
    inserted: &[(i64, Option<String>)],
    existing: &[(i64, String)],
) -> Result<Vec<Enqueued>, QueueError> {
    let mut plain = inserted.iter().filter(|(_, k)| k.is_none()).map(|(id, _)| *id);
    keys.iter()
        .map(|key| match key {
            None => plain
                .next()
                .map(|id| Enqueued { id, duplicate: false })
                .ok_or_else(|| QueueError::Corrupt("fewer jobs inserted than enqueued".into())),
            Some(k) => {
                if let Some((id, _)) = inserted.iter().find(|(_, ik)| ik.as_ref() == Some(k)) {
                    // The first of equal keys in one batch is inserted, the rest are
                    // its duplicates.
                    let first = keys.iter().position(|o| o.as_ref() == Some(k));
                    let this = std::ptr::eq(key, &keys[first.unwrap_or(0)]);
                    Ok(Enqueued {
                        id: *id,
                        duplicate: !this,
                    })
                } else {
                    existing
                        .iter()
                        .find(|(_, ek)| ek == k)
                        .map(|(id, _)| Enqueued {
                            id: *id,
                            duplicate: true,
                        })
                        // The job in the way finished between the insert and the
                        // look-up: the caller may enqueue again.
                        .ok_or_else(|| {
                            QueueError::InvalidJob(
                                "a unique job in the way changed state; enqueue again".into(),
                            )
                        })
                }
            }
        })
        .collect()
}

pub(crate) async fn insert_sqlite(
    conn: &mut sqlx::SqliteConnection,
    job: &NewJob,
    ord: usize,
    now: i64,
) -> Result<Enqueued, QueueError> {
    job.check().map_err(QueueError::InvalidJob)?;
    let row = job.row(ord, now);
    let at = row["at_ms"]
        .as_i64()
        .unwrap_or(now + row["delay_ms"].as_i64().unwrap_or(0));
    let unique_key = row["unique_key"].as_str().map(str::to_string);
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO palisade_jobs (queue, kind, args, priority, state, max_attempts, timeout_ms, tags,
             unique_key, unique_states, inserted_at, scheduled_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(job.args.to_string())
    .bind(job.priority)
    .bind(if at > now {
        JobState::Scheduled.code()
    } else {
        JobState::Available.code()
    })
    .bind(job.max_attempts)
    .bind(row["timeout_ms"].as_i64())
    .bind(row["tags"].to_string())
    .bind(&unique_key)
    .bind(row["unique_states"].as_i64().unwrap_or(0))
    .bind(now)
    .bind(at)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        return Ok(Enqueued { id, duplicate: false });
    }
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM palisade_jobs WHERE unique_key = ?1 AND ((unique_states >> state) & 1) = 1",
    )
    .bind(&unique_key)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Enqueued { id, duplicate: true })
}

async fn finish_postgres(pool: &PgPool, id: i64, attempt: i32, f: &Finish) -> Result<(), QueueError> {
    let q = match f {
        Finish::Completed(_) => unreachable!("completions go in one batch"),
        Finish::Failed {
            error,
            retry_in,
            discard,
        } => sqlx::query(
            "UPDATE palisade_jobs SET
                 state = CASE WHEN $3 OR attempt >= max_attempts THEN 6 ELSE 3 END,
                 scheduled_at = palisade_now_ms() + $4,
                 finished_at = CASE WHEN $3 OR attempt >= max_attempts THEN palisade_now_ms() END,
                 lease_until = NULL,
                 errors = errors || jsonb_build_array(jsonb_build_object(
                     'attempt', attempt, 'at', palisade_now_ms(), 'error', $5::text))
             WHERE id = $1 AND attempt = $2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(*discard)
        .bind(millis(*retry_in))
        .bind(error),
        Finish::Snoozed(d) => sqlx::query(
            "UPDATE palisade_jobs SET state = 1, scheduled_at = palisade_now_ms() + $3, attempt = attempt - 1,
                 lease_until = NULL
             WHERE id = $1 AND attempt = $2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(millis(*d)),
        Finish::Cancelled(reason) => sqlx::query(
            "UPDATE palisade_jobs SET state = 5, finished_at = palisade_now_ms(), lease_until = NULL,
                 errors = errors || jsonb_build_array(jsonb_build_object(
                     'attempt', attempt, 'at', palisade_now_ms(), 'error', $3::text))
             WHERE id = $1 AND attempt = $2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(reason),
        Finish::Released => sqlx::query(
            "UPDATE palisade_jobs SET state = 0, scheduled_at = palisade_now_ms(), attempt = attempt - 1,
                 lease_until = NULL
             WHERE id = $1 AND attempt = $2 AND state = 2",
        )
        .bind(id)
        .bind(attempt),
    };
    q.execute(pool).await?;
    Ok(())
}

async fn finish_sqlite(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    attempt: i32,
    f: &Finish,
    now: i64,
) -> Result<(), QueueError> {
    let q = match f {
        Finish::Completed(output) => sqlx::query(
            "UPDATE palisade_jobs SET state = 4, finished_at = ?3, lease_until = NULL, output = ?4
             WHERE id = ?1 AND attempt = ?2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(now)
        .bind(output.as_ref().map(Value::to_string)),
        Finish::Failed {
            error,
            retry_in,
            discard,
        } => sqlx::query(
            "UPDATE palisade_jobs SET
                 state = CASE WHEN ?4 OR attempt >= max_attempts THEN 6 ELSE 3 END,
                 scheduled_at = ?3 + ?5,
                 finished_at = CASE WHEN ?4 OR attempt >= max_attempts THEN ?3 END,
                 lease_until = NULL,
                 errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?3, 'error', ?6))
             WHERE id = ?1 AND attempt = ?2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(now)
        .bind(*discard)
        .bind(millis(*retry_in))
        .bind(error),
        Finish::Snoozed(d) => sqlx::query(
            "UPDATE palisade_jobs SET state = 1, scheduled_at = ?3 + ?4, attempt = attempt - 1, lease_until = NULL
             WHERE id = ?1 AND attempt = ?2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(now)
        .bind(millis(*d)),
        Finish::Cancelled(reason) => sqlx::query(
            "UPDATE palisade_jobs SET state = 5, finished_at = ?3, lease_until = NULL,
                 errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?3, 'error', ?4))
             WHERE id = ?1 AND attempt = ?2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(now)
        .bind(reason),
        Finish::Released => sqlx::query(
            "UPDATE palisade_jobs SET state = 0, scheduled_at = ?3, attempt = attempt - 1, lease_until = NULL
             WHERE id = ?1 AND attempt = ?2 AND state = 2",
        )
        .bind(id)
        .bind(attempt)
        .bind(now),
    };
    q.execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_results_follow_the_input_with_duplicates_named() {
        let keys = vec![
            None,
            Some("a".to_string()),
            None,
            Some("a".to_string()),
            Some("b".to_string()),
        ];
        let inserted = vec![(10, None), (11, Some("a".to_string())), (12, None)];
        let existing = vec![(3, "b".to_string())];
        let got = match_inserted(&keys, &inserted, &existing).unwrap();
        let want = [(10, false), (11, false), (12, false), (11, true), (3, true)];
        let got: Vec<_> = got.iter().map(|e| (e.id, e.duplicate)).collect();
        assert_eq!(got, want);
    }
}
