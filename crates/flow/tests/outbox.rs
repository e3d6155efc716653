//! The transactional outbox relayed to real NATS JetStream (and to the in-process
//! bus), with the NATS server killed and restarted mid-relay.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use palisade_flow::outbox::{InProcessBus, Inbox, JetStreamBus, Message, Outbox};
use sqlx::PgPool;
use support::{env, fresh_pool, unique};
use tokio::process::{Child, Command};

/// Writes `n` messages to `subject` through the outbox, 100 per transaction (each
/// with a row of its own, as a state change would be); their ids.
async fn write(pool: &PgPool, subject: &str, n: usize) -> Vec<String> {
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY)")
        .execute(pool)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for chunk in 0..n.div_ceil(100) {
        let messages: Vec<Message> = (0..100.min(n - chunk * 100))
            .map(|i| Message::new(subject, format!("order {}", chunk * 100 + i)))
            .collect();
        let mut tx = pool.begin().await.unwrap();
        for m in &messages {
            sqlx::query("INSERT INTO orders VALUES ($1)")
                .bind(&m.id)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        Outbox::add_in(&mut tx, &messages).await.unwrap();
        tx.commit().await.unwrap();
        ids.extend(messages.into_iter().map(|m| m.id));
    }
    ids
}

#[tokio::test]
async fn a_rolled_back_transaction_sends_nothing_and_a_committed_one_everything() {
    let pool = fresh_pool("outbox_local", 5).await;
    let outbox = Outbox::new(pool.clone()).await.unwrap();
    let bus = InProcessBus::new(1024);
    let mut sub = bus.subscribe();
    let mut tx = pool.begin().await.unwrap();
    Outbox::add_in(&mut tx, &[Message::new("orders.created", "lost")])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let ids = write(&pool, "orders.created", 250).await;
    let relay = outbox.relay(bus).batch(40);
    let mut relayed = 0;
    while outbox.pending().await.unwrap() > 0 {
        relayed += relay.relay_once().await.unwrap();
    }
    assert_eq!(relayed, 250);
    let mut got = Vec::new();
    while let Ok(m) = sub.try_recv() {
        got.push(m.id);
    }
    assert_eq!(got, ids, "every committed message, in order, and nothing else");

    // A consumer drops a message it has handled.
    let mut tx = pool.begin().await.unwrap();
    assert!(Inbox::first_time(&mut tx, "billing", &ids[0]).await.unwrap());
    assert!(!Inbox::first_time(&mut tx, "billing", &ids[0]).await.unwrap());
    assert!(Inbox::first_time(&mut tx, "shipping", &ids[0]).await.unwrap());
    tx.commit().await.unwrap();
}

/// A NATS server of the test's own, with JetStream, its store in `dir`.
fn nats(port: u16, dir: &Path) -> Child {
    Command::new(env("PALISADE_TEST_NATS_SERVER"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn until_listening(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "NATS never listened on {port}"
        );
        tokio::task::yield_now().await;
    }
}

async fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The consumer: a durable pull consumer of stream `ORDERS`, every message
/// acknowledged and counted by id, made again whenever the server goes away.
async fn consume(js: async_nats::jetstream::Context, received: Arc<Mutex<HashMap<String, u32>>>) {
    loop {
        let Ok(stream) = js.get_stream("ORDERS").await else {
            continue;
        };
        let config = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("billing".into()),
            ..Default::default()
        };
        let Ok(consumer) = stream.get_or_create_consumer("billing", config).await else {
            continue;
        };
        let Ok(mut messages) = consumer.messages().await else {
            continue;
        };
        while let Some(Ok(m)) = messages.next().await {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string());
            if m.ack().await.is_ok()
                && let Some(id) = id
            {
                *received.lock().unwrap().entry(id).or_insert(0) += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_relay_loses_nothing_and_duplicates_are_dropped_by_id() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(unique("nats"));
    let mut server = nats(port, &dir);
    until_listening(port).await;
    let url = format!("nats://127.0.0.1:{port}");
    let bus = JetStreamBus::connect(&url, "ORDERS", vec!["orders.>".into()])
        .await
        .unwrap();

    let pool = fresh_pool("outbox_nats", 10).await;
    let outbox = Outbox::new(pool.clone()).await.unwrap();
    let ids = write(&pool, "orders.created", 2000).await;
    let relay = outbox.relay(bus.clone()).batch(20);
    let relaying = tokio::spawn(async move { relay.run(Duration::from_millis(20)).await });

    let received: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let consuming = tokio::spawn(consume(bus.context().clone(), received.clone()));
    let count = || received.lock().unwrap().len();
    // Killed once a quarter is relayed: the rest is still in the outbox.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while outbox.pending().await.unwrap() > 1500 {
        assert!(std::time::Instant::now() < deadline, "the relay never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().await.unwrap();
    let pending_at_kill = outbox.pending().await.unwrap();
    server = nats(port, &dir);
    until_listening(port).await;
    wait_for("every message", || count() >= ids.len()).await;
    // The relay deletes a batch once the bus has acknowledged it: the last may
    // still be on its way out when the consumer has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while outbox.pending().await.unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relaying.abort();
    consuming.abort();
    server.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let received = received.lock().unwrap();
    assert!(
        pending_at_kill > 0,
        "the server was killed after the relay had finished"
    );
    for id in &ids {
        assert!(received.contains_key(id), "message {id} was lost");
    }
    assert_eq!(received.len(), ids.len(), "a message nobody sent arrived");
}
