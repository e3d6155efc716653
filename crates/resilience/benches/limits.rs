//! Rate limiters and bulkheads: Palisade against governor, tower-resilience and
//! tower, in one run. `cargo bench -p palisade-resilience --bench limits`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
use palisade_resilience::clock::{Clock, SharedClock, SystemClock};
use palisade_resilience::layer::bulkhead::BulkheadLayer;
use palisade_resilience::layer::ratelimit::RateLimitLayer;
use palisade_resilience::ratelimit::{Gcra, KeyedRateLimiter, Quota, RateLimiter};
use tower::{Layer, Service, service_fn};

mod common;
use common::{config, drive, runtime, two_threads};

#[derive(Clone, Debug)]
struct MyError;

fn ok_service() -> impl Service<u64, Response = u64, Error = MyError, Future: Send> + Clone + Send {
    service_fn(|x: u64| std::future::ready(Ok::<_, MyError>(x)))
}

/// A quota no benchmark exhausts: a billion per second with a billion of burst.
fn open_quota() -> Quota {
    Quota::per_second(1_000_000_000).burst(1_000_000_000)
}

fn governor_open() -> governor::Quota {
    let n = NonZeroU32::new(1_000_000_000).unwrap();
    governor::Quota::per_second(n).allow_burst(n)
}

/// One per hour, burst one: after the first call every check is refused.
fn closed_quota() -> Quota {
    Quota::new(1, Duration::from_secs(3600)).burst(1)
}

fn governor_closed() -> governor::Quota {
    governor::Quota::per_hour(NonZeroU32::new(1).unwrap())
}

const KEYS: u64 = 1024;
/// Each bench thread starts half the key space away from the other, so they
/// contend on shards by chance, not in lock-step on the same key.
static THREAD_START: AtomicU64 = AtomicU64::new(0);

fn clocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    let shared = SharedClock::system();
    g.bench_function("palisade SystemClock", |b| {
        b.iter(|| black_box(SystemClock.now()))
    });
    g.bench_function("palisade SharedClock::system", |b| {
        b.iter(|| black_box(shared.now()))
    });
    let q = quanta::Clock::new();
    g.bench_function("quanta Clock::now", |b| b.iter(|| black_box(q.now())));
    g.bench_function("std Instant::now", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    g.finish();
}

fn direct(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit/direct");
    let ours = RateLimiter::gcra(open_quota()).unwrap();
    g.bench_function("palisade gcra allow", |b| {
        b.iter(|| black_box(ours.check().is_ok()))
    });
    let gov = governor::RateLimiter::direct(governor_open());
    g.bench_function("governor allow", |b| b.iter(|| black_box(gov.check().is_ok())));
    let ours_closed = RateLimiter::gcra(closed_quota()).unwrap();
    let _ = ours_closed.check();
    g.bench_function("palisade gcra refuse", |b| {
        b.iter(|| black_box(ours_closed.check().is_err()))
    });
    let gov_closed = governor::RateLimiter::direct(governor_closed());
    let _ = gov_closed.check();
    g.bench_function("governor refuse", |b| {
        b.iter(|| black_box(gov_closed.check().is_err()))
    });
    g.bench_function("palisade gcra allow, 2 threads", |b| {
        b.iter_custom(|n| {
            two_threads(
                n,
                || (),
                |_| {
                    black_box(ours.check().is_ok());
                },
            )
        })
    });
    g.bench_function("governor allow, 2 threads", |b| {
        b.iter_custom(|n| {
            two_threads(
                n,
                || (),
                |_| {
                    black_box(gov.check().is_ok());
                },
            )
        })
    });
    g.finish();
}

fn keyed(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit/keyed");
    let ours = KeyedRateLimiter::new(Gcra::new(open_quota()).unwrap(), 100_000);
    let mut i = 0u64;
    g.bench_function("palisade 1024 keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(ours.check(&i).is_ok())
        })
    });
    let gov = governor::RateLimiter::keyed(governor_open());
    g.bench_function("governor 1024 keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov.check_key(&i).is_ok())
        })
    });
    g.bench_function("palisade 1024 keys, 2 threads", |b| {
        b.iter_custom(|n| {
            two_threads(
                n,
                || THREAD_START.fetch_add(KEYS / 2, Ordering::Relaxed) % KEYS,
                |k| {
                    *k = (*k + 7) % KEYS;
                    black_box(ours.check(k).is_ok());
                },
            )
        })
    });
    g.bench_function("governor 1024 keys, 2 threads", |b| {
        b.iter_custom(|n| {
            two_threads(
                n,
                || THREAD_START.fetch_add(KEYS / 2, Ordering::Relaxed) % KEYS,
                |k| {
                    *k = (*k + 7) % KEYS;
                    black_box(gov.check_key(k).is_ok());
                },
            )
        })
    });
    // A stream of keys never seen before: the cost of growth and self-pruning.
    let fresh = KeyedRateLimiter::new(Gcra::new(Quota::per_second(10)).unwrap(), 100_000);
    let mut next = 0u64;
    g.bench_function("palisade fresh keys (bounded at 100k)", |b| {
        b.iter(|| {
            next += 1;
            black_box(fresh.check(&next).is_ok())
        })
    });
    g.finish();
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("ratelimit/layer");
    g.bench_function("bare service (baseline)", |b| {
        b.iter_custom(|n| drive(&rt, ok_service(), n))
    });
    let ours = RateLimitLayer::new(RateLimiter::gcra(open_quota()).unwrap());
    g.bench_function("palisade layer", |b| {
        b.iter_custom(|n| drive(&rt, ours.layer(ok_service()), n))
    });
    let tr = tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(1_000_000_000)
        .refresh_period(Duration::from_secs(1))
        .build()
        .unwrap();
    g.bench_function("tower-resilience layer", |b| {
        b.iter_custom(|n| drive(&rt, tr.layer(ok_service()), n))
    });
    let tw = tower::limit::RateLimitLayer::new(1_000_000_000, Duration::from_secs(1));
    g.bench_function("tower rate limit", |b| {
        // tower's RateLimit makes its timer when built: build it inside the runtime.
        b.iter_custom(|n| {
            let _entered = rt.enter();
            drive(&rt, tw.layer(ok_service()), n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("bulkhead/layer");
    g.bench_function("bare service (baseline)", |b| {
        b.iter_custom(|n| drive(&rt, ok_service(), n))
    });
    let ours = BulkheadLayer::new(Bulkhead::new("bench", BulkheadConfig::new(64)).unwrap());
    g.bench_function("palisade layer", |b| {
        b.iter_custom(|n| drive(&rt, ours.layer(ok_service()), n))
    });
    let tr = tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(64)
        .reject_when_full()
        .build()
        .unwrap();
    g.bench_function("tower-resilience layer", |b| {
        b.iter_custom(|n| drive(&rt, tr.layer(ok_service()), n))
    });
    let tw = tower::limit::ConcurrencyLimitLayer::new(64);
    g.bench_function("tower concurrency limit", |b| {
        b.iter_custom(|n| drive(&rt, tw.layer(ok_service()), n))
    });
    let core = Bulkhead::new("bench", BulkheadConfig::new(64)).unwrap();
    g.bench_function("palisade core try_acquire + drop", |b| {
        b.iter(|| drop(black_box(core.try_acquire())))
    });
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = clocks, direct, keyed, layers }
criterion_main!(benches);
