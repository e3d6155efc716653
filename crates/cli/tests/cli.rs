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
    for cmd in ["gateway", "check", "demo", "completions"] {
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
