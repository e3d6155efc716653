//! The `palisade gateway` process and its signals, against real sockets: SIGHUP
//! reloads (a bad file is rejected and the old configuration keeps serving), an edit
//! to the file reloads when `watch_config` is on, SIGTERM drains a request in flight
//! before the process exits. Every wait is for an event: a log line, a request seen
//! by an upstream, a response; a guard fails a test that would hang.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{Notify, Semaphore};

/// Fails a test that has not finished in a generous time, instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

/// A keep-alive HTTP/1.1 upstream answering `200 <name>`; with `stall`, each
/// request waits for a permit from `release` first.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Notify>,
    release: Arc<Semaphore>,
}

async fn upstream(name: &'static str, stall: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Notify::new());
    let release = Arc::new(Semaphore::new(0));
    let (s, r) = (seen.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (seen, release) = (s.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    seen.notify_one();
                    if stall {
                        release.acquire().await.unwrap().forget();
                    }
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}", name.len());
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, release }
}

fn config(upstream: SocketAddr, watch: bool) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_config = {watch}\n\
         drain_timeout = \"30s\"\n[[routes]]\nname = \"r\"\ncluster = \"c\"\n\
         [clusters.c]\nendpoints = [\"{upstream}\"]\n"
    )
}

fn config_file(tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-signals-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The running binary, with its log read line by line.
struct Gateway {
    child: Child,
    log: Lines<BufReader<ChildStderr>>,
    addr: SocketAddr,
}

impl Gateway {
    async fn start(config: &PathBuf) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["gateway", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut g = Gateway {
            child,
            log,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let line = g.wait_for("palisade gateway serving").await;
        let listen = line
            .split("listen=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        g.addr = listen.parse().unwrap();
        g
    }

    /// Reads the log until a line contains `needle`.
    async fn wait_for(&mut self, needle: &str) -> String {
        while let Some(line) = self.log.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the gateway exited before logging `{needle}`");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }
}

/// `GET /` on a new connection: the status line and the body.
async fn get(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_is_rejected_while_the_old_config_serves() {
    tokio::time::timeout(GUARD, async {
        let a = upstream("A", false).await;
        let b = upstream("B", false).await;
        let path = config_file("hup", &config(a.addr, false));
        let mut gw = Gateway::start(&path).await;
        assert_eq!(get(gw.addr).await.1, "A");

        std::fs::write(&path, config(b.addr, false)).unwrap();
        gw.signal("HUP");
        gw.wait_for("configuration reloaded").await;
        assert_eq!(get(gw.addr).await.1, "B");

        std::fs::write(&path, "[gateway]\nlisten = 12\n").unwrap();
        gw.signal("HUP");
        let line = gw.wait_for("new configuration rejected").await;
        assert!(
            line.contains("gateway.listen") || line.contains("listen"),
            "{line}"
        );
        let (status, body) = get(gw.addr).await;
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, "B", "the last good configuration keeps serving");
    })
    .await
    .expect("test guard");
}

#[tokio::test]
async fn an_edit_to_the_watched_file_reloads_it() {
    tokio::time::timeout(GUARD, async {
        let a = upstream("A", false).await;
        let b = upstream("B", false).await;
        let path = config_file("watch", &config(a.addr, true));
        let mut gw = Gateway::start(&path).await;
        assert_eq!(get(gw.addr).await.1, "A");
        std::fs::write(&path, config(b.addr, true)).unwrap();
        gw.wait_for("configuration reloaded").await;
        assert_eq!(get(gw.addr).await.1, "B");
    })
    .await
    .expect("test guard");
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits() {
    tokio::time::timeout(GUARD, async {
        let up = upstream("slow", true).await;
        let path = config_file("term", &config(up.addr, false));
        let mut gw = Gateway::start(&path).await;
        let seen = up.seen.notified();
        let in_flight = tokio::spawn(get(gw.addr));
        seen.await;
        gw.signal("TERM");
        gw.wait_for("shutting down").await;
        // The request started before SIGTERM is answered in full ...
        up.release.add_permits(1);
        let (status, body) = in_flight.await.unwrap();
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, "slow");
        // ... and then the process ends cleanly.
        let exit = gw.child.wait().await.unwrap();
        assert!(exit.success(), "{exit}");
    })
    .await
    .expect("test guard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_delivers_stored_requests_and_stops_on_sigterm() {
    tokio::time::timeout(GUARD, async {
        let up = upstream("delivered", false).await;
        let dir = std::env::temp_dir().join(format!("palisade-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = format!("sqlite:{}", dir.join("jobs.db").display());
        // A request stored as an async route stores it.
        let q = palisade_queue::Queue::connect(&db).await.unwrap();
        let stored = palisade_gateway::jobs::StoredRequest {
            route: "r".into(),
            method: "POST".into(),
            path: "/orders".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: palisade_gateway::jobs::StoredBody::Text("two apples".into()),
            token: "t".into(),
        };
        let job = palisade_queue::NewJob::new(palisade_gateway::jobs::HTTP_DELIVERY, &stored)
            .unwrap()
            .queue(palisade_gateway::jobs::HTTP_QUEUE);
        let id = q.enqueue(job).await.unwrap().id;
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nwatch_config = false\nqueue = {{ database = \"{db}\", workers = 2 }}\n\
             [[routes]]\nname = \"r\"\ncluster = \"c\"\nmode = \"async\"\n[clusters.c]\nendpoints = [\"{}\"]\n",
            up.addr
        );
        let path = config_file("worker", &text);
        let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["worker", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        up.seen.notified().await;
        let pid = child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert!(child.wait().await.unwrap().success(), "the worker exits cleanly on SIGTERM");
        let job = q.job(id).await.unwrap().unwrap();
        assert_eq!(job.state, palisade_queue::JobState::Completed, "{job:?}");
        assert_eq!(job.output.unwrap()["body"], "delivered");
        let _ = std::fs::remove_dir_all(dir);
    })
    .await
    .expect("the worker test hung");
}
