//! `examples/counter.rs`, the template's example service, run as a process: it speaks the
//! framing, shares its counters across workers, keeps the reference ops, and stops cleanly.
//!
//! `cargo test` builds the package's examples before it runs any test, into
//! `<target>/<profile>/examples/`, next to the `closewait` binary's directory.

mod common;

use std::path::PathBuf;

use common::*;

const INCR: u8 = 0x10;
const GET: u8 = 0x11;
const INCR_REPLY: u8 = 0x90;
const GET_REPLY: u8 = 0x91;

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

fn call(client: &mut Client, op: u8, name: &[u8]) -> (u8, Vec<u8>) {
    client.send(op, name);
    client.recv().expect("a reply")
}

fn value(reply: (u8, Vec<u8>), want_op: u8) -> u64 {
    assert_eq!(reply.0, want_op, "reply {reply:?}");
    u64::from_be_bytes(reply.1.try_into().expect("an 8-byte value"))
}

#[test]
fn counter_example_counts_per_name_and_answers_errors_and_reference_ops() {
    let mut server = Server::start_program(&counter_binary(), &[]);
    let mut a = Client::connect(server.addr);
    let mut b = Client::connect(server.addr);
    assert_eq!(value(call(&mut a, INCR, b"apples"), INCR_REPLY), 1);
    assert_eq!(value(call(&mut a, INCR, b"apples"), INCR_REPLY), 2);
    assert_eq!(value(call(&mut b, GET, b"apples"), GET_REPLY), 2);
    assert_eq!(value(call(&mut b, GET, b"pears"), GET_REPLY), 0);
    assert_eq!(value(call(&mut b, INCR, b"pears"), INCR_REPLY), 1);
    let (op, message) = call(&mut a, 0x42, b"");
    assert_eq!((op, message), (ERROR, b"unknown op 0x42".to_vec()));
    let (op, message) = call(&mut a, INCR, b"");
    assert_eq!(op, ERROR, "empty name");
    assert!(String::from_utf8(message).unwrap().contains("name"));
    a.ping();
    assert_eq!(b.stats()["active"], 2);
    drop((a, b));
    server.terminate();
    assert_eq!(server.wait_exit(WAIT), Some(0));
}

#[test]
fn counter_example_shares_counters_across_workers() {
    let mut server = Server::start_program(&counter_binary(), &["--workers", "2"]);
    // Connections are spread over both workers by the kernel; the count must not care.
    let mut clients: Vec<Client> = (0..16).map(|_| Client::connect(server.addr)).collect();
    for client in &mut clients {
        call(client, INCR, b"hits");
    }
    assert_eq!(value(call(&mut clients[0], GET, b"hits"), GET_REPLY), 16);
    assert_eq!(clients[0].stats()["workers"], 2);
    drop(clients);
    server.terminate();
    assert_eq!(server.wait_exit(WAIT), Some(0));
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
