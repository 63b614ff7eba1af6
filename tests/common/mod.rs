//! Shared test helpers: start a real `closewait` process and read its fds, CLOSE_WAIT
//! sockets, CPU time and memory from /proc. The client, `wait_until` and the /proc readers
//! are `closewait::testing`'s, the kit a service's own tests use; what is here needs the
//! `closewait` binary (fd limits, signals, the leaky variant), which the kit does not.
#![allow(dead_code)] // each test binary uses a different subset

pub mod fleet;
pub mod seeded;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use closewait::service::{ECHO, ECHO_REPLY, ERROR, PING, PING_REPLY, STATS, STATS_REPLY};

/// A `closewait` child process, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The Prometheus endpoint, from the `metrics on IP:PORT` line (with `--metrics`).
    pub metrics: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    log_reader: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Start `closewait --listen 127.0.0.1:0 ARGS...`.
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(None, args)
    }

    /// Start it with RLIMIT_NOFILE soft and hard set to `nofile` (via util-linux `prlimit`).
    pub fn start_with_nofile(nofile: u64, args: &[&str]) -> Server {
        Server::spawn(Some(nofile), args)
    }

    /// Start another program built on closewait (an example) the same way: it must print
    /// `listening on IP:PORT` first.
    pub fn start_program(program: &std::path::Path, args: &[&str]) -> Server {
        Server::spawn_program(program.as_os_str(), None, args)
    }

    /// Start `closewait --listen ADDR ARGS...` (to come back on the port it had).
    pub fn start_on(addr: SocketAddr, args: &[&str]) -> Server {
        let cmd = command(env!("CARGO_BIN_EXE_closewait"));
        Server::spawn_command(cmd, &addr.to_string(), args)
    }

    /// Start closewait as systemd's socket activation does: `listener` is its fd 3, with
    /// `LISTEN_FDS=1`, `LISTEN_PID` its pid, and `env` besides.
    pub fn start_activated(listener: &TcpListener, env: &[(&str, &str)], args: &[&str]) -> Server {
        let fd = listener.try_clone().expect("dup listener").into();
        Server::spawn_command(activated_command(fd, env), "127.0.0.1:0", args)
    }

    fn spawn(nofile: Option<u64>, args: &[&str]) -> Server {
        Server::spawn_program(env!("CARGO_BIN_EXE_closewait").as_ref(), nofile, args)
    }

    fn spawn_program(bin: &std::ffi::OsStr, nofile: Option<u64>, args: &[&str]) -> Server {
        let cmd = match nofile {
            Some(n) => {
                let mut cmd = command("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg(bin);
                cmd
            }
            None => command(bin),
        };
        Server::spawn_command(cmd, "127.0.0.1:0", args)
    }

    fn spawn_command(mut cmd: Command, listen: &str, args: &[&str]) -> Server {
        cmd.args(["--listen", listen]).args(args);
        cmd.env(
            "RUST_LOG",
            std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn closewait");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let log_reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_SHOW_LOG").is_some() {
                    eprintln!("server: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            let _ = tx.send(lines.next());
            // Keep reading so the server never blocks on a full stdout pipe.
            for _ in lines {}
        });
        let mut next_line = |what: &str| match rx.recv_timeout(WAIT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!(
                    "no '{what}' line from closewait: {other:?}; log: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        let line = next_line("listening on");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        let metrics = args.contains(&"--metrics").then(|| {
            let line = next_line("metrics on");
            line.strip_prefix("metrics on ")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("unexpected second stdout line {line:?}"))
        });
        Server {
            child,
            addr,
            metrics,
            log,
            log_reader: Some(log_reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open fds of the server process.
    pub fn fds(&self) -> usize {
        closewait::testing::procfs::open_fds(self.pid()).expect("read server fds")
    }

    /// The lowest fd number the server does not use: the one its next `accept` would get.
    pub fn lowest_free_fd(&self) -> u64 {
        let used: std::collections::HashSet<u64> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .expect("list server fds")
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
        (0..).find(|n| !used.contains(n)).expect("a free fd number")
    }

    /// The server's sockets in CLOSE_WAIT.
    pub fn close_wait(&self) -> usize {
        closewait::testing::procfs::close_wait_sockets(self.pid()).expect("read server tcp states")
    }

    /// Bytes the server has sent that its peers have not taken (sum of Send-Q): non-zero
    /// once some peer stopped reading and its receive window filled.
    pub fn unacked_output(&self) -> u64 {
        closewait::testing::procfs::tcp_rows(self.pid())
            .expect("read server tcp rows")
            .iter()
            .map(|r| r.tx_queue)
            .sum()
    }

    /// Bytes that reached the server's sockets but that it has not read yet (Recv-Q; for
    /// the listener, connections not yet accepted).
    pub fn unread_input(&self) -> u64 {
        closewait::testing::procfs::tcp_rows(self.pid())
            .expect("read server tcp rows")
            .iter()
            .map(|r| r.rx_queue)
            .sum()
    }

    /// User + system CPU time of the server, in clock ticks (usually 10 ms).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read stat");
        // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Resident memory of the server, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The server's data segment (heap included), in KiB: memory it reserved, touched or
    /// not. Catches an allocation that RSS cannot show because nothing was written to it.
    pub fn vm_data_kib(&self) -> u64 {
        self.status_kib("VmData:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read status");
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} line"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Wait until the log has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        assert!(
            wait_until(WAIT, || self.log_contains(needle)),
            "no log line with {needle:?} in {:#?}",
            self.log()
        );
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Send SIGTERM (via the `kill` command: no unsafe in tests).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Wait for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The log is complete only once its reader has seen the pipe close.
                if let Some(reader) = self.log_reader.take() {
                    reader.join().expect("log reader");
                }
                return status.code();
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("closewait did not exit within {limit:?}");
    }

    /// Wait until the server's fd count is `fds` and it has no CLOSE_WAIT socket.
    pub fn wait_for_fds(&self, fds: usize) {
        let ok = wait_until(WAIT, || self.fds() == fds && self.close_wait() == 0);
        assert!(
            ok,
            "expected {fds} fds and no CLOSE_WAIT, saw {} fds and {} CLOSE_WAIT",
            self.fds(),
            self.close_wait()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command for `program` with stdin from /dev/null that, whatever ran the tests, talks to
/// no service manager unless the test says so.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// closewait (arguments to follow) started as systemd's socket activation starts it: `fd`
/// as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` its pid, and `env` besides.
pub fn activated_command(fd: OwnedFd, env: &[(&str, &str)]) -> Command {
    activated_command_via(&[], fd, env)
}

/// [`activated_command`] through `wrapper` (a program that takes the socket the same way and
/// runs closewait with it, such as `systemd-socket-activate`).
pub fn activated_command_via(wrapper: &[&str], fd: OwnedFd, env: &[(&str, &str)]) -> Command {
    // The shell moves the socket from stdin to fd 3 and knows the pid that exec keeps: what
    // systemd does between fork and exec, without unsafe pre_exec code in a test.
    let mut cmd = command("sh");
    cmd.args([
        "-c",
        r#"export LISTEN_PID=$$; exec "$0" "$@" 3<&0 </dev/null"#,
    ])
    .args(wrapper)
    .arg(env!("CARGO_BIN_EXE_closewait"));
    cmd.stdin(Stdio::from(fd))
        .env("LISTEN_FDS", "1")
        .envs(env.iter().copied());
    cmd
}

/// A directory of its own for one test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("closewait-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[allow(unused_imports)]
pub use closewait::testing::{frame, wait_until, Client, WAIT};

/// The sum of every `closed_*` counter in a STATS reply: each ended connection is counted
/// once under its reason, so it must equal `accepted - active`.
pub fn closed_total(stats: &std::collections::HashMap<String, u64>) -> u64 {
    stats
        .iter()
        .filter(|(name, _)| name.starts_with("closed_"))
        .map(|(_, n)| n)
        .sum()
}
