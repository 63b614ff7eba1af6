//! The downstream peers of the incident: clients that hold a persistent connection, send
//! requests, and now and then "hit an exception" and close it actively, then reconnect.
//!
//! All clients of one server are driven by one thread with mio and non-blocking sockets
//! (the machine has two cores, shared with the servers under test). Each client is a small
//! state machine ([`Phase`]) whose every wait has a deadline, so a server that stops
//! answering (the leaky one, once out of fds) shows up as failed connects and requests, never
//! as a hung load test; the thread itself stops at the shared deadline or flag.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use closewait::service::{ECHO, ECHO_REPLY, PING, PING_REPLY};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

/// Connect and per-request timeout: long enough for a healthy server under load, short
/// enough that a dead one is noticed within a sample or two.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between a reply and the client's next request (a downstream server with steady
/// traffic).
pub const REQUEST_PACE: Duration = Duration::from_millis(5);
/// A session (one connection's life) lasts between these before the "exception".
pub const SESSION_MIN: Duration = Duration::from_millis(100);
/// See [`SESSION_MIN`].
pub const SESSION_MAX: Duration = Duration::from_millis(700);
/// Pause before reconnecting after a failed connect.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Data bytes of each ECHO request.
pub const PAYLOAD: usize = 64;
/// One request in this many is a PING; the others are ECHOs.
pub const PING_EVERY: u64 = 4;
/// Requests written back to back by an [`Ending::UnreadReplies`] close.
pub const UNREAD_BATCH: usize = 8;
/// How long an unread-replies close waits for the first reply to arrive (so that the
/// close finds unread data and resets) before closing anyway.
pub const UNREAD_WAIT: Duration = Duration::from_millis(20);
/// Clients acted on per poll turn for a passed deadline, so replies are read between sends.
const DUE_PER_TURN: usize = 4;
/// Longest `poll` sleep, so the stop flag is seen promptly even with no deadline near.
const STOP_CHECK: Duration = Duration::from_millis(50);
/// Length prefix plus op byte.
const HEADER: usize = 5;

/// How a session ends: the ways a downstream peer goes away in the incident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `close()` after its last reply: a FIN.
    Clean,
    /// Half a frame written, then `close()`: a FIN mid-frame.
    MidFrame,
    /// Requests pipelined and `close()` before reading the replies: the kernel sends RST.
    UnreadReplies,
}

impl Ending {
    /// Half clean, 30 % mid-frame, 20 % with unread replies.
    pub fn pick(roll: u64) -> Ending {
        match roll % 10 {
            0..=4 => Ending::Clean,
            5..=7 => Ending::MidFrame,
            _ => Ending::UnreadReplies,
        }
    }
}

/// What the clients of one server saw, updated live and read by the sampler.
#[derive(Default)]
pub struct Tally {
    /// Requests answered correctly.
    pub ok: AtomicU64,
    /// Requests that timed out, got a wrong reply or a closed connection.
    pub failed: AtomicU64,
    /// Connects that failed or timed out.
    pub connect_failed: AtomicU64,
    /// Sessions ended on purpose (each one a peer close the server must notice).
    pub sessions: AtomicU64,
    /// Round-trip times of this sampling period, in microseconds.
    pub latency: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn record(&self, rtt: Duration) {
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let histogram = latency.get_or_insert_with(new_histogram);
        histogram.saturating_record(rtt.as_micros() as u64);
    }

    /// Take this period's latencies, leaving an empty histogram.
    pub fn take_latency(&self) -> Histogram<u64> {
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        latency.take().unwrap_or_else(new_histogram)
    }
}

/// 1 µs to 10 s with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000, 3).expect("valid histogram bounds")
}

/// xorshift64*: a few random numbers per session need no crate.
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced (xorshift is stuck at zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A duration in `[lo, hi)`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.next() % span.max(1))
    }
}

/// Encode one request frame.
pub fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.extend_from_slice(&(1 + data.len() as u32).to_be_bytes());
    out.push(op);
    out.extend_from_slice(data);
    out
}

/// The `n`th request of a session (counting from 0) and the exact reply it must get.
pub fn request(n: u64, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if n % PING_EVERY == PING_EVERY - 1 {
        (frame(PING, &[]), frame(PING_REPLY, &[]))
    } else {
        (frame(ECHO, payload), frame(ECHO_REPLY, payload))
    }
}

