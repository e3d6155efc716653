//! Online resharding under a steady write load, with the resharder a real
//! process killed (SIGKILL) mid-copy and started again. Uses the shard servers,
//! one of which a shard test stops: nextest runs these in the `shards` group.

#![allow(clippy::print_stdout)] // the resharder process reports over stdout

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_core::config::Dur;
use palisade_data::{
    DataError, Layout, Phase, Placement, ReshardPlan, Resharder, ShardConfig, Shards, ShardsConfig, TableKey,
};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const KEYS: i64 = 2_000;

fn config(control: &str, urls: &[String; 3]) -> ShardsConfig {
    ShardsConfig {
        name: "accounts".into(),
        placement: Placement::Ring,
        shards: ["a", "b", "c"]
            .iter()
            .zip(urls)
            .map(|(n, u)| ShardConfig {
                name: n.to_string(),
                url: u.clone(),
            })
            .collect(),
        owners: vec!["a".into(), "b".into()],
        control: Some(control.to_string()),
        refresh: Dur(Duration::from_millis(100)),
        ..ShardsConfig::default()
    }
}

fn plan() -> ReshardPlan {
    let mut plan = ReshardPlan::new(
        Layout {
            placement: Placement::Ring,
            vnodes: 150,
            shards: vec!["a".into(), "b".into(), "c".into()],
            ranges: Vec::new(),
        },
        vec![TableKey {
            table: "kv".into(),
            key: "k".into(),
        }],
    );
    plan.batch = 100;
    plan.lease = Duration::from_secs(1);
    plan
}

