//! Leases and fencing tokens against a real PostgreSQL, with a real leader
//! process paused by SIGSTOP past its lease.

#![allow(clippy::print_stdout)] // the leader process reports over stdout

mod support;

use std::process::Stdio;
use std::time::Duration;

use palisade_data::{DataError, Leases};
use sqlx::PgPool;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LOG: &str = "CREATE TABLE IF NOT EXISTS leader_log (
    seq bigserial PRIMARY KEY,
    holder text NOT NULL,
    token bigint NOT NULL
)";

async fn fresh_pool() -> (String, PgPool) {
    let url = fresh_db(&postgres_url(), "lease").await;
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::query(LOG).execute(&pool).await.unwrap();
    (url, pool)
}

fn postgres_url() -> String {
    std::env::var("PALISADE_TEST_POSTGRES_URL").expect("PALISADE_TEST_POSTGRES_URL is set by scripts/test")
}

/// One fenced write to the log as `holder`.
async fn log_write(leases: &Leases, lease: &palisade_data::Lease, holder: &str) -> Result<(), DataError> {
    let mut tx = leases.fenced(lease).await?;
    sqlx::query("INSERT INTO leader_log (holder, token) VALUES ($1, $2)")
        .bind(holder)
        .bind(lease.token())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn a_lease_is_held_renewed_released_and_its_old_token_refused() {
    let (_, pool) = fresh_pool().await;
    let a = Leases::new(pool.clone(), "a").await.unwrap();
    let b = Leases::new(pool.clone(), "b").await.unwrap();
    let ttl = Duration::from_secs(60);
    let first = a.acquire("leader", ttl).await.unwrap();
    assert_eq!(first.token(), 1);
    match b.acquire("leader", ttl).await {
        Err(DataError::LeaseHeld {
            holder, remaining_ms, ..
        }) => {
            assert_eq!(holder, "a");
            assert!(remaining_ms > 50_000, "{remaining_ms}");
        }
        other => panic!("expected the lease held by a, got {other:?}"),
    }
    assert_eq!(
        a.acquire("leader", ttl).await.unwrap().token(),
        1,
        "a renewal keeps the token"
    );
    a.renew(&first).await.unwrap();
    log_write(&a, &first, "a").await.unwrap();

    a.release(first.clone()).await.unwrap();
    let second = b.acquire("leader", ttl).await.unwrap();
    assert_eq!(second.token(), 2);
    match log_write(&a, &first, "a").await {
        Err(DataError::Fenced {
            token: 1, current: 2, ..
        }) => {}
        other => panic!("expected the old token fenced, got {other:?}"),
    }
    assert!(matches!(a.renew(&first).await, Err(DataError::Fenced { .. })));
    log_write(&b, &second, "b").await.unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT holder, token FROM leader_log ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows, [("a".to_string(), 1), ("b".to_string(), 2)]);
}

/// The leader process: takes lease `leader` as `old` (1 s), then writes to the
/// log under it and renews it, printing `wrote N`, until a write or renewal is
/// fenced: prints `fenced` and exits. Not a test on its own.
#[tokio::test]
#[ignore = "run by the fencing test as its leader process"]
async fn leader_process() {
    let Ok(url) = std::env::var("PALISADE_LEASE_URL") else {
        return;
    };
    let pool = PgPool::connect(&url).await.unwrap();
    let leases = Leases::new(pool, "old").await.unwrap();
    let lease = leases.acquire("leader", Duration::from_secs(1)).await.unwrap();
    println!("leading {}", lease.token());
    let mut n = 0;
    loop {
        let written = match log_write(&leases, &lease, "old").await {
            Ok(()) => leases.renew(&lease).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                n += 1;
                println!("wrote {n}");
            }
            Err(DataError::Fenced { .. }) => {
                println!("fenced");
                return;
            }
            // A connection the server closed while the process was stopped.
            Err(e) => eprintln!("retrying after: {e}"),
        }
    }
}

fn spawn_leader(url: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "leader_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PALISADE_LEASE_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_fenced_after_a_takeover() {
    let (url, pool) = fresh_pool().await;
    let mut old = spawn_leader(&url);
    let mut lines = BufReader::new(old.stdout.take().unwrap()).lines();
    let mut wait_for = async |wanted: &str| loop {
        let line = lines.next_line().await.unwrap().expect("the leader exited early");
        if line == wanted {
            return;
        }
    };
    wait_for("wrote 20").await;
    signal(&old, "-STOP");

    // Its lease runs out while it is stopped (by the database's clock); then the
    // new leader takes over.
    let new = Leases::new(pool.clone(), "new").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lease = loop {
        match new.acquire("leader", Duration::from_secs(60)).await {
            Ok(lease) => break lease,
            Err(DataError::LeaseHeld { .. }) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the stopped leader's lease never ran out"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(lease.token(), 2);
    log_write(&new, &lease, "new").await.unwrap();
    let taken_over_at: i64 = sqlx::query_scalar("SELECT max(seq) FROM leader_log")
        .fetch_one(&pool)
        .await
        .unwrap();

    signal(&old, "-CONT");
    wait_for("fenced").await;
    assert!(old.wait().await.unwrap().success());
    log_write(&new, &lease, "new").await.unwrap();

    let rows: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT seq, holder, token FROM leader_log ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let old_rows: Vec<&(i64, String, i64)> = rows.iter().filter(|r| r.1 == "old").collect();
    assert!(old_rows.len() >= 20);
    assert!(old_rows.iter().all(|r| r.2 == 1));
    assert!(
        old_rows.iter().all(|r| r.0 < taken_over_at),
        "the old leader wrote after the takeover: {rows:?}"
    );
    assert_eq!(rows.iter().filter(|r| r.1 == "new").count(), 2);
}
