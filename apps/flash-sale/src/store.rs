//! The two services' databases (a database per service): the inventory's stock
//! and every move of a unit, and the orders. Each write is keyed by the purchase's
//! reservation, so a step run twice (a job delivered again) changes nothing the
//! second time; and each guards the invariant on its own, whatever Redis says:
//! stock never below zero (`stock > 0` in the decrement, a `CHECK` under it), and
//! one order per user unit (a unique index over the orders not cancelled).

use sqlx::PgPool;

const INVENTORY: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS fs_items (
        item text PRIMARY KEY,
        stock integer NOT NULL CHECK (stock >= 0))",
    "CREATE TABLE IF NOT EXISTS fs_stock_moves (
        reservation text NOT NULL,
        item text NOT NULL REFERENCES fs_items (item),
        kind text NOT NULL CHECK (kind IN ('take', 'return')),
        at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (reservation, kind))",
];

const ORDERS: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS fs_orders (
        id bigserial PRIMARY KEY,
        reservation text NOT NULL UNIQUE,
        item text NOT NULL,
        user_id text NOT NULL,
        unit integer NOT NULL CHECK (unit >= 1),
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'cancelled')),
        created_at timestamptz NOT NULL DEFAULT now(),
        settled_at timestamptz)",
    "CREATE UNIQUE INDEX IF NOT EXISTS fs_orders_user_unit
        ON fs_orders (user_id, item, unit) WHERE state <> 'cancelled'",
    // One order saga per reservation, recorded in the saga's own transaction.
    "CREATE TABLE IF NOT EXISTS fs_purchases (
        reservation text PRIMARY KEY,
        saga bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT now())",
];

/// What taking a unit for a reservation came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Taken now.
    Taken,
    /// Taken before, for this reservation (nothing taken again).
    Already,
    /// None left: the database refused to go below zero.
    SoldOut,
}

/// The inventory service's database.
#[derive(Clone, Debug)]
pub struct Inventory {
    pool: PgPool,
}

impl Inventory {
    /// The inventory on `pool`, its tables created if missing.
    pub async fn new(pool: PgPool) -> Result<Inventory, sqlx::Error> {
        for ddl in INVENTORY {
            sqlx::query(ddl).execute(&pool).await?;
        }
        Ok(Inventory { pool })
    }

    /// Sets `item`'s stock (a sale's setup).
    pub async fn set_stock(&self, item: &str, stock: u32) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO fs_items (item, stock) VALUES ($1, $2) ON CONFLICT (item) DO UPDATE SET stock = $2",
        )
        .bind(item)
        .bind(i64::from(stock))
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Every item and its stock.
    pub async fn items(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT item, stock::bigint FROM fs_items ORDER BY item")
            .fetch_all(&self.pool)
            .await
    }

    /// `item`'s stock now, if it is for sale.
    pub async fn stock(&self, item: &str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT stock::bigint FROM fs_items WHERE item = $1")
            .bind(item)
            .fetch_optional(&self.pool)
            .await
    }

    /// Takes one unit of `item` for `reservation`, once.
    pub async fn take(&self, item: &str, reservation: &str) -> Result<Taken, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "INSERT INTO fs_stock_moves (reservation, item, kind) VALUES ($1, $2, 'take') ON CONFLICT DO NOTHING",
        )
        .bind(reservation)
        .bind(item)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Ok(Taken::Already);
        }
        let took = sqlx::query("UPDATE fs_items SET stock = stock - 1 WHERE item = $1 AND stock > 0")
            .bind(item)
            .execute(&mut *tx)
            .await?;
        if took.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Taken::SoldOut);
        }
        tx.commit().await?;
        Ok(Taken::Taken)
    }

    /// Returns the unit `reservation` took, once: `false` when it took none or
    /// was returned before.
    pub async fn give_back(&self, item: &str, reservation: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let taken: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM fs_stock_moves WHERE reservation = $1 AND kind = 'take'")
                .bind(reservation)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_none() {
            return Ok(false);
        }
        let moved = sqlx::query(
            "INSERT INTO fs_stock_moves (reservation, item, kind) VALUES ($1, $2, 'return') ON CONFLICT DO NOTHING",
        )
        .bind(reservation)
        .bind(item)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE fs_items SET stock = stock + 1 WHERE item = $1")
            .bind(item)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// An order to place: a converted reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    /// The reservation it comes from (one order per reservation).
    pub reservation: String,
    /// The item.
    pub item: String,
    /// The buyer.
    pub user: String,
    /// The buyer's unit number (see the gate).
    pub unit: u32,
}

