//! Fault runs: a sale on real processes (two instances, or an API instance and two
//! workers) over real Redis and PostgreSQL, hundreds of buyers at `POST /buy`
//! while a fault strikes mid-sale: the gate's Redis killed and started again
//! empty, PostgreSQL stopped and started, an instance killed with SIGKILL, a
//! worker killed with SIGKILL. Buyers retry with the same key as a client would.
//! Once the sale settles, in every run: the live orders are the units gone from
//! the inventory, never more than its stock; no user holds more than the limit;
//! the gate agrees with the inventory; every accepted purchase ended (an order,
//! or failed with why) and every payment taken is still an order paid.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use support::{fresh_db, now_ms};

const ITEM: &str = "phone";
const STOCK: u32 = 30;
const PER_USER: u32 = 2;
const USERS: usize = 160;
/// Purchases each buyer tries (keys `k0`, `k1`, ...): more than the limit.
const KEYS_PER_USER: usize = 3;
const CONCURRENCY: usize = 24;
/// The fault strikes once this many purchases were accepted: mid-sale, with
/// orders on their way.
const FAULT_AFTER: usize = 10;
/// Tries of one purchase (the same key) before the buyer gives it up.
const TRIES: usize = 400;
const SETTLE_SECS: u64 = 40;

/// One of the service's processes.
struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
}

