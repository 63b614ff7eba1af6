//! Counting a server's syscalls over a window: `perf stat -e raw_syscalls:sys_enter -p PID`,
//! and among them its epoll waits.
//!
//! This is a count, not an estimate: the kernel's `sys_enter` tracepoint fires once per
//! syscall entry of every thread of the server, whatever the syscall (read, write,
//! epoll_wait, accept4, epoll_ctl, close, futex, ...). `perf` is started with its counters
//! disabled (`--delay=-1`) and switched on and off through its control fifo, each switch
//! acknowledged, so the counted span is the one the generator counts requests in.
//!
//! The same perf process counts the epoll wait tracepoints in the same span, because how many
//! waits a request shares depends on how many ready connections each wake-up finds (which
//! side of the closed loop, server or generator, is the bottleneck), not on the server's code;
//! the rest (reads, writes, anything else) is what its code controls. mio (so closewait and
//! tokio) and the limit server call `epoll_wait`; glibc may route it to `epoll_pwait` on some
//! architectures, and `epoll_pwait2` is the newest form, so all three are summed.
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

/// Every syscall entry.
const ALL: &str = "raw_syscalls:sys_enter";

/// The entries of every way to wait on an epoll set.
const EPOLL_WAITS: [&str; 3] = [
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_epoll_pwait2",
];

/// What one window counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Syscalls the server entered, of every kind.
    pub syscalls: u64,
    /// Of which waits on an epoll set (`epoll_wait`, `epoll_pwait`, `epoll_pwait2`).
    pub epoll_waits: u64,
}

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
        // One perf process: each enable and disable switches every event, so all count one span.
        let events = format!("{ALL},{}", EPOLL_WAITS.join(","));
        let child = Command::new("perf")
            .args(["stat", "-x,", "-e", &events, "--delay=-1", "-o"])
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

    /// Stop counting and return what the server entered while enabled.
    pub fn finish(mut self) -> io::Result<Counts> {
        self.command("disable")?;
        send_sigint(self.child.id());
        let status = self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        parse(&text).ok_or_else(|| {
            io::Error::other(format!(
                "no count of every event in perf's output ({status}): {text:?}"
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

/// Every event's count from `perf stat -x,` output; None if any is missing or uncounted.
fn parse(text: &str) -> Option<Counts> {
    let mut epoll_waits = 0;
    for event in EPOLL_WAITS {
        epoll_waits += count(text, event)?;
    }
    Some(Counts {
        syscalls: count(text, ALL)?,
        epoll_waits,
    })
}

/// One event's count: the first field of its line, `COUNT,,EVENT,RUNTIME,PERCENT,,`. None if
/// the line is missing or the count is `<not counted>` or `<not supported>`.
fn count(text: &str, event: &str) -> Option<u64> {
    text.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.get(2).is_some_and(|e| e.trim() == event))
        .and_then(|f| f[0].trim().parse().ok())
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
        assert_eq!(count(out, ALL), Some(30710));
    }

    #[test]
    fn an_uncounted_event_is_no_count() {
        let out = "<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n";
        assert_eq!(count(out, ALL), None);
    }

    /// What perf 6.1 wrote with `-o` for all four events (a python loop of ten `epoll.poll`).
    const RECORDED: &str = "# started on Mon Nov 30 02:14:16 2026\n\
        \n\
        9141,,raw_syscalls:sys_enter,147120443,100.00,,\n\
        10,,syscalls:sys_enter_epoll_wait,147120443,100.00,,\n\
        0,,syscalls:sys_enter_epoll_pwait,147120443,100.00,,\n\
        0,,syscalls:sys_enter_epoll_pwait2,147120443,100.00,,\n";

    #[test]
    fn every_event_is_read_from_its_own_line_and_the_epoll_waits_are_summed() {
        assert_eq!(
            parse(RECORDED),
            Some(Counts {
                syscalls: 9141,
                epoll_waits: 10
            })
        );
        let pwaits = RECORDED.replace(
            "0,,syscalls:sys_enter_epoll_pwait,",
            "7,,syscalls:sys_enter_epoll_pwait,",
        );
        assert_eq!(parse(&pwaits).map(|c| c.epoll_waits), Some(17));
    }

    #[test]
    fn an_event_name_is_matched_whole_not_as_a_prefix() {
        // `..._epoll_pwait` is a prefix of `..._epoll_pwait2`, whose line may come first.
        let out = "5,,syscalls:sys_enter_epoll_pwait2,1,100.00,,\n\
                   0,,syscalls:sys_enter_epoll_pwait,1,100.00,,\n";
        assert_eq!(count(out, "syscalls:sys_enter_epoll_pwait"), Some(0));
        assert_eq!(count(out, "syscalls:sys_enter_epoll_pwait2"), Some(5));
    }

    #[test]
    fn a_missing_or_uncounted_epoll_event_is_no_count_at_all() {
        let missing: String = RECORDED
            .lines()
            .filter(|l| !l.contains("epoll_pwait2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse(&missing), None);
        let uncounted = RECORDED.replace(
            "10,,syscalls:sys_enter_epoll_wait,",
            "<not supported>,,syscalls:sys_enter_epoll_wait,",
        );
        assert_eq!(parse(&uncounted), None);
    }
}
