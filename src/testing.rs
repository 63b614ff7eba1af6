//! A test kit for services built on closewait (the `testing` feature): what closewait's own
//! tests use, for yours.
//!
//! - [`TestServer`]: your service, served in-process on `127.0.0.1:0` (the OS picks the
//!   port), stopped gracefully when dropped.
//! - [`Client`]: a blocking client of the default codec ([`crate::LengthPrefixed`]) with
//!   timeouts: send, call, read a frame, half-close, reset.
//! - [`respond`] and [`call`]: a service's replies to some input without any socket, for unit
//!   tests of what your requests mean, whatever the codec.
//! - [`own_fds`], [`TestServer::close_wait`] and [`procfs`]: count a process's fds and
//!   CLOSE_WAIT sockets from `/proc` (Linux), to check that peers that leave leave nothing.
//!
//! Enable it for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! closewait = { path = "../closewait", features = ["testing"] }
//! ```
//!
//! Every helper panics with a message saying what it expected and saw, as test code should,
//! and every wait is bounded by [`WAIT`].

/// A process's open fds and its TCP sockets by state, from Linux `/proc`: how a CLOSE_WAIT
/// leak is seen from outside a process (what `lsof` and `ss -tan state close-wait` show).
pub mod procfs {
    pub use crate::procfs::*;
}

/// The fd budget closewait derives from `RLIMIT_NOFILE`, for tools that size a test to it
/// (the load test's scale step).
pub mod limits {
    pub use crate::limits::{derive_budget, Budget, LimitTooLow};
}

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::codec::{Codec, Decoded, LengthPrefixed};
use crate::service::{Context, Reply, Service, ECHO, ECHO_REPLY, PING, PING_REPLY};
use crate::service::{STATS, STATS_REPLY};
use crate::stats::Stats;
use crate::{frame, CloseReason, Config, Handle, Server};

/// Longest any single wait of these helpers may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server running your service on a thread of this process, on `127.0.0.1:<OS-picked
/// port>`. Dropping it shuts the server down gracefully and waits for it.
///
/// ```
/// use closewait::testing::TestServer;
///
/// let server = TestServer::start(|| closewait::service::Reference);
/// let mut client = server.connect();
/// client.ping();
/// server.stop().unwrap();
/// ```
pub struct TestServer {
    addr: SocketAddr,
    handle: Handle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    /// Serve services made by `make_service` with the default [`Config`] on port 0.
    pub fn start<S, F>(make_service: F) -> TestServer
    where
        S: Service + 'static,
        F: Fn() -> S + Send + Sync + 'static,
    {
        TestServer::start_with(Config::default(), make_service)
    }

    /// Serve with `config` (its `listen` replaced by `127.0.0.1:0`), for tests of limits.
    pub fn start_with<S, F>(config: Config, make_service: F) -> TestServer
    where
        S: Service + 'static,
        F: Fn() -> S + Send + Sync + 'static,
    {
        let config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config
        };
        let server = Server::with_service(config, make_service)
            .unwrap_or_else(|e| panic!("cannot start the server under test: {e}"));
        TestServer::run(server)
    }

    /// Run a server already bound (say, with its own counters
    /// [registered](Server::register)) on a thread of its own.
    pub fn run<S: Service + 'static>(server: Server<S>) -> TestServer {
        let addr = server.local_addr();
        let handle = server.handle();
        let thread = thread::Builder::new()
            .name("closewait-test-server".into())
            .spawn(move || server.run())
            .expect("spawn the server thread");
        TestServer {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its handle: counters ([`Handle::stats`]) and shutdown.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A new client connection (default codec).
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// This process's sockets in CLOSE_WAIT on the server's port: connections whose peer
    /// closed and that the server did not close (a client's own sockets are not counted).
    pub fn close_wait(&self) -> usize {
        procfs::tcp_rows(std::process::id())
            .expect("read this process's TCP sockets from /proc")
            .iter()
            .filter(|row| row.state == procfs::TCP_CLOSE_WAIT && row.local_port == self.addr.port())
            .count()
    }

    /// Shut down gracefully and wait (at most [`WAIT`]) for the server to return.
    pub fn stop(mut self) -> io::Result<()> {
        self.join()
    }

    fn join(&mut self) -> io::Result<()> {
        self.handle.shutdown();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        assert!(
            wait_until(WAIT, || thread.is_finished()),
            "the server did not stop within {WAIT:?} of shutdown"
        );
        thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the server thread panicked")))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let outcome = self.join();
            if !thread::panicking() {
                outcome.expect("the server under test stopped on an error");
            }
        }
    }
}

/// Open fds of this process now (`/proc/self/fd`).
pub fn own_fds() -> usize {
    procfs::open_fds(std::process::id()).expect("count this process's fds in /proc")
}

