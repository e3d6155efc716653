//! Distributed tracing (`[gateway.tracing]`): W3C Trace Context taken from the
//! client or started here, passed upstream, and a span per request with a child
//! span per attempt, exported over OTLP/HTTP to a collector.
//!
//! A request's context comes from its `traceparent` when that is valid (the
//! client's sampled flag is followed, its `tracestate` passed on as it is), else a
//! new trace is started and recorded for `sample_ratio` of them (decided from the
//! trace id, so every hop that decides by ratio decides alike). Each attempt gets
//! a span id of its own, sent upstream in `traceparent`, so the upstream's spans
//! hang under the attempt that reached them.
//!
//! Spans go to the exporter through a bounded queue: when it is full (a slow or
//! dead collector), spans are dropped and counted, and requests never wait.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

use crate::config::{ConfigError, TracingSection};

mod export;

pub use export::Exporter;

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// What a span records besides its ids and times.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// A finished span, waiting for export.
#[derive(Clone, Debug)]
pub struct Span {
    /// Its trace.
    pub trace_id: u128,
    /// Its own id.
    pub span_id: u64,
    /// Its parent's id (the client's span, or the request's for an attempt).
    pub parent: Option<u64>,
    /// The client's `tracestate`, passed on.
    pub trace_state: Option<String>,
    /// Its name.
    pub name: String,
    /// Server (a request) or client (an attempt).
    pub kind: SpanKind,
    /// When it started and ended, in nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// Its attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// Whether it failed (a 5xx, or an attempt that got no answer).
    pub error: bool,
}

/// OTLP's span kinds that the gateway records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// A request the gateway served.
    Server = 2,
    /// An attempt it made upstream.
    Client = 3,
}

/// The trace a request belongs to, kept in its extensions.
#[derive(Clone, Debug)]
pub struct TraceCtx {
    /// Where its spans go.
    pub tracer: Arc<Tracer>,
    /// Its trace.
    pub trace_id: u128,
    /// The request's span.
    pub span_id: u64,
    /// The client's span, when the client sent a context.
    pub parent: Option<u64>,
    /// Whether its spans are recorded.
    pub sampled: bool,
}

/// An attempt's span, from its request's extensions to its end.
#[derive(Clone, Debug)]
pub struct AttemptTrace {
    /// The request's trace.
    pub ctx: TraceCtx,
    /// The attempt's span.
    pub span_id: u64,
    /// Its number (1 for the first).
    pub attempt: u32,
    /// Why it was made, for a retry: what the attempt before came to.
    pub retry_reason: Option<&'static str>,
}

/// A request's own span, from its arrival to its answer.
#[derive(Debug)]
pub struct RequestTrace {
    ctx: TraceCtx,
    method: http::Method,
    path: String,
    client: std::net::IpAddr,
    trace_state: Option<String>,
}

impl RequestTrace {
    /// Puts `req`'s trace context (the client's, or a new one) in its extensions,
    /// where its attempts find it; the request's span when it is recorded (an
    /// unsampled request only passes its context on).
    pub fn start<B>(
        tracer: &Arc<Tracer>,
        req: &mut http::Request<B>,
        client: std::net::IpAddr,
    ) -> Option<RequestTrace> {
        let ctx = tracer.context(req.headers_mut());
        req.extensions_mut().insert(ctx.clone());
        if !ctx.sampled {
            return None;
        }
        let trace_state = (req.headers().get(&TRACESTATE))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Some(RequestTrace {
            ctx,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            client,
            trace_state,
        })
    }

    /// Records the span: the request was answered `status` after `elapsed` by
    /// `route` (none when no route took it).
    pub fn end(
        self,
        route: Option<&str>,
        status: http::StatusCode,
        elapsed: Duration,
        request_id: Option<&HeaderValue>,
    ) {
        let name = match route {
            Some(r) => format!("{} {r}", self.method),
            None => self.method.to_string(),
        };
        let mut attributes = vec![
            ("http.request.method", Value::Str(self.method.to_string())),
            ("url.path", Value::Str(self.path)),
            (
                "http.response.status_code",
                Value::Int(i64::from(status.as_u16())),
            ),
            ("client.address", Value::Str(self.client.to_string())),
        ];
        if let Some(r) = route {
            attributes.push(("palisade.route", Value::Str(r.to_owned())));
        }
        if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
            attributes.push(("palisade.request_id", Value::Str(id.to_owned())));
        }
        let error = status.is_server_error();
        self.ctx.end(name, elapsed, attributes, error, self.trace_state);
    }
}

/// A gateway's tracing settings and its spans' queue.
#[derive(Debug)]
pub struct Tracer {
    /// A new trace is recorded when the low 64 bits of its id are at most this.
    bound: Option<u64>,
    spans: mpsc::Sender<Span>,
    dropped: metrics::Counter,
    dropped_here: std::sync::atomic::AtomicU64,
}

