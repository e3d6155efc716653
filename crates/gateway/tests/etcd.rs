//! etcd as the configuration store and service registry, against real etcd
//! members: a new configuration applied with no request failing, a bad one
//! refused while the running one serves, etcd killed and restarted under a
//! serving gateway, and a registry's endpoints followed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use palisade_gateway::Handle;
use palisade_gateway::etcd::Etcd;
use palisade_gateway::source::ConfigSource;

use support::{EtcdServer, get, serve_http1};

const GUARD: Duration = Duration::from_secs(30);

fn shared_etcd() -> String {
    std::env::var("PALISADE_TEST_ETCD_URL").expect("PALISADE_TEST_ETCD_URL: scripts/test starts an etcd")
}

fn unique(what: &str) -> String {
    format!(
        "/palisade-test/{what}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    )
}

/// An upstream answering `name`.
async fn upstream(name: &'static str) -> SocketAddr {
    serve_http1(move |_req: Request<Incoming>| async move {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(name.as_bytes()))))
    })
    .await
}

/// A configuration with one route to `up`.
fn config_to(up: SocketAddr) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"r\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n\n\
         [clusters.c]\nendpoints = [\"{up}\"]\n"
    )
}

/// A gateway started from `etcd://…{key}` and following it (as `palisade gateway
/// --config etcd://…` does), with the task that follows.
async fn gateway_from(etcd_url: &str, key: &str) -> (Arc<Handle>, tokio::task::JoinHandle<()>) {
    let authority = etcd_url.trim_start_matches("http://");
    let source = ConfigSource::parse(&format!("etcd://{authority}{key}")).unwrap();
    let loaded = source.load().await.unwrap();
    let gw = Arc::new(
        palisade_gateway::start(loaded.config, Some((source, loaded.version)))
            .await
            .unwrap(),
    );
    let follower = gw.clone();
    let task = tokio::spawn(async move { follower.watch_config().await });
    (gw, task)
}

/// Waits until the gateway has applied `applied` and refused `rejected` versions.
async fn reloads(gw: &Handle, applied: u64, rejected: u64) {
    let mut r = gw.reloads();
    tokio::time::timeout(
        GUARD,
        r.wait_for(|r| r.applied >= applied && r.rejected >= rejected),
    )
    .await
    .expect("the version was not taken up")
    .unwrap();
    let now = *r.borrow();
    assert_eq!((now.applied, now.rejected), (applied, rejected));
}

