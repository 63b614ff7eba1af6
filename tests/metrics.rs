//! The Prometheus endpoint (`--metrics`) and the alert rules in deploy/prometheus/, checked
//! with the real `promtool` (Debian package `prometheus`; `.ci/run` installs it).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};

use closewait::stats::{Counter, Kind};
use common::{wait_until, Server, WAIT};

/// Run promtool, failing with how to get it rather than skipping when it is missing.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install the Debian package prometheus (.ci/run does)"
            )
        });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// One HTTP request, as a scraper sends it; the status line, headers and body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Prometheus/2.42.0\r\n\
         Accept: text/plain;version=0.0.4\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    (head.to_string(), body.to_string())
}

fn scrape(server: &Server) -> String {
    let (head, body) = get(server.metrics.expect("started with --metrics"), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
        .parse()
        .unwrap()
}

/// Wait until a scrape shows `series` at `want`.
fn wait_for(server: &Server, series: &str, want: f64) -> String {
    let mut body = String::new();
    let seen = wait_until(WAIT, || {
        body = scrape(server);
        value(&body, series) == want
    });
    assert!(seen, "{series} never reached {want}:\n{body}");
    body
}

#[test]
fn a_scrape_of_a_busy_server_passes_promtool_check_metrics() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let mut client = server.connect();
    client.ping();
    let stats = client.stats();
    client.half_close();
    wait_for(&server, "closewait_closed_eof_total", 1.0);
    let mut held = server.connect();
    held.ping();
    let body = wait_for(&server, "closewait_active", 1.0);

    let out = promtool(&["check", "metrics"], Some(&body));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every STATS counter is exported, under its closewait_ name, typed as the table says.
    assert_eq!(stats.len(), Counter::ALL.len());
    for &counter in Counter::ALL {
        assert!(stats.contains_key(counter.name()));
        let declared = match counter.kind() {
            Kind::Counter => format!("# TYPE {}_total counter\n", counter.metric_name()),
            Kind::Gauge => format!("# TYPE {} gauge\n", counter.metric_name()),
        };
        assert!(
            body.contains(&declared),
            "STATS counter {} is not exported as {declared:?}:\n{body}",
            counter.name()
        );
    }
    // In base units: no milliseconds left.
    assert!(!body.contains("_ms"), "{body}");
    // The fd figures are the process's own, read at scrape time.
    let open = value(&body, "process_open_fds");
    assert!(
        (open - server.fds() as f64).abs() <= 3.0,
        "process_open_fds {open}, /proc says {}",
        server.fds()
    );
    assert_eq!(
        value(&body, "process_max_fds"),
        value(&body, "closewait_fd_limit")
    );
}

#[test]
fn the_limit_is_reread_at_each_scrape() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let body = scrape(&server);
    let limit = value(&body, "process_max_fds") as u64;
    let lower = (limit - 1).to_string();
    // An operator lowering the limit of the running process (util-linux prlimit).
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &server.pid().to_string(),
            &format!("--nofile={lower}:{lower}"),
        ])
        .status()
        .expect("run prlimit");
    assert!(status.success());
    let body = scrape(&server);
    assert_eq!(value(&body, "process_max_fds"), (limit - 1) as f64);
    assert_eq!(
        value(&body, "closewait_fd_limit"),
        limit as f64,
        "fd_limit keeps the start-up value until an accept fails"
    );
}

/// The honest way to make the server hold CLOSE_WAIT sockets is the leaky variant, which
/// really never closes them; meanwhile this test process holds one of its own, which the
/// server must not count (netlink lists every CLOSE_WAIT socket of the machine).
#[test]
fn the_close_wait_gauge_counts_the_servers_own_sockets_as_ss_does() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let not_the_servers = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_held_here, _) = listener.accept().unwrap();
    not_the_servers.shutdown(Shutdown::Both).unwrap();
    drop(not_the_servers);

    let server = Server::start(&["--leaky", "--metrics", "127.0.0.1:0"]);
    assert_eq!(value(&scrape(&server), "closewait_close_wait_sockets"), 0.0);
    for _ in 0..3 {
        let mut client = server.connect();
        client.ping();
        client.half_close();
    }
    assert!(
        wait_until(WAIT, || server.close_wait() == 3),
        "the leaky server should hold 3 CLOSE_WAIT sockets, /proc/net/tcp shows {}",
        server.close_wait()
    );
    let body = wait_for(&server, "closewait_close_wait_sockets", 3.0);
    assert_eq!(value(&body, "closewait_leaked_total"), 3.0);
}