impl Tracer {
    /// The tracer `s` describes (`at`: its path in the file) and the exporter
    /// that sends its spans (to be run on a task); problems to `p`.
    pub fn compile(
        s: &TracingSection,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<(Arc<Tracer>, Exporter)> {
        let before = p.len();
        if !(0.0..=1.0).contains(&s.sample_ratio) {
            p.push(ConfigError::new(
                format!("{at}.sample_ratio"),
                "must be from 0 to 1",
            ));
        }
        for (field, n) in [("max_queue", s.max_queue), ("max_batch", s.max_batch)] {
            if n == 0 {
                p.push(ConfigError::new(format!("{at}.{field}"), "must be at least 1"));
            }
        }
        let exporter = Exporter::compile(s, at, p);
        if p.len() > before {
            return None;
        }
        let (tx, rx) = mpsc::channel(s.max_queue);
        let bound = (s.sample_ratio > 0.0).then_some((s.sample_ratio * u64::MAX as f64) as u64);
        let tracer = Tracer {
            bound,
            spans: tx,
            dropped: metrics::counter!("palisade_trace_spans_dropped_total", "reason" => "queue_full"),
            dropped_here: Default::default(),
        };
        Some((Arc::new(tracer), exporter?.with_spans(rx)))
    }

    /// The context of a request with `headers`: the client's when its
    /// `traceparent` is valid, else a new trace (its `tracestate`, meaningless
    /// then, removed).
    pub fn context(self: &Arc<Self>, headers: &mut HeaderMap) -> TraceCtx {
        let parsed = {
            let mut all = headers.get_all(&TRACEPARENT).iter();
            match (all.next(), all.next()) {
                (Some(v), None) => parse(v.as_bytes()),
                _ => None,
            }
        };
        let (trace_id, parent, sampled) = match parsed {
            Some((trace, parent, flags)) => (trace, Some(parent), flags & 1 == 1),
            None => {
                headers.remove(&TRACESTATE);
                let trace = nonzero_u128();
                (trace, None, self.bound.is_some_and(|b| (trace as u64) <= b))
            }
        };
        TraceCtx {
            tracer: self.clone(),
            trace_id,
            span_id: nonzero_u64(),
            parent,
            sampled,
        }
    }

    /// Queues `span` for export, or counts it dropped when the queue is full.
    pub fn record(&self, span: Span) {
        if self.spans.try_send(span).is_err() {
            self.dropped.increment(1);
            self.dropped_here
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped_here.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl TraceCtx {
    /// The attempt numbered `attempt`: its span, and the `traceparent` that tells
    /// the upstream it is the parent.
    pub fn attempt(&self, attempt: u32, retry_reason: Option<&'static str>) -> (AttemptTrace, HeaderValue) {
        let span_id = nonzero_u64();
        let header = traceparent(self.trace_id, span_id, self.sampled);
        let trace = AttemptTrace {
            ctx: self.clone(),
            span_id,
            attempt,
            retry_reason,
        };
        (trace, header)
    }

    /// Records the request's span (a sampled one), `elapsed` long and ending now.
    fn end(
        &self,
        name: String,
        elapsed: Duration,
        attributes: Vec<(&'static str, Value)>,
        error: bool,
        trace_state: Option<String>,
    ) {
        let (start_ns, end_ns) = times(elapsed);
        self.tracer.record(Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            trace_state,
            name,
            kind: SpanKind::Server,
            start_ns,
            end_ns,
            attributes,
            error,
        });
    }
}

impl AttemptTrace {
    /// Whether its span is recorded.
    pub fn sampled(&self) -> bool {
        self.ctx.sampled
    }

    /// Records the attempt's span, `elapsed` long and ending now.
    pub fn end(self, elapsed: Duration, mut attributes: Vec<(&'static str, Value)>, error: bool) {
        if !self.ctx.sampled {
            return;
        }
        attributes.push(("palisade.attempt", Value::Int(i64::from(self.attempt))));
        if let Some(r) = self.retry_reason {
            attributes.push(("palisade.retry_reason", Value::Str(r.to_owned())));
        }
        let (start_ns, end_ns) = times(elapsed);
        self.ctx.tracer.record(Span {
            trace_id: self.ctx.trace_id,
            span_id: self.span_id,
            parent: Some(self.ctx.span_id),
            trace_state: None,
            name: format!("attempt {}", self.attempt),
            kind: SpanKind::Client,
            start_ns,
            end_ns,
            attributes,
            error,
        });
    }
}

/// A span `elapsed` long that ends now: its start and end since the epoch.
fn times(elapsed: Duration) -> (u64, u64) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    (ns(now.saturating_sub(elapsed)), ns(now))
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// A `traceparent` value (version 00), written without formatting machinery (it
/// is made for every attempt of a traced gateway, sampled or not).
pub fn traceparent(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&mut v[3..35], &trace_id.to_be_bytes());
    write_hex(&mut v[36..52], &span_id.to_be_bytes());
    v[54] = if sampled { b'1' } else { b'0' };
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&v)).unwrap_or_else(|_| {
        HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-00")
    })
}

/// `src` as lower-case hex into `dst`, two digits a byte (`dst` is twice as
/// long as `src`).
pub(crate) fn write_hex(dst: &mut [u8], src: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (d, b) in dst.chunks_exact_mut(2).zip(src) {
        d[0] = HEX[usize::from(b >> 4)];
        d[1] = HEX[usize::from(b & 0xf)];
    }
}

/// A `traceparent`'s trace id, parent id and flags, when it is valid: version
/// 00 exactly as long, or a later version (not `ff`) with more after a `-`; no id
/// all zeros; lower-case hex.
pub fn parse(v: &[u8]) -> Option<(u128, u64, u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])? as u8;
    if version == 0xff || (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace = hex(&v[3..35])?;
    let parent = u64::try_from(hex(&v[36..52])?).ok()?;
    let flags = hex(&v[53..55])? as u8;
    (trace != 0 && parent != 0).then_some((trace, parent, flags))
}

/// Lower-case hex digits as a number (at most 32 of them).
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_alike() {
        let (trace, parent, flags) = parse(GOOD).unwrap();
        assert_eq!(trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent, 0x00f067aa0ba902b7);
        assert_eq!(flags, 1);
        assert_eq!(traceparent(trace, parent, true).as_bytes(), GOOD);
        // A later version may carry more fields.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra").is_some());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
