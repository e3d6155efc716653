//! The read/write split against a real primary and two streaming replicas
//! (scripts/services.sh `start_postgres_data`). These tests pause, kill and
//! restart the shared replicas, so nextest runs them one at a time
//! (.config/nextest.toml, group `replicas`).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use palisade_core::config::Dur;
use palisade_core::{ManualClock, SharedClock};
use palisade_data::{DataError, ReadBalance, ReplicaSet, ReplicaSetConfig, WhenNoReplica};
use support::*;

fn config(primary: &str, replicas: &[String]) -> ReplicaSetConfig {
    ReplicaSetConfig {
        name: unique("set"),
        primary: primary.to_string(),
        replicas: replicas.to_vec(),
        balance: ReadBalance::RoundRobin,
        ..ReplicaSetConfig::default()
    }
}

/// Which server answered each of `n` plain reads, by port.
async fn serving(set: &ReplicaSet, n: usize) -> HashMap<i32, usize> {
    let mut by_port = HashMap::new();
    for _ in 0..n {
        let port = set.read(server_port).await.unwrap();
        *by_port.entry(port).or_insert(0) += 1;
    }
    by_port
}

/// Waits (yielding, up to 60 s) until `ready` holds.
async fn wait_for(ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replicas_and_writes_to_the_primary() {
    resume_all().await;
    let (primary, replicas) = replicated_db("rw").await;
    let set = ReplicaSet::connect(config(&primary, &replicas)).await.unwrap();
    let by_port = serving(&set, 100).await;
    let replica_ports: Vec<i32> = replicas.iter().map(|r| port_of(r)).collect();
    assert_eq!(by_port.len(), 2, "{by_port:?}");
    for p in &replica_ports {
        assert_eq!(
            by_port.get(p),
            Some(&50),
            "round robin over both replicas: {by_port:?}"
        );
    }
    let (port, token) = set.write(server_port).await.unwrap();
    assert_eq!(port, port_of(&primary));
    assert!(token.0 > 0);
    assert_eq!(set.replicas().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_max_lag_gets_no_reads_until_it_catches_up() {
    resume_all().await;
    let (primary, replicas) = replicated_db("lag").await;
    exec(&primary, "CREATE TABLE t (v int)").await;
    for r in &replicas {
        caught_up(&primary, r).await;
    }
    let clock = ManualClock::new();
    let mut c = config(&primary, &replicas);
    c.max_lag = Dur(Duration::from_secs(1));
    c.lag_interval = Dur(Duration::from_millis(100));
    let set = ReplicaSet::connect_with_clock(c, SharedClock::new(clock.clone()))
        .await
        .unwrap();
    let paused = port_of(&replicas[0]);

    exec(&replicas[0], "SELECT pg_wal_replay_pause()").await;
    exec(&primary, "INSERT INTO t VALUES (1)").await;
    set.check_lag().await;
    // Just written: behind, but not yet for longer than max_lag.
    assert!(serving(&set, 10).await.contains_key(&paused));

    clock.advance(Duration::from_millis(1500));
    set.check_lag().await;
    let by_port = serving(&set, 100).await;
    assert_eq!(
        by_port.get(&paused),
        None,
        "a replica 1.5 s behind served reads: {by_port:?}"
    );
    assert_eq!(by_port.get(&port_of(&replicas[1])), Some(&100));
    assert_eq!(
        set.replicas().iter().filter(|(_, up)| *up).count(),
        1,
        "{:?}",
        set.replicas()
    );

    exec(&replicas[0], "SELECT pg_wal_replay_resume()").await;
    caught_up(&primary, &replicas[0]).await;
    set.check_lag().await;
    let by_port = serving(&set, 100).await;
    assert_eq!(
        by_port.get(&paused),
        Some(&50),
        "caught up, it serves again: {by_port:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_a_causality_token_never_sees_older_data_than_its_write() {
    resume_all().await;
    let (primary, replicas) = replicated_db("causal").await;
    exec(
        &primary,
        "CREATE TABLE c (id int PRIMARY KEY, v int NOT NULL); INSERT INTO c VALUES (1, 0)",
    )
    .await;
    for r in &replicas {
        caught_up(&primary, r).await;
    }
    let mut c = config(&primary, &replicas);
    // The paused replica stays in rotation for plain reads: only the token keeps
    // the reads below off it.
    c.max_lag = Dur(Duration::from_secs(3600));
    c.causal_wait = Dur(Duration::from_millis(20));
    let set = ReplicaSet::connect(c).await.unwrap();
    exec(&replicas[0], "SELECT pg_wal_replay_pause()").await;

    let read_v = |pool: sqlx::PgPool| async move {
        let row: (i32, i32) = sqlx::query_as("SELECT v, inet_server_port() FROM c WHERE id = 1")
            .fetch_one(&pool)
            .await?;
        Ok(row)
    };
    let mut served: HashMap<i32, usize> = HashMap::new();
    let mut stale_plain_reads = 0;
    for i in 1..=2000 {
        let ((), token) = set
            .write(|pool| async move {
                sqlx::query("UPDATE c SET v = $1 WHERE id = 1")
                    .bind(i)
                    .execute(&pool)
                    .await
                    .map(drop)
            })
            .await
            .unwrap();
        let (v, port) = set.read_after(token, read_v).await.unwrap();
        assert_eq!(v, i, "read {i} after its write saw {v} (served by port {port})");
        *served.entry(port).or_insert(0) += 1;
        let (plain, _) = set.read(read_v).await.unwrap();
        if plain < i {
            stale_plain_reads += 1;
        }
    }
    exec(&replicas[0], "SELECT pg_wal_replay_resume()").await;
    assert!(
        stale_plain_reads > 0,
        "reads without a token never met the paused replica: the test proves nothing"
    );
    assert_eq!(
        served.get(&port_of(&replicas[0])),
        None,
        "the paused replica served a causal read"
    );
    assert!(
        served.contains_key(&port_of(&replicas[1])),
        "no causal read went to the live replica: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_costs_no_read() {
    resume_all().await;
    let (primary, replicas) = replicated_db("kill").await;
    let mut c = config(&primary, &replicas);
    c.balance = ReadBalance::LeastRequest;
    // The breakers' open time passes on this clock.
    let clock = ManualClock::new();
    let set = ReplicaSet::connect_with_clock(c, SharedClock::new(clock.clone()))
        .await
        .unwrap();
    let ctl = &replica_ctls()[1];

    let reads = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (set, reads, done) = (set.clone(), reads.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    set.read(server_port).await.unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_for(|| reads.load(Ordering::Relaxed) >= 200).await;
    pg_ctl(ctl, "-m immediate stop").await;
    let at_kill = reads.load(Ordering::Relaxed);
    wait_for(|| reads.load(Ordering::Relaxed) >= at_kill + 800).await;
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("a read failed while the replica was down");
    }
    // Down: after the failures the replica's breaker is open and the lag check
    // takes it out; reads are served by the other replica.
    set.check_lag().await;
    let by_port = serving(&set, 50).await;
    assert_eq!(by_port.get(&port_of(&replicas[1])), None, "{by_port:?}");

    pg_ctl(ctl, "start").await;
    caught_up(&primary, &replicas[1]).await;
    clock.advance(Duration::from_secs(6));
    set.check_lag().await;
    assert!(set.replicas().iter().all(|(_, up)| *up), "{:?}", set.replicas());
}

#[tokio::test]
async fn with_no_replica_reads_go_to_the_primary_or_are_refused() {
    // A replica nobody answers at: unreachable from the start.
    let dead = "postgres://postgres@127.0.0.1:1/postgres".to_string();
    let primary = primary_url();
    let mut c = config(&primary, std::slice::from_ref(&dead));
    c.pool.acquire_timeout = Dur(Duration::from_millis(500));
    let set = ReplicaSet::connect(c.clone()).await.unwrap();
    assert_eq!(set.read(server_port).await.unwrap(), port_of(&primary));

    c.name = unique("refuse");
    c.when_no_replica = WhenNoReplica::Refuse;
    let set = ReplicaSet::connect(c).await.unwrap();
    match set.read(server_port).await {
        Err(DataError::NoReplica { .. }) => {}
        other => panic!("expected NoReplica, got {other:?}"),
    }
}

#[tokio::test]
async fn a_replica_url_that_reaches_the_primary_is_a_config_error_naming_it() {
    let primary = primary_url();
    // The same server under another name: only the server itself can tell.
    let alias = primary.replace("127.0.0.1", "localhost");
    let c = config(&primary, &[replica_urls()[0].clone(), alias]);
    match ReplicaSet::connect(c).await {
        Err(DataError::Config(e)) => {
            assert_eq!(e.fields(), ["replicas[1]"]);
            assert!(e.0[0].problem.contains("not in recovery"), "{e}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // Another cluster's server (a shard) is no replica of this primary either.
    let c = config(&primary, &[shard_urls()[0].clone()]);
    match ReplicaSet::connect(c).await {
        Err(DataError::Config(e)) => assert_eq!(e.fields(), ["replicas[0]"]),
        other => panic!("expected a config error, got {other:?}"),
    }
}
