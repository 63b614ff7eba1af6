//! bench.md (medians and ratios, setup, machine) and bench.csv (every measurement).

use std::fmt::Write as _;

use super::server::Kind;
use super::Figure;

/// One server, one run, one figure.
pub struct Row {
    /// 1-based run number.
    pub run: u32,
    /// The server measured.
    pub server: Kind,
    /// The figure measured.
    pub figure: Figure,
    /// `(column, value)` pairs; columns are those of [`COLUMNS`].
    pub metrics: Vec<(&'static str, f64)>,
}

impl Row {
    fn get(&self, key: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, v)| v)
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "run {} {:<14} {:<11}",
            self.run,
            self.server.name(),
            self.figure.name()
        );
        for (k, v) in &self.metrics {
            let _ = write!(s, " {k}={}", fmt_value(*v));
        }
        s
    }
}

/// Every CSV column after `run,server,figure`, in order.
pub const COLUMNS: &[&str] = &[
    "req_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "req_per_server_cpu_s",
    "conns_per_s",
    "conns_per_server_cpu_s",
    "server_user_ns_per_op",
    "server_system_ns_per_op",
    "server_cpu_cores",
    "gen_cpu_cores",
    "other_cpu_cores",
    "window_s",
    "bytes_per_conn",
    "bytes_per_conn_after_ping",
    "close_ms",
    "fd_ms",
    "poll_ms",
    "fd_reads",
    "close_wait",
    "close_wait_checked_ms",
    "errors",
    "fd_start",
    "fd_end",
    "syscalls_per_req",
    "epoll_waits_per_req",
    "other_syscalls_per_req",
    "conns",
    "client_procs",
    "source_addrs",
    "establish_s",
    "establish_per_s",
    "rss_per_held_conn",
    "slab_per_socket",
    "ping_p50_us",
    "ping_p99_us",
    "ping_max_us",
    "active_req_per_s",
    "busy_ping_p50_us",
    "busy_ping_p99_us",
    "busy_ping_max_us",
    "release_ms",
    "fd_read_ms",
    "peer_close_ms",
];

