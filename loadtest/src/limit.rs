//! `loadtest limit-server`: the smallest correct server for the reference protocol, on raw
//! epoll through `libc` — the benchmark's physical limit, not a competitor.
//!
//! What it does, and nothing else: PING (0x02) → 0x82, ECHO (0x01) → 0x81 + data, any other
//! op → ERROR (0xFF); frames are a big-endian u32 length `L` (1 ≤ L ≤ 1 MiB) then `L` bytes;
//! an invalid length is answered with ERROR + a message and the connection closed; EOF closes.
//! Per readiness it makes **one** `read` into one buffer allocated once for the whole server,
//! answers every complete frame of it with **one** `write`, and keeps a split frame's bytes
//! for the next read. That is the fewest syscalls a request can cost on epoll.
//!
//! Epoll is **level-triggered** (the default): a short read leaves no missed edge, because
//! the socket is reported again for as long as it still has bytes or a FIN to read. That is
//! what makes "one read per readiness" correct without reading until `EAGAIN`.
//!
//! No timeouts, no STATS, no metrics, no logging per connection. On `EMFILE` it stops
//! accepting until a connection closes (else level-triggered epoll would report the listener
//! forever and the loop would spin). Every `unsafe` is a one-syscall wrapper at the bottom.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;

use closewait::config::DEFAULT_MAX_FRAME;
use closewait::service::{ECHO, ECHO_REPLY, ERROR, PING, PING_REPLY};

/// Flags of `loadtest limit-server`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (port 0 = let the OS pick; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:7880", value_name = "ADDR")]
    pub listen: SocketAddr,
}

/// One read's worth: big enough for 16 pipelined 64-byte ECHOs many times over.
const READ_BUF: usize = 64 * 1024;
/// Events taken per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// Listen backlog, as closewait's default.
const BACKLOG: i32 = 1024;

/// A connection: the bytes of a split frame, and replies the socket did not take yet.
#[derive(Default)]
struct Conn {
    partial: Vec<u8>,
    unsent: Vec<u8>,
}

/// Serve until killed (SIGTERM's default action exits).
pub fn run(args: Args) -> ExitCode {
    // Hold as many connections as the hard limit allows, like the tokio baseline.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("limit-server: cannot raise RLIMIT_NOFILE: {e}");
    }
    match serve(args.listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("limit-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    listener.set_reuse_address(true)?;
    // Linux copies TCP_NODELAY to every accepted socket: no setsockopt per connection.
    listener.set_tcp_nodelay(true)?;
    listener.set_nonblocking(true)?;
    listener.bind(&addr.into())?;
    listener.listen(BACKLOG)?;
    let local = listener
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("no address"))?;
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {local}")?;
    out.flush()?;
    drop(out);

    let lfd = listener.as_raw_fd();
    let ep = epoll_create()?;
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32)?;
    let mut accepting = true;
    // Indexed by fd: the kernel hands out the lowest free fd, so the table stays dense.
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut replies = Vec::with_capacity(READ_BUF);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    loop {
        let n = match epoll_wait(ep, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let fd = ev.u64 as RawFd;
            if fd == lfd {
                accepting = accept_all(ep, lfd, &mut conns);
                continue;
            }
            let Some(Some(conn)) = conns.get_mut(fd as usize) else {
                continue;
            };
            let done = if !conn.unsent.is_empty() {
                on_writable(ep, fd, conn)
            } else {
                on_readable(ep, fd, conn, &mut buf, &mut replies)
            };
            if done {
                conns[fd as usize] = None;
                // Closing removes the fd from the epoll set: no EPOLL_CTL_DEL needed.
                close(fd);
                if !accepting {
                    accepting =
                        epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32).is_ok();
                }
            }
        }
    }
}

/// Accept until `EAGAIN`. Returns false when out of fds: the listener is then taken out of
/// the epoll set until a connection closes.
fn accept_all(ep: RawFd, lfd: RawFd, conns: &mut Vec<Option<Conn>>) -> bool {
    loop {
        match accept(lfd) {
            Ok(fd) => {
                if epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32).is_err() {
                    close(fd);
                    continue;
                }
                let i = fd as usize;
                if conns.len() <= i {
                    conns.resize_with(i + 1, || None);
                }
                conns[i] = Some(Conn::default());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, lfd, 0);
                return false;
            }
            // ECONNABORTED, EINTR and the like: that one connection is gone; keep going.
            Err(_) => {}
        }
    }
}

