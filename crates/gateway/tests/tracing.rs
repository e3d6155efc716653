//! Distributed tracing against an in-test OTLP/HTTP receiver: the client's
//! context continued, a span per request with a child per attempt (endpoint,
//! breaker, retry reason, outcome), the attempt's span id sent upstream, new
//! traces sampled by ratio, and a collector that hangs never holding requests.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use palisade_gateway::Handle;
use serde_json::Value;
use tokio::sync::mpsc;

use support::{send, serve_http1};

const GUARD: Duration = Duration::from_secs(30);
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver: every span it is sent, with its `service.name`.
async fn collector() -> (SocketAddr, mpsc::UnboundedReceiver<(String, Value)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_http1(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(req.headers()["content-type"], "application/json");
            let body = req.into_body().collect().await?.to_bytes();
            let export: Value = serde_json::from_slice(&body).unwrap();
            for rs in export["resourceSpans"].as_array().unwrap() {
                let service = rs["resource"]["attributes"][0]["value"]["stringValue"]
                    .as_str()
                    .unwrap();
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for span in ss["spans"].as_array().unwrap() {
                        let _ = tx.send((service.to_owned(), span.clone()));
                    }
                }
            }
            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"{}"))))
        }
    })
    .await;
    (addr, rx)
}

/// An upstream that answers 503 to its first `failures` requests, then 200, each
/// with the `traceparent` it was sent echoed in `x-seen-traceparent`.
async fn upstream(failures: u32) -> SocketAddr {
    let calls = Arc::new(AtomicU32::new(0));
    serve_http1(move |req: Request<Incoming>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
            if n < failures {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            if let Some(tp) = req.headers().get("traceparent") {
                r.headers_mut().insert("x-seen-traceparent", tp.clone());
            }
            Ok::<_, std::convert::Infallible>(r)
        }
    })
    .await
}

async fn gateway(up: SocketAddr, tracing: &str) -> Handle {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         tracing = {{ {tracing} }}\n\n\
         [[routes]]\nname = \"orders\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n\
         retry = {{ attempts = 2, retry_on = [\"5xx\"], backoff = \"1ms\", max_backoff = \"1ms\" }}\n\n\
         [clusters.c]\nendpoints = [\"{up}\"]\n"
    );
    let config = palisade_gateway::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    palisade_gateway::start(config, None).await.unwrap()
}

async fn get(gw: &Handle, traceparent: Option<&str>) -> support::Answer {
    let mut req = Request::get(format!("http://{}/order/7", gw.addr));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp).header("tracestate", "vendor=abc");
    }
    send(gw.addr, req.body(Full::default()).unwrap()).await
}

/// The next `n` spans the collector gets.
async fn spans(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = tokio::time::timeout(GUARD, rx.recv())
            .await
            .expect("no span came");
        out.push(got.expect("the collector stopped"));
    }
    out
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map_or(&Value::Null, |a| &a["value"])
}

