//! `loadtest watch`: the "did the fix work?" view of any process.
//!
//! One line per interval with the process's open fds, its sockets in CLOSE_WAIT and its soft
//! RLIMIT_NOFILE, read from `/proc` (see [`closewait::testing::procfs`]). A leak is a count that only
//! climbs toward the limit; legitimate load is a plateau that falls when clients leave.

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use closewait::testing::procfs;

/// Flags of `loadtest watch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The process to watch.
    #[arg(long)]
    pub pid: u32,
    /// Milliseconds between lines.
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// Stop after this many lines (default: until the process exits).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// One sample of a process.
struct Sample {
    fds: usize,
    close_wait: usize,
    soft_limit: Option<u64>,
}

/// The state letter of a `/proc/PID/stat` line (`R`, `S`, `Z`, ...). It follows the command
/// name, which is in parentheses and may itself contain spaces and `)`, hence the last `)`.
fn parse_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Whether `pid` has exited. A zombie (exited, not yet reaped by its parent) still has a
/// `/proc/PID` directory, but no fds and no sockets: watching it would print zeros forever.
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => matches!(parse_stat_state(&stat), Some('Z' | 'X')),
        Err(_) => true,
    }
}

fn sample(pid: u32) -> std::io::Result<Sample> {
    Ok(Sample {
        fds: procfs::open_fds(pid)?,
        close_wait: procfs::close_wait_sockets(pid)?,
        soft_limit: procfs::nofile_limit(pid)?.0,
    })
}

/// Print lines until `--count` or the process is gone.
pub fn run(args: Args) -> ExitCode {
    let start = Instant::now();
    let interval = Duration::from_millis(args.interval);
    println!(
        "{:>8}  {:>8}  {:>10}  {:>10}",
        "time", "fds", "close_wait", "nofile"
    );
    let mut printed = 0;
    while args.count.is_none_or(|count| printed < count) {
        // Gone after we saw it: the watched server stopped, which ends the watch.
        if printed > 0 && has_exited(args.pid) {
            println!("process {} exited", args.pid);
            return ExitCode::SUCCESS;
        }
        let s = match sample(args.pid) {
            Ok(s) => s,
            // It may exit between the check above and the reads.
            Err(_) if printed > 0 && has_exited(args.pid) => {
                println!("process {} exited", args.pid);
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("loadtest watch: cannot read /proc/{}: {e}", args.pid);
                return ExitCode::FAILURE;
            }
        };
        let limit = s
            .soft_limit
            .map_or("unlimited".to_string(), |l| l.to_string());
        println!(
            "{:>7.1}s  {:>8}  {:>10}  {:>10}",
            start.elapsed().as_secs_f64(),
            s.fds,
            s.close_wait,
            limit
        );
        printed += 1;
        if args.count.is_none_or(|count| printed < count) {
            // Keep to the schedule: reading /proc/net/tcp takes time on a busy machine.
            let due = start + interval * printed as u32;
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_after_the_command_name_even_with_parentheses_in_it() {
        // Recorded from /proc/PID/stat; the second is a zombie whose name holds ") S (".
        let running = "25793 (loadtest) S 25791 25791 2876 0 -1 4194560 213 0 0 0 1 2 0 0 20 0 2";
        let zombie = "22417 (odd) S (name) Z 22374 22372 2876 0 -1 4227084 127 0 0 0 0 0 0 0 20";
        assert_eq!(parse_stat_state(running), Some('S'));
        assert_eq!(parse_stat_state(zombie), Some('Z'));
        assert_eq!(parse_stat_state("garbage"), None);
    }

    #[test]
    fn this_process_has_not_exited_and_a_missing_one_has() {
        assert!(!has_exited(std::process::id()));
        assert!(has_exited(u32::MAX));
    }
}
