//! `flash-sale`: one instance of the flash-sale service, distributed (a shared
//! Redis for the stock gate, PostgreSQL for the inventory and the orders; run as
//! many as needed behind the Palisade gateway) or, with none of those given,
//! embedded (the gate in process, SQLite files; one instance). SIGTERM or Ctrl-C
//! stops one.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use palisade_flash_sale::run::{Role, Settings, start, start_naive};

/// Which design serves the purchases.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Design {
    /// The layers in front of the stock gate, the orders by saga.
    Layered,
    /// Every attempt a transaction in the database.
    Naive,
}

/// One instance of the flash-sale service.
#[derive(Debug, Parser)]
#[command(name = "flash-sale", version)]
struct Args {
    /// Where it listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The stock gate's Redis, shared by every instance (without it, the gate is
    /// in this process: run one instance only).
    #[arg(long, env = "FLASH_SALE_REDIS")]
    redis: Option<String>,
    /// The prefix of the gate's keys in Redis.
    #[arg(long, default_value = "flash-sale:")]
    prefix: String,
    /// The inventory's database: `postgres://...` or `sqlite:path`.
    #[arg(
        long,
        env = "FLASH_SALE_INVENTORY_DB",
        default_value = "sqlite:flash-sale-inventory.db"
    )]
    inventory_db: String,
    /// The orders' database (the job queue and the sagas live there too):
    /// `postgres://...` or `sqlite:path`.
    #[arg(
        long,
        env = "FLASH_SALE_ORDERS_DB",
        default_value = "sqlite:flash-sale-orders.db"
    )]
    orders_db: String,
    /// A reservation's life before its order must have taken it (seconds).
    #[arg(long, default_value_t = 300)]
    reservation_ttl_secs: u64,
    /// How long an order waits for its payment (seconds).
    #[arg(long, default_value_t = 900)]
    pay_within_secs: u64,
    /// Order saga steps run at once in this instance.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// The design: `layered` (the service), or `naive` (every attempt a
    /// transaction in --inventory-db; kept for the comparison benchmark).
    #[arg(long, value_enum, default_value = "layered")]
    design: Design,
    /// What this instance does: serve the routes and run the jobs, or one of them.
    #[arg(long, value_enum, default_value = "all")]
    role: Role,
    /// How often expired reservations are swept (seconds).
    #[arg(long, default_value_t = 1)]
    sweep_every_secs: u64,
    /// How long a job taken by a worker that stopped answering waits before it
    /// runs elsewhere (seconds).
    #[arg(long, default_value_t = 10)]
    lease_secs: u64,
    /// How often the gate is reconciled with the inventory (seconds).
    #[arg(long, default_value_t = 60)]
    reconcile_every_secs: u64,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let settings = Settings {
        listen: a.listen,
        redis: a.redis,
        prefix: a.prefix,
        inventory_db: a.inventory_db,
        orders_db: a.orders_db,
        reservation_ttl: Duration::from_secs(a.reservation_ttl_secs),
        pay_within: Duration::from_secs(a.pay_within_secs),
        workers: a.workers,
        sweep_every: Duration::from_secs(a.sweep_every_secs.max(1)),
        reconcile_every: Duration::from_secs(a.reconcile_every_secs.max(1)),
        role: a.role,
        lease: Duration::from_secs(a.lease_secs.max(1)),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.to_string()),
    };
    rt.block_on(async {
        let started = match a.design {
            Design::Layered => start(settings).await,
            Design::Naive => start_naive(settings).await,
        };
        let running = match started {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let _ = match running.addr {
            Some(addr) => writeln!(std::io::stdout(), "flash-sale: listening on {addr}"),
            None => writeln!(std::io::stdout(), "flash-sale: running jobs"),
        };
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => return fail(&e.to_string()),
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        running.shutdown(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    })
}

fn fail(why: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "flash-sale: {why}");
    ExitCode::from(2)
}