impl Proc {
    /// Starts `flash-sale` with `args`.
    fn start(args: &[String]) -> Proc {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, addr) = support::start_binary(&args);
        Proc {
            child,
            addr: addr.map(|a| a.parse().unwrap()),
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis of the test's own (no persistence: a restart starts it empty).
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        let bin = std::env::var("PALISADE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server could not be started");
        let redis = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server never listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a run's processes connect.
struct Stores {
    redis: String,
    prefix: String,
    inventory: String,
    orders: String,
}

impl Stores {
    async fn new(redis: String) -> Stores {
        Stores {
            redis,
            prefix: format!("fs-fault-{}-{}:", std::process::id(), fastrand::u64(..)),
            inventory: fresh_db("fs_fault_inv").await,
            orders: fresh_db("fs_fault_ord").await,
        }
    }

    /// A process of `role`: short reservations, payment windows and leases, so
    /// a run settles in seconds.
    fn start(&self, role: &str) -> Proc {
        let args: Vec<String> = [
            ("--redis", self.redis.as_str()),
            ("--prefix", &self.prefix),
            ("--inventory-db", &self.inventory),
            ("--orders-db", &self.orders),
            ("--role", role),
            ("--reservation-ttl-secs", "3"),
            ("--pay-within-secs", "2"),
            ("--lease-secs", "2"),
            ("--reconcile-every-secs", "1"),
            ("--workers", "8"),
        ]
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect();
        Proc::start(&args)
    }
}

/// One HTTP/1.1 request on a new connection, within 10 s: the status and the
/// JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<(u16, Value)> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange).await??;
    let out = String::from_utf8_lossy(&out);
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// What the buyers saw.
#[derive(Default)]
struct Ledger {
    accepted: Mutex<Vec<String>>,
    paid: Mutex<Vec<String>>,
    answers: Mutex<BTreeMap<u16, u64>>,
}

impl Ledger {
    /// Records an accepted purchase; how many there are.
    fn accept(&self, reservation: &str) -> usize {
        let mut accepted = self.accepted.lock().unwrap();
        accepted.push(reservation.to_owned());
        accepted.len()
    }

    fn saw(&self, status: u16) {
        *self.answers.lock().unwrap().entry(status).or_default() += 1;
    }
}

/// Buyer `user`: tries its purchases one after another, each with its own key,
/// again (the same key, the next instance) after a 503 or a failed connection;
/// pays for its orders when `user` is even.
async fn buyer(user: usize, addrs: &[SocketAddr], ledger: &Ledger, fault: &Notify) {
    let buy = format!(r#"{{"item":"{ITEM}"}}"#);
    for key in 0..KEYS_PER_USER {
        let headers = format!("x-user-id: u{user}\r\nidempotency-key: k{key}\r\n");
        for attempt in 0..TRIES {
            let addr = addrs[(user + attempt) % addrs.len()];
            let answer = http(addr, "POST", "/buy", &headers, &buy).await;
            ledger.saw(answer.as_ref().map_or(0, |(s, _)| *s));
            match answer {
                Ok((202, body)) => {
                    let reservation = body["reservation"].as_str().unwrap().to_owned();
                    if ledger.accept(&reservation) == FAULT_AFTER {
                        fault.notify_one();
                    }
                    if user % 2 == 0 {
                        pay(addrs, &reservation, ledger).await;
                    }
                    break;
                }
                // Sold out, over the limit, outside the window: this purchase is over.
                Ok((409 | 429 | 403 | 410, _)) => break,
                // Unavailable (the fault), or no answer: the same purchase again.
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }
}

/// Pays for `reservation`'s order once it is placed (if it is still pending).
async fn pay(addrs: &[SocketAddr], reservation: &str, ledger: &Ledger) {
    for attempt in 0..TRIES {
        let addr = addrs[attempt % addrs.len()];
        match http(addr, "GET", &format!("/orders/{reservation}"), "", "").await {
            Ok((200, v)) if v["state"] == "pending" => {
                match http(addr, "POST", &format!("/orders/{reservation}/pay"), "", "").await {
                    Ok((200, _)) => {
                        ledger.paid.lock().unwrap().push(reservation.to_owned());
                        return;
                    }
                    // Cancelled first: the payment window closed.
                    Ok((409, _)) => return,
                    _ => {}
                }
            }
            // Paid: a payment whose answer was lost on the way went through.
            Ok((200, v)) if v["state"] == "paid" => {
                ledger.paid.lock().unwrap().push(reservation.to_owned());
                return;
            }
            Ok((200, v)) if v["state"] != "processing" => return,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Opens the sale through `addr`.
async fn open_sale(addr: SocketAddr) {
    let now = now_ms();
    let sale = format!(
        r#"{{"item":"{ITEM}","stock":{STOCK},"opens_ms":{},"closes_ms":{},"per_user":{PER_USER}}}"#,
        now - 1000,
        now + 3_600_000
    );
    let (status, body) = http(addr, "POST", "/admin/sales", "", &sale).await.unwrap();
    assert_eq!(status, 201, "{body}");
}

/// Runs the buyers against `addrs`, calling `fault` once `FAULT_AFTER`
/// purchases were accepted; what they saw.
async fn sale(addrs: Vec<SocketAddr>, fault: impl AsyncFnOnce()) -> Arc<Ledger> {
    let ledger = Arc::new(Ledger::default());
    let strike = Arc::new(Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let addrs: Arc<[SocketAddr]> = addrs.into();
    let mut buyers = tokio::task::JoinSet::new();
    for user in 0..USERS {
        let (ledger, strike, gate, addrs) = (ledger.clone(), strike.clone(), gate.clone(), addrs.clone());
        buyers.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            buyer(user, &addrs, &ledger, &strike).await;
        });
    }
    strike.notified().await;
    fault().await;
    while let Some(done) = buyers.join_next().await {
        done.unwrap();
    }
    ledger
}

/// Waits (within two minutes) for the sale to settle at `addr`: no saga open, no
/// live reservation, and the gate reconciled with the inventory; the admin view
/// then.
async fn settled(addr: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(SETTLE_SECS);
    loop {
        let view = http(addr, "GET", &format!("/admin/sales/{ITEM}"), "", "").await;
        if let Ok((200, v)) = &view
            && v["sagas_open"] == 0
            && v["gate"]["reservations"] == 0
            && v["drift"] == 0
        {
            return v.clone();
        }
        assert!(Instant::now() < deadline, "the sale never settled: {view:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The invariants, once the sale at `addr` settled, and every purchase in
/// `ledger` accounted for.
async fn check(addr: SocketAddr, ledger: &Ledger) {
    let view = settled(addr).await;
    let answers = ledger.answers.lock().unwrap().clone();
    for (name, holds) in view["invariants"].as_object().unwrap() {
        assert_eq!(
            holds, true,
            "{name} does not hold: {view:#}\nanswers: {answers:?}"
        );
    }
    let orders = view["orders"].as_i64().unwrap();
    assert!(orders <= i64::from(STOCK), "{view:#}");
    let accepted = ledger.accepted.lock().unwrap().clone();
    let paid: std::collections::HashSet<String> = ledger.paid.lock().unwrap().iter().cloned().collect();
    assert!(!paid.is_empty(), "no payment was taken: {answers:?}");
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for r in &accepted {
        let (status, v) = http(addr, "GET", &format!("/orders/{r}"), "", "").await.unwrap();
        assert_eq!(status, 200, "{r}: {v}");
        let state = v["state"].as_str().unwrap_or_default().to_owned();
        assert!(
            ["paid", "cancelled", "failed"].contains(&state.as_str()),
            "accepted purchase {r} ended {v}"
        );
        if paid.contains(r) {
            assert_eq!(state, "paid", "{r} was paid for and is {v}");
        }
        *ends.entry(state).or_default() += 1;
    }
    assert_eq!(
        ends.get("paid").copied().unwrap_or(0),
        paid.len(),
        "{ends:?} {answers:?}"
    );
    assert_eq!(
        i64::try_from(paid.len()).unwrap(),
        orders,
        "the live orders are the paid ones once every unpaid one was cancelled: {view:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_sale_loses_nothing_and_oversells_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Redis::start(port).await;
    let stores = Stores::new(redis.url()).await;
    let (a, b) = (stores.start("all"), stores.start("all"));
    let addrs = vec![a.addr.unwrap(), b.addr.unwrap()];
    open_sale(addrs[0]).await;
    let ledger = sale(addrs.clone(), async || {
        redis.kill();
        redis = Redis::start(port).await;
    })
    .await;
    check(addrs[0], &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_sale_loses_nothing_and_oversells_nothing() {
    let stores = Stores::new(shared_redis()).await;
    let (a, mut b) = (stores.start("all"), stores.start("all"));
    let addrs = vec![a.addr.unwrap(), b.addr.unwrap()];
    open_sale(addrs[0]).await;
    let ledger = sale(addrs.clone(), async || b.kill()).await;
    check(addrs[0], &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_sale_loses_nothing_and_oversells_nothing() {
    let stores = Stores::new(shared_redis()).await;
    let api = stores.start("api");
    let (mut w1, _w2) = (stores.start("worker"), stores.start("worker"));
    let addrs = vec![api.addr.unwrap()];
    open_sale(addrs[0]).await;
    let ledger = sale(addrs.clone(), async || w1.kill()).await;
    check(addrs[0], &ledger).await;
}

/// Stops and starts the run's PostgreSQL (`PALISADE_TEST_PG_CTL`, from
/// scripts/services.sh): run alone, as every test named `postgres_restart`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_sale_loses_nothing_and_oversells_nothing() {
    let stores = Stores::new(shared_redis()).await;
    let (a, b) = (stores.start("all"), stores.start("all"));
    let addrs = vec![a.addr.unwrap(), b.addr.unwrap()];
    open_sale(addrs[0]).await;
    let ledger = sale(addrs.clone(), async || {
        palisade_testkit::postgres_ctl("-m immediate stop").await;
        palisade_testkit::postgres_ctl("start").await;
    })
    .await;
    check(addrs[0], &ledger).await;
}

fn shared_redis() -> String {
    palisade_testkit::env("PALISADE_TEST_REDIS_URL")
}
