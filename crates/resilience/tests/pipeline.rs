//! The pipeline builder composes the stages in the documented order whatever order
//! they are set in, and flattens every refusal into one `PolicyError`. Each test
//! pins one consequence of the order, so a wrong order fails one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, State};
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
use palisade_resilience::clock::TokioClock;
use palisade_resilience::layer::fallback::FallbackLayer;
use palisade_resilience::layer::pipeline::{PipelineBuilder, PolicyError};
use palisade_resilience::ratelimit::{Quota, RateLimiter};
use palisade_resilience::retry::{Backoff, RetryAction, RetryPolicy};
use tokio::sync::Notify;
use tower::{Service, ServiceExt, service_fn};

/// A service that fails its first `fail_first` calls (after `delay`), then answers
/// with its input; counts calls.
fn flaky(
    calls: &Arc<AtomicU32>,
    fail_first: u32,
    delay: Duration,
) -> impl Service<u32, Response = u32, Error = &'static str, Future: Send> + Clone + use<> {
    let calls = calls.clone();
    service_fn(move |x: u32| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            if n < fail_first { Err("boom") } else { Ok(x) }
        }
    })
}

fn breaker(consecutive: u32) -> CircuitBreaker {
    CircuitBreaker::builder("pipeline")
        .config(
            BreakerConfig::empty()
                .consecutive_failures(consecutive)
                .half_open(1, 1),
        )
        .clock(TokioClock::new())
        .build()
        .unwrap()
}

fn retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(attempts).backoff(Backoff::Fixed(Duration::from_millis(10)))
}

#[tokio::test(start_paused = true)]
async fn nothing_configured_is_a_pass_through() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = PipelineBuilder::new().build(flaky(&calls, 1, Duration::ZERO));
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(matches!(err, PolicyError::Inner("boom")), "{err:?}");
    assert_eq!(err.cause().as_str(), "upstream");
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_is_outside_the_breaker_and_stops_at_its_refusal() {
    let calls = Arc::new(AtomicU32::new(0));
    let b = breaker(2);
    // Set in the "wrong" order on purpose: the builder owns the order.
    let svc = PipelineBuilder::new()
        .breaker(b.clone())
        .retry(retry(5))
        .build(flaky(&calls, 100, Duration::ZERO));
    let err = svc.oneshot(1).await.unwrap_err();
    // Two attempts fail and open the breaker; the third attempt is refused without
    // reaching the service, and a refusal is not retried.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(matches!(err, PolicyError::CircuitOpen(_)), "{err:?}");
    assert!(err.is_refusal());
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().window.failures, 2, "each attempt judged by the breaker");
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_succeeds_returns_the_answer() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = PipelineBuilder::new()
        .retry(retry(3))
        .breaker(breaker(5))
        .build(flaky(&calls, 2, Duration::ZERO));
    assert_eq!(svc.oneshot(9).await.unwrap(), 9);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_is_inside_the_retry_so_every_attempt_spends_a_token() {
    let calls = Arc::new(AtomicU32::new(0));
    let limiter = RateLimiter::gcra(Quota::per_second(2).burst(2))
        .unwrap()
        .with_clock(TokioClock::new());
    let b = breaker(100);
    let svc = PipelineBuilder::new()
        .rate_limit(limiter)
        .retry(retry(5))
        .breaker(b.clone())
        .build(flaky(&calls, 100, Duration::ZERO));
    let err = svc.oneshot(1).await.unwrap_err();
    // Two tokens, two attempts; the third is refused by the limiter and not retried.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(matches!(err, PolicyError::RateLimited(_)), "{err:?}");
    assert!(err.retry_after().is_some());
    assert_eq!(
        b.stats().window.failures,
        2,
        "the limiter's refusal is not the dependency's failure"
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_refuses_at_once_and_is_not_a_failure() {
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let held = service_fn(move |x: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        let r = r.clone();
        async move {
            r.notified().await;
            Ok::<_, &'static str>(x)
        }
    });
    let b = breaker(1);
    let bulkhead = Bulkhead::new(
        "one",
        BulkheadConfig {
            max_concurrent: 1,
            max_wait: Duration::ZERO,
        },
    )
    .unwrap();
    let svc = PipelineBuilder::new()
        .bulkhead(bulkhead)
        .breaker(b.clone())
        .retry(retry(3))
        .build(held);
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let err = svc.clone().oneshot(2).await.unwrap_err();
    assert!(matches!(err, PolicyError::BulkheadFull(_)), "{err:?}");
    assert_eq!(err.cause(), palisade_resilience::Cause::BulkheadFull);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "refused, not retried, not called"
    );
    assert_eq!(b.state(), State::Closed, "a breaker of one failure stays closed");
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeouts_are_failures_and_retried_within_the_total_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let b = breaker(100);
    let svc = PipelineBuilder::new()
        .total_timeout(Duration::from_millis(250))
        .attempt_timeout(Duration::from_millis(100))
        .retry(retry(10))
        .breaker(b.clone())
        .build(flaky(&calls, 0, Duration::from_secs(5)));
    let start = tokio::time::Instant::now();
    let err = svc.oneshot(1).await.unwrap_err();
    // Attempts at 0 and 110 ms are cut at 100 ms each; the third starts at 220 ms and
    // is cut by the total deadline at 250 ms, which is not retried.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    match err {
        PolicyError::Timeout(e) => assert!(e.by_deadline, "the attempt was cut at the deadline"),
        other => panic!("{other:?}"),
    }
    assert_eq!(tokio::time::Instant::now() - start, Duration::from_millis(250));
    assert_eq!(b.stats().window.failures, 3, "every attempt's timeout counted");
}

#[tokio::test(start_paused = true)]
async fn fallback_is_outermost_and_answers_refusals_too() {
    let calls = Arc::new(AtomicU32::new(0));
    let b = breaker(1);
    let svc = PipelineBuilder::new()
        .breaker(b.clone())
        .fallback(FallbackLayer::from_fn(|e: PolicyError<&'static str>| {
            Ok::<u32, _>(match e {
                PolicyError::Inner(_) => 1000,
                PolicyError::CircuitOpen(_) => 2000,
                _ => 3000,
            })
        }))
        .build(flaky(&calls, 100, Duration::ZERO));
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1000);
    assert_eq!(svc.oneshot(1).await.unwrap(), 2000);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn custom_retry_predicate_and_classifier_replace_the_defaults() {
    let calls = Arc::new(AtomicU32::new(0));
    let b = breaker(1);
    // Treat the service's error as a success for the breaker and never retry it.
    let svc = PipelineBuilder::new()
        .retry(retry(5))
        .breaker(b.clone())
        .classify(|_: Result<&u32, &PolicyError<&'static str>>| {
            palisade_resilience::breaker::Outcome::Success
        })
        .retry_if(|_: Result<&u32, &PolicyError<&'static str>>| RetryAction::Return)
        .build(flaky(&calls, 100, Duration::ZERO));
    let mut svc = svc;
    for _ in 0..3 {
        let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
        assert!(matches!(err, PolicyError::Inner(_)));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "no retries");
    assert_eq!(b.state(), State::Closed, "errors classified as successes");
}
