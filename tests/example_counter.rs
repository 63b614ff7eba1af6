//! The counter service's tests, served in-process on a free port by `closewait::testing`:
//! what its ops mean over TCP, with other workers, embedded in a program, and that peers
//! which leave leave nothing behind. docs/template.md shows this file whole.

// The service under test (with its unit tests). In your crate: `use your_service::*;`.
#[allow(dead_code)]
#[path = "../examples/counter.rs"]
mod counter;

use closewait::service::ERROR;
use closewait::stats::Counter as Stat;
use closewait::testing::{wait_until, Client, TestServer, WAIT};
use closewait::{Config, Server};
use counter::{Counter, Counters, GET, INCR, INCR_REPLY};

/// The counter service on 127.0.0.1:0, with `config`'s limits.
fn start(config: Config) -> TestServer {
    let counters = Counters::default();
    TestServer::start_with(config, move || Counter {
        counters: counters.clone(),
    })
}

/// The value of an INCR or GET reply.
fn value(client: &mut Client, op: u8, name: &[u8]) -> u64 {
    let (reply_op, data) = client.call(op, name);
    assert_eq!(reply_op, op | 0x80, "reply to 0x{op:02x}: {data:?}");
    u64::from_be_bytes(data.try_into().expect("an 8-byte value"))
}

#[test]
fn counts_per_name_across_connections() {
    let server = start(Config::default());
    let (mut a, mut b) = (server.connect(), server.connect());
    assert_eq!(value(&mut a, INCR, b"apples"), 1);
    assert_eq!(value(&mut a, INCR, b"apples"), 2);
    assert_eq!(value(&mut b, GET, b"apples"), 2);
    assert_eq!(value(&mut b, GET, b"pears"), 0);
    assert_eq!(value(&mut b, INCR, b"pears"), 1);
    a.ping();
    assert_eq!(b.stats()["active"], 2);
}

#[test]
fn errors_are_replies_and_the_connection_stays_usable() {
    let server = start(Config::default());
    let mut client = server.connect();
    assert_eq!(client.call(0x42, b""), (ERROR, b"unknown op 0x42".to_vec()));
    let (op, message) = client.call(INCR, b"");
    assert_eq!(op, ERROR, "empty name");
    assert!(String::from_utf8(message).unwrap().contains("name"));
    assert_eq!(value(&mut client, INCR, b"after"), 1);
}

#[test]
fn workers_share_the_counters() {
    let server = start(Config {
        workers: 2,
        ..Config::default()
    });
    // The kernel spreads connections over both workers; the count must not care.
    let mut clients: Vec<Client> = (0..16).map(|_| server.connect()).collect();
    for client in &mut clients {
        value(client, INCR, b"hits");
    }
    assert_eq!(value(&mut clients[0], GET, b"hits"), 16);
    assert_eq!(clients[0].stats()["workers"], 2);
}

#[test]
fn peers_that_leave_leave_no_connection_and_no_close_wait() {
    let server = start(Config::default());
    let stats = server.handle().stats();
    let mut visits = 0;
    for i in 0..60 {
        let mut client = server.connect();
        visits += 1;
        assert_eq!(value(&mut client, INCR, b"visits"), visits);
        match i % 3 {
            // Close with FIN, or with RST.
            0 => drop(client),
            1 => client.reset(),
            // FIN with a request in flight: its reply still arrives, then EOF.
            _ => {
                client.send(INCR, b"visits");
                client.half_close();
                visits += 1;
                let (op, data) = client.recv().expect("the reply before EOF");
                assert_eq!((op, data), (INCR_REPLY, visits.to_be_bytes().to_vec()));
                assert!(client.at_eof());
            }
        }
    }
    assert!(
        wait_until(WAIT, || stats.get(Stat::Active) == 0),
        "{} connections still open",
        stats.get(Stat::Active)
    );
    assert_eq!(server.close_wait(), 0, "sockets left in CLOSE_WAIT");
}

/// Embedded in a program of your own: bind, run on a thread, stop through the handle.
#[test]
fn embedded_in_a_program_of_your_own() -> std::io::Result<()> {
    let counters = Counters::default();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(), // the OS picks the port
        ..Config::default()
    };
    let server = Server::with_service(config, move || Counter {
        counters: counters.clone(),
    })?;
    let addr = server.local_addr();
    let handle = server.handle(); // stop it, read its counters
    let thread = std::thread::spawn(move || server.run());

    let mut client = Client::connect(addr);
    assert_eq!(value(&mut client, INCR, b"embedded"), 1);

    handle.shutdown(); // graceful: answer, flush, close
    thread.join().expect("the server thread")?;
    assert!(client.at_eof());
    Ok(())
}
