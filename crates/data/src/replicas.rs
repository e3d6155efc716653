//! The read/write split: a primary for writes, streaming replicas for reads, each
//! replica's lag measured and a lagging one given no reads, and read-your-writes
//! through causality tokens.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_balance::health::HealthConfig;
use palisade_balance::{Cluster, ClusterConfig, EndpointInfo, EndpointState, LbPolicy};
use palisade_core::{ConfigErrors, SharedClock};
use palisade_resilience::breaker::CircuitBreaker;
use sqlx::PgPool;

use crate::config::{PoolConfig, ReadBalance, ReplicaSetConfig, Server, WhenNoReplica};
use crate::error::{is_recovery_conflict, is_unavailable};
use crate::lag::LagTracker;
use crate::{DataError, Lsn};

/// A primary and its streaming replicas, as one handle: writes and transactions go
/// to the primary, reads to a replica that is up, not behind by more than
/// `max_lag`, and whose breaker is closed, and to the primary when no replica can
/// serve (or nowhere, if so configured).
///
/// ```no_run
/// # async fn demo() -> Result<(), palisade_data::DataError> {
/// use palisade_data::{ReplicaSet, ReplicaSetConfig};
///
/// let db = ReplicaSet::connect(ReplicaSetConfig {
///     primary: "postgres://app@db1/app".into(),
///     replicas: vec!["postgres://app@db2/app".into(), "postgres://app@db3/app".into()],
///     ..ReplicaSetConfig::default()
/// })
/// .await?;
/// let (_, token) = db
///     .write(|pool| async move {
///         sqlx::query("UPDATE accounts SET name = $1 WHERE id = $2")
///             .bind("Ada")
///             .bind(7_i64)
///             .execute(&pool)
///             .await
///     })
///     .await?;
/// // Sees the update: only a replica that has replayed it (or the primary) answers.
/// let name: String = db
///     .read_after(token, |pool| async move {
///         sqlx::query_scalar("SELECT name FROM accounts WHERE id = $1").bind(7_i64).fetch_one(&pool).await
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReplicaSet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("name", &self.inner.name)
            .field("replicas", &self.inner.replicas.len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    name: String,
    primary: PgPool,
    replicas: Vec<Replica>,
    cluster: Cluster,
    tracker: Mutex<LagTracker>,
    clock: SharedClock,
    max_lag: Duration,
    causal_wait: Duration,
    when_no_replica: WhenNoReplica,
    primary_reads: metrics::Counter,
    fallback_no_replica: metrics::Counter,
    fallback_causal: metrics::Counter,
}

/// One replica: its pool, and what the lag checks last saw of it.
struct Replica {
    name: String,
    addr: SocketAddr,
    pool: PgPool,
    /// The log position it had replayed to when last asked (only grows).
    replayed: AtomicU64,
    reads: metrics::Counter,
    lag_seconds: metrics::Gauge,
}

/// How a read on one replica went.
enum Attempt<T> {
    /// An answer (the value, or the query's own error) for the caller.
    Done(Result<T, DataError>),
    /// The replica could not serve it: try another.
    Elsewhere,
}

/// Why a read went to the primary.
#[derive(Clone, Copy)]
enum Fallback {
    NoReplica,
    Causal,
}

impl ReplicaSet {
    /// Connects to the primary and the replicas, checks that each replica is a
    /// standby of this primary, and measures their lag once; a background task
    /// measures it again every `lag_interval` for as long as a handle is alive.
    ///
    /// A replica that cannot be reached now is no error (it gets reads once it
    /// answers); a replica that answers as a primary, or as the standby of
    /// another cluster, is a configuration error naming it.
    pub async fn connect(config: ReplicaSetConfig) -> Result<Self, DataError> {
        Self::connect_with_clock(config, SharedClock::system()).await
    }

