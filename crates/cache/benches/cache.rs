//! The cache against the crates it is built from, in one run:
//! `cargo bench -p palisade-cache` (the L2 groups need `PALISADE_TEST_REDIS_URL`;
//! `bench/cache.sh` starts a throwaway Redis and runs them all).
//!
//! - `l1_hit`: a hit through `Cache::get_or_load` against a raw `quick_cache` and a
//!   raw `moka` `get` of the same value (the L1 choice), and the floor of any cache
//!   with expiry on `quick_cache` (`quick_cache+ttl`: the raw `get` and one clock
//!   read).
//! - `l2_hit`: a hit in Redis (L1 expired) against a hand-written redis-rs `GET` and
//!   decode, one at a time and 100 at once on one connection (pipelined).
//! - `encoding`: encode and decode of one record in postcard, MessagePack and JSON
//!   (the L2 format choice).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use palisade_cache::{Cache, RedisOptions};
use serde::{Deserialize, Serialize};

/// A typical cached record: a product row.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Product {
    id: u64,
    name: String,
    price_cents: u32,
    stock: i32,
    tags: Vec<String>,
}

fn product(id: u64) -> Product {
    Product {
        id,
        name: format!("Stainless kettle, 1.7 l, model {id}"),
        price_cents: 3_999,
        stock: 120,
        tags: vec!["kitchen".into(), "electric".into(), "sale".into()],
    }
}

const KEYS: u64 = 1_000;

fn key(i: u64) -> String {
    format!("product:{i}")
}

fn never() -> std::future::Ready<Result<Option<Arc<Product>>, std::io::Error>> {
    std::future::ready(Err(std::io::Error::other("a hit must not load")))
}

fn l1_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let values: Vec<Arc<Product>> = (0..KEYS).map(|i| Arc::new(product(i))).collect();
    let keys: Vec<String> = (0..KEYS).map(key).collect();

    let quick = quick_cache::sync::Cache::<String, Arc<Product>>::new(10_000);
    let moka = moka::sync::Cache::<String, Arc<Product>>::new(10_000);
    let cache: Cache<Arc<Product>> = Cache::builder("bench")
        .ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    for (k, v) in keys.iter().zip(&values) {
        quick.insert(k.clone(), v.clone());
        moka.insert(k.clone(), v.clone());
        rt.block_on(cache.set(k, v.clone())).unwrap();
    }

    // The floor of a cache with expiry on quick_cache: the entry carries its
    // time and one clock read judges it.
    let clock = palisade_core::SystemClock;
    let timed = quick_cache::sync::Cache::<String, (Arc<Product>, u64)>::new(10_000);
    let until = palisade_core::Clock::now(&clock).as_nanos() + 3_600_000_000_000;
    for (k, v) in keys.iter().zip(&values) {
        timed.insert(k.clone(), (v.clone(), until));
    }

    let mut g = c.benchmark_group("l1_hit");
    let mut i = 0usize;
    let mut next = || {
        i = (i + 1) % keys.len();
        keys[i].as_str()
    };
    g.bench_function("quick_cache", |b| b.iter(|| black_box(quick.get(next()))));
    g.bench_function("quick_cache+ttl", |b| {
        b.iter(|| {
            let now = palisade_core::Clock::now(&clock).as_nanos();
            black_box(
                timed
                    .get(next())
                    .filter(|(_, until)| now < *until)
                    .map(|(v, _)| v),
            )
        })
    });
    g.bench_function("moka", |b| b.iter(|| black_box(moka.get(next()))));
    g.bench_function("clock", |b| {
        b.iter(|| black_box(palisade_core::Clock::now(&clock)))
    });
    g.bench_function("palisade_get", |b| {
        b.iter(|| black_box(cache.get(next()).now_or_never()))
    });
    g.bench_function("palisade", |b| {
        b.iter(|| black_box(cache.get_or_load(next(), never).now_or_never()))
    });
    g.finish();
}

