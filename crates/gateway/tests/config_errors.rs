//! No configuration that `palisade check` accepts can crash the gateway or silently
//! turn a policy off: each mistake a careless operator makes is an error naming its
//! field, from the one compilation (`Runtime::compile`) that `check`, start-up and
//! reload share; and a property test starts a gateway from generated configurations
//! that compile and has it serve a request.

use std::net::SocketAddr;

use palisade_gateway::Config;
use palisade_gateway::runtime::Runtime;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const BASE: &str = r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false

[[routes]]
name = "r"
cluster = "c"

[clusters.c]
endpoints = ["127.0.0.1:9"]
"#;

/// What `palisade check` says of `text`.
fn check(text: &str) -> Result<Runtime, String> {
    Config::from_toml(text)
        .and_then(Runtime::compile)
        .map_err(|e| e.to_string())
}

/// `BASE` with `line` added to the table called `table` (`[gateway]`, `[[routes]]`, ...).
fn with(table: &str, line: &str) -> String {
    BASE.replacen(table, &format!("{table}\n{line}"), 1)
}

#[test]
fn every_mistake_is_an_error_naming_its_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            with("[[routes]]", "rate_limit = { requests = 10, burst = 0 }"),
            "rate_limit.burst",
        ),
        (
            with("[[routes]]", "rate_limit = { requests = 0 }"),
            "rate_limit.requests",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 10, max_keys = 0, key = \"client-ip\" }",
            ),
            "rate_limit.max_keys",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 10, per = \"10000000h\" }",
            ),
            "longer than 24h",
        ),
        (
            with("[[routes]]", "rate_limit = { requests = 10, key = \"header:\" }"),
            "routes.rate_limit",
        ),
        (
            with("[[routes]]", "fallback = { status = 999 }"),
            "fallback.status: 999",
        ),
        (
            with("[[routes]]", "fallback = { status = 101 }"),
            "fallback.status: 101",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, algorithm = \"pacing\" }",
            ),
            "rate_limit.max_wait: pacing needs",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, algorithm = \"warm-up\", warm_up = \"1m\", key = \"client-ip\" }",
            ),
            "rate_limit.key: a warm-up limit is one global limit",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, algorithm = \"warm-up\" }",
            ),
            "rate_limit.warm_up: a warm-up limit needs",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, burst = 2, algorithm = \"sliding-window\" }",
            ),
            "rate_limit.algorithm: a sliding window takes",
        ),
        (
            with("[[routes]]", "rate_limit = { requests = 5, max_wait = \"1s\" }"),
            "rate_limit.max_wait: is for `pacing`",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, algorithm = \"pacing\", max_wait = \"1h\" }",
            ),
            "rate_limit.max_wait: must be shorter than the route's `timeout`",
        ),
        (
            with(
                "[[routes]]",
                "rate_limit = { requests = 5, algorithm = \"leaky\" }",
            ),
            "routes.rate_limit.algorithm",
        ),
        (
            with("[[routes]]", "adaptive_timeout = { quantile = 1.5 }"),
            "adaptive_timeout.quantile: must be in (0, 1)",
        ),
        (
            with(
                "[[routes]]",
                "adaptive_timeout = { min = \"1s\", max = \"100ms\" }",
            ),
            "adaptive_timeout.max: must be at least min",
        ),
        (
            with("[[routes]]", "deadline = { header = \"x bad\" }"),
            "deadline.header: `x bad` is not a header name",
        ),
        (
            with("[[routes]]", "fault = { abort_rate = 1.5 }"),
            "fault.abort_rate: must be between 0 and 1",
        ),
        (
            with("[[routes]]", "fault = { delay_rate = 0.5 }"),
            "fault.delay: a delay_rate needs the delay",
        ),
        (
            with("[[routes]]", "fault = { abort_rate = 0.1, abort_status = 200 }"),
            "fault.abort_status: 200 is not between 400 and 599",
        ),
        (
            with("[[routes]]", "fault = { abort_rate = 0.1, header = \"x bad\" }"),
            "fault.header: `x bad` is not a header name",
        ),
        (
            with("[clusters.c]", "failure_statuses = [200]"),
            "clusters.c.failure_statuses: 200 is not between 400 and 499",
        ),
        (
            with("[clusters.c]", "failure_headers = [\"x bad\"]"),
            "clusters.c.failure_headers: `x bad` is not a header name",
        ),
        (
            with("[[routes]]", "fallback = { on = [\"timeout\", \"upstream\"] }"),
            "fallback.on: `upstream` is not a cause",
        ),
        (
            with(
                "[[routes]]",
                "retry = { attempts = 2, backoff = \"2s\", max_backoff = \"1s\" }",
            ),
            "retry.max_backoff: must be at least backoff.initial",
        ),
        (
            with("[[routes]]", "hash_on = { header = \"\" }"),
            "hash_on.header",
        ),
        (
            with("[[routes]]", "match = { headers = { x-a = \"a\\u0000b\" } }"),
            "match.headers.x-a",
        ),
        (
            with("[[routes]]", "match = { host = \"ex ample!\" }"),
            "match.host",
        ),
        (
            with("[[routes]]", "match = { host = \"a.test:80\" }"),
            "match.host",
        ),
        (
            with("[[routes]]", "timeout = \"99999999999999h\""),
            "routes.timeout",
        ),
        (
            with("[[routes]]", "retry = { attempts = 1000 }"),
            "retry.attempts",
        ),
        (with("[clusters.c]", "ring_vnodes = 4000000000"), "ring_vnodes"),
        (with("[clusters.c]", "lb = \"fastest\""), "clusters.c.lb (line"),
        (with("[gateway]", "workers = 1000000"), "gateway.workers"),
        (
            with("[gateway]", "max_client_connections = 0"),
            "gateway.max_client_connections",
        ),
        (
            with("[gateway]", "max_header_bytes = 10"),
            "gateway.max_header_bytes",
        ),
        (
            with("[gateway]", "client_header_timeout = \"0s\""),
            "gateway.client_header_timeout",
        ),
        (
            BASE.replace("admin = \"127.0.0.1:0\"", "admin = \"127.0.0.1:8080\"")
                .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:8080\""),
            "gateway.admin",
        ),
        (BASE.replace("127.0.0.1:9", "256.1.1.1:80"), "not an IPv4 address"),
        (
            BASE.replace("\"127.0.0.1:9\"", "\"bad host:80\""),
            "clusters.c.endpoints[0]",
        ),
        (
            BASE.replace("\"127.0.0.1:9\"", "{ address = \"127.0.0.1:9\", tier = -1 }"),
            "clusters.c.endpoints.tier (line",
        ),
        (
            format!("{BASE}\n[[routes]]\nname = \"r\"\ncluster = \"c\"\n"),
            "another route is called `r`",
        ),
        (
            with("[[routes]]", "shed = { priority = \"critical\" }"),
            "routes[0] (r).shed: cluster c has no adaptive_concurrency",
        ),
        (
            with("[[routes]]", "shed = { priority = \"urgent\" }"),
            "shed.priority",
        ),
        (
            with("[clusters.c]", "adaptive_concurrency = { min = 0 }"),
            "clusters.c.adaptive_concurrency.min",
        ),
        (
            with("[clusters.c]", "adaptive_concurrency = { initial = 5000 }"),
            "clusters.c.adaptive_concurrency.initial",
        ),
        (
            with("[clusters.c]", "adaptive_concurrency = { backoff = 0.5 }"),
            "clusters.c.adaptive_concurrency.backoff: is an aimd setting",
        ),
        (
            with(
                "[clusters.c]",
                "adaptive_concurrency = { algorithm = \"aimd\", backoff = 1.5 }",
            ),
            "clusters.c.adaptive_concurrency.backoff: must be between 0 and 1",
        ),
        (
            with(
                "[clusters.c]",
                "adaptive_concurrency = { elevated = 0.9, high = 0.5 }",
            ),
            "clusters.c.adaptive_concurrency.elevated",
        ),
        (
            with("[[routes]]", "hedge = { delay = \"10ms\" }"),
            "routes[0] (r).hedge: needs the route's `retry` table",
        ),
        (
            with(
                "[[routes]]",
                "retry = { attempts = 1 }\nhedge = { delay = \"20s\" }",
            ),
            "hedge.delay",
        ),
        (
            with(
                "[[routes]]",
                "retry = { attempts = 1 }\nhedge = { delay = \"10ms\", quantile = 2.0 }",
            ),
            "hedge.quantile",
        ),
        (
            with("[[routes]]", "mode = \"async\""),
            "routes[0] (r).mode: `async` stores requests in a queue",
        ),
        (with("[[routes]]", "mode = \"later\""), "mode"),
        (
            with("[gateway]", "queue = { database = \"mysql://x\" }"),
            "gateway.queue.database",
        ),
        (
            with("[gateway]", "queue = { status_path = \"jobs/\" }"),
            "gateway.queue.status_path",
        ),
        (
            with("[gateway]", "queue = { max_attempts = 0 }"),
            "gateway.queue.max_attempts",
        ),
    ];
    for (text, field) in &cases {
        let err = match check(text) {
            Ok(_) => panic!("accepted, but should name {field:?}:\n{text}"),
            Err(e) => e,
        };
        assert!(err.contains(field), "expected {field:?} in:\n{err}\nfor:\n{text}");
    }
}

