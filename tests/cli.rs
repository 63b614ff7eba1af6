//! The command line: help, the listening line, and bad values refused at start-up.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn closewait(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_closewait"))
        .args(args)
        .output()
        .expect("run closewait")
}

/// Every `--flag` named in the options table of README.md (rows starting with "| `--").
fn readme_flags() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .flat_map(flags_in)
        .collect()
}

fn flags_in(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.len() > 2 && w.starts_with("--"))
        .map(str::to_string)
        .collect()
}

#[test]
fn help_and_the_readme_options_table_list_the_same_flags() {
    let out = closewait(&["--help"]);
    assert!(out.status.success());
    let help: BTreeSet<String> = flags_in(&String::from_utf8(out.stdout).unwrap())
        .into_iter()
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    let readme = readme_flags();
    assert!(
        readme.len() >= 14,
        "README options table not found: {readme:?}"
    );
    assert_eq!(
        help, readme,
        "--help and README.md's options table disagree (left: --help, right: README)"
    );
}

#[test]
fn values_the_server_cannot_honour_fail_at_start_with_the_setting_named() {
    for (args, named) in [
        (["--idle-timeout", "99999999999"], "idle_timeout"),
        (["--max-pending-output", "0"], "max_pending_output"),
        (["--keepalive-time", "40000"], "keepalive_time"),
    ] {
        let out = closewait(&[&["--listen", "127.0.0.1:0"][..], &args[..]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains(named), "{args:?}: {log}");
        assert!(
            out.stdout.is_empty(),
            "no listening line when start-up fails"
        );
    }
}

#[test]
fn an_address_in_use_is_a_clear_error_not_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = closewait(&["--listen", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("cannot listen on {addr}")) && log.contains("in use"),
        "{log}"
    );
}

/// The example binary cargo built for this test run.
fn counter_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_closewait"));
    let path = bin
        .parent()
        .expect("the closewait binary has a directory")
        .join("examples")
        .join(format!("counter{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} does not exist: run the whole suite with `cargo test` (which builds examples), \
         or `cargo build --examples` before `cargo test --test example_counter`",
        path.display()
    );
    path
}

/// A service built on the template reuses the server's flags but must not ship the demo's
/// switch that turns on the fd leak.
#[test]
fn the_example_offers_the_server_flags_but_not_leaky() {
    let out = std::process::Command::new(counter_binary())
        .arg("--help")
        .output()
        .expect("run counter --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--max-connections",
        "--idle-timeout",
        "--workers",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert!(!help.contains("--leaky"), "--leaky offered:\n{help}");
    let refused = std::process::Command::new(counter_binary())
        .arg("--leaky")
        .output()
        .expect("run counter --leaky");
    assert!(!refused.status.success(), "counter accepted --leaky");
}
