//! The memory budget: a bound on what all connections together hold.
//!
//! Each connection is bounded on its own (a partial frame up to `--max-frame`, replies up to
//! `--max-pending-output`), but the sum is not: 20,000 peers each stalling one byte short of
//! a 1 MiB frame hold 20 GiB. `--max-buffered` bounds the sum. When it is passed, the loop
//! closes the connection holding the most, as Redis's client eviction
//! (`maxmemory-clients`) does, so the peers that cause the pressure pay for it and honest
//! clients under the budget are never touched.
//!
//! This module keeps the books and picks the default; the loop decides whom to evict, and
//! [`crate::connection::Connection::evict`] gives the memory back. With several workers,
//! each gets an equal share and evicts among its own connections (no cross-thread locking on
//! the hot path), like the connection cap.

use std::fs;

/// Per-worker account of bytes held by connections in partial frames and pending replies.
///
/// Updated by the difference before and after each handler call, so a connection that
/// borrows and returns the loop's output buffer in one call (the common case) costs
/// nothing to account.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    held: usize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (`usize::MAX`: unbounded).
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget { limit, held: 0 }
    }

    /// A connection went from holding `before` to `after` bytes.
    pub fn record(&mut self, before: usize, after: usize) {
        self.held = (self.held + after).saturating_sub(before);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the connections hold more than the limit.
    pub fn is_exceeded(&self) -> bool {
        self.held > self.limit
    }
}

/// The default budget: [`crate::config::DEFAULT_MAX_BUFFERED_PERCENT`] of the memory this
/// process may use — the machine's (`MemTotal`), or its cgroup's limit if that is lower —
/// and a description of where it came from, for the start-up log line. `None` when neither
/// can be read (then there is no budget, and the log says so).
pub fn default_max_buffered() -> Option<(usize, String)> {
    let machine = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text));
    let cgroup = fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    let (bytes, source) = match (machine, cgroup) {
        (Some(m), Some(c)) if c < m => (c, "the cgroup's memory.max"),
        (Some(m), _) => (m, "MemTotal"),
        (None, Some(c)) => (c, "the cgroup's memory.max"),
        (None, None) => return None,
    };
    let percent = crate::config::DEFAULT_MAX_BUFFERED_PERCENT;
    let budget = usize::try_from(bytes / 100 * percent).unwrap_or(usize::MAX);
    Some((budget, format!("{percent}% of {source} ({bytes} bytes)")))
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let text = "MemTotal:       24684092 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24684092 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn the_account_follows_each_change_and_says_when_it_is_over() {
        let mut budget = MemoryBudget::new(100);
        budget.record(0, 60);
        budget.record(0, 40);
        assert!(!budget.is_exceeded());
        budget.record(40, 41);
        assert!(budget.is_exceeded());
        budget.record(60, 0);
        assert_eq!(budget.held(), 41);
        assert!(!budget.is_exceeded());
    }

    #[test]
    fn the_default_is_a_quarter_of_this_machine() {
        let (bytes, source) = default_max_buffered().expect("Linux has /proc/meminfo");
        assert!(bytes > 0, "{source}");
        assert!(source.starts_with("25% of "), "{source}");
    }
}
