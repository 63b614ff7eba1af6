//! The file-descriptor budget and the accept gate.
//!
//! Two promises live here. First, closewait never asks the kernel for an fd it knows it
//! cannot have: at start-up it raises `RLIMIT_NOFILE`'s soft limit to the hard limit and
//! derives the connection cap from what is left after a reserve. Second, when it cannot or
//! must not accept, it stops asking: at the cap the listener is paused and new connections
//! wait in the kernel's backlog; on EMFILE/ENFILE accept backs off (5 ms doubling to 1 s)
//! instead of spinning, and retries when the back-off ends or a connection closes (a freed
//! fd raises no event). This module decides; the loop ([`crate::Server`]) acts.

use std::io;
use std::time::{Duration, Instant};

/// Fds each worker holds besides connections: its epoll instance, its waker (eventfd) and
/// its listener.
pub const FDS_PER_WORKER: u64 = 3;
/// Fds of the signal handler (signal-hook-mio's self-pipe: a socket pair).
pub const SIGNAL_FDS: u64 = 2;
/// Headroom for everything else a process may open later (a log file, a metrics socket,
/// a template user's database connection) and for accepting one connection at the cap to
/// reject it. Redis keeps 32 for the same reason.
pub const FD_SAFETY_MARGIN: u64 = 32;
/// First EMFILE back-off; doubles on each failure (Go's net/http uses the same numbers).
pub const BACKOFF_START: Duration = Duration::from_millis(5);
/// Longest EMFILE back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `RLIMIT_NOFILE` as found and as left by [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit when the process started.
    pub soft_at_start: u64,
    /// Soft limit now: what `open`/`accept` are held to.
    pub soft: u64,
    /// Hard limit: the ceiling an unprivileged process may raise the soft limit to.
    pub hard: u64,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, as `ulimit -n $(ulimit -Hn)` would;
/// no privilege is needed. Failure to raise is not fatal: the cap is derived from what we have.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let (soft_at_start, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = match rlimit::increase_nofile_limit(hard) {
        Ok(soft) => soft,
        Err(e) => {
            log::warn!(
                "could not raise the soft fd limit {soft_at_start} to the hard limit {hard}: {e}"
            );
            soft_at_start
        }
    };
    Ok(NofileLimit {
        soft_at_start,
        soft,
        hard,
    })
}

/// The soft `RLIMIT_NOFILE` now. It can change under a running process (`prlimit --pid`),
/// so whatever reports it after a failure reads it again rather than trusting start-up.
pub fn current_nofile_soft() -> io::Result<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft)
}

/// How many connections the fd limit allows, and whether a requested cap had to be lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The connection cap in force (over all workers).
    pub max_connections: usize,
    /// Fds kept back from connections.
    pub reserve: u64,
    /// The most the limit allows (`max_connections` unless a lower cap was requested).
    pub allowed: usize,
}

/// Errors deriving the budget.
#[derive(Debug, PartialEq, Eq)]
pub struct LimitTooLow {
    /// The soft limit.
    pub fd_limit: u64,
    /// Fds needed before a single connection fits.
    pub reserve: u64,
}

impl std::fmt::Display for LimitTooLow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the fd limit ({}) leaves no room for connections: {} fds are reserved; raise it \
             (ulimit -n, limits.conf nofile, systemd LimitNOFILE=)",
            self.fd_limit, self.reserve
        )
    }
}

