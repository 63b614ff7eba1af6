//! The load generator: one thread, mio, non-blocking sockets, edge-triggered, reads until
//! WouldBlock into one scratch buffer. It is deliberately as lean as the server it measures:
//! on this machine the generator has one core to the server's one, and a slow generator
//! would hide the difference between servers.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use closewait::service::{ECHO, ECHO_REPLY, PING, PING_REPLY};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::server::{cpu_split, machine_busy_seconds, own_cpu_seconds, CpuSplit};

/// A request/response load: `conns` persistent connections, `depth` requests in flight on
/// each (1 = ping-pong), ECHO of `payload` bytes.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Persistent connections.
    pub conns: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// ECHO data bytes per request.
    pub payload: usize,
    /// Time before counting starts (connections up, caches warm).
    pub warmup: Duration,
    /// Counting window.
    pub measure: Duration,
}

/// What one measurement window saw.
pub struct Window {
    /// Completed requests (or connections, for churn) in the window.
    pub count: u64,
    /// Window length in seconds (measured, not nominal).
    pub secs: f64,
    /// CPU seconds the server used in the window (all threads), user and system.
    pub server_cpu: CpuSplit,
    /// CPU seconds this generator used in the window.
    pub gen_cpu: f64,
    /// Busy CPU seconds of the whole machine in the window that neither the server nor the
    /// generator was charged for (other processes, separately accounted irq time, steal).
    pub other_cpu: f64,
}

/// Tracks the warm-up/measure boundary and the CPU counters at both ends.
struct Clock {
    pid: u32,
    begin: Instant,
    end: Instant,
    started: Option<(Instant, CpuSplit, f64, f64)>,
}

impl Clock {
    fn new(pid: u32, warmup: Duration, measure: Duration) -> Clock {
        let now = Instant::now();
        Clock {
            pid,
            begin: now + warmup,
            end: now + warmup + measure,
            started: None,
        }
    }

    /// Called after every poll: returns Ok(true) at the moment counting starts.
    fn tick(&mut self, now: Instant) -> io::Result<bool> {
        if self.started.is_none() && now >= self.begin {
            self.started = Some((
                now,
                cpu_split(self.pid)?,
                own_cpu_seconds()?,
                machine_busy_seconds()?,
            ));
            return Ok(true);
        }
        Ok(false)
    }

    fn done(&self, now: Instant) -> bool {
        now >= self.end
    }

    /// Poll timeout: until the next boundary.
    fn timeout(&self, now: Instant) -> Duration {
        let next = if self.started.is_none() {
            self.begin
        } else {
            self.end
        };
        next.saturating_duration_since(now)
    }

    fn finish(&self, count: u64) -> io::Result<Window> {
        let now = Instant::now();
        let (t0, s0, g0, b0) = self
            .started
            .ok_or_else(|| io::Error::other("the window never started"))?;
        let server_cpu = cpu_split(self.pid)? - s0;
        let gen_cpu = own_cpu_seconds()? - g0;
        let busy = machine_busy_seconds()? - b0;
        Ok(Window {
            count,
            secs: now.duration_since(t0).as_secs_f64(),
            server_cpu,
            gen_cpu,
            other_cpu: (busy - server_cpu.total() - gen_cpu).max(0.0),
        })
    }
}

/// One persistent connection of a request/response load.
struct Conn {
    stream: TcpStream,
    /// A partial reply frame carried over between reads.
    partial: Vec<u8>,
    /// Request bytes the socket did not take yet.
    out: Vec<u8>,
    /// Send times of the requests in flight, oldest first: a connection's replies come in
    /// the order of its requests, so the front is the send time of the next reply.
    sent: VecDeque<Instant>,
    /// Requests sent and not yet answered.
    in_flight: usize,
}

fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + data.len());
    f.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    f.push(op);
    f.extend_from_slice(data);
    f
}

