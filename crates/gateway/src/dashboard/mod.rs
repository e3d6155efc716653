//! The live dashboard the admin listener serves at `/dashboard`: one page written
//! by hand (no build step, no packages), fed by Server-Sent Events.
//!
//! A sampler reads the running gateway once a second: each route's answers per
//! second, error rate, refusals and p50/p99 (from [`crate::totals`]), each
//! cluster's serving tier and endpoints (breaker, health, ejection, in flight),
//! the response cache's hits by level, the queue's depth, and the lag of the
//! replicas this process's data routers read from, and the services' own panels
//! (`[[gateway.panels]]`: their counters as rates, their gauges and a table). It
//! keeps the last
//! five minutes, so a page opened late still draws them, and notes breaker, tier
//! and ejection changes as events the page marks on its charts. A page's stream
//! that cannot keep up skips samples rather than holding the sampler.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::runtime::Runtime;
use crate::totals::Counts;

mod panels;
mod stream;

pub use panels::{MAX_FIGURES, MAX_ROWS, Panel};
pub use stream::EventStream;

/// The page.
pub const PAGE: &str = include_str!("index.html");
/// The page's script.
pub const SCRIPT: &str = include_str!("app.js");

/// Samples kept: five minutes at one a second.
const KEPT: usize = 300;
/// Events kept.
const EVENTS_KEPT: usize = 200;
/// Samples a slow page may fall behind by before it misses some.
const PAGE_BACKLOG: usize = 8;
/// The queue's depth is read from its database this often (in samples).
const QUEUE_EVERY: u64 = 5;

/// The dashboard's state, shared by the sampler and the admin listener; one for
/// the gateway's life (reloads keep it).
pub struct Dashboard {
    started: SystemTime,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Samples as SSE messages, oldest first.
    samples: VecDeque<Bytes>,
    /// Pages watching.
    pages: Vec<mpsc::Sender<Bytes>>,
    /// The latest sample, as JSON (`/dashboard/state`).
    latest: Option<Value>,
    /// Events, oldest first.
    events: VecDeque<Value>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            started: SystemTime::now(),
            inner: Mutex::default(),
        }
    }
}

