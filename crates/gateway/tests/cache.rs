//! The response cache against real sockets: an upstream whose answers carry
//! caching headers, counting what reaches it, behind a gateway whose route has a
//! `cache` table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade_gateway::{Config, Handle};

mod support;

use support::{Answer, get, send};

/// An upstream answering by path, counting requests per path.
struct Origin {
    seen: Mutex<HashMap<String, u32>>,
    failing: AtomicBool,
    /// `/slow` answers once a permit is added.
    release: tokio::sync::Semaphore,
}

impl Default for Origin {
    fn default() -> Self {
        Origin {
            seen: Mutex::default(),
            failing: AtomicBool::new(false),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Origin {
    fn seen(&self, path: &str) -> u32 {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let n = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let reply = |status: u16, headers: &[(&str, &str)], body: String| {
            let mut r = Response::builder().status(status);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(Full::new(Bytes::from(body))).unwrap()
        };
        let h = req.headers();
        match path.as_str() {
            "/fresh" => reply(200, &[("cache-control", "max-age=60")], format!("v{n}")),
            "/private" => reply(200, &[("cache-control", "private, max-age=60")], format!("v{n}")),
            "/no-store" => reply(200, &[("cache-control", "no-store, max-age=60")], format!("v{n}")),
            "/etag" if h.get("if-none-match").is_some_and(|v| v == "\"v1\"") => reply(
                304,
                &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
                String::new(),
            ),
            "/etag" => reply(
                200,
                &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
                format!("body {n}"),
            ),
            "/vary" => {
                let lang = h
                    .get("accept-language")
                    .map_or("none", |v| v.to_str().unwrap())
                    .to_owned();
                reply(
                    200,
                    &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
                    lang,
                )
            }
            "/flaky" if self.failing.load(Ordering::SeqCst) => reply(500, &[], "down".into()),
            "/flaky" => reply(
                200,
                &[("cache-control", "max-age=0, stale-if-error=60")],
                format!("v{n}"),
            ),
            "/swr" => reply(
                200,
                &[("cache-control", "max-age=0, stale-while-revalidate=60")],
                format!("v{n}"),
            ),
            "/plain" => reply(200, &[], format!("v{n}")),
            "/slow" => reply(200, &[("cache-control", "max-age=60")], format!("v{n}")),
            _ => reply(404, &[], String::new()),
        }
    }
}

async fn origin() -> (Arc<Origin>, SocketAddr) {
    let origin = Arc::new(Origin::default());
    let o = origin.clone();
    let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
        let resp = o.answer(&req);
        let (o, slow) = (o.clone(), req.uri().path() == "/slow");
        async move {
            if slow {
                o.release.acquire().await.unwrap().forget();
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
    .await;
    (origin, addr)
}

async fn gateway(up: SocketAddr, cache: &str) -> Handle {
    gateway_with(up, cache, "").await
}

async fn gateway_with(up: SocketAddr, cache: &str, gateway_lines: &str) -> Handle {
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false
{gateway_lines}

[[routes]]
name = "cached"
match = {{ path_prefix = "/" }}
cluster = "c"
cache = {{ {cache} }}

[clusters.c]
endpoints = ["{up}"]
"#
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

fn cache_header(a: &Answer) -> &str {
    a.headers
        .get("x-palisade-cache")
        .map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_answer_is_served_from_the_cache_with_its_age() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    let first = get(gw.addr, "/fresh").await;
    assert_eq!(
        (first.status, first.body.as_str(), cache_header(&first)),
        (StatusCode::OK, "v1", "miss")
    );
    for _ in 0..3 {
        let again = get(gw.addr, "/fresh").await;
        assert_eq!((again.body.as_str(), cache_header(&again)), ("v1", "hit"));
        assert!(again.headers.contains_key("age"));
        // Its own request id, not the one of the request that fetched it.
        assert_ne!(again.headers["x-request-id"], first.headers["x-request-id"]);
    }
    assert_eq!(origin.seen("/fresh"), 1);
    // A query is another key.
    assert_eq!(get(gw.addr, "/fresh?page=2").await.body, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_no_store_answers_are_never_served_from_the_cache() {
    let (origin, up) = origin().await;
    // Even with a default TTL that would store answers stating nothing.
    let gw = gateway(up, "default_ttl = \"60s\"").await;
    for (i, path) in ["/private", "/no-store"].into_iter().enumerate() {
        for n in 1..=3 {
            let a = get(gw.addr, path).await;
            assert_eq!(
                (a.body.clone(), cache_header(&a)),
                (format!("v{n}"), "miss"),
                "{path}"
            );
        }
        assert_eq!(origin.seen(path), 3, "{path} (case {i})");
    }
    // The default TTL stores an answer that states nothing.
    get(gw.addr, "/plain").await;
    assert_eq!(cache_header(&get(gw.addr, "/plain").await), "hit");
    assert_eq!(origin.seen("/plain"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_cache_answer_is_revalidated_with_its_etag_and_a_304_serves_the_stored_body() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    assert_eq!(get(gw.addr, "/etag").await.body, "body 1");
    let again = get(gw.addr, "/etag").await;
    // The upstream answered 304 to the cache's If-None-Match; the client gets the body.
    assert_eq!(
        (again.status, again.body.as_str(), cache_header(&again)),
        (StatusCode::OK, "body 1", "hit")
    );
    assert_eq!(origin.seen("/etag"), 2);
    // A client's own matching If-None-Match is answered 304.
    let conditional = Request::get("/etag")
        .header("if-none-match", "\"v1\"")
        .body(Full::default())
        .unwrap();
    let a = send(gw.addr, conditional).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::NOT_MODIFIED, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_varies_is_served_only_for_the_same_header_values() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    let lang = |l: &'static str| {
        Request::get("/vary")
            .header("accept-language", l)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(gw.addr, lang("fr")).await.body, "fr");
    let fr = send(gw.addr, lang("fr")).await;
    assert_eq!((fr.body.as_str(), cache_header(&fr)), ("fr", "hit"));
    let de = send(gw.addr, lang("de")).await;
    assert_eq!((de.body.as_str(), cache_header(&de)), ("de", "miss"));
    assert_eq!(origin.seen("/vary"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_reach_the_upstream_once() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    let requests: Vec<_> = (0..10).map(|_| tokio::spawn(get(gw.addr, "/slow"))).collect();
    // One request is at the upstream; the nine others wait for its answer.
    let store = gw.runtime().responses.clone().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(origin.seen("/slow") == 1 && store.waiting() == 9) {
        assert!(
            std::time::Instant::now() < deadline,
            "the misses were not collapsed"
        );
        tokio::task::yield_now().await;
    }
    origin.release.add_permits(1);
    let mut hits = 0;
    for r in requests {
        let a = r.await.unwrap();
        assert_eq!(a.body, "v1");
        hits += u32::from(cache_header(&a) == "hit");
    }
    assert_eq!((origin.seen("/slow"), hits), (1, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_in_the_key_keeps_an_answer_per_value() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "key_headers = [\"accept-language\"]").await;
    let lang = |l: &'static str| {
        Request::get("/vary")
            .header("accept-language", l)
            .body(Full::default())
            .unwrap()
    };
    for l in ["fr", "de"] {
        assert_eq!(send(gw.addr, lang(l)).await.body, l);
    }
    for l in ["fr", "de"] {
        let a = send(gw.addr, lang(l)).await;
        assert_eq!((a.body.as_str(), cache_header(&a)), (l, "hit"));
    }
    assert_eq!(origin.seen("/vary"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_stands_in_for_a_failing_upstream_within_stale_if_error() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    assert_eq!(get(gw.addr, "/flaky").await.body, "v1");
    origin.failing.store(true, Ordering::SeqCst);
    let a = get(gw.addr, "/flaky").await;
    assert_eq!(
        (a.status, a.body.as_str(), cache_header(&a)),
        (StatusCode::OK, "v1", "stale")
    );
    assert_eq!(
        origin.seen("/flaky"),
        2,
        "the stale answer was not revalidated first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_is_served_while_one_background_request_revalidates_it() {
    let (_origin, up) = origin().await;
    let gw = gateway(up, "").await;
    assert_eq!(get(gw.addr, "/swr").await.body, "v1");
    let a = get(gw.addr, "/swr").await;
    assert_eq!((a.body.as_str(), cache_header(&a)), ("v1", "stale"));
    // The background request stores v2; until it has, v1 is served stale. (v2 is
    // stale at once too, so a later request may already have stored v3.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = get(gw.addr, "/swr").await;
        if a.body != "v1" {
            assert_eq!(cache_header(&a), "stale");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "v2 never stored");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_change_to_a_path_drops_its_stored_answer() {
    let (origin, up) = origin().await;
    let gw = gateway(up, "").await;
    get(gw.addr, "/fresh").await;
    assert_eq!(cache_header(&get(gw.addr, "/fresh").await), "hit");
    let post = Request::post("/fresh").body(Full::from("x")).unwrap();
    assert_eq!(send(gw.addr, post).await.status, StatusCode::OK);
    let a = get(gw.addr, "/fresh").await;
    assert_eq!(cache_header(&a), "miss");
    assert_eq!(origin.seen("/fresh"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_sharing_a_redis_share_what_one_stored() {
    let redis = std::env::var("PALISADE_TEST_REDIS_URL")
        .expect("PALISADE_TEST_REDIS_URL is not set: run the tests through scripts/test, which starts Redis");
    let (origin, up) = origin().await;
    let shared = format!("cache = {{ redis = \"{redis}\", redis_timeout = \"2s\" }}");
    let a = gateway_with(up, "", &shared).await;
    let b = gateway_with(up, "", &shared).await;
    // Both reach the upstream as the same host, so their keys are the same; the
    // query makes them this run's own in a Redis that may outlive it.
    let query = format!("shared={:x}", fastrand::u64(..));
    let path = format!("/fresh?{query}");
    let host = |gw: &Handle| {
        let path = path.as_str();
        let req = Request::get(path)
            .header("host", "shop.example")
            .body(Full::default())
            .unwrap();
        send(gw.addr, req)
    };
    let first = host(&a).await;
    assert_eq!((first.body.as_str(), cache_header(&first)), ("v1", "miss"));
    // a writes Redis in a task of its own once the answer is complete: wait for it.
    let mut conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("palisade:responses:{{cached\nshop.example\n/fresh?{query}}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !redis::cmd("EXISTS")
        .arg(&key)
        .query_async::<bool>(&mut conn)
        .await
        .unwrap()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a never wrote its answer to Redis"
        );
        tokio::task::yield_now().await;
    }
    let other = host(&b).await;
    assert_eq!((other.body.as_str(), cache_header(&other)), ("v1", "hit"));
    assert_eq!(origin.seen("/fresh"), 1);
}

#[test]
fn bad_cache_settings_name_their_fields() {
    let text = r#"[gateway]
listen = "127.0.0.1:0"
cache = { max_bytes = 0, redis = "http://nope" }

[[routes]]
name = "r"
cluster = "c"
cache = { max_ttl = "0s", default_ttl = "0s", max_body_bytes = 0, key_headers = ["bad header"] }

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let config = Config::from_toml(text);
    let fields: Vec<String> = match config {
        Err(e) => e.0.into_iter().map(|e| e.field).collect(),
        Ok(c) => palisade_gateway::runtime::Runtime::compile(c)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect(),
    };
    assert_eq!(fields, ["gateway.cache.max_bytes", "gateway.cache.redis"]);
    // A URL only Redis's client can tell is wrong: `check` (the compilation) says so.
    let unparsable = text.replace(
        "max_bytes = 0, redis = \"http://nope\"",
        "redis = \"redis://127.0.0.1:port\"",
    );
    let errors =
        palisade_gateway::runtime::Runtime::compile(Config::from_toml(&unparsable).unwrap()).unwrap_err();
    let fields: Vec<String> = errors.0.into_iter().map(|e| e.field).collect();
    assert!(
        fields.contains(&"gateway.cache.redis.url".to_owned()),
        "{fields:?}"
    );
    let text = text.replace("cache = { max_bytes = 0, redis = \"http://nope\" }", "");
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(&text).unwrap()).unwrap_err();
    let fields: Vec<String> = errors.0.into_iter().map(|e| e.field).collect();
    assert_eq!(
        fields,
        [
            "routes[0] (r).cache.max_ttl",
            "routes[0] (r).cache.default_ttl",
            "routes[0] (r).cache.max_body_bytes",
            "routes[0] (r).cache.key_headers[0]"
        ]
    );
}