    /// [`connect`](Self::connect) with lag measured on `clock` (tests move a
    /// manual clock instead of waiting).
    pub async fn connect_with_clock(config: ReplicaSetConfig, clock: SharedClock) -> Result<Self, DataError> {
        let (primary, replicas) = config.check()?;
        let primary_pool = config.pool.options().connect_lazy_with(primary.options.clone());
        let mut built = Vec::with_capacity(replicas.len());
        for (i, server) in replicas.into_iter().enumerate() {
            let addr = resolve(&server)
                .await
                .map_err(|p| ConfigErrors::one(format!("replicas[{i}]"), p))?;
            built.push(Replica::new(&config.name, server, addr, &config.pool));
        }
        let identity = system_identifier(&primary_pool).await?;
        for (i, r) in built.iter().enumerate() {
            check_standby(r, identity, i).await?;
        }
        let cluster = cluster(&config, &built, clock.clone());
        let set = |target: &str| [("set", config.name.clone()), ("target", target.to_string())];
        let inner = Arc::new(Inner {
            primary: primary_pool,
            replicas: built,
            cluster,
            tracker: Mutex::new(LagTracker::new(config.max_lag.get().saturating_mul(4))),
            clock,
            max_lag: config.max_lag.get(),
            causal_wait: config.causal_wait.get(),
            when_no_replica: config.when_no_replica,
            primary_reads: metrics::counter!("palisade_data_reads_total", &set("primary")),
            fallback_no_replica: metrics::counter!(
                "palisade_data_primary_fallbacks_total",
                &[("set", config.name.clone()), ("reason", "no_replica".to_string())]
            ),
            fallback_causal: metrics::counter!(
                "palisade_data_primary_fallbacks_total",
                &[("set", config.name.clone()), ("reason", "causal".to_string())]
            ),
            name: config.name,
        });
        inner.check_lag().await;
        let measure = |inner: Arc<Inner>| async move { inner.check_lag().await };
        tokio::spawn(crate::task::every(
            Arc::downgrade(&inner),
            config.lag_interval.get(),
            measure,
        ));
        Ok(ReplicaSet { inner })
    }

    /// The primary's pool: writes, transactions, and reads that must see the
    /// latest state. After a commit, [`causal_token`](Self::causal_token) gives
    /// the token later reads can wait for.
    pub fn primary(&self) -> &PgPool {
        &self.inner.primary
    }

    /// The primary's log position now: a read given it with
    /// [`read_after`](Self::read_after) sees every transaction committed before
    /// this call.
    pub async fn causal_token(&self) -> Result<Lsn, DataError> {
        let lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(&self.inner.primary)
            .await
            .map_err(on_primary)?;
        Ok(Lsn(lsn as u64))
    }

    /// Runs `query` on the primary and returns its value with the causality token
    /// of what it wrote.
    pub async fn write<T, F, Fut>(&self, query: F) -> Result<(T, Lsn), DataError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let value = query(self.inner.primary.clone()).await.map_err(on_primary)?;
        Ok((value, self.causal_token().await?))
    }

    /// Runs the read `query` on a replica that may serve it.
    ///
    /// The query is given the chosen server's pool and may run more than once: a
    /// replica that turns out to be unreachable (or that cancels the read for a
    /// conflict with replay) is passed over and the read runs on another, then on
    /// the primary (unless `when_no_replica = "refuse"`). An error of the query
    /// itself (SQL, a missing row) is returned as it is.
    pub async fn read<T, F, Fut>(&self, query: F) -> Result<T, DataError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.read_from(None, query).await
    }

    /// Like [`read`](Self::read), but only on a server that has replayed `token`
    /// (read-your-writes): a replica known to have it, else one that gets it
    /// within `causal_wait`, else the primary.
    pub async fn read_after<T, F, Fut>(&self, token: Lsn, query: F) -> Result<T, DataError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.read_from(Some(token), query).await
    }

    /// Measures every replica's lag now (the background task does it every
    /// `lag_interval`): a replica behind by more than `max_lag`, or unreachable,
    /// gets no reads until a later check finds it caught up.
    pub async fn check_lag(&self) {
        self.inner.check_lag().await;
    }

    /// Each replica's name (`host:port`) and whether it may serve reads now.
    pub fn replicas(&self) -> Vec<(String, bool)> {
        let now = self.inner.cluster.clock().now();
        let eps = self.inner.cluster.endpoints();
        self.inner
            .replicas
            .iter()
            .map(|r| {
                let up = eps.iter().any(|e| e.addr() == r.addr && e.is_available(now));
                (r.name.clone(), up)
            })
            .collect()
    }

    async fn read_from<T, F, Fut>(&self, token: Option<Lsn>, query: F) -> Result<T, DataError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let inner = &*self.inner;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut waited = false;
        loop {
            let picked = match token {
                None => inner.pick(&tried, None),
                Some(t) => inner.pick_caught_up(t, &tried, &mut waited).await,
            };
            let Some((ep, replica)) = picked else { break };
            match inner.attempt(&ep, replica, &query).await {
                Attempt::Done(result) => return result,
                Attempt::Elsewhere => tried.push(replica.addr),
            }
        }
        let why = if token.is_some() && inner.any_available(&tried) {
            Fallback::Causal
        } else {
            Fallback::NoReplica
        };
        inner.on_primary(why, query).await
    }
}

