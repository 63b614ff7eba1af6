//! `loadtest serve`: run closewait inside this process under a chosen RLIMIT_NOFILE.
//!
//! `cargo run -p loadtest` builds only this package, so on a fresh clone there is no
//! `closewait` binary to start. The load test therefore re-executes itself with this hidden
//! subcommand, which sets the fd limit (soft and hard, as `prlimit --nofile=N:N` would) and
//! then runs exactly what the `closewait` binary runs: [`closewait::demo::run`].
//!
//! It can also pin itself to one cpu (`--cpu`), which `compare` uses to keep the servers and
//! its clients on different cpus: on two cores the scheduler otherwise often queues a client
//! woken by a reply behind the server on the server's cpu, and the load test's latency then
//! measures that queueing (about 0.9 ms instead of 0.1 ms on the project's VM).

use std::io;
use std::process::ExitCode;

use rlimit::Resource;

/// Flags of `loadtest serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// RLIMIT_NOFILE, soft and hard, for the server process.
    #[arg(long, value_name = "N")]
    pub nofile: Option<u64>,
    /// Run the server on this cpu only (its threads inherit the mask).
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
    /// closewait's own flags, after `--`.
    #[arg(last = true, value_name = "CLOSEWAIT ARGS")]
    pub server_args: Vec<String>,
}

/// Set the limit, then serve until SIGTERM.
pub fn run(args: Args) -> ExitCode {
    if let Some(n) = args.nofile {
        if let Err(e) = rlimit::setrlimit(Resource::NOFILE, n, n) {
            eprintln!("loadtest serve: cannot set RLIMIT_NOFILE to {n}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(cpu) = args.cpu {
        // Only the measurement suffers without it, so the server runs anyway.
        if let Err(e) = pin_to_cpu(cpu) {
            eprintln!("loadtest serve: cannot pin to cpu {cpu} ({e}); running unpinned");
        }
    }
    closewait::demo::run(std::iter::once("closewait".to_string()).chain(args.server_args))
}

/// Restrict the calling thread to `cpu`; threads it starts afterwards inherit the mask.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::other(format!("cpu {cpu} is out of range")));
    }
    // SAFETY: cpu_set_t is plain data and all zeroes is a valid empty set; CPU_SET writes
    // inside it (cpu is checked against CPU_SETSIZE above); sched_setaffinity only reads
    // `set`, for the size we pass. Pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
