//! The two services' databases (a database per service): the inventory's stock
//! and every move of a unit, and the orders. Each write is keyed by the purchase's
//! reservation, so a step run twice (a job delivered again) changes nothing the
//! second time; and each guards the invariant on its own, whatever Redis says:
//! stock never below zero (`stock > 0` in the decrement, a `CHECK` under it), and
//! one order per user unit (a unique index over the orders not cancelled).
//!
//! Each runs on PostgreSQL (distributed) or SQLite (embedded): the statements are
//! written once in the SQL both speak; only the tables are declared apart.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::gate::Sale;

/// The items on sale: their stock, and the sale as it was set up (the same on
/// both databases).
const ITEMS: &str = "CREATE TABLE IF NOT EXISTS fs_items (
    item text PRIMARY KEY,
    stock integer NOT NULL CHECK (stock >= 0),
    initial integer NOT NULL CHECK (initial >= 0),
    opens_ms bigint NOT NULL,
    closes_ms bigint NOT NULL,
    per_user integer NOT NULL CHECK (per_user >= 1))";

/// One order per user unit (the same on both databases).
const USER_UNIT: &str = "CREATE UNIQUE INDEX IF NOT EXISTS fs_orders_user_unit
    ON fs_orders (user_id, item, unit) WHERE state <> 'cancelled'";

const INVENTORY_POSTGRES: [&str; 2] = [
    ITEMS,
    "CREATE TABLE IF NOT EXISTS fs_stock_moves (
        reservation text NOT NULL,
        item text NOT NULL REFERENCES fs_items (item),
        kind text NOT NULL CHECK (kind IN ('take', 'return')),
        at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (reservation, kind))",
];

const INVENTORY_SQLITE: [&str; 2] = [
    ITEMS,
    "CREATE TABLE IF NOT EXISTS fs_stock_moves (
        reservation text NOT NULL,
        item text NOT NULL REFERENCES fs_items (item),
        kind text NOT NULL CHECK (kind IN ('take', 'return')),
        at text NOT NULL DEFAULT CURRENT_TIMESTAMP,
        PRIMARY KEY (reservation, kind))",
];

const ORDERS_POSTGRES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS fs_orders (
        id bigserial PRIMARY KEY,
        reservation text NOT NULL UNIQUE,
        item text NOT NULL,
        user_id text NOT NULL,
        unit integer NOT NULL CHECK (unit >= 1),
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'cancelled')),
        created_at timestamptz NOT NULL DEFAULT now(),
        settled_at timestamptz)",
    USER_UNIT,
];

const ORDERS_SQLITE: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS fs_orders (
        id integer PRIMARY KEY AUTOINCREMENT,
        reservation text NOT NULL UNIQUE,
        item text NOT NULL,
        user_id text NOT NULL,
        unit integer NOT NULL CHECK (unit >= 1),
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'cancelled')),
        created_at text NOT NULL DEFAULT CURRENT_TIMESTAMP,
        settled_at text)",
    USER_UNIT,
];

/// A service's database.
#[derive(Clone, Debug)]
pub enum Db {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite (the embedded sale).
    Sqlite(SqlitePool),
}

impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Db {
        Db::Postgres(pool)
    }
}

impl From<SqlitePool> for Db {
    fn from(pool: SqlitePool) -> Db {
        Db::Sqlite(pool)
    }
}

/// `$body` with `$p` the pool of `$db`, written once for both databases.
macro_rules! on {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Postgres($p) => $body,
            $crate::store::Db::Sqlite($p) => $body,
        }
    };
}
pub(crate) use on;