/// The resharder process: moves set `accounts` (its URLs in the environment) to
/// three shards, printing `copied N` after each copy batch and `done` at the end;
/// with `RESHARD_STALL_AT=N` it stops for good once N rows are copied. Not a test
/// on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the resharding test as its resharder process"]
async fn resharder_process() {
    let Ok(control) = std::env::var("RESHARD_CONTROL") else {
        return;
    };
    let urls: Vec<String> = std::env::var("RESHARD_SHARDS")
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let urls: [String; 3] = urls.try_into().unwrap();
    let stall_at: Option<u64> = std::env::var("RESHARD_STALL_AT").ok().map(|n| n.parse().unwrap());
    let shards = Shards::connect(&config(&control, &urls)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let resharder = loop {
        match Resharder::begin(&shards, plan()).await {
            Ok(r) => break r,
            // The killed resharder's lease has not run out yet.
            Err(DataError::LeaseHeld { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    println!("started");
    resharder
        .run(|phase, p| {
            if phase == Phase::Copy {
                println!("copied {}", p.copied);
                // The first resharder stops here, mid-copy, to be killed.
                if stall_at.is_some_and(|n| p.copied >= n) {
                    loop {
                        std::thread::park();
                    }
                }
            }
        })
        .await
        .unwrap();
    println!("done");
}

fn spawn_resharder(control: &str, urls: &[String; 3], stall_at: Option<u64>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if let Some(n) = stall_at {
        command.env("RESHARD_STALL_AT", n.to_string());
    }
    command
        .args([
            "--exact",
            "resharder_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RESHARD_CONTROL", control)
        .env("RESHARD_SHARDS", urls.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads the child's lines until one satisfies `done`.
async fn until(
    child: &mut Child,
    done: impl Fn(&str) -> bool,
) -> tokio::io::Lines<BufReader<tokio::process::ChildStdout>> {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the resharder exited early");
        if done(&line) {
            return lines;
        }
    }
}

/// The statement a write of key `k` runs.
#[derive(Clone, Copy)]
enum Op {
    /// Seeds the key at zero.
    Seed,
    /// Adds one.
    Increment,
    /// Creates the key at one.
    Insert,
}

fn write(k: i64, op: Op) -> impl for<'c> Fn(&'c mut sqlx::PgConnection) -> palisade_data::Tx<'c, u64> {
    move |conn| {
        let sql = match op {
            Op::Seed => "INSERT INTO kv VALUES ($1, 0)",
            Op::Increment => "UPDATE kv SET v = v + 1 WHERE k = $1",
            Op::Insert => "INSERT INTO kv VALUES ($1, 1) ON CONFLICT (k) DO NOTHING",
        };
        Box::pin(async move {
            Ok(sqlx::query(sql)
                .bind(k)
                .execute(&mut *conn)
                .await?
                .rows_affected())
        })
    }
}

/// Writes until `stop`: increments of the seeded keys and inserts of new ones,
/// each retried while its key is frozen; every acknowledged write counted by key.
async fn writer(
    shards: Shards,
    task: i64,
    acked: Arc<Mutex<HashMap<i64, i64>>>,
    writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (k, op) = if n % 10 == 0 {
            (100_000 * (task + 1) + n, Op::Insert)
        } else {
            (fastrand::i64(0..KEYS), Op::Increment)
        };
        loop {
            match shards.write(k.to_string().as_bytes(), write(k, op)).await {
                Ok(rows) => {
                    if rows != 1 {
                        let routes = shards.shard_for(k.to_string().as_bytes());
                        panic!(
                            "key {k}: the write found no row (reads go to {routes}; {:?})",
                            shards
                        );
                    }
                    *acked.lock().unwrap().entry(k).or_insert(0) += 1;
                    writes.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(DataError::Resharding { .. }) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("write of {k}: {e}"),
            }
        }
    }
}

async fn wait_for(ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A control database and three shard databases with a `kv` table, and the set
/// on its first two shards with every seeded key at zero.
async fn seeded() -> (String, [String; 3], Shards) {
    let control = fresh_db(&std::env::var("PALISADE_TEST_POSTGRES_URL").unwrap(), "control").await;
    let servers = shard_urls();
    let mut urls = Vec::new();
    for server in [&servers[0], &servers[1], &servers[0]] {
        let db = fresh_db(server, "reshard").await;
        exec(&db, "CREATE TABLE kv (k bigint PRIMARY KEY, v bigint NOT NULL)").await;
        urls.push(db);
    }
    let urls: [String; 3] = urls.try_into().unwrap();
    let shards = Shards::connect(&config(&control, &urls)).await.unwrap();
    for k in 0..KEYS {
        shards
            .write(k.to_string().as_bytes(), write(k, Op::Seed))
            .await
            .unwrap();
    }
    (control, urls, shards)
}

/// Every key (seeded, or inserted and acknowledged) is on exactly one of the
/// three shards, the one the set now places it on, with every acknowledged write.
async fn each_key_once_on_its_shard(shards: &Shards, urls: &[String; 3], acked: &HashMap<i64, i64>) {
    let mut found: HashMap<i64, Vec<(&str, i64)>> = HashMap::new();
    for (name, url) in ["a", "b", "c"].iter().zip(urls) {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT k, v FROM kv")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(rows.len() > 400, "shard {name} holds {} rows", rows.len());
        for (k, v) in rows {
            found.entry(k).or_default().push((name, v));
        }
    }
    let mut moved_to_c = 0;
    for k in (0..KEYS).chain(acked.keys().copied().filter(|k| *k >= KEYS)) {
        let places = found.get(&k).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(places.len(), 1, "key {k} is readable from {places:?}");
        let (shard, v) = places[0];
        assert_eq!(
            shard,
            shards.shard_for(k.to_string().as_bytes()),
            "key {k} is not on its shard"
        );
        assert_eq!(v, acked.get(&k).copied().unwrap_or(0), "key {k} lost a write");
        moved_to_c += i32::from(shard == "c");
    }
    assert_eq!(
        found.len(),
        KEYS as usize + acked.keys().filter(|k| **k >= KEYS).count()
    );
    assert!(moved_to_c > 400, "only {moved_to_c} keys moved to the new shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_move_to_a_new_shard_under_writes_with_the_resharder_killed_mid_copy() {
    let (control, urls, shards) = seeded().await;

    let acked = Arc::new(Mutex::new(HashMap::new()));
    let writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            tokio::spawn(writer(
                shards.clone(),
                t,
                acked.clone(),
                writes.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut first = spawn_resharder(&control, &urls, Some(200));
    let _stalled = until(&mut first, |l| {
        l.strip_prefix("copied ")
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 200)
    })
    .await;
    first.kill().await.unwrap();
    let mut second = spawn_resharder(&control, &urls, None);
    // libtest's own "test … " precedes the process's first line.
    let mut lines = until(&mut second, |l| l.ends_with("started")).await;
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the resharder exited before it was done");
        if line.ends_with("done") {
            break;
        }
    }
    assert!(second.wait().await.unwrap().success());
    let at_done = writes.load(Ordering::Relaxed);
    wait_for(|| writes.load(Ordering::Relaxed) >= at_done + 300).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    shards.refresh().await.unwrap();
    let acked = acked.lock().unwrap().clone();
    each_key_once_on_its_shard(&shards, &urls, &acked).await;
}
