//! The cache against real Redis: the shared server `scripts/test` starts
//! (`PALISADE_TEST_REDIS_URL`, each test under its own key prefix) and, for the fault
//! tests, servers of the test's own (`PALISADE_TEST_REDIS_SERVER`) that it hangs,
//! kills and restarts.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_cache::{Cache, LeaseOptions, RedisOptions};
use palisade_core::ManualClock;
use tokio::sync::Semaphore;

fn redis_url() -> String {
    std::env::var("PALISADE_TEST_REDIS_URL")
        .expect("PALISADE_TEST_REDIS_URL is not set: run the tests through scripts/test, which starts Redis")
}

fn prefix(test: &str) -> String {
    format!("palisade:test:{test}:{:x}:", fastrand::u64(..))
}

fn options(url: &str, prefix: &str) -> RedisOptions {
    let mut o = RedisOptions::new(url);
    o.prefix = Some(prefix.to_owned());
    o.timeout = Duration::from_secs(2);
    o
}

/// A plain connection, to look at and tamper with what the cache keeps.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `n` connections subscribe to the prefix's invalidation channel.
async fn subscribed(url: &str, prefix: &str, n: i64) {
    let mut conn = raw(url).await;
    let channel = format!("{prefix}invalidations");
    until("the invalidation subscriptions", async || {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        counts.first().is_some_and(|(_, c)| *c >= n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_loaded_by_one_instance_is_an_l2_hit_for_another() {
    let (url, prefix) = (redis_url(), prefix("l2hit"));
    let a: Cache<String> = Cache::builder("a").redis(options(&url, &prefix)).build().unwrap();
    let b: Cache<String> = Cache::builder("b").redis(options(&url, &prefix)).build().unwrap();
    let v = a
        .get_or_load("k", || async { Ok::<_, std::io::Error>(Some("v".to_string())) })
        .await;
    assert_eq!(v.unwrap().as_deref(), Some("v"));
    let v = b
        .get_or_load("k", || async {
            Err::<Option<String>, _>(std::io::Error::other("must not load"))
        })
        .await;
    assert_eq!(v.unwrap().as_deref(), Some("v"));
    assert_eq!((a.stats().loads, b.stats().loads, b.stats().l2_hits), (1, 0, 1));
    // A confirmed absence is shared the same way.
    a.get_or_load("gone", || async { Ok::<Option<String>, std::io::Error>(None) })
        .await
        .unwrap();
    let v = b
        .get_or_load("gone", || async {
            Err::<Option<String>, _>(std::io::Error::other("must not load"))
        })
        .await;
    assert_eq!(v.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_lease_a_thousand_misses_across_two_instances_load_once() {
    let (url, prefix) = (redis_url(), prefix("lease"));
    let mut o = options(&url, &prefix);
    o.lease = Some(LeaseOptions {
        ttl: Duration::from_secs(30),
        wait: Duration::from_secs(30),
    });
    let a: Cache<String> = Cache::builder("a").redis(o.clone()).build().unwrap();
    let b: Cache<String> = Cache::builder("b").redis(o).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let mut callers = Vec::new();
    for i in 0..1000 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (calls, gate) = (calls.clone(), gate.clone());
        callers.push(tokio::spawn(async move {
            cache
                .get_or_load("hot", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _open = gate.acquire().await;
                    Ok::<_, std::io::Error>(Some("value".to_string()))
                })
                .await
        }));
    }
    // One instance's load holds the lease; the other's waits for it.
    until("every caller to wait on one load", async || {
        let (sa, sb) = (a.stats(), b.stats());
        sa.coalesced + sb.coalesced == 998 && sa.lease_waits + sb.lease_waits == 1
    })
    .await;
    gate.add_permits(1);
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().as_deref(), Some("value"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let mut conn = raw(&url).await;
    let lease: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}{{hot}}:l"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lease, None, "the lease was not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_in_one_instance_is_seen_by_the_other() {
    let (url, prefix) = (redis_url(), prefix("invalidate"));
    let a: Cache<String> = Cache::builder("a").redis(options(&url, &prefix)).build().unwrap();
    let b: Cache<String> = Cache::builder("b").redis(options(&url, &prefix)).build().unwrap();
    subscribed(&url, &prefix, 2).await;
    let load = |v: &'static str| move || async move { Ok::<_, std::io::Error>(Some(v.to_string())) };
    a.get_or_load("k", load("v1")).await.unwrap();
    assert_eq!(
        b.get_or_load("k", load("unused")).await.unwrap().as_deref(),
        Some("v1")
    );

    a.set("k", "v2".to_string()).await.unwrap();
    until("b to hear of the set", async || {
        b.stats().remote_invalidations == 1
    })
    .await;
    assert_eq!(b.get("k").await.as_deref(), Some("v2"));

    b.invalidate("k").await.unwrap();
    until("a to hear of the invalidation", async || {
        a.stats().remote_invalidations == 1
    })
    .await;
    assert_eq!(a.get("k").await, None);
    assert_eq!(
        a.get_or_load("k", load("v3")).await.unwrap().as_deref(),
        Some("v3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_began_before_an_invalidation_cannot_write_its_old_value_back() {
    let (url, prefix) = (redis_url(), prefix("generation"));
    let a: Cache<String> = Cache::builder("a").redis(options(&url, &prefix)).build().unwrap();
    let b: Cache<String> = Cache::builder("b").redis(options(&url, &prefix)).build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (called, loader_called) = tokio::sync::oneshot::channel();
    let slow = {
        let a = a.clone();
        tokio::spawn(async move {
            a.get_or_load("k", move || async move {
                let _ = called.send(());
                let _open = g.acquire().await;
                Ok::<_, std::io::Error>(Some("old".to_string()))
            })
            .await
        })
    };
    // The load has read the generation (its loader is running) when b changes the key.
    loader_called.await.unwrap();
    b.set("k", "new".to_string()).await.unwrap();
    gate.add_permits(1);
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("old"));
    // The write-back was refused: L2 keeps b's value for everyone.
    let c: Cache<String> = Cache::builder("c").redis(options(&url, &prefix)).build().unwrap();
    until("a's write-back to finish", async || a.stats().loads == 1).await;
    let v = c
        .get_or_load("k", || async {
            Err::<Option<String>, _>(std::io::Error::other("must not load"))
        })
        .await;
    assert_eq!(v.unwrap().as_deref(), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_decode_is_a_counted_miss() {
    let (url, prefix) = (redis_url(), prefix("decode"));
    let mut conn = raw(&url).await;
    // An older version's value: another format byte; and a value of another type.
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}{{old}}"))
        .arg(b"\x00garbage from an older version".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let other: Cache<u8> = Cache::builder("other")
        .redis(options(&url, &prefix))
        .build()
        .unwrap();
    other.set("typed", 7).await.unwrap();

    let cache: Cache<String> = Cache::builder("decode")
        .redis(options(&url, &prefix))
        .build()
        .unwrap();
    for key in ["old", "typed"] {
        let v = cache
            .get_or_load(key, || async {
                Ok::<_, std::io::Error>(Some("fresh".to_string()))
            })
            .await;
        assert_eq!(v.unwrap().as_deref(), Some("fresh"));
    }
    assert_eq!(cache.stats().decode_errors, 2);
    assert_eq!(cache.stats().loads, 2);
}

/// A Redis server of the test's own, on a free port.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start(port: u16) -> Server {
        let bin = std::env::var("PALISADE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server could not be started");
        Server { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ready(&self) {
        let url = self.url();
        until("redis-server to answer", async || {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return false;
            };
            match client.get_multiplexed_async_connection().await {
                Ok(mut c) => redis::cmd("PING").query_async::<String>(&mut c).await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_timeouts_until_the_breaker_opens_then_none() {
    let server = Server::start(free_port());
    server.ready().await;
    let clock = ManualClock::new();
    let mut o = options(&server.url(), "hung:");
    o.timeout = Duration::from_millis(200);
    let cache: Cache<u32> = Cache::builder("hung")
        .redis(o)
        .clock(clock.clone())
        .build()
        .unwrap();
    let load = |v: u32| move || async move { Ok::<_, std::io::Error>(Some(v)) };
    assert_eq!(cache.get_or_load("warm", load(0)).await.unwrap(), Some(0));
    subscribed(&server.url(), "hung:", 1).await;

    server.signal("-STOP");
    for i in 1..=20u32 {
        assert_eq!(
            cache.get_or_load(&format!("k{i}"), load(i)).await.unwrap(),
            Some(i)
        );
    }
    let s = cache.stats();
    // Three calls waited out the timeout and opened the breaker; the other
    // seventeen loads did not touch Redis at all.
    assert_eq!((s.redis_timeouts, s.redis_errors), (3, 0));
    assert_eq!(s.redis_refused, 17);
    assert_eq!(s.loads, 21);
    // L1 still answers what it has.
    assert_eq!(cache.get("k1").await, Some(1));
    server.signal("-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_then_restarted_is_used_again_without_a_restart() {
    let port = free_port();
    let server = Server::start(port);
    server.ready().await;
    let url = server.url();
    let clock = ManualClock::new();
    let mut o = options(&url, "restart:");
    o.timeout = Duration::from_millis(500);
    let cache: Cache<u32> = Cache::builder("restart")
        .redis(o)
        .clock(clock.clone())
        .build()
        .unwrap();
    subscribed(&url, "restart:", 1).await;
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (called, loader_called) = tokio::sync::oneshot::channel();
    let mid = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("mid", move || async move {
                    let _ = called.send(());
                    let _open = g.acquire().await;
                    Ok::<_, std::io::Error>(Some(1))
                })
                .await
        })
    };
    loader_called.await.unwrap();
    server.kill();
    gate.add_permits(1);
    assert_eq!(mid.await.unwrap().unwrap(), Some(1));
    // While Redis is gone every call is answered, from L1 or the loader.
    for i in 0..20u32 {
        let v = cache
            .get_or_load(&format!("down{i}"), move || async move {
                Ok::<_, std::io::Error>(Some(i))
            })
            .await;
        assert_eq!(v.unwrap(), Some(i));
        assert_eq!(cache.get("mid").await, Some(1));
    }
    assert!(cache.redis_breaker().unwrap().stats().state != palisade_resilience::breaker::State::Closed);

    let server = Server::start(port);
    server.ready().await;
    // Once the breaker's open time is over its probe reconnects; loads write to L2 again.
    let mut conn = raw(&url).await;
    let mut round = 0u32;
    until("a value written to the restarted Redis", async || {
        round += 1;
        clock.advance(Duration::from_secs(6));
        let key = format!("back{round}");
        let _ = cache
            .get_or_load(&key, || async { Ok::<_, std::io::Error>(Some(9)) })
            .await;
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("restart:{{{key}}}"))
            .query_async(&mut conn)
            .await
            .unwrap_or(false);
        exists
    })
    .await;
    // And what another instance wrote there is an L2 hit.
    let other: Cache<u32> = Cache::builder("other")
        .redis(options(&url, "restart:"))
        .build()
        .unwrap();
    other.set("shared", 5).await.unwrap();
    clock.advance(Duration::from_secs(6));
    let v = cache
        .get_or_load("shared", || async {
            Err::<Option<u32>, _>(std::io::Error::other("must not load"))
        })
        .await;
    assert_eq!(v.unwrap(), Some(5));
    drop(server);
}