/// Check `cond` every few ms until it holds or `limit` passes; whether it held. For
/// conditions another thread or process makes true: no sleep stands in for synchronisation.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// What a connection would send back for `input` (any number of requests, in any codec),
/// without a socket: every whole request is decoded by the service's codec and answered in
/// order; an invalid one gets the codec's error reply and ends the input, as on a
/// connection. Bytes of an unfinished request at the end are ignored. The input is one
/// connection: one session, opened first and closed (as [`CloseReason::PeerEof`]) after.
pub fn respond<S: Service>(service: &mut S, input: &[u8]) -> Vec<u8> {
    let stats = Stats::default();
    let cx = Context {
        peer: SocketAddr::from(([127, 0, 0, 1], 9)),
        stats: &stats,
    };
    let mut session = service.open(cx.peer);
    let mut codec = S::Codec::default();
    let mut out = Vec::new();
    let mut reply = Reply::new(&mut out);
    let mut rest = input;
    loop {
        match codec.decode(rest, usize::MAX) {
            Decoded::Request { request, used } => {
                service.call(request, &mut session, &mut reply, &cx);
                rest = &rest[used..];
                if reply.wants_close() {
                    break;
                }
            }
            Decoded::Incomplete { .. } => break,
            Decoded::Invalid(e) => {
                drop(reply);
                S::Codec::encode_error(&mut out, &e.to_string());
                break;
            }
        }
    }
    service.close(session, CloseReason::PeerEof);
    out
}

/// A default-codec service's replies to one request body (op byte, then data), as
/// `(op, data)` pairs: a unit test of `call` without a socket.
pub fn call<S: Service<Codec = LengthPrefixed>>(
    service: &mut S,
    body: &[u8],
) -> Vec<(u8, Vec<u8>)> {
    replies(&respond(service, &frame(body[0], &body[1..])))
}

/// One frame of the default codec: `op` + `data` behind a `u32` big-endian length.
pub fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame::HEADER_LEN + 1 + data.len());
    frame::encode(&mut out, op, data);
    out
}

/// Split default-codec output into `(op, data)` pairs; panics on a partial or invalid frame.
pub fn replies(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        let Decoded::Request { request, used } = frame::decode(out, usize::MAX) else {
            panic!("not whole frames: {out:?}");
        };
        replies.push((request[0], request[1..].to_vec()));
        out = &out[used..];
    }
    replies
}

/// A blocking client of the default codec, with [`WAIT`] as its read and write timeouts.
pub struct Client {
    /// The socket, for whatever the helpers do not cover.
    pub stream: TcpStream,
}

impl Client {
    /// Connect to `addr`.
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, WAIT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        stream.set_write_timeout(Some(WAIT)).expect("write timeout");
        Client { stream }
    }

    /// Send one frame with body `op` + `data`.
    pub fn send(&mut self, op: u8, data: &[u8]) {
        self.stream.write_all(&frame(op, data)).expect("send");
    }

    /// Send bytes as they are (partial or invalid frames, several at once).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send raw");
    }

    /// Read one frame as `(op, data)`: `None` on EOF before its first byte.
    pub fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        self.try_recv().expect("recv")
    }

    /// [`recv`](Client::recv), with the error instead of a panic (a reset, a timeout).
    pub fn try_recv(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut header = [0u8; frame::HEADER_LEN];
        match self.stream.read(&mut header[..1])? {
            0 => return Ok(None),
            _ => self.stream.read_exact(&mut header[1..])?,
        }
        let len = u32::from_be_bytes(header) as usize;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame of length 0",
            ));
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        let data = body.split_off(1);
        Ok(Some((body[0], data)))
    }

    /// Send one request and read one reply.
    pub fn call(&mut self, op: u8, data: &[u8]) -> (u8, Vec<u8>) {
        self.send(op, data);
        self.recv()
            .unwrap_or_else(|| panic!("EOF instead of a reply to op 0x{op:02x}"))
    }

    /// Whether the server closed its side (a read returns 0 or fails within [`WAIT`]).
    pub fn at_eof(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }

    /// PING, expecting the reference PONG.
    pub fn ping(&mut self) {
        assert_eq!(self.call(PING, b""), (PING_REPLY, vec![]), "PING");
    }

    /// ECHO `data`, expecting it back.
    pub fn echo(&mut self, data: &[u8]) {
        assert_eq!(self.call(ECHO, data), (ECHO_REPLY, data.to_vec()), "ECHO");
    }

    /// The server's STATS counters by name.
    pub fn stats(&mut self) -> HashMap<String, u64> {
        let (op, data) = self.call(STATS, b"");
        assert_eq!(op, STATS_REPLY, "STATS reply op");
        String::from_utf8(data)
            .expect("utf-8 stats")
            .lines()
            .map(|l| {
                let (name, value) = l.split_once(' ').expect("`name value` lines");
                (name.to_string(), value.parse().expect("integer value"))
            })
            .collect()
    }

    /// Shut down writing: the server sees FIN and must still send every reply.
    pub fn half_close(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
    }

    /// Close with RST instead of FIN (`SO_LINGER` 0).
    pub fn reset(self) {
        socket2::SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        drop(self);
    }
}
