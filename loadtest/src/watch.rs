//! `loadtest watch`: the "did the fix work?" view of any process.
//!
//! One line per interval with the process's open fds, its sockets in CLOSE_WAIT and its soft
//! RLIMIT_NOFILE, read from `/proc` (see [`closewait::procfs`]). A leak is a count that only
//! climbs toward the limit; legitimate load is a plateau that falls when clients leave.

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use closewait::procfs;

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
        let s = match sample(args.pid) {
            Ok(s) => s,
            // Gone after we saw it: the watched server stopped, which ends the watch.
            Err(_)
                if printed > 0
                    && !std::path::Path::new(&format!("/proc/{}", args.pid)).exists() =>
            {
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