impl Dashboard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Seconds since the gateway started.
    pub fn uptime(&self) -> u64 {
        self.started.elapsed().map_or(0, |d| d.as_secs())
    }

    /// A page's stream: the samples kept, then each new one.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(PAGE_BACKLOG);
        let mut inner = self.lock();
        let history: Vec<u8> = inner.samples.iter().flat_map(|s| s.iter().copied()).collect();
        inner.pages.push(tx);
        EventStream::new(Bytes::from(history), rx)
    }

    /// The latest sample and the events kept, as JSON.
    pub fn state(&self) -> Value {
        let inner = self.lock();
        json!({
            "uptime_s": self.uptime(),
            "sample": inner.latest,
            "events": inner.events,
        })
    }

    /// Keeps `sample` and sends it to every page; pages gone are dropped.
    fn publish(&self, sample: Value, events: Vec<Value>) {
        let message = Bytes::from(format!("data: {sample}\n\n"));
        let mut inner = self.lock();
        if inner.samples.len() == KEPT {
            inner.samples.pop_front();
        }
        inner.samples.push_back(message.clone());
        inner.latest = Some(sample);
        for e in events {
            if inner.events.len() == EVENTS_KEPT {
                inner.events.pop_front();
            }
            inner.events.push_back(e);
        }
        inner.pages.retain(|page| match page.try_send(message.clone()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Ends every page's stream (at shutdown).
    fn close(&self) {
        self.lock().pages.clear();
    }
}

/// What the sampler remembers from one sample to the next.
#[derive(Default)]
struct Previous {
    routes: HashMap<String, Counts>,
    /// Breaker state, ejected, by cluster and endpoint.
    endpoints: HashMap<(String, String), (String, bool)>,
    tiers: HashMap<String, Option<u8>>,
    queue: Option<Value>,
    replicas: Option<Value>,
    panels: panels::Panels,
}

/// Samples the gateway once a second until `stop`.
pub async fn run(
    dash: Arc<Dashboard>,
    runtime: Arc<ArcSwap<Runtime>>,
    metrics: Option<PrometheusHandle>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev = Previous::default();
    let mut last = tokio::time::Instant::now();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let now = tokio::time::Instant::now();
        let secs = (now - last).as_secs_f64().max(1e-3);
        last = now;
        let rt = runtime.load_full();
        if n % QUEUE_EVERY == 0 {
            prev.queue = queue_json(&rt).await;
            prev.replicas = metrics.as_ref().map(|m| replicas_json(&m.render()));
        }
        n += 1;
        let services = prev.panels.sample(&rt.panels, secs).await;
        let (mut sample, events) = sample(&rt, &mut prev, secs);
        sample["uptime_s"] = Value::from(dash.uptime());
        sample["panels"] = Value::from(services);
        dash.publish(sample, events);
    }
    dash.close();
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One sample of `rt`, `secs` after the previous one, and the events since.
fn sample(rt: &Runtime, prev: &mut Previous, secs: f64) -> (Value, Vec<Value>) {
    let t = unix_ms();
    let mut events = Vec::new();
    let routes: Vec<Value> = rt
        .routes
        .iter()
        .map(|r| {
            let counts = r.metrics.totals.counts();
            let d = counts.since(prev.routes.get(&r.name).unwrap_or(&Counts::default()));
            prev.routes.insert(r.name.clone(), counts);
            let rate = |n: u64| n as f64 / secs;
            let ms = |q| d.quantile_us(q).map(|us| us / 1e3);
            json!({
                "name": r.name,
                "cluster": r.upstream.as_ref().map(|u| u.name.as_str()),
                "answered": d.answered,
                "server_errors": d.server_errors,
                "rps": rate(d.answered),
                "error_rate": if d.answered == 0 { 0.0 } else { d.server_errors as f64 / d.answered as f64 },
                "refused_per_s": rate(d.refused),
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "cache": r.cache.as_ref().map(|c| c.served_counts()),
            })
        })
        .collect();
    let mut clusters: Vec<Value> = Vec::new();
    for (name, up) in &rt.clusters {
        let mut cluster = crate::admin::cluster_json(up);
        let tier = up.cluster.active_tier();
        if let Some(before) = prev.tiers.insert(name.clone(), tier)
            && before != tier
        {
            events.push(json!({"t": t, "kind": "tier", "cluster": name, "from": before, "to": tier}));
        }
        for ep in cluster["endpoints"].as_array().into_iter().flatten() {
            let addr = ep["address"].as_str().unwrap_or_default().to_owned();
            let state = ep["breaker"].as_str().unwrap_or_default().to_owned();
            let ejected = ep["ejected"].as_bool().unwrap_or(false);
            let key = (name.clone(), addr.clone());
            if let Some((was, was_ejected)) = prev.endpoints.insert(key, (state.clone(), ejected)) {
                if was != state {
                    events.push(json!({"t": t, "kind": "breaker", "cluster": name, "endpoint": addr, "from": was, "to": state}));
                }
                if was_ejected != ejected {
                    let kind = if ejected { "ejected" } else { "returned" };
                    events.push(json!({"t": t, "kind": kind, "cluster": name, "endpoint": addr}));
                }
            }
        }
        cluster["name"] = Value::from(name.as_str());
        clusters.push(cluster);
    }
    let cache = rt.responses.as_ref().map(|store| {
        let served = (rt.routes.iter().filter_map(|r| r.cache.as_ref()))
            .map(crate::responses::RouteCache::served_counts)
            .fold([0; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
        cache_json(&store.cache.stats(), served)
    });
    let sample = json!({
        "t": t,
        "routes": routes,
        "clusters": clusters,
        "events": events,
        "cache": cache,
        "queue": prev.queue,
        "replicas": prev.replicas.as_ref().filter(|r| r.as_array().is_some_and(|a| !a.is_empty())),
    });
    (sample, events)
}

/// The response cache's answers by level: from memory (L1), from Redis (L2),
/// from upstream; `served` is the routes' hits, misses and stale answers.
fn cache_json(stats: &palisade_cache::CacheStats, [hits, misses, stale]: [u64; 3]) -> Value {
    let from_store = hits + stale;
    let l2 = stats.l2_hits.min(from_store);
    let lookups = from_store + misses;
    let ratio = |n: u64| {
        if lookups == 0 {
            0.0
        } else {
            n as f64 / lookups as f64
        }
    };
    json!({
        "lookups": lookups,
        "l1_hits": from_store - l2,
        "l2_hits": l2,
        "misses": misses,
        "stale": stale,
        "l1_ratio": ratio(from_store - l2),
        "l2_ratio": ratio(l2),
    })
}

/// The replicas' lag this process's data routers report
/// (`palisade_data_replica_lag_seconds{set, replica}` in its metrics), for a
/// service that routes its reads through `palisade-data` beside the gateway.
fn replicas_json(metrics: &str) -> Value {
    const NAME: &str = "palisade_data_replica_lag_seconds{";
    let label = |labels: &str, key: &str| -> Option<String> {
        let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
        let end = labels[start..].find('"')? + start;
        Some(labels[start..end].to_owned())
    };
    let rows: Vec<Value> = (metrics.lines())
        .filter_map(|line| {
            let rest = line.strip_prefix(NAME)?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let lag: f64 = value.trim().parse().ok()?;
            Some(json!({"set": label(labels, "set")?, "replica": label(labels, "replica")?, "lag_s": lag}))
        })
        .collect();
    Value::from(rows)
}

/// Each queue's jobs by state and its oldest wait, or why they could not be read.
async fn queue_json(rt: &Runtime) -> Option<Value> {
    let queue = rt.queue.get()?;
    let read = tokio::time::timeout(Duration::from_secs(1), queue.stats()).await;
    Some(match read {
        Ok(Ok(stats)) => Value::from(
            stats
                .iter()
                .map(|q| {
                    let by_state: serde_json::Map<String, Value> = palisade_queue::JobState::ALL
                        .iter()
                        .map(|s| (s.as_str().to_owned(), Value::from(q.counts[s.code() as usize])))
                        .collect();
                    json!({"queue": q.queue, "jobs": by_state, "oldest_wait_ms": q.oldest_wait_ms})
                })
                .collect::<Vec<_>>(),
        ),
        Ok(Err(e)) => json!({"error": e.to_string()}),
        Err(_) => json!({"error": "the queue's database did not answer within 1 s"}),
    })
}
