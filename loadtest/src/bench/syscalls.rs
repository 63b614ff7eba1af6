//! Counting a server's syscalls over a window: `perf stat -e raw_syscalls:sys_enter -p PID`.
//!
//! This is a count, not an estimate: the kernel's `sys_enter` tracepoint fires once per
//! syscall entry of every thread of the server, whatever the syscall (read, write,
//! epoll_wait, accept4, epoll_ctl, close, futex, ...). `perf` is started with its counters
//! disabled (`--delay=-1`) and switched on and off through its control fifo, each switch
//! acknowledged, so the counted span is the one the generator counts requests in.
//!
//! An enabled syscall tracepoint sends every syscall of the traced process through the
//! kernel's slow path, so the count is taken in its own window, after the timed one: the
//! throughput and CPU figures are never measured with `perf` attached.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long to wait for `perf` to acknowledge a command.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A `perf stat` process attached to one server, counters off until [`Perf::enable`].
pub struct Perf {
    child: Child,
    ctl: File,
    acks: mpsc::Receiver<String>,
    out: PathBuf,
    dir: PathBuf,
}

impl Perf {
    /// Attach to `pid` (all its threads), counting nothing yet.
    pub fn attach(pid: u32) -> io::Result<Perf> {
        let dir = std::env::temp_dir().join(format!("loadtest-perf-{}-{pid}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (ctl_path, ack_path, out) = (dir.join("ctl"), dir.join("ack"), dir.join("out"));
        for fifo in [&ctl_path, &ack_path] {
            let status = Command::new("mkfifo").arg(fifo).status()?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "mkfifo {}: {status}",
                    fifo.display()
                )));
            }
        }
        // Read-write opens of a fifo never block (there is a reader and a writer: us).
        let rw = |p: &PathBuf| OpenOptions::new().read(true).write(true).open(p);
        let ctl = rw(&ctl_path)?;
        let ack = rw(&ack_path)?;
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                "--delay=-1",
                "-o",
            ])
            .arg(&out)
            .arg(format!(
                "--control=fifo:{},{}",
                ctl_path.display(),
                ack_path.display()
            ))
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run perf: {e}")))?;
        // Acks arrive on a thread so a dead perf costs a timeout, not a hang. The thread ends
        // with this process (we hold the fifo's write end, so it never sees EOF).
        let acks = super::server::lines_of(ack);
        Ok(Perf {
            child,
            ctl,
            acks,
            out,
            dir,
        })
    }

    fn command(&mut self, what: &str) -> io::Result<()> {
        writeln!(self.ctl, "{what}")?;
        match self.acks.recv_timeout(ACK_TIMEOUT) {
            // perf writes "ack\n" with its C string's NUL, which lands before the next ack.
            Ok(line) if line.trim_matches(|c: char| c == '\0' || c.is_whitespace()) == "ack" => {
                Ok(())
            }
            Ok(line) => Err(io::Error::other(format!(
                "perf answered {line:?} to {what}"
            ))),
            Err(_) => Err(io::Error::other(format!(
                "perf did not acknowledge `{what}` within {ACK_TIMEOUT:?} (is perf allowed to \
                 use tracepoints here? kernel.perf_event_paranoid, root)"
            ))),
        }
    }

    /// Start counting; returns once perf has switched its counters on.
    pub fn enable(&mut self) -> io::Result<()> {
        self.command("enable")
    }

    /// Stop counting and return the number of syscalls the server entered while enabled.
    pub fn finish(mut self) -> io::Result<u64> {
        self.command("disable")?;
        send_sigint(self.child.id());
        let status = self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        parse(&text).ok_or_else(|| {
            io::Error::other(format!(
                "no syscall count in perf's output ({status}): {text:?}"
            ))
        })
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The count from `perf stat -x,` output: `COUNT,,raw_syscalls:sys_enter,...`.
fn parse(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.trim().parse().ok())
}

/// perf prints its counts when interrupted.
fn send_sigint(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our own
    // unreaped child (perf), so it cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_the_first_field_of_the_tracepoint_line() {
        let out = "# started on Mon\n\n30710,,raw_syscalls:sys_enter,290594021,100.00,,\n";
        assert_eq!(parse(out), Some(30710));
    }

    #[test]
    fn an_uncounted_event_is_no_count() {
        assert_eq!(
            parse("<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n"),
            None
        );
    }
}
