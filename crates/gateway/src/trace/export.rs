//! The span exporter: batches from the tracer's queue, sent as OTLP/HTTP JSON
//! (`ExportTraceServiceRequest`) to the collector. A batch goes when it is full
//! or a flush interval after its first span; a batch the collector does not take
//! within the timeout is dropped and counted, never retried, so a dead collector
//! costs the gateway one waiting task and a full queue.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
#[cfg(test)]
use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::{Span, Value};
use crate::config::{ConfigError, TracingSection};
use crate::http_client::Client;

/// Sends a tracer's spans to its collector.
pub struct Exporter {
    client: Client,
    headers: Vec<(HeaderName, HeaderValue)>,
    service: String,
    max_batch: usize,
    flush: Duration,
    timeout: Duration,
    spans: Option<mpsc::Receiver<Span>>,
    exported: metrics::Counter,
    failed: metrics::Counter,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("collector", self.client.base())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// The exporter `s` describes; problems to `p`.
    pub(super) fn compile(s: &TracingSection, at: &str, p: &mut Vec<ConfigError>) -> Option<Exporter> {
        let before = p.len();
        let uri = match s.otlp.parse::<Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Some(u),
            _ => {
                p.push(ConfigError::new(
                    format!("{at}.otlp"),
                    format!("`{}` is not an http(s) URL (the collector's OTLP/HTTP traces URL, as http://collector:4318/v1/traces)", s.otlp),
                ));
                None
            }
        };
        let mut headers = Vec::new();
        for (name, value) in &s.headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => p.push(ConfigError::new(
                    format!("{at}.headers.{name}"),
                    "is not a valid header name and value",
                )),
            }
        }
        let tls = match uri.as_ref().filter(|u| u.scheme_str() == Some("https")) {
            Some(_) => crate::connect::UpstreamTls::new(at, &Default::default(), false)
                .map_err(|e| p.push(e))
                .ok(),
            None => None,
        };
        if p.len() > before {
            return None;
        }
        Some(Exporter {
            client: Client::new(uri?, tls, s.timeout.get()),
            headers,
            service: s.service_name.clone(),
            max_batch: s.max_batch,
            flush: s.flush_interval.get(),
            timeout: s.timeout.get(),
            spans: None,
            exported: metrics::counter!("palisade_trace_spans_exported_total"),
            failed: metrics::counter!("palisade_trace_spans_dropped_total", "reason" => "export_failed"),
        })
    }

    pub(super) fn with_spans(mut self, rx: mpsc::Receiver<Span>) -> Self {
        self.spans = Some(rx);
        self
    }

    /// Sends batches until the tracer is gone and its queue is empty.
    pub async fn run(mut self) {
        let Some(mut rx) = self.spans.take() else { return };
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut failing = false;
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let due = tokio::time::Instant::now() + self.flush;
            while batch.len() < self.max_batch {
                match tokio::time::timeout_at(due, rx.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            match tokio::time::timeout(self.timeout, self.send(&batch)).await {
                Ok(Ok(())) => {
                    self.exported.increment(n);
                    failing = false;
                }
                Ok(Err(e)) => self.failed_batch(n, &e, &mut failing),
                Err(_) => self.failed_batch(n, &format!("no answer within {:?}", self.timeout), &mut failing),
            }
            batch.clear();
        }
    }

    fn failed_batch(&self, n: u64, why: &str, failing: &mut bool) {
        self.failed.increment(n);
        if !*failing {
            tracing::warn!(collector = %self.client.base(), error = why, spans = n, "trace export failed; spans are dropped until the collector answers");
        }
        *failing = true;
    }

    async fn send(&mut self, batch: &[Span]) -> Result<(), String> {
        let body = Bytes::from(body(&self.service, batch));
        let path = self
            .client
            .base()
            .path_and_query()
            .map_or("/v1/traces", |p| p.as_str())
            .to_owned();
        let mut req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        for (n, v) in &self.headers {
            req.headers_mut().insert(n.clone(), v.clone());
        }
        let resp = self.client.send(req).await?;
        let status = resp.status();
        // Read to the end, so the connection can carry the next batch.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

/// An `ExportTraceServiceRequest` of `spans` in OTLP's JSON encoding (ids in hex,
/// 64-bit integers as strings), written straight into bytes: building a
/// `serde_json::Value` per span cost more than the rest of the request.
pub fn body(service: &str, spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 640);
    out.extend_from_slice(br#"{"resourceSpans":[{"resource":{"attributes":["#);
    attribute(&mut out, "service.name", &Value::Str(service.to_owned()));
    out.extend_from_slice(br#"]},"scopeSpans":[{"scope":{"name":"palisade-gateway","version":"#);
    string(&mut out, env!("CARGO_PKG_VERSION"));
    out.extend_from_slice(br#"},"spans":["#);
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        span(&mut out, s);
    }
    out.extend_from_slice(b"]}]}]}");
    out
}

fn span(out: &mut Vec<u8>, s: &Span) {
    out.extend_from_slice(br#"{"traceId":""#);
    hex(out, &s.trace_id.to_be_bytes());
    out.extend_from_slice(br#"","spanId":""#);
    hex(out, &s.span_id.to_be_bytes());
    out.push(b'"');
    if let Some(p) = s.parent {
        out.extend_from_slice(br#","parentSpanId":""#);
        hex(out, &p.to_be_bytes());
        out.push(b'"');
    }
    if let Some(t) = &s.trace_state {
        out.extend_from_slice(br#","traceState":"#);
        string(out, t);
    }
    out.extend_from_slice(br#","name":"#);
    string(out, &s.name);
    out.extend_from_slice(br#","kind":"#);
    out.extend_from_slice(itoa::Buffer::new().format(s.kind as u8).as_bytes());
    out.extend_from_slice(br#","startTimeUnixNano":""#);
    out.extend_from_slice(itoa::Buffer::new().format(s.start_ns).as_bytes());
    out.extend_from_slice(br#"","endTimeUnixNano":""#);
    out.extend_from_slice(itoa::Buffer::new().format(s.end_ns).as_bytes());
    out.extend_from_slice(br#"","attributes":["#);
    for (i, (k, v)) in s.attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        attribute(out, k, v);
    }
    // Status 1: ok, 2: error.
    out.extend_from_slice(if s.error {
        br#"],"status":{"code":2}}"#
    } else {
        br#"],"status":{"code":1}}"#
    });
}

fn attribute(out: &mut Vec<u8>, key: &str, v: &Value) {
    out.extend_from_slice(br#"{"key":"#);
    string(out, key);
    match v {
        Value::Str(s) => {
            out.extend_from_slice(br#","value":{"stringValue":"#);
            string(out, s);
        }
        Value::Int(n) => {
            out.extend_from_slice(br#","value":{"intValue":""#);
            out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
            out.push(b'"');
        }
    }
    out.extend_from_slice(b"}}");
}

/// `s` as a JSON string, escaped.
fn string(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail; serde_json escapes.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// An id's bytes (at most 16) as hex.
fn hex(out: &mut Vec<u8>, id: &[u8]) {
    let mut buf = [0u8; 32];
    let digits = &mut buf[..2 * id.len().min(16)];
    super::write_hex(digits, id);
    out.extend_from_slice(digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::SpanKind;

    #[test]
    fn the_body_is_otlp_json() {
        let span = Span {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0xab,
            parent: Some(0x00f067aa0ba902b7),
            trace_state: Some("a=\"b\"".into()),
            name: "GET orders".into(),
            kind: SpanKind::Server,
            start_ns: 1,
            end_ns: 2,
            attributes: vec![("k", Value::Str("v".into())), ("n", Value::Int(-3))],
            error: true,
        };
        let v: Json = serde_json::from_slice(&body("svc", &[span.clone(), span])).unwrap();
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "svc"
        );
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][1];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], "00000000000000ab");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["traceState"], "a=\"b\"");
        assert_eq!(s["kind"], 2);
        assert_eq!(
            (s["startTimeUnixNano"].as_str(), s["endTimeUnixNano"].as_str()),
            (Some("1"), Some("2"))
        );
        assert_eq!(s["attributes"][1]["value"]["intValue"], "-3");
        assert_eq!(s["status"]["code"], 2);
    }
}
