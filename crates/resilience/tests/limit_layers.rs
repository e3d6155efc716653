//! tower contract tests of the admission layers (bulkhead, rate limit, load
//! shedding): a refused request never waits and never reaches the service; a
//! dropped response future gives its slot back; bounded waits are bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::FutureExt;
use palisade_resilience::ManualClock;
use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig, KeyedBulkhead};
use palisade_resilience::layer::admit::AdmitError;
use palisade_resilience::layer::bulkhead::{BulkheadLayer, ByKey};
use palisade_resilience::layer::ratelimit::RateLimitLayer;
use palisade_resilience::layer::shed::{AdaptiveConcurrencyLayer, TieredShedLayer};
use palisade_resilience::ratelimit::{Gcra, KeyedRateLimiter, Quota, RateLimiter};
use palisade_resilience::shed::{
    AdaptiveConcurrency, AdaptiveConfig, LoadGauge, Priority, TieredShedder, Tiers,
};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A service whose calls finish when the test says so; counts calls.
#[derive(Clone)]
struct Gate {
    calls: Arc<AtomicU32>,
    release: Arc<std::sync::Mutex<Vec<oneshot::Sender<()>>>>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            calls: Arc::default(),
            release: Arc::default(),
        }
    }

    fn service(
        &self,
    ) -> impl Service<u32, Response = u32, Error = &'static str, Future: Send> + Clone + use<> {
        let gate = self.clone();
        service_fn(move |x: u32| {
            gate.calls.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = oneshot::channel();
            gate.release.lock().unwrap().push(tx);
            async move {
                let _ = rx.await;
                Ok(x)
            }
        })
    }

    fn open_all(&self) {
        for tx in self.release.lock().unwrap().drain(..) {
            let _ = tx.send(());
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_refuses_at_once_and_a_dropped_call_frees_its_slot() {
    let gate = Gate::new();
    let bulkhead = Bulkhead::new("db", BulkheadConfig::new(2)).unwrap();
    let mut svc = BulkheadLayer::new(bulkhead.clone()).layer(gate.service());
    let a = svc.ready().await.unwrap().call(1);
    let b = svc.ready().await.unwrap().call(2);
    let refused = svc.ready().await.unwrap().call(3);
    let refused = refused
        .now_or_never()
        .expect("a refusal is ready on its first poll");
    assert!(matches!(refused, Err(AdmitError::Rejected(_))));
    assert_eq!(gate.calls(), 2, "the refused request never reached the service");
    drop(a);
    assert_eq!(bulkhead.in_flight(), 1, "dropping the future freed its slot");
    let c = svc.ready().await.unwrap().call(4);
    gate.open_all();
    assert_eq!(b.await.unwrap(), 2);
    assert_eq!(c.await.unwrap(), 4);
    assert_eq!(bulkhead.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_bounded_wait_gets_a_freed_slot_or_gives_up_on_time() {
    let gate = Gate::new();
    let config = BulkheadConfig {
        max_concurrent: 1,
        max_wait: Duration::from_millis(100),
    };
    let svc = BulkheadLayer::new(Bulkhead::new("db", config).unwrap()).layer(gate.service());
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let start = tokio::time::Instant::now();
    let gave_up = svc.clone().oneshot(2).await;
    assert!(matches!(gave_up, Err(AdmitError::Rejected(_))));
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "waited exactly max_wait"
    );
    let waiting = tokio::spawn(svc.clone().oneshot(3));
    tokio::task::yield_now().await;
    gate.open_all();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    tokio::task::yield_now().await;
    gate.open_all();
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        3,
        "the waiter got the freed slot"
    );
}

#[tokio::test]
async fn keyed_bulkheads_isolate_downstreams() {
    let gate = Gate::new();
    let keyed = Arc::new(KeyedBulkhead::new("cluster", BulkheadConfig::new(1), 100).unwrap());
    let mut svc = ByKey::new(keyed, |x: &u32| x % 2).layer(gate.service());
    let _even = svc.ready().await.unwrap().call(0);
    let even_again = svc.ready().await.unwrap().call(2).now_or_never().unwrap();
    assert!(even_again.is_err(), "key 0's single slot is taken");
    let odd = svc.ready().await.unwrap().call(1);
    gate.open_all();
    assert_eq!(odd.await.unwrap(), 1, "key 1 has its own slot");
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_request_fails_at_once_with_retry_after() {
    let gate = Gate::new();
    let limiter = RateLimiter::gcra(Quota::per_second(1).burst(1))
        .unwrap()
        .with_clock(ManualClock::new());
    let mut svc = RateLimitLayer::new(limiter).layer(gate.service());
    let ok = svc.ready().await.unwrap().call(1);
    let refused = svc
        .ready()
        .await
        .unwrap()
        .call(2)
        .now_or_never()
        .expect("no waiting");
    match refused {
        Err(AdmitError::Rejected(limited)) => assert_eq!(limited.retry_after(), Duration::from_secs(1)),
        other => panic!("expected a rate-limit refusal, got {other:?}"),
    }
    gate.open_all();
    assert_eq!(ok.await.unwrap(), 1);
    assert_eq!(gate.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_pacing_limiter_spaces_calls_out() {
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = tokio::time::Instant::now();
    let seen = calls.clone();
    let svc = service_fn(move |x: u32| {
        seen.lock().unwrap().push((x, start.elapsed()));
        async move { Ok::<_, &str>(x) }
    });
    let pacer = Gcra::pacing(Quota::per_second(10), Duration::from_secs(1)).unwrap();
    let svc = RateLimitLayer::new(
        RateLimiter::new(pacer).with_clock(palisade_resilience::clock::TokioClock::new()),
    )
    .layer(svc);
    let all = futures::future::join_all((0..3).map(|i| svc.clone().oneshot(i))).await;
    assert!(all.iter().all(Result::is_ok));
    let times: Vec<_> = calls.lock().unwrap().iter().map(|(_, t)| t.as_millis()).collect();
    assert_eq!(times, [0, 100, 200]);
}

#[tokio::test]
async fn keyed_rate_limits_are_per_key() {
    let limiter: KeyedRateLimiter<u32> =
        KeyedRateLimiter::new(Gcra::new(Quota::per_minute(1)).unwrap(), 1000).with_clock(ManualClock::new());
    let svc = RateLimitLayer::keyed(limiter, |x: &u32| *x)
        .layer(service_fn(|x: u32| async move { Ok::<_, &str>(x) }));
    assert!(svc.clone().oneshot(1).await.is_ok());
    assert!(svc.clone().oneshot(1).await.is_err());
    assert!(svc.oneshot(2).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn adaptive_concurrency_sheds_above_its_limit_and_frees_on_drop() {
    let gate = Gate::new();
    let config = AdaptiveConfig {
        initial: 1,
        ..AdaptiveConfig::default()
    };
    let limit = AdaptiveConcurrency::with_clock(config, ManualClock::new()).unwrap();
    let mut svc = AdaptiveConcurrencyLayer::new(limit.clone()).layer(gate.service());
    let first = svc.ready().await.unwrap().call(1);
    let shed = svc.ready().await.unwrap().call(2).now_or_never().unwrap();
    assert!(matches!(shed, Err(AdmitError::Rejected(_))));
    drop(first);
    assert_eq!(limit.in_flight(), 0);
}

#[tokio::test]
async fn tiered_shedding_drops_by_priority_and_marks_degraded_requests() {
    #[derive(Clone, Copy, Debug)]
    struct Req {
        priority: Priority,
        degraded: bool,
    }
    let load = LoadGauge::new();
    let shedder = TieredShedder::new(load.clone(), Tiers::default()).unwrap();
    let svc = TieredShedLayer::new(shedder, |r: &Req| r.priority, |r: &mut Req| r.degraded = true)
        .layer(service_fn(|r: Req| async move { Ok::<_, &str>(r.degraded) }));
    let req = |priority| Req {
        priority,
        degraded: false,
    };
    load.set(0.85);
    assert!(svc.clone().oneshot(req(Priority::Sheddable)).await.is_err());
    assert!(
        svc.clone().oneshot(req(Priority::Normal)).await.unwrap(),
        "served degraded"
    );
    assert!(
        !svc.clone().oneshot(req(Priority::Critical)).await.unwrap(),
        "core served in full"
    );
    load.set(0.95);
    assert!(svc.clone().oneshot(req(Priority::Normal)).await.is_err());
    load.set(0.1);
    assert!(!svc.oneshot(req(Priority::Sheddable)).await.unwrap());
}
