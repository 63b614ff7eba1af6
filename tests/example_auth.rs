//! The auth example's tests over TCP: state per connection (a session per connection, its
//! own counter of requests, given back at the close) and the service's own counters in STATS
//! and the Prometheus output next to the server's.

#[allow(dead_code)]
#[path = "../examples/auth.rs"]
mod auth;

use std::io::{Read, Write};

use auth::{Auth, AuthCounters, AUTH, AUTH_REPLY, MAX_FAILURES, WHOAMI, WHOAMI_REPLY};
use closewait::service::{ERROR, PING, PING_REPLY};
use closewait::testing::{wait_until, TestServer, WAIT};
use closewait::{Config, Server};

/// The auth service (password `pw`) on 127.0.0.1:0 with its counters registered, not yet
/// running.
fn bind(config: Config) -> (Server<Auth>, AuthCounters) {
    let counters = AuthCounters::new();
    let make = {
        let counters = counters.clone();
        move || Auth {
            password: b"pw".to_vec(),
            counters: counters.clone(),
        }
    };
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let server = Server::with_service(config, make).expect("bind");
    (counters.register(server), counters)
}

/// [`bind`], running.
fn start(config: Config) -> (TestServer, AuthCounters) {
    let (server, counters) = bind(config);
    (TestServer::run(server), counters)
}

#[test]
fn each_connection_authenticates_for_itself_and_counts_its_own_requests() {
    let (server, counters) = start(Config::default());
    let (mut a, mut b) = (server.connect(), server.connect());
    assert_eq!(a.call(AUTH, b"pw"), (AUTH_REPLY, b"welcome".to_vec()));
    assert_eq!(a.call(PING, b""), (PING_REPLY, vec![]));
    let (op, message) = b.call(PING, b"");
    assert_eq!(
        (op, message.as_slice()),
        (ERROR, &b"authenticate first (AUTH)"[..])
    );
    assert_eq!(
        a.call(WHOAMI, b""),
        (WHOAMI_REPLY, 3u64.to_be_bytes().to_vec())
    );
    assert_eq!(b.call(AUTH, b"pw").0, AUTH_REPLY);
    assert_eq!(
        b.call(WHOAMI, b""),
        (WHOAMI_REPLY, 3u64.to_be_bytes().to_vec())
    );
    assert_eq!(counters.sessions.get(), 2);

    // The session comes back at the close: the gauge of open sessions goes down.
    drop(a);
    assert!(
        wait_until(WAIT, || counters.sessions.get() == 1),
        "auth_sessions is {} after one authenticated peer left",
        counters.sessions.get()
    );
    let stats = b.stats();
    assert_eq!(stats["auth_logins"], 2, "{stats:?}");
    assert_eq!(stats["auth_sessions"], 1, "{stats:?}");
    assert_eq!(stats["auth_refused"], 0, "{stats:?}");
}

#[test]
fn wrong_passwords_are_errors_and_the_last_allowed_one_closes() {
    let (server, counters) = start(Config::default());
    let mut client = server.connect();
    for _ in 0..MAX_FAILURES {
        assert_eq!(
            client.call(AUTH, b"guess"),
            (ERROR, b"wrong password".to_vec())
        );
    }
    assert_eq!(
        client.recv(),
        None,
        "open after {MAX_FAILURES} wrong passwords"
    );
    assert_eq!(counters.refused.get(), u64::from(MAX_FAILURES));
    assert_eq!(counters.sessions.get(), 0);
}

#[test]
fn service_counters_are_in_the_metrics_next_to_the_servers() {
    let (server, _counters) = bind(Config {
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    });
    let addr = server.metrics_addr().expect("metrics are on");
    let server = TestServer::run(server);
    let mut client = server.connect();
    assert_eq!(client.call(AUTH, b"pw").0, AUTH_REPLY);
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(WAIT)).unwrap();
    write!(http, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    for line in [
        "closewait_auth_logins_total 1",
        "closewait_auth_sessions 1",
        "closewait_auth_refused_total 0",
        "closewait_requests_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}
