//! [`Queue`]: a handle on the jobs of one database (PostgreSQL or SQLite) that
//! enqueues, inspects, cancels and retries them; [`crate::Runner`] runs them.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgConnection, PgPool, SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use crate::QueueError;
use crate::job::{Job, NewJob, now_ms};
use crate::schema;
use crate::store::{self, Enqueued, ListFilter, QueueStats, Store};

/// How a [`Queue`] connects.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Connections in the pool (PostgreSQL; SQLite uses at most 4 and one for an
    /// in-memory database).
    pub max_connections: u32,
    /// How long to wait for a connection before the operation fails as
    /// [`QueueError::Unavailable`].
    pub acquire_timeout: Duration,
}

impl Default for ConnectOptions {
    /// 10 connections, 5 s to get one.
    fn default() -> Self {
        ConnectOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The jobs of one database. Cheap to clone (a pool inside).
///
/// ```no_run
/// # async fn f() -> Result<(), palisade_queue::QueueError> {
/// use palisade_queue::{NewJob, Queue};
///
/// let queue = Queue::connect("sqlite:jobs.db").await?; // or "postgres://..."
/// let job = queue.enqueue(NewJob::new("send_email", &"a@example.com").unwrap()).await?;
/// println!("job {}", job.id);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Queue {
    pub(crate) store: Store,
    /// Woken by this process's enqueues (SQLite has no notifications).
    pub(crate) local: Arc<Notify>,
}

impl Queue {
    /// Connects to `url` (`postgres://...`, or `sqlite:path` creating the file,
    /// `sqlite::memory:`) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Queue, QueueError> {
        Self::connect_with(url, &ConnectOptions::default()).await
    }

