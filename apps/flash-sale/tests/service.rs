//! The HTTP service on a real socket over real Redis and PostgreSQL: 300 buyers at
//! once for 20 units get exactly 20 orders, the rest refused by the layers, each
//! refusal counted; a repeated request is the same purchase; bad requests are
//! 400s.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade_flash_sale::service::{App, router};
use palisade_flow::saga::Transition;
use serde_json::{Value, json};

use support::now_ms;

const STOCK: u64 = 20;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    c: &HttpClient,
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let resp = c.request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_get_exactly_the_stock_and_every_refusal_is_counted() {
    let (services, pool) = support::services().await;
    let (sagas, mut steps, runner) = support::sagas(&services, pool).await;
    let app = Arc::new(App::new(
        services,
        sagas,
        Duration::from_secs(300),
        Duration::from_secs(600),
    ));
    let addr = serve(app.clone()).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let now = now_ms();
    let setup = json!({"item": "phone", "stock": STOCK, "opens_ms": now - 1000, "closes_ms": now + 3_600_000, "per_user": 1});
    assert_eq!(
        call(&c, addr, Method::POST, "/admin/sales", &[], Some(setup))
            .await
            .0,
        StatusCode::CREATED
    );

    // 300 buyers, 50 of whom ask twice with a second key (over the limit).
    let mut buyers = Vec::new();
    for u in 0..300 {
        let c = c.clone();
        buyers.push(tokio::spawn(async move {
            let user = format!("u{u}");
            let mut out = Vec::new();
            for key in if u < 50 { vec!["k1", "k2"] } else { vec!["k1"] } {
                let h = [("x-user-id", user.as_str()), ("idempotency-key", key)];
                out.push(call(&c, addr, Method::POST, "/buy", &h, Some(json!({"item": "phone"}))).await);
            }
            out
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for b in buyers {
        for (status, body) in b.await.unwrap() {
            match status {
                StatusCode::ACCEPTED => accepted.push(body["reservation"].as_str().unwrap().to_owned()),
                StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS => refused += 1,
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert_eq!(accepted.len() as u64, STOCK);
    assert_eq!(refused, 350 - STOCK);

    // The same request again is the same purchase.
    let first = accepted[0].clone();
    let (user, key) = first.split_once('~').unwrap();
    let again = call(
        &c,
        addr,
        Method::POST,
        "/buy",
        &[("x-user-id", user), ("idempotency-key", key)],
        Some(json!({"item": "phone"})),
    )
    .await;
    assert_eq!(
        (again.0, again.1["reservation"].as_str()),
        (StatusCode::ACCEPTED, Some(first.as_str()))
    );

    // Every order placed, then paid.
    let mut placed = 0;
    while placed < STOCK {
        let (_, t) = tokio::time::timeout(Duration::from_secs(60), steps.recv())
            .await
            .expect("an order was not placed")
            .unwrap();
        // The third step (place) done.
        if matches!(t, Transition::StepDone { step: 2, .. }) {
            placed += 1;
        }
    }
    for r in &accepted {
        let (status, body) = call(&c, addr, Method::GET, &format!("/orders/{r}"), &[], None).await;
        assert_eq!(
            (status, body["state"].as_str()),
            (StatusCode::OK, Some("pending")),
            "{r}"
        );
        assert_eq!(
            call(&c, addr, Method::POST, &format!("/orders/{r}/pay"), &[], None)
                .await
                .0,
            StatusCode::OK
        );
    }
    let (status, view) = call(&c, addr, Method::GET, "/admin/sales/phone", &[], None).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["orders"], STOCK, "{view}");
    assert_eq!(view["inventory"]["stock"], 0, "{view}");
    assert_eq!(
        (
            view["gate"]["stock"].as_u64(),
            view["gate"]["reservations"].as_u64()
        ),
        (Some(0), Some(0)),
        "{view}"
    );
    let layers = &view["layers"];
    assert_eq!(layers["reserved"], STOCK, "{view}");
    assert_eq!(layers["replayed"], 1, "{view}");
    let r = &layers["refused"];
    let gate_refusals = r["sold_out"].as_u64().unwrap() + r["over_limit"].as_u64().unwrap();
    let local = r["sold_out_local"].as_u64().unwrap() + r["at_limit_local"].as_u64().unwrap();
    assert_eq!(gate_refusals + local, 350 - STOCK, "{view}");
    assert!(
        r["sold_out_local"].as_u64().unwrap() > 0,
        "the local flag refused nothing: {view}"
    );
    // The same figures as the gateway's dashboard reads them.
    let (status, panel) = call(&c, addr, Method::GET, "/admin/dashboard", &[], None).await;
    assert_eq!(status, StatusCode::OK, "{panel}");
    assert_eq!(panel["counters"]["accepted"], STOCK, "{panel}");
    assert_eq!(panel["counters"]["attempts"], layers["attempts"], "{panel}");
    assert_eq!(
        panel["counters"]["sold_out_local"], r["sold_out_local"],
        "{panel}"
    );
    assert_eq!(
        panel["gauges"],
        json!({"stock": 0, "reserved": 0, "orders": STOCK, "sagas_in_flight": 0}),
        "{panel}"
    );
    let row = &panel["rows"][0];
    assert_eq!(
        (row["item"].as_str(), row["drift"].as_i64()),
        (Some("phone"), Some(0)),
        "{panel}"
    );
    assert_eq!(row["invariants"], "hold", "{panel}");

    // Bad requests.
    let bad = [
        (vec![("idempotency-key", "k")], json!({"item": "phone"})),
        (vec![("x-user-id", "u1")], json!({"item": "phone"})),
        (
            vec![("x-user-id", "u/1"), ("idempotency-key", "k")],
            json!({"item": "phone"}),
        ),
        (
            vec![("x-user-id", "u1"), ("idempotency-key", "k")],
            json!({"thing": 1}),
        ),
    ];
    for (h, body) in bad {
        assert_eq!(
            call(&c, addr, Method::POST, "/buy", &h, Some(body)).await.0,
            StatusCode::BAD_REQUEST
        );
    }
    runner.shutdown(Duration::from_secs(5)).await;
}

/// Serves `app` on a fresh port; its address.
async fn serve(app: Arc<App>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, router(app)).into_future());
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_at_another_instance_is_the_same_purchase_and_recovers_a_lost_enqueue() {
    let (services, pool) = support::services().await;
    let (sagas, mut steps, runner) = support::sagas(&services, pool.clone()).await;
    let ttl = (Duration::from_secs(300), Duration::from_secs(600));
    let a = serve(Arc::new(App::new(services.clone(), sagas.clone(), ttl.0, ttl.1))).await;
    let b = serve(Arc::new(App::new(services.clone(), sagas, ttl.0, ttl.1))).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let now = now_ms();
    let setup = json!({"item": "pen", "stock": 5, "opens_ms": now - 1000, "closes_ms": now + 3_600_000, "per_user": 2});
    assert_eq!(
        call(&c, a, Method::POST, "/admin/sales", &[], Some(setup))
            .await
            .0,
        StatusCode::CREATED
    );
    let body = || Some(json!({"item": "pen"}));

    // The first at A, the repeat at B: one reservation, one saga.
    let h = [("x-user-id", "ann"), ("idempotency-key", "k1")];
    let first = call(&c, a, Method::POST, "/buy", &h, body()).await;
    let again = call(&c, b, Method::POST, "/buy", &h, body()).await;
    assert_eq!((first.0, again.0), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first.1["reservation"], again.1["reservation"]);
    assert_eq!(services.gate.count("pen").await.unwrap().stock, 4);

    // A purchase whose instance died between the gate and the enqueue: the
    // reservation exists, its saga does not. The client's retry starts it.
    let lost = "bob~k1";
    assert!(matches!(
        services.gate.reserve("pen", "bob", lost, ttl.0).await.unwrap(),
        palisade_flash_sale::Reserve::Reserved { .. }
    ));
    let retry = call(
        &c,
        b,
        Method::POST,
        "/buy",
        &[("x-user-id", "bob"), ("idempotency-key", "k1")],
        body(),
    )
    .await;
    assert_eq!(
        (retry.0, retry.1["reservation"].as_str()),
        (StatusCode::ACCEPTED, Some(lost))
    );

    // Two orders placed, each once.
    let mut placed = 0;
    while placed < 2 {
        let (_, t) = tokio::time::timeout(Duration::from_secs(60), steps.recv())
            .await
            .expect("no order placed")
            .unwrap();
        if matches!(t, Transition::StepDone { step: 2, .. }) {
            placed += 1;
        }
    }
    assert_eq!(services.orders.live("pen").await.unwrap(), 2);
    let sagas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM palisade_sagas WHERE name = 'flash_sale_order'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sagas, 2);
    runner.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_purchase_is_converted_before_any_worker_reaches_its_saga() {
    let (services, pool) = support::services().await;
    // No runner: the saga is started and waits in the queue.
    palisade_queue::Queue::postgres(pool.clone()).await.unwrap();
    let sagas = palisade_flow::saga::Sagas::builder(pool)
        .register(palisade_flash_sale::order::order_saga(&services))
        .build()
        .await
        .unwrap();
    let ttl = Duration::from_secs(300);
    let addr = serve(Arc::new(App::new(services.clone(), sagas.clone(), ttl, ttl))).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let now = now_ms();
    let setup = json!({"item": "cap", "stock": 3, "opens_ms": now - 1000, "closes_ms": now + 3_600_000, "per_user": 1});
    let opened = call(&c, addr, Method::POST, "/admin/sales", &[], Some(setup)).await;
    assert_eq!(opened.0, StatusCode::CREATED);
    let h = [("x-user-id", "ann"), ("idempotency-key", "k1")];
    let (status, body) = call(&c, addr, Method::POST, "/buy", &h, Some(json!({"item": "cap"}))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let reservation = body["reservation"].as_str().unwrap();
    let saga = sagas.status_by_key(reservation).await.unwrap().unwrap();
    assert_eq!(saga.step, 0, "no step has run");
    // Converted: no longer live, so its expiry can no longer give the unit away.
    let count = services.gate.count("cap").await.unwrap();
    assert_eq!((count.stock, count.live), (2, 0));
    assert!(!services.gate.release("cap", reservation).await.unwrap());
}
