//! The demo must demonstrate: in a short comparison the leaky variant reaches its fd limit
//! with CLOSE_WAIT sockets, and the correct server never holds one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

fn loadtest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .expect("run loadtest")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn short_compare_shows_the_leak_and_the_fix() {
    let out = out_dir("compare");
    let run = loadtest(&[
        "compare",
        "--duration",
        "5",
        "--nofile",
        "128",
        "--clients",
        "32",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "compare failed:\n{stderr}");
    let csv = std::fs::read_to_string(out.join("samples.csv")).expect("samples.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<HashMap<&str, &str>> = lines
        .map(|l| header.iter().copied().zip(l.split(',')).collect())
        .collect();
    let column = |variant: &str, name: &str| -> Vec<u64> {
        rows.iter()
            .filter(|r| r["variant"] == variant)
            .map(|r| r[name].parse().unwrap())
            .collect()
    };
    let leaky_fds = column("leaky", "fds");
    let leaky_close_wait = column("leaky", "close_wait");
    assert!(
        leaky_fds.iter().max().unwrap() >= &120,
        "leaky never reached the limit of 128: {leaky_fds:?}"
    );
    assert!(
        leaky_close_wait.iter().max().unwrap() >= &60,
        "leaky CLOSE_WAIT: {leaky_close_wait:?}"
    );
    assert!(
        column("leaky", "accept_failing").contains(&1),
        "leaky never logged Too many open files"
    );
    let correct_fds = column("correct", "fds");
    assert!(
        correct_fds.iter().max().unwrap() < &64,
        "correct fds: {correct_fds:?}"
    );
    // A CLOSE_WAIT socket caught between its FIN and its close is fine; the same socket
    // still there a sample later is the leak.
    let correct_lingering = column("correct", "close_wait_lingering");
    assert!(
        correct_lingering.iter().all(|&n| n == 0),
        "correct server left CLOSE_WAIT sockets open: {correct_lingering:?}"
    );
    let leaky_lingering = column("leaky", "close_wait_lingering");
    assert!(
        leaky_lingering.last().unwrap() >= &60,
        "leaky CLOSE_WAIT sockets should stay: {leaky_lingering:?}"
    );
    assert_eq!(column("correct", "requests_failed").last(), Some(&0));
    assert!(
        column("correct", "peer_closes").last().unwrap() > &50,
        "too few peer closes to prove anything"
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        report.contains("Verdict: **pass**") && report.contains("fds.svg"),
        "{report}"
    );
    let svg = std::fs::read_to_string(out.join("fds.svg")).expect("fds.svg");
    assert!(svg.contains("<svg") && svg.contains("RLIMIT_NOFILE = 128"));
}

#[test]
fn watch_prints_fds_close_wait_and_the_limit_of_a_live_server() {
    // A real closewait (leaky, so a peer close shows up as CLOSE_WAIT) under nofile 256.
    let mut server = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "serve",
            "--nofile",
            "256",
            "--",
            "--listen",
            "127.0.0.1:0",
            "--leaky",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start loadtest serve");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .parse()
        .unwrap();
    let pid = server.id();
    for _ in 0..3 {
        drop(std::net::TcpStream::connect(addr).unwrap()); // three peer closes the leaky server ignores
    }
    let settled = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while closewait::testing::procfs::close_wait_sockets(pid).unwrap() < 3
        && std::time::Instant::now() < settled
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let run = loadtest(&[
        "watch",
        "--pid",
        &pid.to_string(),
        "--interval",
        "50",
        "--count",
        "2",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(run.status.success());
    let text = String::from_utf8(run.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "header and two samples:\n{text}");
    assert!(
        lines[0].contains("fds") && lines[0].contains("close_wait") && lines[0].contains("nofile")
    );
    for line in &lines[1..] {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.len(), 4, "{line}");
        assert!(cols[1].parse::<usize>().unwrap() >= 3 + 3, "{line}");
        assert_eq!(cols[2], "3", "{line}");
        assert_eq!(cols[3], "256", "{line}");
    }
}

#[test]
fn watch_fails_clearly_for_a_process_that_does_not_exist() {
    let run = loadtest(&["watch", "--pid", "4000000", "--count", "1"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("cannot read /proc/4000000"));
}

#[test]
fn watch_without_count_ends_with_success_when_the_process_exits() {
    // The child is not reaped until watch has ended, so it lingers as a zombie: watch must
    // see that as exited rather than print zero fds until someone reaps it.
    let mut child = Command::new("sleep")
        .arg("0.5")
        .spawn()
        .expect("start sleep");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "watch",
            "--pid",
            &child.id().to_string(),
            "--interval",
            "100",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start watch");
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > give_up {
            let _ = watch.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut watch.stdout.take().unwrap(), &mut text).unwrap();
    let _ = watch.wait();
    let _ = child.wait();
    let status = status.expect("watch still running 10 s after the process exited");
    assert!(status.success(), "{status}\n{text}");
    let last = text.lines().last().unwrap_or_default();
    assert_eq!(last, format!("process {} exited", child.id()), "{text}");
    assert!(
        text.lines().count() >= 3,
        "header, samples, exit line:\n{text}"
    );
}
