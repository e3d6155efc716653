//! `palisade demo --sale`: a flash sale with no servers. The flash-sale service
//! runs embedded (its gate in process, its databases SQLite files in a temporary
//! directory) behind the gateway (a per-user limit on `/buy`); built-in buyers,
//! thousands of users, try to buy three items that open a few seconds in; half
//! of the buyers pay, the others' orders are cancelled when their payment window
//! closes and the units are sold again. Once a second it prints what the buyers
//! were answered and each item's stock, reservations and orders; at the end, the
//! invariants.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_flash_sale::run::{Role, Settings, start};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::DemoArgs;

const ITEMS: [&str; 3] = ["phone", "laptop", "camera"];
const STOCK: u32 = 40;
const USERS: u64 = 5_000;
const BUYERS: usize = 16;
/// The sale opens this long after the demo starts.
const OPENS_IN_MS: u64 = 3_000;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A request's status and JSON body.
async fn call(
    c: &HttpClient,
    method: &str,
    url: String,
    headers: &[(&str, String)],
    body: &str,
) -> Option<(u16, Value)> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .ok()?;
    let resp = c.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn gateway_config(opts: &DemoArgs, sale: SocketAddr) -> anyhow::Result<palisade_gateway::Config> {
    let text = format!(
        r#"{}
[[gateway.panels]]
name = "flash sale"
urls = ["http://{sale}/admin/dashboard"]

[[routes]]
name = "buy"
match = {{ path = "/buy", methods = ["POST"] }}
cluster = "sale"
timeout = "2s"
rate_limit = {{ requests = 2, per = "1s", burst = 3, key = "header:x-user-id", max_keys = 100000 }}

[clusters.sale]
endpoints = ["{sale}"]
"#,
        crate::demo::gateway_head(opts)
    );
    palisade_gateway::Config::from_toml(&text).map_err(|e| anyhow::anyhow!("built-in demo config: {e}"))
}

/// What the buyers were answered this second, by cause.
type Answers = Arc<Mutex<BTreeMap<String, u64>>>;

