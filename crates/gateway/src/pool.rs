//! Connections to a cluster's endpoints, kept for reuse, one pool per proxy worker
//! thread, over hyper's connection API (`hyper::client::conn`).
//!
//! Why not hyper-util's pooled client: under callgrind it cost about 13,000
//! instructions per request on top of hyper's own HTTP/1.1 work (a `HashMap` keyed
//! by scheme and authority under SipHash, a task spawned per request to hand the
//! connection back, boxed futures racing a checkout against a connect), a third of
//! what a request through the gateway cost in all. Here a pool is a small map from
//! endpoint address to idle connections behind a lock only its own worker takes; a
//! connection goes back when the answer's body has been read (Palisade's body
//! wrapper already sees that moment: see [`Lease`]).
//!
//! HTTP/1.1: idle connections per endpoint, most recently used first (their TCP
//! state is warmest), at most `gateway.pool_idle_per_endpoint`, closed after
//! `gateway.pool_idle_timeout` unused. A request that a pooled connection turns out
//! to have been closed under (it was never sent) is sent again on another, as
//! hyper-util did. A bodiless idempotent request whose pooled connection had been
//! idle a while and broke before any answer came (the endpoint closed it for
//! idleness just as the request went out) is sent once more on a new connection,
//! as RFC 9110 section 9.2.2 allows and nginx and Go's client do. HTTP/2 (h2c or
//! `h2` over TLS): one multiplexed connection per endpoint, replaced when it
//! closes.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use palisade_core::{Clock, Instant, SystemClock};

use crate::Body;
use crate::connect::{ConnectError, Connector};

/// Why a request got no answer from an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (TCP, or the TLS handshake).
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    /// The connection failed while the request was sent or the answer read.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The pooled connections of one cluster on one worker.
pub struct Pool {
    connector: Connector,
    h2: bool,
    max_idle: usize,
    idle_timeout: Duration,
    replay_after: Duration,
    endpoints: Mutex<HashMap<SocketAddr, Idle, BuildHasherDefault<AddrHasher>>>,
}

#[derive(Default)]
struct Idle {
    /// HTTP/1.1 connections not in use, each with the moment it was handed back:
    /// oldest at the front.
    h1: VecDeque<(http1::SendRequest<Body>, Instant)>,
    /// The endpoint's HTTP/2 connection.
    h2: Option<http2::SendRequest<Body>>,
}

/// An HTTP/1.1 connection lent to one request. Dropped, it goes back to its pool
/// (if still open and the pool has room); hold it until the answer's body has been
/// read, or the connection is not ready for another request yet.
pub struct Lease {
    sender: Option<http1::SendRequest<Body>>,
    pool: Arc<Pool>,
    addr: SocketAddr,
}

impl Lease {
    /// Closes the connection instead of handing it back (its bytes now belong to
    /// an upgrade, say).
    pub fn discard(mut self) {
        self.sender = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.give_back(self.addr, sender);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool connecting with `connector`; `h2` speaks HTTP/2 to every
    /// endpoint, else HTTP/1.1.
    pub fn new(connector: Connector, h2: bool, max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            connector,
            h2,
            max_idle,
            idle_timeout,
            replay_after: REPLAY_AFTER,
            endpoints: Mutex::new(HashMap::default()),
        }
    }

    /// How long a pooled connection must have been idle for a bodiless idempotent
    /// request that it fails before any answer to be sent again on a new
    /// connection (default one second). Endpoints close connections for idleness
    /// after seconds, not microseconds: under load connections are idle far less
    /// than this and requests pay nothing (the head is copied only when a replay
    /// is possible).
    #[must_use]
    pub fn replay_after(mut self, idle: Duration) -> Self {
        self.replay_after = idle;
        self
    }

