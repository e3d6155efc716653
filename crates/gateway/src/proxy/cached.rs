//! A route's response cache (`palisade_cache::http` for the rules, the gateway's
//! shared [`Responses`] store for the answers): fresh answers served without
//! asking upstream, stale ones revalidated with their validators, served while
//! revalidating or when upstream fails where the answer allows, and new answers
//! stored as they stream to the client. Every answer of a cached route says which
//! it was in `x-palisade-cache` (`hit`, `miss`, `stale`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use palisade_cache::http::{Reuse, Stored, initial_age, storable};

use super::admit::Inbound;
use super::{Downstream, REQUEST_ID, fallback_or_failure, route_request};
use crate::conn::ActiveGuard;
use crate::responses::{Fetching, Responses, RouteCache, Served};
use crate::route::Route;
use crate::runtime::Runtime;
use crate::{Body, BoxError, empty, full};

/// Says whether an answer came from the cache.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-palisade-cache");

/// Who asked, as the uncached path is told.
#[derive(Clone)]
pub(super) struct Asker<'a> {
    /// The client and the request's host.
    pub from: (Downstream, Option<HeaderValue>),
    pub request_id: &'a HeaderValue,
    /// Whether a failure may be answered with the route's fallback.
    pub may_fall_back: bool,
}

/// Answers a request on a route with a cache.
pub(super) async fn serve(
    rt: Arc<Runtime>,
    route: &Route,
    rules: &RouteCache,
    req: Request<Inbound>,
    asker: Asker<'_>,
    active: &mut Option<ActiveGuard>,
) -> Response<Body> {
    let request_id = asker.request_id.clone();
    let mut resp = answer(rt, route, rules, req, asker, active).await;
    // A stored answer carries the request id of the request that fetched it.
    resp.headers_mut().insert(REQUEST_ID, request_id);
    resp
}

async fn answer(
    rt: Arc<Runtime>,
    route: &Route,
    rules: &RouteCache,
    mut req: Request<Inbound>,
    asker: Asker<'_>,
    active: &mut Option<ActiveGuard>,
) -> Response<Body> {
    let Asker {
        from,
        request_id,
        may_fall_back,
    } = asker;
    let Some(store) = rt.responses.clone() else {
        // A route given a cache by a reload, on a gateway that started without one.
        return proxied(&rt, route, req, from, request_id, active, may_fall_back).await;
    };
    let key = key(route, rules, &req, from.1.as_ref());
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        let resp = proxied(&rt, route, req, from, request_id, active, may_fall_back).await;
        // A change that succeeded makes what was stored for its target stale
        // (RFC 9111, 4.4).
        if !method.is_safe() && (resp.status().is_success() || resp.status().is_redirection()) {
            let _ = store.cache.invalidate(&key).await;
        }
        return resp;
    }
    let asked = req.headers().clone();
    let now = SystemTime::now();
    let stored = store.cache.get(&key).await.filter(|s| s.vary_matches(&asked));
    let mut revalidating = false;
    if let Some(s) = &stored {
        match s.reuse(&asked, now) {
            Reuse::Fresh => return replay(route, s, &method, &asked, now, Served::Hit),
            Reuse::StaleWhileRevalidate => {
                if let Some(lead) = store.lead(&key) {
                    revalidate_later(&rt, route, &store, (key, lead), req, from, request_id, s);
                }
                return replay(route, s, &method, &asked, now, Served::Stale);
            }
            Reuse::Revalidate => {
                // The client's own conditional goes as it is; else the cache's (a
                // HEAD goes through as it is: a 304 would not be its answer).
                if method == Method::GET && !has_conditional(&asked) {
                    req.headers_mut().extend(s.revalidation());
                    revalidating = true;
                }
            }
        }
    }
    if method == Method::HEAD {
        // Stored answers come from GETs; a HEAD goes through.
        let resp = proxied(&rt, route, req, from, request_id, active, may_fall_back).await;
        return mark(route, resp, Served::Miss);
    }
    // Concurrent misses of a key: one request fetches it, the others wait (up to the
    // route's timeout) for its answer to be stored, then look again.
    let mut lead = None;
    if stored.is_none() {
        match store.fetch_or_wait(&key, route.timeout).await {
            Ok(fetching) => lead = Some(fetching),
            Err(()) => {
                let now = SystemTime::now();
                if let Some(s) = store.cache.get(&key).await.filter(|s| s.vary_matches(&asked))
                    && s.reuse(&asked, now) == Reuse::Fresh
                {
                    return replay(route, &s, &method, &asked, now, Served::Hit);
                }
            }
        }
    }
    let requested_at = SystemTime::now();
    let result = route_request(&rt, route, req, from, request_id, active).await;
    let fetch = Fetch {
        route,
        rules,
        store: &store,
        key,
        asked,
        stored,
        revalidating,
        requested_at,
    };
    match result {
        Ok(resp) => fetch.answered(resp, lead).await,
        Err(f) => fetch.failed(&f, request_id, may_fall_back),
    }
}

