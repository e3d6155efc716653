//! The routes' response caches: one store (`palisade-cache`: memory, and Redis when
//! `[gateway.cache]` names one) built at start and kept by reloads, and each route's
//! rules (its `cache` table, compiled).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_cache::http::{Policy, Stored};
use palisade_cache::{Cache, RedisOptions};
use palisade_core::{ConfigError, ConfigErrors};
use tokio::sync::Notify;

use crate::config::{CacheConfig, CacheSection};

/// Where every route's cached answers are kept.
pub struct Responses {
    /// The answers, by key.
    pub cache: Cache<Arc<Stored>>,
    /// Keys a request is fetching from upstream (on a miss, or revalidating in the
    /// background); other misses of the key wait for its answer to be stored.
    fetching: Mutex<HashMap<String, Arc<Notify>>>,
    /// Requests waiting for another's fetch now.
    waiting: AtomicUsize,
}

/// Leads the fetch of a key on a miss; dropped (once the answer is stored, or
/// found not storable), it wakes the requests waiting for it.
pub struct Fetching {
    store: Arc<Responses>,
    key: String,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        let notify = lock(&self.store.fetching).remove(&self.key);
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responses")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Responses {
    /// Every problem with `section`, as building the store would find them (for
    /// `palisade check`, which builds nothing).
    pub fn validate(section: &CacheSection) -> Result<(), ConfigErrors> {
        Self::builder(section)
            .validate()
            .map_err(|e| e.under("gateway.cache"))
    }

    fn builder(section: &CacheSection) -> palisade_cache::CacheBuilder<Arc<Stored>> {
        let mut builder = Cache::builder("responses")
            .max_weight(section.max_bytes)
            .estimated_items(
                usize::try_from(section.max_bytes / 4096)
                    .unwrap_or(1 << 16)
                    .clamp(64, 1 << 20),
            )
            .weigher(|key, s: &Arc<Stored>| {
                let headers: usize = s.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
                (key.len() + headers + s.body.len() + 64) as u64
            })
            .jitter(0.0)
            .early_refresh(None);
        if let Some(url) = &section.redis {
            let mut redis = RedisOptions::new(url.clone());
            redis.prefix = Some("palisade:responses:".to_owned());
            redis.timeout = section.redis_timeout.get();
            builder = builder.redis(redis);
        }
        builder
    }

    /// The store `section` describes. Must be called inside a tokio runtime when it
    /// names a Redis.
    pub fn build(section: &CacheSection) -> Result<Responses, ConfigErrors> {
        let builder = Self::builder(section);
        let cache = builder.build().map_err(|e| e.under("gateway.cache"))?;
        Ok(Responses {
            cache,
            fetching: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
        })
    }

    /// On a miss of `key`: `Ok` to fetch it (the others wait), or, when another
    /// request is already fetching it, waits up to `patience` for that request's
    /// answer to be stored and returns `Err` (look again).
    pub async fn fetch_or_wait(self: &Arc<Self>, key: &str, patience: Duration) -> Result<Fetching, ()> {
        let notify = match self.lead_or_follow(key) {
            Ok(lead) => return Ok(lead),
            Err(notify) => notify,
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The leader may have finished between the lock and `enable`.
        if lock(&self.fetching)
            .get(key)
            .is_some_and(|n| Arc::ptr_eq(n, &notify))
        {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(patience, notified).await;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        Err(())
    }

    /// How many requests are waiting for another request's fetch of their key.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Leads the fetch of `key` if no request is fetching it (a background
    /// revalidation: one a key at a time).
    pub fn lead(self: &Arc<Self>, key: &str) -> Option<Fetching> {
        self.lead_or_follow(key).ok()
    }

    fn lead_or_follow(self: &Arc<Self>, key: &str) -> Result<Fetching, Arc<Notify>> {
        let mut fetching = lock(&self.fetching);
        match fetching.get(key) {
            Some(n) => Err(n.clone()),
            None => {
                fetching.insert(key.to_owned(), Arc::new(Notify::new()));
                Ok(Fetching {
                    store: self.clone(),
                    key: key.to_owned(),
                })
            }
        }
    }
}

/// How a cached route's answer came about (`x-palisade-cache`, and the
/// `palisade_route_cache_total` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From the store.
    Hit = 0,
    /// From upstream.
    Miss = 1,
    /// From the store, past its freshness (while revalidating, or for a failure).
    Stale = 2,
}

impl Served {
    const ALL: [Served; 3] = [Served::Hit, Served::Miss, Served::Stale];

    /// Its name in the header and the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Stale => "stale",
        }
    }
}

/// A route's caching rules.
#[derive(Debug)]
pub struct RouteCache {
    /// What the cache adds to the answers' own rules.
    pub policy: Policy,
    /// Bodies larger than this are not stored.
    pub max_body: usize,
    /// Whether the query string is part of the key.
    pub key_query: bool,
    /// Request headers whose values are part of the key.
    pub key_headers: Vec<http::HeaderName>,
    /// `palisade_route_cache_total{route, result}`, by [`Served`].
    pub served: [metrics::Counter; 3],
    /// The same, for the dashboard.
    counts: [std::sync::atomic::AtomicU64; 3],
}

impl RouteCache {
    /// Compiles a route's `cache` table (`at`: its path in the file).
    pub(crate) fn compile(
        c: &CacheConfig,
        route: &str,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteCache> {
        let before = p.len();
        if c.max_ttl.get().is_zero() {
            p.push(ConfigError::new(format!("{at}.max_ttl"), "must be more than 0"));
        }
        if c.default_ttl.is_some_and(|d| d.get().is_zero()) {
            p.push(ConfigError::new(
                format!("{at}.default_ttl"),
                "must be more than 0 (leave it out to store only answers that state their freshness)",
            ));
        }
        let max_body = usize::try_from(c.max_body_bytes).ok().filter(|&b| b > 0);
        if max_body.is_none() {
            p.push(ConfigError::new(
                format!("{at}.max_body_bytes"),
                "must be at least 1 (and fit this machine)",
            ));
        }
        let mut key_headers = Vec::new();
        for (i, name) in c.key_headers.iter().enumerate() {
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => key_headers.push(n),
                Err(_) => p.push(ConfigError::new(
                    format!("{at}.key_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                )),
            }
        }
        (p.len() == before).then(|| RouteCache {
            policy: Policy {
                default_ttl: c.default_ttl.map(|d| d.get()),
                max_ttl: c.max_ttl.get(),
                stale_while_revalidate: c.stale_while_revalidate.map_or(Duration::ZERO, |d| d.get()),
                stale_if_error: c.stale_if_error.map_or(Duration::ZERO, |d| d.get()),
            },
            max_body: max_body.unwrap_or(1),
            key_query: c.key_query,
            key_headers,
            served: Served::ALL.map(|how| {
                metrics::counter!("palisade_route_cache_total", "route" => route.to_owned(), "result" => how.as_str())
            }),
            counts: Default::default(),
        })
    }

    /// Counts one answer served `how`.
    pub fn count(&self, how: Served) {
        self.served[how as usize].increment(1);
        self.counts[how as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers so far: hits, misses, stale.
    pub fn served_counts(&self) -> [u64; 3] {
        self.counts.each_ref().map(|c| c.load(Ordering::Relaxed))
    }
}