/// `max_connections = fd_limit - reserve`, where
/// `reserve = fds open at start + FDS_PER_WORKER * workers + SIGNAL_FDS + FD_SAFETY_MARGIN`,
/// lowered to `requested` if that is smaller. Counting the fds already
/// open (stdio, inherited fds, an embedding program's files) is what makes the cap honest:
/// the kernel's limit applies to the highest fd number, not to our connections.
pub fn derive_budget(
    fd_limit: u64,
    open_at_start: u64,
    workers: usize,
    requested: Option<usize>,
) -> Result<Budget, LimitTooLow> {
    let reserve = open_at_start + FDS_PER_WORKER * workers as u64 + SIGNAL_FDS + FD_SAFETY_MARGIN;
    let allowed = fd_limit.saturating_sub(reserve);
    if allowed == 0 {
        return Err(LimitTooLow { fd_limit, reserve });
    }
    let allowed = usize::try_from(allowed).unwrap_or(usize::MAX);
    let max_connections = requested.map_or(allowed, |r| r.min(allowed));
    Ok(Budget {
        max_connections,
        reserve,
        allowed,
    })
}

/// Split a cap between workers: the first `total % workers` get one more.
pub fn split_cap(total: usize, workers: usize, index: usize) -> usize {
    if total == usize::MAX {
        return usize::MAX;
    }
    total / workers + usize::from(index < total % workers)
}

/// Why the listener is not being polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Accepting.
    Open,
    /// At the connection cap since this instant; resumes when a connection closes.
    Full(Instant),
    /// accept failed for lack of fds; retry at this instant or when a connection closes.
    BackingOff(Instant),
}

/// Decides when to accept. The loop asks [`AcceptGate::is_open`] before each accept and
/// reports each outcome; the gate says when to pause and when to retry.
#[derive(Debug)]
pub struct AcceptGate {
    gate: Gate,
    backoff: Duration,
    failures: u64,
}

impl Default for AcceptGate {
    fn default() -> Self {
        AcceptGate {
            gate: Gate::Open,
            backoff: BACKOFF_START,
            failures: 0,
        }
    }
}

/// A state change the loop should log or count.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing worth saying.
    None,
    /// The cap was reached: accepting paused.
    Paused,
    /// A slot freed after this long at the cap.
    Resumed(Duration),
    /// The first accept failure of a run of them; retry after the delay.
    ExhaustedStart(Duration),
    /// Another failure while backing off; the next delay.
    ExhaustedAgain(Duration),
    /// accept works again after this many failures.
    Recovered(u64),
}

impl AcceptGate {
    /// The current gate.
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// Whether the listener should be accepted from (and registered) now.
    pub fn is_open(&self) -> bool {
        self.gate == Gate::Open
    }

    /// When to retry accept on our own (the end of a back-off), if ever.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.gate {
            Gate::BackingOff(at) => Some(at),
            _ => None,
        }
    }

    /// The connection cap was reached.
    pub fn full(&mut self, now: Instant) -> Transition {
        match self.gate {
            Gate::Full(_) => Transition::None,
            _ => {
                self.gate = Gate::Full(now);
                Transition::Paused
            }
        }
    }

    /// accept failed with EMFILE, ENFILE, ENOBUFS or ENOMEM.
    pub fn exhausted(&mut self, now: Instant) -> Transition {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.failures += 1;
        let first = !matches!(self.gate, Gate::BackingOff(_)) && self.failures == 1;
        self.gate = Gate::BackingOff(now + delay);
        if first {
            Transition::ExhaustedStart(delay)
        } else {
            Transition::ExhaustedAgain(delay)
        }
    }

    /// A connection closed, or the back-off timer fired: worth trying accept again.
    /// Returns what changed; the gate is then open.
    pub fn retry(&mut self, now: Instant) -> Transition {
        let transition = match self.gate {
            Gate::Full(since) => Transition::Resumed(now.saturating_duration_since(since)),
            _ => Transition::None,
        };
        self.gate = Gate::Open;
        transition
    }

    /// accept returned a connection: the fd shortage (if any) is over.
    pub fn accepted(&mut self) -> Transition {
        self.backoff = BACKOFF_START;
        match std::mem::take(&mut self.failures) {
            0 => Transition::None,
            failures => Transition::Recovered(failures),
        }
    }
}