/// A request sent upstream on a miss or to revalidate, and what it is judged by.
struct Fetch<'a> {
    route: &'a Route,
    rules: &'a RouteCache,
    store: &'a Arc<Responses>,
    key: String,
    /// The client's request headers.
    asked: HeaderMap,
    /// What the store had (stale, or needing revalidation).
    stored: Option<Arc<Stored>>,
    /// Whether the conditional sent was the cache's own.
    revalidating: bool,
    requested_at: SystemTime,
}

impl Fetch<'_> {
    /// Upstream answered: a `304` refreshes the stored answer, a `5xx` may be
    /// answered by it (stale-if-error), anything else is passed on and stored if
    /// it may be.
    async fn answered(self, resp: Response<Body>, lead: Option<Fetching>) -> Response<Body> {
        let now = SystemTime::now();
        if let Some(s) = self.stored.as_deref()
            && resp.status() == StatusCode::NOT_MODIFIED
        {
            let (place, asked) = (
                (self.route, self.rules, &**self.store, self.key.as_str()),
                &self.asked,
            );
            return refreshed(
                place,
                s,
                asked,
                resp.headers(),
                self.requested_at,
                self.revalidating,
            )
            .await;
        }
        if resp.status().is_server_error()
            && let Some(s) = self.stored.as_deref().filter(|s| s.usable_on_error(now))
        {
            return replay(self.route, s, &Method::GET, &self.asked, now, Served::Stale);
        }
        let (route, rules, store) = (self.route, self.rules, self.store);
        let resp = store_as_it_streams(
            route,
            rules,
            store,
            self.key,
            &self.asked,
            resp,
            self.requested_at,
            lead,
        );
        mark(route, resp, Served::Miss)
    }

    /// The gateway could not get an answer: the stored one if stale-if-error
    /// allows, else the failure (or the route's fallback).
    fn failed(self, f: &super::Failure, request_id: &HeaderValue, may_fall_back: bool) -> Response<Body> {
        let now = SystemTime::now();
        match self.stored.as_deref().filter(|s| s.usable_on_error(now)) {
            Some(s) => replay(self.route, s, &Method::GET, &self.asked, now, Served::Stale),
            None => fallback_or_failure(self.route, f, request_id, may_fall_back),
        }
    }
}

/// The request sent on as the uncached path sends it.
async fn proxied(
    rt: &Runtime,
    route: &Route,
    req: Request<Inbound>,
    from: (Downstream, Option<HeaderValue>),
    request_id: &HeaderValue,
    active: &mut Option<ActiveGuard>,
    may_fall_back: bool,
) -> Response<Body> {
    match route_request(rt, route, req, from, request_id, active).await {
        Ok(resp) => resp,
        Err(f) => fallback_or_failure(route, &f, request_id, may_fall_back),
    }
}

