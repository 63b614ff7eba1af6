//! Opening the listening socket(s), with the options every accepted socket inherits.
//!
//! Built with socket2 rather than `mio::net::TcpListener::bind` because the backlog must be
//! ours: at the connection cap new connections wait in it, and mio's default (128) would turn
//! a short wait into refused connections. Socket options set here are copied by Linux to every
//! accepted socket (nodelay, keepalive, TCP_USER_TIMEOUT; the test below checks it on the
//! running kernel), which saves several syscalls per accept.
//!
//! A socket passed by systemd (socket activation, see [`crate::systemd`]) gets the same
//! options and backlog; only binding is systemd's.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpListener;
use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};

use crate::Config;

/// One listener per worker: bound here, or shared from the socket systemd passed.
///
/// Bound here, the first binds `config.listen` and each further worker binds its own
/// `SO_REUSEPORT` sibling on the same address; the kernel spreads connections over them.
///
/// Passed by systemd (`inherited`), every worker gets a duplicate of that one socket.
/// Siblings would be ours alone: the connections queued in them would be reset when this
/// process exits, which is exactly what socket activation is there to avoid. All workers
/// then wake for each new connection and one wins the accept (the others see `WouldBlock`),
/// a cost paid per connection, not per request; and a worker at its cap leaves the
/// accepting to the others instead of holding the connections hashed to it.
pub fn open_all(
    config: &Config,
    workers: usize,
    inherited: Option<Socket>,
) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(workers);
    match inherited {
        None => {
            let first = bind(config.listen, config, workers > 1)?;
            let addr = first.local_addr()?;
            listeners.push(first);
            while listeners.len() < workers {
                listeners.push(bind(addr, config, true)?);
            }
        }
        Some(socket) => {
            adopt(&socket, config).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot serve the socket passed by systemd: {e}"),
                )
            })?;
            while listeners.len() + 1 < workers {
                listeners.push(TcpListener::from_std(socket.try_clone()?.into()));
            }
            let listener = TcpListener::from_std(socket.into());
            log::info!(
                "serving the listening socket passed by systemd ({}; --listen is not used){}",
                listener.local_addr()?,
                if workers > 1 {
                    "; every worker accepts from it"
                } else {
                    ""
                }
            );
            listeners.push(listener);
        }
    }
    Ok(listeners)
}

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
    set_inherited_options(&socket, config)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog(config))?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Make a listening socket systemd opened serve like one we bound.
fn adopt(socket: &Socket, config: &Config) -> io::Result<()> {
    let tcp = socket.r#type()? == Type::STREAM
        && matches!(socket.domain()?, Domain::IPV4 | Domain::IPV6)
        && socket.is_listener()?;
    if !tcp {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a listening TCP socket (the .socket unit needs ListenStream=ADDRESS:PORT)",
        ));
    }
    // systemd passes a blocking socket. The flag belongs to the open file, shared with
    // systemd's copy, which does not mind: it only polls the socket while no service runs.
    socket.set_nonblocking(true)?;
    set_inherited_options(socket, config)?;
    // listen(2) on a listening socket only sets a new backlog (Linux keeps the connections
    // already queued), so --backlog means the same with or without socket activation.
    socket.listen(backlog(config))
}

fn backlog(config: &Config) -> i32 {
    i32::try_from(config.backlog).unwrap_or(i32::MAX)
}

/// The options Linux copies from the listener to every socket it accepts.
fn set_inherited_options(socket: &Socket, config: &Config) -> io::Result<()> {
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
    Ok(())
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

    /// A socket systemd passed is served like one bound here: same inherited options, and
    /// every worker gets the one socket (same address, no sibling of its own).
    #[test]
    fn a_passed_socket_is_shared_by_the_workers_with_the_same_options() {
        let config = Config {
            keepalive_time: Some(Duration::from_secs(42)),
            ..Config::default()
        };
        let passed = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        passed
            .bind(&SockAddr::from(
                "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            ))
            .unwrap();
        passed.listen(1).unwrap();
        let addr = passed.local_addr().unwrap().as_socket().unwrap();
        let mut listeners = open_all(&config, 2, Some(passed)).unwrap();
        assert_eq!(listeners.len(), 2);
        for listener in &listeners {
            assert_eq!(listener.local_addr().unwrap(), addr);
        }
        let mut poll = mio::Poll::new().unwrap();
        poll.registry()
            .register(&mut listeners[1], mio::Token(1), mio::Interest::READABLE)
            .unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        let (accepted, _) = listeners[1].accept().expect("the connection within 5 s");
        // The other copy finds the queue empty and says so: systemd passes a blocking
        // socket, and a blocking accept would hang the loop.
        assert!(
            matches!(listeners[0].accept(), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the passed socket was not made non-blocking"
        );
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY not set");
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
    }

    #[test]
    fn a_passed_socket_that_is_not_listening_is_refused() {
        let bound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        bound
            .bind(&SockAddr::from(
                "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            ))
            .unwrap();
        let e = open_all(&Config::default(), 1, Some(bound)).unwrap_err();
        assert!(e.to_string().contains("not a listening TCP socket"), "{e}");
    }
}
