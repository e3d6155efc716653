//! The HTTP service: `POST /buy` through the layers, each cheaper than the next and
//! each counted; an order's state and its payment; a sale's setup and its admin
//! view.
//!
//! | request | answer |
//! |---|---|
//! | `POST /buy` `{"item"}`, headers `x-user-id`, `Idempotency-Key` | `202 {"reservation", "status"}`; `409 sold_out`, `429 over_limit`, `403 not_open`, `410 closed`, `404 no_sale`; `400` for a bad request; `503` when the gate or the queue cannot answer |
//! | `GET /orders/{reservation}` | `{"state": "pending" \| "paid" \| "cancelled" \| "processing" \| "failed"}`; `404` for no purchase |
//! | `POST /orders/{reservation}/pay` | `200` paid, `409` when it is not pending (cancelled: not paid in time) |
//! | `POST /admin/sales` `{"item", "stock", "opens_ms", "closes_ms", "per_user"}` | `201` |
//! | `GET /admin/sales/{item}` | the gate's stock and live reservations, the inventory's books, live orders, the sagas on their way, the drift, the invariants, the layers' counts |
//! | `GET /admin/dashboard` | the sales as the gateway's dashboard draws them (`[[gateway.panels]]`): the layers' counts, stock, reservations, orders, sagas on their way, a row per sale |

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use palisade_flow::reconcile::BoxError;
use palisade_flow::saga::{SagaState, Sagas};
use serde::Deserialize;
use serde_json::json;

use crate::gate::{Reserve, Sale, now_ms};
use crate::order::{ORDER_SAGA, OrderInput, Services};
use crate::store::OrderState;

/// A sold-out item is not asked of the gate again for this long (units released
/// by expiry or cancellation are seen after it).
const SOLD_OUT_RECHECK_MS: u64 = 1000;
/// An item neither the gate nor the inventory knows is not looked up again for
/// this long.
const NO_SALE_RECHECK_MS: u64 = 1000;
/// A user at the limit is not asked of the gate again for this long.
const AT_LIMIT_RECHECK_MS: u64 = 5000;
/// Users remembered at their limit, and purchases accepted here, at most (each
/// set is emptied past it).
const LOCAL_MAX: usize = 100_000;

/// The layers' counts.
#[derive(Debug, Default)]
pub struct Counts {
    attempts: AtomicU64,
    bad_requests: AtomicU64,
    sold_out_local: AtomicU64,
    at_limit_local: AtomicU64,
    sold_out: AtomicU64,
    over_limit: AtomicU64,
    outside_window: AtomicU64,
    replayed: AtomicU64,
    reserved: AtomicU64,
    unavailable: AtomicU64,
}

impl Counts {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The refusals by layer, cheapest first.
    fn refusals(&self) -> serde_json::Map<String, serde_json::Value> {
        [
            ("bad_request", &self.bad_requests),
            ("sold_out_local", &self.sold_out_local),
            ("at_limit_local", &self.at_limit_local),
            ("sold_out", &self.sold_out),
            ("over_limit", &self.over_limit),
            ("outside_window", &self.outside_window),
            ("unavailable", &self.unavailable),
        ]
        .into_iter()
        .map(|(name, c)| (name.to_owned(), c.load(Ordering::Relaxed).into()))
        .collect()
    }

    /// The counts now, by name.
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "attempts": g(&self.attempts),
            "refused": self.refusals(),
            "replayed": g(&self.replayed),
            "reserved": g(&self.reserved),
        })
    }

    /// The counts now, flat (the attempts, the purchases accepted, then each
    /// refusal), for a dashboard.
    pub fn counters(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut flat = serde_json::Map::new();
        flat.insert("attempts".into(), g(&self.attempts).into());
        flat.insert("accepted".into(), g(&self.reserved).into());
        flat.insert("replayed".into(), g(&self.replayed).into());
        flat.extend(self.refusals());
        flat.into()
    }
}

