//! What Palisade's tests share: the servers `scripts/test` started (their URLs
//! in `PALISADE_TEST_*` variables), a database of each test's own on them, names
//! no other test uses, and `pg_ctl` to stop and start a server under a test.
//!
//! A test crate takes it as a dev-dependency; nothing here is for production.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Connection, Executor, PgConnection, PgPool};

/// The variable `scripts/test` sets, or a panic saying how to set it.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run scripts/test, or start the servers with \
             `source scripts/services.sh && start_postgres` (and the like)"
        )
    })
}

/// The run's PostgreSQL server (its `postgres` database).
pub fn postgres_url() -> String {
    env("PALISADE_TEST_POSTGRES_URL")
}

/// A name no other test uses (in this run or another): `prefix`, the process,
/// a counter and a random part; safe as a database name, a key or a subject.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}_{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// `url` (a server's `postgres` database) with its database replaced by `db`.
pub fn with_db(url: &str, db: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{db}")
}

/// Runs `sql` on `url`.
pub async fn exec(url: &str, sql: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(sql.to_string())).await.unwrap();
}

/// A new database on `server`'s server (a URL of any of its databases); its URL.
pub async fn fresh_db_on(server: &str, prefix: &str) -> String {
    let name = unique(prefix);
    exec(server, &format!("CREATE DATABASE {name}")).await;
    with_db(server, &name)
}

/// A new database on the run's PostgreSQL; its URL.
pub async fn fresh_db(prefix: &str) -> String {
    fresh_db_on(&postgres_url(), prefix).await
}

/// A pool of up to `connections` on a new database on the run's PostgreSQL.
pub async fn fresh_pool(prefix: &str, connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(&fresh_db(prefix).await)
        .await
        .unwrap()
}

/// Runs `ctl action` (`ctl` a `pg_ctl ...` command line from scripts/services.sh,
/// `action` as `start` or `-m immediate stop`) and asserts that it succeeded.
pub async fn pg_ctl(ctl: &str, action: &str) {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ctl} {action}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{ctl} {action} failed");
}

/// [`pg_ctl`] on the run's PostgreSQL (`PALISADE_TEST_PG_CTL`).
pub async fn postgres_ctl(action: &str) {
    pg_ctl(&env("PALISADE_TEST_PG_CTL"), action).await;
}
