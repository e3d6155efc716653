//! HTTP caching as a shared cache does it: the rules of RFC 9111 (and RFC 5861's
//! `stale-while-revalidate` and `stale-if-error`) a proxy applies, without any I/O.
//!
//! A proxy asks, in order:
//!
//! 1. [`storable`]: may this answer be stored, and for how long is it fresh? A
//!    `no-store` or `private` answer, one with `Vary: *` or `Set-Cookie`, an answer
//!    to a request with `Authorization` (unless the answer says `public`,
//!    `s-maxage` or `must-revalidate`), a non-`GET`/`HEAD` request, and an answer
//!    with no freshness of its own and no configured default are never stored.
//! 2. [`Stored::reuse`]: may a stored answer serve this request now (fresh), serve
//!    it while a background revalidation runs (`stale-while-revalidate`), or must it
//!    be revalidated first? [`Stored::usable_on_error`] says whether it may stand in
//!    for a failed upstream (`stale-if-error`).
//! 3. [`Stored::vary_matches`]: was it stored for a request with the same values of
//!    the headers its `Vary` names?
//! 4. [`Stored::revalidation`]: the `If-None-Match` / `If-Modified-Since` to send
//!    upstream; [`Stored::refreshed`] folds a `304`'s headers in.
//! 5. [`Stored::not_modified_for`]: does the client's own conditional request match
//!    it (answer `304 Not Modified` from the cache)?
//!
//! Times are wall-clock (`SystemTime`), as HTTP's `Date`, `Expires` and `Age` are.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// The `Cache-Control` directives a shared cache acts on, from every
/// `Cache-Control` field of a message. Unknown directives are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age`; an invalid value reads as zero (stale), as RFC 9111 asks.
    pub max_age: Option<Duration>,
    /// `s-maxage` (shared caches only; implies `proxy-revalidate`).
    pub s_maxage: Option<Duration>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (with or without field names: the whole answer is revalidated).
    pub no_cache: bool,
    /// `private` (a shared cache never stores it).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`, or for a shared cache `proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// `stale-while-revalidate=N`.
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error=N`.
    pub stale_if_error: Option<Duration>,
}

impl CacheControl {
    /// Reads every `Cache-Control` field of `headers`.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        for field in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = field.to_str() else { continue };
            for (name, value) in directives(text) {
                let secs = || Some(delta_seconds(value));
                match name.to_ascii_lowercase().as_str() {
                    "max-age" => cc.max_age = secs(),
                    "s-maxage" => cc.s_maxage = secs(),
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "stale-while-revalidate" => cc.stale_while_revalidate = secs(),
                    "stale-if-error" => cc.stale_if_error = secs(),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits a `Cache-Control` value into `(name, value)` pairs; commas inside a quoted
/// value do not split it.
fn directives(text: &str) -> Vec<(&str, Option<&str>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut quoted = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    quoted = !quoted;
                }
                c == ',' && !quoted
            })
            .map_or(rest.len(), |(i, _)| i);
        let item = rest[..end].trim();
        rest = rest.get(end + 1..).unwrap_or("");
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((name, value)) => out.push((name.trim(), Some(value.trim().trim_matches('"')))),
            None => out.push((item, None)),
        }
    }
    out
}

/// A delta-seconds value; anything that is not one reads as zero, a value too large
/// as 2^31 seconds (RFC 9111, 1.2.2).
fn delta_seconds(value: Option<&str>) -> Duration {
    match value {
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            Duration::from_secs(v.parse::<u64>().unwrap_or(1 << 31).min(1 << 31))
        }
        _ => Duration::ZERO,
    }
}

/// What the cache itself adds to the answers' own rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Freshness for an answer that states none, if its status may be cached by
    /// default (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501); `None`: such
    /// answers are not stored.
    pub default_ttl: Option<Duration>,
    /// The longest an answer is kept fresh, whatever it says.
    pub max_ttl: Duration,
    /// `stale-while-revalidate` for answers that name none.
    pub stale_while_revalidate: Duration,
    /// `stale-if-error` for answers that name none.
    pub stale_if_error: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_ttl: None,
            max_ttl: Duration::from_secs(24 * 3600),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }
}

/// Why an answer is not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Skip {
    /// Only `GET` and `HEAD` answers are stored.
    Method,
    /// The request said `no-store`.
    RequestNoStore,
    /// The answer said `no-store`.
    NoStore,
    /// The answer said `private`: for the client alone.
    Private,
    /// `Vary: *`: no later request can be known to match.
    VaryAll,
    /// The answer sets a cookie: for one client.
    SetCookie,
    /// The request carried credentials and the answer did not allow sharing it.
    Authorization,
    /// Not a final status a cache may store (1xx, 206, 304) or not one cached by
    /// default without explicit freshness.
    Status,
    /// Neither the answer nor the policy gives it a freshness lifetime.
    NoFreshness,
    /// `no-cache` without a validator: it could never be reused.
    NoValidator,
}

impl Skip {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Method => "method",
            Skip::RequestNoStore => "request_no_store",
            Skip::NoStore => "no_store",
            Skip::Private => "private",
            Skip::VaryAll => "vary_all",
            Skip::SetCookie => "set_cookie",
            Skip::Authorization => "authorization",
            Skip::Status => "status",
            Skip::NoFreshness => "no_freshness",
            Skip::NoValidator => "no_validator",
        }
    }
}

/// How long a stored answer may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// Served without asking upstream while its age is below this.
    pub fresh: Duration,
    /// Past `fresh`, served while a background revalidation runs, this long.
    pub stale_while_revalidate: Duration,
    /// Past `fresh`, served when upstream fails, this long.
    pub stale_if_error: Duration,
}

impl Lifetime {
    /// How long a cache must keep the answer to honour all of it.
    pub fn keep(&self) -> Duration {
        self.fresh + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

const CACHEABLE_BY_DEFAULT: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Whether an answer to a request may be stored by a shared cache, and its
/// lifetime (RFC 9111, 3 and 4.2.1).
pub fn storable(
    policy: &Policy,
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    now: SystemTime,
) -> Result<Lifetime, Skip> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Skip::Method);
    }
    if CacheControl::parse(request).no_store {
        return Err(Skip::RequestNoStore);
    }
    let cc = CacheControl::parse(response);
    if cc.no_store {
        return Err(Skip::NoStore);
    }
    if cc.private {
        return Err(Skip::Private);
    }
    if vary_names(response).is_err() {
        return Err(Skip::VaryAll);
    }
    if response.contains_key(header::SET_COOKIE) {
        return Err(Skip::SetCookie);
    }
    if request.contains_key(header::AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Err(Skip::Authorization);
    }
    let code = status.as_u16();
    if code < 200 || code == 206 || code == 304 {
        return Err(Skip::Status);
    }
    let has_validator = response.contains_key(header::ETAG) || response.contains_key(header::LAST_MODIFIED);
    let fresh = if cc.no_cache {
        // Stored only to be revalidated before every use: its freshness is moot.
        if !has_validator {
            return Err(Skip::NoValidator);
        }
        Duration::ZERO
    } else {
        match cc.s_maxage.or(cc.max_age).or_else(|| expires_in(response, now)) {
            Some(d) => d,
            None if !CACHEABLE_BY_DEFAULT.contains(&code) => return Err(Skip::Status),
            None => policy.default_ttl.ok_or(Skip::NoFreshness)?,
        }
    };
    // `s-maxage` implies `proxy-revalidate` for a shared cache.
    let never_stale = cc.must_revalidate || cc.s_maxage.is_some() || cc.no_cache;
    let stale = |named: Option<Duration>, default: Duration| {
        if never_stale {
            Duration::ZERO
        } else {
            named.unwrap_or(default)
        }
    };
    Ok(Lifetime {
        fresh: if cc.no_cache {
            Duration::ZERO
        } else {
            fresh.min(policy.max_ttl)
        },
        stale_while_revalidate: stale(cc.stale_while_revalidate, policy.stale_while_revalidate),
        stale_if_error: stale(cc.stale_if_error, policy.stale_if_error),
    })
}

/// `Expires` minus `Date` (or minus `now` without a `Date`); an `Expires` that does
/// not parse means already expired.
fn expires_in(response: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let expires = response.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = response.get(header::DATE).and_then(http_date).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// The header names an answer's `Vary` lists, lowercased; `Err` for `Vary: *`.
pub fn vary_names(response: &HeaderMap) -> Result<Vec<HeaderName>, Skip> {
    let mut names = Vec::new();
    for field in response.get_all(header::VARY) {
        let Ok(text) = field.to_str() else { continue };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(Skip::VaryAll);
            }
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// The age an answer had when it arrived (RFC 9111, 4.2.3): the larger of what its
/// `Date` says and its `Age` plus the time the exchange took.
pub fn initial_age(response: &HeaderMap, requested_at: SystemTime, received_at: SystemTime) -> Duration {
    let apparent = response
        .get(header::DATE)
        .and_then(http_date)
        .and_then(|date| received_at.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    let age = response
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .map_or(Duration::ZERO, |v| delta_seconds(Some(v.trim())));
    let delay = received_at.duration_since(requested_at).unwrap_or(Duration::ZERO);
    apparent.max(age + delay)
}

/// Headers a cache never stores or replays: they describe one connection or one
/// hop (RFC 9110, 7.6.1), or are the gateway's own.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "age"
            | "x-palisade-cache"
    )
}

/// A stored answer: what is replayed, and what its reuse is judged by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The status code.
    pub status: u16,
    /// The header fields, without hop-by-hop ones, in order.
    pub headers: Vec<(String, Bytes)>,
    /// The body.
    pub body: Bytes,
    /// When it was stored (milliseconds since the epoch).
    pub stored_at_ms: u64,
    /// Its age when stored (milliseconds).
    pub initial_age_ms: u64,
    /// [`Lifetime::fresh`] in milliseconds.
    pub fresh_ms: u64,
    /// [`Lifetime::stale_while_revalidate`] in milliseconds.
    pub stale_while_revalidate_ms: u64,
    /// [`Lifetime::stale_if_error`] in milliseconds.
    pub stale_if_error_ms: u64,
    /// The request's values of the headers `Vary` names (`None`: absent).
    pub vary: Vec<(String, Option<Bytes>)>,
}

/// Whether a stored answer may serve a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh: serve it.
    Fresh,
    /// Stale within `stale-while-revalidate`: serve it and revalidate in the background.
    StaleWhileRevalidate,
    /// Revalidate (or fetch) before answering.
    Revalidate,
}

impl Stored {
    /// Builds a stored answer from a response's parts and body.
    pub fn new(
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
        body: Bytes,
        lifetime: Lifetime,
        initial_age: Duration,
        now: SystemTime,
    ) -> Self {
        let vary = vary_names(response)
            .unwrap_or_default()
            .into_iter()
            .map(|name| {
                let value = joined(request, &name);
                (name.as_str().to_owned(), value)
            })
            .collect();
        Stored {
            status: status.as_u16(),
            headers: response
                .iter()
                .filter(|(n, _)| !hop_by_hop(n))
                .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body,
            stored_at_ms: epoch_ms(now),
            initial_age_ms: millis(initial_age),
            fresh_ms: millis(lifetime.fresh),
            stale_while_revalidate_ms: millis(lifetime.stale_while_revalidate),
            stale_if_error_ms: millis(lifetime.stale_if_error),
            vary,
        }
    }

    /// Its current age (RFC 9111, 4.2.3), in whole seconds as the `Age` header has it.
    pub fn age(&self, now: SystemTime) -> Duration {
        let resident = epoch_ms(now).saturating_sub(self.stored_at_ms);
        Duration::from_millis(self.initial_age_ms.saturating_add(resident))
    }

    /// Whether it may serve a request with these headers at `now`.
    pub fn reuse(&self, request: &HeaderMap, now: SystemTime) -> Reuse {
        let age = self.age(now);
        let cc = CacheControl::parse(request);
        if cc.no_cache || cc.max_age.is_some_and(|max| age > max) {
            return Reuse::Revalidate;
        }
        let fresh = Duration::from_millis(self.fresh_ms);
        if age < fresh {
            Reuse::Fresh
        } else if age < fresh + Duration::from_millis(self.stale_while_revalidate_ms) {
            Reuse::StaleWhileRevalidate
        } else {
            Reuse::Revalidate
        }
    }

    /// Whether it may stand in for an upstream that failed (`stale-if-error`).
    pub fn usable_on_error(&self, now: SystemTime) -> bool {
        self.age(now) < Duration::from_millis(self.fresh_ms + self.stale_if_error_ms)
    }

    /// Whether it was stored for a request with the same values of the headers its
    /// `Vary` names.
    pub fn vary_matches(&self, request: &HeaderMap) -> bool {
        self.vary.iter().all(|(name, stored)| {
            HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| joined(request, &n) == *stored)
        })
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name.as_str())
            .map(|(_, v)| v.as_ref())
    }

    /// The conditional headers that ask upstream whether it is still current.
    pub fn revalidation(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = self
            .header(&header::ETAG)
            .and_then(|v| HeaderValue::from_bytes(v).ok())
        {
            h.insert(header::IF_NONE_MATCH, v);
        }
        if let Some(v) = self
            .header(&header::LAST_MODIFIED)
            .and_then(|v| HeaderValue::from_bytes(v).ok())
        {
            h.insert(header::IF_MODIFIED_SINCE, v);
        }
        h
    }

    /// The answer refreshed by a `304 Not Modified` to a revalidation sent at
    /// `requested_at`: its header fields replace the stored ones of the same name
    /// (RFC 9111, 4.3.4), its age starts again, and its lifetime is judged anew
    /// from the merged fields (a `304` may say `no-store` now: then `Err`).
    pub fn refreshed(
        &self,
        policy: &Policy,
        request: &HeaderMap,
        not_modified: &HeaderMap,
        requested_at: SystemTime,
        now: SystemTime,
    ) -> Result<Self, Skip> {
        let mut next = self.clone();
        for name in not_modified.keys() {
            if hop_by_hop(name) || *name == header::CONTENT_LENGTH {
                continue;
            }
            next.headers.retain(|(n, _)| n != name.as_str());
            for v in not_modified.get_all(name) {
                next.headers
                    .push((name.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())));
            }
        }
        let merged = next.header_map();
        let status = StatusCode::from_u16(self.status).map_err(|_| Skip::Status)?;
        let lifetime = storable(policy, &Method::GET, request, status, &merged, now)?;
        next.stored_at_ms = epoch_ms(now);
        next.initial_age_ms = millis(initial_age(not_modified, requested_at, now));
        next.fresh_ms = millis(lifetime.fresh);
        next.stale_while_revalidate_ms = millis(lifetime.stale_while_revalidate);
        next.stale_if_error_ms = millis(lifetime.stale_if_error);
        Ok(next)
    }

    /// Its header fields as a map (fields that no longer parse are left out).
    pub fn header_map(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                h.append(n, v);
            }
        }
        h
    }

    /// How long a cache should keep it: its whole lifetime and, when it has a
    /// validator, up to the policy's `max_ttl` (a stale answer that can be
    /// revalidated saves sending its body again).
    pub fn retain_for(&self, policy: &Policy) -> Duration {
        let whole = self.lifetime().keep();
        let validated = self.header(&header::ETAG).is_some() || self.header(&header::LAST_MODIFIED).is_some();
        if validated {
            whole.max(policy.max_ttl)
        } else {
            whole
        }
        .max(Duration::from_millis(1))
    }

    /// The lifetime it was stored with.
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            fresh: Duration::from_millis(self.fresh_ms),
            stale_while_revalidate: Duration::from_millis(self.stale_while_revalidate_ms),
            stale_if_error: Duration::from_millis(self.stale_if_error_ms),
        }
    }

    /// Whether the client's own conditional request is satisfied by it, so the
    /// cache answers `304 Not Modified` (RFC 9110, 13.2.2): `If-None-Match` by weak
    /// comparison with its `ETag`; else `If-Modified-Since` against its
    /// `Last-Modified`.
    pub fn not_modified_for(&self, request: &HeaderMap) -> bool {
        if let Some(inm) = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
            let Some(etag) = self
                .header(&header::ETAG)
                .and_then(|v| std::str::from_utf8(v).ok())
            else {
                return false;
            };
            let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
            return inm.split(',').any(|t| t.trim() == "*" || weak(t) == weak(etag));
        }
        let since = request.get(header::IF_MODIFIED_SINCE).and_then(http_date);
        let modified = self
            .header(&header::LAST_MODIFIED)
            .and_then(|v| HeaderValue::from_bytes(v).ok())
            .and_then(|v| http_date(&v));
        matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
    }
}

/// The values of every field `name` of `headers`, joined by ", ".
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Bytes> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(Bytes::from(out))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// An HTTP date in its preferred form (`Sun, 06 Nov 1994 08:49:37 GMT`); the
/// obsolete forms read as no date.
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    let s = value.to_str().ok()?.trim();
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = s.get(5..)?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || day == 0 || day > 31 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u64, day: u64) -> Option<i64> {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::try_from(month).ok()?;
    let d = i64::try_from(day).ok()?;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const NOW: &str = "Mon, 30 Nov 2026 12:00:00 GMT";

    fn now() -> SystemTime {
        http_date(&HeaderValue::from_static(NOW)).unwrap()
    }

    fn judge(
        policy: &Policy,
        method: Method,
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
    ) -> Result<Lifetime, Skip> {
        let status = StatusCode::from_u16(status).unwrap();
        storable(policy, &method, &headers(req), status, &headers(resp), now())
    }

    fn store(resp: &[(&str, &str)]) -> Result<Lifetime, Skip> {
        judge(&Policy::default(), Method::GET, &[], 200, resp)
    }

    #[test]
    fn dates_parse() {
        let t = http_date(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT")).unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        assert_eq!(
            http_date(&HeaderValue::from_static("Sunday, 06-Nov-94 08:49:37 GMT")),
            None
        );
        assert_eq!(http_date(&HeaderValue::from_static("garbage")), None);
    }

    #[test]
    fn directives_parse_with_quotes_and_case() {
        let cc = CacheControl::parse(&headers(&[
            (
                "cache-control",
                "Public, MAX-AGE=60, no-cache=\"set-cookie, x-a\"",
            ),
            ("cache-control", "stale-while-revalidate=30,stale-if-error=600"),
        ]));
        assert!(cc.public && cc.no_cache);
        assert_eq!(cc.max_age, Some(Duration::from_secs(60)));
        assert_eq!(cc.stale_while_revalidate, Some(Duration::from_secs(30)));
        assert_eq!(cc.stale_if_error, Some(Duration::from_secs(600)));
        // An invalid max-age is stale, not absent.
        let cc = CacheControl::parse(&headers(&[("cache-control", "max-age=soon")]));
        assert_eq!(cc.max_age, Some(Duration::ZERO));
    }

    #[test]
    fn private_and_no_store_answers_are_never_stored() {
        assert_eq!(
            store(&[("cache-control", "private, max-age=60")]),
            Err(Skip::Private)
        );
        assert_eq!(
            store(&[("cache-control", "no-store, max-age=60")]),
            Err(Skip::NoStore)
        );
        assert_eq!(
            store(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
            Err(Skip::SetCookie)
        );
        assert_eq!(
            store(&[("cache-control", "max-age=60"), ("vary", "*")]),
            Err(Skip::VaryAll)
        );
        let fresh = [("cache-control", "max-age=60")];
        let no_store = [("cache-control", "no-store")];
        let policy = Policy::default();
        assert_eq!(
            judge(&policy, Method::GET, &no_store, 200, &fresh),
            Err(Skip::RequestNoStore)
        );
        assert_eq!(judge(&policy, Method::POST, &[], 200, &fresh), Err(Skip::Method));
    }

    #[test]
    fn credentials_need_the_answer_s_leave() {
        let req = [("authorization", "Bearer x")];
        let policy = Policy::default();
        let got = judge(
            &policy,
            Method::GET,
            &req,
            200,
            &[("cache-control", "max-age=60")],
        );
        assert_eq!(got, Err(Skip::Authorization));
        let got = judge(
            &policy,
            Method::GET,
            &req,
            200,
            &[("cache-control", "public, max-age=60")],
        );
        assert!(got.is_ok());
    }

    #[test]
    fn freshness_comes_from_s_maxage_max_age_expires_or_the_policy() {
        assert_eq!(
            store(&[("cache-control", "max-age=60, s-maxage=10")])
                .unwrap()
                .fresh,
            Duration::from_secs(10)
        );
        assert_eq!(
            store(&[("cache-control", "max-age=60")]).unwrap().fresh,
            Duration::from_secs(60)
        );
        let lt = store(&[("date", NOW), ("expires", "Mon, 30 Nov 2026 12:05:00 GMT")]).unwrap();
        assert_eq!(lt.fresh, Duration::from_secs(300));
        assert_eq!(store(&[("expires", "0")]).unwrap().fresh, Duration::ZERO);
        assert_eq!(store(&[]), Err(Skip::NoFreshness));
        let policy = Policy {
            default_ttl: Some(Duration::from_secs(5)),
            max_ttl: Duration::from_secs(30),
            ..Policy::default()
        };
        assert_eq!(
            judge(&policy, Method::GET, &[], 200, &[]).unwrap().fresh,
            Duration::from_secs(5)
        );
        // 500 is not cached by default: only with explicit freshness.
        assert_eq!(judge(&policy, Method::GET, &[], 500, &[]), Err(Skip::Status));
        // The policy caps what an answer asks for.
        let got = judge(
            &policy,
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=3600")],
        );
        assert_eq!(got.unwrap().fresh, Duration::from_secs(30));
    }

    #[test]
    fn no_cache_stores_only_what_can_be_revalidated_and_must_revalidate_is_never_stale() {
        assert_eq!(
            store(&[("cache-control", "no-cache, max-age=60")]),
            Err(Skip::NoValidator)
        );
        let lt = store(&[("cache-control", "no-cache, max-age=60"), ("etag", "\"v1\"")]).unwrap();
        assert_eq!(lt.fresh, Duration::ZERO);
        // No freshness is needed for an answer stored only to be revalidated.
        assert!(store(&[("cache-control", "no-cache"), ("etag", "\"v1\"")]).is_ok());
        let lt = store(&[("cache-control", "max-age=60, must-revalidate, stale-if-error=600")]).unwrap();
        assert_eq!(lt.stale_if_error, Duration::ZERO);
        let lt = store(&[(
            "cache-control",
            "max-age=60, stale-while-revalidate=30, stale-if-error=600",
        )])
        .unwrap();
        assert_eq!(
            (lt.stale_while_revalidate, lt.stale_if_error),
            (Duration::from_secs(30), Duration::from_secs(600))
        );
    }

    fn stored(resp: &[(&str, &str)], req: &[(&str, &str)]) -> Stored {
        let lt = judge(&Policy::default(), Method::GET, req, 200, resp).unwrap();
        let (resp, req) = (headers(resp), headers(req));
        let age = initial_age(&resp, now(), now());
        Stored::new(
            &req,
            StatusCode::OK,
            &resp,
            Bytes::from_static(b"body"),
            lt,
            age,
            now(),
        )
    }

    #[test]
    fn reuse_follows_age_freshness_and_the_stale_windows() {
        let s = stored(
            &[(
                "cache-control",
                "max-age=60, stale-while-revalidate=30, stale-if-error=300",
            )],
            &[],
        );
        let at = |secs| now() + Duration::from_secs(secs);
        let none = HeaderMap::new();
        assert_eq!(s.reuse(&none, at(59)), Reuse::Fresh);
        assert_eq!(s.reuse(&none, at(61)), Reuse::StaleWhileRevalidate);
        assert_eq!(s.reuse(&none, at(91)), Reuse::Revalidate);
        assert!(s.usable_on_error(at(359)) && !s.usable_on_error(at(361)));
        // A client's no-cache, or a max-age below the age, asks for revalidation.
        assert_eq!(
            s.reuse(&headers(&[("cache-control", "no-cache")]), at(1)),
            Reuse::Revalidate
        );
        assert_eq!(
            s.reuse(&headers(&[("cache-control", "max-age=5")]), at(10)),
            Reuse::Revalidate
        );
        // The Age an upstream cache reported counts.
        let s = stored(&[("cache-control", "max-age=60"), ("age", "50")], &[]);
        assert_eq!(s.reuse(&none, at(11)), Reuse::Revalidate);
        assert_eq!(s.age(at(11)), Duration::from_secs(61));
    }

    #[test]
    fn vary_matches_only_the_same_header_values() {
        let s = stored(
            &[
                ("cache-control", "max-age=60"),
                ("vary", "Accept-Encoding, accept-language"),
            ],
            &[("accept-encoding", "gzip")],
        );
        assert!(s.vary_matches(&headers(&[("accept-encoding", "gzip")])));
        assert!(!s.vary_matches(&headers(&[("accept-encoding", "br")])));
        assert!(!s.vary_matches(&headers(&[
            ("accept-encoding", "gzip"),
            ("accept-language", "fr")
        ])));
    }

    #[test]
    fn revalidation_and_a_304_refresh() {
        let s = stored(
            &[
                ("cache-control", "max-age=60"),
                ("etag", "W/\"v1\""),
                ("last-modified", "Sun, 29 Nov 2026 12:00:00 GMT"),
                ("x-version", "1"),
                ("connection", "close"),
            ],
            &[],
        );
        assert!(s.headers.iter().all(|(n, _)| n != "connection"));
        let h = s.revalidation();
        assert_eq!(h[header::IF_NONE_MATCH], "W/\"v1\"");
        assert_eq!(h[header::IF_MODIFIED_SINCE], "Sun, 29 Nov 2026 12:00:00 GMT");
        let later = now() + Duration::from_secs(120);
        assert_eq!(s.reuse(&HeaderMap::new(), later), Reuse::Revalidate);
        let policy = Policy::default();
        let none = HeaderMap::new();
        let r = s
            .refreshed(&policy, &none, &headers(&[("x-version", "2")]), later, later)
            .unwrap();
        assert_eq!(r.reuse(&none, later), Reuse::Fresh);
        assert_eq!(r.header(&HeaderName::from_static("x-version")), Some(&b"2"[..]));
        assert_eq!(r.body, s.body);
        // A 304 that now forbids storing ends the stored answer.
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(
            s.refreshed(&policy, &none, &no_store, later, later),
            Err(Skip::NoStore)
        );
    }

    #[test]
    fn client_conditionals_are_answered_from_the_stored_validators() {
        let s = stored(
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"v1\""),
                ("last-modified", "Sun, 29 Nov 2026 12:00:00 GMT"),
            ],
            &[],
        );
        assert!(s.not_modified_for(&headers(&[("if-none-match", "\"v0\", W/\"v1\"")])));
        assert!(!s.not_modified_for(&headers(&[("if-none-match", "\"v2\"")])));
        // If-None-Match decides when present, even with a matching date.
        assert!(!s.not_modified_for(&headers(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Mon, 30 Nov 2026 00:00:00 GMT"),
        ])));
        assert!(s.not_modified_for(&headers(&[(
            "if-modified-since",
            "Mon, 30 Nov 2026 00:00:00 GMT"
        )])));
        assert!(!s.not_modified_for(&headers(&[(
            "if-modified-since",
            "Sat, 28 Nov 2026 00:00:00 GMT"
        )])));
    }

    #[test]
    fn a_stored_answer_survives_the_l2_encoding() {
        let s = stored(
            &[("cache-control", "max-age=60"), ("content-type", "text/plain")],
            &[],
        );
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<Stored>(&bytes).unwrap(), s);
    }
}