impl Db {
    /// Connects to `url`: `postgres://...`, or `sqlite:path` (the file created if
    /// missing).
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        let within = Duration::from_secs(10);
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // A 202 is a promise: the service's commits are durable before they
            // are answered, whatever the server's default.
            let options = PgConnectOptions::from_str(url)?.options([("synchronous_commit", "on")]);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(within)
                .connect_with(options)
                .await?;
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(within);
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(within)
                .connect_with(options)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            Err(sqlx::Error::Configuration(
                format!("{url:?} is not postgres://... or sqlite:path").into(),
            ))
        }
    }

    /// Runs `ddl` (PostgreSQL's or SQLite's). Instances starting together on a
    /// new database declare its tables once: on PostgreSQL under a lock, since two
    /// `CREATE TABLE IF NOT EXISTS` at once can both try to create it.
    pub(crate) async fn declare(
        &self,
        postgres: &[&'static str],
        sqlite: &[&'static str],
    ) -> Result<(), sqlx::Error> {
        let ddl = match self {
            Db::Postgres(_) => postgres,
            Db::Sqlite(_) => sqlite,
        };
        on!(self, p => {
            let mut tx = palisade_queue::begin(p).await?;
            if matches!(self, Db::Postgres(_)) {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('palisade_flash_sale', 0))")
                    .execute(&mut *tx)
                    .await?;
            }
            for statement in ddl {
                sqlx::query(*statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    }

    /// The first column of every row `sql` (with `bind` as `$1`) returns.
    pub async fn strings(&self, sql: &'static str, bind: &str) -> Result<Vec<String>, sqlx::Error> {
        on!(self, p => sqlx::query_scalar(sql).bind(bind).fetch_all(p).await)
    }
}

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
    db: Db,
}

impl Inventory {
    /// The inventory in `db`, its tables created if missing.
    pub async fn new(db: impl Into<Db>) -> Result<Inventory, sqlx::Error> {
        let db = db.into();
        db.declare(&INVENTORY_POSTGRES, &INVENTORY_SQLITE).await?;
        Ok(Inventory { db })
    }

    /// Sets `sale` up: its item's stock, and the sale kept to open it again in a
    /// gate that lost it (a Redis restarted empty, an embedded process restarted).
    pub async fn open(&self, sale: &Sale) -> Result<(), sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query(
                "INSERT INTO fs_items (item, stock, initial, opens_ms, closes_ms, per_user)
                 VALUES ($1, $2, $2, $3, $4, $5)
                 ON CONFLICT (item) DO UPDATE SET stock = excluded.stock, initial = excluded.initial,
                     opens_ms = excluded.opens_ms, closes_ms = excluded.closes_ms, per_user = excluded.per_user",
            )
            .bind(&sale.item)
            .bind(i64::from(sale.stock))
            .bind(i64::try_from(sale.opens_ms).unwrap_or(i64::MAX))
            .bind(i64::try_from(sale.closes_ms).unwrap_or(i64::MAX))
            .bind(i64::from(sale.per_user))
            .execute(p)
            .await
            .map(drop)
        })
    }

    /// `item`'s sale as set up, with the stock it has now.
    pub async fn sale(&self, item: &str) -> Result<Option<Sale>, sqlx::Error> {
        type Row = (i64, i64, i64, i64);
        let row: Option<Row> = on!(&self.db, p => {
            sqlx::query_as(
                "SELECT CAST(stock AS bigint), opens_ms, closes_ms, CAST(per_user AS bigint)
                 FROM fs_items WHERE item = $1",
            )
            .bind(item)
            .fetch_optional(p)
            .await?
        });
        let n = |v: i64| u32::try_from(v).unwrap_or(0);
        Ok(row.map(|(stock, opens, closes, per_user)| Sale {
            item: item.to_owned(),
            stock: n(stock),
            opens_ms: u64::try_from(opens).unwrap_or(0),
            closes_ms: u64::try_from(closes).unwrap_or(0),
            per_user: n(per_user),
        }))
    }

    /// `item`'s books: what was put on sale, what is left, and the units moved.
    pub async fn books(&self, item: &str) -> Result<Option<Books>, sqlx::Error> {
        type Row = (i64, i64, i64, i64, i64);
        let row: Option<Row> = on!(&self.db, p => {
            sqlx::query_as(
                "SELECT CAST(initial AS bigint), CAST(stock AS bigint), CAST(per_user AS bigint),
                     (SELECT count(*) FROM fs_stock_moves WHERE item = $1 AND kind = 'take'),
                     (SELECT count(*) FROM fs_stock_moves WHERE item = $1 AND kind = 'return')
                 FROM fs_items WHERE item = $1",
            )
            .bind(item)
            .fetch_optional(p)
            .await?
        });
        Ok(row.map(|(initial, stock, per_user, taken, returned)| Books {
            initial,
            stock,
            per_user,
            taken,
            returned,
        }))
    }

    /// Every item and its stock.
    pub async fn items(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_as("SELECT item, CAST(stock AS bigint) FROM fs_items ORDER BY item")
                .fetch_all(p)
                .await
        })
    }

    /// `item`'s stock now, if it is for sale.
    pub async fn stock(&self, item: &str) -> Result<Option<i64>, sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_scalar("SELECT CAST(stock AS bigint) FROM fs_items WHERE item = $1")
                .bind(item)
                .fetch_optional(p)
                .await
        })
    }

    /// Takes one unit of `item` for `reservation`, once.
    pub async fn take(&self, item: &str, reservation: &str) -> Result<Taken, sqlx::Error> {
        on!(&self.db, p => {
            // The move is written first: on SQLite that takes the write lock
            // before anything is read.
            let mut tx = palisade_queue::begin(p).await?;
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
        })
    }

    /// Returns the unit `reservation` took, once: `false` when it took none or
    /// was returned before.
    pub async fn give_back(&self, item: &str, reservation: &str) -> Result<bool, sqlx::Error> {
        on!(&self.db, p => {
            let mut tx = palisade_queue::begin(p).await?;
            let moved = sqlx::query(
                "INSERT INTO fs_stock_moves (reservation, item, kind)
                 SELECT $1, $2, 'return' WHERE EXISTS
                     (SELECT 1 FROM fs_stock_moves WHERE reservation = $1 AND kind = 'take')
                 ON CONFLICT DO NOTHING",
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
        })
    }
}

