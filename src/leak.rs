//! The one place where the leaky variant differs from the reference server.
//!
//! `closewait --leaky` reproduces the incident this project exists for: a server that never
//! acts on the peer's FIN. Each such socket stays registered, in the slab and open, so the
//! kernel keeps it in CLOSE_WAIT holding an fd, until `accept` fails with
//! `Too many open files`. The defences that server lacked are off too (the fd-derived cap and
//! the idle timeout); everything else is the same code, so a comparison changes only what the
//! incident's server got wrong. Never run it for real.

use std::time::Duration;

use crate::connection::{Connection, Step};
use crate::EofPolicy;

/// A read returned 0: the peer sent FIN and will send nothing more.
///
/// The reference answers what is buffered, flushes and closes (else the socket stays in
/// CLOSE_WAIT). The leaky variant returns without doing anything: under edge-triggered
/// polling no event will ever come for this socket again.
pub fn on_read_eof(policy: EofPolicy, conn: &mut Connection) -> Step {
    match policy {
        EofPolicy::Close => conn.drain_then_close(),
        EofPolicy::Leak => conn.ignore_eof(),
    }
}

/// The connection cap in force: the leaky variant has none, so it accepts until EMFILE.
pub fn connection_cap(policy: EofPolicy, derived: usize) -> usize {
    match policy {
        EofPolicy::Close => derived,
        EofPolicy::Leak => usize::MAX,
    }
}

/// The idle timeout in force: the leaky variant has none, so nothing reaps its leaks.
pub fn idle_timeout(policy: EofPolicy, configured: Option<Duration>) -> Option<Duration> {
    match policy {
        EofPolicy::Close => configured,
        EofPolicy::Leak => None,
    }
}
