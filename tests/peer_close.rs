//! The core promise: a peer's close is noticed and acted on at once, so no socket of the
//! server stays in CLOSE_WAIT and its fd count returns to where it started.

mod common;

use std::io::Write;
use std::thread;

use common::*;

#[test]
fn five_hundred_peers_that_close_leave_fds_at_baseline_and_no_close_wait() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut clients: Vec<Client> = (0..500).map(|_| server.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.echo(format!("peer {i}").as_bytes());
    }
    assert_eq!(server.fds(), baseline + 500);
    // Three ways a downstream peer goes away: a clean close, a close in the middle of a
    // frame, and a half-close (FIN) without waiting for anything.
    for (i, mut client) in clients.into_iter().enumerate() {
        match i % 3 {
            0 => drop(client),
            1 => {
                client.send_raw(&frame(ECHO, b"never finished")[..7]);
                drop(client);
            }
            _ => client.half_close(),
        }
    }
    server.wait_for_fds(baseline);
    let stats = server.connect().stats();
    assert_eq!(stats["closed_eof"], 500, "{stats:?}");
    assert_eq!(stats["active"], 1);
}

#[test]
fn peer_half_close_gets_every_reply_in_order_then_eof() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut client = server.connect();
    let mut batch = Vec::new();
    for i in 0..1000 {
        batch.extend(frame(ECHO, format!("request {i}").as_bytes()));
        if i % 7 == 0 {
            batch.extend(frame(PING, b""));
        }
    }
    client.send_raw(&batch);
    client.half_close();
    for i in 0..1000 {
        assert_eq!(
            client.recv(),
            Some((ECHO_REPLY, format!("request {i}").into_bytes())),
            "reply {i}"
        );
        if i % 7 == 0 {
            assert_eq!(client.recv(), Some((PING_REPLY, vec![])));
        }
    }
    assert_eq!(client.recv(), None, "EOF after the last reply");
    server.wait_for_fds(baseline);
}

#[test]
fn data_larger_than_a_read_arriving_with_fin_is_answered_in_full() {
    // 4 MiB of requests then FIN in one go: more than one read buffer and more than the
    // output bound, so the server must pause reading, resume, and still see the FIN.
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut client = server.connect();
    let mut reader = Client {
        stream: client.stream.try_clone().unwrap(),
    };
    let writer = thread::spawn(move || {
        for i in 0..64u32 {
            let mut data = vec![(i % 251) as u8; 64 * 1024];
            data[..4].copy_from_slice(&i.to_be_bytes());
            client.send(ECHO, &data);
        }
        client.half_close();
    });
    for i in 0..64u32 {
        let (op, data) = reader.recv().expect("reply");
        assert_eq!(op, ECHO_REPLY);
        assert_eq!(data.len(), 64 * 1024);
        assert_eq!(data[..4], i.to_be_bytes(), "reply {i} out of order");
        assert!(data[4..].iter().all(|&b| b == (i % 251) as u8));
    }
    assert_eq!(reader.recv(), None);
    writer.join().unwrap();
    drop(reader);
    server.wait_for_fds(baseline);
}

#[test]
fn reset_mid_frame_is_survived_and_counted() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut observer = server.connect();
    observer.ping();
    for _ in 0..20 {
        let mut client = server.connect();
        client.ping();
        client.send_raw(&frame(ECHO, &[1; 1000])[..500]);
        client.reset();
    }
    server.wait_for_fds(baseline + 1);
    observer.echo(b"still here");
    let stats = observer.stats();
    assert_eq!(stats["closed_reset"], 20, "{stats:?}");
}

#[test]
fn peer_closing_with_unread_replies_is_survived() {
    // Closing a socket with unread data makes the peer's kernel send RST, not FIN.
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut observer = server.connect();
    for _ in 0..20 {
        let mut client = server.connect();
        let batch: Vec<u8> = (0..200).flat_map(|_| frame(ECHO, &[7; 100])).collect();
        client.stream.write_all(&batch).unwrap();
        // Wait for at least the first reply so the server has answered before we vanish.
        assert!(client.recv().is_some());
        drop(client);
    }
    server.wait_for_fds(baseline + 1);
    observer.echo(b"unaffected");
}

#[test]
fn leaky_variant_leaves_every_peer_close_in_close_wait() {
    // The demo's broken server must really be broken, or the comparison shows nothing.
    let server = Server::start(&["--leaky"]);
    // Waited for: stderr is read by another thread, which may not have caught up yet.
    server.wait_for_log("LEAKY MODE");
    let baseline = server.fds();
    for _ in 0..20 {
        let mut client = server.connect();
        client.ping();
    }
    assert!(
        wait_until(WAIT, || server.close_wait() == 20),
        "CLOSE_WAIT sockets: {}",
        server.close_wait()
    );
    assert_eq!(server.fds(), baseline + 20);
    let stats = server.connect().stats();
    assert_eq!((stats["leaked"], stats["closed_eof"]), (20, 0), "{stats:?}");
}

/// The loop's one close path (`Worker::reap`) counts each ended connection exactly once,
/// under its reason: clean closes, resets, protocol errors and idle timeouts, mixed.
#[test]
fn every_ended_connection_is_counted_once_under_its_reason() {
    let server = Server::start(&["--idle-timeout", "1"]);
    let baseline = server.fds();
    let mut observer = server.connect();
    observer.ping();
    let (eof, reset, protocol, idle) = (12, 8, 6, 4);
    for _ in 0..eof {
        let mut client = server.connect();
        client.ping();
        drop(client);
    }
    for _ in 0..reset {
        let mut client = server.connect();
        client.ping();
        client.reset();
    }
    for _ in 0..protocol {
        let mut client = server.connect();
        client.send_raw(&[0, 0, 0, 0]);
        assert_eq!(client.recv().map(|(op, _)| op), Some(ERROR));
        assert!(client.at_eof(), "no close after a zero-length frame");
    }
    let mut silent: Vec<Client> = (0..idle).map(|_| server.connect()).collect();
    for client in &mut silent {
        client.ping();
    }
    // The observer's STATS requests keep it busy, so only the silent ones go idle.
    let mut stats = observer.stats();
    assert!(
        wait_until(WAIT, || {
            stats = observer.stats();
            stats["active"] == 1 && stats["closed_idle"] == idle
        }),
        "{stats:?}"
    );
    server.wait_for_fds(baseline + 1);
    let closed = closed_total(&stats);
    assert_eq!(
        stats["accepted"],
        1 + eof + reset + protocol + idle,
        "{stats:?}"
    );
    assert_eq!(closed, stats["accepted"] - stats["active"], "{stats:?}");
    assert_eq!(
        (
            stats["closed_eof"],
            stats["closed_reset"],
            stats["closed_protocol"],
            stats["closed_idle"]
        ),
        (eof, reset, protocol, idle),
        "{stats:?}"
    );
    for client in &mut silent {
        assert!(client.at_eof(), "an idle connection was not closed");
    }
}
