//! `examples/counter.rs`, the template's example service, run as a process: it speaks the
//! framing, shares its counters across workers, keeps the reference ops, and stops cleanly.
//!
//! `cargo test` builds the package's examples before it runs any test, into
//! `<target>/<profile>/examples/`, next to the `closewait` binary's directory.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

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

/// A running `counter` example, killed when dropped.
struct Counter {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Counter {
    fn start(args: &[&str]) -> Counter {
        let mut child = Command::new(counter_binary())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the counter example");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!("no 'listening on' line from the counter example: {other:?}");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        Counter { child, addr }
    }

    fn terminate_and_wait(&mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("the counter example did not exit within {WAIT:?} of SIGTERM");
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut server = Counter::start(&[]);
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
    assert_eq!(server.terminate_and_wait(), Some(0));
}

#[test]
fn counter_example_shares_counters_across_workers() {
    let mut server = Counter::start(&["--workers", "2"]);
    // Connections are spread over both workers by the kernel; the count must not care.
    let mut clients: Vec<Client> = (0..16).map(|_| Client::connect(server.addr)).collect();
    for client in &mut clients {
        call(client, INCR, b"hits");
    }
    assert_eq!(value(call(&mut clients[0], GET, b"hits"), GET_REPLY), 16);
    assert_eq!(clients[0].stats()["workers"], 2);
    drop(clients);
    assert_eq!(server.terminate_and_wait(), Some(0));
}
