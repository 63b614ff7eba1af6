//! Counters: every way a connection ends and every accept decision, as numbers.
//!
//! One [`Stats`] is shared by all workers (plain relaxed atomics: each counter is independent
//! and only ever read as a snapshot), so STATS, the shutdown summary and the Prometheus
//! endpoint (`--metrics`) are sums over the whole process. This module only counts; it never
//! decides anything, and nothing here takes a lock: workers update it on every request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How a counter is exported to Prometheus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows; exported with a `_total` suffix, graphed as a rate.
    Counter,
    /// Goes up and down (or is a setting); exported as is.
    Gauge,
}

// One line per counter: `Variant => "stats_name", kind,` and, where the STATS name lacks the
// base unit Prometheus names want, the metric name (`gauge "max_buffered_bytes"`) and the
// divisor that converts the value (`counter "accept_paused_seconds" / 1000`). Adding a
// counter is adding a line: STATS, the summary and the metrics endpoint all follow
// `Counter::ALL`.
macro_rules! counters {
    ($($(#[doc = $doc:literal])*
       $variant:ident => $name:literal, $kind:ident $($metric:literal)? $(/ $divisor:literal)?,)*) => {
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

            /// The one-line description (the doc comment), used as the metric's HELP text.
            pub fn help(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!($($doc, )*).trim_ascii(),)*
                }
            }

            /// How the metrics endpoint exports it.
            pub fn kind(self) -> Kind {
                match self {
                    $(Counter::$variant => kind!($kind),)*
                }
            }

            /// The Prometheus name: `closewait_` and the STATS name, or the base-unit name
            /// given in the table (counters get `_total` on top when encoded).
            pub fn metric_name(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!("closewait_", first!($($metric,)? $name)),)*
                }
            }

            /// What the STATS value is divided by to give the metric in its base unit.
            pub fn divisor(self) -> u32 {
                match self {
                    $(Counter::$variant => first!($($divisor,)? 1),)*
                }
            }
        }
    };
}

macro_rules! kind {
    (counter) => {
        Kind::Counter
    };
    (gauge) => {
        Kind::Gauge
    };
}

macro_rules! first {
    ($first:literal $(, $rest:literal)*) => {
        $first
    };
}

counters! {
    /// Connections open now (lingering ones included).
    Active => "active", gauge,
    /// Connections closing gracefully now: replies flushed, writing shut down, waiting for the
    /// peer's FIN (or the linger timeout) while discarding its input.
    Lingering => "lingering", gauge,
    /// Bytes all connections hold now in partial frames and pending replies (allocated
    /// capacity), against the memory budget.
    BufferedBytes => "buffered_bytes", gauge,
    /// Connections accepted since start (rejected ones included).
    Accepted => "accepted", counter,
    /// Closed after the peer's FIN (read returned 0), replies flushed.
    ClosedEof => "closed_eof", counter,
    /// Closed by the service after its replies (a QUIT command), once the peer's FIN came.
    ClosedService => "closed_service", counter,
    /// Closed because the peer reset the connection (ECONNRESET, EPIPE).
    ClosedReset => "closed_reset", counter,
    /// Closed on any other I/O error (e.g. ETIMEDOUT from TCP_USER_TIMEOUT or keepalive).
    ClosedError => "closed_error", counter,
    /// Closed after an invalid frame (length 0 or above max_frame) and its ERROR reply.
    ClosedProtocol => "closed_protocol", counter,
    /// Closed after the idle timeout with nothing received or sent.
    ClosedIdle => "closed_idle", counter,
    /// Closed because the peer accepted no output for the idle timeout.
    ClosedWriteStall => "closed_write_stall", counter,
    /// Closed by a graceful shutdown.
    ClosedShutdown => "closed_shutdown", counter,
    /// Closed because a frame was not completed within the frame timeout (ERROR sent).
    ClosedFrameTimeout => "closed_frame_timeout", counter,
    /// Closed because it held the most memory when all connections passed the memory budget.
    ClosedMemory => "closed_memory", counter,
    /// Sent "server full" and closed (`--when-full reject`).
    Rejected => "rejected", counter,
    /// Peer closes deliberately ignored by the leaky variant (sockets left in CLOSE_WAIT).
    Leaked => "leaked", counter,
    /// Requests answered (every complete frame, errors included).
    Requests => "requests", counter,
    /// Times accepting stopped because the connection cap was reached.
    AcceptPauses => "accept_pauses", counter,
    /// Time spent not accepting because of the cap (STATS: milliseconds; metrics: seconds).
    AcceptPausedMs => "accept_paused_ms", counter "accept_paused_seconds" / 1000,
    /// accept() failures for lack of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    EmfileEvents => "emfile_events", counter,
    /// The connection cap in force (sum over workers).
    MaxConnections => "max_connections", gauge,
    /// The process's RLIMIT_NOFILE soft limit: raised at start-up, re-read when accept fails
    /// (an operator may change it under a running process with `prlimit --pid`).
    FdLimit => "fd_limit", gauge,
    /// The memory budget for partial frames and pending replies, in bytes (0 = none).
    MaxBuffered => "max_buffered", gauge "max_buffered_bytes",
    /// Event-loop threads.
    Workers => "workers", gauge,
}

