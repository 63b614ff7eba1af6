//! Graceful shutdown: stop accepting, answer what was received, flush, close, exit 0 —
//! within the drain timeout even when a peer will not read.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use closewait::service::Reference;
use closewait::{Config, Context, Reply, Server as Embedded, Service};
use common::*;

#[test]
fn sigterm_answers_received_requests_then_exits_zero() {
    let mut server = Server::start(&[]);
    let mut clients: Vec<Client> = (0..5).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.ping(); // accepted and registered before the signal
        let batch: Vec<u8> = (0..100u32)
            .flat_map(|i| frame(ECHO, &i.to_be_bytes()))
            .collect();
        client.send_raw(&batch);
    }
    server.terminate();
    for client in &mut clients {
        for i in 0..100u32 {
            assert_eq!(client.recv(), Some((ECHO_REPLY, i.to_be_bytes().to_vec())));
        }
        assert_eq!(client.recv(), None, "closed after its replies");
    }
    assert_eq!(server.wait_exit(WAIT), Some(0));
    assert!(server.log_contains("SIGTERM received"));
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("stopped;") && l.contains("closed_shutdown=5")),
        "{:#?}",
        server.log()
    );
}

#[test]
fn shutdown_with_a_peer_that_never_reads_ends_at_the_drain_timeout() {
    let mut server = Server::start(&["--drain-timeout", "1"]);
    let mut client = server.connect();
    client.ping();
    // Queue far more replies than the socket buffers hold, and read none of them.
    let writer = {
        let mut stream = client.stream.try_clone().unwrap();
        thread::spawn(move || {
            let chunk: Vec<u8> = (0..64).flat_map(|_| frame(ECHO, &[0; 16 * 1024])).collect();
            for _ in 0..64 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    // The peer's receive window is full: the server now holds replies it cannot send.
    assert!(
        wait_until(WAIT, || server.unacked_output() > 0),
        "server never filled the peer's window"
    );
    let start = Instant::now();
    server.terminate();
    assert_eq!(server.wait_exit(WAIT), Some(0));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "drain took {took:?}"
    );
    assert!(server.log_contains("drain timeout"));
    drop(client);
    writer.join().unwrap();
}

#[test]
fn embedded_server_serves_and_stops_from_another_thread() {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let server = Embedded::bind(config).expect("bind");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let handle = server.handle();
    let thread = thread::spawn(move || server.run());
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(&frame(PING, b"")).unwrap();
    let mut pong = [0; 5];
    client.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0, 0, 0, 1, PING_REPLY]);
    assert_eq!(handle.stats().get(closewait::stats::Counter::Active), 1);
    handle.shutdown();
    let mut rest = Vec::new();
    assert_eq!(
        client.read_to_end(&mut rest).unwrap(),
        0,
        "server closed our connection"
    );
    thread.join().unwrap().expect("run returns Ok");
    assert!(TcpStream::connect(addr).is_err(), "listener closed");
}

/// The reference service, except that op [`HOLD`] keeps the event loop busy until released:
/// a way to have requests arrive while the loop is not reading.
struct Holding {
    entered: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

const HOLD: u8 = 0x7e;

impl Service for Holding {
    type Codec = closewait::LengthPrefixed;
    type Session = ();

    fn call(&mut self, request: &[u8], _: &mut (), reply: &mut Reply<'_>, cx: &Context<'_>) {
        if request[0] == HOLD {
            self.entered.store(true, Ordering::SeqCst);
            let until = Instant::now() + WAIT;
            while !self.release.load(Ordering::SeqCst) && Instant::now() < until {
                thread::sleep(Duration::from_millis(1));
            }
            reply.send(PING_REPLY, b"");
        } else {
            Reference.call(request, &mut (), reply, cx);
        }
    }
}

/// Requests that reached the socket but were not read yet when the stop came are still
/// answered: `begin_shutdown` reads them (bounded) before it drains. Here they arrive while
/// the loop is held inside a request, so no readiness event can have read them first.
#[test]
fn shutdown_answers_requests_that_arrived_but_were_not_yet_read() {
    let (entered, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let service = {
        let (entered, release) = (entered.clone(), release.clone());
        move || Holding {
            entered: entered.clone(),
            release: release.clone(),
        }
    };
    let server = Embedded::with_service(config, service).expect("bind");
    let addr = server.local_addr();
    let handle = server.handle();
    let thread = thread::spawn(move || server.run());
    let mut waiting = Client::connect(addr);
    waiting.ping(); // accepted and registered
    let mut holder = Client::connect(addr);
    holder.send(HOLD, b"");
    assert!(
        wait_until(WAIT, || entered.load(Ordering::SeqCst)),
        "the loop never ran the HOLD request"
    );
    let batch: Vec<u8> = (0..100u32)
        .flat_map(|i| frame(ECHO, &i.to_be_bytes()))
        .collect();
    waiting.send_raw(&batch);
    handle.shutdown();
    release.store(true, Ordering::SeqCst);
    assert_eq!(holder.recv(), Some((PING_REPLY, vec![])));
    for i in 0..100u32 {
        assert_eq!(
            waiting.recv(),
            Some((ECHO_REPLY, i.to_be_bytes().to_vec())),
            "reply {i} of the requests sent before the stop"
        );
    }
    assert_eq!(waiting.recv(), None, "closed after its replies");
    thread.join().unwrap().expect("run returns Ok");
}
