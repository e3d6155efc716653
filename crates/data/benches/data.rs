//! The data layer against raw sqlx, in one run: `cargo bench -p palisade-data`
//! (the groups that talk to servers need scripts/services.sh's
//! `start_postgres_data`; `bench/data.sh` starts them and runs everything).
//!
//! - `shard_of`: a key to its shard, for each placement (4 shards).
//! - `router_own_work`: a read through `ReplicaSet::read` whose query answers at
//!   once without I/O: the router's own work per read (pick, breaker, counters).
//! - `read_select_1`: `SELECT 1` on a replica by raw sqlx on a pool, and through
//!   `ReplicaSet::read` on the same replicas (end to end).
//! - `read_throughput`: 2,000 point reads by 32 tasks, on the primary alone and
//!   spread over two replicas by the router.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_data::{Placement, ReadBalance, ReplicaSet, ReplicaSetConfig, ShardMap};
use sqlx::PgPool;

fn shard_of(c: &mut Criterion) {
    let names: Vec<String> = (0..4).map(|i| format!("shard{i}")).collect();
    let ranges: Vec<palisade_data::KeyRange> = ["", "4", "8", "c", ""]
        .windows(2)
        .enumerate()
        .map(|(i, w)| palisade_data::KeyRange {
            from: w[0].into(),
            to: w[1].into(),
            shard: names[i].clone(),
        })
        .collect();
    let keys: Vec<String> = (0..1024).map(|i| format!("user:{}", 100_000 + i)).collect();
    let mut g = c.benchmark_group("shard_of");
    for placement in [
        Placement::Ring,
        Placement::Jump,
        Placement::Rendezvous,
        Placement::Ranges,
    ] {
        let r: &[palisade_data::KeyRange] = if placement == Placement::Ranges {
            &ranges
        } else {
            &[]
        };
        let map = ShardMap::new(&names, placement, 150, r).unwrap();
        let mut i = 0;
        g.bench_function(format!("{placement:?}").to_lowercase(), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(map.shard_of(black_box(keys[i].as_bytes())))
            })
        });
    }
    g.finish();
}

struct Servers {
    primary: String,
    replicas: Vec<String>,
}

fn servers() -> Option<Servers> {
    let primary = std::env::var("PALISADE_TEST_PG_PRIMARY_URL").ok()?;
    let replicas = std::env::var("PALISADE_TEST_PG_REPLICA_URLS").ok()?;
    Some(Servers {
        primary,
        replicas: replicas.split(',').map(str::to_string).collect(),
    })
}

fn replicated(c: &mut Criterion) {
    let Some(servers) = servers() else {
        eprintln!("router benches: PALISADE_TEST_PG_PRIMARY_URL not set (bench/data.sh sets it); skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = ReplicaSetConfig {
        primary: servers.primary.clone(),
        replicas: servers.replicas.clone(),
        balance: ReadBalance::LeastRequest,
        ..ReplicaSetConfig::default()
    };
    let set = rt.block_on(ReplicaSet::connect(config)).unwrap();
    // The raw pool: the first replica, sized as the router's pools are.
    let raw: PgPool = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(10)
                .connect(&servers.replicas[0]),
        )
        .unwrap();
    rt.block_on(async {
        set.read(|pool| async move { sqlx::query("SELECT 1").execute(&pool).await })
            .await
            .unwrap()
    });
    own_work(c, &rt, &set);
    select_1(c, &rt, &set, &raw);
    throughput(c, &rt, &servers, &set);
}

/// The router's own work per read, beside the harness's.
fn own_work(c: &mut Criterion, rt: &tokio::runtime::Runtime, set: &ReplicaSet) {
    let mut g = c.benchmark_group("router_own_work");
    // The harness's own cost: a future that answers at once, awaited the same way.
    g.bench_function("ready future", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(async { Ok::<_, sqlx::Error>(1) }.await.unwrap()) })
    });
    g.bench_function("palisade read, no I/O", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(set.read(|_pool| async { Ok::<_, sqlx::Error>(1) }).await.unwrap()) })
    });
    g.finish();
}

/// `SELECT 1` by raw sqlx on a replica's pool and through the router.
fn select_1(c: &mut Criterion, rt: &tokio::runtime::Runtime, set: &ReplicaSet, raw: &PgPool) {
    let mut g = c.benchmark_group("read_select_1");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("sqlx", |b| {
        b.to_async(rt).iter(|| async {
            black_box(
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(raw)
                    .await
                    .unwrap(),
            )
        })
    });
    g.bench_function("palisade", |b| {
        b.to_async(rt).iter(|| async {
            black_box(
                set.read(
                    |pool| async move { sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool).await },
                )
                .await
                .unwrap(),
            )
        })
    });
    g.finish();
}

/// Point reads by 32 tasks on the primary alone and on two replicas.
fn throughput(c: &mut Criterion, rt: &tokio::runtime::Runtime, servers: &Servers, set: &ReplicaSet) {
    let primary_only = rt
        .block_on(ReplicaSet::connect(ReplicaSetConfig {
            name: "primary-only".into(),
            primary: servers.primary.clone(),
            ..ReplicaSetConfig::default()
        }))
        .unwrap();
    let mut g = c.benchmark_group("read_throughput");
    g.sample_size(10);
    for (name, target) in [("primary alone", &primary_only), ("2 replicas", set)] {
        g.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| async move {
                let start = Instant::now();
                for _ in 0..iters {
                    burst(target, 32, 2_000).await;
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// `reads` point reads of a catalogue row by `tasks` tasks at once.
async fn burst(set: &ReplicaSet, tasks: usize, reads: usize) {
    let each = reads / tasks;
    let work = (0..tasks).map(|t| async move {
        for i in 0..each {
            let n = (t * each + i) as i32;
            set.read(|pool| async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT relname::text FROM pg_class ORDER BY oid OFFSET $1 LIMIT 1",
                )
                .bind(n % 100)
                .fetch_one(&pool)
                .await
            })
            .await
            .unwrap();
        }
    });
    futures_util::future::join_all(work).await;
}

criterion_group!(benches, shard_of, replicated);
criterion_main!(benches);
