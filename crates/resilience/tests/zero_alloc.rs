//! Zero heap allocations per call on the happy path, proven with a counting
//! allocator (`allocation-counter`: per thread, so other threads do not interfere).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker};
use palisade_resilience::layer::breaker::CircuitBreakerLayer;
use palisade_resilience::layer::retry::RetryLayer;
use palisade_resilience::layer::timeout::TimeoutLayer;
use palisade_resilience::retry::{BudgetConfig, RetryBudget, RetryPolicy};
use palisade_resilience::window::WindowConfig;
use tower::{Layer, Service, service_fn};

/// Heap allocations made by this thread while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    allocation_counter::measure(f).count_total
}

#[test]
fn the_counter_counts() {
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(Box::new(1u64)))),
        1
    );
}

/// Polls a future that must be ready at once (the services here never wait).
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected a ready future"),
    }
}

fn call<S: Service<u64>>(svc: &mut S) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    now_or_never(svc.call(1))
}

fn ok_service() -> impl Service<u64, Response = u64, Error = std::io::Error, Future: Send> + Clone {
    service_fn(|x: u64| std::future::ready(Ok::<_, std::io::Error>(x)))
}

#[test]
fn breaker_sync_and_permit_api_allocate_nothing() {
    for window in [
        WindowConfig::Count { size: 100 },
        WindowConfig::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        },
    ] {
        let b = CircuitBreaker::new(
            "alloc",
            BreakerConfig::default()
                .window(window)
                .slow_calls(Duration::from_secs(1), 0.5, 10),
        );
        b.call(|| Ok::<_, ()>(())).unwrap(); // warm-up (the clock's origin, etc.)
        let n = allocations_during(|| {
            for _ in 0..10_000 {
                b.call(|| Ok::<_, ()>(())).unwrap();
                b.try_acquire().unwrap().success();
            }
        });
        assert_eq!(n, 0, "{window:?}");
    }
}

#[test]
fn breaker_layer_allocates_nothing_per_call() {
    let b = CircuitBreaker::new("alloc", BreakerConfig::default());
    let owned = CircuitBreakerLayer::new(b.clone()).layer(ok_service());
    let fixed: &'static CircuitBreaker = Box::leak(Box::new(b));
    let by_ref = CircuitBreakerLayer::with_handle(fixed).layer(ok_service());
    assert_layer_allocates_nothing(owned);
    assert_layer_allocates_nothing(by_ref);
}

fn assert_layer_allocates_nothing<S: Service<u64>>(mut svc: S)
where
    S::Error: std::fmt::Debug,
{
    call(&mut svc).unwrap();
    let n = allocations_during(|| {
        for _ in 0..10_000 {
            call(&mut svc).unwrap();
        }
    });
    assert_eq!(n, 0);
}

/// Calls `svc` 10 000 times (after one warm-up call) inside a current-thread
/// runtime and asserts that no call allocated.
fn assert_no_allocations_in_runtime<S: Service<u64>>(mut svc: S)
where
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    call(&mut svc).unwrap();
    let n = allocations_during(|| {
        for _ in 0..10_000 {
            call(&mut svc).unwrap();
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn retry_layer_allocates_nothing_when_the_first_attempt_succeeds() {
    let budget = RetryBudget::new(BudgetConfig::default());
    assert_no_allocations_in_runtime(RetryLayer::new(RetryPolicy::new(3).budget(budget)).layer(ok_service()));
}

#[test]
fn timeout_layer_allocates_nothing_per_call() {
    assert_no_allocations_in_runtime(TimeoutLayer::fixed(Duration::from_secs(1)).layer(ok_service()));
}
