//! What the flash-sale tests share: the time, and databases of their own on the
//! PostgreSQL server `scripts/test` started.

#![allow(dead_code, unused_imports)] // each test file uses its own part

use std::time::SystemTime;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A sale of `stock` units of `item`, open from a minute ago for an hour, `per_user` each.
pub fn sale(item: &str, stock: u32, per_user: u32) -> palisade_flash_sale::Sale {
    let now = now_ms();
    palisade_flash_sale::Sale {
        item: item.into(),
        stock,
        opens_ms: now - 60_000,
        closes_ms: now + 3_600_000,
        per_user,
    }
}

pub use palisade_testkit::fresh_db;

/// A pool on a new database.
pub async fn fresh_pool(prefix: &str) -> sqlx::PgPool {
    palisade_testkit::fresh_pool(prefix, 16).await
}

/// A gate on the run's Redis, its keys under a prefix of its own.
pub async fn redis_gate() -> palisade_flash_sale::Gate {
    let url = palisade_testkit::env("PALISADE_TEST_REDIS_URL");
    let conn = redis::Client::open(url)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let prefix = format!("{}:", palisade_testkit::unique("fs-test"));
    palisade_flash_sale::Gate::redis(conn, prefix)
}

/// The services on the run's Redis (keys under a prefix of their own) and on new
/// inventory and orders databases; the orders' pool, where the queue and the
/// sagas go.
pub async fn services() -> (std::sync::Arc<palisade_flash_sale::order::Services>, sqlx::PgPool) {
    let gate = redis_gate().await;
    let inventory = palisade_flash_sale::Inventory::new(fresh_pool("fs_inv").await)
        .await
        .unwrap();
    let orders_pool = fresh_pool("fs_ord").await;
    let orders = palisade_flash_sale::Orders::new(orders_pool.clone())
        .await
        .unwrap();
    let services = palisade_flash_sale::order::Services {
        gate,
        inventory,
        orders,
    };
    (std::sync::Arc::new(services), orders_pool)
}

/// The order sagas over `services`, each transition's saga id sent to the
/// receiver, and a runner of their steps on `pool`.
pub async fn sagas(
    services: &std::sync::Arc<palisade_flash_sale::order::Services>,
    pool: sqlx::PgPool,
) -> (
    palisade_flow::saga::Sagas,
    tokio::sync::mpsc::UnboundedReceiver<(i64, palisade_flow::saga::Transition)>,
    palisade_queue::RunnerHandle,
) {
    use palisade_flow::saga::Transition;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sagas = palisade_flow::saga::Sagas::builder(pool.clone())
        .register(palisade_flash_sale::order::order_saga(services))
        .observe(move |t| {
            let saga = match t {
                Transition::StepDone { saga, .. }
                | Transition::StepUndone { saga, .. }
                | Transition::Aborted { saga, .. } => *saga,
            };
            let _ = tx.send((saga, t.clone()));
        })
        .build()
        .await
        .unwrap();
    let queue = palisade_queue::Queue::postgres(pool).await.unwrap();
    let config = palisade_queue::RunnerConfig {
        queues: vec![palisade_queue::QueueConfig::new("sagas", 8)],
        poll_interval: std::time::Duration::from_millis(20),
        backoff: palisade_resilience::retry::Backoff::Fixed(std::time::Duration::from_millis(10)),
        ..palisade_queue::RunnerConfig::default()
    };
    let runner = palisade_queue::Runner::new(queue, config)
        .register(sagas.worker())
        .start()
        .await
        .unwrap();
    (sagas, rx, runner)
}

/// A new SQLite database in a file of its own (under the system's temporary
/// directory).
pub async fn fresh_sqlite(name: &str) -> palisade_flash_sale::store::Db {
    let dir = std::env::temp_dir().join(format!("fs-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join(format!("{name}.db")).display());
    palisade_flash_sale::store::Db::connect(&url).await.unwrap()
}

/// Starts the `flash-sale` binary with `args` (listening on a free port); the
/// process and, unless it only runs jobs, the address it says it listens on.
pub fn start_binary(args: &[&str]) -> (std::process::Child, Option<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flash-sale"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("the process said nothing").unwrap();
    let addr = line.strip_prefix("flash-sale: listening on ").map(str::to_owned);
    assert!(addr.is_some() || line == "flash-sale: running jobs", "{line}");
    (child, addr)
}
