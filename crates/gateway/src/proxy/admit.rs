//! Admission: what a request is before any endpoint sees it. Its `Host` is one and
//! well formed, its path normalised (the path routed is the path forwarded), its
//! route found, and the route's rate limit asked.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use palisade_resilience::ratelimit::RateLimitHeaders;
use palisade_resilience::shed::ShedPermit;

use crate::cause::Cause;
use crate::config::EscapedSlashes;
use crate::load::RoutePriority;
use crate::route::{Fault, HashKey, Route};
use crate::runtime::Runtime;
use crate::upstream::{ClusterShed, Upstream};

use super::client_body::{ClientBody, ClientBodyError, ClientFault, ClientSide};
use super::{Downstream, Failure, SendBody, Upgrade};

/// A request admitted to its route, ready to be sent on each attempt.
pub(super) struct Prepared {
    /// Its head, as sent upstream (hop-by-hop headers gone, forwarding ones set).
    parts: http::request::Parts,
    /// Its body.
    pub(super) body: SendBody,
    /// Where its streamed body stands (the client's failures).
    pub(super) client_side: Option<Arc<ClientSide>>,
    /// The protocol it asks to switch to, and the client's half of the connection.
    pub(super) upgrade: Option<(Upgrade, hyper::upgrade::OnUpgrade)>,
    /// What a hash balancer places it by.
    pub(super) hash_key: Option<u64>,
    /// Its method may be sent again (idempotent, or the route allows it).
    pub(super) replayable_method: bool,
    /// How long it is held before its first attempt: a pacing rate limit's wait and
    /// an injected delay (both within the route's timeout).
    pub(super) pace: std::time::Duration,
    /// The time the client gave it (deadline propagation), when it said.
    pub(super) client_deadline: Option<std::time::Duration>,
}

/// A client's request body: as it comes, or already read whole (an idempotent
/// request's, read to be fingerprinted).
pub(super) enum Inbound {
    /// Still to come from the client.
    Streaming(Incoming),
    /// Read.
    Read(Bytes),
}

/// A request body still to be watched ([`PendingBody::watch`]).
pub(super) struct PendingBody {
    body: Incoming,
    buffer: bool,
    max: u64,
    idle: std::time::Duration,
}

impl PendingBody {
    /// The body as sent when it is already complete (kept for replay when
    /// `buffer`), else the body still to be watched.
    fn unless_empty(body: Incoming, buffer: bool, rt: &Runtime) -> (SendBody, Option<PendingBody>) {
        if !body.is_end_stream() {
            let g = &rt.config.gateway;
            let max = g.max_body_bytes;
            let idle = g.request_body_idle_timeout.get();
            return (
                SendBody::Streaming(None),
                Some(PendingBody {
                    body,
                    buffer,
                    max,
                    idle,
                }),
            );
        }
        let send = if buffer {
            SendBody::Buffered(Bytes::new())
        } else {
            SendBody::Streaming(Some(crate::empty()))
        };
        (send, None)
    }

    /// The body, unread.
    pub(super) fn into_incoming(self) -> Incoming {
        self.body
    }

    /// The client's body, watched so its failures are known as the client's (see
    /// `client_body`): read whole when it may be sent again, else its first frame
    /// read ahead, so a body bad from its start never reaches an endpoint.
    pub(super) async fn watch(self) -> Result<(SendBody, Option<Arc<ClientSide>>), Failure> {
        if self.buffer {
            let bytes = read_whole(self.body, self.max, self.idle).await?;
            return Ok((SendBody::Buffered(bytes), None));
        }
        let (mut watched, side) = ClientBody::new(self.body, self.max, self.idle);
        watched.prime().await.map_err(ClientFault::failure)?;
        Ok((SendBody::Streaming(Some(watched.boxed())), Some(side)))
    }
}

/// The largest body read whole so a mirrored request's copy can carry it (with a
/// `Content-Length`); larger ones go to the cluster alone.
pub const MIRROR_BUFFER_BYTES: u64 = 64 << 10;

