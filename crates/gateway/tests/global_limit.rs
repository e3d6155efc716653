//! Rate limits shared by gateway instances through Redis, against real sockets and
//! real Redis servers (the one `scripts/test` starts, and servers of the tests' own
//! that they stop and kill).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade_gateway::{Config, Handle};

mod support;

use support::{Answer, RedisServer, send};

async fn upstream() -> (Arc<AtomicU32>, SocketAddr) {
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let addr = support::serve_http1(move |_req: Request<hyper::body::Incoming>| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    })
    .await;
    (seen, addr)
}

/// A gateway whose route `route` (to `up`) has `rate_limit = { <limit> }`.
async fn gateway(up: SocketAddr, route: &str, limit: &str) -> Handle {
    support::one_route_gateway(up, route, &format!("rate_limit = {{ {limit} }}")).await
}

async fn get(gw: &Handle, key: &str) -> Answer {
    send(
        gw.addr,
        Request::get("/")
            .header("x-key", key)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

use palisade_testkit::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_quota_with_the_local_limiters_headers() {
    let redis = std::env::var("PALISADE_TEST_REDIS_URL")
        .expect("PALISADE_TEST_REDIS_URL is not set: run the tests through scripts/test, which starts Redis");
    let (seen, up) = upstream().await;
    let route = unique("shared");
    let limit = format!(
        "requests = 5, per = \"1h\", key = \"header:x-key\", global = {{ redis = \"{redis}\", when_redis_down = \"fail-open\", timeout = \"2s\" }}"
    );
    let (a, b) = (
        gateway(up, &route, &limit).await,
        gateway(up, &route, &limit).await,
    );
    for gw in [&a, &b, &a, &b, &a] {
        assert_eq!(get(gw, "alice").await.status, StatusCode::OK);
    }
    for gw in [&b, &a] {
        let refused = get(gw, "alice").await;
        assert_eq!(
            (refused.status, refused.cause()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        assert_eq!(refused.headers["x-ratelimit-limit"], "5");
        assert_eq!(refused.headers["x-ratelimit-remaining"], "0");
        let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=720).contains(&retry), "{retry}");
    }
    // Another key has its own quota.
    assert_eq!(get(&b, "bob").await.status, StatusCode::OK);
    assert_eq!(seen.load(Ordering::SeqCst), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_limit_is_refused_without_asking_redis() {
    let server = RedisServer::start().await;
    let (seen, up) = upstream().await;
    let limit = format!(
        "requests = 2, per = \"1h\", key = \"header:x-key\", global = {{ redis = \"{}\", when_redis_down = \"fail-open\", timeout = \"200ms\" }}",
        server.url()
    );
    let gw = gateway(up, "remembered", &limit).await;
    for _ in 0..2 {
        assert_eq!(get(&gw, "carol").await.status, StatusCode::OK);
    }
    assert_eq!(get(&gw, "carol").await.status, StatusCode::TOO_MANY_REQUESTS);
    // Redis hangs: a request that asked it would time out and fail open, so
    // refusals now prove the gateway did not ask.
    server.signal("-STOP");
    for _ in 0..5 {
        assert_eq!(get(&gw, "carol").await.status, StatusCode::TOO_MANY_REQUESTS);
    }
    // Another key does ask, times out, and passes (fail-open).
    assert_eq!(get(&gw, "dave").await.status, StatusCode::OK);
    server.signal("-CONT");
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_or_falls_back_to_the_local_share_never_refusing_all() {
    let server = RedisServer::start().await;
    let (seen, up) = upstream().await;
    let limit = |policy: &str| {
        format!(
            "requests = 4, per = \"1h\", key = \"header:x-key\", global = {{ redis = \"{}\", when_redis_down = \"{policy}\", instances = 2, timeout = \"500ms\" }}",
            server.url()
        )
    };
    let open = gateway(up, "open", &limit("fail-open")).await;
    let local = gateway(up, "local", &limit("local")).await;
    assert_eq!(get(&open, "erin").await.status, StatusCode::OK);
    assert_eq!(get(&local, "erin").await.status, StatusCode::OK);
    drop(server);
    // Fail-open: everything passes (past the quota of 4).
    for _ in 0..8 {
        assert_eq!(get(&open, "erin").await.status, StatusCode::OK);
    }
    // Local: this instance's share, 4 / 2, then refusals with the usual headers.
    let statuses: Vec<u16> = futures_collect(&local, "frank", 4).await;
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(seen.load(Ordering::SeqCst), 2 + 8 + 2);
    // The breaker opened after three failures: the rest were decided without Redis.
    let gw = open.runtime();
    let breaker = gw.routes[0].global_limit.as_ref().unwrap().breaker();
    assert_eq!(breaker.state(), palisade_resilience::breaker::State::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_and_a_restarted_redis_are_used_again_without_a_restart() {
    let server = RedisServer::start().await;
    let (_, up) = upstream().await;
    let limit = format!(
        "requests = 2, per = \"1h\", key = \"header:x-key\", global = {{ redis = \"{}\", when_redis_down = \"fail-open\", timeout = \"2s\" }}",
        server.url()
    );
    // Two workers, each with its own connection to Redis.
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nworkers = 2\n\n\
         [[routes]]\nname = \"recovering\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\nrate_limit = {{ {limit} }}\n\n\
         [clusters.c]\nendpoints = [\"{up}\"]\n"
    );
    let gw = palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap();
    // A refusal comes only from Redis (fail-open passes everything): it comes after
    // the two allowed and at most one failed call per worker's connection (two,
    // fewer than the three that open the breaker).
    async fn refused_within(gw: &Handle, key: &str, n: usize) -> bool {
        for _ in 0..n {
            if get(gw, key).await.status == StatusCode::TOO_MANY_REQUESTS {
                return true;
            }
        }
        false
    }
    assert!(refused_within(&gw, "a", 3).await);
    // The script cache flushed: one call meets NOSCRIPT, the next loads it again.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(refused_within(&gw, "b", 5).await);
    // Killed and started again on the same port: a new connection.
    let port = server.port;
    drop(server);
    let _again = RedisServer::start_on(port).await;
    assert!(refused_within(&gw, "c", 5).await);
}

async fn futures_collect(gw: &Handle, key: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(gw, key).await.status.as_u16());
    }
    out
}

#[test]
fn global_limit_config_errors_name_their_fields() {
    let text = r#"
[[routes]]
name = "r"
cluster = "c"
rate_limit = { requests = 10, algorithm = "sliding-window", global = { redis = "http://nope", when_redis_down = "local", instances = 0, timeout = "0s" } }

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(text).unwrap())
        .expect_err("refused")
        .to_string();
    for field in [
        "routes[0] (r).rate_limit.algorithm",
        "routes[0] (r).rate_limit.global.redis",
        "routes[0] (r).rate_limit.global.instances",
        "routes[0] (r).rate_limit.global.timeout",
    ] {
        assert!(errors.contains(field), "{field} not named in: {errors}");
    }
    // The policy must be said.
    let unsaid = text.replace("when_redis_down = \"local\", ", "");
    let errors = Config::from_toml(&unsaid).expect_err("refused").to_string();
    assert!(errors.contains("when_redis_down"), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_refusal_carries_the_local_limiters_limit_header() {
    let redis = std::env::var("PALISADE_TEST_REDIS_URL")
        .expect("PALISADE_TEST_REDIS_URL is not set: run the tests through scripts/test, which starts Redis");
    let (_, up) = upstream().await;
    let quota = "requests = 2, burst = 3, per = \"1h\", key = \"header:x-key\"";
    let local = gateway(up, &unique("local"), quota).await;
    let global = format!(
        "{quota}, global = {{ redis = \"{redis}\", when_redis_down = \"fail-open\", timeout = \"2s\" }}"
    );
    let global = gateway(up, &unique("global"), &global).await;
    let mut limits = Vec::new();
    for gw in [&local, &global] {
        for _ in 0..3 {
            assert_eq!(get(gw, "k").await.status, StatusCode::OK);
        }
        let refused = get(gw, "k").await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        limits.push(refused.headers["x-ratelimit-limit"].clone());
    }
    assert_eq!(limits[0], limits[1]);
}
