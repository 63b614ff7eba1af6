//! Opening the listening socket, with the options every accepted socket inherits.
//!
//! Built with socket2 rather than `mio::net::TcpListener::bind` because the backlog must be
//! ours: at the connection cap new connections wait in it, and mio's default (128) would turn
//! a short wait into refused connections. Socket options set here are copied by Linux to every
//! accepted socket (nodelay, keepalive, TCP_USER_TIMEOUT; the test below checks it on the
//! running kernel), which saves several syscalls per accept.

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The module's premise: options set on the listener reach every accepted socket, so the
    /// loop never calls setsockopt per connection. If a kernel stopped copying them, accepted
    /// sockets would silently lose keepalive and the write-stall backstop.
    #[test]
    fn accepted_sockets_inherit_nodelay_keepalive_and_tcp_user_timeout() {
        let config = Config {
            keepalive_time: Some(Duration::from_secs(42)),
            keepalive_interval: Duration::from_secs(7),
            keepalive_retries: 3,
            tcp_user_timeout: Some(Duration::from_secs(9)),
            ..Config::default()
        };
        let mut listener = bind("127.0.0.1:0".parse().unwrap(), &config, false).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut poll = mio::Poll::new().unwrap();
        poll.registry()
            .register(&mut listener, mio::Token(0), mio::Interest::READABLE)
            .unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        let (accepted, _) = listener.accept().expect("the connection within 5 s");
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE not inherited");
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(9)),
            "TCP_USER_TIMEOUT not inherited"
        );
    }
}