/// Upper bounds of the FIN-to-close histogram's buckets, in nanoseconds (10 µs to 300 s,
/// 1-5-10 steps). The reference closes within microseconds; a flush to a slow half-closed
/// peer is bounded by the idle timeout (300 s by default) as a write stall; beyond that is
/// the leak this project exists to show (the leaky variant only closes at shutdown).
pub const FIN_TO_CLOSE_BOUNDS_NS: [u64; 15] = [
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    10_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// The process-wide counters. Cheap to update from the loop, safe to read from anywhere;
/// only the server updates them (a service, a handle and a test read them).
#[derive(Debug, Default)]
pub struct Stats {
    values: [AtomicU64; Counter::ALL.len()],
    fin_to_close: Histogram,
    /// The service's own counters ([`Stats::register`]), listed after the server's. The lock
    /// is taken to register (at start-up) and to list (STATS, a scrape), never to count.
    service: RwLock<Vec<ServiceCounter>>,
}

/// A counter (or gauge) of the service's own, shown in STATS and the metrics next to the
/// server's: `logins 12` in STATS, `closewait_logins_total` in the Prometheus output.
///
/// Cheap to clone (one shared atomic): make it once, register it with
/// [`Server::register`](crate::Server::register), and give a clone to each worker's service.
/// Counting is one relaxed atomic add, like the server's own counters.
#[derive(Clone, Debug)]
pub struct ServiceCounter {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    value: Arc<AtomicU64>,
}

impl ServiceCounter {
    /// A counter that only grows (exported with `_total`). `name` is lower-case ASCII
    /// letters, digits and `_`, starting with a letter (it becomes part of a metric name).
    ///
    /// # Panics
    ///
    /// If `name` is not such a name: a programming error, caught at start-up.
    pub fn counter(name: &'static str, help: &'static str) -> ServiceCounter {
        ServiceCounter::new(name, help, Kind::Counter)
    }

    /// A gauge: a value that goes up and down (sessions open now, a queue's length).
    ///
    /// # Panics
    ///
    /// As [`ServiceCounter::counter`].
    pub fn gauge(name: &'static str, help: &'static str) -> ServiceCounter {
        ServiceCounter::new(name, help, Kind::Gauge)
    }

    fn new(name: &'static str, help: &'static str, kind: Kind) -> ServiceCounter {
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        assert!(valid, "service counter name {name:?}: use [a-z][a-z0-9_]*");
        ServiceCounter {
            name,
            help,
            kind,
            value: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Add `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtract `n` (a gauge).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.value.fetch_sub(n, Ordering::Relaxed);
    }

    /// Raise to `n` if it is below (a high-water mark).
    pub fn max(&self, n: u64) {
        self.value.fetch_max(n, Ordering::Relaxed);
    }

    /// Set to `n` (a gauge).
    pub fn set(&self, n: u64) {
        self.value.store(n, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// The name in STATS.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The HELP text of its metric.
    pub fn help(&self) -> &'static str {
        self.help
    }

    /// Counter or gauge.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// Lock-free histogram: one atomic per bucket (the last one is `+Inf`), plus the sum.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; FIN_TO_CLOSE_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A copy of the FIN-to-close histogram, see [`Stats::fin_to_close`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative): `counts[i]` had a time at most
    /// [`FIN_TO_CLOSE_BOUNDS_NS`]`[i]` and above the bound before it; the last is the rest.
    pub counts: [u64; FIN_TO_CLOSE_BOUNDS_NS.len() + 1],
    /// Sum of every observed time, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Stats {
    /// The current value of `counter`.
    pub fn get(&self, counter: Counter) -> u64 {
        // Acquire pairs with `sub`'s Release: a reader that sees `active` drop sees what the
        // worker counted before it (the close's reason). Free on x86; plain loads elsewhere
        // are not ordered.
        self.values[counter as usize].load(Ordering::Acquire)
    }

    /// Add `n` to `counter`.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.values[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Subtract `n` from a gauge such as [`Counter::Active`].
    pub(crate) fn sub(&self, counter: Counter, n: u64) {
        self.values[counter as usize].fetch_sub(n, Ordering::Release);
    }

    /// Set `counter` to `n` (used for configuration values such as the cap).
    pub(crate) fn set(&self, counter: Counter, n: u64) {
        self.values[counter as usize].store(n, Ordering::Relaxed);
    }

    /// Record one connection's FIN-to-close time: from the read that returned 0 (the peer's
    /// FIN) to `close()` of its socket. Two relaxed atomic adds, so every worker can call it.
    pub(crate) fn observe_fin_to_close(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // The first bound >= ns: Prometheus buckets count values less than or equal to `le`.
        let bucket = FIN_TO_CLOSE_BOUNDS_NS.partition_point(|&bound| bound < ns);
        let h = &self.fin_to_close;
        h.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        h.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The FIN-to-close histogram as it is now.
    pub fn fin_to_close(&self) -> HistogramSnapshot {
        let h = &self.fin_to_close;
        HistogramSnapshot {
            counts: std::array::from_fn(|i| h.buckets[i].load(Ordering::Relaxed)),
            sum_ns: h.sum_ns.load(Ordering::Relaxed),
        }
    }

    /// Show `counter` in STATS and the metrics after the server's counters.
    ///
    /// # Panics
    ///
    /// If its name is already taken, by the server or by another service counter.
    pub(crate) fn register(&self, counter: &ServiceCounter) {
        let mut service = self.service.write().unwrap_or_else(|p| p.into_inner());
        let taken = Counter::ALL.iter().any(|c| c.name() == counter.name)
            || service.iter().any(|c| c.name == counter.name);
        assert!(!taken, "service counter {:?}: name taken", counter.name);
        service.push(counter.clone());
    }

    /// The service's registered counters, in registration order.
    pub fn service_counters(&self) -> Vec<ServiceCounter> {
        self.service
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Append the STATS text: one `name value` line per counter, the server's then the
    /// service's.
    pub fn write_text(&self, out: &mut Vec<u8>) {
        let mut text = String::with_capacity(Counter::ALL.len() * 24);
        for &counter in Counter::ALL {
            let _ = writeln!(text, "{} {}", counter.name(), self.get(counter));
        }
        for counter in self
            .service
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(text, "{} {}", counter.name, counter.get());
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
    fn fin_to_close_counts_each_time_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let stats = Stats::default();
        stats.observe_fin_to_close(Duration::from_micros(3));
        stats.observe_fin_to_close(Duration::from_micros(10)); // on the bound: le="1e-05"
        stats.observe_fin_to_close(Duration::from_micros(11));
        stats.observe_fin_to_close(Duration::from_secs(3600)); // past the last bound: +Inf
        let h = stats.fin_to_close();
        assert_eq!(h.counts[0], 2, "{h:?}");
        assert_eq!(h.counts[1], 1, "{h:?}");
        assert_eq!(h.counts[FIN_TO_CLOSE_BOUNDS_NS.len()], 1, "{h:?}");
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_ns, 24_000 + 3600 * 1_000_000_000);
    }

    #[test]
    fn every_counter_has_help_and_a_prometheus_name_in_base_units() {
        for &counter in Counter::ALL {
            let name = counter.metric_name();
            assert!(
                name.starts_with("closewait_") && !name.ends_with("_total"),
                "{name}"
            );
            assert!(!counter.help().is_empty(), "{name} has no help");
            assert!(
                !name.ends_with("_ms"),
                "{name}: export seconds, not milliseconds"
            );
        }
        assert_eq!(
            Counter::AcceptPausedMs.metric_name(),
            "closewait_accept_paused_seconds"
        );
        assert_eq!(Counter::AcceptPausedMs.divisor(), 1000);
        assert_eq!(Counter::Active.kind(), Kind::Gauge);
        assert_eq!(Counter::ClosedEof.kind(), Kind::Counter);
    }

    #[test]
    fn service_counters_follow_the_servers_in_stats() {
        let stats = Stats::default();
        let logins = ServiceCounter::counter("logins", "Logins accepted.");
        stats.register(&logins);
        logins.add(2);
        let mut out = Vec::new();
        stats.write_text(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().last(), Some("logins 2"), "{text}");
        assert_eq!(text.lines().count(), Counter::ALL.len() + 1);
    }

    #[test]
    fn summary_lists_only_non_zero_counters() {
        let stats = Stats::default();
        stats.add(Counter::ClosedIdle, 4);
        assert_eq!(stats.summary(), "closed_idle=4");
    }
}
