//! One instance of the service, distributed: the gate in a shared Redis, the
//! inventory and the orders in their PostgreSQL databases (the queue and the
//! sagas beside the orders), the HTTP routes, and a runner of the order sagas,
//! the sweeper and the reconciliation (each periodic job enqueued once per period
//! across every instance).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_flow::reconcile::ReconcileJob;
use palisade_flow::saga::Sagas;
use palisade_queue::{NewJob, Periodic, Queue, QueueConfig, Runner, RunnerConfig, RunnerHandle, Worker};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::gate::Gate;
use crate::order::{Services, order_saga};
use crate::service::{App, router};
use crate::store::{Inventory, Orders};
use crate::upkeep::{StockReconciliation, SweepJob};

/// Where an instance listens and what it connects to.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HTTP listener.
    pub listen: SocketAddr,
    /// The gate's Redis (`redis://host:port/db`).
    pub redis: String,
    /// The keys' prefix in Redis.
    pub prefix: String,
    /// The inventory's database.
    pub inventory_db: String,
    /// The orders' database (the queue and the sagas live there too).
    pub orders_db: String,
    /// A reservation's life before its order must have converted it.
    pub reservation_ttl: Duration,
    /// How long an order waits for its payment.
    pub pay_within: Duration,
    /// Order saga steps run at once in this instance.
    pub workers: usize,
    /// How often expired reservations are swept.
    pub sweep_every: Duration,
    /// How often the gate is reconciled with the inventory.
    pub reconcile_every: Duration,
}

/// A running instance.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state (counts, services).
    pub app: Arc<App>,
    runner: RunnerHandle,
    server: JoinHandle<()>,
}

impl Running {
    /// Stops serving, then lets the runner finish its steps (within `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.server.abort();
        self.runner.shutdown(grace).await;
    }
}

/// The gate and the two databases `s` names, and the orders' pool (where the
/// queue and the sagas go); the error names the option that could not be used.
async fn connect(s: &Settings) -> Result<(Services, PgPool), String> {
    let within = Duration::from_secs(10);
    let redis = redis::Client::open(s.redis.as_str()).map_err(|e| format!("--redis: {e}"))?;
    // A plain connection first: it fails at once where the manager would retry.
    redis_within(within, redis.get_multiplexed_async_connection()).await?;
    let conn = redis_within(within, redis.get_connection_manager()).await?;
    let pool = |url: String, what: &'static str| async move {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(within)
            .connect(&url)
            .await
            .map_err(|e| format!("{what}: {e}"))
    };
    let inventory = pool(s.inventory_db.clone(), "--inventory-db").await?;
    let inventory = Inventory::new(inventory)
        .await
        .map_err(|e| format!("--inventory-db: {e}"))?;
    let orders_pool = pool(s.orders_db.clone(), "--orders-db").await?;
    let orders = Orders::new(orders_pool.clone())
        .await
        .map_err(|e| format!("--orders-db: {e}"))?;
    let gate = Gate::redis(conn, s.prefix.clone());
    Ok((
        Services {
            gate,
            inventory,
            orders,
        },
        orders_pool,
    ))
}

/// `call` to Redis within `within`; the error names `--redis`.
async fn redis_within<T>(
    within: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(within, call).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("--redis: {e}")),
        Err(_) => Err(format!("--redis: no answer within {within:?}")),
    }
}

/// Connects everything and serves; the error says what could not be reached.
pub async fn start(s: Settings) -> Result<Running, String> {
    let (services, orders_pool) = connect(&s).await?;
    let services = Arc::new(services);
    let sagas = Sagas::builder(orders_pool.clone())
        .register(order_saga(&services))
        .build()
        .await
        .map_err(|e| format!("--orders-db: {e}"))?;
    let queue = Queue::postgres(orders_pool.clone())
        .await
        .map_err(|e| format!("--orders-db: {e}"))?;
    let periodic = |kind: &str, every: Duration| {
        let job = NewJob::new(kind, &serde_json::json!({})).map_err(|e| e.to_string())?;
        Ok::<_, String>(Periodic::every(kind, every, job))
    };
    let config = RunnerConfig {
        queues: vec![
            QueueConfig::new("sagas", s.workers.max(1)),
            QueueConfig::new("default", 2),
        ],
        periodic: vec![
            periodic(SweepJob::KIND, s.sweep_every)?,
            periodic(
                <ReconcileJob<StockReconciliation> as Worker>::KIND,
                s.reconcile_every,
            )?,
        ],
        ..RunnerConfig::default()
    };
    let runner = Runner::new(queue, config)
        .register(sagas.worker())
        .register(SweepJob(services.clone()))
        .register(ReconcileJob(StockReconciliation::new(
            services.clone(),
            orders_pool,
        )))
        .start()
        .await
        .map_err(|e| format!("the job runner: {e}"))?;
    let app = Arc::new(App::new(services, sagas, s.reservation_ttl, s.pay_within));
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", s.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let routes = router(app.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, routes).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });
    Ok(Running {
        addr,
        app,
        runner,
        server,
    })
}
