//! Listeners, reload and shutdown.
//!
//! * The proxy listener serves HTTP/1.1 and HTTP/2 on one port: over TLS when
//!   `gateway.tls` is set (ALPN `h2` / `http/1.1`), else plain HTTP/1.1 and h2c (the
//!   protocol is detected per connection). HTTP/1.1 upgrades (WebSocket) are
//!   bridged to the endpoint once it answers 101. It is served by `gateway.workers`
//!   threads, each a single-threaded runtime accepting from the same socket, with
//!   its own upstream pools (see `Upstream::client`).
//! * The admin listener is separate, so a flood of traffic or a bad route cannot
//!   hide the gateway's health from its operator.
//! * [`Handle::reload`] builds a new runtime from a new configuration and swaps it in
//!   whole: a bad configuration is refused with its errors and the old one keeps
//!   serving; requests in flight finish on the runtime they started with. The file
//!   is also watched when `watch_config` is on.
//! * [`Handle::shutdown`] stops accepting, lets requests in flight and open tunnels
//!   finish within `drain_timeout`, then closes what is left.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigErrors};
use crate::conn::{Activity, Ended, Watched};
use crate::proxy::Downstream;
use crate::runtime::Runtime;
use crate::source::{ConfigSource, Version};

/// `palisade_request_duration_seconds`'s bucket bounds, in seconds.
const REQUEST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A running gateway.
pub struct Handle {
    /// The proxy listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: Option<SocketAddr>,
    runtime: Arc<ArcSwap<Runtime>>,
    /// Where the configuration came from, and the version it started with.
    origin: Option<(ConfigSource, Version)>,
    /// Reloads so far.
    reloads: watch::Sender<Reloads>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// One per proxy worker thread, resolved when it has drained and stopped.
    workers: Vec<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("addr", &self.addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is wrong.
    #[error("invalid configuration:\n{0}")]
    Config(ConfigErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A proxy worker thread could not be started.
    #[error("cannot start a proxy worker: {source}")]
    Worker {
        /// The error.
        source: std::io::Error,
    },
}

// Not `#[from]`: that would make the errors the source too, and a report of the
// chain (`{:#}`) would print every problem twice.
impl From<ConfigErrors> for StartError {
    fn from(e: ConfigErrors) -> Self {
        StartError::Config(e)
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle (`None`
/// if another recorder was installed first). A thread drains histogram samples into
/// their summaries every few seconds: without it they pile up until `/metrics` is
/// scraped, and a gateway nobody scrapes would grow without bound.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Answers' durations as buckets (not a summary): a p99 over every
            // instance is then one `histogram_quantile`, as the shipped alert does.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("palisade_request_duration_seconds".into()),
                    &REQUEST_BUCKETS,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = builder.install_recorder().ok()?;
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
            }
            Some(handle)
        })
        .clone()
}

/// Raises the process's open-file limit to its hard limit (once), so the
/// connection cap, not the default soft limit of 1024, bounds how many clients are
/// served, and returns the limit in force.
pub fn raise_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => limit = raised,
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
        }
        tracing::info!(open_files = ?limit.current, "open-file limit");
        limit.current
    })
}

/// How many new configurations a gateway applied and refused since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Applied.
    pub applied: u64,
    /// Refused (not valid; the running one kept serving).
    pub rejected: u64,
}

