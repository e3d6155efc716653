//! The consistency tools' costs against the round trips they are made of:
//! `cargo bench -p palisade-flow` with `PALISADE_TEST_POSTGRES_URL` and
//! `PALISADE_TEST_REDIS_URL` set (`bench/consistency.sh` starts both servers).
//!
//! - `idempotency`: a request with a new key (claim, then store the answer) and a
//!   repeat (one lookup), on each store, beside the store's bare round trip.
//! - `event_append`: 1,000 appends of one event, to one stream one after another,
//!   and to 1,000 streams by 16 tasks at once.
//! - `projection`: a rebuild of a projection over 10,000 events.
//! - `outbox_relay`: 1,000 messages relayed from the outbox, to the in-process bus
//!   and to NATS JetStream (`PALISADE_TEST_NATS_URL`), in batches of 100.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use palisade_flow::events::{EventStore, Expected, NewEvent, Projection, Projector, RecordedEvent};
use palisade_flow::idempotency::fingerprint;
use palisade_flow::outbox::{InProcessBus, JetStreamBus, Message, Outbox};
use palisade_flow::{Idempotency, IdempotencyConfig, IdempotencyStore, PgStore, RedisStore, Stored};
use sqlx::{Connection, Executor, PgConnection, PgPool};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn fresh_pool(admin: &str) -> PgPool {
    let name = format!("bench_{:x}", fastrand::u64(..));
    let mut conn = PgConnection::connect(admin).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&format!("{base}/{name}"))
        .await
        .unwrap()
}

fn answer() -> Stored {
    Stored {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Bytes::from_static(b"{\"id\":42,\"status\":\"paid\"}"),
    }
}

fn bench_store<S: IdempotencyStore>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: S) {
    let idem = Idempotency::new(store, IdempotencyConfig::default());
    let fp = fingerprint([&b"POST /payments"[..], b"{\"amount\":1000}"]);
    let mut g = c.benchmark_group("idempotency");
    let mut n = 0u64;
    g.bench_function(format!("{name}: new key"), |b| {
        b.to_async(rt).iter(|| {
            n += 1;
            let (idem, key) = (&idem, format!("k{n}:{:x}", fastrand::u64(..)));
            async move {
                black_box(
                    idem.run(&key, &fp, || async { Ok::<_, ()>(answer()) })
                        .await
                        .unwrap(),
                )
            }
        })
    });
    rt.block_on(idem.run("repeat", &fp, || async { Ok::<_, ()>(answer()) }))
        .unwrap();
    g.bench_function(format!("{name}: repeat"), |b| {
        b.to_async(rt).iter(|| async {
            black_box(
                idem.run("repeat", &fp, || async { Ok::<_, ()>(answer()) })
                    .await
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn idempotency(c: &mut Criterion) {
    let (Ok(pg), Ok(redis_url)) = (
        std::env::var("PALISADE_TEST_POSTGRES_URL"),
        std::env::var("PALISADE_TEST_REDIS_URL"),
    ) else {
        eprintln!("idempotency: the servers' URLs are not set (bench/consistency.sh sets them); skipped");
        return;
    };
    let rt = runtime();
    let pool = rt.block_on(fresh_pool(&pg));
    let pg_store = rt.block_on(PgStore::new(pool.clone())).unwrap();
    let prefix = format!("bench:{:x}:", fastrand::u64(..));
    let redis_store = rt
        .block_on(RedisStore::connect(&redis_url, Some(&prefix)))
        .unwrap();
    let mut raw = rt
        .block_on(
            redis::Client::open(redis_url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .unwrap();
    let mut g = c.benchmark_group("idempotency");
    g.bench_function("PostgreSQL: SELECT 1", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(sqlx::query("SELECT 1").execute(&pool).await.unwrap()) })
    });
    g.bench_function("Redis: PING", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            async move { black_box(redis::cmd("PING").query_async::<String>(&mut conn).await.unwrap()) }
        })
    });
    g.finish();
    let _ = &mut raw;
    bench_store(c, &rt, "PostgreSQL", pg_store);
    bench_store(c, &rt, "Redis", redis_store);
}

fn deposit(i: i64) -> NewEvent {
    NewEvent::new("Deposited", &serde_json::json!({ "amount": i })).unwrap()
}

fn events(c: &mut Criterion) {
    let Ok(pg) = std::env::var("PALISADE_TEST_POSTGRES_URL") else {
        eprintln!("events: PALISADE_TEST_POSTGRES_URL not set; skipped");
        return;
    };
    let rt = runtime();
    let store = rt.block_on(async { EventStore::new(fresh_pool(&pg).await).await.unwrap() });
    let mut g = c.benchmark_group("event_append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    let mut round = 0u64;
    g.bench_function("1,000 to one stream, in turn", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            round += 1;
            let (store, stream) = (store.clone(), format!("one-{round}"));
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    for i in 0..1000 {
                        store.append(&stream, Expected::Any, &[deposit(i)]).await.unwrap();
                    }
                }
                start.elapsed()
            }
        })
    });
    g.bench_function("1,000 to 1,000 streams, 16 tasks", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks = (0..16).map(|t| {
                        let store = store.clone();
                        async move {
                            for i in 0..62 {
                                let stream = format!("many-{t}-{i}-{:x}", fastrand::u32(..));
                                store
                                    .append(&stream, Expected::NoStream, &[deposit(i)])
                                    .await
                                    .unwrap();
                            }
                        }
                    });
                    futures_util::future::join_all(tasks).await;
                }
                start.elapsed()
            }
        })
    });
    g.finish();
    projection(c, &rt, &pg);
}

