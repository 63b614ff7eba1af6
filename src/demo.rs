//! The `closewait` binary's command line, with the demo's `--leaky` switch. Not part of the
//! API (hidden from the docs): only the binary and the load test (which runs the same server
//! in a process of its own) call it. A service built on closewait uses [`crate::cli`], which
//! has every server flag and no way to turn the leak on.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{self, ServerArgs};
use crate::leak::EofPolicy;
use crate::Server;

/// `closewait` command-line flags: the server's flags and the leaky demo switch.
#[derive(Parser, Debug)]
#[command(
    name = "closewait",
    version,
    about = "A TCP server that never leaks a socket in CLOSE_WAIT"
)]
struct Args {
    /// Every flag of a production server.
    #[command(flatten)]
    server: ServerArgs,
    /// DEMO ONLY: reproduce the CLOSE_WAIT leak (never close on peer EOF, no cap, no idle timeout).
    #[arg(long)]
    leaky: bool,
}

/// Run `closewait` with these arguments (the first is the program name), as the binary does:
/// set up logging, bind, print `listening on IP:PORT` to stdout, serve until SIGINT/SIGTERM.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // clap prints help/version to stdout and usage errors to stderr, with its own codes.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    cli::init_logging();
    let policy = if args.leaky {
        EofPolicy::Leak
    } else {
        EofPolicy::Close
    };
    cli::serve(Server::with_policy(args.server.to_config(), policy, || {
        crate::service::Reference
    }))
}
