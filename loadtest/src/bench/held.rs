//! Figures with many held connections: idle memory and the close storm.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use closewait::service::{PING, PING_REPLY};
use closewait::testing::procfs;

use super::server::rss_bytes;

/// Open `n` connections (blocking connects: loopback completes each in the kernel) and wait,
/// bounded, until the server holds them all (its fd count is up by `n`).
fn hold(addr: SocketAddr, pid: u32, n: usize) -> io::Result<Vec<TcpStream>> {
    let fds_before = procfs::open_fds(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr)?);
    }
    wait_for(Duration::from_secs(20), || {
        Ok(procfs::open_fds(pid)? >= fds_before + n)
    })
    .map_err(|e| io::Error::other(format!("the server did not accept {n} connections: {e}")))?;
    Ok(held)
}

/// Poll `done` every 5 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, mut done: impl FnMut() -> io::Result<bool>) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Idle memory per connection.
pub struct Idle {
    /// (VmRSS with `n` idle connections − VmRSS before) / n, in bytes.
    pub bytes_per_conn: f64,
    /// The same after each connection did one PING and went idle again.
    pub bytes_per_conn_after_ping: f64,
}

/// Open `n` idle connections and see what they cost the server in resident memory.
pub fn idle_memory(addr: SocketAddr, pid: u32, n: usize) -> io::Result<Idle> {
    let settle = Duration::from_millis(200);
    std::thread::sleep(settle);
    let before = rss_bytes(pid)? as f64;
    let mut held = hold(addr, pid, n)?;
    std::thread::sleep(settle);
    let idle = rss_bytes(pid)? as f64;
    // One request each, then idle again: does a used connection keep buffers?
    let ping = [0, 0, 0, 1, PING];
    for stream in &mut held {
        stream.write_all(&ping)?;
    }
    let mut reply = [0u8; 5];
    for stream in &mut held {
        stream.read_exact(&mut reply)?;
        if reply != [0, 0, 0, 1, PING_REPLY] {
            return Err(io::Error::other("unexpected reply to PING"));
        }
    }
    std::thread::sleep(settle);
    let used = rss_bytes(pid)? as f64;
    Ok(Idle {
        bytes_per_conn: (idle - before) / n as f64,
        bytes_per_conn_after_ping: (used - before) / n as f64,
    })
}

/// Close storm result.
pub struct Storm {
    /// Time from the last FIN the client sent until it had received the server's FIN on all
    /// of the closed connections: the server had closed every one of them. Resolution: one
    /// epoll wake-up on the client (microseconds).
    pub close_ms: f64,
    /// Time from the last FIN until a read of `/proc/PID/fd` (started after the last server
    /// FIN arrived) showed the server's fd count down by the number closed.
    pub fd_ms: f64,
    /// Time one read of `/proc/PID/fd` takes with all connections held: the resolution of
    /// `fd_ms`.
    pub poll_ms: f64,
    /// Reads of the fd count it took (1 = already down at the first read).
    pub reads: u32,
    /// The server's CLOSE_WAIT sockets at the first check after the fd count dropped.
    pub close_wait: usize,
    /// Time until that CLOSE_WAIT check completed.
    pub close_wait_checked_ms: f64,
}

/// Hold `held` connections, close `closed` of them at once, and time the server's release.
///
/// The client ends each victim with `shutdown(SHUT_WR)`: on the wire and to the server that
/// is exactly what `close()` does (a FIN; the server's read returns 0), but the client keeps
/// the socket, so it sees the server's own FIN, sent when the server closes its socket. The
/// time of the last such FIN is the storm's end, measured to the microsecond; the server's fd
/// count in `/proc` then confirms it (to the resolution of one read of `/proc/PID/fd`).
pub fn close_storm(addr: SocketAddr, pid: u32, held: usize, closed: usize) -> io::Result<Storm> {
    let mut streams = hold(addr, pid, held)?;
    let closed = closed.min(held);
    // Register the victims before the clock starts.
    let mut poll = mio::Poll::new()?;
    let mut victims = Vec::with_capacity(closed);
    for (i, stream) in streams.drain(..closed).enumerate() {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        poll.registry()
            .register(&mut stream, mio::Token(i), mio::Interest::READABLE)?;
        victims.push(stream);
    }
    std::thread::sleep(Duration::from_millis(100));
    let read_started = Instant::now();
    let fds_before = procfs::open_fds(pid)?;
    let poll_ms = read_started.elapsed().as_secs_f64() * 1e3;
    let target = fds_before.saturating_sub(closed);
    for victim in &victims {
        victim.shutdown(std::net::Shutdown::Write)?;
    }
    let last_fin = Instant::now();
    let deadline = last_fin + Duration::from_secs(20);
    let mut open = vec![true; closed];
    let mut remaining = closed;
    let mut last_eof = last_fin;
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = [0u8; 64];
    while remaining > 0 {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::other(format!(
                "{remaining} of {closed} connections not closed by the server 20 s after the storm"
            )));
        }
        match poll.poll(&mut events, Some(deadline - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let i = event.token().0;
            if !open.get(i).copied().unwrap_or(false) {
                continue;
            }
            loop {
                match victims[i].read(&mut buf) {
                    Ok(0) => {
                        open[i] = false;
                        remaining -= 1;
                        last_eof = Instant::now();
                        break;
                    }
                    Ok(_) => return Err(io::Error::other("unexpected data from the server")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // A reset also means the server's socket is gone.
                    Err(_) => {
                        open[i] = false;
                        remaining -= 1;
                        last_eof = Instant::now();
                        break;
                    }
                }
            }
        }
    }
    let mut reads = 0u32;
    let seen = loop {
        let fds = procfs::open_fds(pid)?;
        reads += 1;
        let now = Instant::now();
        if fds <= target {
            break now;
        }
        if now >= deadline {
            return Err(io::Error::other(format!(
                "the server still holds {fds} fds 20 s after the storm (wanted {target})"
            )));
        }
    };
    let close_wait = procfs::close_wait_sockets(pid)?;
    let checked = Instant::now();
    drop(victims);
    drop(streams);
    let ms = |t: Instant| t.duration_since(last_fin).as_secs_f64() * 1e3;
    Ok(Storm {
        close_ms: ms(last_eof),
        fd_ms: ms(seen),
        poll_ms,
        reads,
        close_wait,
        close_wait_checked_ms: ms(checked),
    })
}

/// Wait (bounded) until the server's fd count is back to `start`; returns the last count seen.
pub fn settle_fds(pid: u32, start: usize, limit: Duration) -> io::Result<usize> {
    let mut last = procfs::open_fds(pid)?;
    let _ = wait_for(limit, || {
        last = procfs::open_fds(pid)?;
        Ok(last <= start)
    });
    Ok(last)
}