#[test]
fn a_table_headers_comment_is_not_part_of_the_path() {
    let text = BASE.replace("[clusters.c]", "[clusters.c] # the main one\nlb = 5");
    let err = check(&text).unwrap_err();
    assert!(err.starts_with("clusters.c.lb (line"), "{err}");
    assert!(!err.contains("main one"), "{err}");
}

/// Values around every bound: zeros, ones, the largest accepted and beyond.
fn config_strategy() -> impl Strategy<Value = String> {
    // Mostly valid values, so that many configurations start; the edges often.
    let small = prop_oneof![8 => 1u64..=9, 1 => Just(0u64), 1 => Just(u64::from(u32::MAX))];
    let duration = prop_oneof![
        1 => Just("0s"),
        3 => Just("1ms"),
        3 => Just("250ms"),
        3 => Just("30s"),
        3 => Just("24h"),
        1 => Just("25h")
    ];
    let lb = prop_oneof![
        Just("round-robin"),
        Just("least-request"),
        Just("ring-hash"),
        Just("maglev"),
        Just("peak-ewma")
    ];
    let key = prop_oneof![Just("global"), Just("client-ip"), Just("header:x-user")];
    let status = prop_oneof![1 => Just(0u64), 3 => Just(200), 3 => Just(503), 1 => Just(999)];
    (
        (small.clone(), small.clone(), small.clone(), small.clone()),
        (duration.clone(), duration.clone(), duration),
        (lb, key, status, small),
        any::<bool>(),
    )
        .prop_map(
            |((requests, burst, vnodes, keys), (per, timeout, body_idle), (lb, key, status, attempts), retry)| {
                let retry = if retry {
                    format!("retry = {{ attempts = {attempts} }}\n")
                } else {
                    String::new()
                };
                format!(
                    "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nworkers = 1\n\
                     [[routes]]\nname = \"r\"\ncluster = \"c\"\ntimeout = \"{timeout}\"\nbody_idle_timeout = \"{body_idle}\"\n{retry}\
                     rate_limit = {{ requests = {requests}, burst = {burst}, per = \"{per}\", key = \"{key}\", max_keys = {keys} }}\n\
                     fallback = {{ status = {status} }}\n\
                     [clusters.c]\nendpoints = [\"127.0.0.1:9\"]\nlb = \"{lb}\"\nring_vnodes = {vnodes}\n"
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_config_check_accepts_starts_and_answers(text in config_strategy()) {
        if check(&text).is_err() {
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = rt.block_on(async {
            let config = Config::from_toml(&text).unwrap();
            let gw = palisade_gateway::start(config, None).await.unwrap();
            let status = get(gw.addr).await;
            gw.shutdown().await;
            status
        });
        // Port 9 refuses: any answer the gateway makes is fine, a panic or none is not.
        prop_assert!((200..600).contains(&status), "{status} for\n{text}");
    }
}

#[test]
fn the_property_starts_gateways() {
    // The generator is not all mistakes: run it alone and count what it started.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let accepted = (0..64)
        .filter(|_| {
            let text = config_strategy().new_tree(&mut runner).unwrap().current();
            check(&text).is_ok()
        })
        .count();
    assert!(
        accepted >= 8,
        "only {accepted} of 64 generated configurations compiled"
    );
}

async fn get(addr: SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}
