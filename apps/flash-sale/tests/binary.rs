//! The `flash-sale` binary: it starts on real Redis and PostgreSQL, says where it
//! listens, sells, and stops on SIGTERM; a store it cannot reach is an error that
//! names the option.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

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

#[tokio::test]
async fn it_starts_sells_and_stops_on_sigterm() {
    let redis = std::env::var("PALISADE_TEST_REDIS_URL").expect("PALISADE_TEST_REDIS_URL: run scripts/test");
    let (inventory, orders) = (fresh_db("fs_bin_inv").await, fresh_db("fs_bin_ord").await);
    let prefix = format!("fs-bin-{}-{}:", std::process::id(), fastrand::u64(..));
    let mut child = Command::new(env!("CARGO_BIN_EXE_flash-sale"))
        .args(["--listen", "127.0.0.1:0", "--redis", &redis, "--prefix", &prefix])
        .args(["--inventory-db", &inventory, "--orders-db", &orders])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("no line").unwrap();
    let addr = line
        .strip_prefix("flash-sale: listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();

    let now = now_ms();
    let sale = format!(
        r#"{{"item":"pen","stock":3,"opens_ms":{},"closes_ms":{},"per_user":1}}"#,
        now - 1000,
        now + 3_600_000
    );
    assert_eq!(http(&addr, "POST", "/admin/sales", "", &sale).0, 201);
    let buyer = "x-user-id: ann\r\nidempotency-key: k1\r\n";
    let (status, body) = http(&addr, "POST", "/buy", buyer, r#"{"item":"pen"}"#);
    assert_eq!(status, 202, "{body}");
    let (status, view) = http(&addr, "GET", "/admin/sales/pen", "", "");
    assert_eq!(status, 200, "{view}");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["gate"]["stock"], 2, "{view}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
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