fn l2_hit(c: &mut Criterion) {
    let Ok(url) = std::env::var("PALISADE_TEST_REDIS_URL") else {
        eprintln!("l2_hit: PALISADE_TEST_REDIS_URL not set (bench/cache.sh sets it); skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("palisade:bench:{:x}:", fastrand::u64(..));
    let mut options = RedisOptions::new(url.clone());
    options.prefix = Some(prefix.clone());
    // L1 entries expire at once: every lookup is an L2 hit (and refills L1, as it would).
    let cache: Cache<Product> = rt.block_on(async {
        Cache::builder("bench")
            .ttl(Duration::from_secs(3600))
            .l1_ttl(Duration::from_nanos(1))
            .early_refresh(None)
            .redis(options)
            .build()
            .unwrap()
    });
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            cache.set(k, product(i as u64)).await.unwrap();
        }
    });
    let raw = rt.block_on(async {
        redis::Client::open(format!("{url}/?protocol=resp3").as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let raw_keys: Vec<String> = keys.iter().map(|k| format!("{prefix}{{{k}}}")).collect();
    // The hand-written baseline reads the same bytes: skip the 14-byte header, decode.
    async fn raw_get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Product {
        let bytes: Vec<u8> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
        postcard::from_bytes(&bytes[14..]).unwrap()
    }
    let never = || {
        std::future::ready(Err::<Option<Product>, _>(std::io::Error::other(
            "a hit must not load",
        )))
    };

    let mut g = c.benchmark_group("l2_hit");
    g.measurement_time(Duration::from_secs(4));
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("redis-rs GET + decode", 1), |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % raw_keys.len();
            let (mut conn, key) = (raw.clone(), raw_keys[i].clone());
            async move { black_box(raw_get(&mut conn, &key).await) }
        })
    });
    g.bench_function(BenchmarkId::new("palisade", 1), |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (cache, key) = (&cache, keys[i].as_str());
            async move { black_box(cache.get_or_load(key, never).await.unwrap()) }
        })
    });
    g.bench_function(BenchmarkId::new("redis-rs GET + decode", 100), |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 100) % raw_keys.len();
            let start = i;
            let (conn, keys) = (raw.clone(), &raw_keys);
            async move {
                let gets = (0..100).map(|j| {
                    let mut conn = conn.clone();
                    let key = &keys[(start + j) % keys.len()];
                    async move { raw_get(&mut conn, key).await }
                });
                black_box(futures::future::join_all(gets).await)
            }
        })
    });
    g.bench_function(BenchmarkId::new("palisade", 100), |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 100) % keys.len();
            let start = i;
            let (cache, keys) = (&cache, &keys);
            async move {
                let gets = (0..100).map(|j| cache.get_or_load(&keys[(start + j) % keys.len()], never));
                black_box(futures::future::join_all(gets).await)
            }
        })
    });
    g.finish();
}

fn encoding(c: &mut Criterion) {
    let p = product(42);
    let mut g = c.benchmark_group("encoding");
    let post = postcard::to_allocvec(&p).unwrap();
    let mp = rmp_serde::to_vec(&p).unwrap();
    let json = serde_json::to_vec(&p).unwrap();
    eprintln!(
        "encoded sizes: postcard {} B, MessagePack {} B, JSON {} B",
        post.len(),
        mp.len(),
        json.len()
    );
    g.bench_function("postcard", |b| {
        b.iter(|| {
            let bytes = postcard::to_allocvec(black_box(&p)).unwrap();
            black_box(postcard::from_bytes::<Product>(&bytes).unwrap())
        })
    });
    g.bench_function("messagepack", |b| {
        b.iter(|| {
            let bytes = rmp_serde::to_vec(black_box(&p)).unwrap();
            black_box(rmp_serde::from_slice::<Product>(&bytes).unwrap())
        })
    });
    g.bench_function("json", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&p)).unwrap();
            black_box(serde_json::from_slice::<Product>(&bytes).unwrap())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = l1_hit, l2_hit, encoding
}
criterion_main!(benches);
