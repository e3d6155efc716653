//! L1 hits for instruction counting under `valgrind --tool=callgrind` (bench/cache.sh):
//! `l1_hits <quick_cache|quick_cache+ttl|moka|palisade> <hits>` fills a cache with 1,000 products
//! and reads them `hits` times in turn (palisade's in one async loop, awaiting each). Two runs with different `hits` give the
//! instructions of one hit, set-up cancelled out.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use palisade_cache::Cache;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(which), Some(hits)) = (args.next(), args.next().and_then(|n| n.parse::<usize>().ok())) else {
        eprintln!("usage: l1_hits <quick_cache|moka|palisade> <hits>");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let keys: Vec<String> = (0..1000).map(|i| format!("product:{i}")).collect();
    let value = |i: usize| Arc::new((i as u64, format!("product {i}")));
    match which.as_str() {
        "quick_cache" => {
            let cache = quick_cache::sync::Cache::<String, Arc<(u64, String)>>::new(10_000);
            for (i, k) in keys.iter().enumerate() {
                cache.insert(k.clone(), value(i));
            }
            for n in 0..hits {
                black_box(cache.get(keys[n % keys.len()].as_str()));
            }
        }
        "quick_cache+ttl" => {
            // The floor of any cache with expiry on quick_cache: the entry carries
            // its times and one clock read judges it.
            let clock = palisade_core::SystemClock;
            let cache = quick_cache::sync::Cache::<String, Timed<Arc<(u64, String)>>>::new(10_000);
            let until = palisade_core::Clock::now(&clock).as_nanos() + 3_600_000_000_000;
            for (i, k) in keys.iter().enumerate() {
                cache.insert(k.clone(), Timed::new(value(i), until));
            }
            for n in 0..hits {
                let now = palisade_core::Clock::now(&clock).as_nanos();
                black_box(
                    cache
                        .get(keys[n % keys.len()].as_str())
                        .filter(|e| now < e.until)
                        .map(|e| e.value),
                );
            }
        }
        "moka" => {
            let cache = moka::sync::Cache::<String, Arc<(u64, String)>>::new(10_000);
            for (i, k) in keys.iter().enumerate() {
                cache.insert(k.clone(), value(i));
            }
            for n in 0..hits {
                black_box(cache.get(keys[n % keys.len()].as_str()));
            }
        }
        "palisade" => {
            let cache: Cache<Arc<(u64, String)>> = Cache::builder("hits")
                .ttl(Duration::from_secs(3600))
                .build()
                .unwrap();
            for (i, k) in keys.iter().enumerate() {
                rt.block_on(cache.set(k, value(i))).unwrap();
            }
            let never = || {
                std::future::ready(Err::<Option<Arc<(u64, String)>>, _>(std::io::Error::other(
                    "a hit",
                )))
            };
            // Awaited in an async loop, as a service would.
            rt.block_on(async {
                for n in 0..hits {
                    black_box(cache.get_or_load(&keys[n % keys.len()], never).await.ok());
                }
            });
        }
        other => {
            eprintln!("unknown cache {other}");
            std::process::exit(2);
        }
    }
}

/// A value with the times a TTL cache keeps beside it (as the crate's entries do).
#[derive(Clone)]
struct Timed<V> {
    value: V,
    until: u64,
    _stale_until: u64,
    _refresh_window: u64,
    _load_nanos: u64,
}

impl<V> Timed<V> {
    fn new(value: V, until: u64) -> Self {
        Timed {
            value,
            until,
            _stale_until: until,
            _refresh_window: 0,
            _load_nanos: 0,
        }
    }
}
