//! Circuit breaker: Palisade against tower-resilience, recloser and failsafe, in
//! one run. `cargo bench -p palisade-resilience --bench breaker`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker};
use palisade_resilience::layer::breaker::CircuitBreakerLayer;
use tower::{Layer, Service, service_fn};

mod common;
use common::{call, config, two_threads};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ok_service() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|x: u64| std::future::ready(Ok::<_, BoxError>(x)))
}

fn failing_service() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|_: u64| std::future::ready(Err::<u64, BoxError>("down".into())))
}

fn palisade() -> CircuitBreaker {
    CircuitBreaker::new("bench", BreakerConfig::default())
}

/// A breaker that lives as long as the program, as a `static` one would.
fn leaked() -> &'static CircuitBreaker {
    Box::leak(Box::new(palisade()))
}

fn tower_resilience<S>(
    svc: S,
    min_calls: usize,
) -> tower_resilience::circuitbreaker::CircuitBreaker<S, tower_resilience::circuitbreaker::DefaultClassifier>
{
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(min_calls)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap()
        .layer_fn(svc)
}

fn recloser(closed_len: usize) -> recloser::Recloser {
    recloser::Recloser::custom()
        .error_rate(0.5)
        .closed_len(closed_len)
        .open_wait(Duration::from_secs(3600))
        .build()
}

fn failsafe_breaker() -> impl failsafe::CircuitBreaker + Clone {
    use failsafe::{backoff, failure_policy};
    let policy = failure_policy::consecutive_failures(5, backoff::constant(Duration::from_secs(3600)));
    failsafe::Config::new().failure_policy(policy).build()
}

fn closed_one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/closed/1-thread");
    let mut bare = ok_service();
    g.bench_function("bare service (baseline)", |b| {
        b.iter(|| call(&mut bare, 1).unwrap())
    });

    let mut svc = CircuitBreakerLayer::new(palisade()).layer(ok_service());
    g.bench_function("palisade layer", |b| b.iter(|| call(&mut svc, 1).unwrap()));
    let mut svc = CircuitBreakerLayer::with_handle(leaked()).layer(ok_service());
    g.bench_function("palisade layer, static breaker", |b| {
        b.iter(|| call(&mut svc, 1).unwrap())
    });
    let mut tr = tower_resilience(ok_service(), 100);
    g.bench_function("tower-resilience layer", |b| b.iter(|| call(&mut tr, 1).unwrap()));

    let p = palisade();
    g.bench_function("palisade sync call", |b| {
        b.iter(|| p.call(|| Ok::<_, ()>(black_box(1))).unwrap())
    });
    g.bench_function("palisade permit", |b| {
        b.iter(|| p.try_acquire().unwrap().success())
    });
    let r = recloser(100);
    g.bench_function("recloser sync call", |b| {
        b.iter(|| r.call(|| Ok::<_, ()>(black_box(1))).unwrap())
    });
    let f = failsafe_breaker();
    g.bench_function("failsafe sync call", |b| {
        b.iter(|| failsafe::CircuitBreaker::call(&f, || Ok::<_, ()>(black_box(1))).unwrap())
    });
    g.finish();
}

fn closed_two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/closed/2-threads");
    let shared = palisade();
    g.bench_function(BenchmarkId::new("palisade layer", "shared breaker"), |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                || CircuitBreakerLayer::new(shared.clone()).layer(ok_service()),
                |svc| {
                    call(svc, 1).unwrap();
                },
            )
        })
    });
    let fixed = leaked();
    g.bench_function(
        BenchmarkId::new("palisade layer, static breaker", "shared breaker"),
        |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || CircuitBreakerLayer::with_handle(fixed).layer(ok_service()),
                    |svc| {
                        call(svc, 1).unwrap();
                    },
                )
            })
        },
    );
    let tr = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .unwrap();
    g.bench_function(
        BenchmarkId::new("tower-resilience layer", "shared breaker"),
        |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || tr.layer(ok_service()),
                    |svc| {
                        call(svc, 1).unwrap();
                    },
                )
            })
        },
    );
    g.bench_function(BenchmarkId::new("palisade sync call", "shared breaker"), |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                || shared.clone(),
                |p| {
                    p.call(|| Ok::<_, ()>(black_box(1))).unwrap();
                },
            )
        })
    });
    let r = std::sync::Arc::new(recloser(100));
    g.bench_function(BenchmarkId::new("recloser sync call", "shared breaker"), |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                || r.clone(),
                |r| {
                    r.call(|| Ok::<_, ()>(black_box(1))).unwrap();
                },
            )
        })
    });
    let f = failsafe_breaker();
    g.bench_function(BenchmarkId::new("failsafe sync call", "shared breaker"), |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                || f.clone(),
                |f| {
                    failsafe::CircuitBreaker::call(f, || Ok::<_, ()>(black_box(1))).unwrap();
                },
            )
        })
    });
    g.finish();
}

fn open_rejection(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/open/reject");
    let p = palisade();
    p.force_open();
    g.bench_function("palisade permit", |b| b.iter(|| p.try_acquire().unwrap_err()));
    let mut svc = CircuitBreakerLayer::new(p.clone()).layer(ok_service());
    g.bench_function("palisade layer", |b| b.iter(|| call(&mut svc, 1).unwrap_err()));

    let mut tr = tower_resilience(failing_service(), 2);
    // Its count window judges only once full (100 calls).
    for _ in 0..200 {
        let _ = call(&mut tr, 1);
    }
    assert!(tr.state_sync() == tower_resilience::circuitbreaker::CircuitState::Open);
    g.bench_function("tower-resilience layer", |b| {
        b.iter(|| call(&mut tr, 1).unwrap_err())
    });

    let r = recloser(2);
    for _ in 0..10 {
        let _ = r.call(|| Err::<(), _>(()));
    }
    g.bench_function("recloser sync call", |b| {
        b.iter(|| matches!(r.call(|| Ok::<_, ()>(1)), Err(recloser::Error::Rejected)))
    });
    let f = failsafe_breaker();
    for _ in 0..10 {
        let _ = failsafe::CircuitBreaker::call(&f, || Err::<(), _>(()));
    }
    g.bench_function("failsafe sync call", |b| {
        b.iter(|| {
            matches!(
                failsafe::CircuitBreaker::call(&f, || Ok::<_, ()>(1)),
                Err(failsafe::Error::Rejected)
            )
        })
    });
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = closed_one_thread, closed_two_threads, open_rejection }
criterion_main!(benches);
