//! The pool example's tests: deferred replies keep request order, a connection's waiting
//! requests are bounded, a reply completed after its connection closed goes nowhere (not to
//! the next connection in its slot), a dropped handle answers ERROR, and shutdown waits for
//! what is still being worked on.

#[allow(dead_code)]
#[path = "../examples/pool.rs"]
mod pool;

use std::sync::Arc;
use std::time::Duration;

use closewait::deferred::DROPPED;
use closewait::service::{ECHO, ECHO_REPLY, ERROR, PING, PING_REPLY};
use closewait::stats::Counter as Stat;
use closewait::testing::{frame, wait_until, TestServer, WAIT};
use closewait::{Config, Server};
use pool::{PoolCounters, Slow, ThreadPool, LOST, MAX_WAITING, SLEEP, SLEEP_REPLY};

/// The pool service with `threads` pool threads, on 127.0.0.1:0.
fn start(threads: usize) -> (TestServer, PoolCounters) {
    start_with(threads, Config::default())
}

/// [`start`] with a configuration of the test's own.
fn start_with(threads: usize, config: Config) -> (TestServer, PoolCounters) {
    let counters = PoolCounters::default();
    let pool = ThreadPool::new(threads, counters.clone());
    let make = {
        let counters = counters.clone();
        move || Slow {
            pool: Arc::clone(&pool),
            counters: counters.clone(),
        }
    };
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let server = Server::with_service(config, make).expect("bind");
    (TestServer::run(counters.register(server)), counters)
}

/// A SLEEP request body: `ms` then `data`.
fn sleep(ms: u16, data: &[u8]) -> Vec<u8> {
    [&ms.to_be_bytes()[..], data].concat()
}

#[test]
fn replies_leave_in_request_order_whatever_order_the_pool_finishes_in() {
    let (server, _) = start(4);
    let mut client = server.connect();
    let requests = [
        frame(SLEEP, &sleep(300, b"slow")),
        frame(SLEEP, &sleep(0, b"fast")),
        frame(PING, b""),
        frame(ECHO, b"now"),
        frame(LOST, b""),
        frame(SLEEP, &sleep(100, b"last")),
    ];
    client.send_raw(&requests.concat());
    let expected = [
        (SLEEP_REPLY, b"slow".to_vec()),
        (SLEEP_REPLY, b"fast".to_vec()),
        (PING_REPLY, vec![]),
        (ECHO_REPLY, b"now".to_vec()),
        (ERROR, DROPPED.as_bytes().to_vec()),
        (SLEEP_REPLY, b"last".to_vec()),
    ];
    for want in expected {
        assert_eq!(client.recv(), Some(want));
    }
}

#[test]
fn a_dropped_handle_answers_error_and_the_connection_goes_on() {
    let (server, _) = start(1);
    let mut client = server.connect();
    assert_eq!(client.call(LOST, b""), (ERROR, DROPPED.as_bytes().to_vec()));
    assert_eq!(client.call(PING, b""), (PING_REPLY, vec![]));
}

#[test]
fn a_connection_waits_for_at_most_max_deferred_requests_before_it_is_read_again() {
    // One pool thread, busy with the first request: nothing completes while the rest arrive.
    let (server, counters) = start(1);
    let mut client = server.connect();
    client.send(SLEEP, &sleep(1500, b"0"));
    for i in 1..MAX_WAITING as u64 {
        assert!(
            wait_until(WAIT, || counters.jobs.get() == i),
            "request {i} not read"
        );
        client.send(SLEEP, &sleep(0, &[b'0' + i as u8]));
    }
    assert!(wait_until(WAIT, || counters.jobs.get() == MAX_WAITING as u64));
    // At the bound: these stay in the socket while the first request is worked on.
    for i in MAX_WAITING..MAX_WAITING + 3 {
        client.send(SLEEP, &sleep(0, &[b'0' + i as u8]));
    }
    assert_read_no_further_than_the_bound(&counters);
    // Then the pool answers, the connection is read again, and every reply comes in order.
    for i in 0..MAX_WAITING + 3 {
        assert_eq!(client.recv(), Some((SLEEP_REPLY, vec![b'0' + i as u8])));
    }
    assert_eq!(counters.jobs.get(), MAX_WAITING as u64 + 3);
}

/// The bound holds inside one read too: requests behind the one that reached it wait in
/// the connection, unparsed, and are handed to the service only as earlier ones complete.
/// (Without it one 64 KiB read of small requests deferred thousands at once.)
#[test]
fn requests_read_in_one_batch_are_deferred_no_further_than_the_bound() {
    let (server, counters) = start(1);
    let mut client = server.connect();
    let extra = 100;
    let mut batch = frame(SLEEP, &sleep(1000, &[0]));
    for i in 1..MAX_WAITING + extra {
        batch.extend(frame(SLEEP, &sleep(0, &(i as u16).to_be_bytes())));
    }
    client.send_raw(&batch);
    assert_read_no_further_than_the_bound(&counters);
    expect_sleep_replies(&mut client, MAX_WAITING + extra);
    assert_eq!(counters.jobs.get(), (MAX_WAITING + extra) as u64);
}

