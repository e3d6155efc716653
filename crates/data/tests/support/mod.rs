//! What the data layer's tests share: the servers `scripts/test` started
//! (`start_postgres_data` in scripts/services.sh), and a database of each test's
//! own on them.

#![allow(dead_code, unused_imports)] // each test file uses its own part

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use palisade_testkit::env;

/// The primary of the replicated cluster (its `postgres` database).
pub fn primary_url() -> String {
    env("PALISADE_TEST_PG_PRIMARY_URL")
}

/// Its two streaming replicas.
pub fn replica_urls() -> Vec<String> {
    env("PALISADE_TEST_PG_REPLICA_URLS")
        .split(',')
        .map(str::to_string)
        .collect()
}

/// The two independent shard servers.
pub fn shard_urls() -> Vec<String> {
    env("PALISADE_TEST_PG_SHARD_URLS")
        .split(',')
        .map(str::to_string)
        .collect()
}

/// The pg_ctl command lines of the replicas (`;`-separated in the environment).
pub fn replica_ctls() -> Vec<String> {
    env("PALISADE_TEST_PG_REPLICA_CTLS")
        .split(';')
        .map(str::to_string)
        .collect()
}

/// The pg_ctl command lines of the shard servers.
pub fn shard_ctls() -> Vec<String> {
    env("PALISADE_TEST_PG_SHARD_CTLS")
        .split(';')
        .map(str::to_string)
        .collect()
}

pub use palisade_testkit::{exec, pg_ctl, unique, with_db};

/// A new database on `url`'s server; its URL.
pub async fn fresh_db(url: &str, prefix: &str) -> String {
    palisade_testkit::fresh_db_on(url, prefix).await
}

/// A new database on the primary, once every replica has it (replication brings
/// it); its URL on the primary and on each replica.
pub async fn replicated_db(prefix: &str) -> (String, Vec<String>) {
    let primary = fresh_db(&primary_url(), prefix).await;
    let name = primary.rsplit_once('/').unwrap().1.to_string();
    let replicas: Vec<String> = replica_urls().iter().map(|r| with_db(r, &name)).collect();
    for r in &replicas {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while PgConnection::connect(r).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the database never reached {r}"
            );
            tokio::task::yield_now().await;
        }
    }
    (primary, replicas)
}

/// Resumes replay on every replica (a test that paused one and failed may have
/// left it paused).
pub async fn resume_all() {
    for r in replica_urls() {
        exec(&r, "SELECT pg_wal_replay_resume()").await;
    }
}

/// Waits until the replica at `url` has replayed the primary's position now.
pub async fn caught_up(primary: &str, replica: &str) {
    let mut p = PgConnection::connect(primary).await.unwrap();
    let target: i64 = sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(&mut p)
        .await
        .unwrap();
    let mut r = PgConnection::connect(replica).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let at: i64 = sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(&mut r)
            .await
            .unwrap();
        if at >= target {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{replica} never caught up");
        tokio::task::yield_now().await;
    }
}

/// The port of the server a pool's connection is on: which server answered.
pub async fn server_port(pool: sqlx::PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(&pool)
        .await
}

/// The port in a server URL.
pub fn port_of(url: &str) -> i32 {
    let authority = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    authority.rsplit_once(':').unwrap().1.parse().unwrap()
}