impl Inner {
    /// A replica that may serve a read, avoiding `tried`, and whose replayed
    /// position is at least `token`.
    fn pick(&self, tried: &[SocketAddr], token: Option<Lsn>) -> Option<(Arc<EndpointState>, &Replica)> {
        let lacking = |r: &Replica| token.is_some_and(|t| r.replayed() < t);
        let mut avoid: Vec<SocketAddr> = tried.to_vec();
        avoid.extend(self.replicas.iter().filter(|r| lacking(r)).map(|r| r.addr));
        let pick = self.cluster.pick(None, &avoid).ok()?;
        let ep = pick.endpoint;
        // The cluster picks only available endpoints (it has no panic mode here),
        // but falls back to an avoided one when no other is available.
        if avoid.contains(&ep.addr()) {
            return None;
        }
        let replica = self.replicas.iter().find(|r| r.addr == ep.addr())?;
        Some((ep, replica))
    }

    /// A replica that has replayed `token`: one known to have it, else one asked
    /// now, else one that gets it within `causal_wait` (asked again with a short
    /// backoff). Waits once per read.
    async fn pick_caught_up(
        &self,
        token: Lsn,
        tried: &[SocketAddr],
        waited: &mut bool,
    ) -> Option<(Arc<EndpointState>, &Replica)> {
        if let Some(found) = self.pick(tried, Some(token)) {
            return Some(found);
        }
        if *waited || !self.any_available(tried) {
            return None;
        }
        *waited = true;
        let deadline = tokio::time::Instant::now() + self.causal_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            self.ask_replayed(tried).await;
            if let Some(found) = self.pick(tried, Some(token)) {
                return Some(found);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }

    /// Whether a replica not in `tried` may serve reads.
    fn any_available(&self, tried: &[SocketAddr]) -> bool {
        self.pick(tried, None).is_some()
    }

    /// Asks the available replicas not in `tried` how far they have replayed.
    async fn ask_replayed(&self, tried: &[SocketAddr]) {
        let now = self.cluster.clock().now();
        let eps = self.cluster.endpoints();
        let asks = self.replicas.iter().filter(|r| {
            !tried.contains(&r.addr) && eps.iter().any(|e| e.addr() == r.addr && e.is_available(now))
        });
        futures_util::future::join_all(asks.map(|r| async move {
            if let Ok(Some(lsn)) = replayed(&r.pool).await {
                r.note_replayed(lsn);
            }
        }))
        .await;
    }

    /// Runs `query` on `replica`, behind its breaker.
    async fn attempt<T, F, Fut>(&self, ep: &EndpointState, replica: &Replica, query: &F) -> Attempt<T>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let Some(breaker) = ep.breaker() else {
            return Attempt::Elsewhere;
        };
        let Ok(permit) = breaker.try_acquire() else {
            return Attempt::Elsewhere;
        };
        // In flight, for the least-request balancer. (No latency is recorded: no
        // balancer offered here weighs it.)
        let _in_flight = ep.start();
        match query(replica.pool.clone()).await {
            Ok(v) => {
                permit.success();
                replica.reads.increment(1);
                Attempt::Done(Ok(v))
            }
            Err(e) if is_unavailable(&e) => {
                permit.failure();
                tracing::warn!(set = %self.name, replica = %replica.name, error = %e, "replica unavailable; the read goes elsewhere");
                Attempt::Elsewhere
            }
            Err(e) if is_recovery_conflict(&e) => {
                permit.success();
                tracing::debug!(set = %self.name, replica = %replica.name, error = %e, "read cancelled by replay; the read goes elsewhere");
                Attempt::Elsewhere
            }
            Err(e) => {
                permit.success();
                Attempt::Done(Err(DataError::Query(e)))
            }
        }
    }

