//! The span exporter: batches from the tracer's queue, sent as OTLP/HTTP JSON
//! (`ExportTraceServiceRequest`) to the collector. A batch goes when it is full
//! or a flush interval after its first span; a batch the collector does not take
//! within the timeout is dropped and counted, never retried, so a dead collector
//! costs the gateway one waiting task and a full queue.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value as Json, json};
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
        let body = Bytes::from(body(&self.service, batch).to_string());
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
/// 64-bit integers as strings).
pub fn body(service: &str, spans: &[Span]) -> Json {
    let spans: Vec<Json> = spans.iter().map(span_json).collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [attribute("service.name", &Value::Str(service.to_owned()))]},
            "scopeSpans": [{
                "scope": {"name": "palisade-gateway", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

fn span_json(s: &Span) -> Json {
    let mut v = json!({
        "traceId": format!("{:032x}", s.trace_id),
        "spanId": format!("{:016x}", s.span_id),
        "name": s.name,
        "kind": s.kind as u8,
        "startTimeUnixNano": s.start_ns.to_string(),
        "endTimeUnixNano": s.end_ns.to_string(),
        "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
        // 1: ok, 2: error.
        "status": {"code": if s.error { 2 } else { 1 }},
    });
    if let Some(p) = s.parent {
        v["parentSpanId"] = Json::from(format!("{p:016x}"));
    }
    if let Some(t) = &s.trace_state {
        v["traceState"] = Json::from(t.as_str());
    }
    v
}

fn attribute(key: &str, v: &Value) -> Json {
    let value = match v {
        Value::Str(s) => json!({"stringValue": s}),
        Value::Int(n) => json!({"intValue": n.to_string()}),
    };
    json!({"key": key, "value": value})
}
