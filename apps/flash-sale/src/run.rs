//! One instance of the service: the gate in a shared Redis, the inventory and the
//! orders in their PostgreSQL databases (the queue and the sagas beside the
//! orders), the HTTP routes, and a runner of the order sagas, the sweeper and the
//! reconciliation (each periodic job enqueued once per period across every
//! instance). Or embedded: the gate in process and the databases in SQLite
//! files, one instance.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_flow::reconcile::ReconcileJob;
use palisade_flow::saga::{SagaDb, Sagas};
use palisade_queue::{NewJob, Periodic, Queue, QueueConfig, Runner, RunnerConfig, RunnerHandle, Worker};
use tokio::task::JoinHandle;

use crate::gate::Gate;
use crate::naive::Naive;
use crate::order::{Services, order_saga};
use crate::service::{App, router};
use crate::store::{Db, Inventory, Orders};
use crate::upkeep::{StockReconciliation, SweepJob};

/// Where an instance listens and what it connects to.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HTTP listener.
    pub listen: SocketAddr,
    /// The gate's Redis (`redis://host:port/db`), shared by every instance; with
    /// none, the gate is in this process (one instance only).
    pub redis: Option<String>,
    /// The keys' prefix in Redis.
    pub prefix: String,
    /// The inventory's database (`postgres://...` or `sqlite:path`).
    pub inventory_db: String,
    /// The orders' database (the queue and the sagas live there too;
    /// `postgres://...` or `sqlite:path`).
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
    /// What this instance does.
    pub role: Role,
    /// How long a job taken by a worker that stopped answering stays its
    /// worker's before it runs elsewhere.
    pub lease: Duration,
}

/// What an instance does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serves the routes and runs the jobs.
    All,
    /// Serves the routes only (its purchases' sagas run on the workers).
    Api,
    /// Runs the jobs only: the order sagas, the sweeper, the reconciliation.
    Worker,
}

/// A running instance.
#[derive(Debug)]
pub struct Running {
    /// Where it listens (not for a worker).
    pub addr: Option<SocketAddr>,
    /// Its state (counts, services); none for the naive design.
    pub app: Option<Arc<App>>,
    runner: Option<RunnerHandle>,
    server: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops serving, then lets the runner finish its steps (within `grace`).
    pub async fn shutdown(self, grace: Duration) {
        if let Some(server) = self.server {
            server.abort();
        }
        if let Some(runner) = self.runner {
            runner.shutdown(grace).await;
        }
    }
}

/// The gate and the two databases `s` names; the error names the option that
/// could not be used.
async fn connect(s: &Settings) -> Result<Services, String> {
    let gate = match &s.redis {
        Some(url) => {
            let within = Duration::from_secs(10);
            let redis = redis::Client::open(url.as_str()).map_err(|e| format!("--redis: {e}"))?;
            // A plain connection first: it fails at once where the manager would retry.
            redis_within(within, redis.get_multiplexed_async_connection()).await?;
            let conn = redis_within(within, redis.get_connection_manager()).await?;
            Gate::redis(conn, s.prefix.clone())
        }
        None => Gate::local(),
    };
    let db = |url: String, what: &'static str| async move {
        Db::connect(&url).await.map_err(|e| format!("{what}: {e}"))
    };
    let inventory = Inventory::new(db(s.inventory_db.clone(), "--inventory-db").await?)
        .await
        .map_err(|e| format!("--inventory-db: {e}"))?;
    let orders = Orders::new(db(s.orders_db.clone(), "--orders-db").await?)
        .await
        .map_err(|e| format!("--orders-db: {e}"))?;
    Ok(Services {
        gate,
        inventory,
        orders,
    })
}

impl From<Db> for SagaDb {
    fn from(db: Db) -> SagaDb {
        match db {
            Db::Postgres(p) => SagaDb::Postgres(p),
            Db::Sqlite(p) => SagaDb::Sqlite(p),
        }
    }
}

/// The queue in `db`.
async fn queue(db: &Db) -> Result<Queue, palisade_queue::QueueError> {
    match db {
        Db::Postgres(p) => Queue::postgres(p.clone()).await,
        Db::Sqlite(p) => Queue::sqlite(p.clone()).await,
    }
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
    if s.redis.is_none() && s.role != Role::All {
        return Err("--role api and --role worker need --redis: a gate in process is one instance's".into());
    }
    let services = Arc::new(connect(&s).await?);
    let orders_db = services.orders.db().clone();
    let queue = queue(&orders_db).await.map_err(|e| format!("--orders-db: {e}"))?;
    let sagas = Sagas::builder(orders_db)
        .register(order_saga(&services))
        .build()
        .await
        .map_err(|e| format!("--orders-db: {e}"))?;
    // A gate that lost its sales (an embedded process restarted, a Redis
    // restarted empty) has them back before the first purchase.
    let reconciliation = StockReconciliation::new(services.clone());
    let reopened = reconciliation
        .reopen_missing()
        .await
        .map_err(|e| format!("the gate: {e}"))?;
    if reopened > 0 {
        tracing::info!(reopened, "sales opened again in the gate from the inventory");
    }
    let runner = match s.role {
        Role::Api => None,
        Role::All | Role::Worker => Some(run_jobs(&s, queue, &sagas, &services, reconciliation).await?),
    };
    let app = Arc::new(App::new(services, sagas, s.reservation_ttl, s.pay_within));
    let (addr, server) = match s.role {
        Role::Worker => (None, None),
        Role::All | Role::Api => {
            let (addr, server) = serve(s.listen, router(app.clone())).await?;
            (Some(addr), Some(server))
        }
    };
    Ok(Running {
        addr,
        app: Some(app),
        runner,
        server,
    })
}

/// Serves the naive design (every attempt a transaction in `s.inventory_db`),
/// for comparison.
pub async fn start_naive(s: Settings) -> Result<Running, String> {
    let db = Db::connect(&s.inventory_db)
        .await
        .map_err(|e| format!("--inventory-db: {e}"))?;
    let naive = Naive::new(db).await.map_err(|e| format!("--inventory-db: {e}"))?;
    let (addr, server) = serve(s.listen, crate::naive::router(Arc::new(naive))).await?;
    Ok(Running {
        addr: Some(addr),
        app: None,
        runner: None,
        server: Some(server),
    })
}

/// Runs the order sagas, and the sweeper and the reconciliation as periodic jobs.
async fn run_jobs(
    s: &Settings,
    queue: Queue,
    sagas: &Sagas,
    services: &Arc<Services>,
    reconciliation: StockReconciliation,
) -> Result<RunnerHandle, String> {
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
        lease: s.lease,
        rescue_interval: s.lease / 2,
        poll_interval: Duration::from_millis(200),
        ..RunnerConfig::default()
    };
    Runner::new(queue, config)
        .register(sagas.worker())
        .register(SweepJob(services.clone()))
        .register(ReconcileJob(reconciliation))
        .start()
        .await
        .map_err(|e| format!("the job runner: {e}"))
}

/// Serves `routes` on `listen`.
async fn serve(listen: SocketAddr, routes: axum::Router) -> Result<(SocketAddr, JoinHandle<()>), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, routes).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });
    Ok((addr, server))
}