    /// A read that no replica served: on the primary, or refused.
    async fn on_primary<T, F, Fut>(&self, why: Fallback, query: F) -> Result<T, DataError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        match why {
            Fallback::Causal => self.fallback_causal.increment(1),
            Fallback::NoReplica if self.replicas.is_empty() => {}
            Fallback::NoReplica => {
                if self.when_no_replica == WhenNoReplica::Refuse {
                    return Err(DataError::NoReplica {
                        set: self.name.clone(),
                    });
                }
                self.fallback_no_replica.increment(1);
            }
        }
        let value = query(self.primary.clone()).await.map_err(on_primary)?;
        self.primary_reads.increment(1);
        Ok(value)
    }

    /// One lag check: the primary's position, then every replica's.
    async fn check_lag(&self) {
        let position: Result<i64, _> =
            sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&self.primary)
                .await;
        match position {
            Ok(lsn) => self.lock_tracker().primary_at(self.clock.now(), Lsn(lsn as u64)),
            Err(e) => tracing::warn!(set = %self.name, error = %e, "lag check: primary unavailable"),
        }
        let answers = futures_util::future::join_all(
            self.replicas
                .iter()
                .map(|r| async move { (r, replayed(&r.pool).await) }),
        )
        .await;
        let now = self.clock.now();
        let eps = self.cluster.endpoints();
        for (replica, answer) in answers {
            let Some(ep) = eps.iter().find(|e| e.addr() == replica.addr) else {
                continue;
            };
            let lag = match answer {
                Ok(Some(lsn)) => {
                    replica.note_replayed(lsn);
                    self.lock_tracker().lag(now, lsn)
                }
                Ok(None) => {
                    tracing::error!(set = %self.name, replica = %replica.name, "replica is not in recovery (promoted?); it gets no reads");
                    None
                }
                Err(e) => {
                    tracing::warn!(set = %self.name, replica = %replica.name, error = %e, "lag check: replica unavailable");
                    None
                }
            };
            let ok = lag.is_some_and(|l| l <= self.max_lag);
            replica.lag_seconds.set(lag.map_or(f64::NAN, |l| l.as_secs_f64()));
            if self.cluster.record_probe(ep, ok).is_some() {
                tracing::info!(set = %self.name, replica = %replica.name, lag = ?lag, serving = ok, "replica's reads changed");
            }
        }
    }

    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, LagTracker> {
        // The tracker is only written under the lock with no await inside: a panic
        // there leaves it consistent.
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Replica {
    fn new(set: &str, server: Server, addr: SocketAddr, pool_config: &PoolConfig) -> Self {
        let labels = [("set", set.to_string()), ("target", server.authority.clone())];
        Replica {
            pool: pool_config.options().connect_lazy_with(server.options.clone()),
            addr,
            replayed: AtomicU64::new(0),
            reads: metrics::counter!("palisade_data_reads_total", &labels),
            lag_seconds: metrics::gauge!(
                "palisade_data_replica_lag_seconds",
                &[("set", set.to_string()), ("replica", server.authority.clone())]
            ),
            name: server.authority,
        }
    }

    fn replayed(&self) -> Lsn {
        Lsn(self.replayed.load(Ordering::Acquire))
    }

    fn note_replayed(&self, lsn: Lsn) {
        self.replayed.fetch_max(lsn.0, Ordering::AcqRel);
    }
}

/// The replica's replayed position; `None` when it is not a standby.
async fn replayed(pool: &PgPool) -> Result<Option<Lsn>, sqlx::Error> {
    let lsn: Option<i64> = sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(pool)
        .await?;
    Ok(lsn.map(|l| Lsn(l as u64)))
}

/// The database cluster's identity, shared by a primary and its physical standbys.
async fn system_identifier(pool: &PgPool) -> Result<i64, DataError> {
    sqlx::query_scalar("SELECT system_identifier FROM pg_control_system()")
        .fetch_one(pool)
        .await
        .map_err(on_primary)
}

/// Refuses a replica that answers as a primary or as another cluster's standby.
async fn check_standby(replica: &Replica, primary: i64, index: usize) -> Result<(), DataError> {
    let row: Result<(bool, i64), _> =
        sqlx::query_as("SELECT pg_is_in_recovery(), system_identifier FROM pg_control_system()")
            .fetch_one(&replica.pool)
            .await;
    let field = format!("replicas[{index}]");
    match row {
        Ok((false, _)) => Err(ConfigErrors::one(
            field,
            format!("{} is not in recovery: a primary, not a replica", replica.name),
        )
        .into()),
        Ok((true, id)) if id != primary => Err(ConfigErrors::one(
            field,
            format!(
                "{} is a standby of another cluster (system identifier {id}, the primary's is {primary})",
                replica.name
            ),
        )
        .into()),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(replica = %replica.name, error = %e, "replica unreachable at start; it gets reads once it answers");
            Ok(())
        }
    }
}

