//! What the queue's tests share: a fresh, isolated database on either backend (a
//! SQLite file in a temporary directory, or a database of its own on the
//! PostgreSQL server `scripts/test` started), and a worker that reports to the test.

#![allow(dead_code, unused_imports)] // each test file uses its own part

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palisade_queue::Queue;

/// Which backend a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of the test's own, removed (SQLite) when dropped.
pub struct TestDb {
    pub url: String,
    dir: Option<PathBuf>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The PostgreSQL server of this test run (`scripts/test` exports it).
pub use palisade_testkit::postgres_url as postgres_admin_url;

/// A new empty database on `backend`.
pub async fn fresh_db(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(palisade_testkit::unique("palisade_queue"));
            std::fs::create_dir_all(&dir).unwrap();
            TestDb {
                url: format!("sqlite:{}", dir.join("jobs.db").display()),
                dir: Some(dir),
            }
        }
        Backend::Postgres => TestDb {
            url: palisade_testkit::fresh_db("q").await,
            dir: None,
        },
    }
}

/// A queue on a new empty database.
pub async fn fresh(backend: Backend) -> (Queue, TestDb) {
    let db = fresh_db(backend).await;
    let q = Queue::connect(&db.url).await.unwrap();
    (q, db)
}

/// Counts what happened and wakes the test on each event.
#[derive(Default)]
pub struct Events {
    pub count: AtomicU64,
    pub changed: tokio::sync::Notify,
}

impl Events {
    pub fn new() -> Arc<Events> {
        Arc::default()
    }

    pub fn hit(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` events.
    pub async fn until(&self, n: u64) {
        loop {
            let changed = self.changed.notified();
            if self.get() >= n {
                return;
            }
            changed.await;
        }
    }
}

/// Runs `sql` on the test's database (to arrange what the API cannot: an old row).
pub async fn execute(db: &TestDb, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    if db.dir.is_some() {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
}