    /// [`connect`](Self::connect) with options.
    pub async fn connect_with(url: &str, o: &ConnectOptions) -> Result<Queue, QueueError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(o.max_connections)
                .acquire_timeout(o.acquire_timeout)
                .connect(url)
                .await?;
            Self::postgres(pool).await
        } else if url.starts_with("sqlite:") {
            // Processes opening a new file at once can find it locked while one of
            // them switches it to WAL or applies the schema, without waiting for
            // the busy timeout: they try again.
            let mut tries = 0u64;
            loop {
                match Self::connect_sqlite(url, o).await {
                    Err(e) if tries < 20 && sqlite_busy(&e) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                    }
                    other => return other,
                }
            }
        } else {
            Err(QueueError::UnsupportedUrl(url.to_string()))
        }
    }

    async fn connect_sqlite(url: &str, o: &ConnectOptions) -> Result<Queue, QueueError> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(if memory { 1 } else { o.max_connections.clamp(1, 4) })
            .acquire_timeout(o.acquire_timeout)
            // An in-memory database lives as long as its one connection.
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(1800))
            })
            .connect_with(options)
            .await?;
        Self::sqlite(pool).await
    }

    /// A queue on an existing PostgreSQL pool (its schema brought up to date).
    pub async fn postgres(pool: PgPool) -> Result<Queue, QueueError> {
        schema::migrate_postgres(&pool).await?;
        Ok(Queue {
            store: Store::Postgres(pool),
            local: Arc::default(),
        })
    }

    /// A queue on an existing SQLite pool (its schema brought up to date).
    pub async fn sqlite(pool: SqlitePool) -> Result<Queue, QueueError> {
        schema::migrate_sqlite(&pool).await?;
        Ok(Queue {
            store: Store::Sqlite(pool),
            local: Arc::default(),
        })
    }

    /// `postgres` or `sqlite`.
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Enqueues one job.
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let mut out = self.enqueue_many(std::slice::from_ref(&job)).await?;
        out.pop()
            .ok_or_else(|| QueueError::Corrupt("nothing came back from the insert".into()))
    }

    /// Enqueues `jobs` in one round trip (PostgreSQL) or one transaction (SQLite);
    /// the results are in the same order.
    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>, QueueError> {
        let out = self.store.insert(jobs).await?;
        self.local.notify_waiters();
        Ok(out)
    }

    /// Enqueues `jobs` on the caller's PostgreSQL connection, typically inside its
    /// own transaction: the jobs exist only if the transaction commits (the
    /// transactional outbox), and workers hear of them at the commit.
    pub async fn enqueue_in_postgres(
        conn: &mut PgConnection,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, QueueError> {
        store::insert_postgres(conn, jobs).await
    }

    /// Enqueues `jobs` on the caller's SQLite connection, typically inside its own
    /// transaction (see [`enqueue_in_postgres`](Self::enqueue_in_postgres)).
    /// Workers in other processes find them at their next poll.
    pub async fn enqueue_in_sqlite(
        conn: &mut SqliteConnection,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, QueueError> {
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            out.push(store::insert_sqlite(conn, job, i, now).await?);
        }
        Ok(out)
    }

    /// Gives the running attempt `attempt` of job `id` new arguments, on the
    /// caller's PostgreSQL connection (in the transaction that records the work
    /// the old arguments asked for): a worker that goes on to the next piece of
    /// work in the same attempt, instead of enqueueing it, writes it down here,
    /// so that the job, rescued after the worker died, resumes there. `false`
    /// when the attempt is no longer the job's (rescued, cancelled): then the
    /// caller must not go on in it.
    pub async fn reassign_in_postgres(
        conn: &mut PgConnection,
        id: i64,
        attempt: i32,
        args: &serde_json::Value,
    ) -> Result<bool, QueueError> {
        let done =
            sqlx::query("UPDATE palisade_jobs SET args = $3 WHERE id = $1 AND attempt = $2 AND state = 2")
                .bind(id)
                .bind(attempt)
                .bind(sqlx::types::Json(args))
                .execute(conn)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`reassign_in_postgres`](Self::reassign_in_postgres) on SQLite.
    pub async fn reassign_in_sqlite(
        conn: &mut SqliteConnection,
        id: i64,
        attempt: i32,
        args: &serde_json::Value,
    ) -> Result<bool, QueueError> {
        let done =
            sqlx::query("UPDATE palisade_jobs SET args = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 2")
                .bind(id)
                .bind(attempt)
                .bind(args.to_string())
                .execute(conn)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The job with `id`.
    pub async fn job(&self, id: i64) -> Result<Option<Job>, QueueError> {
        self.store.get(id).await
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, QueueError> {
        self.store.list(filter).await
    }

    /// Cancels a job that has not finished (a running one's worker stops at its
    /// next heartbeat); `false` when it had finished or does not exist.
    pub async fn cancel(&self, id: i64) -> Result<bool, QueueError> {
        self.store.cancel(id).await
    }

    /// Runs a finished (completed, cancelled, discarded) or waiting job again now,
    /// with at least one attempt left; `false` when it is running or does not
    /// exist.
    pub async fn retry(&self, id: i64) -> Result<bool, QueueError> {
        let retried = self.store.retry(id).await?;
        self.local.notify_waiters();
        Ok(retried)
    }

    /// Jobs per queue and state, and each queue's oldest due wait.
    pub async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        self.store.stats().await
    }

    /// Deletes jobs that finished more than `age` ago (at most 10,000 a call);
    /// returns how many.
    pub async fn prune(&self, age: Duration) -> Result<u64, QueueError> {
        self.store.prune(age).await
    }

    /// Takes back jobs whose worker's lease ran out (runners do this on their own
    /// every so often); returns how many.
    pub async fn rescue(&self) -> Result<u64, QueueError> {
        self.store.rescue().await
    }
}

/// Whether `e` is SQLite's "database is locked" (a busy file, whatever the
/// extended code).
fn sqlite_busy(e: &QueueError) -> bool {
    match e {
        QueueError::Database(sqlx::Error::Database(d)) => {
            d.code()
                .and_then(|c| c.parse::<u32>().ok())
                .is_some_and(|c| c & 0xff == 5 || c & 0xff == 6)
                || d.message().contains("locked")
        }
        _ => false,
    }
}