/// What the table shows: figure, column, label.
const TABLE: &[(Figure, &str, &str)] = &[
    (
        Figure::PingPong,
        "req_per_s",
        "requests/s (higher is better)",
    ),
    (Figure::PingPong, "p50_us", "RTT p50, µs"),
    (Figure::PingPong, "p99_us", "RTT p99, µs"),
    (Figure::PingPong, "p999_us", "RTT p99.9, µs"),
    (
        Figure::PingPong,
        "server_cpu_cores",
        "server CPU, cores busy",
    ),
    (
        Figure::PingPong,
        "req_per_server_cpu_s",
        "requests per server CPU-second (higher is better)",
    ),
    (
        Figure::PingPong,
        "server_user_ns_per_op",
        "server CPU in user space per request, ns (lower is better)",
    ),
    (
        Figure::PingPong,
        "server_system_ns_per_op",
        "server CPU in the kernel per request, ns (lower is better)",
    ),
    (
        Figure::PingPong,
        "syscalls_per_req",
        "server syscalls per request (perf count; lower is better)",
    ),
    (
        Figure::PingPong,
        "epoll_waits_per_req",
        "of which epoll_wait per request",
    ),
    (
        Figure::PingPong,
        "other_syscalls_per_req",
        "server syscalls per request besides epoll_wait (lower is better)",
    ),
    (
        Figure::PingPong,
        "gen_cpu_cores",
        "generator CPU, cores busy",
    ),
    (
        Figure::PingPong,
        "other_cpu_cores",
        "other CPU (not server or generator), cores busy",
    ),
    (
        Figure::Pipelined,
        "req_per_s",
        "requests/s (higher is better)",
    ),
    (Figure::Pipelined, "p50_us", "RTT p50, µs"),
    (Figure::Pipelined, "p99_us", "RTT p99, µs"),
    (Figure::Pipelined, "p999_us", "RTT p99.9, µs"),
    (
        Figure::Pipelined,
        "server_cpu_cores",
        "server CPU, cores busy",
    ),
    (
        Figure::Pipelined,
        "req_per_server_cpu_s",
        "requests per server CPU-second (higher is better)",
    ),
    (
        Figure::Pipelined,
        "server_user_ns_per_op",
        "server CPU in user space per request, ns (lower is better)",
    ),
    (
        Figure::Pipelined,
        "server_system_ns_per_op",
        "server CPU in the kernel per request, ns (lower is better)",
    ),
    (
        Figure::Pipelined,
        "syscalls_per_req",
        "server syscalls per request (perf count; lower is better)",
    ),
    (
        Figure::Pipelined,
        "epoll_waits_per_req",
        "of which epoll_wait per request",
    ),
    (
        Figure::Pipelined,
        "other_syscalls_per_req",
        "server syscalls per request besides epoll_wait (lower is better)",
    ),
    (
        Figure::Pipelined,
        "gen_cpu_cores",
        "generator CPU, cores busy",
    ),
    (
        Figure::Pipelined,
        "other_cpu_cores",
        "other CPU (not server or generator), cores busy",
    ),
    (
        Figure::IdleMemory,
        "bytes_per_conn",
        "RSS per idle connection, bytes (lower is better)",
    ),
    (
        Figure::IdleMemory,
        "bytes_per_conn_after_ping",
        "RSS per connection after one PING each, bytes",
    ),
    (
        Figure::CloseStorm,
        "close_ms",
        "last client FIN → last server FIN back, ms (lower is better)",
    ),
    (
        Figure::CloseStorm,
        "fd_ms",
        "last client FIN → server fd count seen down, ms",
    ),
    (
        Figure::CloseStorm,
        "poll_ms",
        "resolution of the fd count: one read of /proc/PID/fd, ms",
    ),
    (
        Figure::CloseStorm,
        "close_wait",
        "server CLOSE_WAIT sockets at the check",
    ),
    (
        Figure::Churn,
        "conns_per_s",
        "connections/s (higher is better)",
    ),
    (Figure::Churn, "server_cpu_cores", "server CPU, cores busy"),
    (
        Figure::Churn,
        "conns_per_server_cpu_s",
        "connections per server CPU-second",
    ),
    (
        Figure::Churn,
        "server_user_ns_per_op",
        "server CPU in user space per connection, ns (lower is better)",
    ),
    (
        Figure::Churn,
        "server_system_ns_per_op",
        "server CPU in the kernel per connection, ns (lower is better)",
    ),
    (Figure::Churn, "gen_cpu_cores", "generator CPU, cores busy"),
    (
        Figure::Churn,
        "other_cpu_cores",
        "other CPU (not server or generator), cores busy",
    ),
    (Figure::Churn, "fd_start", "server fds before"),
    (Figure::Churn, "fd_end", "server fds after (settled)"),
    (Figure::Scale, "conns", "connections held"),
    (Figure::Scale, "client_procs", "client processes"),
    (Figure::Scale, "source_addrs", "client source addresses"),
    (
        Figure::Scale,
        "establish_per_s",
        "connections/s establishing all (higher is better)",
    ),
    (Figure::Scale, "establish_s", "time to establish all, s"),
    (
        Figure::Scale,
        "rss_per_held_conn",
        "RSS per held connection, bytes (lower is better)",
    ),
    (
        Figure::Scale,
        "slab_per_socket",
        "kernel slab per socket (ΔSlab ÷ 2N, both ends), bytes",
    ),
    (
        Figure::Scale,
        "ping_p50_us",
        "PING RTT p50 with all held, µs",
    ),
    (
        Figure::Scale,
        "ping_p99_us",
        "PING RTT p99 with all held, µs",
    ),
    (
        Figure::Scale,
        "ping_max_us",
        "PING RTT max with all held, µs",
    ),
    (
        Figure::Scale,
        "active_req_per_s",
        "1 % active: pipelined ECHO requests/s",
    ),
    (
        Figure::Scale,
        "busy_ping_p50_us",
        "1 % active: PING RTT p50 on idle ones, µs",
    ),
    (
        Figure::Scale,
        "busy_ping_p99_us",
        "1 % active: PING RTT p99 on idle ones, µs",
    ),
    (
        Figure::Scale,
        "busy_ping_max_us",
        "1 % active: PING RTT max on idle ones, µs",
    ),
    (
        Figure::Scale,
        "peer_close_ms",
        "all peers close: the slowest client's close() of its share, ms",
    ),
    (
        Figure::Scale,
        "release_ms",
        "all peers close → server fds back to start, ms (lower is better)",
    ),
    (
        Figure::Scale,
        "fd_read_ms",
        "resolution: one read of /proc/PID/fd with all held, ms",
    ),
    (
        Figure::Scale,
        "close_wait",
        "server CLOSE_WAIT sockets after the release",
    ),
    (
        Figure::Scale,
        "other_cpu_cores",
        "other CPU (not server, generator or clients), cores busy",
    ),
];

