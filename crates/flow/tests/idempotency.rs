//! Idempotency keys through the tower layer, against real PostgreSQL and Redis
//! (the servers `scripts/test` starts), each test on both stores.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use palisade_flow::idempotency::IdempotentBody;
use palisade_flow::{
    Concurrent, Idempotency, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, PgStore, RedisStore,
};
use support::{env, fresh_pool, unique};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

async fn pg_store() -> PgStore {
    PgStore::new(pg_pool().await).await.unwrap()
}

async fn pg_pool() -> sqlx::PgPool {
    fresh_pool("idem", 10).await
}

async fn redis_store() -> RedisStore {
    let prefix = format!("{}:", unique("idem"));
    RedisStore::connect(&env("PALISADE_TEST_REDIS_URL"), Some(&prefix))
        .await
        .unwrap()
}

/// Permits of a handler's gate: all of them held, no run starts.
const GATE: u32 = 1 << 20;

/// The handler behind the layer: counts its runs, answers `status` with the
/// request's body and the run's number; each run first takes a permit of `gate`.
#[derive(Clone)]
struct Handler {
    started: Arc<AtomicU32>,
    runs: Arc<AtomicU32>,
    gate: Arc<Semaphore>,
    status: StatusCode,
}

impl Handler {
    fn new(status: StatusCode) -> Self {
        Handler {
            started: Arc::new(AtomicU32::new(0)),
            runs: Arc::new(AtomicU32::new(0)),
            gate: Arc::new(Semaphore::new(GATE as usize)),
            status,
        }
    }

    fn service(
        &self,
    ) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let h = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let h = h.clone();
            async move {
                h.started.fetch_add(1, Ordering::SeqCst);
                let _permit = h.gate.acquire().await.unwrap();
                let run = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut resp = Response::new(Full::new(Bytes::from(format!(
                    "run {run}: {}",
                    String::from_utf8_lossy(&body)
                ))));
                *resp.status_mut() = h.status;
                resp.headers_mut().insert("x-run", run.into());
                Ok::<_, Infallible>(resp)
            }
        })
    }
}

fn request(key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut b = Request::post("/payments?currency=eur");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

async fn text(resp: Response<IdempotentBody<Full<Bytes>>>) -> (StatusCode, bool, String) {
    let status = resp.status();
    let replayed = resp.headers().contains_key("idempotent-replayed");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8_lossy(&body).into_owned())
}

fn config(concurrent: Concurrent) -> IdempotencyConfig {
    IdempotencyConfig {
        scope: unique("scope"),
        concurrent,
        ..IdempotencyConfig::default()
    }
}