/// What placing an order came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// A new order, with its id.
    New(i64),
    /// The reservation's order, placed before.
    Existing(i64),
    /// The user already holds an order for this unit of the item.
    Duplicate,
}

/// An order's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderState {
    /// Waiting for payment.
    Pending,
    /// Paid.
    Paid,
    /// Cancelled (not paid in time); its unit went back.
    Cancelled,
}

impl OrderState {
    fn parse(s: &str) -> Option<OrderState> {
        match s {
            "pending" => Some(OrderState::Pending),
            "paid" => Some(OrderState::Paid),
            "cancelled" => Some(OrderState::Cancelled),
            _ => None,
        }
    }
}

/// The orders service's database.
#[derive(Clone, Debug)]
pub struct Orders {
    pool: PgPool,
}

impl Orders {
    /// The orders on `pool`, its table created if missing.
    pub async fn new(pool: PgPool) -> Result<Orders, sqlx::Error> {
        for ddl in ORDERS {
            sqlx::query(ddl).execute(&pool).await?;
        }
        Ok(Orders { pool })
    }

    /// The database's pool (the queue and the sagas live beside the orders).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Places `order`, once per reservation.
    pub async fn place(&self, order: &NewOrder) -> Result<Placed, sqlx::Error> {
        let inserted: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO fs_orders (reservation, item, user_id, unit) VALUES ($1, $2, $3, $4)
             ON CONFLICT (reservation) DO NOTHING RETURNING id",
        )
        .bind(&order.reservation)
        .bind(&order.item)
        .bind(&order.user)
        .bind(i64::from(order.unit))
        .fetch_optional(&self.pool)
        .await;
        match inserted {
            Ok(Some(id)) => Ok(Placed::New(id)),
            Ok(None) => {
                let id = sqlx::query_scalar("SELECT id FROM fs_orders WHERE reservation = $1")
                    .bind(&order.reservation)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(Placed::Existing(id))
            }
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("fs_orders_user_unit") => {
                Ok(Placed::Duplicate)
            }
            Err(e) => Err(e),
        }
    }

    /// The state of the order placed for `reservation`, if any.
    pub async fn state(&self, reservation: &str) -> Result<Option<OrderState>, sqlx::Error> {
        let s: Option<String> = sqlx::query_scalar("SELECT state FROM fs_orders WHERE reservation = $1")
            .bind(reservation)
            .fetch_optional(&self.pool)
            .await?;
        Ok(s.as_deref().and_then(OrderState::parse))
    }

    /// Marks the pending order of `reservation` paid: `false` when it is not
    /// pending (cancelled already, or paid).
    pub async fn pay(&self, reservation: &str) -> Result<bool, sqlx::Error> {
        self.settle(reservation, "paid").await
    }

    /// Cancels the pending order of `reservation`: `false` when it is not pending.
    pub async fn cancel(&self, reservation: &str) -> Result<bool, sqlx::Error> {
        self.settle(reservation, "cancelled").await
    }

    async fn settle(&self, reservation: &str, to: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE fs_orders SET state = $2, settled_at = now() WHERE reservation = $1 AND state = 'pending'",
        )
        .bind(reservation)
        .bind(to)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Orders of `item` not cancelled.
    pub async fn live(&self, item: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM fs_orders WHERE item = $1 AND state <> 'cancelled'")
            .bind(item)
            .fetch_one(&self.pool)
            .await
    }
}