#[tokio::test]
async fn a_clients_trace_is_continued_with_a_span_per_attempt() {
    let (otlp, mut rx) = collector().await;
    let up = upstream(1).await;
    let gw = gateway(
        up,
        &format!("otlp = \"http://{otlp}/v1/traces\", service_name = \"edge\", flush_interval = \"10ms\""),
    )
    .await;
    let answer = get(&gw, Some(&format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))).await;
    assert_eq!(answer.status, StatusCode::OK, "the retry got the answer");
    let seen = answer.headers["x-seen-traceparent"].to_str().unwrap().to_owned();

    let mut got = spans(&mut rx, 3).await;
    got.sort_by_key(|(_, s)| s["kind"].as_u64());
    assert!(got.iter().all(|(service, _)| service == "edge"));
    let server = &got[0].1;
    let mut attempts: Vec<&Value> = got[1..].iter().map(|(_, s)| s).collect();
    attempts.sort_by_key(|s| {
        attr(s, "palisade.attempt")["intValue"]
            .as_str()
            .map(str::to_owned)
    });

    // The request's span continues the client's trace, under the client's span.
    assert_eq!(server["kind"], 2);
    assert_eq!(server["traceId"], CLIENT_TRACE);
    assert_eq!(server["parentSpanId"], CLIENT_SPAN);
    assert_eq!(server["traceState"], "vendor=abc");
    assert_eq!(server["name"], "GET orders");
    assert_eq!(attr(server, "http.response.status_code")["intValue"], "200");
    assert_eq!(attr(server, "url.path")["stringValue"], "/order/7");
    assert_eq!(attr(server, "palisade.route")["stringValue"], "orders");
    assert_eq!(server["status"]["code"], 1);

    // Its attempts hang under it: the first failed, the second is its retry.
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["kind"], 3);
        assert_eq!(a["traceId"], CLIENT_TRACE);
        assert_eq!(a["parentSpanId"], server["spanId"]);
        assert_eq!(attr(a, "palisade.attempt")["intValue"], (i + 1).to_string());
        assert_eq!(attr(a, "server.address")["stringValue"], "127.0.0.1");
        assert_eq!(attr(a, "server.port")["intValue"], up.port().to_string());
        assert_eq!(attr(a, "palisade.breaker")["stringValue"], "closed");
    }
    assert_eq!(attr(attempts[0], "http.response.status_code")["intValue"], "503");
    assert_eq!(attr(attempts[0], "palisade.outcome")["stringValue"], "failed");
    assert_eq!(attempts[0]["status"]["code"], 2);
    assert_eq!(attr(attempts[0], "palisade.retry_reason"), &Value::Null);
    assert_eq!(attr(attempts[1], "palisade.outcome")["stringValue"], "ok");
    assert_eq!(
        attr(attempts[1], "palisade.retry_reason")["stringValue"],
        "failed"
    );
    // The upstream was told the answering attempt is its parent.
    let span = attempts[1]["spanId"].as_str().unwrap();
    assert_eq!(seen, format!("00-{CLIENT_TRACE}-{span}-01"));
    // Timestamps: the attempts within the request.
    let ns = |s: &Value, k: &str| s[k].as_str().unwrap().parse::<u64>().unwrap();
    for a in &attempts {
        assert!(ns(a, "startTimeUnixNano") >= ns(server, "startTimeUnixNano"));
        assert!(ns(a, "endTimeUnixNano") <= ns(server, "endTimeUnixNano"));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn new_traces_are_sampled_by_ratio_and_passed_on_either_way() {
    let (otlp, mut rx) = collector().await;
    let up = upstream(0).await;
    let never = gateway(
        up,
        &format!("otlp = \"http://{otlp}/v1/traces\", sample_ratio = 0.0"),
    )
    .await;
    let always = gateway(
        up,
        &format!("otlp = \"http://{otlp}/v1/traces\", flush_interval = \"10ms\""),
    )
    .await;
    // Not sampled: still a context upstream, its flag off.
    let seen = get(&never, None).await.headers["x-seen-traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let (trace, _, flags) = palisade_gateway::trace::parse(seen.as_bytes()).unwrap();
    assert_eq!(flags, 0);
    // A client's sampled flag wins over the ratio.
    let answer = get(&never, Some(&format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    // Sampled: a new trace with this request's span as its root.
    let seen = get(&always, None).await.headers["x-seen-traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let (new_trace, _, flags) = palisade_gateway::trace::parse(seen.as_bytes()).unwrap();
    assert_eq!(flags, 1);
    assert_ne!(new_trace, trace);
    // Four spans in all: the client's trace's two, the sampled new trace's two;
    // none of the unsampled trace.
    let got = spans(&mut rx, 4).await;
    let traces: Vec<&str> = got.iter().map(|(_, s)| s["traceId"].as_str().unwrap()).collect();
    assert_eq!(
        traces.iter().filter(|t| **t == CLIENT_TRACE).count(),
        2,
        "{traces:?}"
    );
    let new_hex = format!("{new_trace:032x}");
    assert_eq!(traces.iter().filter(|t| **t == new_hex).count(), 2, "{traces:?}");
    let root = got
        .iter()
        .find(|(_, s)| s["traceId"] == new_hex.as_str() && s["kind"] == 2)
        .unwrap();
    assert!(root.1.get("parentSpanId").is_none(), "{}", root.1);
    never.shutdown().await;
    always.shutdown().await;
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_spans_not_requests() {
    // Accepts connections and reads nothing.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            open.push(s);
        }
    });
    let up = upstream(0).await;
    let gw = gateway(
        up,
        &format!("otlp = \"http://{hung_addr}/v1/traces\", max_queue = 4, max_batch = 1, timeout = \"1h\""),
    )
    .await;
    for _ in 0..50 {
        assert_eq!(get(&gw, None).await.status, StatusCode::OK);
    }
    // 100 spans: one is being sent, four wait; the rest were dropped.
    let dropped = gw.runtime().tracer.as_ref().unwrap().dropped();
    assert!((95..=96).contains(&dropped), "{dropped}");
    gw.shutdown().await;
    held.abort();
}

#[test]
fn tracing_config_errors_name_their_fields() {
    let text = "[gateway]\ntracing = { otlp = \"collector:4318\", sample_ratio = 1.5, max_queue = 0, headers = { \"bad header\" = \"x\" } }\n\n\
                [[routes]]\nname = \"r\"\ncluster = \"c\"\n\n[clusters.c]\nendpoints = [\"127.0.0.1:1\"]\n";
    let err = palisade_gateway::Config::from_toml(text)
        .and_then(|c| palisade_gateway::runtime::Runtime::compile(c).map(drop))
        .unwrap_err()
        .to_string();
    for field in [
        "gateway.tracing.otlp",
        "gateway.tracing.sample_ratio",
        "gateway.tracing.max_queue",
        "gateway.tracing.headers.bad header",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}