/// Columns whose ratio means nothing (counts and context, not performance).
const NO_RATIO: &[&str] = &[
    "gen_cpu_cores",
    "other_cpu_cores",
    "poll_ms",
    "close_wait",
    "fd_start",
    "fd_end",
    "conns",
    "client_procs",
    "source_addrs",
    "fd_read_ms",
    "peer_close_ms",
];

/// The machine the numbers come from.
pub struct Machine {
    nproc: usize,
    kernel: String,
    cpu: String,
    pinning: String,
}

impl Machine {
    /// Read what /proc says about this machine.
    pub fn probe(nproc: usize, pinning: String) -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        Machine {
            nproc,
            kernel,
            cpu,
            pinning,
        }
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Median over runs of one column for one server and figure.
fn median_of(rows: &[Row], figure: Figure, server: Kind, key: &str) -> Option<f64> {
    median(
        rows.iter()
            .filter(|r| r.figure == figure && r.server == server)
            .filter_map(|r| r.get(key))
            .collect(),
    )
}

/// The median over runs of `k ÷ against` within each run (the servers of one run ran minutes
/// apart at most, so machine drift between runs cancels out).
fn ratio_of(
    rows: &[Row],
    runs: u32,
    figure: Figure,
    key: &str,
    k: Kind,
    against: Kind,
) -> Option<f64> {
    let per_run: Vec<f64> = (1..=runs)
        .filter_map(|run| {
            let at = |kind: Kind| {
                rows.iter()
                    .find(|r| r.run == run && r.figure == figure && r.server == kind)
                    .and_then(|r| r.get(key))
            };
            match (at(k), at(against)) {
                (Some(v), Some(b)) if b != 0.0 => Some(v / b),
                _ => None,
            }
        })
        .collect();
    median(per_run)
}

/// The targets of issue #15, each marked met, not met, or not measured.
fn targets(rows: &[Row], runs: u32) -> String {
    use Figure::{PingPong, Pipelined, Scale};
    use Kind::{Baseline, Closewait, Limit};
    let r = |f, key, against| ratio_of(rows, runs, f, key, Closewait, against);
    let v = |f, key| median_of(rows, f, Closewait, key);
    let at_least = |x: Option<f64>, min: f64| x.map(|x| (x, x >= min));
    let at_most = |x: Option<f64>, max: f64| x.map(|x| (x, x <= max));
    // (target, closewait's value and whether it meets it, unit)
    type Target = (&'static str, Option<(f64, bool)>, &'static str);
    let targets: Vec<Target> = vec![
        (
            "ping-pong requests per server CPU-second ≥ 0.98 × limit",
            at_least(r(PingPong, "req_per_server_cpu_s", Limit), 0.98),
            "×",
        ),
        (
            "pipelined requests per server CPU-second ≥ 0.98 × limit",
            at_least(r(Pipelined, "req_per_server_cpu_s", Limit), 0.98),
            "×",
        ),
        (
            "ping-pong syscalls per request ≤ 2.05",
            at_most(v(PingPong, "syscalls_per_req"), 2.05),
            "",
        ),
        (
            "ping-pong syscalls per request besides epoll_wait ≤ 2.05",
            at_most(v(PingPong, "other_syscalls_per_req"), 2.05),
            "",
        ),
        (
            "pipelined requests/s ≥ 1.1 × tokio",
            at_least(r(Pipelined, "req_per_s", Baseline), 1.1),
            "×",
        ),
        (
            "ping-pong RTT p99 no worse than limit (ratio ≤ 1)",
            at_most(r(PingPong, "p99_us", Limit), 1.0),
            "×",
        ),
        (
            "ping-pong RTT p99 no worse than tokio (ratio ≤ 1)",
            at_most(r(PingPong, "p99_us", Baseline), 1.0),
            "×",
        ),
        (
            "pipelined RTT p99 no worse than limit (ratio ≤ 1)",
            at_most(r(Pipelined, "p99_us", Limit), 1.0),
            "×",
        ),
        (
            "pipelined RTT p99 no worse than tokio (ratio ≤ 1)",
            at_most(r(Pipelined, "p99_us", Baseline), 1.0),
            "×",
        ),
        (
            "all held: RSS per connection ≤ 200 B",
            at_most(v(Scale, "rss_per_held_conn"), 200.0),
            " B",
        ),
        (
            "all held: PING p99 ≤ 1 ms",
            at_most(v(Scale, "ping_p99_us"), 1000.0),
            " µs",
        ),
        (
            "all peers close: release no slower than tokio (ratio ≤ 1)",
            at_most(r(Scale, "release_ms", Baseline), 1.0),
            "×",
        ),
    ];
    let mut md = String::from(
        "\n## Targets (issue #15; closewait's medians, ratios as in the table)\n\n| target | closewait | result |\n|---|--:|---|\n",
    );
    for (name, got, unit) in targets {
        let (value, verdict) = match got {
            Some((x, true)) => (format!("{}{unit}", fmt_value(x)), "met"),
            Some((x, false)) => (format!("{}{unit}", fmt_value(x)), "**not met**"),
            None => ("–".to_string(), "not measured"),
        };
        let _ = writeln!(md, "| {name} | {value} | {verdict} |");
    }
    md
}

/// Render bench.md and bench.csv.
pub fn render(rows: &[Row], machine: &Machine, plan: &str, command: &str) -> (String, String) {
    let runs = rows.iter().map(|r| r.run).max().unwrap_or(0);
    let mut md = String::new();
    let _ = writeln!(md, "# closewait benchmark\n");
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(
        md,
        "Machine: {} cpu(s), {}, Linux {}. Pinning: {}.\n",
        machine.nproc, machine.cpu, machine.kernel, machine.pinning
    );
    let _ = writeln!(md, "Setup: {plan}.\n");
    let _ = writeln!(
        md,
        "Medians over {runs} run(s); every figure against a freshly started server; loopback only. \
         Ratios are taken within each run (closewait ÷ limit, closewait ÷ tokio-baseline, closewait-w2 ÷ tokio-baseline), median over runs (for times and bytes, below 1 is better). \
         The limit server (`loadtest limit-server`) is the fewest syscalls a request can cost on epoll, not a competitor.\n"
    );
    let noisy: Vec<String> = rows
        .iter()
        .filter(|r| r.get("other_cpu_cores").is_some_and(|v| v > 0.2))
        .map(|r| format!("run {} {} {}", r.run, r.server.name(), r.figure.name()))
        .collect();
    let measured = rows.iter().any(|r| r.get("other_cpu_cores").is_some());
    if !measured {
        let _ = writeln!(md, "Quietness not measured: no timed window in this run.\n");
    } else if noisy.is_empty() {
        let _ = writeln!(
            md,
            "Quiet machine: in every timed window, CPU not charged to the server or the generator \
             stayed under 0.2 cores.\n"
        );
    } else {
        let _ = writeln!(
            md,
            "**Not a quiet machine**: more than 0.2 cores of other CPU in {} window(s) ({}); \
             those numbers are skewed.\n",
            noisy.len(),
            noisy.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "| figure | metric | closewait | closewait-w2 | limit | tokio-baseline | closewait ÷ limit | closewait ÷ tokio | closewait-w2 ÷ tokio |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for &(figure, key, label) in TABLE {
        // `loadtest scale` measures one figure: leave out the others' empty rows.
        if !rows.iter().any(|r| r.figure == figure) {
            continue;
        }
        let cells: Vec<Option<f64>> = Kind::ALL
            .iter()
            .map(|&k| median_of(rows, figure, k, key))
            .collect();
        // Ratio: the median over runs of the ratio within each run (the servers of one run ran
        // minutes apart at most, so machine drift between runs cancels out).
        let ratio = |k: Kind, against: Kind| {
            if NO_RATIO.contains(&key) {
                return "–".to_string();
            }
            ratio_of(rows, runs, figure, key, k, against)
                .map_or_else(|| "–".to_string(), |r| format!("{r:.2}"))
        };
        let show = |v: Option<f64>| v.map_or_else(|| "–".to_string(), fmt_value);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            figure.name(),
            label,
            show(cells[0]),
            show(cells[1]),
            show(cells[2]),
            show(cells[3]),
            ratio(Kind::Closewait, Kind::Limit),
            ratio(Kind::Closewait, Kind::Baseline),
            ratio(Kind::Closewait2, Kind::Baseline),
        );
    }
    md.push_str(&targets(rows, runs));
    let mut csv = String::from("run,server,figure");
    for c in COLUMNS {
        csv.push(',');
        csv.push_str(c);
    }
    csv.push('\n');
    for r in rows {
        let _ = write!(csv, "{},{},{}", r.run, r.server.name(), r.figure.name());
        for c in COLUMNS {
            csv.push(',');
            if let Some(v) = r.get(c) {
                let _ = write!(csv, "{v}");
            }
        }
        csv.push('\n');
    }
    (md, csv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(run: u32, server: Kind, metrics: Vec<(&'static str, f64)>) -> Row {
        Row {
            run,
            server,
            figure: Figure::PingPong,
            metrics,
        }
    }

    fn machine() -> Machine {
        Machine {
            nproc: 2,
            kernel: "6.0".to_string(),
            cpu: "test cpu".to_string(),
            pinning: "none".to_string(),
        }
    }

    /// The table line of one metric label.
    fn table_line<'a>(md: &'a str, label: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with("| ping-pong |") && l.contains(label))
            .unwrap_or_else(|| panic!("no line for {label:?} in\n{md}"))
    }

    #[test]
    fn median_of_odd_count_is_the_middle_value_whatever_the_order() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_two_middle_values() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn median_of_nothing_is_none() {
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn values_keep_three_significant_digits_or_all_integer_digits() {
        assert_eq!(fmt_value(96212.4), "96212");
        assert_eq!(fmt_value(1315.0), "1315");
        assert_eq!(fmt_value(141.26), "141.3");
        assert_eq!(fmt_value(8.2154), "8.215");
        assert_eq!(fmt_value(0.0), "0");
    }

    #[test]
    fn ratio_is_the_median_of_per_run_ratios_not_the_ratio_of_medians() {
        // Run 1 is fast for everyone, run 2 slow, run 3 in between: drift between runs.
        // Per-run ratios 1.5, 1.5, 1.0 -> median 1.5; the ratio of medians would be 20/20 = 1.0.
        let rows = vec![
            row(1, Kind::Closewait, vec![("req_per_s", 30.0)]),
            row(1, Kind::Baseline, vec![("req_per_s", 20.0)]),
            row(2, Kind::Closewait, vec![("req_per_s", 15.0)]),
            row(2, Kind::Baseline, vec![("req_per_s", 10.0)]),
            row(3, Kind::Closewait, vec![("req_per_s", 20.0)]),
            row(3, Kind::Baseline, vec![("req_per_s", 20.0)]),
        ];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        let line = table_line(&md, "requests/s");
        assert_eq!(
            line, "| ping-pong | requests/s (higher is better) | 20 | – | – | 20 | – | 1.50 | – |",
            "medians 20 and 20, ratio median of 1.5, 1.5, 1.0; a server without rows shows –"
        );
    }

    #[test]
    fn context_columns_get_no_ratio() {
        let rows = vec![
            row(1, Kind::Closewait, vec![("gen_cpu_cores", 0.9)]),
            row(1, Kind::Baseline, vec![("gen_cpu_cores", 0.95)]),
        ];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        let line = table_line(&md, "generator CPU");
        assert!(
            line.ends_with("| 0.900 | – | – | 0.950 | – | – | – |"),
            "{line}"
        );
    }

    #[test]
    fn a_zero_baseline_gives_no_ratio_instead_of_infinity() {
        let rows = vec![
            row(1, Kind::Closewait, vec![("p99_us", 5.0)]),
            row(1, Kind::Baseline, vec![("p99_us", 0.0)]),
        ];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        let line = table_line(&md, "RTT p99");
        assert!(line.ends_with("| – | – | – |"), "{line}");
    }

    #[test]
    fn every_target_is_marked_met_not_met_or_not_measured() {
        let rows = vec![
            row(
                1,
                Kind::Closewait,
                vec![
                    ("req_per_server_cpu_s", 99.0),
                    ("syscalls_per_req", 3.0),
                    ("epoll_waits_per_req", 1.0),
                    ("other_syscalls_per_req", 2.0),
                ],
            ),
            row(1, Kind::Limit, vec![("req_per_server_cpu_s", 100.0)]),
        ];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        let line = |name: &str| target_line(&md, name);
        assert!(line("ping-pong requests per server CPU-second").ends_with("| 0.990× | met |"));
        assert!(line("ping-pong syscalls per request ≤").ends_with("| 3 | **not met** |"));
        assert!(
            line("ping-pong syscalls per request besides epoll_wait ≤").ends_with("| 2 | met |")
        );
        assert!(line("all held: PING p99").ends_with("| – | not measured |"));
    }

    /// The line of the report that starts with target `name`.
    fn target_line(md: &str, name: &str) -> String {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("no target {name:?} in\n{md}"))
            .to_string()
    }

    #[test]
    fn pipelined_rtt_targets_read_the_pipelined_rows_not_the_ping_pong_ones() {
        let pipelined = |server, p99| Row {
            figure: Figure::Pipelined,
            ..row(1, server, vec![("p99_us", p99)])
        };
        let rows = vec![
            // Ping-pong: closewait better than both; pipelined: better than the limit only.
            row(1, Kind::Closewait, vec![("p99_us", 10.0)]),
            row(1, Kind::Limit, vec![("p99_us", 20.0)]),
            row(1, Kind::Baseline, vec![("p99_us", 20.0)]),
            pipelined(Kind::Closewait, 150.0),
            pipelined(Kind::Limit, 200.0),
            pipelined(Kind::Baseline, 100.0),
        ];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        let line = |name: &str| target_line(&md, name);
        assert!(line("ping-pong RTT p99 no worse than tokio").ends_with("| 0.500× | met |"));
        assert!(line("pipelined RTT p99 no worse than limit").ends_with("| 0.750× | met |"));
        assert!(line("pipelined RTT p99 no worse than tokio").ends_with("| 1.500× | **not met** |"));
        let table = md
            .lines()
            .find(|l| l.starts_with("| pipelined | RTT p99, µs"))
            .unwrap_or_else(|| panic!("no pipelined RTT p99 row in\n{md}"));
        assert_eq!(
            table,
            "| pipelined | RTT p99, µs | 150 | – | 200 | 100 | 0.75 | 1.50 | – |"
        );
    }

    #[test]
    fn noisy_windows_are_named_in_the_report() {
        let rows = vec![row(2, Kind::Baseline, vec![("other_cpu_cores", 0.5)])];
        let (md, _) = render(&rows, &machine(), "plan", "loadtest bench");
        assert!(
            md.contains("**Not a quiet machine**") && md.contains("run 2 tokio-baseline ping-pong"),
            "{md}"
        );
    }

    #[test]
    fn csv_has_one_row_per_measurement_with_empty_cells_for_absent_columns() {
        let rows = vec![row(1, Kind::Closewait2, vec![("req_per_s", 1.5)])];
        let (_, csv) = render(&rows, &machine(), "plan", "loadtest bench");
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2, "{csv}");
        let header: Vec<&str> = lines[0].split(',').collect();
        let cells: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(header.len(), 3 + COLUMNS.len());
        assert_eq!(cells.len(), header.len(), "{csv}");
        assert_eq!(&cells[..3], ["1", "closewait-w2", "ping-pong"]);
        let at = |name: &str| cells[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(at("req_per_s"), "1.5");
        assert_eq!(at("p99_us"), "");
    }
}