/// A client's body read whole: up to `max` bytes (a `413` beyond), nothing
/// coming for `idle` a `408`, a malformed one a `400`.
pub(super) async fn read_whole(
    body: Incoming,
    max: u64,
    idle: std::time::Duration,
) -> Result<Bytes, Failure> {
    let (watched, _) = ClientBody::new(body, max, idle);
    Ok(watched.collect().await.map_err(|e| client_error(&e))?.to_bytes())
}

/// The admit phase for a routed request: its rate limit, its size, its upgrade,
/// and its head made the one sent upstream. A body still to come is returned to be
/// watched ([`PendingBody::watch`]); the request path awaits nothing for a request
/// without one.
pub(super) fn prepare(
    rt: &Runtime,
    route: &Route,
    (up, mirrored): (&Upstream, bool),
    mut req: Request<Inbound>,
    from: Downstream,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
) -> Result<(Prepared, Option<PendingBody>), Failure> {
    let Gates {
        pace,
        client_deadline,
    } = gates(route, &req, from.addr)?;
    // A CONNECT tunnel (other than HTTP/2's WebSocket, a GET by now) is a forward
    // proxy's job: its target is a host, not a resource of the cluster.
    if req.method() == Method::CONNECT {
        return Err(Failure::new(Cause::BadRequest, "CONNECT tunnels are not proxied"));
    }
    let max_body = rt.config.gateway.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > max_body) {
        return Err(Failure::new(
            Cause::BodyTooLarge,
            format!("body of {n} bytes is over the limit of {max_body}"),
        ));
    }
    // An HTTP/1.1 upgrade (WebSocket and the like): the client's half of the
    // connection is taken now; it is joined to the endpoint's half if that answers 101.
    let upgrade = match super::upgrade_protocol(&req) {
        Some(_) if up.version != Version::HTTP_11 => {
            return Err(Failure::new(
                Cause::ProtocolError,
                format!(
                    "cluster {} speaks HTTP/2; upgrades and WebSockets are passed only to HTTP/1.1 clusters",
                    up.name
                ),
            ));
        }
        Some(u) => Some((u, hyper::upgrade::on(&mut req))),
        None => None,
    };
    let hash_key = route.hash_on.as_ref().and_then(|h| hash_key(h, &req, from.addr));
    let (mut parts, body) = req.into_parts();
    let retry = route.retry.as_ref();
    let replayable_method =
        retry.is_some_and(|r| r.non_idempotent || crate::pool::is_idempotent(&parts.method));
    let can_buffer = retry.is_some_and(|r| {
        replayable_method
            && (declared.is_some_and(|n| n <= r.buffer_bytes)
                || (declared.is_none() && super::body_is_empty(&parts)))
    }) || (mirrored && declared.is_some_and(|n| n <= MIRROR_BUFFER_BYTES));
    let (body, pending) = match body {
        Inbound::Streaming(body) => PendingBody::unless_empty(body, can_buffer, rt),
        // Kept: a request read whole may be sent again.
        Inbound::Read(bytes) => (SendBody::Buffered(bytes), None),
    };
    // The client's headers as sent upstream; hop-by-hop ones go, forwarding ones come.
    super::prepare_headers(&mut parts, up.version, from, host, request_id);
    if let Some((u, _)) = &upgrade {
        let h = &mut parts.headers;
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.protocol.clone());
        // An HTTP/2 client sends no key (RFC 8441 section 5); an HTTP/1.1 server wants one.
        if u.over_h2 && !h.contains_key(header::SEC_WEBSOCKET_KEY) {
            h.insert(header::SEC_WEBSOCKET_KEY, super::websocket_key());
        }
    }
    let prepared = Prepared {
        parts,
        body,
        client_side: None,
        upgrade,
        hash_key,
        replayable_method,
        pace,
        client_deadline,
    };
    Ok((prepared, pending))
}

