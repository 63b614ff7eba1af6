//! `loadtest serve`: run closewait inside this process under a chosen RLIMIT_NOFILE.
//!
//! `cargo run -p loadtest` builds only this package, so on a fresh clone there is no
//! `closewait` binary to start. The load test therefore re-executes itself with this hidden
//! subcommand, which sets the fd limit (soft and hard, as `prlimit --nofile=N:N` would) and
//! then runs exactly what the `closewait` binary runs: [`closewait::cli::run`].

use std::process::ExitCode;

use rlimit::Resource;

/// Flags of `loadtest serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// RLIMIT_NOFILE, soft and hard, for the server process.
    #[arg(long, value_name = "N")]
    pub nofile: Option<u64>,
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
    closewait::cli::run(std::iter::once("closewait".to_string()).chain(args.server_args))
}