/// The key: the route, the host, the path, (unless the route leaves it out) the
/// query, and the values of the route's `key_headers`. Other request headers an
/// answer varies on are checked against the stored answer's, not keyed: one
/// variant per key, the latest stored.
fn key<B>(route: &Route, rules: &RouteCache, req: &Request<B>, host: Option<&HeaderValue>) -> String {
    let host = host.map_or(&b""[..], |h| h.as_bytes());
    let uri = req.uri();
    let mut key = String::with_capacity(route.name.len() + host.len() + uri.path().len() + 16);
    key.push_str(&route.name);
    key.push('\n');
    key.push_str(&String::from_utf8_lossy(host).to_ascii_lowercase());
    key.push('\n');
    key.push_str(uri.path());
    if rules.key_query
        && let Some(q) = uri.query()
    {
        key.push('?');
        key.push_str(q);
    }
    for name in &rules.key_headers {
        key.push('\n');
        key.push_str(name.as_str());
        for v in req.headers().get_all(name) {
            key.push(':');
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    key
}

fn has_conditional(h: &HeaderMap) -> bool {
    h.contains_key(header::IF_NONE_MATCH) || h.contains_key(header::IF_MODIFIED_SINCE)
}

/// A stored answer, as a `304` if the client's conditional matches it.
fn replay(
    route: &Route,
    s: &Stored,
    method: &Method,
    asked: &HeaderMap,
    now: SystemTime,
    how: Served,
) -> Response<Body> {
    count(route, how);
    let not_modified = s.not_modified_for(asked);
    let body = if not_modified || *method == Method::HEAD {
        empty()
    } else {
        full(s.body.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK)
    };
    let h = resp.headers_mut();
    *h = s.header_map();
    if not_modified {
        h.remove(header::CONTENT_LENGTH);
    }
    h.insert(header::AGE, HeaderValue::from(s.age(now).as_secs()));
    h.insert(CACHE_HEADER, HeaderValue::from_static(how.as_str()));
    resp
}

/// Says on a passed-on answer how the cache took part, and counts it.
fn mark(route: &Route, mut resp: Response<Body>, how: Served) -> Response<Body> {
    count(route, how);
    resp.headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(how.as_str()));
    resp
}

fn count(route: &Route, how: Served) {
    if let Some(rules) = &route.cache {
        rules.count(how);
    }
}

/// A `304` to a revalidation: the stored answer, refreshed, is stored again and
/// replayed (a `304` if the client's own conditional matches it; the upstream's
/// `304` as it is if the conditional was the client's and the answer may no
/// longer be stored).
async fn refreshed(
    (route, rules, store, key): (&Route, &RouteCache, &Responses, &str),
    s: &Stored,
    asked: &HeaderMap,
    not_modified: &HeaderMap,
    requested_at: SystemTime,
    ours: bool,
) -> Response<Body> {
    let now = SystemTime::now();
    match s.refreshed(&rules.policy, asked, not_modified, requested_at, now) {
        Ok(next) => {
            let keep = next.lifetime().keep();
            let next = Arc::new(next);
            let _ = store
                .cache
                .set_for(key, next.clone(), keep.max(std::time::Duration::from_millis(1)))
                .await;
            replay(route, &next, &Method::GET, asked, now, Served::Hit)
        }
        Err(_) => {
            let _ = store.cache.invalidate(key).await;
            if ours {
                // The client asked unconditionally: give it the body we have.
                replay(route, s, &Method::GET, &HeaderMap::new(), now, Served::Stale)
            } else {
                let mut resp = Response::new(empty());
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                *resp.headers_mut() = not_modified.clone();
                mark(route, resp, Served::Miss)
            }
        }
    }
}

/// Revalidates a stale answer in the background, with the client's own request
/// (a `GET`, its body already read) made conditional, after the client has its
/// stale answer.
#[allow(clippy::too_many_arguments)]
fn revalidate_later(
    rt: &Arc<Runtime>,
    route: &Route,
    store: &Arc<Responses>,
    (key, lead): (String, Fetching),
    mut req: Request<Inbound>,
    from: (Downstream, Option<HeaderValue>),
    request_id: &HeaderValue,
    s: &Stored,
) {
    // `lead` marks the key revalidating until the task ends, however it ends.
    let Some(index) = rt.routes.iter().position(|r| std::ptr::eq(r, route)) else {
        return;
    };
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::CACHE_CONTROL,
    ] {
        req.headers_mut().remove(name);
    }
    req.headers_mut().extend(s.revalidation());
    let (rt, store, request_id, s) = (rt.clone(), store.clone(), request_id.clone(), s.clone());
    tokio::spawn(async move {
        let route = &rt.routes[index];
        let Some(rules) = route.cache.as_ref() else { return };
        let asked = req.headers().clone();
        let requested_at = SystemTime::now();
        let mut active = None;
        if let Ok(resp) = route_request(&rt, route, req, from, &request_id, &mut active).await {
            if resp.status() == StatusCode::NOT_MODIFIED {
                let place = (route, rules, &*store, key.as_str());
                refreshed(place, &s, &asked, resp.headers(), requested_at, true).await;
            } else if !resp.status().is_server_error() {
                // Read to its end: the tee stores it.
                let resp = store_as_it_streams(
                    route,
                    rules,
                    &store,
                    key.clone(),
                    &asked,
                    resp,
                    requested_at,
                    Some(lead),
                );
                let _ = resp.into_body().collect().await;
            }
        }
    });
}

