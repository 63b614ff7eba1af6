//! Nothing a peer can hold: the frame deadline, the memory budget over all connections, and
//! the log lines a storm of peers triggers.

mod common;

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A peer that sends one byte of a frame every 0.4 s makes progress on every read, so the
/// idle timeout (2 s) never fires; the frame deadline (1 s from the first byte) must.
#[test]
fn a_trickling_peer_gets_an_error_and_is_closed_at_the_frame_deadline() {
    let server = Server::start(&["--idle-timeout", "2", "--frame-timeout", "1"]);
    let baseline = server.fds();
    let mut client = server.connect();
    let request = frame(ECHO, b"never finished");
    let started = Instant::now();
    let mut sent = 0;
    // The sleeps are the attack's pace, not synchronisation.
    while sent < request.len() - 1 && started.elapsed() < WAIT {
        client.stream.set_nonblocking(true).unwrap();
        let answered = client.stream.peek(&mut [0]).is_ok_and(|n| n > 0);
        client.stream.set_nonblocking(false).unwrap();
        if answered {
            break; // the ERROR frame came: stop trickling
        }
        client.send_raw(&request[sent..sent + 1]);
        sent += 1;
        thread::sleep(Duration::from_millis(400));
    }
    let (op, message) = client.recv().expect("an ERROR frame");
    assert_eq!(op, ERROR);
    assert_eq!(
        String::from_utf8_lossy(&message),
        "frame not completed in 1 s"
    );
    assert!(client.at_eof(), "writing shut down after the ERROR frame");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}, not at the 1 s frame deadline"
    );
    drop(client);
    let mut observer = server.connect();
    assert!(
        wait_until(WAIT, || observer.stats()["closed_frame_timeout"] == 1),
        "{:?}",
        observer.stats()
    );
    assert_eq!(observer.stats()["closed_idle"], 0);
    drop(observer);
    server.wait_for_fds(baseline);
    server.wait_for_log("frame not completed in 1 s");
}

/// The deadline belongs to one frame: a peer streaming frames back to back, each finished
/// in time but the stream as a whole taking longer than the deadline, is never cut off —
/// including when one frame ends and the next begins within the same read.
#[test]
fn frames_each_finished_in_time_are_never_cut_off() {
    let server = Server::start(&["--frame-timeout", "1"]);
    let mut client = server.connect();
    let frames: Vec<Vec<u8>> = (0..5u8).map(|i| frame(ECHO, &[i; 1000])).collect();
    let mut stream = frames.concat();
    let half = frames[0].len() / 2;
    // Each write finishes the frame begun by the previous one and begins the next.
    let mut pieces = vec![stream.drain(..half).collect::<Vec<_>>()];
    while !stream.is_empty() {
        let take = (frames[0].len()).min(stream.len());
        pieces.push(stream.drain(..take).collect());
    }
    let started = Instant::now();
    for piece in &pieces {
        client.send_raw(piece);
        thread::sleep(Duration::from_millis(600));
    }
    assert!(started.elapsed() > Duration::from_secs(3));
    for (i, _) in frames.iter().enumerate() {
        assert_eq!(
            client.recv(),
            Some((ECHO_REPLY, vec![i as u8; 1000])),
            "reply {i}"
        );
    }
    client.ping();
    assert_eq!(client.stats()["closed_frame_timeout"], 0);
}

/// Peers that each stall one byte short of a 1 MiB frame, against a 3 MiB budget: at most
/// two such frames fit, so of six attackers four are evicted — each told why in an ERROR
/// frame, then EOF — the server never holds more than the budget once a turn ends, and an
/// honest client is never touched.
#[test]
fn the_memory_budget_evicts_the_largest_holders_and_spares_honest_clients() {
    const MIB: u64 = 1 << 20;
    let budget = 3 * MIB;
    let server = Server::start(&[
        "--max-buffered",
        &budget.to_string(),
        "--frame-timeout",
        "0",
    ]);
    let baseline = server.fds();
    let mut honest = server.connect();
    let mut observer = server.connect();
    let mut stalled = frame(ECHO, &vec![7; MIB as usize - 1]);
    stalled.pop(); // one byte short: the server holds the frame, waiting for the rest
    let mut attackers = Vec::new();
    for i in 1..=6 {
        let mut attacker = server.connect();
        attacker.send_raw(&stalled);
        attackers.push(attacker);
        // Absorbed when every attacker so far is either evicted (lingering) or holds a
        // whole MiB, and nothing is left unread.
        let absorbed = wait_until(WAIT, || {
            let stats = observer.stats();
            stats["lingering"] + stats["buffered_bytes"] / MIB == i && server.unread_input() == 0
        });
        assert!(absorbed, "attacker {i}: {:?}", observer.stats());
        let held = observer.stats()["buffered_bytes"];
        assert!(held <= budget, "holding {held} bytes, budget {budget}");
        honest.echo(b"still served");
    }
    let stats = observer.stats();
    assert_eq!(
        (stats["lingering"], stats["buffered_bytes"] / MIB),
        (4, 2),
        "{stats:?}"
    );
    server.wait_for_log("passed the memory budget");

    let mut told = 0;
    for attacker in &mut attackers {
        attacker
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(Some((op, message))) = attacker.try_recv() {
            assert_eq!(op, ERROR);
            let message = String::from_utf8_lossy(&message).into_owned();
            assert!(message.starts_with("memory budget exceeded"), "{message}");
            let mut rest = Vec::new();
            assert_eq!(attacker.stream.read_to_end(&mut rest).ok(), Some(0));
            told += 1;
        }
    }
    assert_eq!(told, 4, "evicted attackers told why");
    honest.echo(b"never touched");
    drop(attackers);
    drop(observer);
    let ok = wait_until(WAIT, || {
        let stats = honest.stats();
        (
            stats["active"],
            stats["closed_memory"],
            stats["buffered_bytes"],
        ) == (1, 4, 0)
    });
    assert!(ok, "{:?}", honest.stats());
    drop(honest);
    server.wait_for_fds(baseline);
}

/// 30 connections reaching the idle timeout together: the warning throttle lets 10 lines
/// through, and the other 20 must be reported by a line of their own once the throttle's
/// window ends, although no further warning comes to carry the count.
#[test]
fn a_burst_of_closes_reports_the_lines_it_suppressed_without_a_later_line() {
    let server = Server::start(&["--idle-timeout", "1"]);
    let clients: Vec<Client> = (0..30).map(|_| server.connect()).collect();
    let mut counted = 0;
    let ok = wait_until(WAIT, || {
        let log = server.log();
        let allowed = log
            .iter()
            .filter(|l| l.contains("closed: idle timeout"))
            .count();
        let suppressed: usize = log
            .iter()
            .filter_map(|l| {
                let (before, _) = l.split_once(" similar warnings about peers suppressed")?;
                before.rsplit(' ').next()?.parse::<usize>().ok()
            })
            .sum();
        counted = allowed + suppressed;
        counted == 30 && suppressed > 0
    });
    assert!(
        ok,
        "30 idle closes, {counted} accounted for in {:#?}",
        server.log()
    );
    drop(clients);
}
