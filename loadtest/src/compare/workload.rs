//! The downstream peers of the incident: clients that hold a persistent connection, send
//! requests, and now and then "hit an exception" and close it actively, then reconnect.
//!
//! Each client is a thread with a blocking socket and short timeouts, so a server that stops
//! answering (the leaky one, once out of fds) shows up as failed connects and requests, never
//! as a hung load test. Every loop checks the shared deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Connect and per-request timeout: long enough for a healthy server under load, short
/// enough that a dead one is noticed within a sample or two.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between two requests of one client (a downstream server with steady traffic).
pub const REQUEST_PACE: Duration = Duration::from_millis(5);
/// A session (one connection's life) lasts between these before the "exception".
pub const SESSION_MIN: Duration = Duration::from_millis(100);
/// See [`SESSION_MIN`].
pub const SESSION_MAX: Duration = Duration::from_millis(700);
/// Pause before reconnecting after a failed connect.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Payload of each ECHO request.
pub const PAYLOAD: usize = 64;

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

/// What the clients of one server saw, updated live.
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
    let mut out = Vec::with_capacity(5 + data.len());
    out.extend_from_slice(&(1 + data.len() as u32).to_be_bytes());
    out.push(op);
    out.extend_from_slice(data);
    out
}

/// Start `clients` client threads against `addr`, running until `stop` or `deadline`.
pub fn start(
    addr: SocketAddr,
    clients: usize,
    seed: u64,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Vec<thread::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (tally, stop) = (tally.clone(), stop.clone());
            let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x1234_5678_9ABC));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    session(addr, &mut rng, &tally, &stop, deadline);
                }
            })
        })
        .collect()
}

/// One connection's life: requests until the session's time is up, then an abrupt end.
fn session(addr: SocketAddr, rng: &mut Rng, tally: &Tally, stop: &AtomicBool, deadline: Instant) {
    let mut stream = match connect(addr) {
        Ok(stream) => stream,
        Err(_) => {
            tally.connect_failed.fetch_add(1, Ordering::Relaxed);
            thread::sleep(RECONNECT_PAUSE);
            return;
        }
    };
    let ends = (Instant::now() + rng.between(SESSION_MIN, SESSION_MAX)).min(deadline);
    let mut payload = [0u8; PAYLOAD];
    while Instant::now() < ends && !stop.load(Ordering::Relaxed) {
        payload[..8].copy_from_slice(&rng.next().to_be_bytes());
        let started = Instant::now();
        match round_trip(&mut stream, &payload) {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally.record(started.elapsed());
            }
            Err(_) => {
                // A server that stopped answering: count it and start over on a new connection.
                tally.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        thread::sleep(REQUEST_PACE);
    }
    if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
        return; // the run is over, not an "exception"
    }
    // The exception: the peer goes away without warning, in one of three ways.
    match Ending::pick(rng.next()) {
        Ending::Clean => {}
        Ending::MidFrame => {
            let _ = stream.write_all(&frame(0x01, &payload)[..PAYLOAD / 2]);
        }
        Ending::UnreadReplies => {
            let batch: Vec<u8> = (0..8).flat_map(|_| frame(0x01, &payload)).collect();
            let _ = stream.write_all(&batch);
            // Let the replies arrive unread, so close() turns into an RST.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
            let _ = stream.peek(&mut [0u8; 1]);
        }
    }
    tally.sessions.fetch_add(1, Ordering::Relaxed);
    drop(stream);
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One ECHO, checked byte for byte.
fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(&frame(0x01, payload))?;
    let mut reply = [0u8; 5 + PAYLOAD];
    stream.read_exact(&mut reply)?;
    let expected_header = (1 + PAYLOAD as u32).to_be_bytes();
    if reply[..4] != expected_header || reply[4] != 0x81 || reply[5..] != *payload {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "wrong reply"));
    }
    Ok(())
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
        assert_eq!(frame(0x01, b"ab"), [0, 0, 0, 3, 1, b'a', b'b']);
    }
}
