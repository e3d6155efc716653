//! The event store and projections against a real PostgreSQL.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use palisade_flow::events::{
    Checkpoint, EventError, EventStore, Expected, NewEvent, Projection, Projector, RecordedEvent,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use support::fresh_pool;

async fn store() -> EventStore {
    EventStore::new(fresh_pool("events", 20).await).await.unwrap()
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Deposited {
    amount: i64,
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent::new("Deposited", &Deposited { amount }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_appending_at_the_same_expected_version_one_wins_the_others_conflict() {
    let store = store().await;
    assert_eq!(
        store
            .append("acct-1", Expected::NoStream, &[deposit(1)])
            .await
            .unwrap(),
        1
    );
    let writers: Vec<_> = (0..10)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append("acct-1", Expected::Exact(1), &[deposit(i), deposit(i)])
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for w in writers {
        match w.await.unwrap() {
            Ok(version) => {
                assert_eq!(version, 3);
                won += 1;
            }
            Err(EventError::Conflict { stream, expected, .. }) => {
                assert_eq!((stream.as_str(), expected.as_str()), ("acct-1", "1"))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
    let events = store.read_stream("acct-1", 0).await.unwrap();
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(matches!(
        store.append("acct-1", Expected::NoStream, &[deposit(1)]).await,
        Err(EventError::Conflict { actual: 3, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_checkpointing_through_concurrent_appends_sees_every_event_once() {
    let store = store().await;
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    store
                        .append(&format!("s{w}"), Expected::Exact(i), &[deposit(i)])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let mut at = Checkpoint::default();
            let mut seen = Vec::new();
            // A transaction running anywhere on the server (another test's) holds
            // the readable frontier back for a while: read until all 400 are seen.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let batch = store.read_all(at, 7).await.unwrap();
                if let Some(last) = batch.last() {
                    at = last.checkpoint;
                }
                seen.extend(batch.into_iter().map(|e| e.id));
                if done.load(Ordering::SeqCst) && seen.len() >= 400 {
                    return seen;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {} of 400 events read",
                    seen.len()
                );
                tokio::task::yield_now().await;
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was read twice");
    assert_eq!(seen.len(), 400, "an event was skipped");
}

/// Balances per account: the read model of the deposits.
struct Balances;

impl Projection for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    fn apply<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        event: &'c RecordedEvent,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let amount = event.data["amount"].as_i64().unwrap_or(0);
            sqlx::query(
                "INSERT INTO balances (account, balance, events) VALUES ($1, $2, 1)
                 ON CONFLICT (account) DO UPDATE SET balance = balances.balance + $2, events = balances.events + 1",
            )
            .bind(&event.stream)
            .bind(amount)
            .execute(conn)
            .await
            .map(drop)
        })
    }

    fn reset<'c>(&'c self, conn: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query("TRUNCATE balances").execute(conn).await.map(drop) })
    }
}

async fn balances(pool: &PgPool) -> BTreeMap<String, (i64, i32)> {
    let rows: Vec<(String, i64, i32)> = sqlx::query_as("SELECT account, balance, events FROM balances")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|(a, b, e)| (a, (b, e))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_fed_live_equals_the_same_projection_rebuilt_from_zero() {
    let store = store().await;
    sqlx::query(
        "CREATE TABLE balances (account text PRIMARY KEY, balance bigint NOT NULL, events int NOT NULL)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let projector = Arc::new(Projector::new(store.clone(), Balances).batch(25));
    let done = Arc::new(AtomicBool::new(false));
    // The live projector catches up while the writers append.
    let live = {
        let (projector, done) = (projector.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                projector.catch_up().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    store
                        .append(
                            &format!("account-{}", (w + i) % 9),
                            Expected::Any,
                            &[deposit(w * 100 + i)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    live.await.unwrap();
    // Another test's transaction on the server may hold the frontier back a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while balances(store.pool()).await.values().map(|(_, n)| n).sum::<i32>() < 240 {
        assert!(
            std::time::Instant::now() < deadline,
            "the projection never caught up"
        );
        projector.catch_up().await.unwrap();
        tokio::task::yield_now().await;
    }
    let fed_live = balances(store.pool()).await;

    // The truth, from the events themselves.
    let mut truth: BTreeMap<String, (i64, i32)> = BTreeMap::new();
    let all = store.read_all(Checkpoint::default(), 10_000).await.unwrap();
    assert_eq!(all.len(), 240);
    for e in all {
        let d: Deposited = e.data().unwrap();
        let entry = truth.entry(e.stream).or_default();
        entry.0 += d.amount;
        entry.1 += 1;
    }
    assert_eq!(fed_live, truth);
    let mut rebuilt = projector.rebuild().await.unwrap();
    while rebuilt < 240 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rebuild never caught up"
        );
        rebuilt += projector.catch_up().await.unwrap();
    }
    assert_eq!(rebuilt, 240);
    assert_eq!(balances(store.pool()).await, fed_live);
    assert_eq!(projector.catch_up().await.unwrap(), 0, "nothing applied twice");
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Account {
    balance: i64,
}

#[tokio::test]
async fn a_snapshot_spares_loading_the_events_before_it() {
    let store = store().await;
    let events: Vec<NewEvent> = (1..=5).map(deposit).collect();
    store.append("acct", Expected::NoStream, &events).await.unwrap();
    store
        .save_snapshot("acct", 5, &Account { balance: 15 })
        .await
        .unwrap();
    store
        .append("acct", Expected::Exact(5), &[deposit(6)])
        .await
        .unwrap();
    let (snapshot, after) = store.load::<Account>("acct").await.unwrap();
    let snapshot = snapshot.unwrap();
    assert_eq!((snapshot.version, snapshot.state), (5, Account { balance: 15 }));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].data::<Deposited>().unwrap(), Deposited { amount: 6 });
    // An older snapshot never replaces a newer one.
    store
        .save_snapshot("acct", 3, &Account { balance: 6 })
        .await
        .unwrap();
    assert_eq!(store.load::<Account>("acct").await.unwrap().0.unwrap().version, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_order_follows_transaction_ids_as_numbers_not_as_text() {
    let store = store().await;
    // Transaction 10 before transaction 9 as text ("10" < "9"), after it as numbers.
    for (tx, id) in [(10, "second"), (9, "first")] {
        sqlx::query(
            "INSERT INTO palisade_events (tx, stream, version, id, kind, data, metadata)
             VALUES ($1::text::xid8, $2, 1, $2, 'K', '{}', '{}')",
        )
        .bind(tx.to_string())
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let mut at = Checkpoint::default();
    let mut order = Vec::new();
    for _ in 0..2 {
        let batch = store.read_all(at, 1).await.unwrap();
        at = batch[0].checkpoint;
        order.push(batch[0].id.clone());
    }
    assert_eq!(order, ["first", "second"]);
    assert!(store.read_all(at, 10).await.unwrap().is_empty());
}
