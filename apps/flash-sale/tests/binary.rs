//! The `flash-sale` binary: it starts on real Redis and PostgreSQL, or embedded on
//! SQLite files with no server, says where it listens, sells, and stops on
//! SIGTERM; a store it cannot reach is an error that names the option.

mod support;

use std::io::{Read, Write};
use std::process::Command;

use palisade_testkit::unique;
use support::{fresh_db, now_ms};

/// One HTTP/1.1 request on a new connection; the status and the body.
fn http(addr: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Starts the binary with `args`; the child and the address it listens on.
fn spawn(args: &[&str]) -> (std::process::Child, String) {
    let (child, addr) = support::start_binary(args);
    (child, addr.expect("an instance that serves"))
}

/// Stops `child` with SIGTERM; whether it exited cleanly.
fn terminate(mut child: std::process::Child) -> bool {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    killed.success() && child.wait().unwrap().success()
}

/// Opens a sale of `stock` pens, one per user, open for an hour.
fn open_pens(addr: &str, stock: u32) {
    let now = now_ms();
    let sale = format!(
        r#"{{"item":"pen","stock":{stock},"opens_ms":{},"closes_ms":{},"per_user":1}}"#,
        now - 1000,
        now + 3_600_000
    );
    assert_eq!(http(addr, "POST", "/admin/sales", "", &sale).0, 201);
}

/// GETs `path` until `done` takes its JSON (within a minute); what it returned.
fn poll<T>(addr: &str, path: &str, mut done: impl FnMut(&serde_json::Value) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, body) = http(addr, "GET", path, "", "");
        assert_eq!(status, 200, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(out) = done(&body) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never came to it: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The state of `reservation`'s order once it has left `processing`.
fn placed_state(addr: &str, reservation: &str) -> String {
    poll(addr, &format!("/orders/{reservation}"), |body| {
        let state = body["state"].as_str().unwrap_or_default();
        (state != "processing").then(|| state.to_owned())
    })
}

#[test]
fn embedded_it_sells_on_sqlite_with_no_server_and_keeps_its_orders_across_a_restart() {
    let dir = std::env::temp_dir().join(unique("fs-embedded"));
    std::fs::create_dir_all(&dir).unwrap();
    let inventory = format!("sqlite:{}", dir.join("inventory.db").display());
    let orders = format!("sqlite:{}", dir.join("orders.db").display());
    let stores = ["--inventory-db", &inventory, "--orders-db", &orders];
    let (child, addr) = spawn(&stores);
    open_pens(&addr, 3);
    let mut accepted = Vec::new();
    for user in ["ann", "bob", "cy", "dee", "eve"] {
        let buyer = format!("x-user-id: {user}\r\nidempotency-key: k1\r\n");
        let (status, body) = http(&addr, "POST", "/buy", &buyer, r#"{"item":"pen"}"#);
        match status {
            202 => {
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                accepted.push(body["reservation"].as_str().unwrap().to_owned());
            }
            409 => assert!(body.contains("sold_out"), "{body}"),
            _ => panic!("{status} {body}"),
        }
    }
    assert_eq!(accepted.len(), 3, "three pens, three purchases");
    for r in &accepted {
        assert_eq!(placed_state(&addr, r), "pending");
    }
    assert_eq!(
        http(&addr, "POST", &format!("/orders/{}/pay", accepted[0]), "", "").0,
        200
    );
    // The payment wakes its order's saga, which ends now, not at the payment
    // deadline (minutes away): two sagas are left waiting for a payment.
    poll(&addr, "/admin/sales/pen", |view| {
        (view["sagas_open"] == 2).then_some(())
    });
    assert!(terminate(child));

    // The orders are in the files: a new process answers for them.
    let (child, addr) = spawn(&stores);
    assert_eq!(placed_state(&addr, &accepted[0]), "paid");
    assert_eq!(placed_state(&addr, &accepted[1]), "pending");
    // The sale is open again in the new process's gate: sold out, not unknown.
    let (status, body) = http(
        &addr,
        "POST",
        "/buy",
        "x-user-id: fay\r\nidempotency-key: k1\r\n",
        r#"{"item":"pen"}"#,
    );
    assert_eq!(status, 409, "{body}");
    let (_, view) = http(&addr, "GET", "/admin/sales/pen", "", "");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(
        (view["orders"].as_i64(), view["drift"].as_i64()),
        (Some(3), Some(0)),
        "{view}"
    );
    for (name, holds) in view["invariants"].as_object().unwrap() {
        assert_eq!(holds, true, "{name}: {view}");
    }
    assert!(terminate(child));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_naive_design_sells_from_the_database_alone() {
    let dir = std::env::temp_dir().join(unique("fs-naive"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite:{}", dir.join("naive.db").display());
    let (child, addr) = spawn(&["--design", "naive", "--inventory-db", &db]);
    open_pens(&addr, 2);
    let mut statuses = Vec::new();
    for (user, key) in [("ann", "k1"), ("ann", "k1"), ("bob", "k1"), ("cy", "k1")] {
        let buyer = format!("x-user-id: {user}\r\nidempotency-key: {key}\r\n");
        statuses.push(http(&addr, "POST", "/buy", &buyer, r#"{"item":"pen"}"#).0);
    }
    // Ann's repeat buys nothing more; the stock runs out at Cy.
    assert_eq!(statuses, [202, 409, 202, 409]);
    let (_, view) = http(&addr, "GET", "/admin/sales/pen", "", "");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(
        (view["orders"].as_i64(), view["inventory"]["stock"].as_i64()),
        (Some(2), Some(0)),
        "{view}"
    );
    assert!(terminate(child));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_split_role_without_a_shared_gate_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_flash-sale"))
        .args(["--listen", "127.0.0.1:0", "--role", "worker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis"), "{err}");
}

#[test]
fn a_database_url_of_no_known_kind_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_flash-sale"))
        .args(["--listen", "127.0.0.1:0", "--inventory-db", "mysql://127.0.0.1/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--inventory-db") && err.contains("sqlite:"), "{err}");
}

#[tokio::test]
async fn it_starts_sells_and_stops_on_sigterm() {
    let redis = palisade_testkit::env("PALISADE_TEST_REDIS_URL");
    let (inventory, orders) = (fresh_db("fs_bin_inv").await, fresh_db("fs_bin_ord").await);
    let prefix = format!("{}:", unique("fs-bin"));
    let (child, addr) = spawn(&[
        "--redis",
        &redis,
        "--prefix",
        &prefix,
        "--inventory-db",
        &inventory,
        "--orders-db",
        &orders,
    ]);
    open_pens(&addr, 3);
    let buyer = "x-user-id: ann\r\nidempotency-key: k1\r\n";
    let (status, body) = http(&addr, "POST", "/buy", buyer, r#"{"item":"pen"}"#);
    assert_eq!(status, 202, "{body}");
    let (status, view) = http(&addr, "GET", "/admin/sales/pen", "", "");
    assert_eq!(status, 200, "{view}");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["gate"]["stock"], 2, "{view}");
    assert!(terminate(child));
}

#[test]
fn a_store_it_cannot_reach_is_named() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flash-sale"))
        .args(["--listen", "127.0.0.1:0", "--redis", &format!("redis://{closed}")])
        .args([
            "--inventory-db",
            "postgres://nobody@127.0.0.1:1/x",
            "--orders-db",
            "postgres://nobody@127.0.0.1:1/y",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis"), "{err}");
}