/// What a route's gates decided for a request they let through.
struct Gates {
    /// How long it is held before its first attempt (a pacing limit's wait, an
    /// injected delay).
    pace: std::time::Duration,
    /// The time the client gave it, when it said.
    client_deadline: Option<std::time::Duration>,
}

/// A route's gates, before anything of the request is taken apart: its rate limit,
/// the client's deadline (one already passed is answered at once), its fault
/// injection.
fn gates<B>(route: &Route, req: &Request<B>, client: SocketAddr) -> Result<Gates, Failure> {
    let pace = local_limit(route, req, client)?;
    let client_deadline = route.deadline.as_ref().and_then(|d| d.incoming(req.headers()));
    if client_deadline.is_some_and(|d| d.is_zero()) {
        return Err(Failure::new(Cause::Timeout, "the client's deadline had passed"));
    }
    let pace = match route.fault.as_ref().map(|f| f.decide(req)) {
        Some(Fault::Abort(status)) => {
            metrics::counter!("palisade_faults_injected_total", "route" => route.name.clone(), "kind" => "abort")
                .increment(1);
            let mut f = Failure::new(Cause::FaultInjected, "aborted by the route's fault injection");
            f.status = Some(status);
            return Err(f);
        }
        Some(Fault::Delay(d)) => {
            metrics::counter!("palisade_faults_injected_total", "route" => route.name.clone(), "kind" => "delay")
                .increment(1);
            pace + d
        }
        Some(Fault::None) | None => pace,
    };
    Ok(Gates {
        pace,
        client_deadline,
    })
}

/// The route's own rate limit: the wait a pacing limit asks for, or a `429`.
pub(super) fn local_limit<B>(
    route: &Route,
    req: &Request<B>,
    client: SocketAddr,
) -> Result<std::time::Duration, Failure> {
    match route.limiter.as_ref().map(|l| l.check(req, client.ip())) {
        Some(Err(limited)) => Err(rate_limited(&RateLimitHeaders::from(&limited))),
        Some(Ok(allowed)) => Ok(allowed.wait()),
        None => Ok(std::time::Duration::ZERO),
    }
}

/// A place in the cluster's bulkhead, when it has one, or a `503 bulkhead_full`.
pub(super) fn bulkhead_slot(
    up: &Upstream,
) -> Result<Option<palisade_resilience::bulkhead::BulkheadPermit>, Failure> {
    (up.bulkhead.as_ref())
        .map(|b| {
            b.try_acquire()
                .map_err(|e| Failure::new(Cause::BulkheadFull, e.to_string()))
        })
        .transpose()
}

/// A `429` with the limit's headers.
pub(super) fn rate_limited(headers: &RateLimitHeaders) -> Failure {
    let mut f = Failure::new(Cause::RateLimited, "route rate limit reached");
    f.headers = headers.to_pairs();
    f
}

/// The route's global limit (kept in Redis), when it has one.
pub(super) async fn global_limit<B>(
    route: &Route,
    req: &Request<B>,
    client: SocketAddr,
) -> Result<(), Failure> {
    match &route.global_limit {
        Some(g) => Box::pin(g.check(req, client.ip()))
            .await
            .map_err(|h| rate_limited(&h)),
        None => Ok(()),
    }
}

/// Load shedding for a request to a cluster that sheds: a slot in its adaptive
/// limit, or a `503 shed` when the load is too high for the request's priority; a
/// request the load would serve degraded gets the route's fallback when it has one
/// for `shed` (and is served in full when it has none). Taken once the request's
/// body is in hand, so the limit measures the cluster, not the client's upload.
pub(super) fn shed(route: &Route, cluster: &ClusterShed, req: &Prepared) -> Result<ShedPermit, Failure> {
    let priority = route.priority.of(&req.parts.headers);
    let count = |outcome: &'static str| {
        metrics::counter!("palisade_route_shed_total", "route" => route.name.clone(),
            "priority" => RoutePriority::name(priority), "outcome" => outcome)
        .increment(1);
    };
    match cluster.admit(priority) {
        Err(shed) => {
            count("refused");
            Err(Failure::new(
                Cause::Shed,
                format!(
                    "{} request refused: {}",
                    RoutePriority::name(priority),
                    shed.reason
                ),
            ))
        }
        Ok((_, true)) if route.fallback.as_ref().is_some_and(|f| f.answers(Cause::Shed)) => {
            count("degraded");
            Err(Failure::new(
                Cause::Shed,
                "served degraded: the load is too high for the full answer",
            ))
        }
        Ok((permit, _)) => Ok(permit),
    }
}

