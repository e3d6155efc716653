//! What the flow tests share: a database of each test's own on the PostgreSQL
//! server `scripts/test` started.

#![allow(dead_code)] // each test file uses its own part

use sqlx::{Connection, Executor, PgPool};

/// The variable `scripts/test` sets, or a panic saying how to set it.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/test"))
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:x}", std::process::id(), fastrand::u64(..))
}

/// A new database; its URL.
pub async fn fresh_db(prefix: &str) -> String {
    let admin = env("PALISADE_TEST_POSTGRES_URL");
    let name = unique(prefix);
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// A pool of up to `connections` on a new database.
pub async fn fresh_pool(prefix: &str, connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(&fresh_db(prefix).await)
        .await
        .unwrap()
}