/// The same when the request that reaches the bound is the end of a frame split across
/// reads (it is finished from the connection's buffer, the rest of the read stays there).
/// Whole requests waiting there are not an unfinished frame: a frame timeout shorter than
/// the wait does not end the connection.
#[test]
fn the_bound_holds_when_it_is_reached_by_a_frame_split_across_reads() {
    let (server, counters) = start_with(
        1,
        Config {
            frame_timeout: Some(Duration::from_millis(400)),
            ..Config::default()
        },
    );
    let stats = server.handle().stats();
    let mut client = server.connect();
    let mut first = frame(SLEEP, &sleep(1000, &[0]));
    for i in 1..MAX_WAITING - 1 {
        first.extend(frame(SLEEP, &sleep(0, &(i as u16).to_be_bytes())));
    }
    client.send_raw(&first);
    assert!(wait_until(WAIT, || counters.jobs.get() == MAX_WAITING as u64 - 1));
    let split = frame(SLEEP, &sleep(0, &(MAX_WAITING as u16 - 1).to_be_bytes()));
    client.send_raw(&split[..3]);
    assert!(wait_until(WAIT, || stats.get(Stat::BufferedBytes) > 0));
    let extra = 100;
    let mut rest = split[3..].to_vec();
    for i in MAX_WAITING..MAX_WAITING + extra {
        rest.extend(frame(SLEEP, &sleep(0, &(i as u16).to_be_bytes())));
    }
    client.send_raw(&rest);
    assert_read_no_further_than_the_bound(&counters);
    expect_sleep_replies(&mut client, MAX_WAITING + extra);
}

/// While the first request sleeps (1 s or more), no more than the bound are handed to the
/// pool.
fn assert_read_no_further_than_the_bound(counters: &PoolCounters) {
    assert!(wait_until(WAIT, || counters.jobs.get() == MAX_WAITING as u64));
    // A bounded wait, well inside the first request's second: a negative cannot be awaited.
    let past = wait_until(Duration::from_millis(300), || {
        counters.jobs.get() > MAX_WAITING as u64
    });
    assert!(
        !past,
        "deferred past the bound: {} requests",
        counters.jobs.get()
    );
}

/// `n` SLEEP replies, each carrying its request's index, in request order.
fn expect_sleep_replies(client: &mut closewait::testing::Client, n: usize) {
    assert_eq!(client.recv(), Some((SLEEP_REPLY, vec![0])));
    for i in 1..n {
        assert_eq!(
            client.recv(),
            Some((SLEEP_REPLY, (i as u16).to_be_bytes().to_vec())),
            "reply {i}"
        );
    }
}

#[test]
fn a_reply_completed_after_its_connection_closed_goes_nowhere() {
    let (server, counters) = start(2);
    let mut gone = server.connect();
    gone.send(SLEEP, &sleep(300, b"stale"));
    assert!(wait_until(WAIT, || counters.jobs.get() == 1));
    // A reset closes the connection at once, with its request still in the pool.
    socket2::SockRef::from(&gone.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(gone);
    let stats = server.handle().stats();
    assert!(wait_until(WAIT, || stats.get(Stat::ClosedReset) == 1));

    // The next connection takes the freed slot; the stale reply must not reach it.
    let mut next = server.connect();
    next.send(SLEEP, &sleep(600, b"fresh"));
    assert!(
        wait_until(WAIT, || counters.waiting.get() == 1),
        "stale one done"
    );
    assert_eq!(next.recv(), Some((SLEEP_REPLY, b"fresh".to_vec())));
    assert_eq!(next.call(PING, b""), (PING_REPLY, vec![]));
}

#[test]
fn a_peer_that_closes_its_side_still_gets_its_deferred_reply() {
    let (server, _) = start(1);
    let mut client = server.connect();
    client.send(SLEEP, &sleep(200, b"late"));
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(client.recv(), Some((SLEEP_REPLY, b"late".to_vec())));
    assert_eq!(client.recv(), None);
}

#[test]
fn shutdown_waits_for_deferred_replies() {
    let (server, counters) = start(1);
    let mut client = server.connect();
    client.send(SLEEP, &sleep(300, b"finished"));
    assert!(wait_until(WAIT, || counters.jobs.get() == 1));
    server.handle().shutdown();
    assert_eq!(client.recv(), Some((SLEEP_REPLY, b"finished".to_vec())));
    assert_eq!(client.recv(), None);
    server.stop().expect("a clean stop");
}

/// Replies held behind a waiting deferred request are memory the peer makes the server hold,
/// so they count against the memory budget: a peer that parks one slow request and pipelines
/// large ECHOs behind it is evicted (its held replies dropped, an abortive close), and an
/// honest client is untouched.
#[test]
fn replies_held_behind_a_deferred_request_count_against_the_memory_budget() {
    let budget = 512 * 1024;
    let (server, counters) = start_with(
        1,
        Config {
            max_buffered: Some(budget),
            ..Config::default()
        },
    );
    let stats = server.handle().stats();
    let mut honest = server.connect();
    let mut hoarder = server.connect();
    hoarder.send(SLEEP, &sleep(3000, b"slow"));
    assert!(wait_until(WAIT, || counters.jobs.get() == 1));
    let echo = frame(ECHO, &[9; 64 * 1024]);
    // 16 replies of 64 KiB (1 MiB) held behind the sleeping request: past the budget. The
    // writes may fail once the server has reset the connection.
    let mut writer = hoarder.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        for _ in 0..16 {
            if std::io::Write::write_all(&mut writer, &echo).is_err() {
                break;
            }
        }
    });
    assert!(
        wait_until(WAIT, || stats.get(Stat::ClosedMemory) == 1),
        "never evicted: buffered_bytes {}",
        stats.get(Stat::BufferedBytes)
    );
    sender.join().unwrap();
    // Dropped, not delivered: no ECHO reply arrives, and the close is a reset or EOF.
    match hoarder.try_recv() {
        Ok(None) | Err(_) => {}
        Ok(Some(reply)) => panic!("an evicted peer got a reply: op {:#x}", reply.0),
    }
    honest.send(PING, b"");
    assert_eq!(honest.recv(), Some((PING_REPLY, vec![])));
    assert!(
        wait_until(WAIT, || stats.get(Stat::BufferedBytes) == 0),
        "buffered_bytes {} after the eviction",
        stats.get(Stat::BufferedBytes)
    );
}
