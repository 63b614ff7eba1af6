//! `loadtest probe` must tell a leaking server from a correct one, whatever its language:
//! closewait and its `--leaky` variant, and the Python servers of docs/other-stacks/, each a
//! real process on 127.0.0.1 port 0.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Connections per way of ending: enough to see "all of them", few enough to stay quick.
const CONNECTIONS: &str = "20";
/// Seconds the server gets to release its sockets (a correct one needs milliseconds).
const WAIT: &str = "1";
/// The Python servers' request for a 1 MiB reply ("1048576\n"): larger than the socket
/// buffers, so the mid-reply peer really leaves while the server is writing.
const PYTHON_BIG_REQUEST: &str = "313034383537360a";

/// A server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Start `program args` and read its `listening on 127.0.0.1:PORT` line.
    fn start(program: &str, args: &[&str]) -> Server {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{program} {args:?}: unexpected first line {line:?}"));
        Server { child, port }
    }

    fn closewait(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--", "--listen", "127.0.0.1:0"];
        args.extend(extra);
        Server::start(env!("CARGO_BIN_EXE_loadtest"), &args)
    }

    fn python(script: &str) -> Server {
        Server::start(
            "python3",
            &[&format!("docs/other-stacks/python/{script}"), "0"],
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A closewait ECHO of the largest frame (1 MiB body): its reply outgrows the socket buffers.
fn closewait_big_echo() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("probe-echo-1mib.bin");
    let body = 1usize << 20;
    let mut frame = (body as u32).to_be_bytes().to_vec();
    frame.push(0x01);
    frame.resize(4 + body, b'x');
    std::fs::write(&path, frame).unwrap();
    path
}

/// Run the probe, with the pid left for it to find from the listening port.
fn probe(server: &Server, send: &[&str]) -> (Output, HashMap<String, Vec<String>>) {
    let addr = format!("127.0.0.1:{}", server.port);
    let mut args = vec!["probe", &addr, "--connections", CONNECTIONS, "--wait", WAIT];
    args.extend(send);
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(&args)
        .output()
        .expect("run loadtest probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains(&format!("pid {}", server.child.id())),
        "the probe did not find the server's pid:\n{stdout}"
    );
    // The table: a row per way, `way opened accepted released slowest close_wait held`.
    let rows = stdout
        .lines()
        .filter_map(|l| {
            let cols: Vec<String> = l.split_whitespace().map(String::from).collect();
            let known = ["fin", "half-close", "reset", "mid-reply"];
            (cols.len() == 7 && known.contains(&cols[0].as_str()))
                .then(|| (cols[0].clone(), cols[1..].to_vec()))
        })
        .collect();
    (out, rows)
}

/// `(released, close_wait, held_otherwise)` of one way.
fn counts(rows: &HashMap<String, Vec<String>>, way: &str) -> (u32, u32, u32) {
    let cols = &rows[way];
    let n = |i: usize| cols[i].parse().unwrap();
    (n(2), n(4), n(5))
}

fn report(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn probe_finds_the_fin_leak_of_closewait_leaky() {
    let server = Server::closewait(&["--leaky"]);
    let echo = closewait_big_echo();
    let (out, rows) = probe(&server, &["--send-file", echo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    // The FIN is ignored, in both its forms; a reset is noticed as an error.
    assert_eq!(counts(&rows, "fin"), (0, 20, 0), "{}", report(&out));
    assert_eq!(counts(&rows, "half-close"), (0, 20, 0), "{}", report(&out));
    assert_eq!(counts(&rows, "reset"), (20, 0, 0), "{}", report(&out));
    assert_eq!(counts(&rows, "mid-reply"), (20, 0, 0), "{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("verdict: LEAK: leaks one fd per peer FIN: fin 20 of 20 still in CLOSE_WAIT"),
        "{}",
        report(&out)
    );
}

#[test]
fn probe_passes_closewait() {
    let server = Server::closewait(&[]);
    let echo = closewait_big_echo();
    let (out, rows) = probe(&server, &["--send-file", echo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    for way in ["fin", "half-close", "reset", "mid-reply"] {
        assert_eq!(counts(&rows, way), (20, 0, 0), "{way}: {}", report(&out));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("verdict: no leak: the server released all 80 sockets"),
        "{}",
        report(&out)
    );
}

#[test]
fn probe_finds_every_leak_of_the_leaky_python_server() {
    let server = Server::python("leaky_server.py");
    let (out, rows) = probe(&server, &["--send", PYTHON_BIG_REQUEST]);
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    // Every peer that goes away ends in the handler's `except`, which never closes: after a
    // FIN the socket stays in CLOSE_WAIT; after a reset it leaves the TCP tables, fd held.
    assert_eq!(counts(&rows, "fin"), (0, 20, 0), "{}", report(&out));
    assert_eq!(counts(&rows, "half-close"), (0, 20, 0), "{}", report(&out));
    assert_eq!(counts(&rows, "reset"), (0, 0, 20), "{}", report(&out));
    assert_eq!(counts(&rows, "mid-reply"), (0, 0, 20), "{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("verdict: LEAK: leaks one fd per peer FIN and RST"),
        "{}",
        report(&out)
    );
}

#[test]
fn probe_passes_the_fixed_python_server() {
    let server = Server::python("fixed_server.py");
    let (out, rows) = probe(&server, &["--send", PYTHON_BIG_REQUEST]);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    for way in ["fin", "half-close", "reset", "mid-reply"] {
        assert_eq!(counts(&rows, way), (20, 0, 0), "{way}: {}", report(&out));
    }
}

#[test]
fn probe_refuses_an_address_that_is_not_loopback() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["probe", "192.0.2.1:80", "--wait", "1"])
        .output()
        .expect("run loadtest probe");
    assert_eq!(out.status.code(), Some(2), "{}", report(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn probe_refuses_a_pid_that_does_not_hold_the_servers_sockets() {
    // Else every socket would look released: a leak reported as a pass.
    let server = Server::closewait(&["--leaky"]);
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["probe", &format!("127.0.0.1:{}", server.port)])
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--connections",
            "2",
        ])
        .output()
        .expect("run loadtest probe");
    assert_eq!(out.status.code(), Some(2), "{}", report(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds none of the sockets"),
        "{}",
        report(&out)
    );
}
