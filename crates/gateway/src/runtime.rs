//! A configuration turned into live objects: routes with their policies, clusters
//! with endpoints, breakers, clients and background tasks (health probes, DNS and
//! file discovery). A new [`Runtime`] is built for every reload and swapped in
//! whole; requests in flight keep the one they started with. Dropping a runtime
//! stops its tasks.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::{Config, ConfigErrors};
use crate::discovery::resolve_endpoints;
use crate::keys::Provider;
use crate::route::{Route, RouteMetrics, RouteParts};
use crate::upstream::{Upstream, spawn_pool_sweeper};

/// The live form of a configuration.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Config,
    /// Routes in match order.
    pub routes: Vec<Route>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<Upstream>>,
    /// The proxy listener's TLS, when `gateway.tls` is set.
    pub tls: Option<crate::tls::Tls>,
    /// Metrics of requests no route took.
    pub unrouted: RouteMetrics,
    /// Open tunnels; one set for the gateway's life, handed from runtime to runtime
    /// by reloads so the drain sees them all.
    pub tunnels: crate::tunnel::Tunnels,
    /// The queue async routes store requests in, once connected (one for every
    /// runtime a reload builds).
    pub queue: Arc<crate::jobs::QueueSlot>,
    /// The routes' response caches' store, when a route has a `cache` table (one
    /// for every runtime a reload builds).
    pub responses: Option<Arc<crate::responses::Responses>>,
    /// The routes' idempotency keys' store, once connected (one for every runtime
    /// a reload builds).
    pub idempotency: Arc<crate::idempotent::IdempotencySlot>,
    /// Token issuers by name.
    pub providers: HashMap<String, Arc<Provider>>,
    /// Where spans go, when `[gateway.tracing]` is set.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The services' panels the dashboard draws.
    pub panels: Vec<crate::dashboard::Panel>,
    /// Its exporter, until [`Runtime::build`] starts it.
    exporter: Option<crate::trace::Exporter>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("routes", &self.routes.len())
            .field("clusters", &self.clusters.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Runtime {
    /// Compiles a configuration into a runtime that does not run yet: every
    /// route, limiter, breaker, bulkhead, pool and TLS context built, each core
    /// validating its own settings, and the files the configuration names (TLS,
    /// endpoints file) read. Host names are not resolved and no task is started.
    /// `palisade check` is this function; start-up and reload are this function,
    /// then [`Runtime::build`]'s resolution and tasks, so a configuration `check`
    /// accepts cannot fail start-up for a reason of its own.
    pub fn compile(config: Config) -> Result<Runtime, ConfigErrors> {
        // The file's own checks and the routes' values parsed, all reported at once;
        // clusters are built only from a configuration that passed both.
        let mut problems = config.validate().err().map_or_else(Vec::new, |e| e.0);
        let providers: HashMap<String, Arc<Provider>> = (config.gateway.jwt.iter())
            .filter_map(|(name, s)| {
                Provider::compile(name, s, &mut problems).map(|p| (name.clone(), Arc::new(p)))
            })
            .collect();
        let (tracer, exporter) = (config.gateway.tracing.as_ref())
            .and_then(|t| crate::trace::Tracer::compile(t, "gateway.tracing", &mut problems))
            .unzip();
        let panels = crate::dashboard::Panel::compile_all(&config.gateway.panels, &mut problems);
        let route_at = |i: usize, name: &str| format!("routes[{i}] ({name})");
        let workers = crate::upstream::worker_count(config.gateway.workers);
        let mut parts: Vec<RouteParts> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| RouteParts::compile(r, &route_at(i, &r.name), (&providers, workers), &mut problems))
            .collect();
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        let mut clusters = HashMap::new();
        let tls = match config.gateway.tls.as_ref().map(crate::tls::acceptor) {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                problems.push(e);
                None
            }
            None => None,
        };
        for (name, section) in &config.clusters {
            match Upstream::compile(name, section, &config) {
                Ok(up) => {
                    clusters.insert(name.clone(), Arc::new(up));
                }
                Err(e) => problems.extend(e),
            }
        }
        if config.routes.iter().any(|r| r.cache.is_some())
            && let Err(e) =
                crate::responses::Responses::validate(&config.gateway.cache.clone().unwrap_or_default())
        {
            problems.extend(e.0);
        }
        let mut routes = Vec::new();
        for ((i, r), parts) in config.routes.iter().enumerate().zip(parts.drain(..)) {
            routes.extend(Route::compile(
                r,
                parts,
                &clusters,
                &route_at(i, &r.name),
                &mut problems,
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        Ok(Runtime {
            config,
            routes,
            clusters,
            tls,
            unrouted: RouteMetrics::new("none"),
            tunnels: crate::tunnel::Tunnels::default(),
            queue: Arc::default(),
            responses: None,
            idempotency: Arc::default(),
            providers,
            tracer,
            panels,
            exporter,
            tasks: Vec::new(),
        })
    }

    /// Builds a runtime that serves: [`Runtime::compile`], then every host name
    /// resolved, and health, discovery and pool tasks started. Fails (starting
    /// nothing) if an endpoint cannot be resolved.
    pub async fn build(config: Config) -> Result<Runtime, ConfigErrors> {
        Runtime::build_after(config, None).await
    }

    /// [`Runtime::build`] for a reload of `old`: issuers configured as before keep
    /// the keys they had, so their routes serve at once.
    pub async fn build_after(config: Config, old: Option<&Runtime>) -> Result<Runtime, ConfigErrors> {
        let mut rt = Runtime::compile(config)?;
        let mut problems = Vec::new();
        for (name, up) in &rt.clusters {
            let section = &rt.config.clusters[name];
            match resolve_endpoints(name, section).await {
                Ok(infos) => up.cluster.set_endpoints(infos),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        for (name, up) in &rt.clusters {
            if let Some(registry) = &rt.config.clusters[name].etcd {
                crate::registry::first_read(up, registry).await;
            }
        }
        if rt.routes.iter().any(|r| r.cache.is_some()) {
            let section = rt.config.gateway.cache.clone().unwrap_or_default();
            rt.responses = Some(Arc::new(crate::responses::Responses::build(&section)?));
        }
        rt.start_key_fetches(old).await;
        // Not one of the runtime's tasks: it ends by itself once the tracer and
        // every request holding it are gone, after sending their spans.
        if let Some(exporter) = rt.exporter.take() {
            tokio::spawn(exporter.run());
        }
        let idle = rt.config.gateway.pool_idle_timeout.get();
        for (name, up) in &rt.clusters {
            let section = &rt.config.clusters[name];
            rt.tasks.extend(crate::health::spawn(up, section));
            rt.tasks.extend(crate::discovery::spawn(up, section));
            rt.tasks.extend(crate::registry::spawn(up, section.etcd.as_ref()));
            rt.tasks.push(spawn_pool_sweeper(up, idle));
        }
        Ok(rt)
    }

    /// Gives each issuer whose keys are fetched the keys `old` had for it, or (when
    /// it has none) one fetch now, so its routes serve when the issuer answers;
    /// then its refresh task. A fetch that fails is logged: its routes answer
    /// `503 auth_unavailable` until one succeeds.
    async fn start_key_fetches(&mut self, old: Option<&Runtime>) {
        let fetched: Vec<Arc<Provider>> = self.providers.values().filter(|p| p.fetches()).cloned().collect();
        for p in &fetched {
            if let Some(o) = old.and_then(|o| o.providers.get(&p.name)) {
                p.adopt(o);
            }
        }
        let mut first = tokio::task::JoinSet::new();
        for p in fetched.iter().filter(|p| p.ring.generation() == 0) {
            let p = p.clone();
            first.spawn(async move { p.fetch().await.is_ok() });
        }
        first.join_all().await;
        for p in fetched {
            self.tasks.push(tokio::spawn(p.refresh()));
        }
    }

    /// Ready: every cluster has a healthy endpoint or may be empty.
    pub fn is_ready(&self) -> bool {
        self.clusters
            .values()
            .all(|u| u.allow_empty || u.cluster.has_healthy_endpoint())
    }
}