/// The service's state.
pub struct App {
    /// The gate and the databases.
    pub services: Arc<Services>,
    /// The order sagas (their table and the queue beside the orders).
    pub sagas: Sagas,
    /// A reservation's life before its order must have converted it.
    pub reservation_ttl: Duration,
    /// How long an order waits for its payment.
    pub pay_within: Duration,
    /// The layers' counts.
    pub counts: Counts,
    /// Items sold out, until when they are asked again (ms).
    sold_out: Mutex<HashMap<String, u64>>,
    /// (item, user) at the limit, until when they are asked again (ms).
    at_limit: Mutex<HashMap<(String, String), u64>>,
    /// Items not for sale, until when they are looked up again (ms).
    no_sale: Mutex<HashMap<String, u64>>,
    /// Reservations this instance accepted: a repeat is answered as the first
    /// was, before the local refusals (behind the gateway's `idempotency` option
    /// a repeat never gets here, whichever instance took the first).
    accepted: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl App {
    /// The service over `services`, with its sagas.
    pub fn new(
        services: Arc<Services>,
        sagas: Sagas,
        reservation_ttl: Duration,
        pay_within: Duration,
    ) -> App {
        App {
            services,
            sagas,
            reservation_ttl,
            pay_within,
            counts: Counts::default(),
            sold_out: Mutex::default(),
            at_limit: Mutex::default(),
            no_sale: Mutex::default(),
            accepted: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/buy", post(buy))
        .route("/orders/{reservation}", get(order))
        .route("/orders/{reservation}/pay", post(pay))
        .route("/admin/sales", post(open_sale))
        .route("/admin/sales/{item}", get(sale_view))
        .route("/admin/dashboard", get(dashboard))
        .with_state(app)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

fn refuse(status: StatusCode, cause: &str) -> Response {
    answer(status, json!({"error": cause}))
}

/// 1 to 64 of `A-Z a-z 0-9 . _ -`: safe in keys and paths, never `~`.
fn token(v: Option<&str>) -> Option<&str> {
    v.filter(|s| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Buy {
    item: String,
}

async fn buy(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let c = &app.counts;
    Counts::add(&c.attempts);
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let body = serde_json::from_slice::<Buy>(&body).ok();
    let (Some(user), Some(key), Some(b)) =
        (token(header("x-user-id")), token(header("idempotency-key")), body)
    else {
        Counts::add(&c.bad_requests);
        return refuse(
            StatusCode::BAD_REQUEST,
            "needs x-user-id, Idempotency-Key (1-64 of A-Z a-z 0-9 . _ -) and {\"item\"}",
        );
    };
    let Some(item) = token(Some(&b.item)) else {
        Counts::add(&c.bad_requests);
        return refuse(StatusCode::BAD_REQUEST, "bad item");
    };
    let now = now_ms();
    let reservation = format!("{user}~{key}");
    if lock(&app.accepted).contains(&reservation) {
        Counts::add(&c.replayed);
        return accepted(&reservation);
    }
    // Layer 2: this instance knows the item is gone.
    if lock(&app.sold_out).get(item).is_some_and(|until| *until > now) {
        Counts::add(&c.sold_out_local);
        return refuse(StatusCode::CONFLICT, "sold_out");
    }
    // Layer 3: this instance knows the user is at the limit.
    let user_key = (item.to_owned(), user.to_owned());
    if lock(&app.at_limit)
        .get(&user_key)
        .is_some_and(|until| *until > now)
    {
        Counts::add(&c.at_limit_local);
        return refuse(StatusCode::TOO_MANY_REQUESTS, "over_limit");
    }
    // Layer 4: the gate.
    let reserved = reserve(&app, item, user, &reservation, now).await;
    // A replay (the first request went to another instance, or this one
    // restarted) starts the order saga too, in case the first never did: a
    // reservation has one saga whoever starts it.
    let (unit, replay) = match reserved {
        Ok(Reserve::Reserved { unit, .. }) => (unit, false),
        Ok(Reserve::Replayed { unit }) => (unit, true),
        Ok(refusal) => return refused(&app, refusal, item, user_key, now),
        Err(e) => {
            Counts::add(&c.unavailable);
            tracing::warn!(error = %e, "the stock gate (or the inventory behind it) cannot answer");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "stock_unavailable");
        }
    };
    // Layer 5: the durable order saga, once per reservation.
    let input = OrderInput {
        item: item.to_owned(),
        user: user.to_owned(),
        unit,
        reservation,
        pay_by_ms: now + u64::try_from(app.pay_within.as_millis()).unwrap_or(u64::MAX),
    };
    enqueue(&app, &input, replay).await
}

/// The gate's answer to a purchase attempt. A sale the gate does not hold but the
/// inventory does (the gate's Redis restarted empty) is opened again from the
/// inventory ([`Services::reopen`]) and the attempt made once more; an item the
/// inventory does not know either is remembered for a second, so unknown items
/// cost no query each.
async fn reserve(
    app: &App,
    item: &str,
    user: &str,
    reservation: &str,
    now: u64,
) -> Result<Reserve, BoxError> {
    let gate = &app.services.gate;
    let first = gate.reserve(item, user, reservation, app.reservation_ttl).await?;
    if first != Reserve::NoSale || lock(&app.no_sale).get(item).is_some_and(|until| *until > now) {
        return Ok(first);
    }
    if app.services.reopen(item).await? {
        return Ok(gate.reserve(item, user, reservation, app.reservation_ttl).await?);
    }
    let mut unknown = lock(&app.no_sale);
    if unknown.len() >= LOCAL_MAX {
        unknown.clear();
    }
    unknown.insert(item.to_owned(), now + NO_SALE_RECHECK_MS);
    Ok(first)
}

/// Starts the order saga of `input`'s reservation and answers `202`; when it
/// cannot, the unit goes back now rather than at expiry (unless this is a
/// replay: the first request may have enqueued it) and the answer is `503`.
///
/// Once the saga is durably started the reservation is converted at once: the
/// purchase no longer depends on the order queue reaching it before the
/// reservation expires (a backlog at the opening would otherwise let it expire
/// and sell its unit again). The saga's first step converts it too, for a
/// process that died in between; a failure here is left to that step.
async fn enqueue(app: &App, input: &OrderInput, replay: bool) -> Response {
    let c = &app.counts;
    let reservation = &input.reservation;
    match start_order(app, input).await {
        Ok(()) => {
            if let Err(e) = app.services.gate.convert(&input.item, reservation).await {
                tracing::debug!(error = %e, "the reservation is left for its saga to convert");
            }
            Counts::add(if replay { &c.replayed } else { &c.reserved });
            let mut seen = lock(&app.accepted);
            if seen.len() >= LOCAL_MAX {
                seen.clear();
            }
            seen.insert(reservation.clone());
            drop(seen);
            accepted(reservation)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the order could not be enqueued; its unit goes back");
            if !replay {
                let _ = app.services.gate.release(&input.item, reservation).await;
            }
            Counts::add(&c.unavailable);
            refuse(StatusCode::SERVICE_UNAVAILABLE, "orders_unavailable")
        }
    }
}

/// A refusal from the gate, remembered locally where that saves its next call.
fn refused(app: &App, refusal: Reserve, item: &str, user_key: (String, String), now: u64) -> Response {
    let c = &app.counts;
    match refusal {
        Reserve::SoldOut => {
            lock(&app.sold_out).insert(item.to_owned(), now + SOLD_OUT_RECHECK_MS);
            Counts::add(&c.sold_out);
            refuse(StatusCode::CONFLICT, "sold_out")
        }
        Reserve::OverLimit => {
            let mut at = lock(&app.at_limit);
            if at.len() >= LOCAL_MAX {
                at.clear();
            }
            at.insert(user_key, now + AT_LIMIT_RECHECK_MS);
            Counts::add(&c.over_limit);
            refuse(StatusCode::TOO_MANY_REQUESTS, "over_limit")
        }
        Reserve::NotOpen => {
            Counts::add(&c.outside_window);
            refuse(StatusCode::FORBIDDEN, "not_open")
        }
        Reserve::Closed => {
            Counts::add(&c.outside_window);
            refuse(StatusCode::GONE, "closed")
        }
        Reserve::NoSale | Reserve::Reserved { .. } | Reserve::Replayed { .. } => {
            refuse(StatusCode::NOT_FOUND, "no_sale")
        }
    }
}

fn accepted(reservation: &str) -> Response {
    answer(
        StatusCode::ACCEPTED,
        json!({"reservation": reservation, "status": format!("/orders/{reservation}")}),
    )
}

/// Starts the order saga for `input` unless its reservation has one (the saga
/// is keyed by the reservation).
async fn start_order(app: &App, input: &OrderInput) -> Result<(), String> {
    app.sagas
        .start_once(ORDER_SAGA, &input.reservation, input)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// An order's state: `pending`, `paid` or `cancelled` once placed; before,
/// `processing` while its saga runs, or `failed` (with why) when the saga ended
/// without an order (its reservation expired first, the inventory had no unit
/// left); `404` for a reservation no purchase made.
async fn order(State(app): State<Arc<App>>, Path(reservation): Path<String>) -> Response {
    match app.services.orders.state(&reservation).await {
        Ok(Some(s)) => return answer(StatusCode::OK, json!({"state": state_name(s)})),
        Ok(None) => {}
        Err(_) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "orders_unavailable"),
    }
    match app.sagas.status_by_key(&reservation).await {
        Ok(Some(saga)) if saga.state == SagaState::Compensated => answer(
            StatusCode::OK,
            json!({"state": "failed", "why": saga.error.unwrap_or_default()}),
        ),
        Ok(Some(_)) => answer(StatusCode::OK, json!({"state": "processing"})),
        Ok(None) => refuse(StatusCode::NOT_FOUND, "no_purchase"),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "orders_unavailable"),
    }
}

fn state_name(s: OrderState) -> &'static str {
    match s {
        OrderState::Pending => "pending",
        OrderState::Paid => "paid",
        OrderState::Cancelled => "cancelled",
    }
}

/// Pays a pending order, and wakes its saga, which ends now rather than at the
/// payment deadline (if the wake fails, it ends then: the order is paid).
async fn pay(State(app): State<Arc<App>>, Path(reservation): Path<String>) -> Response {
    match app.services.orders.pay(&reservation).await {
        Ok(true) => {
            if let Err(e) = app.sagas.wake_by_key(&reservation).await {
                tracing::warn!(error = %e, "a paid order's saga was not woken: it ends at the deadline");
            }
            answer(StatusCode::OK, json!({"state": "paid"}))
        }
        Ok(false) => refuse(StatusCode::CONFLICT, "not_pending"),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "orders_unavailable"),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleSetup {
    item: String,
    stock: u32,
    opens_ms: u64,
    closes_ms: u64,
    per_user: u32,
}

/// A sale's setup from a request body, or what is wrong with it (a `400`).
pub(crate) fn sale_setup(body: &[u8]) -> Result<Sale, &'static str> {
    let Ok(s) = serde_json::from_slice::<SaleSetup>(body) else {
        return Err("needs {item, stock, opens_ms, closes_ms, per_user}");
    };
    if token(Some(&s.item)).is_none() || s.closes_ms <= s.opens_ms || s.per_user == 0 {
        return Err("item: 1-64 of A-Z a-z 0-9 . _ -; closes_ms after opens_ms; per_user at least 1");
    }
    Ok(Sale {
        item: s.item,
        stock: s.stock,
        opens_ms: s.opens_ms,
        closes_ms: s.closes_ms,
        per_user: s.per_user,
    })
}

async fn open_sale(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let sale = match sale_setup(&body) {
        Ok(sale) => sale,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let svc = &app.services;
    if svc.inventory.open(&sale).await.is_err() || svc.gate.open(&sale).await.is_err() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "stores_unavailable");
    }
    lock(&app.sold_out).remove(&sale.item);
    lock(&app.no_sale).remove(&sale.item);
    answer(StatusCode::CREATED, json!({"item": sale.item}))
}

/// The admin view of a sale: the gate's stock and reservations, the inventory's
/// books, the orders, the sagas on the way, and the invariants.
async fn sale_view(State(app): State<Arc<App>>, Path(item): Path<String>) -> Response {
    match SaleAudit::of(&app.services, &item).await {
        Ok(Some(audit)) => {
            let mut view = audit.json();
            view["layers"] = app.counts.snapshot();
            answer(StatusCode::OK, view)
        }
        Ok(None) => refuse(StatusCode::NOT_FOUND, "no_sale"),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "stores_unavailable"),
    }
}

/// Sales the dashboard's table shows at most.
const DASHBOARD_SALES: usize = 20;

/// The sale as the gateway's dashboard draws it (a `[[gateway.panels]]` URL):
/// this instance's layer counts as counters, and from the stores the instances
/// share, the units in stock and reserved in the gate, the live orders and the
/// sagas on their way, as gauges summed over the sales and as a row per sale
/// (the first [`DASHBOARD_SALES`] by name), with its drift and its invariants.
async fn dashboard(State(app): State<Arc<App>>) -> Response {
    let svc = &app.services;
    let Ok(items) = svc.inventory.items().await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "stores_unavailable");
    };
    let mut rows = Vec::new();
    let mut totals = [0i64; 4];
    for (item, _) in items.iter().take(DASHBOARD_SALES) {
        let Ok(Some(a)) = SaleAudit::of(svc, item).await else {
            continue;
        };
        let gate = a.gate.unwrap_or_default();
        // While sagas are on their way, orders trail the units sold.
        let settled = a.in_flight == 0;
        let broken: Vec<&str> = (a.invariants().into_iter())
            .filter(|(name, holds)| !holds && *name != "settled" && (settled || *name != "orders_equal_sold"))
            .map(|(name, _)| name)
            .collect();
        let invariants = match (broken.is_empty(), settled) {
            (false, _) => format!("broken: {}", broken.join(" ")),
            (true, true) => "hold".to_owned(),
            (true, false) => "hold (settling)".to_owned(),
        };
        let figures = [i64::from(gate.stock), i64::from(gate.live), a.orders, a.in_flight];
        for (total, n) in totals.iter_mut().zip(figures) {
            *total += n;
        }
        rows.push(json!({
            "item": item,
            "stock": gate.stock,
            "reserved": gate.live,
            "inventory": a.books.stock,
            "orders": a.orders,
            "sagas_in_flight": a.in_flight,
            "drift": a.drift(),
            "invariants": invariants,
        }));
    }
    let [stock, reserved, orders, in_flight] = totals;
    answer(
        StatusCode::OK,
        json!({
            "counters": app.counts.counters(),
            "gauges": {"stock": stock, "reserved": reserved, "orders": orders, "sagas_in_flight": in_flight},
            "rows": rows,
            "columns": ["item", "stock", "reserved", "inventory", "orders", "sagas_in_flight", "drift", "invariants"],
        }),
    )
}