/// What an accept error means for the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// About one connection only (it was aborted or refused by a firewall): skip it and go on.
    Skip,
    /// The process or system is out of fds or memory: back off.
    Exhausted,
    /// Anything else: back off too (never spin, never exit), but log it as unexpected.
    Other,
}

/// Classify an `accept` error. EMFILE has no stable `ErrorKind` (it is `Uncategorized`), so
/// errno values are matched directly.
pub fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => {
            return AcceptError::Skip;
        }
        _ => {}
    }
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        // accept(2): pending network errors "should be treated like EAGAIN", and EPERM is a
        // firewall refusing this one connection.
        Some(
            libc::EPERM
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ENETDOWN,
        ) => AcceptError::Skip,
        _ => AcceptError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_the_limit_minus_open_fds_minus_the_reserve() {
        let b = derive_budget(1024, 3, 1, None).unwrap();
        assert_eq!(b.reserve, 3 + 3 + 2 + 32);
        assert_eq!(b.max_connections, 1024 - 40);
        let two = derive_budget(1024, 3, 2, None).unwrap();
        assert_eq!(two.max_connections, 1024 - 43);
    }

    #[test]
    fn requested_cap_below_the_limit_is_kept_and_above_is_clamped() {
        assert_eq!(
            derive_budget(1024, 3, 1, Some(10)).unwrap().max_connections,
            10
        );
        let b = derive_budget(128, 3, 1, Some(1000)).unwrap();
        assert_eq!((b.max_connections, b.allowed), (88, 88));
    }

    #[test]
    fn a_limit_below_the_reserve_is_an_error_that_says_how_to_raise_it() {
        let e = derive_budget(30, 3, 1, None).unwrap_err();
        assert_eq!(
            e,
            LimitTooLow {
                fd_limit: 30,
                reserve: 40
            }
        );
        assert!(e.to_string().contains("LimitNOFILE"), "{e}");
    }

    #[test]
    fn cap_splits_between_workers_without_losing_any() {
        assert_eq!(
            (0..3).map(|i| split_cap(10, 3, i)).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(split_cap(usize::MAX, 2, 1), usize::MAX);
    }

    #[test]
    fn backoff_doubles_from_5ms_to_1s_and_resets_after_an_accept() {
        let now = Instant::now();
        let mut gate = AcceptGate::default();
        assert_eq!(
            gate.exhausted(now),
            Transition::ExhaustedStart(Duration::from_millis(5))
        );
        assert_eq!(gate.retry_at(), Some(now + Duration::from_millis(5)));
        let delays: Vec<_> = (0..10)
            .map(|_| match gate.exhausted(now) {
                Transition::ExhaustedAgain(d) => d.as_millis(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        gate.retry(now);
        assert!(gate.is_open());
        assert_eq!(gate.accepted(), Transition::Recovered(11));
        assert_eq!(
            gate.exhausted(now),
            Transition::ExhaustedStart(Duration::from_millis(5))
        );
    }

    #[test]
    fn full_pauses_once_and_retry_reports_the_time_paused() {
        let t0 = Instant::now();
        let mut gate = AcceptGate::default();
        assert_eq!(gate.full(t0), Transition::Paused);
        assert_eq!(gate.full(t0), Transition::None);
        assert!(!gate.is_open());
        assert_eq!(
            gate.retry(t0 + Duration::from_millis(30)),
            Transition::Resumed(Duration::from_millis(30))
        );
        assert!(gate.is_open());
    }

    #[test]
    fn accept_errors_are_classified_by_errno() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            classify_accept_error(&os(libc::EMFILE)),
            AcceptError::Exhausted
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENFILE)),
            AcceptError::Exhausted
        );
        assert_eq!(
            classify_accept_error(&os(libc::ECONNABORTED)),
            AcceptError::Skip
        );
        assert_eq!(classify_accept_error(&os(libc::EPERM)), AcceptError::Skip);
        assert_eq!(classify_accept_error(&os(libc::EBADF)), AcceptError::Other);
    }
}