/// A buyer: random users attempt a purchase through the gateway; even users
/// pay for what they get.
async fn buyer(c: HttpClient, gateway: SocketAddr, sale: SocketAddr, answers: Answers) {
    let mut n = 0u64;
    loop {
        n += 1;
        let user = fastrand::u64(..USERS);
        let item = ITEMS[fastrand::usize(..ITEMS.len())];
        let headers = [
            ("x-user-id", format!("u{user}")),
            ("idempotency-key", format!("k{n}-{}", fastrand::u32(..))),
        ];
        let body = format!(r#"{{"item":"{item}"}}"#);
        let answer = call(&c, "POST", format!("http://{gateway}/buy"), &headers, &body).await;
        let cause = match &answer {
            Some((202, _)) => "accepted".to_owned(),
            Some((_, v)) => v["error"].as_str().unwrap_or("other").to_owned(),
            None => "no answer".to_owned(),
        };
        *answers.lock().await.entry(cause).or_default() += 1;
        if let (Some((202, v)), true) = (&answer, user % 2 == 0) {
            let reservation = v["reservation"].as_str().unwrap_or_default().to_owned();
            tokio::spawn(pay(c.clone(), sale, reservation));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Pays for `reservation`'s order once it is placed.
async fn pay(c: HttpClient, sale: SocketAddr, reservation: String) {
    for _ in 0..50 {
        match call(&c, "GET", format!("http://{sale}/orders/{reservation}"), &[], "").await {
            Some((200, v)) if v["state"] == "pending" => {
                let _ = call(
                    &c,
                    "POST",
                    format!("http://{sale}/orders/{reservation}/pay"),
                    &[],
                    "",
                )
                .await;
                return;
            }
            Some((200, v)) if v["state"] != "processing" => return,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Each item's admin view.
async fn views(c: &HttpClient, sale: SocketAddr) -> Vec<Value> {
    let mut out = Vec::new();
    for item in ITEMS {
        if let Some((200, v)) = call(c, "GET", format!("http://{sale}/admin/sales/{item}"), &[], "").await {
            out.push(v);
        }
    }
    out
}

/// Runs the sale demo until Ctrl-C or `--duration`.
pub async fn run(opts: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("palisade-sale-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = |name: &str| format!("sqlite:{}", dir.join(name).display());
    let settings = Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis: None,
        prefix: "demo:".into(),
        inventory_db: db("inventory.db"),
        orders_db: db("orders.db"),
        reservation_ttl: Duration::from_secs(10),
        pay_within: Duration::from_secs(4),
        workers: 4,
        sweep_every: Duration::from_secs(1),
        reconcile_every: Duration::from_secs(2),
        role: Role::All,
        lease: Duration::from_secs(5),
    };
    let service = start(settings)
        .await
        .map_err(|e| anyhow::anyhow!("the flash-sale service: {e}"))?;
    let sale = service
        .addr
        .ok_or_else(|| anyhow::anyhow!("the flash-sale service does not listen"))?;
    let handle = palisade_gateway::start(gateway_config(&opts, sale)?, None).await?;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let opens = now_ms() + OPENS_IN_MS;
    for item in ITEMS {
        let setup = format!(
            r#"{{"item":"{item}","stock":{STOCK},"opens_ms":{opens},"closes_ms":{},"per_user":1}}"#,
            opens + 3_600_000
        );
        match call(&c, "POST", format!("http://{sale}/admin/sales"), &[], &setup).await {
            Some((201, _)) => {}
            other => anyhow::bail!("the sale of {item} could not be opened: {other:?}"),
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "palisade demo --sale: gateway on http://{}, the flash-sale service on http://{sale}, Ctrl-C to stop\n\
         dashboard: {}\n\
         {} items x {STOCK} units, one per user, opening in {} s; {USERS} users; even users pay within 4 s, \
         the others' orders are cancelled and their units sold again\n",
        handle.addr,
        handle
            .admin_addr
            .map_or("- (no admin listener)".to_owned(), |a| format!(
                "http://{a}/dashboard"
            )),
        ITEMS.len(),
        OPENS_IN_MS / 1000
    );
    let answers: Answers = Arc::default();
    let buyers: Vec<_> = (0..BUYERS)
        .map(|_| tokio::spawn(buyer(c.clone(), handle.addr, sale, answers.clone())))
        .collect();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut t = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        t += 1;
        let seen = std::mem::take(&mut *answers.lock().await);
        let _ = out.write_all(second(t, &seen, &views(&c, sale).await).as_bytes());
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    for b in buyers {
        b.abort();
    }
    let _ = out.write_all(verdict(&views(&c, sale).await).as_bytes());
    handle.shutdown().await;
    service.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One second's line: the answers by cause, then each item.
fn second(t: u64, seen: &BTreeMap<String, u64>, views: &[Value]) -> String {
    let total: u64 = seen.values().sum();
    let causes: Vec<String> = seen.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let mut line = format!("t={t:>3}s  {total:>5} attempts  {}\n", causes.join(", "));
    for v in views {
        line.push_str(&format!(
            "        {:<7} stock {:>3}  reserved {:>3}  orders {:>3}  drift {}\n",
            v["item"].as_str().unwrap_or("?"),
            v["gate"]["stock"],
            v["gate"]["reservations"],
            v["orders"],
            v["drift"],
        ));
    }
    line
}

/// The invariants of every item at the end.
fn verdict(views: &[Value]) -> String {
    let mut out = String::from("\n");
    let mut all = views.len() == ITEMS.len();
    for v in views {
        let broken: Vec<&str> = v["invariants"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, ok)| **ok != true)
                    .map(|(k, _)| k.as_str())
                    .collect()
            })
            .unwrap_or_default();
        // Orders on their way may not be counted yet: the two that wait for them.
        let broken: Vec<&str> = broken
            .into_iter()
            .filter(|k| !matches!(*k, "settled" | "orders_equal_sold"))
            .collect();
        all &= broken.is_empty();
        out.push_str(&format!(
            "{}: {} orders of {} units; {}\n",
            v["item"].as_str().unwrap_or("?"),
            v["orders"],
            v["inventory"]["initial"],
            if broken.is_empty() {
                "never oversold, nobody over the limit, every unit accounted for".to_owned()
            } else {
                format!("BROKEN: {}", broken.join(", "))
            }
        ));
    }
    out.push_str(if all {
        "invariants hold\n"
    } else {
        "INVARIANTS BROKEN\n"
    });
    out
}
