//! `palisade demo`: the gateway with a built-in configuration in front of built-in
//! upstreams on loopback, driven by built-in traffic, printing once a second what the
//! clients saw and what the policies did.
//!
//! Cluster `api` (route `/api`): four endpoints, each with its own breaker:
//! `steady` answers in ~2 ms; `broken` answers 500; `slow` takes 400 ms against a
//! 150 ms per-try timeout; `flapping` alternates 10 s good and 10 s of 503. Retries
//! (budgeted) move failed attempts to another endpoint; outlier detection ejects.
//!
//! Cluster `orders` (route `/orders`): two endpoints in zone A (tier 0) and one in
//! zone B (tier 1). Zone A goes down from second 8 to second 20: health checks see
//! it, traffic fails over to zone B, and fails back 5 s after zone A is healthy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_gateway::Config;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::DemoArgs;

/// How a demo upstream behaves.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Steady,
    Broken,
    Slow,
    Flapping,
    /// Down while the zone-A switch is on.
    ZoneA,
}

struct World {
    started: Instant,
    zone_a_down: AtomicBool,
}

async fn upstream(kind: Behaviour, world: Arc<World>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let world = world.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let world = world.clone();
                    async move { Ok::<_, Infallible>(answer(kind, &world, req.uri().path()).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(kind: Behaviour, world: &World, path: &str) -> Response<Full<Bytes>> {
    let secs = world.started.elapsed().as_secs();
    let failing = match kind {
        Behaviour::Steady | Behaviour::Slow => false,
        Behaviour::Broken => path != "/health",
        Behaviour::Flapping => (secs / 10) % 2 == 1,
        Behaviour::ZoneA => world.zone_a_down.load(Ordering::Relaxed),
    };
    match kind {
        Behaviour::Slow if path != "/health" => tokio::time::sleep(Duration::from_millis(400)).await,
        _ => tokio::time::sleep(Duration::from_millis(2)).await,
    }
    let (status, body) = match (kind, failing) {
        (Behaviour::Broken, true) => (StatusCode::INTERNAL_SERVER_ERROR, "broken"),
        (_, true) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        _ => (StatusCode::OK, "ok"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

fn config(
    opts: &DemoArgs,
    api: &[(SocketAddr, &str)],
    orders: &[(SocketAddr, u8)],
) -> anyhow::Result<Config> {
    let api_eps: Vec<String> = api.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let order_eps: Vec<String> = orders
        .iter()
        .map(|(a, tier)| format!("{{ address = \"{a}\", tier = {tier} }}"))
        .collect();
    let text = format!(
        r#"{head}
[[routes]]
name = "api"
match = {{ path_prefix = "/api" }}
cluster = "api"
timeout = "1s"
per_try_timeout = "150ms"
retry = {{ attempts = 3, retry_on = ["connect-failure", "reset", "timeout", "5xx", "refused"], budget_ratio = 0.5 }}

[[routes]]
name = "orders"
match = {{ path_prefix = "/orders" }}
cluster = "orders"
timeout = "1s"
retry = {{ attempts = 2 }}
fallback = {{ status = 200, body = '{{"orders": [], "degraded": true}}', on = ["no_healthy_endpoint", "circuit_open"] }}

[clusters.api]
endpoints = [{api}]
lb = "peak-ewma"
panic_threshold = 0.25
breaker = {{ consecutive_failures = 5, failure_rate = 0.5, minimum_calls = 10, window = 20, open = "3s", max_open = "20s", half_open_probes = 2, success_threshold = 2, slow_call = "140ms", slow_call_rate = 0.8 }}
outlier = {{ consecutive_5xx = 5, consecutive_gateway_failure = 5, base_ejection_time = "4s", max_ejection_time = "30s", max_ejection_percent = 50 }}
health = {{ path = "/health", interval = "1s", timeout = "250ms", healthy_threshold = 2, unhealthy_threshold = 2 }}

[clusters.orders]
endpoints = [{orders}]
lb = "round-robin"
panic_threshold = 0.0
health = {{ path = "/health", interval = "500ms", timeout = "250ms", healthy_threshold = 2, unhealthy_threshold = 1 }}
failover = {{ healthy_threshold = 0.5, stable_period = "5s" }}
"#,
        head = gateway_head(opts),
        api = api_eps.join(", "),
        orders = order_eps.join(", "),
    );
    Config::from_toml(&text).map_err(|e| anyhow::anyhow!("built-in demo config: {e}"))
}

/// The `[gateway]` table of a demo: `--listen` and `--admin`, or free ports on
/// loopback.
pub(crate) fn gateway_head(opts: &DemoArgs) -> String {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    format!(
        "\n[gateway]\nlisten = \"{}\"\nadmin = \"{}\"\nwatch_config = false\n",
        opts.listen.unwrap_or(any),
        opts.admin.unwrap_or(any)
    )
}

#[derive(Default)]
struct Second {
    total: u64,
    ok: u64,
    fallback: u64,
    upstream_5xx: u64,
    causes: BTreeMap<String, u64>,
    latencies: Vec<f64>,
}

/// Runs the demo until Ctrl-C or `--duration`.
pub async fn run(opts: DemoArgs) -> anyhow::Result<()> {
    let world = Arc::new(World {
        started: Instant::now(),
        zone_a_down: AtomicBool::new(false),
    });
    let mut api = Vec::new();
    for (kind, name) in [
        (Behaviour::Steady, "steady"),
        (Behaviour::Broken, "broken"),
        (Behaviour::Slow, "slow"),
        (Behaviour::Flapping, "flapping"),
    ] {
        api.push((upstream(kind, world.clone()).await?, name));
    }
    let orders = vec![
        (upstream(Behaviour::ZoneA, world.clone()).await?, 0u8),
        (upstream(Behaviour::ZoneA, world.clone()).await?, 0),
        (upstream(Behaviour::Steady, world.clone()).await?, 1),
    ];
    let handle = palisade_gateway::start(config(&opts, &api, &orders)?, None).await?;
    let names: BTreeMap<SocketAddr, String> = api
        .iter()
        .map(|(a, n)| (*a, n.to_string()))
        .chain(orders.iter().enumerate().map(|(i, (a, t))| {
            (
                *a,
                if *t == 0 {
                    format!("zone-a-{}", i + 1)
                } else {
                    "zone-b".to_string()
                },
            )
        }))
        .collect();
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "palisade demo: gateway on http://{}, Ctrl-C to stop\n\
         dashboard: {}\n\
         api: steady, broken (500), slow (400 ms vs 150 ms per try), flapping (10 s on / 10 s off)\n\
         orders: zone A (tier 0) goes down at 8 s and back at 20 s; zone B (tier 1) stands by\n",
        handle.addr,
        handle
            .admin_addr
            .map_or("- (no admin listener)".to_string(), |a| format!(
                "http://{a}/dashboard"
            ))
    );
    let stats = Arc::new(Mutex::new(Second::default()));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut workers = Vec::new();
    for w in 0..16u32 {
        let client = client.clone();
        let stats = stats.clone();
        let base = format!("http://{}", handle.addr);
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let path = if (n + u64::from(w)) % 3 == 0 {
                    "/orders/recent"
                } else {
                    "/api/items"
                };
                let start = Instant::now();
                let req = Request::get(format!("{base}{path}"))
                    .body(Empty::new())
                    .expect("valid request");
                let result = client.request(req).await;
                let ms = start.elapsed().as_secs_f64() * 1e3;
                let mut s = stats.lock().await;
                s.total += 1;
                s.latencies.push(ms);
                match result {
                    Ok(resp) => {
                        let status = resp.status();
                        let cause = resp
                            .headers()
                            .get("x-palisade-cause")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        if resp.headers().contains_key("x-palisade-fallback") {
                            s.fallback += 1;
                        }
                        match cause {
                            Some(c) => *s.causes.entry(c).or_default() += 1,
                            None if status.is_server_error() => s.upstream_5xx += 1,
                            None => s.ok += 1,
                        }
                        drop(s);
                        let _ = resp.into_body().collect().await;
                    }
                    Err(_) => *s.causes.entry("client_error".into()).or_default() += 1,
                }
                // About 100 requests per second per worker at most.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let t = world.started.elapsed().as_secs();
        world.zone_a_down.store((8..20).contains(&t), Ordering::Relaxed);
        let s = std::mem::take(&mut *stats.lock().await);
        let _ = out.write_all(report(t, &s, &handle, &names).as_bytes());
        let _ = out.flush();
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    for w in workers {
        w.abort();
    }
    handle.shutdown().await;
    Ok(())
}

fn report(
    t: u64,
    s: &Second,
    handle: &palisade_gateway::Handle,
    names: &BTreeMap<SocketAddr, String>,
) -> String {
    let mut lat = s.latencies.clone();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let ok_pct = if s.total == 0 {
        0.0
    } else {
        100.0 * s.ok as f64 / s.total as f64
    };
    let causes: Vec<String> = s.causes.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let mut line = format!(
        "t={t:>3}s  {:>5} req/s  ok {ok_pct:5.1}%  fallback {:>3}  upstream-5xx {:>3}  gateway: {}  p50 {:.1} ms  p99 {:.1} ms\n",
        s.total,
        s.fallback,
        s.upstream_5xx,
        if causes.is_empty() {
            "-".to_string()
        } else {
            causes.join(", ")
        },
        q(0.5),
        q(0.99),
    );
    let rt = handle.runtime();
    for name in ["api", "orders"] {
        let Some(up) = rt.clusters.get(name) else { continue };
        let now = up.cluster.clock().now();
        let eps: Vec<String> = up
            .cluster
            .endpoints()
            .iter()
            .map(|e| {
                let mut flags = vec![e.breaker_state().as_str().to_string()];
                if e.is_ejected(now) {
                    flags.push(format!("ejected x{}", e.ejections()));
                }
                if !e.is_healthy() {
                    flags.push("unhealthy".into());
                }
                let n = names
                    .get(&e.addr())
                    .cloned()
                    .unwrap_or_else(|| e.addr().to_string());
                format!("{n}[{}]", flags.join(","))
            })
            .collect();
        let tier = up.cluster.active_tier().map_or("-".into(), |t| t.to_string());
        let panic = if up.cluster.is_panicking() { " PANIC" } else { "" };
        line.push_str(&format!(
            "        {name}: tier {tier}{panic}  {}\n",
            eps.join(" ")
        ));
    }
    line
}
