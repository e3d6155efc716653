//! `palisade register` against the etcd `scripts/test` starts: a gateway's
//! registry cluster takes the endpoint it registers; killed, the endpoint leaves
//! when its lease runs out; stopped with SIGTERM, it leaves at once (the lease
//! revoked).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use palisade_gateway::Handle;

const GUARD: Duration = Duration::from_secs(30);

fn etcd_url() -> String {
    std::env::var("PALISADE_TEST_ETCD_URL").expect("PALISADE_TEST_ETCD_URL: scripts/test starts an etcd")
}

/// A gateway whose cluster `c` is the registry under `prefix`.
async fn gateway(prefix: &str) -> Handle {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\n\
         [[routes]]\nname = \"r\"\nmatch = {{ path_prefix = \"/\" }}\ncluster = \"c\"\n\n\
         [clusters.c]\netcd = {{ url = \"{}\", prefix = \"{prefix}\" }}\n",
        etcd_url()
    );
    palisade_gateway::start(palisade_gateway::Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

fn register(prefix: &str, address: SocketAddr, ttl: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "register",
            "--etcd",
            &etcd_url(),
            "--prefix",
            prefix,
            "--ttl",
            ttl,
        ])
        .arg("--address")
        .arg(address.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until cluster `c`'s endpoints are `want`.
async fn endpoints_become(gw: &Handle, want: &[SocketAddr]) {
    let up = gw.runtime().clusters["c"].clone();
    let mut events = up.events.subscribe();
    tokio::time::timeout(GUARD, async {
        loop {
            let now: Vec<SocketAddr> = up.cluster.endpoints().iter().map(|e| e.addr()).collect();
            if now == want {
                return;
            }
            events.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the cluster's endpoints never became {want:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_endpoint_whose_process_is_killed_leaves_after_its_lease() {
    let prefix = format!("/palisade-test/register-{}-{}/", std::process::id(), line!());
    let gw = gateway(&prefix).await;
    endpoints_become(&gw, &[]).await;
    let me: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let mut child = register(&prefix, me, "2s");
    endpoints_become(&gw, &[me]).await;
    // SIGKILL: nothing deregisters it; etcd drops it when its 2 s lease runs out.
    child.kill().unwrap();
    child.wait().unwrap();
    endpoints_become(&gw, &[]).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_endpoint_stopped_with_sigterm_leaves_at_once() {
    let prefix = format!("/palisade-test/register-{}-{}/", std::process::id(), line!());
    let gw = gateway(&prefix).await;
    let me: SocketAddr = "127.0.0.1:18081".parse().unwrap();
    // A lease far longer than the test's patience: only a revoke removes it in time.
    let mut child = register(&prefix, me, "1h");
    endpoints_become(&gw, &[me]).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
    endpoints_become(&gw, &[]).await;
    gw.shutdown().await;
}

#[test]
fn bad_register_options_are_refused_by_name() {
    for (args, says) in [
        (
            vec![
                "--etcd",
                "etcd:2379",
                "--prefix",
                "/s/",
                "--address",
                "127.0.0.1:1",
            ],
            "--etcd",
        ),
        (vec!["--prefix", "s/", "--address", "127.0.0.1:1"], "--prefix"),
        (
            vec!["--prefix", "/s/", "--address", "127.0.0.1:1", "--ttl", "100ms"],
            "--ttl",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("register")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