/// An item's books in the inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Books {
    /// Units put on sale.
    pub initial: i64,
    /// Units left.
    pub stock: i64,
    /// Units one user may hold.
    pub per_user: i64,
    /// Units taken for reservations.
    pub taken: i64,
    /// Units given back (orders cancelled).
    pub returned: i64,
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
    db: Db,
}

impl Orders {
    /// The orders in `db`, its tables created if missing.
    pub async fn new(db: impl Into<Db>) -> Result<Orders, sqlx::Error> {
        let db = db.into();
        db.declare(&ORDERS_POSTGRES, &ORDERS_SQLITE).await?;
        Ok(Orders { db })
    }

    /// The database (the queue and the sagas live beside the orders).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Places `order`, once per reservation.
    pub async fn place(&self, order: &NewOrder) -> Result<Placed, sqlx::Error> {
        let inserted: Result<Option<i64>, sqlx::Error> = on!(&self.db, p => {
            sqlx::query_scalar(
                "INSERT INTO fs_orders (reservation, item, user_id, unit) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (reservation) DO NOTHING RETURNING id",
            )
            .bind(&order.reservation)
            .bind(&order.item)
            .bind(&order.user)
            .bind(i64::from(order.unit))
            .fetch_optional(p)
            .await
        });
        match inserted {
            Ok(Some(id)) => Ok(Placed::New(id)),
            Ok(None) => {
                let id = on!(&self.db, p => {
                    sqlx::query_scalar("SELECT id FROM fs_orders WHERE reservation = $1")
                        .bind(&order.reservation)
                        .fetch_one(p)
                        .await?
                });
                Ok(Placed::Existing(id))
            }
            // The reservation's conflict is let through above: this is the user's
            // unit held by another order.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Placed::Duplicate),
            Err(e) => Err(e),
        }
    }

    /// The state of the order placed for `reservation`, if any.
    pub async fn state(&self, reservation: &str) -> Result<Option<OrderState>, sqlx::Error> {
        let s: Option<String> = on!(&self.db, p => {
            sqlx::query_scalar("SELECT state FROM fs_orders WHERE reservation = $1")
                .bind(reservation)
                .fetch_optional(p)
                .await?
        });
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
        let done = on!(&self.db, p => {
            sqlx::query(
                "UPDATE fs_orders SET state = $2, settled_at = CURRENT_TIMESTAMP
                 WHERE reservation = $1 AND state = 'pending'",
            )
            .bind(reservation)
            .bind(to)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// Users holding more than `limit` orders of `item` not cancelled.
    pub async fn users_over(&self, item: &str, limit: i64) -> Result<i64, sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT user_id FROM fs_orders WHERE item = $1 AND state <> 'cancelled'
                     GROUP BY user_id HAVING count(*) > $2) AS over",
            )
            .bind(item)
            .bind(limit)
            .fetch_one(p)
            .await
        })
    }

    /// Sagas named `saga` (recorded beside the orders) for `item` not ended:
    /// those running a step before `step` or compensating, and all of them.
    pub async fn sagas_open(&self, saga: &str, item: &str, step: i32) -> Result<(i64, i64), sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_as(
                "SELECT COALESCE(SUM(CASE WHEN state = 'compensating' OR step < $3 THEN 1 ELSE 0 END), 0),
                        count(*)
                 FROM palisade_sagas WHERE name = $1 AND input->>'item' = $2
                     AND state IN ('running', 'compensating')",
            )
            .bind(saga)
            .bind(item)
            .bind(step)
            .fetch_one(p)
            .await
        })
    }

    /// Orders of `item` not cancelled.
    pub async fn live(&self, item: &str) -> Result<i64, sqlx::Error> {
        on!(&self.db, p => {
            sqlx::query_scalar("SELECT count(*) FROM fs_orders WHERE item = $1 AND state <> 'cancelled'")
                .bind(item)
                .fetch_one(p)
                .await
        })
    }
}