/// Write `bytes` (after anything already queued); queue what the socket does not take.
fn send(conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    if conn.out.is_empty() {
        let mut done = 0;
        while done < bytes.len() {
            match conn.stream.write(&bytes[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        conn.out.extend_from_slice(&bytes[done..]);
        Ok(())
    } else {
        conn.out.extend_from_slice(bytes);
        flush(conn)
    }
}

fn flush(conn: &mut Conn) -> io::Result<()> {
    while !conn.out.is_empty() {
        match conn.stream.write(&conn.out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Count the complete ECHO replies at the front of `buf`; returns (replies, bytes used).
fn parse_replies(buf: &[u8], payload: usize) -> io::Result<(usize, usize)> {
    let mut at = 0;
    let mut replies = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if buf.len() - at - 4 < len {
            break;
        }
        if len != payload + 1 || buf[at + 4] != ECHO_REPLY {
            return Err(io::Error::other(format!(
                "unexpected reply: length {len}, op {:#04x}",
                buf.get(at + 4).copied().unwrap_or(0)
            )));
        }
        at += 4 + len;
        replies += 1;
    }
    Ok((replies, at))
}

/// Result of [`request_load`].
pub struct LoadResult {
    /// The measurement window.
    pub window: Window,
    /// Request latencies in µs, each from the request's send to its reply's arrival (at
    /// depth 1 the round trip; pipelined, it includes the wait behind the requests ahead).
    pub rtt: Histogram<u64>,
    /// The syscall window, if one was asked for: (what the server's syscalls counted, requests
    /// completed) over the same span, counted by `perf` after the measurement window; or
    /// why perf could not count them.
    pub syscalls: Option<Result<(super::syscalls::Counts, u64), String>>,
}

/// The connections of a request/response load and the loop that keeps them busy.
pub struct Driver {
    poll: Poll,
    conns: Vec<Conn>,
    events: Events,
    scratch: Vec<u8>,
    request: Vec<u8>,
    burst: Vec<u8>,
    payload: usize,
    /// Send a new request for every reply (false: let the requests in flight run out).
    refill: bool,
}

impl Driver {
    /// Take over connected sockets and put `depth` ECHOs of `payload` bytes in flight on each;
    /// every request's latency is timed, at any depth.
    pub fn start(
        streams: Vec<std::net::TcpStream>,
        depth: usize,
        payload: usize,
    ) -> io::Result<Driver> {
        let request = frame(ECHO, &vec![b'x'; payload]);
        let burst: Vec<u8> = request.repeat(depth);
        let poll = Poll::new()?;
        let mut conns = Vec::with_capacity(streams.len());
        for (i, std) in streams.into_iter().enumerate() {
            std.set_nodelay(true)?;
            std.set_nonblocking(true)?;
            let mut stream = TcpStream::from_std(std);
            poll.registry().register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            conns.push(Conn {
                stream,
                partial: Vec::new(),
                out: Vec::new(),
                sent: VecDeque::with_capacity(depth),
                in_flight: 0,
            });
        }
        let start = Instant::now();
        for conn in &mut conns {
            conn.sent.extend(std::iter::repeat_n(start, depth));
            send(conn, &burst)?;
            conn.in_flight = depth;
        }
        Ok(Driver {
            poll,
            conns,
            events: Events::with_capacity(1024),
            scratch: vec![0u8; 64 * 1024],
            request,
            burst,
            payload,
            refill: true,
        })
    }

    /// Stop sending and wait (at most until `until`) for every reply still owed; true when
    /// none is left. A socket closed with unread replies would send RST instead of a FIN.
    pub fn drain(&mut self, until: Instant) -> io::Result<bool> {
        self.refill = false;
        let mut ignored = Histogram::<u64>::new(1).map_err(|e| io::Error::other(e.to_string()))?;
        self.pump(until, &mut ignored)?;
        Ok(self.conns.iter().all(|c| c.in_flight == 0))
    }

    /// Serve replies and send new requests until `until`; returns the replies received.
    pub fn pump(&mut self, until: Instant, rtt: &mut Histogram<u64>) -> io::Result<u64> {
        let mut count = 0u64;
        loop {
            let now = Instant::now();
            let drained = !self.refill && self.conns.iter().all(|c| c.in_flight == 0);
            if now >= until || drained {
                return Ok(count);
            }
            match self.poll.poll(&mut self.events, Some(until - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in self.events.iter() {
                let Some(conn) = self.conns.get_mut(event.token().0) else {
                    continue;
                };
                if event.is_writable() {
                    flush(conn)?;
                }
                if !event.is_readable() {
                    continue;
                }
                let replies = read_replies(conn, &mut self.scratch, self.payload)?;
                if replies == 0 {
                    continue;
                }
                count += replies as u64;
                conn.in_flight = conn.in_flight.saturating_sub(replies);
                if !self.refill {
                    continue;
                }
                conn.in_flight += replies;
                // One clock read per read batch: every reply of the batch arrived by `now`,
                // and the requests that replace them leave at `now`.
                let now = Instant::now();
                for _ in 0..replies {
                    if let Some(sent) = conn.sent.pop_front() {
                        let us = now.duration_since(sent).as_micros().max(1) as u64;
                        rtt.saturating_record(us);
                    }
                    conn.sent.push_back(now);
                }
                // Keep `depth` in flight: one new request per reply, in one write.
                let mut left = replies * self.request.len();
                while left > 0 {
                    let chunk = left.min(self.burst.len());
                    send(conn, &self.burst[..chunk])?;
                    left -= chunk;
                }
            }
        }
    }
}

/// Read until WouldBlock; count the complete ECHO replies, keep a partial one.
fn read_replies(conn: &mut Conn, scratch: &mut [u8], payload: usize) -> io::Result<usize> {
    let mut replies = 0usize;
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => return Err(io::Error::other("the server closed a connection")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(replies),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if conn.partial.is_empty() {
            // Fast path: parse straight from the scratch buffer.
            let (r, used) = parse_replies(&scratch[..n], payload)?;
            replies += r;
            conn.partial.extend_from_slice(&scratch[used..n]);
        } else {
            conn.partial.extend_from_slice(&scratch[..n]);
            let (r, used) = parse_replies(&conn.partial, payload)?;
            replies += r;
            conn.partial.drain(..used);
        }
    }
}

/// Run a request/response load against `addr` (server `pid`) and measure one window; then,
/// with `syscall_window`, keep the same load going for that long with the server's syscalls
/// counted (see [`super::syscalls`]).
pub fn request_load(
    addr: SocketAddr,
    pid: u32,
    load: Load,
    syscall_window: Option<Duration>,
) -> io::Result<LoadResult> {
    let mut streams = Vec::with_capacity(load.conns);
    for _ in 0..load.conns {
        streams.push(std::net::TcpStream::connect(addr)?);
    }
    let mut rtt = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| io::Error::other(format!("histogram: {e}")))?;
    let mut clock = Clock::new(pid, load.warmup, load.measure);
    let mut driver = Driver::start(streams, load.depth, load.payload)?;
    driver.pump(clock.begin, &mut rtt)?;
    clock.tick(Instant::now())?;
    rtt.reset();
    let count = driver.pump(clock.end, &mut rtt)?;
    let window = clock.finish(count)?;
    let syscalls = match syscall_window {
        None => None,
        Some(span) => {
            let mut ignored = rtt.clone();
            let mut count = || -> io::Result<(super::syscalls::Counts, u64)> {
                let mut perf = super::syscalls::Perf::attach(pid)?;
                // The load keeps going while perf starts: the server stays in its steady state.
                driver.pump(Instant::now() + Duration::from_millis(100), &mut ignored)?;
                perf.enable()?;
                let requests = driver.pump(Instant::now() + span, &mut ignored)?;
                Ok((perf.finish()?, requests))
            };
            Some(count().map_err(|e| e.to_string()))
        }
    };
    Ok(LoadResult {
        window,
        rtt,
        syscalls,
    })
}

/// What [`churn`] saw.
pub struct ChurnResult {
    /// Connections completed (connect, PING, PONG, close) in the window.
    pub window: Window,
    /// Connects or exchanges that failed (not counted).
    pub errors: u64,
}

enum ChurnState {
    Connecting,
    Sent(usize),
}

struct ChurnConn {
    stream: TcpStream,
    state: ChurnState,
}

fn open(poll: &Poll, addr: SocketAddr, slot: usize) -> io::Result<ChurnConn> {
    let mut stream = TcpStream::connect(addr)?;
    poll.registry().register(
        &mut stream,
        Token(slot),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(ChurnConn {
        stream,
        state: ChurnState::Connecting,
    })
}

/// Connect, one PING, close, as fast as possible with `in_flight` connections at a time.
pub fn churn(
    addr: SocketAddr,
    pid: u32,
    in_flight: usize,
    warmup: Duration,
    measure: Duration,
) -> io::Result<ChurnResult> {
    let ping = frame(PING, &[]);
    let mut poll = Poll::new()?;
    let mut slots: Vec<Option<ChurnConn>> = Vec::with_capacity(in_flight);
    let mut errors = 0u64;
    for slot in 0..in_flight {
        match open(&poll, addr, slot) {
            Ok(c) => slots.push(Some(c)),
            Err(_) => {
                errors += 1;
                slots.push(None);
            }
        }
    }
    let mut clock = Clock::new(pid, warmup, measure);
    let mut events = Events::with_capacity(1024);
    let mut count = 0u64;
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if clock.tick(now)? {
            count = 0;
            errors = 0;
        }
        if clock.done(now) {
            break;
        }
        // Slots whose connect failed (e.g. no ephemeral port yet): retry, pausing briefly.
        let mut empty = false;
        for (slot, entry) in slots.iter_mut().enumerate() {
            if entry.is_none() {
                match open(&poll, addr, slot) {
                    Ok(c) => *entry = Some(c),
                    Err(_) => {
                        errors += 1;
                        empty = true;
                    }
                }
            }
        }
        let timeout = if empty {
            clock.timeout(now).min(Duration::from_millis(1))
        } else {
            clock.timeout(now)
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let slot = event.token().0;
            let Some(Some(conn)) = slots.get_mut(slot) else {
                continue;
            };
            // Ok(true): finished; Ok(false): not yet; Err: failed.
            let outcome: io::Result<bool> = (|| {
                if let ChurnState::Connecting = conn.state {
                    if let Some(e) = conn.stream.take_error()? {
                        return Err(e);
                    }
                    match conn.stream.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
                        Err(e) => return Err(e),
                    }
                    // An empty socket buffer takes 5 bytes whole.
                    if conn.stream.write(&ping)? != ping.len() {
                        return Err(io::Error::other("short write of a PING"));
                    }
                    conn.state = ChurnState::Sent(0);
                }
                if let ChurnState::Sent(got) = &mut conn.state {
                    loop {
                        match conn.stream.read(&mut buf[*got..]) {
                            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                            Ok(n) => *got += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                        if *got >= 5 {
                            if buf[..5] != [0, 0, 0, 1, PING_REPLY] {
                                return Err(io::Error::other("unexpected reply to PING"));
                            }
                            return Ok(true);
                        }
                    }
                }
                Ok(false)
            })();
            match outcome {
                Ok(false) => continue,
                Ok(true) => count += 1,
                Err(_) => errors += 1,
            }
            // Close (drop: close(2), a FIN) and start the next connection in this slot.
            slots[slot] = None;
            match open(&poll, addr, slot) {
                Ok(c) => slots[slot] = Some(c),
                Err(_) => errors += 1,
            }
        }
    }
    let window = clock.finish(count)?;
    Ok(ChurnResult { window, errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_reply(data: &[u8]) -> Vec<u8> {
        frame(ECHO_REPLY, data)
    }

    #[test]
    fn frame_is_big_endian_length_of_op_plus_data_then_op_then_data() {
        assert_eq!(frame(ECHO, b"hi"), [0, 0, 0, 3, ECHO, b'h', b'i']);
        assert_eq!(frame(PING, &[]), [0, 0, 0, 1, PING]);
    }

    #[test]
    fn a_length_above_255_uses_every_byte_of_the_prefix() {
        let f = frame(ECHO, &[7u8; 300]);
        assert_eq!(&f[..5], [0, 0, 1, 45, ECHO], "301 = 0x012d");
        assert_eq!(f.len(), 4 + 301);
    }

    #[test]
    fn whole_replies_are_counted_and_consumed() {
        let mut buf = echo_reply(b"abcd");
        buf.extend(echo_reply(b"efgh"));
        assert_eq!(parse_replies(&buf, 4).unwrap(), (2, buf.len()));
    }

    #[test]
    fn a_partial_reply_is_left_for_the_next_read() {
        let one = echo_reply(b"abcd");
        let mut buf = one.clone();
        buf.extend_from_slice(&one[..6]);
        assert_eq!(parse_replies(&buf, 4).unwrap(), (1, one.len()));
        // Only part of the length prefix: nothing consumed yet.
        assert_eq!(parse_replies(&one[..3], 4).unwrap(), (0, 0));
    }

    #[test]
    fn a_reply_split_at_every_byte_is_counted_once() {
        let reply = echo_reply(b"xyz");
        let mut partial = Vec::new();
        let mut total = 0;
        for &b in &reply {
            partial.push(b);
            let (n, used) = parse_replies(&partial, 3).unwrap();
            total += n;
            partial.drain(..used);
        }
        assert_eq!((total, partial.len()), (1, 0));
    }

    #[test]
    fn an_error_frame_or_a_wrong_length_is_not_counted_as_a_reply() {
        let error = frame(closewait::service::ERROR, b"oops");
        assert!(parse_replies(&error, 4).is_err(), "ERROR frame accepted");
        let short = echo_reply(b"abc");
        assert!(
            parse_replies(&short, 4).is_err(),
            "3-byte echo accepted for 4"
        );
    }
}
