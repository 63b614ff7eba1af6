//! `examples/resp.rs`, the Redis-protocol example, against the real Redis clients
//! (`redis-cli`, `redis-benchmark`; Debian package `redis-tools`, installed by `.ci/run`):
//! a codec of the service's own, and clients nobody here wrote, unchanged. The server runs
//! in-process through `closewait::testing`.

#[allow(dead_code)]
#[path = "../examples/resp.rs"]
mod resp;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use closewait::testing::{own_fds, wait_until, TestServer, WAIT};

/// The tests of this file run one at a time: the fd count is the whole process's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn start() -> TestServer {
    let store = resp::Store::default();
    TestServer::start(move || resp::Redis {
        store: store.clone(),
    })
}

/// Run a Redis tool (bounded by `timeout`), failing with a clear message if it is missing.
/// Every connection closed (none for a protocol error), no socket left in CLOSE_WAIT, then
/// a clean stop.
fn stop_with_nothing_open(server: TestServer) {
    use closewait::stats::Counter;
    let stats = server.handle().stats();
    assert!(
        wait_until(WAIT, || stats.get(Counter::Active) == 0),
        "connections left open"
    );
    assert_eq!(stats.get(Counter::ClosedProtocol), 0);
    assert_eq!(server.close_wait(), 0);
    server.stop().unwrap();
}

fn run(tool: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("timeout")
        .arg(WAIT.as_secs().to_string())
        .arg(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install redis-tools (.ci/run does)"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.code() != Some(127),
        "{tool} not found: install redis-tools (.ci/run does)"
    );
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cli(server: &TestServer, args: &[&str]) -> String {
    let port = server.addr().port().to_string();
    let out = run("redis-cli", &[&["-p", &port], args].concat(), b"");
    // Without a terminal redis-cli prints replies raw, one a line (errors with a blank line
    // after them).
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn redis_cli_sets_gets_counts_deletes_and_quits() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = start();
    assert_eq!(cli(&server, &["PING"]), "PONG");
    assert_eq!(cli(&server, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli(&server, &["GET", "greeting"]), "hello world");
    assert_eq!(cli(&server, &["ECHO", "line\r\nbreak"]), "line\r\nbreak");
    assert_eq!(cli(&server, &["INCR", "visits"]), "1");
    assert_eq!(cli(&server, &["INCR", "visits"]), "2");
    assert_eq!(
        cli(&server, &["INCR", "greeting"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(cli(&server, &["DEL", "greeting", "visits", "never"]), "2");
    assert_eq!(cli(&server, &["GET", "greeting"]), "", "nil");
    assert_eq!(
        cli(&server, &["FLUSHALL"]),
        "ERR unknown command 'FLUSHALL'"
    );
    assert_eq!(cli(&server, &["QUIT"]), "OK");

    // One connection, several commands (pipelined from stdin).
    let port = server.addr().port().to_string();
    let out = run("redis-cli", &["-p", &port], b"SET a 41\nINCR a\nGET a\n");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "OK\n42\n42\n");

    let stats = server.handle().stats();
    use closewait::stats::Counter;
    // A close's reason is counted a moment after `active` drops: wait for the reason.
    assert!(
        wait_until(WAIT, || stats.get(Counter::ClosedService) == 1),
        "QUIT did not close its connection"
    );
    stop_with_nothing_open(server);
}

/// The bar: redis-benchmark's pipelined run of PING (inline and multibulk), SET, GET
/// and INCR completes, every request answered, every connection closed after.
#[test]
fn redis_benchmark_pipelined_completes_and_leaves_nothing_open() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fds_before = own_fds();
    let server = start();
    let port = server.addr().port().to_string();
    let out = run(
        "redis-benchmark",
        &[
            "-p",
            &port,
            "-t",
            "ping,set,get,incr",
            "-P",
            "16",
            "-q",
            "-n",
            "20000",
            "-c",
            "8",
        ],
        b"",
    );
    let report = String::from_utf8(out.stdout).unwrap();
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        // `TEST: N requests per second`, after progress lines that end in \r only.
        let needle = format!("{test}: ");
        let found = report.match_indices(&needle).any(|(at, _)| {
            report[at + needle.len()..]
                .split_once(" requests per second")
                .is_some_and(|(rate, _)| rate.parse::<f64>().is_ok())
        });
        assert!(found, "no result for {test}:\n{report}");
    }
    let stats = server.handle().stats();
    use closewait::stats::Counter;
    assert!(
        stats.get(Counter::Requests) >= 5 * 20_000,
        "{} requests answered:\n{report}",
        stats.get(Counter::Requests)
    );
    stop_with_nothing_open(server);
    assert!(
        wait_until(WAIT, || own_fds() <= fds_before),
        "fds: {} before, {} after",
        fds_before,
        own_fds()
    );
}

/// QUIT pipelined with more commands: the server answers QUIT, answers nothing after it,
/// and closes (counted as `closed_service`).
#[test]
fn quit_ends_the_connection_after_its_reply_and_nothing_behind_it_is_answered() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = start();
    let mut client = std::net::TcpStream::connect(server.addr()).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client
        .write_all(b"SET k 1\r\nQUIT\r\nSET k 2\r\nPING\r\n")
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut client, &mut text).expect("EOF after QUIT");
    assert_eq!(text, "+OK\r\n+OK\r\n");
    drop(client);
    let stats = server.handle().stats();
    use closewait::stats::Counter;
    assert!(
        wait_until(WAIT, || stats.get(Counter::ClosedService) == 1),
        "QUIT did not close its connection"
    );
    assert_eq!(
        cli(&server, &["GET", "k"]),
        "1",
        "the SET after QUIT did not run"
    );
}