/// The balance cluster over the replicas: a breaker each, health set by the lag
/// checks (one check flips it), no panic mode (a lagging replica never serves).
fn cluster(config: &ReplicaSetConfig, replicas: &[Replica], clock: SharedClock) -> Cluster {
    let mut c = ClusterConfig::new(config.name.clone());
    c.lb = match config.balance {
        ReadBalance::RoundRobin => LbPolicy::RoundRobin,
        ReadBalance::LeastRequest => LbPolicy::LeastRequest,
    };
    c.outlier = None;
    c.panic_threshold = 0.0;
    c.health = Some(HealthConfig {
        interval: config.lag_interval.get(),
        timeout: config.pool.acquire_timeout.get(),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    });
    let breaker = config.pool.breaker();
    let set = config.name.clone();
    let names: Vec<(SocketAddr, String)> = replicas.iter().map(|r| (r.addr, r.name.clone())).collect();
    let breaker_clock = clock.clone();
    let cluster = Cluster::with_clock(c, clock).with_breakers(move |info| {
        let name = names
            .iter()
            .find(|(a, _)| *a == info.addr)
            .map_or("?", |(_, n)| n.as_str());
        CircuitBreaker::builder(format!("data:{set}:{name}"))
            .config(breaker.clone())
            .shared_clock(breaker_clock.clone())
            .build()
            .unwrap_or_else(|e| unreachable!("the pool's breaker settings were validated: {e}"))
    });
    cluster.set_endpoints(replicas.iter().map(|r| EndpointInfo::new(r.addr)));
    cluster
}

/// The TCP address a server's name resolves to.
async fn resolve(server: &Server) -> Result<SocketAddr, String> {
    let host = server.options.get_host();
    let port = server.options.get_port();
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host} does not resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// A primary's error: its unavailability named, a query's error as it is.
fn on_primary(e: sqlx::Error) -> DataError {
    if is_unavailable(&e) {
        DataError::Unavailable {
            target: "primary".into(),
            reason: e.to_string(),
        }
    } else {
        DataError::Query(e)
    }
}
