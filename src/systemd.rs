//! Working with systemd: socket activation and readiness notification.
//!
//! **Socket activation.** A `.socket` unit makes systemd open the listening socket and hand it
//! to the service as fd 3, announced by `LISTEN_FDS=1` and `LISTEN_PID=<our pid>`
//! (`sd_listen_fds(3)`). Because systemd keeps its own copy, the socket outlives the process:
//! during a restart, new connections wait in its backlog while the old process drains and
//! are accepted by the new one. Nobody is refused, where closing a listener we bound
//! ourselves resets every connection still queued in it.
//!
//! **Notification.** With `Type=notify`, systemd considers the service started when it
//! sends `READY=1`, and shows it as stopping from `STOPPING=1`, over the datagram socket
//! named by `NOTIFY_SOCKET` (`sd_notify(3)`).
//!
//! Both are no-ops when those variables are absent, so the same binary runs by hand
//! unchanged. The protocol itself is the `sd-notify` crate's; this module only decides what
//! closewait does with it. It never configures a socket (that is `listener`'s job) and never
//! decides when the server is ready or stopping (the loop tells it).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;
use socket2::Socket;

/// Set once the passed socket has been wrapped: a second server in this process must not
/// wrap (and later close) the same fd number again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket systemd passed to this process, if it passed one.
///
/// `Ok(None)` without `LISTEN_FDS`, or when `LISTEN_PID` names another process (the
/// variables were inherited, not meant for us). closewait serves one address, so more than
/// one passed socket is an error, as is asking twice.
pub(crate) fn take_listener() -> io::Result<Option<Socket>> {
    let context = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot use the socket passed by systemd (LISTEN_FDS): {e}"),
        )
    };
    let mut fds = sd_notify::listen_fds().map_err(context)?;
    match fds.len() {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(context(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                "{n} sockets passed; closewait serves one (one ListenStream= in the .socket unit)"
            ),
            )))
        }
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(context(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "another server in this process already took it",
        )));
    }
    Ok(fds.next().map(adopt))
}

/// Take ownership of the fd systemd passed: from here on, dropping the `Socket` closes it.
fn adopt(fd: RawFd) -> Socket {
    // SAFETY: `fd` is one of those systemd passed to this very process (LISTEN_PID checked,
    // and sd_notify::listen_fds made sure it is open and close-on-exec); nothing else in the
    // process owns it, and TAKEN lets it be wrapped only once.
    unsafe { Socket::from_raw_fd(fd) }
}

/// Tell systemd start-up is done: the listener is open and connections are being taken.
pub(crate) fn notify_ready(addr: SocketAddr, workers: usize) {
    let status = format!("serving {addr} with {workers} worker(s)");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tell systemd the process is stopping: no new connections, the drain has begun.
pub(crate) fn notify_stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining connections"),
    ]);
}

fn send(states: &[NotifyState<'_>]) {
    // A failed notification must not stop the server; under Type=notify, systemd's start
    // timeout is what notices a READY that never came.
    if let Err(e) = sd_notify::notify(states) {
        log::warn!(
            "cannot notify systemd at NOTIFY_SOCKET={:?}: {e}",
            std::env::var_os("NOTIFY_SOCKET").unwrap_or_default()
        );
    }
}
