//! Starting, observing and stopping the servers under test, and pinning the generator.
//!
//! Each server is a child of this binary (re-executed as `serve` or `baseline-server`), started
//! under `taskset -c 0` so it runs on cpu 0 while the generator runs on cpu 1. `taskset` execs
//! the server, so the child's pid is the server's pid and `/proc/PID` describes the server.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Which server to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// closewait, one worker (the default).
    Closewait,
    /// closewait --workers 2.
    Closewait2,
    /// The physical limit: raw epoll, one read per readiness (`loadtest limit-server`).
    Limit,
    /// The tokio baseline (`loadtest baseline-server`).
    Baseline,
}

impl Kind {
    /// Every server, in the order a run visits them (rotated run by run).
    pub const ALL: [Kind; 4] = [
        Kind::Closewait,
        Kind::Closewait2,
        Kind::Limit,
        Kind::Baseline,
    ];

    /// Name used in the table and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Closewait => "closewait",
            Kind::Closewait2 => "closewait-w2",
            Kind::Limit => "limit",
            Kind::Baseline => "tokio-baseline",
        }
    }
}

/// RLIMIT_NOFILE given to closewait: room for 10,000 connections plus its reserve.
pub const SERVER_NOFILE: u64 = 12_000;

/// A running server; stopped (SIGTERM, bounded wait, SIGKILL) when dropped.
pub struct Server {
    child: Child,
    /// The server's pid (the same process `taskset` exec'd into).
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Server {
    /// Start `kind` pinned to `cpu` (None: unpinned), stderr appended to `log`.
    pub fn start(kind: Kind, cpu: Option<usize>, log: &Path) -> io::Result<Server> {
        Server::start_with_nofile(kind, cpu, log, SERVER_NOFILE)
    }

    /// [`Server::start`] with closewait under RLIMIT_NOFILE `nofile` (the others raise their
    /// soft limit to the hard one themselves).
    pub fn start_with_nofile(
        kind: Kind,
        cpu: Option<usize>,
        log: &Path,
        nofile: u64,
    ) -> io::Result<Server> {
        let exe = std::env::current_exe()?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        match kind {
            Kind::Closewait | Kind::Closewait2 => {
                cmd.args(["serve", "--nofile", &nofile.to_string(), "--"]);
                cmd.args(["--listen", "127.0.0.1:0"]);
                if kind == Kind::Closewait2 {
                    cmd.args(["--workers", "2"]);
                }
            }
            Kind::Limit => {
                cmd.args(["limit-server", "--listen", "127.0.0.1:0"]);
            }
            Kind::Baseline => {
                cmd.args(["baseline-server", "--listen", "127.0.0.1:0"]);
            }
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        die_with_parent(&mut cmd);
        // Warnings only: the servers must not pay for logging while they are measured.
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let Some(stdout) = child.stdout.take() else {
            stop(&mut child);
            return Err(io::Error::other("no stdout pipe"));
        };
        // Read the `listening on IP:PORT` line on a thread so a silent server cannot hang us;
        // the thread keeps draining stdout until the server exits.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => addr,
            Err(_) => {
                stop(&mut child);
                return Err(io::Error::other(format!(
                    "{} printed no listening line within 10 s (see {})",
                    kind.name(),
                    log.display()
                )));
            }
        };
        let addr = match addr.parse() {
            Ok(addr) => addr,
            Err(e) => {
                stop(&mut child);
                return Err(io::Error::other(format!(
                    "bad listening address {addr:?}: {e}"
                )));
            }
        };
        Ok(Server { child, pid, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The lines `source` produces, read on a thread of their own: the receiver can wait with a
/// timeout (`recv_timeout`), so a silent process costs a timeout, not a hang. The thread ends
/// at EOF or when the receiver is dropped and the next line arrives.
pub fn lines_of(source: impl io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// SIGTERM, wait up to 5 s, then SIGKILL; always reaps the child.
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    send_sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Have the kernel SIGKILL the server if the bench dies without stopping it (e.g. killed by a
/// signal, when no destructor runs). `taskset` execs the server, which keeps the setting.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed; prctl(2) is a plain syscall and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Send SIGTERM to our own child `pid`.
fn send_sigterm(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is a child we
    // spawned and have not reaped yet, so it cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Pin the calling thread (the generator: this process is single-threaded while it loads) to
/// `cpu`. Threads spawned afterwards inherit the mask.
pub fn pin_self(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data, zeroed is a valid empty set; CPU_SET writes inside it
    // (cpu is checked against its capacity first); sched_setaffinity only reads `set` for the
    // size we pass. pid 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(io::Error::other("cpu index out of range"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Clock ticks per second, the unit of utime/stime in `/proc/PID/stat`.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time of a process split by where it ran, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSplit {
    /// In user space (`utime`): the server's own code and its libraries.
    pub user: f64,
    /// In the kernel on its behalf (`stime`): syscalls, and for loopback TCP also the
    /// receive processing of the packets it sends, which runs in the sender's context.
    pub system: f64,
}

impl CpuSplit {
    /// User plus system.
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuSplit {
    type Output = CpuSplit;
    fn sub(self, earlier: CpuSplit) -> CpuSplit {
        CpuSplit {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// CPU seconds (all threads) that `pid` has used, from `/proc/PID/stat`, split into user and
/// system time. Resolution: one clock tick (10 ms with the usual USER_HZ of 100). The kernel
/// samples the split at each tick and scales it to the exact total, so over a window of a few
/// hundred ticks the shares are good to a few percent.
pub fn cpu_split(pid: u32) -> io::Result<CpuSplit> {
    cpu_split_of(&format!("/proc/{pid}/stat"))
}

/// CPU seconds this process (the generator) has used.
pub fn own_cpu_seconds() -> io::Result<f64> {
    cpu_split_of("/proc/self/stat").map(|c| c.total())
}

fn cpu_split_of(path: &str) -> io::Result<CpuSplit> {
    let text = std::fs::read_to_string(path)?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    // After ')': state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parse = |i: usize| -> io::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| io::Error::other("malformed stat"))
    };
    let ticks = clock_ticks();
    Ok(CpuSplit {
        user: parse(11)? / ticks,
        system: parse(12)? / ticks,
    })
}

/// Resident set size of `pid` in bytes (`VmRSS` in `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

/// CPU seconds all cpus spent busy since boot (user, nice, system, irq, softirq, steal), from
/// the `cpu` line of `/proc/stat`. Minus the server's and the generator's own CPU time over a
/// window, what remains is work neither was charged for: other processes, interrupt time
/// accounted apart from tasks, and time the hypervisor stole.
pub fn machine_busy_seconds() -> io::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))?;
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    Ok(busy as f64 / clock_ticks())
}

/// Wait, at most `limit`, until the machine is quiet: less than `cores` cpus busy over a
/// 200 ms sample. Returns how long it waited and the last busy figure.
pub fn wait_quiet(cores: f64, limit: std::time::Duration) -> io::Result<(Duration, f64)> {
    let start = Instant::now();
    loop {
        let b0 = machine_busy_seconds()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let busy = (machine_busy_seconds()? - b0) / t0.elapsed().as_secs_f64();
        if busy < cores || start.elapsed() >= limit {
            return Ok((start.elapsed(), busy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_split_is_utime_and_stime_even_when_the_name_has_spaces_and_parens() {
        // A recorded /proc/PID/stat line whose comm is "(a b) c": fields 14 and 15 are 250, 50.
        let line = "4242 ((a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 \
                    12345 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        let path = std::env::temp_dir().join(format!("bench-stat-{}", std::process::id()));
        std::fs::write(&path, line).unwrap();
        let split = cpu_split_of(path.to_str().unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ticks = clock_ticks();
        assert!(
            (split.user - 250.0 / ticks).abs() < 1e-9 && (split.system - 50.0 / ticks).abs() < 1e-9,
            "expected 250 user and 50 system ticks, got {split:?} at {ticks} ticks/s"
        );
        assert!((split.total() - 300.0 / ticks).abs() < 1e-9);
    }

    #[test]
    fn a_truncated_stat_line_is_an_error_not_a_zero() {
        let path = std::env::temp_dir().join(format!("bench-stat-short-{}", std::process::id()));
        std::fs::write(&path, "4242 (x) S 1 2 3\n").unwrap();
        let result = cpu_split_of(path.to_str().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn this_process_has_a_resident_set_and_uses_cpu() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(own_cpu_seconds().unwrap() >= 0.0);
    }
}