/// One read, every complete frame answered in one write. Returns true to close.
fn on_readable(
    ep: RawFd,
    fd: RawFd,
    conn: &mut Conn,
    buf: &mut [u8],
    replies: &mut Vec<u8>,
) -> bool {
    let n = match read(fd, buf) {
        Ok(0) => return true, // EOF: close now (a split frame is dropped with the peer).
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return false
        }
        Err(_) => return true,
    };
    replies.clear();
    // Parse straight from the read buffer unless a split frame is waiting to be completed.
    let fatal = if conn.partial.is_empty() {
        let (used, fatal) = answer(&buf[..n], replies);
        conn.partial.extend_from_slice(&buf[used..n]);
        fatal
    } else {
        conn.partial.extend_from_slice(&buf[..n]);
        let (used, fatal) = answer(&conn.partial, replies);
        conn.partial.drain(..used);
        fatal
    };
    if conn.partial.is_empty() {
        conn.partial = Vec::new(); // An idle connection keeps no buffer.
    }
    if replies.is_empty() {
        return fatal;
    }
    match write(fd, replies) {
        Ok(w) if w == replies.len() => fatal,
        // The send buffer is full: keep the rest and wait for EPOLLOUT instead of EPOLLIN, so
        // a peer that does not read stops being read (backpressure, bounded memory).
        Ok(w) => {
            conn.unsent.extend_from_slice(&replies[w..]);
            fatal || epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, libc::EPOLLOUT as u32).is_err()
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            conn.unsent.extend_from_slice(replies);
            fatal || epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, libc::EPOLLOUT as u32).is_err()
        }
        Err(_) => true,
    }
}

/// Send what the socket did not take; back to reading once it is all out. True to close.
fn on_writable(ep: RawFd, fd: RawFd, conn: &mut Conn) -> bool {
    match write(fd, &conn.unsent) {
        Ok(w) => {
            conn.unsent.drain(..w);
            if conn.unsent.is_empty() {
                conn.unsent = Vec::new();
                return epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32).is_err();
            }
            false
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Answer every complete frame at the front of `input` into `out`. Returns the bytes used and
/// whether the connection must close (an invalid length, answered with ERROR). The close that
/// follows is a plain `close`: bytes the peer sent after the bad length and this server never
/// read turn it into an RST, which may overtake the ERROR frame — closewait drains first, the
/// limit does not (nothing else, by design).
fn answer(input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    let mut at = 0;
    while let Some(head) = input.get(at..at + 4) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > DEFAULT_MAX_FRAME {
            reply(out, ERROR, format!("bad frame length {len}").as_bytes());
            return (input.len(), true);
        }
        let Some(body) = input.get(at + 4..at + 4 + len) else {
            break; // Split frame: keep it for the next read.
        };
        match body[0] {
            ECHO => reply(out, ECHO_REPLY, &body[1..]),
            PING => reply(out, PING_REPLY, &[]),
            op => reply(out, ERROR, format!("unknown op {op:#04x}").as_bytes()),
        }
        at += 4 + len;
    }
    (at, false)
}

fn reply(out: &mut Vec<u8>, op: u8, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(op);
    out.extend_from_slice(data);
}

// One syscall per function: the only `unsafe` in this file.

fn check(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn epoll_create() -> io::Result<RawFd> {
    // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
    check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize).map(|fd| fd as RawFd)
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
    check(unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } as isize).map(drop)
}

fn epoll_wait(ep: RawFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: the kernel writes at most `max` events into `events`, which holds that many.
    check(unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), max, -1) } as isize)
}

fn accept(lfd: RawFd) -> io::Result<RawFd> {
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: null address pointers ask for no peer address; the call returns an fd or -1.
    check(unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), flags) } as isize)
        .map(|fd| fd as RawFd)
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

fn write(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `data.len()` bytes from `data`.
    check(unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) })
}

fn close(fd: RawFd) {
    // SAFETY: `fd` is a connection this server accepted and closes exactly once (its table
    // entry is removed first). An error from close(2) leaves nothing to do.
    unsafe { libc::close(fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: u8, data: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        reply(&mut f, op, data);
        f
    }

    #[test]
    fn every_complete_frame_is_answered_and_a_split_one_is_kept() {
        let mut input = frame(PING, &[]);
        input.extend(frame(ECHO, b"abc"));
        let whole = input.len();
        input.extend(&frame(ECHO, b"xyz")[..5]);
        let mut out = Vec::new();
        assert_eq!(answer(&input, &mut out), (whole, false));
        let mut want = frame(PING_REPLY, &[]);
        want.extend(frame(ECHO_REPLY, b"abc"));
        assert_eq!(out, want);
    }

    #[test]
    fn a_length_of_zero_or_over_one_mib_is_answered_with_error_and_closes() {
        for len in [0u32, DEFAULT_MAX_FRAME as u32 + 1] {
            let mut out = Vec::new();
            let (_, close) = answer(&len.to_be_bytes(), &mut out);
            assert!(close, "length {len} did not close");
            assert_eq!(out[4], ERROR, "length {len}: {out:?}");
        }
    }
}
