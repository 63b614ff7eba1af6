//! Opening the listening socket, with the options every accepted socket inherits.
//!
//! Built with socket2 rather than `mio::net::TcpListener::bind` because the backlog must be
//! ours: at the connection cap new connections wait in it, and mio's default (128) would turn
//! a short wait into refused connections. Socket options set here are copied by Linux to every
//! accepted socket (verified on this kernel: nodelay, keepalive, TCP_USER_TIMEOUT), which
//! saves several syscalls per accept.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpListener;
use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};

use crate::Config;

/// Bind and listen on `addr` with the backlog and per-connection options from `config`.
/// `reuse_port` lets several workers share the address (the kernel spreads connections).
pub fn bind(addr: SocketAddr, config: &Config, reuse_port: bool) -> io::Result<TcpListener> {
    open(addr, config, reuse_port)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

fn open(addr: SocketAddr, config: &Config, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Restarting while old connections sit in TIME_WAIT must not fail with EADDRINUSE.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    // Replies are small and request/response: do not let Nagle hold them back.
    socket.set_tcp_nodelay(true)?;
    if let Some(time) = config.keepalive_time {
        // Finds peers that vanished without FIN or RST (power loss, NAT timeout): without it
        // such a connection looks merely idle.
        let keepalive = TcpKeepalive::new()
            .with_time(time)
            .with_interval(config.keepalive_interval)
            .with_retries(config.keepalive_retries);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if let Some(timeout) = config.tcp_user_timeout {
        // Kernel-side backstop for a peer that stops acknowledging our output.
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
    Ok(TcpListener::from_std(socket.into()))
}
