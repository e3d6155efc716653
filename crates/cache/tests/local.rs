//! The cache without Redis: single-flight, negative entries, stale-if-error, early
//! refresh, the key filter, the weight bound. Time is a manual clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_cache::{Abandoned, Cache, CacheError};
use palisade_core::ManualClock;
use tokio::sync::Semaphore;

/// Waits until `done()` holds, failing after 10 s (it polls; it never sleeps a guess).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}

fn counted(calls: &Arc<AtomicUsize>) -> Arc<AtomicUsize> {
    calls.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_run_the_loader_once() {
    let cache: Cache<String> = Cache::builder("flight").build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let mut callers = Vec::new();
    for _ in 0..1000 {
        let (cache, calls, gate) = (cache.clone(), counted(&calls), gate.clone());
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
    // Every other caller is waiting on the first one's load before it may finish.
    until("999 callers to join the load", || cache.stats().coalesced == 999).await;
    gate.add_permits(1);
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().as_deref(), Some("value"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().loads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_reaches_every_waiter_once_and_a_panic_does_not_hang_them() {
    let cache: Cache<u32> = Cache::builder("errors").build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let mut callers = Vec::new();
    for _ in 0..10 {
        let (cache, gate) = (cache.clone(), gate.clone());
        callers.push(tokio::spawn(async move {
            cache
                .get_or_load("k", move || async move {
                    let _open = gate.acquire().await;
                    Err::<Option<u32>, _>(std::io::Error::other("database down"))
                })
                .await
        }));
    }
    until("9 callers to join", || cache.stats().coalesced == 9).await;
    gate.add_permits(1);
    for caller in callers {
        match caller.await.unwrap() {
            Err(CacheError::Load(e)) => assert_eq!(e.to_string(), "database down"),
            other => panic!("expected the loader's error, got {other:?}"),
        }
    }
    assert_eq!(cache.stats().load_errors, 1);

    // A loader that panics: its waiters get an error, not a hang.
    let err = cache
        .get_or_load("p", || async {
            panic!("loader bug") as Result<Option<u32>, std::io::Error>
        })
        .await
        .map(|_: Option<u32>| ())
        .unwrap_err();
    match err {
        CacheError::Load(e) => assert!(e.downcast_ref::<Abandoned>().is_some()),
        other => panic!("expected an abandoned load, got {other:?}"),
    }
    // The key is not stuck: the next call loads.
    let v = cache
        .get_or_load("p", || async { Ok::<_, std::io::Error>(Some(3)) })
        .await;
    assert_eq!(v.unwrap(), Some(3));
}

#[tokio::test]
async fn a_confirmed_absence_is_cached_for_the_negative_ttl() {
    let clock = ManualClock::new();
    let cache: Cache<u32> = Cache::builder("negative")
        .negative_ttl(Duration::from_secs(5))
        .jitter(0.0)
        .clock(clock.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let load = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(None)
        }
    };
    for _ in 0..10 {
        assert_eq!(
            cache.get_or_load("missing", load(calls.clone())).await.unwrap(),
            None
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the absence was not remembered");
    assert_eq!(cache.stats().loads_absent, 1);
    clock.advance(Duration::from_secs(6));
    cache.get_or_load("missing", load(calls.clone())).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the absence outlived its TTL");
}

#[tokio::test]
async fn an_expired_value_stands_in_for_a_failed_load_within_the_grace() {
    let clock = ManualClock::new();
    let cache: Cache<String> = Cache::builder("stale")
        .ttl(Duration::from_secs(10))
        .jitter(0.0)
        .stale_if_error(Duration::from_secs(30))
        .clock(clock.clone())
        .build()
        .unwrap();
    let ok = || async { Ok::<_, std::io::Error>(Some("v1".to_string())) };
    let failing = || async { Err::<Option<String>, _>(std::io::Error::other("down")) };
    assert_eq!(cache.get_or_load("k", ok).await.unwrap().as_deref(), Some("v1"));
    clock.advance(Duration::from_secs(20));
    assert_eq!(
        cache.get_or_load("k", failing).await.unwrap().as_deref(),
        Some("v1")
    );
    assert_eq!(cache.stats().stale_served, 1);
    clock.advance(Duration::from_secs(25));
    assert!(matches!(
        cache.get_or_load("k", failing).await,
        Err(CacheError::Load(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_in_the_background_before_it_expires() {
    let clock = ManualClock::new();
    let cache: Cache<u32> = Cache::builder("xfetch")
        .ttl(Duration::from_secs(10))
        .jitter(0.0)
        .early_refresh(Some(1.0))
        .clock(clock.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let loader = |calls: Arc<AtomicUsize>, clock: ManualClock| {
        move || async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) as u32;
            if n == 0 {
                // The first load takes a second: XFetch starts refreshing that much
                // (times a random factor) ahead of expiry.
                clock.advance(Duration::from_secs(1));
            }
            Ok::<_, std::io::Error>(Some(n + 1))
        }
    };
    assert_eq!(
        cache
            .get_or_load("k", loader(calls.clone(), clock.clone()))
            .await
            .unwrap(),
        Some(1)
    );
    // Far from expiry, hits never refresh.
    for _ in 0..100 {
        cache
            .get_or_load("k", loader(calls.clone(), clock.clone()))
            .await
            .unwrap();
    }
    assert_eq!(cache.stats().early_refreshes, 0);
    // Half a second before expiry each hit refreshes with probability e^-0.5; every
    // hit is still answered at once with the current value.
    clock.advance(Duration::from_millis(9_500));
    for _ in 0..50 {
        let v = cache
            .get_or_load("k", loader(calls.clone(), clock.clone()))
            .await
            .unwrap();
        assert!(
            v == Some(1) || v == Some(2),
            "{v:?} after {} loads",
            calls.load(Ordering::SeqCst)
        );
    }
    until("the refresh to land", || cache.stats().loads == 2).await;
    assert_eq!(cache.stats().early_refreshes, 1);
    assert_eq!(cache.stats().misses, 1, "a caller waited for the refresh");
    clock.advance(Duration::from_secs(1));
    // Past the first value's expiry the refreshed value is served without a load.
    assert_eq!(
        cache
            .get_or_load("k", loader(calls.clone(), clock.clone()))
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_key_filter_refuses_impossible_keys_before_the_loader() {
    let cache: Cache<u32> = Cache::builder("filter")
        .filter(|key| key.bytes().all(|b| b.is_ascii_digit()))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let v = cache
        .get_or_load("not-a-number", move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some(1))
        })
        .await;
    assert_eq!(v.unwrap(), None);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().filtered, 1);
}

#[tokio::test]
async fn l1_stays_within_its_weight() {
    let cache: Cache<String> = Cache::builder("weight")
        .max_weight(1_000)
        .estimated_items(50)
        .weigher(|_, v: &String| v.len() as u64)
        .build()
        .unwrap();
    for i in 0..200 {
        cache.set(&format!("k{i}"), "x".repeat(100)).await.unwrap();
    }
    assert!(
        cache.l1_len() <= 10,
        "{} entries of weight 100 in 1,000",
        cache.l1_len()
    );
    assert!(cache.stats().evictions >= 190);
}

#[tokio::test]
async fn set_and_invalidate_act_on_a_load_already_out() {
    let cache: Cache<String> = Cache::builder("supersede").build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (called, loader_called) = tokio::sync::oneshot::channel();
    let slow = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("k", move || async move {
                    let _ = called.send(());
                    let _open = g.acquire().await;
                    Ok::<_, std::io::Error>(Some("old".to_string()))
                })
                .await
        })
    };
    loader_called.await.unwrap();
    cache.set("k", "new".to_string()).await.unwrap();
    gate.add_permits(1);
    // The caller that asked before the set gets what it asked for...
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("old"));
    // ...but the old value did not replace the new one.
    assert_eq!(cache.get("k").await.as_deref(), Some("new"));

    cache.invalidate("k").await.unwrap();
    assert_eq!(cache.get("k").await, None);
}

#[test]
fn bad_settings_name_their_fields() {
    let err = Cache::<u32>::builder("bad")
        .ttl(Duration::ZERO)
        .jitter(1.5)
        .max_weight(0)
        .redis(palisade_cache::RedisOptions::new("http://not-redis"))
        .build()
        .unwrap_err();
    let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["ttl", "jitter", "max_weight", "redis.url"]);
}

#[tokio::test]
async fn set_for_keeps_a_value_exactly_its_own_lifetime() {
    let clock = ManualClock::new();
    let cache: Cache<u32> = Cache::builder("set_for")
        .ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .build()
        .unwrap();
    cache.set_for("short", 1, Duration::from_secs(2)).await.unwrap();
    cache.set("long", 2).await.unwrap();
    clock.advance(Duration::from_millis(1_999));
    assert_eq!(cache.get("short").await, Some(1));
    clock.advance(Duration::from_millis(2));
    assert_eq!(cache.get("short").await, None);
    assert_eq!(cache.get("long").await, Some(2));
}