/// A client body's error while it was read whole (to be sent more than once).
fn client_error(e: &crate::BoxError) -> Failure {
    e.downcast_ref::<ClientBodyError>()
        .map_or(ClientFault::Malformed, |e| e.0)
        .failure()
}

impl Prepared {
    /// Its head, as it would be sent upstream (a stored request's).
    pub(super) fn into_head(self) -> http::request::Parts {
        self.parts
    }

    /// The request's trace context, when the gateway traces.
    pub(super) fn trace(&self) -> Option<crate::trace::TraceCtx> {
        self.parts.extensions.get::<crate::trace::TraceCtx>().cloned()
    }

    /// The request for one attempt to `addr`: the body taken (streamed) or copied
    /// (buffered); the head copied only when another attempt may need it.
    pub(super) fn next_request(
        &mut self,
        addr: SocketAddr,
        up: &Upstream,
        last_chance: bool,
    ) -> Request<crate::Body> {
        let body = match &mut self.body {
            SendBody::Buffered(b) => http_body_util::Full::new(b.clone())
                .map_err(crate::BoxError::from)
                .boxed(),
            SendBody::Streaming(b) => b.take().unwrap_or_else(crate::empty),
        };
        let last_chance = last_chance || !matches!(self.body, SendBody::Buffered(_));
        let headers = if last_chance {
            std::mem::take(&mut self.parts.headers)
        } else {
            self.parts.headers.clone()
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.version_mut() = up.version;
        *req.headers_mut() = headers;
        *req.uri_mut() = super::upstream_uri(addr, &self.parts.uri, up.version, up.tls);
        if up.version == Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
            // An HTTP/1.0 client may send none; HTTP/1.1 requires one.
            let mut text = Vec::with_capacity(24);
            super::write_addr(&mut text, addr);
            if let Ok(host) = HeaderValue::from_maybe_shared(Bytes::from(text)) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        req
    }
}

/// Makes the request unambiguous before routing (RFC 9112 section 3.2, RFC 3986
/// section 6): more than one `Host`, a `Host` that is no authority, or an HTTP/1.1
/// request with neither `Host` nor an absolute target is a 400; an absolute
/// target's authority is the `Host` (routed on and sent upstream); the path is
/// normalised by [`normalize_path`].
pub(super) fn admit<B>(
    req: &mut Request<B>,
    slashes: EscapedSlashes,
) -> Result<Option<HeaderValue>, Failure> {
    let bad = |detail: &str| Failure::new(Cause::BadRequest, detail.to_string());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    if host.is_some_and(|h| !is_authority(h.as_bytes())) {
        return Err(bad("the Host header is not a host"));
    }
    let mut host = host.cloned();
    let is_h1 = matches!(
        req.version(),
        Version::HTTP_11 | Version::HTTP_10 | Version::HTTP_09
    );
    match req.uri().authority() {
        // The absolute form's authority wins over `Host` (RFC 9112 section 3.2.2).
        Some(a) if is_h1 => {
            if host
                .as_ref()
                .is_none_or(|h| h.as_bytes() != a.as_str().as_bytes())
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v.clone());
                host = Some(v);
            }
        }
        None if host.is_none() && req.version() == Version::HTTP_11 => {
            return Err(bad("an HTTP/1.1 request needs a Host header"));
        }
        _ => {}
    }
    let normalized = match normalize_path(req.uri().path(), slashes) {
        Ok(Cow::Borrowed(_)) => return Ok(host),
        Ok(Cow::Owned(path)) => path,
        Err(e) => return Err(bad(e.as_str())),
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    let query = parts
        .path_and_query
        .as_ref()
        .and_then(|pq| pq.query())
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.path_and_query = Some(
        format!("{normalized}{query}")
            .parse()
            .map_err(|_| bad("the normalised path is not a valid request target"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad("the request target is not valid"))?;
    Ok(host)
}

/// Whether `b` can be a `Host` value: `host[:port]`, of the characters RFC 3986
/// allows in a reg-name or an IP literal (checked by one scan, not by parsing a URI
/// authority, which copies the value on every request).
fn is_authority(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(|&c| AUTHORITY[usize::from(c)])
}

/// The bytes an authority may hold (RFC 3986 section 3.2: unreserved, sub-delims,
/// `:`, `[`, `]` and `%`), as a table: one load a byte.
static AUTHORITY: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
            );
        c += 1;
    }
    t
};

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// `..` would climb above the root.
    AboveRoot,
    /// An escaped `/` or `\` (or a raw `\`), refused by `escaped_slashes = "reject"`.
    EscapedSlash,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl PathError {
    /// The error's text for the client.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::AboveRoot => "the path climbs above the root",
            PathError::EscapedSlash => "the path has an escaped slash or a backslash",
            PathError::BadEscape => "the path has a % that is not followed by two hex digits",
        }
    }
}

