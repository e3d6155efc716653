//! Retry and timeout layers, and the whole pipeline, on the happy path: Palisade against tower-resilience and
//! tower's own middleware, in one run, on a current-thread tokio runtime.
//! `cargo bench -p palisade-resilience --bench policies`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_resilience::breaker::CircuitBreaker;
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
use palisade_resilience::layer::pipeline::PipelineBuilder;
use palisade_resilience::layer::retry::RetryLayer;
use palisade_resilience::layer::timeout::TimeoutLayer;
use palisade_resilience::ratelimit::{Quota, RateLimiter};
use palisade_resilience::retry::{BudgetConfig, RetryBudget, RetryPolicy};
use palisade_resilience::timeout::{AdaptiveConfig, AdaptiveTimeout};
use tower::{Layer, Service, ServiceExt, service_fn};

mod common;
use common::{config, drive};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Debug)]
struct MyError;

fn ok_service() -> impl Service<u64, Response = u64, Error = MyError, Future: Send> + Clone + Send {
    service_fn(|x: u64| std::future::ready(Ok::<_, MyError>(x)))
}

/// A tower retry policy that never needs to retry here (the service always succeeds).
#[derive(Clone)]
struct TowerRetryErrors;

impl<E> tower::retry::Policy<u64, u64, E> for TowerRetryErrors {
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _: &mut u64, result: &mut Result<u64, E>) -> Option<Self::Future> {
        result.is_err().then(|| std::future::ready(()))
    }
    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

fn retry(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("retry/happy-path");
    g.bench_function("bare service (baseline)", |b| {
        b.iter_custom(|n| drive(&rt, ok_service(), n))
    });
    let palisade = RetryLayer::new(RetryPolicy::new(3).budget(RetryBudget::new(BudgetConfig::default())));
    g.bench_function("palisade layer (with budget)", |b| {
        b.iter_custom(|n| drive(&rt, palisade.layer(ok_service()), n))
    });
    let palisade_plain = RetryLayer::new(RetryPolicy::new(3));
    g.bench_function("palisade layer", |b| {
        b.iter_custom(|n| drive(&rt, palisade_plain.layer(ok_service()), n))
    });
    let tr = tower_resilience::retry::RetryLayer::<u64, u64, MyError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(50))
        .build();
    g.bench_function("tower-resilience layer", |b| {
        b.iter_custom(|n| drive(&rt, tr.layer(ok_service()), n))
    });
    let tw = tower::retry::RetryLayer::new(TowerRetryErrors);
    g.bench_function("tower retry layer", |b| {
        b.iter_custom(|n| drive(&rt, tw.layer(ok_service()), n))
    });
    g.finish();
}

fn timeout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("timeout/happy-path");
    g.bench_function("bare service (baseline)", |b| {
        b.iter_custom(|n| drive(&rt, ok_service(), n))
    });
    let fixed = TimeoutLayer::fixed(Duration::from_secs(1));
    g.bench_function("palisade fixed", |b| {
        b.iter_custom(|n| drive(&rt, fixed.layer(ok_service()), n))
    });
    let adaptive = TimeoutLayer::adaptive(std::sync::Arc::new(
        AdaptiveTimeout::new(AdaptiveConfig::default()).unwrap(),
    ));
    g.bench_function("palisade adaptive", |b| {
        b.iter_custom(|n| drive(&rt, adaptive.layer(ok_service()), n))
    });
    let tr = tower_resilience::timelimiter::TimeLimiterLayer::builder()
        .timeout_duration(Duration::from_secs(1))
        .build();
    g.bench_function("tower-resilience timelimiter", |b| {
        b.iter_custom(|n| drive(&rt, tr.layer(ok_service()), n))
    });
    let tw = tower::timeout::TimeoutLayer::new(Duration::from_secs(1));
    g.bench_function("tower timeout", |b| {
        b.iter_custom(|n| {
            drive(
                &rt,
                tw.layer(ok_service().map_err(|_| -> BoxError { "x".into() })),
                n,
            )
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let rt = common::runtime();
    let mut g = c.benchmark_group("pipeline/happy-path");
    g.bench_function("bare service (baseline)", |b| {
        b.iter_custom(|n| drive(&rt, ok_service(), n))
    });
    let off = PipelineBuilder::new();
    g.bench_function("palisade, every stage off", |b| {
        b.iter_custom(|n| drive(&rt, off.build(ok_service()), n))
    });
    let on = PipelineBuilder::new()
        .total_timeout(Duration::from_secs(2))
        .retry(RetryPolicy::new(3).budget(RetryBudget::new(BudgetConfig::default())))
        .breaker(CircuitBreaker::builder("bench").build().unwrap())
        .bulkhead(
            Bulkhead::new(
                "bench",
                BulkheadConfig {
                    max_concurrent: 64,
                    max_wait: Duration::ZERO,
                },
            )
            .unwrap(),
        )
        .attempt_timeout(Duration::from_secs(1))
        .rate_limit(RateLimiter::gcra(Quota::per_second(1_000_000_000)).unwrap());
    g.bench_function("palisade, every stage on", |b| {
        b.iter_custom(|n| drive(&rt, on.build(ok_service()), n))
    });
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = retry, timeout, pipeline }
criterion_main!(benches);