/// Start the clients of one server on one thread (pinned to `cpu` if given), running until
/// `stop` or `deadline`. The thread returns an error only for a failure of the load test
/// itself (its poll, or running out of its own fds), never for what the server does.
pub fn start(
    addr: SocketAddr,
    clients: usize,
    seed: u64,
    cpu: Option<usize>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> thread::JoinHandle<io::Result<()>> {
    thread::spawn(move || {
        if let Some(cpu) = cpu {
            // Only latency figures suffer without it (see `serve`), so go on unpinned.
            if let Err(e) = crate::serve::pin_to_cpu(cpu) {
                eprintln!("load test clients: cannot pin to cpu {cpu} ({e}); running unpinned");
            }
        }
        let now = Instant::now();
        let mut clients: Vec<Client> = (0..clients)
            .map(|i| {
                Client::new(
                    Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x1234_5678_9ABC)),
                    now,
                )
            })
            .collect();
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(clients.len().max(1) * 2);
        let mut ready = vec![false; clients.len()];
        let mut cursor = 0;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // O(clients) per turn: at most a few hundred comparisons, cheaper than a heap.
            let next = clients
                .iter()
                .map(Client::deadline)
                .min()
                .unwrap_or(deadline);
            let timeout = next.saturating_duration_since(now).min(STOP_CHECK);
            match poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                if let Some(flag) = ready.get_mut(event.token().0) {
                    *flag = true;
                }
            }
            // Replies first: edge-triggered, so a client with an event tries every operation
            // until it would block, and no readiness is lost.
            for (i, client) in clients.iter_mut().enumerate() {
                if std::mem::take(&mut ready[i]) {
                    client.advance(poll.registry(), Token(i), addr, Instant::now(), &tally)?;
                }
            }
            // Then a few clients whose time has come (mostly: send the next request). The
            // millisecond poll timer makes many come due at once; sending them all before
            // reading again would put that whole batch into every request's latency. The
            // rest are due still, so the next poll does not sleep; the cursor keeps it fair.
            let now = Instant::now();
            let mut served = 0;
            for step in 0..clients.len() {
                let i = (cursor + step) % clients.len();
                if served == DUE_PER_TURN {
                    cursor = i;
                    break;
                }
                if clients[i].deadline() <= now {
                    clients[i].advance(poll.registry(), Token(i), addr, now, &tally)?;
                    served += 1;
                }
            }
        }
        // Dropping the sockets closes them: the end of the run, not an "exception".
        Ok(())
    })
}

/// Where one client is in its connection's life. Every phase has a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection; open one at `at` (now, or after a failed connect's pause).
    Disconnected { at: Instant },
    /// Non-blocking connect in flight; a full server backlog leaves it pending.
    Connecting { since: Instant },
    /// Connected; the next request goes out at `at`.
    Idle { at: Instant },
    /// A request is (being) written and its reply awaited.
    Awaiting { sent: Instant },
    /// Pipelined requests written; close once a reply is in, unread, or at `until`.
    Unread { until: Instant },
}

/// One downstream peer: a connection, its schedule, and what it waits for.
struct Client {
    rng: Rng,
    stream: Option<TcpStream>,
    phase: Phase,
    /// When the current session "hits its exception".
    session_ends: Instant,
    /// Requests sent in this session (picks ECHO or PING).
    sent: u64,
    /// Bytes still to write, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// The reply the request in flight must get, byte for byte.
    expected: Vec<u8>,
    input: Vec<u8>,
}

/// What a non-blocking socket operation came to.
enum Progress {
    Done,
    Blocked,
    Failed,
}

impl Client {
    fn new(rng: Rng, now: Instant) -> Client {
        Client {
            rng,
            stream: None,
            phase: Phase::Disconnected { at: now },
            session_ends: now,
            sent: 0,
            out: Vec::new(),
            written: 0,
            expected: Vec::new(),
            input: Vec::new(),
        }
    }

    fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Disconnected { at } | Phase::Idle { at } => at,
            Phase::Connecting { since } => since + IO_TIMEOUT,
            Phase::Awaiting { sent } => sent + IO_TIMEOUT,
            Phase::Unread { until } => until,
        }
    }

    /// Take every step possible now; return once the client waits for an event or a time.
    fn advance(
        &mut self,
        registry: &Registry,
        token: Token,
        addr: SocketAddr,
        now: Instant,
        tally: &Tally,
    ) -> io::Result<()> {
        loop {
            let before = self.phase;
            match self.phase {
                Phase::Disconnected { at } if now >= at => {
                    self.connect(registry, token, addr, now, tally)?
                }
                Phase::Disconnected { .. } => {}
                Phase::Connecting { since } => match self.connected() {
                    Progress::Done => {
                        self.session_ends = now + self.rng.between(SESSION_MIN, SESSION_MAX);
                        self.sent = 0;
                        self.phase = Phase::Idle { at: now };
                    }
                    Progress::Blocked if now < since + IO_TIMEOUT => {}
                    Progress::Blocked | Progress::Failed => self.connect_failed(now, tally),
                },
                Phase::Idle { .. } if now >= self.session_ends => self.hit_exception(now, tally),
                Phase::Idle { at } if now >= at => self.send_request(now),
                Phase::Idle { .. } => {}
                Phase::Awaiting { sent } => match self.exchange() {
                    Progress::Done => {
                        // Stamped here, not at the turn's start: other clients' work this turn
                        // is not this request's latency.
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tally.record(sent.elapsed());
                        self.phase = Phase::Idle {
                            at: now + REQUEST_PACE,
                        };
                    }
                    Progress::Blocked if now < sent + IO_TIMEOUT => {}
                    // A server that stopped answering: count it, start over on a new connection.
                    Progress::Blocked | Progress::Failed => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        self.close(now);
                    }
                },
                Phase::Unread { until } => {
                    let _ = self.flush();
                    let reply_in = self
                        .stream
                        .as_ref()
                        .is_some_and(|s| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
                    if reply_in || now >= until {
                        // Unread data in the receive queue: close() makes the kernel send RST.
                        self.end_session(now, tally);
                    }
                }
            }
            if self.phase == before {
                return Ok(());
            }
        }
    }

    fn connect(
        &mut self,
        registry: &Registry,
        token: Token,
        addr: SocketAddr,
        now: Instant,
        tally: &Tally,
    ) -> io::Result<()> {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
                self.stream = Some(stream);
                self.phase = Phase::Connecting { since: now };
            }
            // Out of our own fds: the load test is broken, not the server.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                return Err(io::Error::new(e.kind(), format!("load test client: {e}")))
            }
            Err(_) => self.connect_failed(now, tally),
        }
        Ok(())
    }

    /// Whether the non-blocking connect finished (mio: writable, then check the socket).
    fn connected(&mut self) -> Progress {
        let Some(stream) = &self.stream else {
            return Progress::Failed;
        };
        match (stream.take_error(), stream.peer_addr()) {
            (Ok(Some(_)) | Err(_), _) => Progress::Failed,
            (Ok(None), Ok(_)) => {
                // Small frames must go out at once, not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Progress::Done
            }
            (Ok(None), Err(e)) if e.kind() == ErrorKind::NotConnected => Progress::Blocked,
            (Ok(None), Err(_)) => Progress::Failed,
        }
    }

    fn connect_failed(&mut self, now: Instant, tally: &Tally) {
        tally.connect_failed.fetch_add(1, Ordering::Relaxed);
        self.stream = None;
        self.phase = Phase::Disconnected {
            at: now + RECONNECT_PAUSE,
        };
    }

    fn send_request(&mut self, now: Instant) {
        let mut payload = [0u8; PAYLOAD];
        payload[..8].copy_from_slice(&self.rng.next().to_be_bytes());
        let (request, reply) = request(self.sent, &payload);
        self.sent += 1;
        self.out = request;
        self.written = 0;
        self.expected = reply;
        self.input.clear();
        // The clock is read when the request is written, so the latency excludes the time
        // this turn spent on other clients before it.
        self.phase = Phase::Awaiting {
            sent: Instant::now().max(now),
        };
    }

    /// Write what is left of the request, read what has come of the reply, check it.
    fn exchange(&mut self) -> Progress {
        match self.flush() {
            Progress::Done => {}
            other => return other,
        }
        let Some(stream) = &mut self.stream else {
            return Progress::Failed;
        };
        let mut buf = [0u8; HEADER + PAYLOAD];
        while self.input.len() < self.expected.len() {
            let want = self.expected.len() - self.input.len();
            match stream.read(&mut buf[..want]) {
                Ok(0) => return Progress::Failed, // the server closed on us
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Blocked,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Progress::Failed,
            }
        }
        if self.input == self.expected {
            Progress::Done
        } else {
            Progress::Failed
        }
    }

    fn flush(&mut self) -> Progress {
        let Some(stream) = &mut self.stream else {
            return Progress::Failed;
        };
        while self.written < self.out.len() {
            match stream.write(&self.out[self.written..]) {
                Ok(0) => return Progress::Failed,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Blocked,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Progress::Failed,
            }
        }
        Progress::Done
    }

    /// The exception: the peer goes away without warning, in one of three ways.
    fn hit_exception(&mut self, now: Instant, tally: &Tally) {
        let mut payload = [0u8; PAYLOAD];
        payload[..8].copy_from_slice(&self.rng.next().to_be_bytes());
        self.written = 0;
        match Ending::pick(self.rng.next()) {
            Ending::Clean => self.end_session(now, tally),
            Ending::MidFrame => {
                self.out = frame(ECHO, &payload)[..(HEADER + PAYLOAD) / 2].to_vec();
                // A fresh send buffer takes 34 bytes at once; if not, the FIN still goes.
                let _ = self.flush();
                self.end_session(now, tally);
            }
            Ending::UnreadReplies => {
                self.out = (0..UNREAD_BATCH)
                    .flat_map(|_| frame(ECHO, &payload))
                    .collect();
                let _ = self.flush();
                self.phase = Phase::Unread {
                    until: now + UNREAD_WAIT,
                };
            }
        }
    }

    fn end_session(&mut self, now: Instant, tally: &Tally) {
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        self.close(now);
    }

    /// Close the connection (dropping it deregisters it) and reconnect right away.
    fn close(&mut self, now: Instant) {
        self.stream = None;
        self.phase = Phase::Disconnected { at: now };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_are_mostly_clean_with_every_kind_present() {
        let mut rng = Rng::new(7);
        let picks: Vec<Ending> = (0..1000).map(|_| Ending::pick(rng.next())).collect();
        let count = |e| picks.iter().filter(|&&p| p == e).count();
        assert!(
            (400..600).contains(&count(Ending::Clean)),
            "{}",
            count(Ending::Clean)
        );
        assert!(count(Ending::MidFrame) > 200 && count(Ending::UnreadReplies) > 100);
    }

    #[test]
    fn session_lengths_stay_in_bounds() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = rng.between(SESSION_MIN, SESSION_MAX);
            assert!(d >= SESSION_MIN && d < SESSION_MAX, "{d:?}");
        }
    }

    #[test]
    fn frames_carry_a_big_endian_length() {
        assert_eq!(frame(ECHO, b"ab"), [0, 0, 0, 3, 1, b'a', b'b']);
    }

    #[test]
    fn every_fourth_request_is_a_ping_and_the_rest_echo_their_data() {
        let ops: Vec<(u8, u8)> = (0..8)
            .map(|n| {
                let (req, reply) = request(n, b"xy");
                (req[4], reply[4])
            })
            .collect();
        let (e, p) = ((ECHO, ECHO_REPLY), (PING, PING_REPLY));
        assert_eq!(ops, [e, e, e, p, e, e, e, p]);
        assert_eq!(request(0, b"xy").1, [0, 0, 0, 3, ECHO_REPLY, b'x', b'y']);
        assert_eq!(
            request(3, b"xy"),
            (vec![0, 0, 0, 1, PING], vec![0, 0, 0, 1, PING_REPLY])
        );
    }

    #[test]
    fn same_seed_gives_the_same_sessions() {
        let (mut a, mut b) = (Rng::new(0x5EED), Rng::new(0x5EED));
        for _ in 0..100 {
            assert_eq!(
                a.between(SESSION_MIN, SESSION_MAX),
                b.between(SESSION_MIN, SESSION_MAX)
            );
        }
    }
}
