//! Bad input gets a clear ERROR frame, never harms other connections, and a stream that
//! cannot be resynchronised is closed after the ERROR.

mod common;

use common::*;

#[test]
fn unknown_op_gets_an_error_and_the_connection_stays_usable() {
    let server = Server::start(&[]);
    let mut client = server.connect();
    client.send(0x42, b"what is this");
    assert_eq!(client.recv(), Some((ERROR, b"unknown op 0x42".to_vec())));
    client.echo(b"still usable");
    server.wait_for_log("unknown op 0x42");
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("127.0.0.1:")),
        "peer address in the warning"
    );
}

#[test]
fn zero_length_frame_gets_an_error_then_close() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let mut client = server.connect();
    client.send_raw(&[0, 0, 0, 0]);
    let (op, message) = client.recv().expect("error frame");
    assert_eq!(op, ERROR);
    assert!(String::from_utf8(message).unwrap().contains("length 0"));
    assert_eq!(client.recv(), None, "closed after the error");
    server.wait_for_fds(baseline);
}

#[test]
fn oversized_frame_gets_an_error_naming_the_limit_then_close() {
    let server = Server::start(&["--max-frame", "16"]);
    let baseline = server.fds();
    let mut other = server.connect();
    let mut client = server.connect();
    client.echo(&[1; 15]); // exactly max_frame
    client.send_raw(&frame(ECHO, &[2; 16])); // one byte over
    let (op, message) = client.recv().expect("error frame");
    assert_eq!(op, ERROR);
    let message = String::from_utf8(message).unwrap();
    assert!(
        message.contains("17") && message.contains("16"),
        "{message}"
    );
    assert!(client.at_eof(), "closed after the error");
    other.echo(b"unharmed");
    // The server lingers (writing shut down) until this peer closes too.
    assert_eq!(other.stats()["lingering"], 1);
    drop(client);
    assert!(
        wait_until(WAIT, || other.stats()["closed_protocol"] == 1),
        "{:?}",
        other.stats()
    );
    assert_eq!(other.stats()["lingering"], 0);
    drop(other);
    server.wait_for_fds(baseline);
}

#[test]
fn announced_length_over_the_limit_is_refused_before_any_body_arrives() {
    let server = Server::start(&[]);
    let mut client = server.connect();
    client.send_raw(&u32::MAX.to_be_bytes());
    let (op, message) = client.recv().expect("error frame");
    assert_eq!(op, ERROR);
    assert!(String::from_utf8(message).unwrap().contains("4294967295"));
}

#[test]
fn pipelined_replies_keep_request_order_across_ops_and_errors() {
    let server = Server::start(&[]);
    let mut client = server.connect();
    let mut batch = Vec::new();
    for i in 0..300u32 {
        match i % 3 {
            0 => batch.extend(frame(ECHO, &i.to_be_bytes())),
            1 => batch.extend(frame(PING, b"")),
            _ => batch.extend(frame(0x10, b"")),
        }
    }
    // Split at an awkward place: the server sees frames cut across reads.
    client.send_raw(&batch[..1001]);
    client.send_raw(&batch[1001..]);
    for i in 0..300u32 {
        let reply = client.recv().expect("reply");
        match i % 3 {
            0 => assert_eq!(reply, (ECHO_REPLY, i.to_be_bytes().to_vec())),
            1 => assert_eq!(reply, (PING_REPLY, vec![])),
            _ => assert_eq!(reply, (ERROR, b"unknown op 0x10".to_vec())),
        }
    }
}

#[test]
fn stats_reports_every_required_counter_as_an_integer() {
    let server = Server::start(&[]);
    let mut client = server.connect();
    let stats = client.stats();
    for name in [
        "active",
        "accepted",
        "closed_eof",
        "closed_reset",
        "closed_error",
        "max_connections",
        "fd_limit",
    ] {
        assert!(stats.contains_key(name), "STATS lacks {name}: {stats:?}");
    }
    assert_eq!(stats["active"], 1);
    assert_eq!(stats["accepted"], 1);
    assert!(stats["max_connections"] > 0 && stats["max_connections"] < stats["fd_limit"]);
}
