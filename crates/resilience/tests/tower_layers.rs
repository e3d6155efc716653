//! tower contract tests: readiness, clone, rejection without waiting, drop of an
//! in-flight future, and the layers composed. Paused tokio time, no sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use palisade_resilience::breaker::{BreakerConfig, BreakerError, CircuitBreaker, State};
use palisade_resilience::clock::TokioClock;
use palisade_resilience::layer::breaker::{CircuitBreakerLayer, DefaultClassifier};
use palisade_resilience::layer::retry::RetryLayer;
use palisade_resilience::layer::timeout::{TimeoutError, TimeoutLayer};
use palisade_resilience::retry::{Backoff, BudgetConfig, RetryAction, RetryBudget, RetryPolicy};
use palisade_resilience::timeout::{AdaptiveConfig, AdaptiveTimeout, Deadline};
use tokio_test_helpers::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_test::{assert_request_eq, mock};

mod tokio_test_helpers {
    pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

    pub fn boom() -> BoxError {
        "boom".into()
    }
}

fn breaker(consecutive: u32) -> CircuitBreaker {
    CircuitBreaker::builder("svc")
        .config(
            BreakerConfig::empty()
                .consecutive_failures(consecutive)
                .half_open(1, 1),
        )
        .clock(TokioClock::new())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn breaker_readiness_is_the_inner_services() {
    let (svc, mut handle) = mock::pair::<&str, &str>();
    let mut svc = CircuitBreakerLayer::new(breaker(1)).layer(svc);
    handle.allow(0);
    assert!(futures::poll!(std::future::poll_fn(|cx| svc.poll_ready(cx))).is_pending());
    handle.allow(1);
    svc.ready().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_and_rejects_without_calling_or_waiting() {
    let (svc, mut handle) = mock::pair::<&str, &str>();
    let b = breaker(2);
    let mut svc = CircuitBreakerLayer::new(b.clone()).layer(svc);
    for _ in 0..2 {
        handle.allow(1);
        let fut = svc.ready().await.unwrap().call("req");
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(boom());
        assert!(matches!(fut.await, Err(BreakerError::Inner(_))));
    }
    assert_eq!(b.state(), State::Open);
    // The rejection is immediate: the future is ready on its first poll and the
    // inner service sees no request.
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call("req");
    let mut fut = std::pin::pin!(fut);
    match futures::poll!(fut.as_mut()) {
        std::task::Poll::Ready(Err(BreakerError::Rejected(r))) => {
            assert_eq!(r.state, State::Open);
            assert_eq!(r.retry_after, Some(Duration::from_secs(30)));
        }
        other => panic!("expected an immediate rejection, got {other:?}"),
    }
    assert!(
        futures::poll!(std::pin::pin!(handle.next_request())).is_pending(),
        "inner was not called"
    );
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let (svc, mut handle) = mock::pair::<&str, &str>();
    let b = breaker(2);
    let mut a = CircuitBreakerLayer::new(b.clone()).layer(svc);
    let mut c = a.clone();
    handle.allow(2);
    let f1 = a.ready().await.unwrap().call("1");
    let f2 = c.ready().await.unwrap().call("2");
    for _ in 0..2 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(boom());
    }
    let _ = (f1.await, f2.await);
    assert_eq!(
        b.state(),
        State::Open,
        "two failures through two clones trip one breaker"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_an_in_flight_probe_releases_it() {
    let b = breaker(1);
    probe_is_released_when_dropped(&b, CircuitBreakerLayer::new(b.clone())).await;
}

#[tokio::test(start_paused = true)]
async fn a_static_breaker_handle_trips_probes_and_releases_like_an_owned_one() {
    let b: &'static CircuitBreaker = Box::leak(Box::new(breaker(1)));
    probe_is_released_when_dropped(b, CircuitBreakerLayer::with_handle(b)).await;
}

/// Trips `b` through `layer`, then checks that a dropped in-flight probe frees its
/// slot and the next probe closes the breaker.
async fn probe_is_released_when_dropped<B>(
    b: &CircuitBreaker,
    layer: CircuitBreakerLayer<DefaultClassifier, B>,
) where
    B: AsRef<CircuitBreaker> + Clone,
{
    let (svc, mut handle) = mock::pair::<&str, &str>();
    let mut svc = layer.layer(svc);
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call("trip");
    handle.next_request().await.unwrap().1.send_error(boom());
    let _ = fut.await;
    tokio::time::advance(Duration::from_secs(30)).await;

    handle.allow(2);
    let probe = svc.ready().await.unwrap().call("probe");
    assert_eq!(b.stats().probes_in_flight, 1);
    let rejected = svc.ready().await.unwrap().call("second").await;
    assert!(
        matches!(rejected, Err(BreakerError::Rejected(_))),
        "one probe at a time"
    );
    drop(probe); // cancelled mid-flight
    assert_eq!(b.stats().probes_in_flight, 0);
    let fut = svc.ready().await.unwrap().call("probe again");
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, "probe");
    drop(send); // the dropped probe's request, never answered
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, "probe again");
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn retry_resends_until_success_with_backoff() {
    let (svc, mut handle) = mock::pair::<&str, &str>();
    let policy = RetryPolicy::new(3).backoff(Backoff::Fixed(Duration::from_millis(100)));
    let mut svc = RetryLayer::new(policy).layer(svc);
    handle.allow(3);
    let start = tokio::time::Instant::now();
    let fut = tokio::spawn(svc.ready().await.unwrap().call("req"));
    assert_request_eq!(handle, "req").send_error(boom());
    assert_request_eq!(handle, "req").send_error(boom());
    assert_request_eq!(handle, "req").send_response("third time");
    assert_eq!(fut.await.unwrap().unwrap(), "third time");
    assert_eq!(
        tokio::time::Instant::now() - start,
        Duration::from_millis(200),
        "two backoffs"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_gives_up_after_max_attempts_with_the_last_error() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_: ()| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { Err::<(), _>(format!("failure {n}")) }
    });
    let policy = RetryPolicy::new(4).backoff(Backoff::Fixed(Duration::from_millis(1)));
    let err = RetryLayer::new(policy).layer(svc).oneshot(()).await.unwrap_err();
    assert_eq!(err, "failure 3");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_honours_the_response_hint() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_: ()| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::convert::Infallible>(if n == 0 { 503 } else { 200 }) }
    });
    let layer = RetryLayer::new(RetryPolicy::new(2).backoff(Backoff::Fixed(Duration::from_millis(1))))
        .predicate(|r: Result<&u16, &std::convert::Infallible>| match r {
            Ok(503) => RetryAction::Retry {
                after: Some(Duration::from_secs(3)),
            },
            _ => RetryAction::Return,
        });
    let start = tokio::time::Instant::now();
    assert_eq!(layer.layer(svc).oneshot(()).await.unwrap(), 200);
    assert_eq!(tokio::time::Instant::now() - start, Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn retry_budget_caps_retries_across_requests() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>("down") }
    });
    let budget = RetryBudget::with_clock(
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        },
        TokioClock::new(),
    );
    let policy = RetryPolicy::new(5)
        .backoff(Backoff::Fixed(Duration::from_millis(1)))
        .budget(budget);
    let svc = RetryLayer::new(policy).layer(svc);
    for _ in 0..50 {
        let _ = svc.clone().oneshot(()).await;
    }
    // 50 requests with a 20% budget: at most 10 retries, not 50 x 4 = 200.
    assert_eq!(calls.load(Ordering::SeqCst), 60);
}