/// Starts the gateway: builds the runtime, binds both listeners, serves. `origin`
/// is where the configuration came from and its version, for reloads.
pub async fn start(config: Config, origin: Option<(ConfigSource, Version)>) -> Result<Handle, StartError> {
    let metrics = metrics_handle();
    if let Some(files) = raise_file_limit() {
        let workers = crate::upstream::worker_count(config.gateway.workers) as u64;
        let wanted = workers.saturating_mul(config.gateway.max_client_connections as u64);
        if wanted > files {
            tracing::warn!(
                open_files = files,
                client_connections = wanted,
                "the open-file limit is below workers x max_client_connections; accepts fail past it"
            );
        }
    }
    let gateway = config.gateway.clone();
    let listener = TcpListener::bind(gateway.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: gateway.listen,
            source,
        })?;
    let admin = match gateway.admin {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Bind { addr: a, source })?,
        ),
        None => None,
    };
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::build(config).await?));
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: gateway.listen,
        source,
    })?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(section) = gateway.idempotency.clone() {
        let slot = runtime.load().idempotency.clone();
        tasks.push(tokio::spawn(crate::idempotent::connect(
            slot,
            section,
            rx.clone(),
        )));
    }
    if let Some(section) = gateway.queue.clone() {
        let slot = runtime.load().queue.clone();
        let drain = gateway.drain_timeout.get();
        tasks.push(tokio::spawn(crate::jobs::run(
            slot,
            runtime.clone(),
            section,
            drain,
            rx.clone(),
        )));
    }

    // The proxy listener is served by `workers` threads, each a single-threaded
    // runtime accepting from the same socket (as nginx's workers do): a request, its
    // upstream connection and their timers stay on one thread, with no work-stealing
    // queues or cross-thread wake-ups on the way.
    let listener = listener.into_std().map_err(|source| StartError::Bind {
        addr: gateway.listen,
        source,
    })?;
    let mut workers = Vec::new();
    for index in 0..crate::upstream::worker_count(gateway.workers) {
        let listener = listener.try_clone().map_err(|source| StartError::Bind {
            addr: gateway.listen,
            source,
        })?;
        workers.push(spawn_worker(index, listener, rx.clone(), runtime.clone())?);
    }
    if let Some(admin) = admin {
        let dashboard = Arc::new(crate::dashboard::Dashboard::default());
        tasks.push(tokio::spawn(crate::dashboard::run(
            dashboard.clone(),
            runtime.clone(),
            metrics.clone(),
            rx.clone(),
        )));
        let state = Arc::new(crate::admin::Admin { metrics, dashboard });
        tasks.push(spawn_admin(admin, rx.clone(), runtime.clone(), state));
    }
    let handle = Handle {
        addr,
        admin_addr,
        runtime,
        origin,
        reloads: watch::Sender::new(Reloads::default()),
        shutdown,
        tasks,
        workers,
    };
    Ok(handle)
}

/// Serves the admin API on `admin` until shutdown.
fn spawn_admin(
    admin: TcpListener,
    rx: watch::Receiver<bool>,
    runtime: Arc<ArcSwap<Runtime>>,
    state: Arc<crate::admin::Admin>,
) -> JoinHandle<()> {
    let rt = runtime.clone();
    tokio::spawn(serve(admin, rx, runtime, false, move |_, activity| {
        let rt = rt.clone();
        let state = state.clone();
        service_fn(move |req| {
            let _active = activity.start();
            let resp = crate::admin::handle(&rt.load(), &state, &req);
            async move { Ok::<_, Infallible>(resp) }
        })
    }))
}

/// Starts proxy worker `index`: a thread running a single-threaded runtime that
/// serves `listener` until shutdown. The receiver resolves when the worker is done
/// (its drain included).
fn spawn_worker(
    index: usize,
    listener: std::net::TcpListener,
    stop: watch::Receiver<bool>,
    runtime: Arc<ArcSwap<Runtime>>,
) -> Result<oneshot::Receiver<()>, StartError> {
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Worker { source })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Worker { source })?;
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("palisade-worker-{index}"))
        .spawn(move || {
            crate::upstream::set_worker(index);
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, %addr, worker = index, "worker cannot serve the listener");
                        return;
                    }
                };
                let rt = runtime.clone();
                // With a queue, requests go through its path first; chosen once, at
                // start, so a gateway without one serves on the proxy path alone.
                if runtime.load().config.gateway.queue.is_some() {
                    serve(listener, stop, runtime, true, move |from, activity| {
                        let rt = rt.clone();
                        service_fn(move |req| crate::proxy::handle_queued(rt.load_full(), req, from, activity.start()))
                    })
                    .await;
                } else {
                    serve(listener, stop, runtime, true, move |from, activity| {
                        let rt = rt.clone();
                        service_fn(move |req| crate::proxy::handle(rt.load_full(), req, from, activity.start()))
                    })
                    .await;
                }
            });
            // Connections still open past the drain end here, with the runtime.
            drop(rt);
            let _ = done.send(());
        })
        .map_err(|source| StartError::Worker { source })?;
    Ok(finished)
}