/// The path routed and forwarded: percent-encoded unreserved characters decoded
/// (`%2e` is `.`, `%41` is `A`), other escapes kept with upper-case hex, escaped
/// slashes and backslashes treated by `slashes`, then dot segments removed (RFC
/// 3986 section 5.2.4). A path whose `..` climbs above the root is refused, not
/// clamped: such a request was written to escape. Paths with nothing to change
/// (almost all) are borrowed, after one scan of their bytes.
pub fn normalize_path(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if !b.starts_with(b"/") {
        return Ok(Cow::Borrowed(path)); // `*` (OPTIONS) and the like
    }
    if !has_dot_segment(b) && !b.iter().any(|&c| c == b'%' || c == b'\\') {
        return Ok(Cow::Borrowed(path));
    }
    // Escapes decoded, segment by segment: `segments` holds the output's segments.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = (hi * 16 + lo) as u8;
                match c {
                    b'/' | b'\\' => match slashes {
                        EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                        EscapedSlashes::Keep => push_escape(&mut decoded, c),
                        EscapedSlashes::Unescape => decoded.push('/'),
                    },
                    c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                        decoded.push(c as char);
                    }
                    c => push_escape(&mut decoded, c),
                }
                i += 3;
            }
            b'\\' => {
                match slashes {
                    EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                    EscapedSlashes::Keep => decoded.push('\\'),
                    EscapedSlashes::Unescape => decoded.push('/'),
                }
                i += 1;
            }
            _ => {
                // Copy up to the next byte that needs a look (the path is ASCII: the
                // URI parser admits nothing else).
                let next = b[i..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\')
                    .map_or(b.len(), |n| i + n);
                decoded.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Whether a segment of `b` is `.` or `..`.
fn has_dot_segment(b: &[u8]) -> bool {
    b.windows(2)
        .enumerate()
        .any(|(i, w)| w == b"/." && matches!(&b[i + 2..], [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..]))
}

fn push_escape(out: &mut String, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(c >> 4)] as char);
    out.push(HEX[usize::from(c & 0xf)] as char);
}

/// RFC 3986 section 5.2.4 on an absolute path, refusing to climb above the root.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    Ok(result)
}

/// Whether `route` matches `req` (admitted: one `Host`, a normalised path).
pub(super) fn matches<B>(route: &Route, req: &Request<B>) -> bool {
    let m = &route.matcher;
    if let Some(want) = &m.host {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
            .map(strip_port)
            .unwrap_or("");
        if !want.matches(host) {
            return false;
        }
    }
    let path = req.uri().path();
    if m.path.as_deref().is_some_and(|p| p != path) {
        return false;
    }
    if m.path_prefix.as_deref().is_some_and(|p| !path.starts_with(p)) {
        return false;
    }
    if !m.methods.is_empty() && !m.methods.contains(req.method()) {
        return false;
    }
    m.headers
        .iter()
        .all(|(k, v)| req.headers().get(k).is_some_and(|h| h == v))
}

