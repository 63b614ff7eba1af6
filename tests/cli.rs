//! The command line: help, the listening line, and bad values refused at start-up.

use std::process::Command;

fn closewait(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_closewait"))
        .args(args)
        .output()
        .expect("run closewait")
}

#[test]
fn help_lists_every_documented_flag() {
    let out = closewait(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--max-frame",
        "--max-connections",
        "--backlog",
        "--when-full",
        "--idle-timeout",
        "--max-pending-output",
        "--keepalive-time",
        "--tcp-user-timeout",
        "--drain-timeout",
        "--workers",
        "--leaky",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
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
