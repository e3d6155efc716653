//! Sharding: a pool per shard, a key's calls sent to the shard that owns it
//! behind that shard's breaker, and calls that span every shard gathered under a
//! per-shard timeout and an explicit policy for partial results.
//!
//! With a control database, the set's layout lives there and can be changed
//! while the service runs ([`Resharder`](crate::Resharder)): every router follows
//! the row, and every write runs in a transaction that first reads its shard's
//! epoch under a share lock, so a write made under an outdated view of the
//! resharding is refused and retried under the new one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use palisade_core::config::Dur;
use palisade_core::{ConfigError, ConfigErrors, Instant, SharedClock};
use palisade_resilience::breaker::CircuitBreaker;
use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

use crate::DataError;
use crate::config::{PoolConfig, server};
use crate::control::{self, Phase};
use crate::error::is_unavailable;
use crate::shard_map::{KeyRange, Layout, Placement, ShardMap};

/// One shard: its name and its server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// The shard's name (placement hashes it: renaming a shard moves its keys).
    pub name: String,
    /// Its PostgreSQL URL.
    pub url: String,
}

/// A sharded database: its shards, how keys are placed on them, and the patience
/// each shard gets.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// The set's name, in metrics, errors and the control database.
    pub name: String,
    /// How keys are placed (the first layout; with a control database, the
    /// layout recorded there rules once it exists).
    pub placement: Placement,
    /// Points per shard on the ring (`placement = "ring"`).
    pub vnodes: u32,
    /// The shard servers this process can reach, in order (the order matters to
    /// `jump`). A shard a resharding will add is listed here before it starts.
    pub shards: Vec<ShardConfig>,
    /// The shards that own keys in the first layout, in order (empty: every
    /// listed shard).
    pub owners: Vec<String>,
    /// The hash ranges each shard owns (`placement = "ranges"`).
    pub ranges: Vec<KeyRange>,
    /// How long one shard's call may take.
    pub timeout: Dur,
    /// Every shard's pool and breaker.
    pub pool: PoolConfig,
    /// The control database's URL: the layout and any resharding in progress are
    /// recorded there, and writes are fenced by epoch (`None`: a fixed layout).
    pub control: Option<String>,
    /// How often the control row is read again (a router's view older than three
    /// of these is read again before it is used).
    pub refresh: Dur,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            name: "main".into(),
            placement: Placement::Ring,
            vnodes: 150,
            shards: Vec::new(),
            owners: Vec::new(),
            ranges: Vec::new(),
            timeout: Dur(Duration::from_secs(5)),
            pool: PoolConfig::default(),
            control: None,
            refresh: Dur(Duration::from_secs(1)),
        }
    }
}

impl ShardsConfig {
    /// The first layout: the owners (or every listed shard), placed as
    /// configured.
    pub fn layout(&self) -> Layout {
        let shards = if self.owners.is_empty() {
            self.shards.iter().map(|s| s.name.clone()).collect()
        } else {
            self.owners.clone()
        };
        Layout {
            placement: self.placement,
            vnodes: self.vnodes,
            shards,
            ranges: self.ranges.clone(),
        }
    }

    /// The shard map of the first layout, or every problem with the settings,
    /// each naming its field.
    pub fn map(&self) -> Result<ShardMap, ConfigErrors> {
        let mut errors = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            if let Err(p) = server(&s.url) {
                errors.push(ConfigError::new(format!("shards[{i}].url"), p));
            } else if self.shards[..i].iter().any(|o| o.url == s.url) {
                errors.push(ConfigError::new(
                    format!("shards[{i}].url"),
                    "is another shard's database too",
                ));
            }
        }
        if self.timeout.is_zero() {
            errors.push(ConfigError::new("timeout", "must be more than zero"));
        }
        if let Some(url) = &self.control
            && let Err(p) = server(url)
        {
            errors.push(ConfigError::new("control", p));
        }
        if self.refresh.is_zero() {
            errors.push(ConfigError::new("refresh", "must be more than zero"));
        }
        for (i, o) in self.owners.iter().enumerate() {
            if !self.shards.iter().any(|s| s.name == *o) {
                errors.push(ConfigError::new(
                    format!("owners[{i}]"),
                    format!("{o:?} is not a listed shard"),
                ));
            }
        }
        self.pool.validate(&mut errors);
        match self.layout().map() {
            Ok(map) if errors.is_empty() => Ok(map),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(e) => {
                errors.extend(e.0);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Every problem with the settings, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.map().map(drop)
    }
}

/// How a call across every shard treats shards that fail or time out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// Every shard must answer; one failure fails the call
    /// ([`DataError::Partial`]).
    All,
    /// Whatever answered, with the failures listed beside it.
    Partial,
    /// At least this many shards must answer.
    AtLeast(usize),
}

