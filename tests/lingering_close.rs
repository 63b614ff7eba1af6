//! Nothing already answered is lost on close.
//!
//! Closing a socket whose receive queue still holds unread bytes makes Linux send RST, and
//! the RST makes the peer's kernel drop replies it has not delivered yet. Each test here
//! builds one of the close paths that leaves input unread, with replies still in flight, and
//! checks that the peer gets every reply byte, the ERROR frame where there is one, and then
//! a clean EOF — never ECONNRESET — in 100 trials out of 100.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::thread;

use common::*;

/// Trials per case: the acceptance bar.
const TRIALS: usize = 100;

/// Read until EOF; the bytes, or the error that ended the read (a reset).
fn read_to_eof(client: &mut Client) -> Result<Vec<u8>, (ErrorKind, usize)> {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((e.kind(), got.len())),
        }
    }
}

/// The first case: one write of an ECHO frame with 200,000 B, the header
/// `FF FF FF FF`, and 200,000 more bytes. The server answers the ECHO, then refuses the
/// length with an ERROR frame while 200,000 unread bytes are still arriving. Seen before
/// the fix: about 128,000 of the 200,005 reply bytes, no ERROR frame, ECONNRESET.
#[test]
fn an_invalid_length_behind_a_large_request_still_delivers_every_reply_then_eof() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let data = vec![0x5a; 200_000];
    let mut request = frame(ECHO, &data);
    request.extend_from_slice(&[0xFF; 4]);
    request.extend_from_slice(&[0xA5; 200_000]);
    let expected_echo = frame(ECHO_REPLY, &data);
    for trial in 0..TRIALS {
        let mut client = server.connect();
        // Written from another thread: the server stops reading at the bad length, so a
        // single-threaded peer blocked in write would never get to read.
        let mut writer = client.stream.try_clone().expect("clone");
        let request = request.clone();
        let sender = thread::spawn(move || writer.write_all(&request));
        let got = read_to_eof(&mut client).unwrap_or_else(|(kind, n)| {
            panic!("trial {trial}: {kind:?} after {n} of the reply bytes")
        });
        sender.join().unwrap().expect("the whole request was taken");
        assert!(
            got.len() > expected_echo.len() && got[..expected_echo.len()] == expected_echo[..],
            "trial {trial}: {} bytes, not the whole echo reply of {} bytes then more",
            got.len(),
            expected_echo.len()
        );
        let error = &got[expected_echo.len()..];
        assert_eq!(
            error[4], ERROR,
            "trial {trial}: no ERROR frame after the echo"
        );
        assert_eq!(
            u32::from_be_bytes(error[..4].try_into().unwrap()) as usize,
            error.len() - 4,
            "trial {trial}: the ERROR frame is not whole"
        );
        assert!(
            String::from_utf8_lossy(&error[5..]).contains("4294967295"),
            "trial {trial}: {:?}",
            String::from_utf8_lossy(&error[5..])
        );
    }
    let mut observer = server.connect();
    assert!(
        wait_until(WAIT, || observer.stats()["closed_protocol"]
            == TRIALS as u64),
        "{:?}",
        observer.stats()
    );
    assert_eq!(observer.stats()["closed_reset"], 0);
    drop(observer);
    server.wait_for_fds(baseline);
}

/// The second case, 100 connections at once: each sends ECHO with 900,000 B and
/// does not read; the server gets SIGTERM; once it is draining each sends one PING (input
/// the draining server will never read); then each reads. Seen before the fix: about
/// 128,000 of 900,005 reply bytes, then ECONNRESET, and the server exited 0.
#[test]
fn sigterm_drain_delivers_every_reply_then_eof_although_requests_arrive_unread() {
    let mut server = Server::start(&["--drain-timeout", "60"]);
    let data = vec![0x3c; 900_000];
    let expected = frame(ECHO_REPLY, &data);
    let mut clients: Vec<Client> = (0..TRIALS).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(ECHO, &data);
    }
    // Every request answered (replies queued, mostly still in the server) before SIGTERM.
    let mut observer = server.connect();
    assert!(
        wait_until(WAIT, || observer.stats()["requests"] >= TRIALS as u64),
        "not every ECHO was answered: {:?}",
        observer.stats()
    );
    drop(observer);
    server.terminate();
    server.wait_for_log("draining");
    for client in &mut clients {
        client.send(PING, b"");
    }
    for (trial, client) in clients.iter_mut().enumerate() {
        let got = read_to_eof(client).unwrap_or_else(|(kind, n)| {
            panic!(
                "trial {trial}: {kind:?} after {n} of {} reply bytes",
                expected.len()
            )
        });
        assert_eq!(got.len(), expected.len(), "trial {trial}: reply length");
        assert!(got == expected, "trial {trial}: reply bytes differ");
    }
    // The server lingers until each peer closes; then it exits cleanly.
    drop(clients);
    assert_eq!(server.wait_exit(WAIT), Some(0));
    let summary = server
        .log()
        .into_iter()
        .rev()
        .find(|l| l.contains("stopped;"));
    let summary = summary.expect("a shutdown summary line");
    assert!(
        !summary.contains("closed_reset"),
        "a drained connection ended in a reset: {summary}"
    );
}

/// `--linger-timeout 0` is the old behaviour, kept for those who want it: close at once.
/// This test shows the hazard the default avoids, so the tests above cannot pass vacuously
/// (if they did not build unread input, this one could not fail the way it does).
#[test]
fn without_lingering_the_same_invalid_length_loses_replies_to_a_reset() {
    let server = Server::start(&["--linger-timeout", "0"]);
    let data = vec![0x5a; 200_000];
    let mut request = frame(ECHO, &data);
    request.extend_from_slice(&[0xFF; 4]);
    request.extend_from_slice(&[0xA5; 200_000]);
    let mut resets = 0;
    for _ in 0..10 {
        let mut client = server.connect();
        let mut writer = client.stream.try_clone().expect("clone");
        let request = request.clone();
        let sender = thread::spawn(move || writer.write_all(&request));
        if read_to_eof(&mut client).is_err() {
            resets += 1;
        }
        let _ = sender.join();
    }
    assert!(resets > 0, "no reset in 10 trials without lingering");
}

/// A lingering connection is bounded: a peer that never closes is closed after the linger
/// timeout, still counted under the reason that started the close.
#[test]
fn a_peer_that_never_closes_is_released_after_the_linger_timeout() {
    let server = Server::start(&["--linger-timeout", "1"]);
    let baseline = server.fds();
    let mut observer = server.connect();
    let mut client = server.connect();
    client.send_raw(&0u32.to_be_bytes());
    let (op, _) = client.recv().expect("error frame");
    assert_eq!(op, ERROR);
    assert!(client.at_eof(), "writing shut down after the ERROR frame");
    assert_eq!(observer.stats()["lingering"], 1);
    assert!(
        wait_until(WAIT, || observer.stats()["closed_protocol"] == 1),
        "never released: {:?}",
        observer.stats()
    );
    let stats = observer.stats();
    assert_eq!((stats["lingering"], stats["active"]), (0, 1), "{stats:?}");
    drop((client, observer));
    server.wait_for_fds(baseline);
}