#[test]
fn the_reference_server_shows_no_close_wait_and_times_each_fin_to_close() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    assert_eq!(
        value(&scrape(&server), "closewait_fin_to_close_seconds_count"),
        0.0
    );
    let mut client = server.connect();
    client.ping();
    client.half_close();
    // Observed after close(2), a moment after the close is counted: wait for the observation.
    let body = wait_for(&server, "closewait_fin_to_close_seconds_count", 1.0);
    assert_eq!(value(&body, "closewait_closed_eof_total"), 1.0);
    assert_eq!(
        value(&body, "closewait_fin_to_close_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    let sum = value(&body, "closewait_fin_to_close_seconds_sum");
    assert!(
        sum > 0.0 && sum < 300.0,
        "FIN-to-close sum {sum} s: not observed, or not in seconds"
    );
    assert_eq!(value(&body, "closewait_close_wait_sockets"), 0.0);

    // A reset is not a FIN: nothing more to time.
    let mut reset = server.connect();
    reset.ping();
    reset.reset();
    let body = wait_for(&server, "closewait_closed_reset_total", 1.0);
    assert_eq!(value(&body, "closewait_fin_to_close_seconds_count"), 1.0);
}

/// A close decided by the server lingers (writing shut down, input discarded) until the
/// peer's FIN: the read that returns 0 there starts a FIN-to-close time too.
#[test]
fn a_fin_read_while_lingering_is_timed_too() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let mut client = server.connect();
    client.send_raw(&[0, 0, 0, 0]); // length 0: invalid, ERROR then a lingering close
    let (op, _) = client.recv().expect("an ERROR frame");
    assert_eq!(op, common::ERROR);
    assert!(
        client.at_eof(),
        "the server shut down writing after the ERROR"
    );
    let body = wait_for(&server, "closewait_lingering", 1.0);
    assert_eq!(value(&body, "closewait_fin_to_close_seconds_count"), 0.0);
    client.half_close();
    // The histogram is observed after the close(2), a moment after the close is counted:
    // wait for the observation, not for the counter (a scrape between the two saw 0).
    let body = wait_for(&server, "closewait_fin_to_close_seconds_count", 1.0);
    assert_eq!(value(&body, "closewait_closed_protocol_total"), 1.0);
    assert_eq!(value(&body, "closewait_lingering"), 0.0);
}

/// A scraper that sends half a request holds the metrics thread for its request timeout,
/// never the event loop: the server answers PINGs while a second, well-behaved scrape is
/// still queued behind it, and that scrape is answered once the slow one is cut off.
#[test]
fn a_slow_scraper_stalls_neither_the_server_nor_scrapes_for_long() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = server.metrics.unwrap();
    let mut slow = TcpStream::connect(metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut queued = TcpStream::connect(metrics).unwrap();
    queued
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();

    let mut client = server.connect();
    for _ in 0..10 {
        client.ping();
    }
    queued.set_nonblocking(true).unwrap();
    let mut byte = [0];
    let early = queued.peek(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the queued scrape was answered before the PINGs were ({early:?}): the test did not \
         hold the metrics thread"
    );

    queued.set_nonblocking(false).unwrap();
    queued.set_read_timeout(Some(WAIT)).unwrap();
    let mut response = String::new();
    queued.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    // The slow scraper was closed without an answer.
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    server.wait_for_log("no whole request within");
}

#[test]
fn oversized_and_wrong_requests_get_an_http_error_and_the_next_scrape_works() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = server.metrics.unwrap();
    let mut big = TcpStream::connect(metrics).unwrap();
    big.set_read_timeout(Some(WAIT)).unwrap();
    let header = format!(
        "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n",
        "a".repeat(9000)
    );
    // The server may close (RST) before taking all of it: what it answered is what counts.
    let _ = big.write_all(header.as_bytes());
    let mut response = String::new();
    let _ = big.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response:?}");

    let (head, _) = get(metrics, "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_eq!(value(&scrape(&server), "closewait_active"), 0.0);
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_fires_and_clears() {
    let check = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None);
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = promtool(
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        None,
    );
    assert!(
        test.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    // Each alert of the rule file is exercised by the test file.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .unwrap();
    let tests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts_test.yml"
    ))
    .unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no test"
        );
    }
}

/// The rules must name metrics the server really exports, or they would never fire.
#[test]
fn every_metric_the_alert_rules_use_is_in_a_real_scrape() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let body = scrape(&server);
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .unwrap();
    let names: std::collections::BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("closewait_") || w.starts_with("process_"))
        .collect();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let exported = body.lines().any(|l| {
            l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && !l.starts_with('#')
        });
        assert!(
            exported,
            "alerts.yml uses {name}, which a scrape does not have"
        );
    }
}

#[test]
fn a_metrics_address_in_use_is_a_clear_error_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_closewait"))
        .args(["--listen", "127.0.0.1:0", "--metrics", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("cannot listen for metrics on {addr}")),
        "{log}"
    );
    assert!(
        out.stdout.is_empty(),
        "no listening line when start-up fails"
    );
}