    /// Sends `req` to the endpoint at `addr` on a pooled connection, or a new one,
    /// and returns the answer's head. For HTTP/1.1 the [`Lease`] holds the
    /// connection until the caller drops it (once the body is read). Connections
    /// are driven by tasks on the calling thread's runtime.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        if self.h2 {
            let mut sender = match self.idle_h2(addr) {
                Some(s) => s,
                None => Box::pin(self.connect_h2(addr)).await?,
            };
            return Ok((sender.send_request(req).await?, None));
        }
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { self.idle_h1(addr) };
            let (mut sender, reused, replay) = match pooled {
                Some((s, idle_for)) => {
                    let replay = (idle_for >= self.replay_after
                        && is_idempotent(req.method())
                        && req.body().is_end_stream())
                    .then(|| Head::of(&req));
                    (s, true, replay)
                }
                // Boxed: a connect's state is large, and rare once the pool is warm.
                None => (Box::pin(self.connect_h1(addr)).await?, false, None),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        sender: Some(sender),
                        pool: self.clone(),
                        addr,
                    };
                    return Ok((resp, Some(lease)));
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection was found closed before a byte was
                    // sent: nothing reached the endpoint, so another may carry it.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(SendError::Http(e.into_error())),
                    None => {
                        let e = e.into_error();
                        match replay {
                            Some(head) if broke_before_answer(&e) => {
                                tracing::debug!(error = %e, %addr, "idle pooled connection broke under a request; sending it again on a new one");
                                metrics::counter!("palisade_pool_replays_total").increment(1);
                                req = head.into_request();
                                fresh = true;
                            }
                            _ => return Err(SendError::Http(e)),
                        }
                    }
                },
            }
        }
    }

    /// Closes connections idle for longer than the idle timeout, and those the
    /// endpoint closed. Run now and then, so an idle gateway lets go of them.
    pub fn sweep(&self) {
        let now = SystemClock.now();
        let mut endpoints = self.lock();
        endpoints.retain(|_, idle| {
            idle.h1.retain(|(s, since)| {
                !s.is_closed() && now.saturating_duration_since(*since) < self.idle_timeout
            });
            if idle.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
                idle.h2 = None;
            }
            !idle.h1.is_empty() || idle.h2.is_some()
        });
    }

    /// Idle connections in the pool now (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.lock()
            .values()
            .map(|i| i.h1.len() + usize::from(i.h2.is_some()))
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Idle, BuildHasherDefault<AddrHasher>>> {
        // A panic while the lock was held leaves nothing half-done worth refusing.
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection to `addr` that is ready, and how long
    /// it was idle; expired and closed ones met on the way are dropped.
    fn idle_h1(&self, addr: SocketAddr) -> Option<(http1::SendRequest<Body>, Duration)> {
        let mut endpoints = self.lock();
        let idle = endpoints.get_mut(&addr)?;
        let now = SystemClock.now();
        while let Some((s, since)) = idle.h1.front() {
            if s.is_closed() || now.saturating_duration_since(*since) >= self.idle_timeout {
                idle.h1.pop_front();
            } else {
                break;
            }
        }
        // One handed back before its connection finished the last answer is
        // skipped, not waited for.
        let i = idle.h1.iter().rposition(|(s, _)| s.is_ready())?;
        idle.h1
            .remove(i)
            .map(|(s, since)| (s, now.saturating_duration_since(since)))
    }

    fn give_back(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut endpoints = self.lock();
        let idle = endpoints.entry(addr).or_default();
        if idle.h1.len() >= self.max_idle {
            // Full: the oldest goes.
            idle.h1.pop_front();
        }
        idle.h1.push_back((sender, SystemClock.now()));
    }

    fn idle_h2(&self, addr: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let endpoints = self.lock();
        endpoints
            .get(&addr)?
            .h2
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn connect_h1(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, SendError> {
        let io = self.connector.connect(addr).await.map_err(SendError::Connect)?;
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, %addr, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, SendError> {
        let io = self.connector.connect(addr).await.map_err(SendError::Connect)?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %addr, "upstream connection ended");
            }
        });
        // Two requests that both found none may each have connected; the later
        // one is kept, the other serves its request and closes when dropped.
        self.lock().entry(addr).or_default().h2 = Some(sender.clone());
        Ok(sender)
    }
}

/// See [`Pool::replay_after`].
const REPLAY_AFTER: Duration = Duration::from_secs(1);

/// What a bodiless request needs to be sent again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn of(req: &Request<Body>) -> Self {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn into_request(self) -> Request<Body> {
        let mut req = Request::new(crate::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// RFC 9110 section 9.2.2: requests a client may send again when the connection
/// closed before it had the answer.
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether the connection ended or was reset before the answer's head came (the
/// mark of an endpoint closing an idle connection as the request arrived), rather
/// than answering something hyper could not read.
pub(crate) fn broke_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("h2", &self.h2)
            .field("idle", &self.idle())
            .finish_non_exhaustive()
    }
}

/// A hasher for endpoint addresses: they come from the configuration and
/// discovery, not from clients, so a fast multiply-and-rotate (FxHash's) needs no
/// protection against chosen keys.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
