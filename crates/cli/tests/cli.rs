//! The `palisade` command line: help for every subcommand, the version, the nearest
//! name suggested for a mistyped one, completion scripts, and `check`'s exit codes.

use std::process::{Command, Output};

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_subcommand_has_help() {
    for cmd in ["gateway", "check", "demo", "jobs", "worker", "completions"] {
        let out = palisade(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help: {out:?}");
        assert!(
            text(&out.stdout).contains("Usage: palisade"),
            "{cmd}: {}",
            text(&out.stdout)
        );
    }
    let out = palisade(&["--version"]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("palisade {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_mistyped_command_or_flag_gets_the_nearest_one() {
    let out = palisade(&["chek", "--config", "x.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("similar subcommand exists: 'check'"),
        "{}",
        text(&out.stderr)
    );
    let out = palisade(&["check", "--confg", "x.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("'--config'"), "{}", text(&out.stderr));
    let out = palisade(&["demo", "--duration", "5 fortnights"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--duration"), "{}", text(&out.stderr));
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_palisade()"),
        ("zsh", "#compdef palisade"),
        ("fish", "complete -c palisade"),
    ] {
        let out = palisade(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(
            text(&out.stdout).contains(marker),
            "{shell}: {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn check_exits_0_for_a_good_file_and_1_naming_every_problem_of_a_bad_one() {
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/gateway.toml");
    let out = palisade(&["check", "--config", good]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(": ok ("));

    let dir = std::env::temp_dir().join(format!("palisade-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    let config = "[[routes]]\nname = \"a\"\ncluster = \"b\"\n\n[clusters.b]\nendpoints = [\"127.0.0.1:1\"]\nmax_concurrent = 0\nbreaker = { window = 0, failure_rate = 2.0 }\n";
    std::fs::write(&bad, config).unwrap();
    let out = palisade(&["check", "-c", bad.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for field in [
        "3 problems",
        "clusters.b.breaker.window:",
        "clusters.b.breaker.failure_rate:",
        "clusters.b.max_concurrent:",
    ] {
        assert!(err.contains(field), "missing {field} in {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A SQLite queue in a fresh directory, with three jobs enqueued (ids returned).
fn queue_with_jobs() -> (std::path::PathBuf, String, Vec<i64>) {
    let dir = std::env::temp_dir().join(format!(
        "palisade-cli-jobs-{}-{:x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("jobs.db").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ids = rt.block_on(async {
        let q = palisade_queue::Queue::connect(&url).await.unwrap();
        let jobs = [
            palisade_queue::NewJob::new("send_email", &"a@example.com").unwrap(),
            palisade_queue::NewJob::new("send_email", &"b@example.com")
                .unwrap()
                .queue("mail"),
            palisade_queue::NewJob::new("resize", &[640, 480]).unwrap(),
        ];
        q.enqueue_many(&jobs)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect()
    });
    (dir, url, ids)
}

#[test]
fn jobs_are_listed_shown_cancelled_retried_and_counted() {
    let (dir, url, ids) = queue_with_jobs();
    let jobs = |args: &[&str]| {
        let mut all = vec!["jobs", "--database", url.as_str()];
        all.extend_from_slice(args);
        palisade(&all)
    };
    let out = jobs(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let out = jobs(&["list", "--queue", "mail"]);
    let text_out = text(&out.stdout);
    assert!(
        text_out.contains("send_email") && text_out.lines().count() == 2,
        "{text_out}"
    );
    let (a, b) = (ids[0].to_string(), ids[1].to_string());
    let out = jobs(&["show", &a]);
    assert!(
        text(&out.stdout).contains("send_email on default  available"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(jobs(&["cancel", &a]).status.code(), Some(0));
    assert_eq!(jobs(&["cancel", &a]).status.code(), Some(1), "already cancelled");
    assert_eq!(jobs(&["retry", &a]).status.code(), Some(0));
    assert_eq!(jobs(&["cancel", &b]).status.code(), Some(0));
    let out = jobs(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_queue = |q: &str| {
        stats
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["queue"] == q)
            .unwrap()
            .clone()
    };
    assert_eq!(by_queue("default")["counts"]["available"], 2);
    assert_eq!(by_queue("mail")["counts"]["cancelled"], 1);
    assert_eq!(jobs(&["show", "999999"]).status.code(), Some(1));
    let out = jobs(&["list", "--state", "lost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("discarded"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_database_that_cannot_be_reached_is_an_error_naming_it() {
    let out = palisade(&[
        "jobs",
        "--database",
        "postgres://nobody@127.0.0.1:1/none",
        "stats",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unavailable"), "{}", text(&out.stderr));
    let out = palisade(&["jobs", "--database", "mysql://x", "stats"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("postgres://... or sqlite:..."),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sign_url_prints_a_link_the_routes_keys_verify() {
    let dir = std::env::temp_dir().join(format!(
        "palisade-cli-sign-{}-{:x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), [5u8; 32]).unwrap();
    let file = dir.join("gateway.toml");
    let config = format!(
        "[[routes]]\nname = \"files\"\ncluster = \"c\"\nsigned_urls = {{ current = \"k1\", keys = {{ k1 = {{ file = \"{}\" }} }} }}\n\n[clusters.c]\nendpoints = [\"127.0.0.1:1\"]\n",
        dir.join("key").display()
    );
    std::fs::write(&file, &config).unwrap();
    let f = file.to_str().unwrap();
    let out = palisade(&[
        "sign-url",
        "-c",
        f,
        "--route",
        "files",
        "--path",
        "/files/a.pdf",
        "--expires-in",
        "10m",
        "--base",
        "https://cdn.example/",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let link = text(&out.stdout).trim().to_owned();
    let target = link
        .strip_prefix("https://cdn.example")
        .expect("the base comes first");
    let parsed = palisade_gateway::Config::from_toml(&config).unwrap();
    let signer =
        palisade_gateway::guard::url_signer(parsed.routes[0].signed_urls.as_ref().unwrap(), "x").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let me = "127.0.0.1".parse().unwrap();
    assert_eq!(signer.verify("GET", target, now, me), Ok(()));
    // It is for a GET, for ten minutes.
    assert!(signer.verify("POST", target, now, me).is_err());
    assert!(signer.verify("GET", target, now + 601, me).is_err());

    let out = palisade(&["sign-url", "-c", f, "--route", "nope", "--path", "/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no route named \"nope\""),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_demo_prints_its_dashboards_address_and_serves_it_there() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut demo = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["demo", "--duration", "30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("dashboard: ").map(str::to_owned))
        .expect("no dashboard line");
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/dashboard"))
        .unwrap_or_else(|| panic!("{url}"));
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /dashboard HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>Palisade dashboard</title>"), "{page}");
}

#[test]
fn the_sale_demo_sells_with_no_server_and_its_invariants_hold() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["demo", "--sale", "--duration", "7s"])
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // Refused before the opening, then sold.
    assert!(stdout.contains("not_open"), "{stdout}");
    assert!(stdout.contains("accepted"), "{stdout}");
    assert!(stdout.trim_end().ends_with("invariants hold"), "{stdout}");
}

#[test]
fn the_kubernetes_configmaps_gateway_configuration_passes_check() {
    let manifest = include_str!("../../../deploy/kubernetes/palisade.yaml");
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "gateway.toml: |")
        .skip(1);
    let toml: String = lines
        .by_ref()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(toml.contains("[gateway]"), "{toml}");
    let dir = std::env::temp_dir().join(format!("palisade-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["check", "--config"])
        .arg(&path)
        .env(
            "PALISADE_GATEWAY__ADMIN_TOKEN",
            "change-me-to-a-long-random-token",
        )
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
