//! `loadtest bench --quick` runs end to end: exit 0, bench.md and bench.csv written, rows for
//! every server, churn leaves each server's fd count where it started, the user/kernel
//! split of the server's CPU adds up to its total, syscalls and among them epoll waits were
//! counted (perf), request latencies were recorded in ping-pong and pipelined, the scale step held its connections and left no CLOSE_WAIT, and every
//! target of issue #15 is marked.
//! No timing assertions: the numbers depend on the machine.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_bench_writes_report_and_churn_leaks_no_fds() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-quick");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .status()
        .expect("run loadtest bench");
    assert!(status.success(), "loadtest bench --quick failed: {status}");

    let md = std::fs::read_to_string(out.join("bench.md")).expect("bench.md");
    assert!(md.contains("| ping-pong |"), "{md}");
    let csv = std::fs::read_to_string(out.join("bench.csv")).expect("bench.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("csv header").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
    };
    let (server, figure, fd_start, fd_end) =
        (col("server"), col("figure"), col("fd_start"), col("fd_end"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for name in ["closewait", "closewait-w2", "limit", "tokio-baseline"] {
        for fig in [
            "ping-pong",
            "pipelined",
            "idle-memory",
            "close-storm",
            "churn",
        ] {
            assert!(
                rows.iter().any(|r| r[server] == name && r[figure] == fig),
                "no {fig} row for {name} in\n{csv}"
            );
        }
    }
    // The split rows must account for the same CPU time as the per-CPU-second figure, or
    // the "where the CPU goes" reading in docs/performance.md would rest on nothing.
    let (user, system) = (col("server_user_ns_per_op"), col("server_system_ns_per_op"));
    for r in rows
        .iter()
        .filter(|r| ["ping-pong", "pipelined", "churn"].contains(&r[figure]))
    {
        let per_cpu = if r[figure] == "churn" {
            col("conns_per_server_cpu_s")
        } else {
            col("req_per_server_cpu_s")
        };
        let num = |i: usize| -> f64 {
            r[i].parse().unwrap_or_else(|_| {
                panic!(
                    "{} {}: column {} is {:?}",
                    r[server], r[figure], header[i], r[i]
                )
            })
        };
        let (u, s, ops_per_cpu_s) = (num(user), num(system), num(per_cpu));
        assert!(u >= 0.0 && s > 0.0, "{r:?}");
        let total_ns = 1e9 / ops_per_cpu_s;
        assert!(
            ((u + s) - total_ns).abs() <= total_ns * 1e-6,
            "{} {}: user {u} + system {s} ns per op is not the total {total_ns}",
            r[server],
            r[figure]
        );
    }
    // A count, for every server, or the syscall targets would silently read "not measured";
    // the epoll_wait share and the rest add up to it (one perf process, one window).
    let (syscalls, epoll_waits, others) = (
        col("syscalls_per_req"),
        col("epoll_waits_per_req"),
        col("other_syscalls_per_req"),
    );
    for r in rows
        .iter()
        .filter(|r| r[figure] == "ping-pong" || r[figure] == "pipelined")
    {
        let num = |i: usize| -> f64 {
            r[i].parse().unwrap_or_else(|_| {
                panic!(
                    "{} {}: no {} (is perf installed and allowed tracepoints?): {r:?}",
                    r[server], r[figure], header[i]
                )
            })
        };
        let (n, e, o) = (num(syscalls), num(epoll_waits), num(others));
        assert!(n > 0.0 && e > 0.0 && o > 0.0, "{r:?}");
        assert!((e + o - n).abs() <= n * 1e-9, "{r:?}");
    }
    // Latency percentiles for every server in both request loads, or the RTT targets would
    // read "not measured" (pipelined was once not timed at all).
    let (p50, p99, p999) = (col("p50_us"), col("p99_us"), col("p999_us"));
    for r in rows
        .iter()
        .filter(|r| r[figure] == "ping-pong" || r[figure] == "pipelined")
    {
        let num = |i: usize| -> f64 {
            r[i].parse()
                .unwrap_or_else(|_| panic!("{} {}: no {}: {r:?}", r[server], r[figure], header[i]))
        };
        let (a, b, c) = (num(p50), num(p99), num(p999));
        assert!(
            a >= 1.0 && a <= b && b <= c,
            "percentiles out of order: {r:?}"
        );
    }
    // Scale: closewait and the baseline, every connection held and released, no CLOSE_WAIT.
    let (conns, close_wait) = (col("conns"), col("close_wait"));
    for name in ["closewait", "tokio-baseline"] {
        let r = rows
            .iter()
            .find(|r| r[server] == name && r[figure] == "scale")
            .unwrap_or_else(|| panic!("no scale row for {name} in\n{csv}"));
        assert_eq!(r[conns], "2000", "{name}: {r:?}");
        assert_eq!(
            r[close_wait], "0",
            "{name}: CLOSE_WAIT left after the storm: {r:?}"
        );
        for key in [
            "rss_per_held_conn",
            "ping_p99_us",
            "busy_ping_p99_us",
            "release_ms",
        ] {
            assert!(!r[col(key)].is_empty(), "{name}: no {key}: {r:?}");
        }
    }
    let targets = md
        .split("## Targets")
        .nth(1)
        .unwrap_or_else(|| panic!("no targets section in\n{md}"));
    let marked = targets
        .lines()
        .filter(|l| l.ends_with("| met |") || l.ends_with("| **not met** |"))
        .count();
    assert_eq!(marked, 12, "every target measured and marked:\n{targets}");
    for r in rows.iter().filter(|r| r[figure] == "churn") {
        assert!(!r[fd_start].is_empty(), "churn row without fd_start: {r:?}");
        assert_eq!(
            r[fd_start], r[fd_end],
            "{}: churn left the fd count at {} (started at {})",
            r[server], r[fd_end], r[fd_start]
        );
    }
}