/// The answer passed on; if it may be stored, its body is kept as it streams and
/// stored when complete (if no larger than the route's `max_body_bytes`). `lead`,
/// the fetch other requests wait for, ends once it is stored (or cannot be).
#[allow(clippy::too_many_arguments)]
fn store_as_it_streams(
    route: &Route,
    rules: &RouteCache,
    store: &Arc<Responses>,
    key: String,
    asked: &HeaderMap,
    resp: Response<Body>,
    requested_at: SystemTime,
    lead: Option<Fetching>,
) -> Response<Body> {
    let now = SystemTime::now();
    let lifetime = match storable(
        &rules.policy,
        &Method::GET,
        asked,
        resp.status(),
        resp.headers(),
        now,
    ) {
        Ok(lifetime) => lifetime,
        Err(skip) => {
            metrics::counter!("palisade_route_cache_skipped_total", "route" => route.name.clone(), "reason" => skip.as_str())
                .increment(1);
            return resp;
        }
    };
    let (parts, body) = resp.into_parts();
    let age = initial_age(&parts.headers, requested_at, now);
    let template = Stored::new(
        asked,
        parts.status,
        &parts.headers,
        Bytes::new(),
        lifetime,
        age,
        now,
    );
    let (store, policy) = (store.clone(), rules.policy.clone());
    let on_complete: Box<dyn FnOnce(Bytes) + Send + Sync> = Box::new(move |body| {
        let stored = Arc::new(Stored { body, ..template });
        let keep = stored.retain_for(&policy);
        // In memory before the body's end reaches the client; Redis after.
        let shared = store.cache.set_for(&key, stored, keep);
        drop(lead);
        tokio::spawn(shared);
    });
    let mut tee = Tee {
        inner: body,
        kept: BytesMut::new(),
        limit: rules.max_body,
        on_complete: Some(on_complete),
    };
    // An empty body may never be polled.
    tee.complete_at_end();
    Response::from_parts(parts, BodyExt::boxed(tee))
}

/// A body passed through while a copy of it is kept, up to a limit; at its end (no
/// trailers, within the limit) the copy is handed on.
struct Tee {
    inner: Body,
    kept: BytesMut,
    limit: usize,
    on_complete: Option<Box<dyn FnOnce(Bytes) + Send + Sync>>,
}

impl Tee {
    /// Hands the copy on if the body is over: its end may never be polled (a
    /// sender that knows the length stops when it has it all).
    fn complete_at_end(&mut self) {
        if self.inner.is_end_stream() || self.inner.size_hint().exact() == Some(0) {
            self.complete();
        }
    }

    fn complete(&mut self) {
        if let Some(done) = self.on_complete.take() {
            done(std::mem::take(&mut self.kept).freeze());
        }
    }
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) if this.on_complete.is_some() => {
                    if this.kept.len() + data.len() <= this.limit {
                        this.kept.extend_from_slice(data);
                        this.complete_at_end();
                    } else {
                        this.on_complete = None;
                    }
                }
                Some(_) => {}
                // Trailers: not replayable from a stored body.
                None => this.on_complete = None,
            },
            Poll::Ready(None) => this.complete(),
            Poll::Ready(Some(Err(_))) => this.on_complete = None,
            Poll::Pending => {}
        }
        polled
    }

    /// Not at its end while a copy waits to be handed on: the next poll sees the end.
    fn is_end_stream(&self) -> bool {
        self.on_complete.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