/// Sends requests one after another until stopped: (answers, failures).
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let a = get(addr, "/").await;
            let counter = if a.status == StatusCode::OK { &ok } else { &failed };
            counter.fetch_add(1, Ordering::SeqCst);
        }
        (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_in_etcd_is_followed_without_dropping_requests_and_a_bad_one_refused() {
    let etcd = Etcd::new(shared_etcd().parse().unwrap(), Duration::from_secs(5));
    let key = unique("config");
    let (a, b) = (upstream("a").await, upstream("b").await);
    etcd.put(&key, config_to(a).as_bytes(), None).await.unwrap();
    let (gw, follow) = gateway_from(&shared_etcd(), &key).await;
    assert_eq!(get(gw.addr, "/").await.body, "a");

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(gw.addr, stop.clone());
    etcd.put(&key, config_to(b).as_bytes(), None).await.unwrap();
    reloads(&gw, 1, 0).await;
    assert_eq!(get(gw.addr, "/").await.body, "b");
    // Not valid: refused, and `b` serves on.
    etcd.put(&key, b"[gateway]\nlisten = \"nonsense\"\n", None)
        .await
        .unwrap();
    reloads(&gw, 1, 1).await;
    // Parses, but does not compile: cluster `d` has no endpoints.
    let uncompiled = format!("{}[clusters.d]\n", config_to(a));
    etcd.put(&key, uncompiled.as_bytes(), None).await.unwrap();
    reloads(&gw, 1, 2).await;
    assert_eq!(get(gw.addr, "/").await.body, "b");
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed while the configuration changed");
    follow.abort();
    etcd.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_through_an_etcd_restart_and_takes_changes_made_after() {
    let mut server = EtcdServer::start().await;
    let etcd = Etcd::new(server.url().parse().unwrap(), Duration::from_secs(2));
    let key = "/palisade/gateway";
    let (a, b) = (upstream("a").await, upstream("b").await);
    etcd.put(key, config_to(a).as_bytes(), None).await.unwrap();
    let (gw, follow) = gateway_from(&server.url(), key).await;
    assert_eq!(get(gw.addr, "/").await.body, "a");

    server.kill();
    for _ in 0..20 {
        assert_eq!(
            get(gw.addr, "/").await.body,
            "a",
            "the last good configuration serves"
        );
    }
    server.restart().await;
    etcd.put(key, config_to(b).as_bytes(), None).await.unwrap();
    reloads(&gw, 1, 0).await;
    assert_eq!(get(gw.addr, "/").await.body, "b");
    follow.abort();
}

#[tokio::test]
async fn etcd_unreachable_at_start_is_an_error_that_says_so() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let source = ConfigSource::parse(&format!("etcd://{closed}/palisade/gateway")).unwrap();
    let err = source.load().await.unwrap_err().to_string();
    assert!(err.contains("etcd cannot be reached"), "{err}");
    let missing = ConfigSource::parse(&format!(
        "etcd://{}{}",
        shared_etcd().trim_start_matches("http://"),
        unique("none")
    ))
    .unwrap();
    let err = missing.load().await.unwrap_err().to_string();
    assert!(err.contains("etcd holds no key"), "{err}");
    for bad in ["etcd://", "etcd://host:2379", "etcd:///key"] {
        assert!(ConfigSource::parse(bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn a_registry_cluster_follows_its_keys() {
    let etcd = Etcd::new(shared_etcd().parse().unwrap(), Duration::from_secs(5));
    let prefix = format!("{}/", unique("orders"));
    let (a, b) = (upstream("a").await, upstream("b").await);
    etcd.put(&format!("{prefix}a"), a.to_string().as_bytes(), None)
        .await
        .unwrap();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\n\
         [[routes]]\nname = \"r\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n\n\
         [clusters.c]\netcd = {{ url = \"{}\", prefix = \"{prefix}\" }}\n",
        shared_etcd()
    );
    let gw = palisade_gateway::start(palisade_gateway::Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap();
    // Read at start: it serves at once.
    assert_eq!(get(gw.addr, "/").await.body, "a");
    let mut events = gw.runtime().clusters["c"].events.subscribe();
    let addrs = |gw: &Handle| -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = gw.runtime().clusters["c"]
            .cluster
            .endpoints()
            .iter()
            .map(|e| e.addr())
            .collect();
        v.sort();
        v
    };
    let sets = events.borrow().endpoint_sets;
    // A second endpoint registered as JSON, the first one deleted.
    let json = format!("{{\"address\": \"{b}\", \"weight\": 2}}");
    etcd.put(&format!("{prefix}b"), json.as_bytes(), None)
        .await
        .unwrap();
    etcd.delete(&format!("{prefix}a")).await.unwrap();
    tokio::time::timeout(GUARD, async {
        while addrs(&gw) != vec![b] {
            events.changed().await.unwrap();
        }
    })
    .await
    .expect("the registry's changes did not arrive");
    assert!(events.borrow().endpoint_sets > sets);
    assert_eq!(get(gw.addr, "/").await.body, "b");
    gw.shutdown().await;
}

#[test]
fn a_registry_cluster_is_checked_by_field() {
    let text = "[[routes]]\nname = \"r\"\ncluster = \"c\"\n\n\
                [clusters.c]\nendpoints = [\"127.0.0.1:1\"]\netcd = { url = \"etcd:2379\", prefix = \"services\", timeout = \"0s\" }\n";
    let err = palisade_gateway::Config::from_toml(text).unwrap_err().to_string();
    for field in [
        "clusters.c.etcd.url",
        "clusters.c.etcd.prefix",
        "clusters.c.etcd.timeout",
        "clusters.c.etcd: a cluster's endpoints come from etcd",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}
