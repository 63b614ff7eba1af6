//! The one place where the leaky variant differs from the reference server.
//!
//! `closewait --leaky` reproduces the incident this project exists for: a server that never
//! acts on the peer's FIN. Each such socket stays registered, in the slab and open, so the
//! kernel keeps it in CLOSE_WAIT holding an fd, until `accept` fails with
//! `Too many open files`. The defences that server lacked are off too (the fd-derived cap and
//! the idle timeout); everything else is the same code, so a comparison changes only what the
//! incident's server got wrong. Never run it for real.

use crate::connection::{Connection, Step};
use crate::Config;

/// What the server does when a peer's read returns 0 (the peer sent FIN): the single switch
/// between the reference server and the deliberately broken variant. Not part of the public
/// API: only the `closewait` binary (`--leaky`) and the load test can choose `Leak`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EofPolicy {
    /// Answer what is buffered, flush, close, free the slot: the fix.
    Close,
    /// Do nothing, as the incident's server did: the socket stays in CLOSE_WAIT forever.
    Leak,
}

/// A read returned 0: the peer sent FIN and will send nothing more.
///
/// The reference answers what is buffered, flushes and closes (else the socket stays in
/// CLOSE_WAIT). The leaky variant returns without doing anything: under edge-triggered
/// polling no event will ever come for this socket again.
pub fn on_read_eof<T>(policy: EofPolicy, conn: &mut Connection<T>) -> Step {
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

/// The configuration in force: the leaky variant drops every timer that would eventually
/// reap a leaked socket — the idle timeout, and TCP keepalive and `TCP_USER_TIMEOUT` (a
/// keepalive probe to a vanished peer draws an RST that moves the socket out of CLOSE_WAIT,
/// though its fd stays open, which would hide the leak from `ss` after a minute). The
/// incident's server had none of them.
pub fn defences(policy: EofPolicy, config: Config) -> Config {
    match policy {
        EofPolicy::Close => config,
        EofPolicy::Leak => Config {
            idle_timeout: None,
            keepalive_time: None,
            tcp_user_timeout: None,
            ..config
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leaky_variant_has_no_timer_that_could_reap_a_leaked_socket() {
        let leaky = defences(EofPolicy::Leak, Config::default());
        assert_eq!(
            (
                leaky.idle_timeout,
                leaky.keepalive_time,
                leaky.tcp_user_timeout
            ),
            (None, None, None)
        );
        assert_eq!(connection_cap(EofPolicy::Leak, 100), usize::MAX);
    }

    #[test]
    fn the_reference_keeps_every_defence() {
        let reference = defences(EofPolicy::Close, Config::default());
        assert!(reference.idle_timeout.is_some() && reference.keepalive_time.is_some());
        assert_eq!(connection_cap(EofPolicy::Close, 100), 100);
    }
}