/// A sale's books on every side, as the admin view and the dashboard show them.
///
/// The invariants, each true at every moment: no more live orders than units put
/// on sale; no user holding more than the limit; the units moved out of the
/// inventory (taken less given back) are the units it no longer has. Two more
/// hold once no saga is on the way (`settled`: none between its reservation and
/// its order, or compensating): every unit gone from the inventory is a live
/// order, and the gate's stock plus its live reservations equal the inventory's
/// stock after reconciliation (`drift` 0). `sagas_open` counts the sagas not
/// ended, those waiting for a payment included.
struct SaleAudit {
    item: String,
    books: crate::store::Books,
    /// `None` when the gate holds no sale of the item (it lost it).
    gate: Option<crate::gate::StockCount>,
    orders: i64,
    users_over: i64,
    in_flight: i64,
    open: i64,
}

impl SaleAudit {
    /// `item`'s audit; `None` when it is not for sale.
    async fn of(svc: &Services, item: &str) -> Result<Option<SaleAudit>, BoxError> {
        let Some(books) = svc.inventory.books(item).await? else {
            return Ok(None);
        };
        let gate = match svc.gate.count(item).await {
            Ok(g) => Some(g),
            Err(crate::gate::GateError::NoSale(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let orders = svc.orders.live(item).await?;
        let users_over = svc.orders.users_over(item, books.per_user).await?;
        // Before the payment wait: converted, taken or placed, not yet all three.
        let (in_flight, open) = svc.orders.sagas_open(ORDER_SAGA, item, 3).await?;
        Ok(Some(SaleAudit {
            item: item.to_owned(),
            books,
            gate,
            orders,
            users_over,
            in_flight,
            open,
        }))
    }

    fn drift(&self) -> Option<i64> {
        (self.gate).map(|g| i64::from(g.stock) + i64::from(g.live) - self.books.stock)
    }

    fn invariants(&self) -> [(&'static str, bool); 5] {
        let b = &self.books;
        let sold = b.initial - b.stock;
        [
            ("not_oversold", self.orders <= b.initial),
            ("no_user_over_limit", self.users_over == 0),
            ("moves_balance", b.taken - b.returned == sold),
            ("settled", self.in_flight == 0),
            ("orders_equal_sold", self.orders == sold),
        ]
    }

    fn json(&self) -> serde_json::Value {
        let b = &self.books;
        let invariants: serde_json::Map<String, serde_json::Value> = (self.invariants().into_iter())
            .map(|(name, holds)| (name.to_owned(), holds.into()))
            .collect();
        json!({
            "item": self.item,
            "gate": self.gate.map(|g| json!({"stock": g.stock, "reservations": g.live})),
            "inventory": {
                "initial": b.initial,
                "stock": b.stock,
                "taken": b.taken,
                "returned": b.returned,
                "per_user": b.per_user,
            },
            "orders": self.orders,
            "sagas_in_flight": self.in_flight,
            "sagas_open": self.open,
            "drift": self.drift(),
            "invariants": invariants,
        })
    }
}
