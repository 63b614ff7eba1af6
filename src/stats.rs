//! Counters: every way a connection ends and every accept decision, as numbers.
//!
//! One [`Stats`] is shared by all workers (plain relaxed atomics: each counter is independent
//! and only ever read as a snapshot), so STATS and the shutdown summary are sums over the whole
//! process. This module only counts; it never decides anything.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// A named counter or gauge. The STATS reply lists them in this order as `name value`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Counter {
            /// Every counter, in STATS order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// The name used in the STATS reply and the shutdown summary.
            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// Connections open now (lingering ones included).
    Active => "active",
    /// Connections closing gracefully now: replies flushed, writing shut down, waiting for the
    /// peer's FIN (or the linger timeout) while discarding its input.
    Lingering => "lingering",
    /// Bytes all connections hold now in partial frames and pending replies (allocated
    /// capacity), against the memory budget.
    BufferedBytes => "buffered_bytes",
    /// Connections accepted since start (rejected ones included).
    Accepted => "accepted",
    /// Closed after the peer's FIN (read returned 0), replies flushed.
    ClosedEof => "closed_eof",
    /// Closed because the peer reset the connection (ECONNRESET, EPIPE).
    ClosedReset => "closed_reset",
    /// Closed on any other I/O error (e.g. ETIMEDOUT from TCP_USER_TIMEOUT or keepalive).
    ClosedError => "closed_error",
    /// Closed after an invalid frame (length 0 or above max_frame) and its ERROR reply.
    ClosedProtocol => "closed_protocol",
    /// Closed after the idle timeout with nothing received or sent.
    ClosedIdle => "closed_idle",
    /// Closed because the peer accepted no output for the idle timeout.
    ClosedWriteStall => "closed_write_stall",
    /// Closed by a graceful shutdown.
    ClosedShutdown => "closed_shutdown",
    /// Closed because a frame was not completed within the frame timeout (ERROR sent).
    ClosedFrameTimeout => "closed_frame_timeout",
    /// Closed because it held the most memory when all connections passed the memory budget.
    ClosedMemory => "closed_memory",
    /// Sent "server full" and closed (`--when-full reject`).
    Rejected => "rejected",
    /// Peer closes deliberately ignored by the leaky variant (sockets left in CLOSE_WAIT).
    Leaked => "leaked",
    /// Requests answered (every complete frame, errors included).
    Requests => "requests",
    /// Times accepting stopped because the connection cap was reached.
    AcceptPauses => "accept_pauses",
    /// Total milliseconds spent not accepting because of the cap.
    AcceptPausedMs => "accept_paused_ms",
    /// accept() failures for lack of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    EmfileEvents => "emfile_events",
    /// The connection cap in force (sum over workers).
    MaxConnections => "max_connections",
    /// The process's RLIMIT_NOFILE soft limit: raised at start-up, re-read when accept fails
    /// (an operator may change it under a running process with `prlimit --pid`).
    FdLimit => "fd_limit",
    /// The memory budget for partial frames and pending replies, in bytes (0 = none).
    MaxBuffered => "max_buffered",
    /// Event-loop threads.
    Workers => "workers",
}

/// The process-wide counters. Cheap to update from the loop, safe to read from anywhere.
#[derive(Debug, Default)]
pub struct Stats {
    values: [AtomicU64; Counter::ALL.len()],
}

impl Stats {
    /// The current value of `counter`.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize].load(Ordering::Relaxed)
    }

    /// Add `n` to `counter`.
    pub fn add(&self, counter: Counter, n: u64) {
        self.values[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Subtract `n` from a gauge such as [`Counter::Active`].
    pub fn sub(&self, counter: Counter, n: u64) {
        self.values[counter as usize].fetch_sub(n, Ordering::Relaxed);
    }

    /// Set `counter` to `n` (used for configuration values such as the cap).
    pub fn set(&self, counter: Counter, n: u64) {
        self.values[counter as usize].store(n, Ordering::Relaxed);
    }

    /// Append the STATS text: one `name value` line per counter.
    pub fn write_text(&self, out: &mut Vec<u8>) {
        let mut text = String::with_capacity(Counter::ALL.len() * 24);
        for &counter in Counter::ALL {
            let _ = writeln!(text, "{} {}", counter.name(), self.get(counter));
        }
        out.extend_from_slice(text.as_bytes());
    }

    /// One line for the log: every non-zero counter, `name=value`.
    pub fn summary(&self) -> String {
        let mut line = String::new();
        for &counter in Counter::ALL {
            let value = self.get(counter);
            if value != 0 {
                let _ = write!(
                    line,
                    "{}{}={}",
                    if line.is_empty() { "" } else { " " },
                    counter.name(),
                    value
                );
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_text_has_one_name_value_line_per_counter() {
        let stats = Stats::default();
        stats.add(Counter::Accepted, 3);
        stats.add(Counter::ClosedEof, 2);
        stats.set(Counter::FdLimit, 1024);
        let mut out = Vec::new();
        stats.write_text(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), Counter::ALL.len());
        for required in [
            "active 0",
            "accepted 3",
            "closed_eof 2",
            "closed_reset 0",
            "closed_error 0",
            "max_connections 0",
            "fd_limit 1024",
        ] {
            assert!(
                text.lines().any(|l| l == required),
                "missing {required:?} in\n{text}"
            );
        }
    }

    #[test]
    fn summary_lists_only_non_zero_counters() {
        let stats = Stats::default();
        stats.add(Counter::ClosedIdle, 4);
        assert_eq!(stats.summary(), "closed_idle=4");
    }
}