/// Accepts connections until shutdown, then drains them within the configured time.
/// With `proxy`, connections are TLS when the runtime serving has an acceptor. At
/// most `max_client_connections` are open at once (this worker's); more are closed
/// as they come, and each is closed when its timeouts pass (see [`crate::conn`]).
async fn serve<S, F>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    runtime: Arc<ArcSwap<Runtime>>,
    proxy: bool,
    make: F,
) where
    F: Fn(Downstream, Arc<Activity>) -> S,
    S: ConnService,
{
    let graceful = GracefulShutdown::new();
    let (builder, max_open) = {
        let rt = runtime.load();
        let g = &rt.config.gateway;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().keep_alive(true).max_buf_size(g.max_header_bytes);
        // Extended CONNECT (RFC 8441) carries WebSockets over HTTP/2.
        builder
            .http2()
            .max_concurrent_streams(1024)
            .enable_connect_protocol()
            .timer(TokioTimer::new())
            .keep_alive_interval(g.h2_keepalive_interval.get())
            .keep_alive_timeout(g.h2_keepalive_timeout.get());
        (builder, g.max_client_connections)
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        metrics::counter!("palisade_accept_errors_total").increment(1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if open.load(Ordering::Acquire) >= max_open {
                    // Closed at once: the client learns now, and the backlog drains.
                    metrics::counter!("palisade_client_connections_refused_total").increment(1);
                    drop(stream);
                    continue;
                }
                let counted = OpenConnection::new(&open);
                let _ = stream.set_nodelay(true);
                let (tls, header, idle) = {
                    let rt = runtime.load();
                    let g = &rt.config.gateway;
                    let tls = if proxy { rt.tls.clone() } else { None };
                    (tls, g.client_header_timeout.get(), g.client_idle_timeout.get())
                };
                let activity = Activity::new();
                let svc = make(Downstream { addr: peer, tls: tls.is_some() }, activity.clone());
                let client = Client { peer, activity, header, idle, _counted: counted };
                // Boxed: the connection's future holds hyper's dispatcher with the
                // request's future inside (kilobytes), and a spawn moves what it is
                // given more than once.
                tokio::spawn(Box::pin(client.serve(stream, tls, builder.clone(), graceful.watcher(), svc)));
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let (drain, tunnels) = {
        let rt = runtime.load();
        (rt.config.gateway.drain_timeout.get(), rt.tunnels.clone())
    };
    // Upgraded connections left hyper's watch when they upgraded: wait for them too.
    let drained = async {
        graceful.shutdown().await;
        if proxy {
            tunnels.drained().await;
        }
    };
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!(
            ?drain,
            tunnels = tunnels.open(),
            "drain timeout: closing connections and tunnels still open"
        );
        if proxy {
            tunnels.close_all();
        }
    }
}

/// The service a listener runs per connection (the proxy's or the admin's).
trait ConnService:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// One client connection, counted against its worker's cap while it lives.
struct Client {
    peer: SocketAddr,
    activity: Arc<Activity>,
    header: Duration,
    idle: Duration,
    _counted: OpenConnection,
}

impl Client {
    /// Serves the connection (after its TLS handshake, when `tls`) until it ends
    /// or its timeouts pass.
    async fn serve<S>(
        self,
        stream: tokio::net::TcpStream,
        tls: Option<crate::tls::Tls>,
        builder: auto::Builder<TokioExecutor>,
        watcher: hyper_util::server::graceful::Watcher,
        svc: S,
    ) where
        S: ConnService,
    {
        let Client {
            peer,
            activity,
            header,
            idle,
            ..
        } = &self;
        let Some(tls) = tls else {
            let io = TokioIo::new(Watched::new(stream, activity.clone()));
            let conn = watcher.watch(builder.serve_connection_with_upgrades(io, svc).into_owned());
            run_connection(conn, activity, *header, *idle, *peer).await;
            return;
        };
        // The handshake runs in the connection's own task, bounded in time, so a
        // slow or silent client holds up nobody else.
        let stream = match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics::counter!("palisade_tls_handshake_failures_total", "reason" => "error").increment(1);
                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                return;
            }
            Err(_) => {
                metrics::counter!("palisade_tls_handshake_failures_total", "reason" => "timeout")
                    .increment(1);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            activity.set_h2();
        }
        let io = TokioIo::new(Watched::new(stream, activity.clone()));
        let conn = watcher.watch(builder.serve_connection_with_upgrades(io, svc).into_owned());
        run_connection(conn, activity, *header, *idle, *peer).await;
    }
}

