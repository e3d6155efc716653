//! The naive design, kept to measure the layered one against: every purchase
//! attempt is a transaction in the database, sold out or not. It is correct (on
//! stock: `stock > 0` in the decrement; on the limit: counted once the item's row
//! is locked) but every attempt costs round trips and a row lock on the item,
//! which is what the layers in front of the gate avoid.
//! `flash-sale --design naive` serves it; `bench/flash-sale.sh` compares the two.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::store::{Db, Inventory, on};

const ORDERS_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS fs_naive_orders (
    reservation text PRIMARY KEY,
    item text NOT NULL,
    user_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now())";

const ORDERS_SQLITE: &str = "CREATE TABLE IF NOT EXISTS fs_naive_orders (
    reservation text PRIMARY KEY,
    item text NOT NULL,
    user_id text NOT NULL,
    at text NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// The naive service: its database, the inventory's tables in it.
#[derive(Debug)]
pub struct Naive {
    db: Db,
    inventory: Inventory,
}

impl Naive {
    /// The naive service on `db`, its tables created if missing.
    pub async fn new(db: Db) -> Result<Naive, sqlx::Error> {
        let inventory = Inventory::new(db.clone()).await?;
        db.declare(&[ORDERS_POSTGRES], &[ORDERS_SQLITE]).await?;
        Ok(Naive { db, inventory })
    }

    /// Opens (or sets up again) `sale`.
    pub async fn open(&self, sale: &crate::Sale) -> Result<(), sqlx::Error> {
        self.inventory.open(sale).await
    }

    /// One attempt, in one transaction: the stock decremented if the window is
    /// open, a unit is left and the user is under the limit, and the order
    /// written; `false` when refused. A repeated reservation buys nothing more.
    pub async fn buy(
        &self,
        item: &str,
        user: &str,
        reservation: &str,
        now_ms: u64,
    ) -> Result<bool, sqlx::Error> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        on!(&self.db, p => {
            let mut tx = palisade_queue::begin(p).await?;
            let took = sqlx::query(
                "UPDATE fs_items SET stock = stock - 1
                 WHERE item = $1 AND stock > 0 AND opens_ms <= $2 AND $2 < closes_ms",
            )
            .bind(item)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if took.rows_affected() == 0 {
                return Ok(false);
            }
            // Counted in a statement after the decrement, whose row lock holds off
            // the user's other attempts: under read committed its snapshot sees
            // their orders (a count inside the decrement would read the snapshot
            // taken before the lock, and let two attempts at once both pass).
            let (held, repeated, limit): (i64, bool, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM fs_naive_orders WHERE item = $1 AND user_id = $2),
                     EXISTS (SELECT 1 FROM fs_naive_orders WHERE reservation = $3),
                     (SELECT CAST(per_user AS bigint) FROM fs_items WHERE item = $1)",
            )
            .bind(item)
            .bind(user)
            .bind(reservation)
            .fetch_one(&mut *tx)
            .await?;
            if held >= limit || repeated {
                return Ok(false); // dropped: the decrement rolls back
            }
            sqlx::query("INSERT INTO fs_naive_orders (reservation, item, user_id) VALUES ($1, $2, $3)")
                .bind(reservation)
                .bind(item)
                .bind(user)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// `item`'s orders, and the users holding more than `limit` of them.
    async fn orders(&self, item: &str, limit: i64) -> Result<(i64, i64), sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM fs_naive_orders WHERE item = $1),
                     (SELECT count(*) FROM (SELECT user_id FROM fs_naive_orders WHERE item = $1
                         GROUP BY user_id HAVING count(*) > $2) AS over)",
            )
            .bind(item)
            .bind(limit)
            .fetch_one(p)
            .await
        })
    }
}

/// The naive routes: `POST /buy` (the same request as the layered service's),
/// `POST /admin/sales`, `GET /admin/sales/{item}`.
pub fn router(naive: Arc<Naive>) -> Router {
    Router::new()
        .route("/buy", post(buy))
        .route("/admin/sales", post(open_sale))
        .route("/admin/sales/{item}", get(view))
        .with_state(naive)
}

fn refuse(status: StatusCode, cause: &str) -> Response {
    (status, Json(json!({"error": cause}))).into_response()
}

async fn buy(State(n): State<Arc<Naive>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let item = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["item"].as_str().map(str::to_owned));
    let (Some(user), Some(key), Some(item)) = (header("x-user-id"), header("idempotency-key"), item) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "needs x-user-id, Idempotency-Key and {\"item\"}",
        );
    };
    let reservation = format!("{user}~{key}");
    match n.buy(&item, user, &reservation, crate::gate::now_ms()).await {
        Ok(true) => (StatusCode::ACCEPTED, Json(json!({"reservation": reservation}))).into_response(),
        Ok(false) => refuse(StatusCode::CONFLICT, "refused"),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
    }
}

async fn open_sale(State(n): State<Arc<Naive>>, body: axum::body::Bytes) -> Response {
    let sale = match crate::service::sale_setup(&body) {
        Ok(sale) => sale,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    match n.open(&sale).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({"item": sale.item}))).into_response(),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
    }
}

async fn view(State(n): State<Arc<Naive>>, Path(item): Path<String>) -> Response {
    let books = match n.inventory.books(&item).await {
        Ok(Some(books)) => books,
        Ok(None) => return refuse(StatusCode::NOT_FOUND, "no_sale"),
        Err(_) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
    };
    match n.orders(&item, books.per_user).await {
        Ok((orders, over)) => Json(json!({
            "item": item,
            "inventory": {"initial": books.initial, "stock": books.stock},
            "orders": orders,
            "invariants": {
                "not_oversold": orders <= books.initial,
                "no_user_over_limit": over == 0,
                "orders_equal_sold": orders == books.initial - books.stock,
            },
        }))
        .into_response(),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
    }
}