#[tokio::test(start_paused = true)]
async fn fixed_timeout_cuts_off_and_publishes_its_deadline() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let svc = service_fn(move |_: ()| {
        *s.lock().unwrap() = Deadline::remaining();
        async { std::future::pending::<Result<(), std::convert::Infallible>>().await }
    });
    let err = TimeoutLayer::fixed(Duration::from_millis(250))
        .layer(svc)
        .oneshot(())
        .await
        .unwrap_err();
    match err {
        TimeoutError::Elapsed(e) => {
            assert_eq!(e.after, Duration::from_millis(250));
            assert!(!e.by_deadline);
        }
        TimeoutError::Inner(_) => panic!("expected a timeout"),
    }
    assert_eq!(*seen.lock().unwrap(), Some(Duration::from_millis(250)));
}

#[tokio::test(start_paused = true)]
async fn adaptive_timeout_layer_learns_latency() {
    let adaptive = Arc::new(
        AdaptiveTimeout::with_clock(
            AdaptiveConfig {
                min_samples: 10,
                min: Duration::from_millis(1),
                ..AdaptiveConfig::default()
            },
            TokioClock::new(),
        )
        .unwrap(),
    );
    let svc = service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok::<_, std::convert::Infallible>(())
    });
    let svc = TimeoutLayer::adaptive(adaptive.clone()).layer(svc);
    for _ in 0..20 {
        svc.clone().oneshot(()).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let t = adaptive.timeout();
    assert!(
        t >= Duration::from_millis(80) && t <= Duration::from_millis(90),
        "p95 40 ms x 2: {t:?}"
    );
}

/// The documented stack: timeout(total) > retry > breaker > timeout(attempt).
#[tokio::test(start_paused = true)]
async fn composed_stack_stops_retrying_at_the_total_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let slow_failing = service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err::<(), BoxError>(boom())
        }
    });
    let b = CircuitBreaker::builder("composed")
        .config(BreakerConfig::empty().consecutive_failures(100))
        .clock(TokioClock::new())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::fixed(Duration::from_secs(1)))
        .layer(RetryLayer::new(
            RetryPolicy::new(10)
                .backoff(Backoff::Fixed(Duration::from_millis(50)))
                .min_attempt_time(Duration::from_millis(100)),
        ))
        .layer(CircuitBreakerLayer::new(b.clone()))
        .layer(TimeoutLayer::fixed(Duration::from_millis(200)))
        .service(slow_failing);
    let start = tokio::time::Instant::now();
    let err = svc.oneshot(()).await.unwrap_err();
    // Attempts: [0,200) cut off; [250,450); [500,700); [750,950); after that only
    // 0 ms would remain after the backoff: no fourth retry starts, the last error returns.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(
        matches!(
            err,
            TimeoutError::Inner(BreakerError::Inner(TimeoutError::Elapsed(_)))
        ),
        "{err:?}"
    );
    assert_eq!(tokio::time::Instant::now() - start, Duration::from_millis(950));
    assert_eq!(
        b.stats().window.failures,
        4,
        "each attempt's timeout counted by the breaker"
    );
}
