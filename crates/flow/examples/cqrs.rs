//! CQRS on the event store: bank accounts whose write model is their events and
//! whose read model is a projection table.
//!
//! ```sh
//! PALISADE_DATABASE_URL=postgres://postgres@127.0.0.1/bank cargo run -p palisade-flow --example cqrs
//! ```
//!
//! Commands load an account from its events (after its latest snapshot), decide,
//! and append the new events at the version they loaded (a concurrent command on
//! the same account makes one of them retry). Queries read `account_balances`, which
//! a projector keeps from the events; it can be rebuilt from zero at any time.

#![allow(clippy::print_stdout)] // an example prints what it does

use futures_util::future::BoxFuture;
use palisade_flow::events::{
    EventError, EventStore, Expected, NewEvent, Projection, Projector, RecordedEvent,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

/// What happens to an account.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
}

/// The write model: the state a command decides on.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    open: bool,
    balance: i64,
    version: i64,
}

impl Account {
    fn apply(&mut self, e: &AccountEvent) {
        match e {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

/// The command side.
struct Bank {
    store: EventStore,
}

impl Bank {
    async fn load(&self, id: &str) -> Result<Account, EventError> {
        let (snapshot, events) = self.store.load::<Account>(id).await?;
        let mut account = snapshot.map(|s| s.state).unwrap_or_default();
        for e in events {
            account.apply(&e.data()?);
            account.version = e.version;
        }
        Ok(account)
    }

    /// Runs a command: load, decide, append at the loaded version; on a conflict
    /// (another command on the account got there first), again.
    async fn handle(
        &self,
        id: &str,
        decide: impl Fn(&Account) -> Result<Vec<AccountEvent>, String>,
    ) -> Result<(), String> {
        loop {
            let account = self.load(id).await.map_err(|e| e.to_string())?;
            let events: Vec<NewEvent> = decide(&account)?
                .iter()
                .map(|e| NewEvent::new(kind(e), e).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
            let expected = if account.version == 0 {
                Expected::NoStream
            } else {
                Expected::Exact(account.version)
            };
            match self.store.append(id, expected, &events).await {
                Ok(_) => return Ok(()),
                Err(EventError::Conflict { .. }) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn kind(e: &AccountEvent) -> &'static str {
    match e {
        AccountEvent::Opened { .. } => "Opened",
        AccountEvent::Deposited { .. } => "Deposited",
        AccountEvent::Withdrawn { .. } => "Withdrawn",
    }
}

/// The query side: one row per account.
struct Balances;

impl Projection for Balances {
    fn name(&self) -> &str {
        "account_balances"
    }

    fn apply<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        event: &'c RecordedEvent,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let (owner, delta) = match event.data::<AccountEvent>() {
                Ok(AccountEvent::Opened { owner }) => (Some(owner), 0),
                Ok(AccountEvent::Deposited { amount }) => (None, amount),
                Ok(AccountEvent::Withdrawn { amount }) => (None, -amount),
                Err(_) => return Ok(()),
            };
            sqlx::query(
                "INSERT INTO account_balances (account, owner, balance) VALUES ($1, coalesce($2, ''), $3)
                 ON CONFLICT (account) DO UPDATE SET
                     owner = coalesce($2, account_balances.owner), balance = account_balances.balance + $3",
            )
            .bind(&event.stream)
            .bind(owner)
            .bind(delta)
            .execute(conn)
            .await
            .map(drop)
        })
    }

    fn reset<'c>(&'c self, conn: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE account_balances")
                .execute(conn)
                .await
                .map(drop)
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("PALISADE_DATABASE_URL")
        .map_err(|_| "set PALISADE_DATABASE_URL to a PostgreSQL database")?;
    let pool = PgPool::connect(&url).await?;
    let store = EventStore::new(pool.clone()).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS account_balances (account text PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL)")
        .execute(&pool)
        .await?;
    let bank = Bank { store: store.clone() };
    let id = format!("account-{:x}", fastrand::u32(..));

    bank.handle(&id, |a| {
        if a.open {
            Err("already open".into())
        } else {
            Ok(vec![AccountEvent::Opened { owner: "Ada".into() }])
        }
    })
    .await?;
    bank.handle(&id, |_| Ok(vec![AccountEvent::Deposited { amount: 100 }]))
        .await?;
    let refused = bank
        .handle(&id, |a| {
            if a.balance < 500 {
                Err(format!("insufficient funds: {}", a.balance))
            } else {
                Ok(vec![AccountEvent::Withdrawn { amount: 500 }])
            }
        })
        .await;
    println!("withdraw 500: {refused:?}");
    bank.handle(&id, |_| Ok(vec![AccountEvent::Withdrawn { amount: 30 }]))
        .await?;
    let account = bank.load(&id).await?;
    store.save_snapshot(&id, account.version, &account).await?;

    let projector = Projector::new(store, Balances);
    projector.catch_up().await?;
    let (owner, balance): (String, i64) =
        sqlx::query_as("SELECT owner, balance FROM account_balances WHERE account = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await?;
    println!(
        "{id}: write model balance {} at version {}; read model {owner} {balance}",
        account.balance, account.version
    );
    let replayed = projector.rebuild().await?;
    println!("read model rebuilt from {replayed} events");
    Ok(())
}