async fn hundred_concurrent_requests_run_once<S: IdempotencyStore>(store: S) {
    let handler = Handler::new(StatusCode::CREATED);
    let idem = Idempotency::new(store, config(Concurrent::Wait(Duration::from_secs(30))));
    let svc = IdempotencyLayer::new(idem).layer(handler.service());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(
                async move { text(svc.oneshot(request(Some("pay-1"), "10.00")).await.unwrap()).await },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    assert_eq!(
        handler.runs.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    for (status, _, body) in &answers {
        assert_eq!((*status, body.as_str()), (StatusCode::CREATED, "run 1: 10.00"));
    }
    assert_eq!(
        answers.iter().filter(|a| !a.1).count(),
        1,
        "one fresh answer, 99 replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hundred_concurrent_requests_with_one_key_run_once_and_get_one_answer() {
    hundred_concurrent_requests_run_once(pg_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hundred_concurrent_requests_with_one_key_run_once_and_get_one_answer() {
    hundred_concurrent_requests_run_once(redis_store().await).await;
}

async fn repeats_conflict_mismatch_and_replay<S: IdempotencyStore>(store: S) {
    let handler = Handler::new(StatusCode::OK);
    let idem = Idempotency::new(store, config(Concurrent::Conflict));
    let svc = IdempotencyLayer::new(idem).layer(handler.service());
    // The first request holds the handler until released.
    let hold = handler.gate.acquire_many(GATE).await.unwrap();
    let first = tokio::spawn(svc.clone().oneshot(request(Some("k"), "a")));
    // Once its handler has started (it has claimed the key), a repeat is a 409.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while handler.started.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never reached its handler"
        );
        tokio::task::yield_now().await;
    }
    let (status, _, body) = text(svc.clone().oneshot(request(Some("k"), "a")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("still running"), "{body}");
    drop(hold);
    let (status, replayed, body) = text(first.await.unwrap().unwrap()).await;
    assert_eq!(
        (status, replayed, body.as_str()),
        (StatusCode::OK, false, "run 1: a")
    );

    let (status, replayed, body) = text(svc.clone().oneshot(request(Some("k"), "a")).await.unwrap()).await;
    assert_eq!(
        (status, replayed, body.as_str()),
        (StatusCode::OK, true, "run 1: a")
    );
    let (status, _, body) = text(svc.clone().oneshot(request(Some("k"), "b")).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);

    // Without a key, or with a malformed one.
    let (status, _, _) = text(svc.clone().oneshot(request(None, "c")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
    let long = "x".repeat(256);
    let bad = Request::post("/p")
        .header("idempotency-key", long)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(bad).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_repeat_is_replayed_a_running_one_conflicts_and_another_request_is_refused() {
    repeats_conflict_mismatch_and_replay(pg_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_repeat_is_replayed_a_running_one_conflicts_and_another_request_is_refused() {
    repeats_conflict_mismatch_and_replay(redis_store().await).await;
}

async fn server_errors_are_not_stored<S: IdempotencyStore>(store: S) {
    let handler = Handler::new(StatusCode::SERVICE_UNAVAILABLE);
    let idem = Idempotency::new(store, config(Concurrent::Conflict));
    let svc = IdempotencyLayer::new(idem).layer(handler.service());
    for run in 1..=3 {
        let (status, replayed, body) =
            text(svc.clone().oneshot(request(Some("k5"), "x")).await.unwrap()).await;
        assert_eq!((status, replayed), (StatusCode::SERVICE_UNAVAILABLE, false));
        assert_eq!(body, format!("run {run}: x"), "a 5xx was replayed");
    }
}

#[tokio::test]
async fn postgres_a_server_error_is_not_stored_so_a_retry_runs_again() {
    server_errors_are_not_stored(pg_store().await).await;
}

#[tokio::test]
async fn redis_a_server_error_is_not_stored_so_a_retry_runs_again() {
    server_errors_are_not_stored(redis_store().await).await;
}

#[tokio::test]
async fn a_handler_error_releases_the_key() {
    let idem = Idempotency::new(redis_store().await, config(Concurrent::Conflict));
    let fp = palisade_flow::idempotency::fingerprint([&b"req"[..]]);
    let failed = idem
        .run("k", &fp, || async { Err::<palisade_flow::Stored, _>("boom") })
        .await;
    assert!(failed.is_err());
    let ok = idem
        .run("k", &fp, || async {
            Ok::<_, &str>(palisade_flow::Stored {
                status: 200,
                headers: Vec::new(),
                body: Bytes::from_static(b"second"),
            })
        })
        .await
        .unwrap();
    assert!(matches!(ok, palisade_flow::Outcome::Fresh(s) if s.body == "second"));
}

#[tokio::test]
async fn a_store_that_is_down_is_a_503_and_the_request_does_not_run() {
    let pool = pg_pool().await;
    let store = PgStore::new(pool.clone()).await.unwrap();
    let handler = Handler::new(StatusCode::OK);
    let svc =
        IdempotencyLayer::new(Idempotency::new(store, config(Concurrent::Conflict))).layer(handler.service());
    pool.close().await;
    let (status, _, _) = text(svc.oneshot(request(Some("k"), "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 0);
}