/// A read model that counts events per stream.
struct Counts;

impl Projection for Counts {
    fn name(&self) -> &str {
        "counts"
    }

    fn apply<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        event: &'c RecordedEvent,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO counts VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = counts.n + 1",
            )
            .bind(&event.stream)
            .execute(conn)
            .await
            .map(drop)
        })
    }

    fn reset<'c>(&'c self, conn: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::query("TRUNCATE counts").execute(conn).await.map(drop) })
    }
}

fn projection(c: &mut Criterion, rt: &tokio::runtime::Runtime, pg: &str) {
    let store = rt.block_on(async {
        let store = EventStore::new(fresh_pool(pg).await).await.unwrap();
        sqlx::query("CREATE TABLE counts (stream text PRIMARY KEY, n bigint NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
        for s in 0..100 {
            let batch: Vec<NewEvent> = (0..100).map(deposit).collect();
            store
                .append(&format!("s{s}"), Expected::NoStream, &batch)
                .await
                .unwrap();
        }
        store
    });
    let projector = Projector::new(store, Counts);
    let mut g = c.benchmark_group("projection");
    g.sample_size(10);
    g.bench_function("rebuild over 10,000 events", |b| {
        b.to_async(rt)
            .iter(|| async { assert_eq!(projector.rebuild().await.unwrap(), 10_000) })
    });
    g.finish();
}

fn outbox(c: &mut Criterion) {
    let Ok(pg) = std::env::var("PALISADE_TEST_POSTGRES_URL") else {
        eprintln!("outbox: PALISADE_TEST_POSTGRES_URL not set; skipped");
        return;
    };
    let rt = runtime();
    let pool = rt.block_on(fresh_pool(&pg));
    let outbox = rt.block_on(Outbox::new(pool.clone())).unwrap();
    let fill = |pool: PgPool| async move {
        let messages: Vec<Message> = (0..1000)
            .map(|i| Message::new("orders.created", format!("order {i}")))
            .collect();
        let mut tx = pool.begin().await.unwrap();
        Outbox::add_in(&mut tx, &messages).await.unwrap();
        tx.commit().await.unwrap();
    };
    let mut g = c.benchmark_group("outbox_relay");
    g.sample_size(10);
    let relay = outbox.relay(InProcessBus::new(2048)).batch(100);
    g.bench_function("1,000 messages, in-process bus", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (pool, relay) = (pool.clone(), &relay);
            async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    fill(pool.clone()).await;
                    let start = Instant::now();
                    while relay.relay_once().await.unwrap() > 0 {}
                    spent += start.elapsed();
                }
                spent
            }
        })
    });
    if let Ok(url) = std::env::var("PALISADE_TEST_NATS_URL") {
        let stream = format!("BENCH{:X}", fastrand::u32(..));
        let subject = format!("bench{:x}.>", fastrand::u32(..));
        let bus = rt
            .block_on(JetStreamBus::connect(&url, &stream, vec![subject.clone()]))
            .unwrap();
        let subject = subject.trim_end_matches(".>").to_string() + ".created";
        let relay = outbox.relay(bus).batch(100);
        g.bench_function("1,000 messages, NATS JetStream", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (pool, relay, subject) = (pool.clone(), &relay, subject.clone());
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let messages: Vec<Message> = (0..1000)
                            .map(|i| Message::new(subject.clone(), format!("order {i}")))
                            .collect();
                        let mut tx = pool.begin().await.unwrap();
                        Outbox::add_in(&mut tx, &messages).await.unwrap();
                        tx.commit().await.unwrap();
                        let start = Instant::now();
                        while relay.relay_once().await.unwrap() > 0 {}
                        spent += start.elapsed();
                    }
                    spent
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, idempotency, events, outbox);
criterion_main!(benches);