impl Gather {
    fn name(self) -> &'static str {
        match self {
            Gather::All => "all shards required",
            Gather::Partial => "partial results allowed",
            Gather::AtLeast(_) => "a minimum of shards required",
        }
    }
}

/// What a call across shards gathered.
#[derive(Debug)]
pub struct Gathered<T> {
    /// Each shard that answered, by name, with its answer, in shard order.
    pub answers: Vec<(String, T)>,
    /// Each shard that did not, with why.
    pub failures: Vec<(String, DataError)>,
}

/// The statements of one write, given the transaction's connection:
/// `|conn| Box::pin(async move { sqlx::query("…").execute(&mut *conn).await })`.
pub type Tx<'c, T> = BoxFuture<'c, Result<T, sqlx::Error>>;

/// A sharded database: the layout, and a pool and a breaker per shard.
#[derive(Clone)]
pub struct Shards {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("name", &self.inner.name)
            .field(
                "shards",
                &self.inner.servers.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    routing: ArcSwap<Routing>,
    timeout: Duration,
    pub control: Option<Control>,
    clock: SharedClock,
    second_write_failures: metrics::Counter,
}

/// The control database and how often it is read.
pub(crate) struct Control {
    pub pool: PgPool,
    pub refresh: Duration,
}

/// One shard server.
pub(crate) struct Server {
    pub name: String,
    pub pool: PgPool,
    breaker: CircuitBreaker,
    calls: metrics::Counter,
    /// Whether its epoch table is known to exist.
    fenced: AtomicBool,
}

/// A router's view of the set: the layout (and the next one, while resharding),
/// the phase, the epoch it was read at.
struct Routing {
    epoch: i64,
    phase: Phase,
    current: Placed,
    next: Option<Placed>,
    read_at: Instant,
}

/// A layout with its map and the servers of its shards, in the map's order.
struct Placed {
    map: ShardMap,
    servers: Vec<Arc<Server>>,
}

/// Where one write goes.
enum Targets<'a> {
    One(&'a Arc<Server>),
    /// The authoritative shard, then a copy made on a best-effort basis.
    Two(&'a Arc<Server>, &'a Arc<Server>),
}

impl Shards {
    /// The shards of `config`, their pools connecting on first use (a shard that is
    /// down at start is no error: its keys fail until it answers). With a control
    /// database, its row is created if missing (with the configured layout) and
    /// read; a task reads it again every `refresh` while a handle is alive.
    pub async fn connect(config: &ShardsConfig) -> Result<Self, DataError> {
        Self::connect_with_clock(config, SharedClock::system()).await
    }

