//! Everything an operator can tune, in one plain struct.
//!
//! `Config` is data only: it never opens a socket or reads a limit. The binary fills it from
//! the command line ([`crate::cli`]); an embedding program fills it by hand.

use std::net::SocketAddr;
use std::time::Duration;

/// Largest frame body a peer may send by default (1 MiB), per the wire protocol.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Default listen backlog: connections beyond the cap wait here instead of failing.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Default idle timeout: a peer that sends nothing (or reads nothing) for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default bound on replies queued for one peer before we stop reading its requests.
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Default time a graceful shutdown may spend flushing replies before it closes everything.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a graceful close waits for the peer's FIN after shutting down writing,
/// discarding what the peer still sends (nginx's `lingering_timeout`).
pub const DEFAULT_LINGER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a peer may take to finish a frame once its first byte arrived, so that
/// trickling one byte at a time cannot hold a connection open forever.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Share of the machine's memory (or of the cgroup's limit, if lower) that all connections
/// together may hold in partial frames and pending output when no budget is configured.
pub const DEFAULT_MAX_BUFFERED_PERCENT: u64 = 25;
/// Default TCP keepalive: idle time before the first probe.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Default TCP keepalive: time between probes.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default TCP keepalive: unanswered probes before the kernel drops the connection.
pub const DEFAULT_KEEPALIVE_RETRIES: u32 = 5;

/// Longest timeout accepted for any setting: beyond this, "never" (0 or `None`) is meant.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);
/// Linux refuses TCP keepalive times and intervals above this (`MAX_TCP_KEEPIDLE`).
pub const MAX_KEEPALIVE_SECS: u64 = 32767;

/// What to do with a new connection while the server holds `max_connections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop accepting; new connections wait in the kernel's listen backlog (backpressure).
    Wait,
    /// Accept, send one ERROR frame ("server full: N connections"), close.
    Reject,
}

/// Server configuration. `Config::default()` is what the binary runs with no flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS pick one (see [`crate::Server::local_addr`]).
    pub listen: SocketAddr,
    /// Largest accepted frame length `L` (body bytes); larger or zero is a protocol error.
    pub max_frame: usize,
    /// Upper bound on open connections; `None` derives it from `RLIMIT_NOFILE`.
    /// A value the fd limit cannot honour is clamped with a warning.
    pub max_connections: Option<usize>,
    /// Listen backlog passed to `listen(2)` (the kernel caps it at `net.core.somaxconn`).
    pub backlog: u32,
    /// Behaviour at the connection cap.
    pub when_full: WhenFull,
    /// Close a connection with no traffic in either direction for this long; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Per-connection bound on queued reply bytes; above it we stop reading that peer.
    pub max_pending_output: usize,
    /// TCP keepalive idle time (`TCP_KEEPIDLE`); `None` disables keepalive.
    pub keepalive_time: Option<Duration>,
    /// TCP keepalive probe interval (`TCP_KEEPINTVL`).
    pub keepalive_interval: Duration,
    /// TCP keepalive probe count (`TCP_KEEPCNT`).
    pub keepalive_retries: u32,
    /// Kernel-side bound on unacknowledged output (`TCP_USER_TIMEOUT`); `None` = kernel default.
    pub tcp_user_timeout: Option<Duration>,
    /// How long a graceful shutdown may flush before closing whatever is left.
    pub drain_timeout: Duration,
    /// After a graceful close that may leave input unread (invalid frame, frame timeout,
    /// shutdown, memory eviction): how long to wait for the peer's FIN while discarding its
    /// input, so that the kernel sends FIN, not RST; `None` closes at once.
    pub linger_timeout: Option<Duration>,
    /// How long a peer may take to finish a frame once its first byte arrived; `None` = no limit.
    pub frame_timeout: Option<Duration>,
    /// Bytes all connections together may hold in partial frames and pending output; above it
    /// the connection holding the most is closed. `None` derives it from the machine's memory
    /// ([`DEFAULT_MAX_BUFFERED_PERCENT`]); `Some(usize::MAX)` means no budget.
    pub max_buffered: Option<usize>,
    /// Number of event-loop threads, each with its own listener (`SO_REUSEPORT`).
    pub workers: usize,
    /// Install SIGINT/SIGTERM handlers that trigger a graceful shutdown (the binary does).
    pub handle_signals: bool,
    /// Work with systemd (the binary does): serve the listening socket
    /// passed by socket activation (`LISTEN_FDS`) instead of binding `listen`, and report
    /// `READY=1` once listening and `STOPPING=1` when the drain starts (`NOTIFY_SOCKET`).
    /// Without those variables, as when run by hand, it changes nothing.
    pub systemd: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics` on a thread of its own; `None` = off.
    /// Port 0 lets the OS pick (see [`crate::Server::metrics_addr`]).
    pub metrics: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: None,
            backlog: DEFAULT_BACKLOG,
            when_full: WhenFull::Wait,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            keepalive_time: Some(DEFAULT_KEEPALIVE_TIME),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_retries: DEFAULT_KEEPALIVE_RETRIES,
            tcp_user_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            linger_timeout: Some(DEFAULT_LINGER_TIMEOUT),
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
            max_buffered: None,
            workers: 1,
            handle_signals: false,
            systemd: false,
            metrics: None,
        }
    }
}

impl Config {
    /// Check the values against what the server and the kernel can honour, so a bad flag
    /// fails at start-up with its name rather than as a panic or an `EINVAL` later.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_frame == 0 || self.max_frame > u32::MAX as usize {
            return Err(format!(
                "max_frame must be 1..={} bytes, not {}",
                u32::MAX,
                self.max_frame
            ));
        }
        if self.max_pending_output == 0 {
            return Err("max_pending_output must be at least 1 byte".into());
        }
        if self.max_connections == Some(0) {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_buffered == Some(0) {
            return Err("max_buffered must be at least 1 byte".into());
        }
        if self.workers == 0 {
            return Err("workers must be at least 1".into());
        }
        for (name, value) in [
            ("idle_timeout", self.idle_timeout),
            ("tcp_user_timeout", self.tcp_user_timeout),
            ("drain_timeout", Some(self.drain_timeout)),
            ("linger_timeout", self.linger_timeout),
            ("frame_timeout", self.frame_timeout),
        ] {
            if value.is_some_and(|v| v > MAX_TIMEOUT) {
                return Err(format!(
                    "{name} must be at most {} s",
                    MAX_TIMEOUT.as_secs()
                ));
            }
        }
        for (name, value) in [
            ("keepalive_time", self.keepalive_time),
            ("keepalive_interval", Some(self.keepalive_interval)),
        ] {
            if value.is_some_and(|v| v.as_secs() > MAX_KEEPALIVE_SECS || v.is_zero()) {
                return Err(format!("{name} must be 1..={MAX_KEEPALIVE_SECS} s"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn values_that_would_panic_or_stall_are_refused_by_name() {
        let bad = |c: Config| c.validate().unwrap_err();
        assert!(bad(Config {
            max_pending_output: 0,
            ..Config::default()
        })
        .contains("max_pending_output"));
        assert!(bad(Config {
            idle_timeout: Some(Duration::MAX),
            ..Config::default()
        })
        .contains("idle_timeout"));
        assert!(bad(Config {
            keepalive_time: Some(Duration::from_secs(40_000)),
            ..Config::default()
        })
        .contains("keepalive_time"));
        assert!(bad(Config {
            max_frame: 0,
            ..Config::default()
        })
        .contains("max_frame"));
    }
}