/// Serves one client connection until it ends or its timeouts pass.
async fn run_connection<C, E>(
    conn: C,
    activity: &Activity,
    header: Duration,
    idle: Duration,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match crate::conn::until_expired(conn, activity.expired(header, idle)).await {
        Ended::Connection(Err(e)) => tracing::debug!(error = %e, %peer, "connection ended with an error"),
        Ended::Connection(Ok(())) => {}
        Ended::Expired(why) => {
            metrics::counter!("palisade_client_connections_closed_total", "reason" => why).increment(1);
            tracing::debug!(%peer, reason = why, "client connection closed");
        }
    }
}

/// One open client connection, counted against the worker's cap while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handle {
    /// The runtime now serving.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new configuration. On error nothing changes. Listener addresses
    /// are not changed by a reload (restart for that).
    pub async fn reload(&self, config: Config) -> Result<(), ConfigErrors> {
        let old = self.runtime.load();
        if config.gateway.listen != old.config.gateway.listen
            || config.gateway.admin != old.config.gateway.admin
        {
            tracing::warn!("listener addresses changed; they take effect on restart");
        }
        let mut next = Runtime::build_after(config, Some(&old)).await?;
        next.tunnels = old.tunnels.clone();
        next.queue = old.queue.clone();
        next.idempotency = old.idempotency.clone();
        if old.responses.is_some() {
            next.responses = old.responses.clone();
        }
        self.runtime.store(Arc::new(next));
        self.reloads.send_modify(|r| r.applied += 1);
        metrics::counter!("palisade_config_reloads_total", "result" => "ok").increment(1);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Reads the configuration from its source again and reloads it.
    pub async fn reload_from_source(&self) -> Result<(), ConfigErrors> {
        let Some((source, _)) = &self.origin else {
            return Err(ConfigErrors::one("--config", "no configuration source to reload"));
        };
        let result = match source.load().await {
            Ok(loaded) => self.reload(loaded.config).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.refused(source, e);
        }
        result
    }

    fn refused(&self, source: &ConfigSource, e: &ConfigErrors) {
        crate::source::reject(source, e);
        self.reloads.send_modify(|r| r.rejected += 1);
    }

    /// The reloads so far, and each one to come.
    pub fn reloads(&self) -> watch::Receiver<Reloads> {
        self.reloads.subscribe()
    }

    /// Follows the configuration's source (if `watch_config`): a file compared
    /// byte for byte once a second (so coarse or unchanged modification times
    /// cannot hide an edit), an etcd key watched. Each new version is reloaded; one
    /// refused leaves the running one serving. Returns when the gateway shuts down.
    pub async fn watch_config(&self) {
        let Some((source, version)) = &self.origin else {
            return;
        };
        if !self.runtime.load().config.gateway.watch_config {
            return;
        }
        let mut stop = self.shutdown.subscribe();
        let follow = source.follow(version.clone(), |next| async move {
            match next {
                Ok(config) => {
                    if let Err(e) = self.reload(config).await {
                        self.refused(source, &e);
                    }
                }
                Err(e) => self.refused(source, &e),
            }
        });
        tokio::select! {
            () = follow => {}
            _ = stop.changed() => {}
        }
    }

    /// Stops accepting connections and waits (at most `drain_timeout`) for requests
    /// in flight to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for w in self.workers {
            let _ = w.await;
        }
    }
}
