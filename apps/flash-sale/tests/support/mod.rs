//! What the flash-sale tests share: the time, and databases of their own on the
//! PostgreSQL server `scripts/test` started.

#![allow(dead_code)] // each test file uses its own part

use std::time::SystemTime;

use sqlx::{Connection, Executor};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A pool on a new database.
pub async fn fresh_pool(prefix: &str) -> sqlx::PgPool {
    let admin =
        std::env::var("PALISADE_TEST_POSTGRES_URL").expect("PALISADE_TEST_POSTGRES_URL: run scripts/test");
    let name = format!("{prefix}_{}_{:x}", std::process::id(), fastrand::u64(..));
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&format!("{base}/{name}"))
        .await
        .unwrap()
}
