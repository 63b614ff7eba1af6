//! `loadtest`: run closewait beside its leaky variant (and a tokio baseline) and show the
//! difference, and probe any server for the same leak. Subcommands live in their own
//! modules; this file only dispatches.

mod baseline;
mod bench;
mod compare;
mod limit;
mod probe;
mod serve;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadtest", about = "Load tests for closewait")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the correct server and the leaky variant under the same load; write a report.
    Compare(compare::Args),
    /// Print a process's fd count, CLOSE_WAIT sockets and fd limit once per interval.
    Watch(watch::Args),
    /// Test any server on this machine for the CLOSE_WAIT leak: end connections the ways
    /// peers do (FIN, half-close, RST, mid-reply) and see whether it releases its sockets.
    Probe(probe::Args),
    /// Benchmark closewait against the tokio baseline server.
    Bench(bench::Args),
    /// Hold as many connections as the fd limit allows against closewait and the tokio
    /// baseline: establish, memory, latency idle and with 1 % active, release after every
    /// peer closes (the scale figure of `bench` on its own).
    Scale(bench::Args),
    /// Serve the wire protocol the idiomatic tokio way (the benchmark's baseline).
    BaselineServer(baseline::Args),
    /// Serve the wire protocol with the fewest syscalls possible on raw epoll (the
    /// benchmark's physical limit: one read per readiness, one write per batch).
    LimitServer(limit::Args),
    /// Internal: run closewait in this process under a given RLIMIT_NOFILE.
    #[command(hide = true)]
    Serve(serve::Args),
    /// Internal: one client process of the scale figure.
    #[command(hide = true)]
    ScaleClient(bench::ScaleClientArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Compare(args) => compare::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BaselineServer(args) => baseline::run(args),
        Command::LimitServer(args) => limit::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Scale(args) => bench::run_scale(args),
        Command::ScaleClient(args) => bench::scale_client(args),
    }
}