    /// [`connect`](Self::connect) with the breakers and views timed on `clock`.
    pub async fn connect_with_clock(config: &ShardsConfig, clock: SharedClock) -> Result<Self, DataError> {
        config.map()?;
        let mut servers = Vec::with_capacity(config.shards.len());
        for (i, s) in config.shards.iter().enumerate() {
            let url = server(&s.url).map_err(|p| ConfigErrors::one(format!("shards[{i}].url"), p))?;
            let breaker = CircuitBreaker::builder(format!("data:{}:{}", config.name, s.name))
                .config(config.pool.breaker())
                .shared_clock(clock.clone())
                .build()?;
            servers.push(Arc::new(Server {
                name: s.name.clone(),
                pool: config.pool.options().connect_lazy_with(url.options),
                breaker,
                calls: metrics::counter!(
                    "palisade_data_shard_calls_total",
                    &[("set", config.name.clone()), ("shard", s.name.clone())]
                ),
                fenced: AtomicBool::new(false),
            }));
        }
        let control = match &config.control {
            None => None,
            Some(url) => {
                let url = server(url).map_err(|p| ConfigErrors::one("control", p))?;
                Some(Control {
                    pool: PgPoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(url.options),
                    refresh: config.refresh.get(),
                })
            }
        };
        let state = match &control {
            None => None,
            Some(c) => Some(control::load_or_init(&c.pool, &config.name, &config.layout()).await?),
        };
        let routing = match &state {
            None => Routing::fixed(&servers, &config.layout(), clock.now())?,
            Some(s) => Routing::of(&servers, s, clock.now())?,
        };
        if let Some(s) = &state
            && s.layout != config.layout()
            && s.next.as_ref() != Some(&config.layout())
        {
            tracing::warn!(set = %config.name, "the configured layout differs from the control database's, which is used: reshard to change it");
        }
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            servers,
            routing: ArcSwap::from_pointee(routing),
            timeout: config.timeout.get(),
            control,
            clock,
            second_write_failures: metrics::counter!("palisade_data_double_write_failures_total", "set" => config.name.clone()),
        });
        if let Some(c) = &inner.control {
            let follow = |inner: Arc<Inner>| async move {
                if let Err(e) = inner.refresh().await {
                    tracing::warn!(set = %inner.name, error = %e, "control database unavailable; the last view is used");
                }
            };
            tokio::spawn(crate::task::every(Arc::downgrade(&inner), c.refresh, follow));
        }
        Ok(Shards { inner })
    }

    /// The placement of keys that reads follow now (the new layout's from the cut
    /// of a resharding on).
    pub fn map(&self) -> ShardMap {
        let r = self.inner.routing.load();
        r.reading().map.clone()
    }

    /// The name of the shard that reads of `key` go to now.
    pub fn shard_for(&self, key: &[u8]) -> String {
        let r = self.inner.routing.load();
        r.reading().owner(key).name.clone()
    }

    /// The pool of the shard that owns `key`, for work the router does not see
    /// (no breaker, no timeout, no fencing: [`run`](Self::run) and
    /// [`write`](Self::write) have them).
    pub fn pool_for(&self, key: &[u8]) -> PgPool {
        let r = self.inner.routing.load();
        r.reading().owner(key).pool.clone()
    }

    /// Runs the read `query` on the shard that owns `key`, within the shard
    /// timeout and behind its breaker: a shard that is down fails with
    /// [`DataError::ShardUnavailable`] naming it, at once while its breaker is open.
    pub async fn run<T, F, Fut>(&self, key: &[u8], query: F) -> Result<T, DataError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.inner.fresh_view().await;
        let server = {
            let r = self.inner.routing.load();
            r.reading().owner(key).clone()
        };
        self.inner.call(&server, query(server.pool.clone())).await
    }

    /// Runs the write `tx` in a transaction on the shard that owns `key`, behind
    /// its breaker and within the shard timeout. With a control database the
    /// transaction first checks the shard's epoch; while a resharding double-writes
    /// the key, `tx` runs again on its new shard (where an error is counted, not
    /// returned: the copy is mended from its source before the cut); while the key
    /// is frozen the write is [`DataError::Resharding`] (retry it).
    pub async fn write<T, F>(&self, key: &[u8], tx: F) -> Result<T, DataError>
    where
        F: for<'c> Fn(&'c mut PgConnection) -> Tx<'c, T>,
    {
        let inner = &*self.inner;
        for _ in 0..3 {
            inner.fresh_view().await;
            let routing = inner.routing.load_full();
            let (first, second) = match routing.writing(key) {
                Some(Targets::One(s)) => (s, None),
                Some(Targets::Two(s, copy)) => (s, Some(copy)),
                None => {
                    return Err(DataError::Resharding {
                        set: inner.name.clone(),
                    });
                }
            };
            match inner.fenced(first, routing.epoch, &tx).await {
                Ok(Some(v)) => {
                    if let Some(copy) = second
                        && let Err(e) = inner.fenced(copy, routing.epoch, &tx).await
                    {
                        inner.second_write_failures.increment(1);
                        tracing::debug!(set = %inner.name, shard = %copy.name, error = %e, "double write to the new shard failed; the copy is mended before the cut");
                    }
                    return Ok(v);
                }
                // The shard is at a later epoch than this view: read it again.
                Ok(None) => inner.refresh().await?,
                Err(e) => return Err(e),
            }
        }
        Err(DataError::Resharding {
            set: inner.name.clone(),
        })
    }

    /// Runs `query` on every shard of the layout reads follow, at once (given each
    /// shard's name and pool), and gathers the answers as `gather` requires; each
    /// shard has the shard timeout.
    pub async fn scatter<T, F, Fut>(&self, gather: Gather, query: F) -> Result<Gathered<T>, DataError>
    where
        F: Fn(&str, PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let inner = &*self.inner;
        inner.fresh_view().await;
        let servers = inner.routing.load().reading().servers.clone();
        let calls = servers.iter().map(|s| async {
            (
                s.name.clone(),
                inner.call(s, query(&s.name, s.pool.clone())).await,
            )
        });
        let mut gathered = Gathered {
            answers: Vec::new(),
            failures: Vec::new(),
        };
        for (name, result) in futures_util::future::join_all(calls).await {
            match result {
                Ok(v) => gathered.answers.push((name, v)),
                Err(e) => gathered.failures.push((name, e)),
            }
        }
        let enough = match gather {
            Gather::All => gathered.failures.is_empty(),
            Gather::Partial => true,
            Gather::AtLeast(n) => gathered.answers.len() >= n,
        };
        if enough {
            return Ok(gathered);
        }
        let first = gathered
            .failures
            .first()
            .map(|(name, e)| format!("{name}: {e}"))
            .unwrap_or_default();
        Err(DataError::Partial {
            failed: gathered.failures.len(),
            total: servers.len(),
            policy: gather.name(),
            first,
        })
    }

    /// Reads the control row now (a router does so every `refresh`, and at once
    /// when a write meets a later epoch).
    pub async fn refresh(&self) -> Result<(), DataError> {
        self.inner.refresh().await
    }
}

