//! The command line of a server process: flags -> [`Config`] -> [`Server`], and the start-up
//! every closewait process shares (logging, the `listening on` line, exit codes).
//!
//! A service's own binary uses all of it: flatten [`ServerArgs`] into its clap parser, call
//! [`init_logging`], and hand `Server::with_service(..)` to [`serve`] (see
//! `examples/counter.rs`). Embedding the server in a larger program needs none of it: fill a
//! [`Config`] and call [`Server::run`].

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::ValueEnum;

use crate::config::{self, Config, WhenFull};
use crate::{Server, Service};

/// Every server flag, for a service's binary to flatten into its own clap parser
/// (`#[command(flatten)] server: ServerArgs`): every [`Config`] field an operator sets.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (port 0 = let the OS pick; the chosen one is printed). Ignored
    /// when systemd passes a listening socket (socket activation, LISTEN_FDS).
    #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Largest frame body a peer may send, in bytes.
    #[arg(long, default_value_t = config::DEFAULT_MAX_FRAME, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_frame: usize,
    /// Upper bound on open connections (default: derived from RLIMIT_NOFILE).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_connections: Option<usize>,
    /// Listen backlog: connections beyond the cap wait here.
    #[arg(long, default_value_t = config::DEFAULT_BACKLOG, value_name = "N")]
    pub backlog: u32,
    /// At the connection cap: wait (stop accepting) or reject (send ERROR, close).
    #[arg(long, value_enum, default_value = "wait")]
    pub when_full: WhenFullArg,
    /// Close a connection with no traffic for this many seconds (0 = never).
    #[arg(long, default_value_t = config::DEFAULT_IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub idle_timeout: u64,
    /// Per-connection bound on queued reply bytes; above it the peer is not read until it drains.
    #[arg(long, default_value_t = config::DEFAULT_MAX_PENDING_OUTPUT, value_name = "BYTES")]
    pub max_pending_output: usize,
    /// TCP keepalive: seconds idle before the first probe (0 = keepalive off).
    #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_TIME.as_secs(), value_name = "SECS")]
    pub keepalive_time: u64,
    /// TCP keepalive: seconds between probes.
    #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_INTERVAL.as_secs(), value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_interval: u64,
    /// TCP keepalive: unanswered probes before the kernel drops the connection.
    #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_RETRIES, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keepalive_retries: u32,
    /// TCP_USER_TIMEOUT in seconds: unacknowledged output aborts the connection after this
    /// (default: the idle timeout; 0 = kernel default).
    #[arg(long, value_name = "SECS")]
    pub tcp_user_timeout: Option<u64>,
    /// Seconds a graceful shutdown (SIGINT/SIGTERM) may spend flushing replies.
    #[arg(long, default_value_t = config::DEFAULT_DRAIN_TIMEOUT.as_secs(), value_name = "SECS")]
    pub drain_timeout: u64,
    /// Seconds a graceful close that may leave input unread (invalid frame, frame timeout,
    /// shutdown, memory eviction) waits for the peer's FIN after shutting down writing,
    /// discarding input, so replies are not destroyed by an RST (0 = close at once).
    #[arg(long, default_value_t = config::DEFAULT_LINGER_TIMEOUT.as_secs(), value_name = "SECS")]
    pub linger_timeout: u64,
    /// Seconds a peer may take to finish a frame once its first byte arrived (0 = no limit).
    #[arg(long, default_value_t = config::DEFAULT_FRAME_TIMEOUT.as_secs(), value_name = "SECS")]
    pub frame_timeout: u64,
    /// Bytes all connections together may hold in partial frames and pending replies; above
    /// it the connection holding the most is closed (default: 25% of the machine's memory;
    /// 0 = no limit).
    #[arg(long, value_name = "BYTES")]
    pub max_buffered: Option<u64>,
    /// Event-loop threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..).map(|v| v as usize))]
    pub workers: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default; port 0 = let the OS
    /// pick; bind it to loopback or a private interface).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

/// `--when-full` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WhenFullArg {
    /// Stop accepting; new connections wait in the listen backlog.
    Wait,
    /// Accept, send one ERROR frame, close.
    Reject,
}

fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

impl ServerArgs {
    /// The [`Config`] these flags describe: signals handled and systemd's socket and
    /// notifications used when present, as a process should, and `tcp_user_timeout`
    /// following the idle timeout unless given.
    pub fn to_config(&self) -> Config {
        let idle_timeout = secs(self.idle_timeout);
        Config {
            listen: self.listen,
            max_frame: self.max_frame,
            max_connections: self.max_connections,
            backlog: self.backlog,
            when_full: match self.when_full {
                WhenFullArg::Wait => WhenFull::Wait,
                WhenFullArg::Reject => WhenFull::Reject,
            },
            idle_timeout,
            max_pending_output: self.max_pending_output,
            keepalive_time: secs(self.keepalive_time),
            keepalive_interval: Duration::from_secs(self.keepalive_interval),
            keepalive_retries: self.keepalive_retries,
            tcp_user_timeout: self.tcp_user_timeout.map_or(idle_timeout, secs),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            linger_timeout: secs(self.linger_timeout),
            frame_timeout: secs(self.frame_timeout),
            max_buffered: self.max_buffered.map(|bytes| match bytes {
                0 => usize::MAX,
                bytes => usize::try_from(bytes).unwrap_or(usize::MAX),
            }),
            workers: self.workers,
            handle_signals: true,
            systemd: true,
            metrics: self.metrics,
        }
    }
}

/// What the binary does once it has a bound server (or a reason it has none): print
/// `listening on IP:PORT` to stdout (and `metrics on IP:PORT` after it with `--metrics`),
/// serve until SIGINT/SIGTERM, map the outcome to an exit code. A service built on closewait
/// calls this with its own `Server::with_service(..)`.
pub fn serve<S: Service + 'static>(server: std::io::Result<Server<S>>) -> ExitCode {
    // Call init_logging before building the server to see its start-up lines too; this one
    // makes sure a failed start is never silent.
    init_logging();
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            log::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests wait for exactly this line; flush so a pipe sees it at once.
    let mut out = std::io::stdout().lock();
    let metrics = server
        .metrics_addr()
        .map(|addr| format!("metrics on {addr}\n"));
    if writeln!(out, "listening on {}", server.local_addr())
        .and_then(|_| out.write_all(metrics.unwrap_or_default().as_bytes()))
        .and_then(|_| out.flush())
        .is_err()
    {
        log::warn!("could not write the listening line(s) to stdout");
    }
    drop(out);
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server stopped on an error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` decides; `info` when it is unset. Safe to call more than once.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}