/// `host:port` -> `host` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

/// The key a hash balancer places the request by.
pub(super) fn hash_key<B>(h: &HashKey, req: &Request<B>, client: SocketAddr) -> Option<u64> {
    use palisade_balance::hash::hash_bytes;
    match h {
        HashKey::Header(name) => req.headers().get(name).map(|v| hash_bytes(v.as_bytes())),
        HashKey::ClientIp => Some(hash_bytes(client.ip().to_string().as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn ordinary_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a.b/c.d", "/.well-known/x", "*"] {
            assert!(
                matches!(normalize_path(p, EscapedSlashes::Reject), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
        // `/.well-known` starts a segment with a dot yet is no dot segment.
        assert_eq!(norm("/.well-known/x").unwrap(), "/.well-known/x");
    }

    #[test]
    fn dot_segments_are_removed_and_climbing_out_is_refused() {
        assert_eq!(norm("/public/../admin/secret").unwrap(), "/admin/secret");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/%2e%2e/b").unwrap(), "/b");
        assert_eq!(norm("/a/%2E./b").unwrap(), "/b");
        assert_eq!(norm("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(norm("/a/../../etc/passwd").unwrap_err(), PathError::AboveRoot);
        assert_eq!(norm("/%2e%2e/x").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept_upper_case() {
        assert_eq!(norm("/%41%7e%5f").unwrap(), "/A~_");
        assert_eq!(norm("/a%20b%3f").unwrap(), "/a%20b%3F");
        assert_eq!(norm("/a%2").unwrap_err(), PathError::BadEscape);
        assert_eq!(norm("/a%zz").unwrap_err(), PathError::BadEscape);
    }

    #[test]
    fn escaped_slashes_follow_the_policy() {
        for p in ["/public/..%2fadmin", "/a%2Fb", "/a%5cb", "/a\\b"] {
            assert_eq!(norm(p).unwrap_err(), PathError::EscapedSlash, "{p}");
        }
        let keep = |p| normalize_path(p, EscapedSlashes::Keep).map(Cow::into_owned);
        assert_eq!(keep("/public/..%2fadmin").unwrap(), "/public/..%2Fadmin");
        let unescape = |p| normalize_path(p, EscapedSlashes::Unescape).map(Cow::into_owned);
        assert_eq!(unescape("/public/..%2fadmin").unwrap(), "/admin");
        assert_eq!(unescape("/public\\..\\admin").unwrap(), "/admin");
        assert_eq!(unescape("/..%2f..%2fetc").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn absolute_form_authority_becomes_the_host() {
        let mut req = Request::get("http://b.test/abs")
            .header("host", "a.test")
            .body(())
            .unwrap();
        admit(&mut req, EscapedSlashes::Reject).unwrap();
        assert_eq!(req.headers()["host"], "b.test");
        let mut req = Request::get("/x")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(
            admit(&mut req, EscapedSlashes::Reject).unwrap_err().cause,
            Cause::BadRequest
        );
        let mut req = Request::get("/x").body(()).unwrap();
        assert_eq!(
            admit(&mut req, EscapedSlashes::Reject).unwrap_err().cause,
            Cause::BadRequest
        );
        let mut req = Request::get("/x").version(Version::HTTP_10).body(()).unwrap();
        admit(&mut req, EscapedSlashes::Reject).unwrap();
        let mut req = Request::get("/p/../q?a=/../b")
            .header("host", "h")
            .body(())
            .unwrap();
        admit(&mut req, EscapedSlashes::Reject).unwrap();
        assert_eq!(req.uri().to_string(), "/q?a=/../b");
    }
}