impl Inner {
    /// One call on `server`, within the timeout and behind its breaker.
    async fn call<T>(
        &self,
        server: &Server,
        work: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DataError> {
        let unavailable = |reason: String| DataError::ShardUnavailable {
            shard: server.name.clone(),
            reason,
        };
        let Ok(permit) = server.breaker.try_acquire() else {
            return Err(unavailable("its breaker is open after failures".into()));
        };
        server.calls.increment(1);
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => {
                permit.success();
                Ok(v)
            }
            Ok(Err(e)) if is_unavailable(&e) => {
                permit.failure();
                tracing::warn!(set = %self.name, shard = %server.name, error = %e, "shard unavailable");
                Err(unavailable(e.to_string()))
            }
            Ok(Err(e)) => {
                permit.success();
                Err(DataError::Query(e))
            }
            Err(_) => {
                permit.failure();
                Err(unavailable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    /// `tx` in a transaction on `server`, after checking (with a control
    /// database) that the shard is not at a later epoch than `epoch`: `None` if it
    /// is (nothing was written).
    async fn fenced<T, F>(&self, server: &Server, epoch: i64, tx: &F) -> Result<Option<T>, DataError>
    where
        F: for<'c> Fn(&'c mut PgConnection) -> Tx<'c, T>,
    {
        let fence = self.control.is_some();
        if fence && !server.fenced.load(Ordering::Relaxed) {
            self.call(server, control::prepare_shard(&server.pool, &self.name))
                .await?;
            server.fenced.store(true, Ordering::Relaxed);
        }
        let set = &self.name;
        let work = async {
            let mut t = palisade_core::db::begin(&server.pool).await?;
            if fence && control::fence(&mut t, set).await? > epoch {
                return Ok(None);
            }
            let v = tx(&mut t).await?;
            t.commit().await?;
            Ok(Some(v))
        };
        self.call(server, work).await
    }

    /// Reads the control row again if the view is older than three refreshes.
    async fn fresh_view(&self) {
        let Some(c) = &self.control else { return };
        let age = self
            .clock
            .now()
            .saturating_duration_since(self.routing.load().read_at);
        if age > c.refresh.saturating_mul(3)
            && let Err(e) = self.refresh().await
        {
            tracing::warn!(set = %self.name, error = %e, "control database unavailable; the last view is used");
        }
    }

    async fn refresh(&self) -> Result<(), DataError> {
        let Some(c) = &self.control else { return Ok(()) };
        let state = control::load(&c.pool, &self.name).await?;
        let routing = Routing::of(&self.servers, &state, self.clock.now())?;
        let before = self.routing.load().epoch;
        if routing.epoch != before {
            tracing::info!(set = %self.name, epoch = routing.epoch, phase = state.phase.as_str(), "shard layout changed");
        }
        self.routing.store(Arc::new(routing));
        Ok(())
    }
}

impl Routing {
    fn fixed(servers: &[Arc<Server>], layout: &Layout, now: Instant) -> Result<Self, DataError> {
        Ok(Routing {
            epoch: 0,
            phase: Phase::Idle,
            current: Placed::of(servers, layout)?,
            next: None,
            read_at: now,
        })
    }

    fn of(servers: &[Arc<Server>], state: &control::State, now: Instant) -> Result<Self, DataError> {
        let next = match (&state.next, state.phase) {
            (Some(n), phase) if phase != Phase::Idle => Some(Placed::of(servers, n)?),
            _ => None,
        };
        Ok(Routing {
            epoch: state.epoch,
            phase: state.phase,
            current: Placed::of(servers, &state.layout)?,
            next,
            read_at: now,
        })
    }

    /// The layout reads follow.
    fn reading(&self) -> &Placed {
        match (&self.next, self.phase) {
            (Some(next), Phase::Cut) => next,
            _ => &self.current,
        }
    }

    /// Where a write of `key` goes; `None` while it is frozen.
    fn writing(&self, key: &[u8]) -> Option<Targets<'_>> {
        let old = self.current.owner(key);
        let Some(next) = &self.next else {
            return Some(Targets::One(old));
        };
        let new = next.owner(key);
        let moving = !Arc::ptr_eq(old, new);
        match self.phase {
            Phase::Idle => Some(Targets::One(old)),
            Phase::Copy | Phase::Verify if moving => Some(Targets::Two(old, new)),
            Phase::Copy | Phase::Verify => Some(Targets::One(old)),
            Phase::Freeze if moving => None,
            Phase::Freeze => Some(Targets::One(old)),
            Phase::Cut => Some(Targets::One(new)),
        }
    }
}

impl Placed {
    fn of(servers: &[Arc<Server>], layout: &Layout) -> Result<Self, DataError> {
        let map = layout
            .map()
            .map_err(|e| DataError::Control(format!("the recorded layout is invalid: {e}")))?;
        let mut chosen = Vec::with_capacity(layout.shards.len());
        for name in &layout.shards {
            let Some(s) = servers.iter().find(|s| s.name == *name) else {
                return Err(ConfigErrors::one(
                    "shards",
                    format!("the layout names shard {name:?}, which this configuration does not list"),
                )
                .into());
            };
            chosen.push(s.clone());
        }
        Ok(Placed { map, servers: chosen })
    }

    fn owner(&self, key: &[u8]) -> &Arc<Server> {
        &self.servers[self.map.shard_of(key)]
    }
}
