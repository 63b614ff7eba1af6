//! One connection: a small state machine over a non-blocking socket.
//!
//! ```text
//!   Open ─read 0 (peer FIN)──▶ Draining(PeerEof) ───────────flushed──────────────────▶ closed
//!    │ ─invalid frame────────▶ Draining(Protocol)     ─┐
//!    │ ─frame timeout────────▶ Draining(FrameTimeout)  ├─flushed─▶ Lingering ─peer FIN──▶ closed
//!    │ ─server shutdown──────▶ Draining(Shutdown)      │  shutdown   discard input; or a
//!    │ ─memory budget────────▶ Draining(Memory)       ─┘  (Write)    byte bound, the timeout
//!    │ ─reset / I/O error; write stall (RST); memory budget with unsent replies (RST)─▶ closed
//!    └─read 0, leaky variant─▶ Leaked (never leaves: CLOSE_WAIT)
//! ```
//!
//! Why linger: closing a socket whose receive queue still holds unread bytes makes Linux send
//! RST instead of FIN (RFC 2525 2.17; counted as `TcpExtTCPAbortOnData`): our kernel drops
//! the replies it has not sent yet, and the peer's kernel, on the RST, drops the replies it
//! received but the peer has not read yet — replies we had already written. A close that may leave input unread therefore shuts down writing first
//! (the FIN follows the replies), then reads and discards until the peer closes too. A peer
//! FIN needs no lingering: the read that returned 0 proved nothing is left unread.
//!
//! A connection owns only what it cannot give back: its socket, the unfinished tail of a
//! frame, and replies the peer has not taken yet. Reads go into the loop's scratch buffer and
//! replies are written from a buffer lent by the loop, so an idle connection holds no buffer
//! at all. Handlers return a [`Step`]; a connection never removes itself — the loop does that,
//! once, through its one close path.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Token;

use crate::codec::{Codec, Decoded};
use crate::deferred::Deferrals;
use crate::leak;
use crate::leak::EofPolicy;
use crate::service::{Context, Reply, Service};
use crate::stats::{Counter, Stats};
use crate::throttle::Throttle;

/// Size of the loop's read buffer: one read takes up to this much from a socket.
pub const READ_CHUNK: usize = 64 * 1024;
/// Reads per readiness event before the loop moves on to other connections; the connection
/// is revisited next turn, so one fast peer cannot starve the rest.
pub const READS_PER_TURN: usize = 16;
/// Reads a graceful shutdown spends answering what a peer already sent (4 MiB): enough for
/// any honest backlog, and bounded so a peer that keeps sending cannot hold shutdown open.
pub const SHUTDOWN_READS: usize = 64;
/// Bytes a lingering close discards before giving up on the peer's FIN and closing anyway
/// (4 MiB): more than any honest peer has in flight, less than a flood can cost us.
pub const LINGER_MAX_DISCARD: u32 = 4 << 20;

/// Why a connection ended. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent FIN and every reply was flushed.
    PeerEof,
    /// The service asked to close after its replies (a QUIT command, [`Reply::close`]).
    Service,
    /// The peer reset the connection.
    Reset,
    /// Another I/O error (timeouts from the kernel included), with its errno (0 if none).
    Error(i32),
    /// The peer sent an invalid frame; it got an ERROR reply first.
    Protocol,
    /// Nothing received or sent for the idle timeout.
    Idle,
    /// Replies pending but the peer took none for the idle timeout.
    WriteStall,
    /// The server is shutting down.
    Shutdown,
    /// A frame was begun and not finished within the frame timeout; it got an ERROR reply.
    FrameTimeout,
    /// The connection held the most memory when all connections together passed the
    /// memory budget (`--max-buffered`).
    Memory,
}

impl CloseReason {
    /// The counter this reason increments.
    pub fn counter(self) -> Counter {
        match self {
            CloseReason::PeerEof => Counter::ClosedEof,
            CloseReason::Service => Counter::ClosedService,
            CloseReason::Reset => Counter::ClosedReset,
            CloseReason::Error(_) => Counter::ClosedError,
            CloseReason::Protocol => Counter::ClosedProtocol,
            CloseReason::Idle => Counter::ClosedIdle,
            CloseReason::WriteStall => Counter::ClosedWriteStall,
            CloseReason::Shutdown => Counter::ClosedShutdown,
            CloseReason::FrameTimeout => Counter::ClosedFrameTimeout,
            CloseReason::Memory => Counter::ClosedMemory,
        }
    }

    /// Whether operators should hear about it (warn) rather than see it at debug level.
    pub fn is_abnormal(self) -> bool {
        !matches!(
            self,
            CloseReason::PeerEof | CloseReason::Service | CloseReason::Shutdown
        )
    }

    /// Classify an I/O error from a read or write.
    pub(crate) fn from_io(e: &io::Error) -> CloseReason {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => CloseReason::Reset,
            _ => CloseReason::Error(e.raw_os_error().unwrap_or(0)),
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerEof => f.write_str("peer closed (FIN), replies flushed"),
            CloseReason::Service => f.write_str("the service closed it, replies flushed"),
            CloseReason::Reset => f.write_str("connection reset by peer"),
            CloseReason::Error(0) => f.write_str("I/O error"),
            CloseReason::Error(errno) => {
                write!(f, "I/O error: {}", io::Error::from_raw_os_error(*errno))
            }
            CloseReason::Protocol => f.write_str("invalid frame (ERROR sent)"),
            CloseReason::Idle => f.write_str("idle timeout"),
            CloseReason::WriteStall => {
                f.write_str("write stall: peer took no output for the idle timeout")
            }
            CloseReason::Shutdown => f.write_str("server shutdown"),
            CloseReason::FrameTimeout => f.write_str("frame timeout (ERROR sent)"),
            CloseReason::Memory => f.write_str("evicted for the memory budget"),
        }
    }
}

/// What a readiness event reported, as far as a connection cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Input (or the peer's FIN) may be waiting.
    pub readable: bool,
    /// The peer closed its side (`EPOLLRDHUP`/`EPOLLHUP`): the FIN is already there and this
    /// event was its one edge, so reading must go on until a read returns 0.
    pub read_closed: bool,
    /// Output may be written.
    pub writable: bool,
    /// An error is pending on the socket (RST, a kernel timeout).
    pub error: bool,
}

impl Readiness {
    /// A call without an event (after [`Step::Again`]): nothing is known, so read as if
    /// the peer may have closed — until `WouldBlock` or 0.
    pub const RETRY: Readiness = Readiness {
        readable: true,
        read_closed: true,
        writable: false,
        error: false,
    };

    fn until(self) -> Until {
        if self.read_closed || self.error {
            Until::Blocked
        } else {
            Until::ShortRead
        }
    }
}

/// Where a burst of reads may stop, besides the peer's FIN and the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Until {
    /// At `WouldBlock`.
    Blocked,
    /// At the first read that does not fill the buffer (or `WouldBlock`).
    ShortRead,
}

/// What the loop must do with a connection after a handler ran.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep it; more events will come.
    Continue,
    /// Keep it, and call [`Connection::on_event`] again next turn without waiting for an
    /// event: it stopped reading with input possibly left in the socket (read budget spent).
    Again,
    /// Close it now, for this reason.
    Close(CloseReason),
    /// Every reply is out and writing is shut down: keep it until the peer's FIN or the
    /// linger timeout, and call [`Connection::on_event`] again next turn (input may already
    /// be waiting, and its readiness edge was spent while draining).
    Linger,
}

/// The reasons a connection drains instead of closing at once. A separate small type keeps
/// [`State`] (and so every connection) two bytes, and makes "drain after a reset" unwritable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Graceful {
    PeerEof,
    Service,
    Protocol,
    FrameTimeout,
    Shutdown,
    Memory,
}

impl Graceful {
    fn reason(self) -> CloseReason {
        match self {
            Graceful::PeerEof => CloseReason::PeerEof,
            Graceful::Service => CloseReason::Service,
            Graceful::Protocol => CloseReason::Protocol,
            Graceful::FrameTimeout => CloseReason::FrameTimeout,
            Graceful::Shutdown => CloseReason::Shutdown,
            Graceful::Memory => CloseReason::Memory,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading requests, writing replies.
    Open,
    /// No more reading: flush the replies, then close (or linger) for this reason.
    Draining(Graceful),
    /// Replies flushed and writing shut down; input is read and discarded until the peer's
    /// FIN, so that closing sends FIN rather than RST.
    Lingering(Graceful),
    /// The leaky variant saw the peer's FIN and ignored it.
    Leaked,
}

/// Buffers and settings the loop lends to every handler call.
pub struct Io<'a, S: Service> {
    /// The loop's read buffer, [`READ_CHUNK`] bytes.
    pub input: &'a mut [u8],
    /// An empty output buffer (with capacity) that a connection may borrow while it writes.
    pub output: &'a mut Vec<u8>,
    /// The protocol.
    pub service: &'a mut S,
    /// Its wire format (one per worker: a connection holds no codec state).
    pub codec: &'a mut S::Codec,
    /// Counters.
    pub stats: &'a Stats,
    /// Rate limit for warnings a peer can trigger.
    pub warn: &'a mut Throttle,
    /// Largest legal frame body.
    pub max_frame: usize,
    /// Pending output above which we stop reading the peer.
    pub max_pending_output: usize,
    /// The reference behaviour or the leak.
    pub eof_policy: EofPolicy,
    /// Whether graceful closes linger (`--linger-timeout` is not 0).
    pub linger: bool,
    /// When a read returned 0 (the peer's FIN), by token, until the loop closes the socket:
    /// the FIN-to-close clock, kept by the loop so an idle connection stays small.
    pub fins: &'a mut HashMap<Token, Instant>,
    /// Replies held behind deferred requests, by token (kept by the loop, like `fins`).
    pub deferrals: &'a mut Deferrals,
    /// The token of the connection being driven.
    pub token: Token,
}

/// A client connection and its state, and the service's session for it (`T`; `()`, zero
/// bytes, for a service that keeps none).
#[derive(Debug)]
pub struct Connection<T = ()> {
    stream: TcpStream,
    peer: SocketAddr,
    state: State,
    /// Bytes of an unfinished frame; empty (no allocation) between frames. When `stashed`:
    /// the unparsed rest of a read, held while the connection's deferred requests are at
    /// their bound.
    partial: Vec<u8>,
    /// Replies not yet taken by the socket; `sent` bytes of it are already written.
    pending: Vec<u8>,
    sent: usize,
    /// Bytes thrown away while lingering, against [`LINGER_MAX_DISCARD`].
    discarded: u32,
    /// We stopped reading because `pending` is over the limit. Readiness is remembered here,
    /// because under edge-triggered polling the socket will not signal it again.
    read_paused: bool,
    /// Bytes moved in either direction since the loop last asked (idle timer input).
    progressed: bool,
    /// A new frame began and is unfinished since the loop last asked (frame timer input).
    frame_began: bool,
    /// `partial` may hold whole requests, kept when `Service::MAX_DEFERRED` was reached in
    /// the middle of a read: they are answered before the socket is read again.
    stashed: bool,
    /// The service's state for this connection ([`Service::Session`]).
    session: T,
}

impl<T> Connection<T> {
    /// Wrap an accepted, registered socket, with the session the service made for it.
    pub fn new(stream: TcpStream, peer: SocketAddr, session: T) -> Connection<T> {
        Connection {
            stream,
            peer,
            state: State::Open,
            partial: Vec::new(),
            pending: Vec::new(),
            sent: 0,
            discarded: 0,
            read_paused: false,
            progressed: false,
            frame_began: false,
            stashed: false,
            session,
        }
    }

    /// Give the session back (the connection is closing: its socket closes with it).
    pub fn into_session(self) -> T {
        self.session
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Whether replies are waiting for the peer to read them.
    pub fn has_pending_output(&self) -> bool {
        self.pending.len() > self.sent
    }

    /// Whether bytes moved since the last call (and forget it).
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    /// Whether the connection is read-paused for output backpressure.
    pub fn is_read_paused(&self) -> bool {
        self.read_paused
    }

    /// Whether a new frame began since the last call and is still unfinished (and forget it).
    pub fn take_frame_began(&mut self) -> bool {
        std::mem::take(&mut self.frame_began)
    }

    /// Whether part of a frame is buffered, waiting for the rest.
    pub fn in_frame(&self) -> bool {
        // Stashed requests are whole: their wait is for the service, not for the peer.
        !self.partial.is_empty() && !self.stashed
    }

    /// Bytes of memory this connection holds: its partial frame and its pending replies.
    pub fn buffered(&self) -> usize {
        self.partial.capacity() + self.pending.capacity()
    }

    /// The reason of a close already under way that only waits for the peer (lingering):
    /// whatever ends it now, this is the reason it is counted under.
    pub fn lingering(&self) -> Option<CloseReason> {
        match self.state {
            State::Lingering(why) => Some(why.reason()),
            _ => None,
        }
    }

    /// Handle a readiness event (or a retry after [`Step::Again`]).
    pub fn on_event<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        ready: Readiness,
    ) -> Step {
        let Readiness {
            readable,
            writable,
            error,
            ..
        } = ready;
        match self.state {
            State::Leaked => return Step::Continue,
            State::Lingering(why) => {
                return if readable || error {
                    self.discard(io, why)
                } else {
                    Step::Continue
                };
            }
            State::Open | State::Draining(_) => {}
        }
        if error {
            // RST or a kernel timeout (keepalive, TCP_USER_TIMEOUT): nothing more can be
            // delivered, so close without reading or writing.
            if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
                return Step::Close(CloseReason::from_io(&e));
            }
        }
        if writable && self.has_pending_output() {
            if let Some(step) = self.flush(io) {
                return step;
            }
        }
        if readable || self.read_paused {
            // A resumed paused peer was not reported by this event: read it to the end.
            let until = if readable && !self.read_paused {
                ready.until()
            } else {
                Until::Blocked
            };
            return self.on_readable(io, until);
        }
        Step::Continue
    }

    /// Begin a graceful shutdown: answer what can be read now, then flush and close.
    pub fn begin_shutdown<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>) -> Step {
        match self.state {
            State::Leaked => return Step::Close(CloseReason::Shutdown),
            State::Draining(_) => return self.flush(io).unwrap_or(Step::Continue),
            State::Lingering(_) => return Step::Continue,
            State::Open => {}
        }
        // Requests already in the socket buffer were sent before we stopped: answer them.
        // (A read-paused peer's unread requests stay unanswered: reading them would grow
        // memory past the bound for a peer that is not reading.)
        let mut step = Step::Continue;
        if !self.read_paused {
            step = self.read_until_blocked(io, SHUTDOWN_READS, Until::Blocked);
        }
        if let Step::Close(_) = step {
            return step;
        }
        if self.state == State::Open {
            // A frame we will never read the rest of: no reason to hold it while draining.
            self.partial = Vec::new();
            self.state = State::Draining(Graceful::Shutdown);
        }
        self.flush(io).unwrap_or(Step::Continue)
    }

    /// The frame timeout passed with a frame still unfinished: tell the peer, then close
    /// (lingering, since the rest of the frame may still be on its way).
    pub fn on_frame_timeout<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        timeout: std::time::Duration,
    ) -> Step {
        if self.state != State::Open || self.partial.is_empty() {
            return Step::Continue;
        }
        // Whole seconds as the CLI sets them ("30 s"); a finer `Config` value as it is
        // ("0.4 s"), never rounded down to a misleading "0 s".
        let message = format!("frame not completed in {} s", timeout.as_secs_f64());
        if io.warn.allow() {
            log::warn!(
                "{}: {message} ({} bytes of it received); closing{}",
                self.peer,
                self.partial.len(),
                io.warn.suppressed_note()
            );
        }
        self.partial = Vec::new();
        self.close_with_error(io, Graceful::FrameTimeout, &message)
    }

    /// All connections together passed the memory budget and this one holds the most: give
    /// its memory back now. Replies the peer has not taken are dropped with an abortive close
    /// (a peer that does not read is why they piled up); a peer that only sent a partial frame
    /// gets an ERROR frame saying why, then a lingering close.
    pub fn evict<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>, budget: usize) -> Step {
        let behind = io.deferrals.held(io.token);
        let held = self.buffered() + behind;
        if io.warn.allow() {
            log::warn!(
                "{}: closing: holds {held} bytes (partial frame {}, unsent replies {}, replies \
                 behind a deferred request {behind}) and all connections together passed the \
                 memory budget of {budget} bytes{}",
                self.peer,
                self.partial.capacity(),
                self.pending.len() - self.sent,
                io.warn.suppressed_note()
            );
        }
        self.partial = Vec::new();
        if behind > 0 {
            // Replies held for order are unsent replies too: drop them with the rest.
            io.deferrals.forget(io.token);
        }
        if self.has_pending_output() || behind > 0 {
            self.pending = Vec::new();
            self.sent = 0;
            // SO_LINGER 0: close sends RST and frees the kernel's copy of the output too.
            let _ =
                socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
            return Step::Close(CloseReason::Memory);
        }
        let message = format!("memory budget exceeded: this connection held {held} bytes");
        self.close_with_error(io, Graceful::Memory, &message)
    }

    /// Queue an ERROR frame, stop reading, and close once it is flushed.
    fn close_with_error<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        why: Graceful,
        message: &str,
    ) -> Step {
        self.lend_output(io);
        S::Codec::encode_error(self.output_in_order(io), message);
        self.state = State::Draining(why);
        self.flush(io).unwrap_or(Step::Continue)
    }

    fn on_readable<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>, until: Until) -> Step {
        if self.state != State::Open {
            // Draining reads nothing more, but a reset must still be noticed.
            return match self.stream.take_error() {
                Ok(Some(e)) | Err(e) => Step::Close(CloseReason::from_io(&e)),
                Ok(None) => Step::Continue,
            };
        }
        let step = self.read_until_blocked(io, READS_PER_TURN, until);
        if let Step::Close(_) = step {
            return step;
        }
        match self.flush(io) {
            Some(close) => close,
            None => step,
        }
    }

    /// Read and answer until the socket is drained (`WouldBlock`), the peer's FIN, the
    /// output bound, or `budget` reads. Edge-triggered readiness makes draining mandatory:
    /// stop early without remembering it and no event comes again — data and FIN left in the
    /// socket, the connection stuck in CLOSE_WAIT.
    ///
    /// With [`Until::ShortRead`] a read that did not fill the buffer ends the call too: the
    /// socket had no more, and anything that arrives later raises a new edge, so the read
    /// that would only return `WouldBlock` is saved (one syscall of three per request in
    /// ping-pong). Only an event that did not report the peer's FIN may do that: when it did,
    /// the FIN's edge is spent, and only reading to the 0 notices it.
    fn read_until_blocked<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        budget: usize,
        until: Until,
    ) -> Step {
        self.read_paused = false;
        self.lend_output(io);
        if self.stashed {
            if let Some(step) = self.resume_stashed(io) {
                return step;
            }
        }
        let mut step = Step::Again;
        for _ in 0..budget {
            if io
                .deferrals
                .is_full(io.token, S::MAX_DEFERRED, io.max_pending_output)
            {
                // Too many requests waiting for deferred replies: read on when one completes.
                self.read_paused = true;
                step = Step::Continue;
                break;
            }
            if self.pending.len() - self.sent >= io.max_pending_output {
                // Try to make room before deciding to stop reading this peer.
                if let Some(close) = self.write_pending() {
                    step = close;
                    break;
                }
                if self.pending.len() - self.sent >= io.max_pending_output {
                    self.read_paused = true;
                    step = Step::Continue;
                    break;
                }
            }
            match self.stream.read(io.input) {
                Ok(0) => {
                    io.fins.insert(io.token, Instant::now());
                    step = leak::on_read_eof(io.eof_policy, self);
                    if self.state == State::Leaked {
                        io.stats.add(Counter::Leaked, 1);
                    }
                    break;
                }
                Ok(n) => {
                    self.progressed = true;
                    match self.handle_input(n, io) {
                        Ok(()) if n < io.input.len() && until == Until::ShortRead => {
                            step = Step::Continue;
                            break;
                        }
                        Ok(()) => {}
                        Err(stop) => {
                            step = self.on_stop(stop, io);
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    step = Step::Continue;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    step = Step::Close(CloseReason::from_io(&e));
                    break;
                }
            }
        }
        step
    }

    /// Answer the requests stashed when the deferred bound was reached, if the bound allows
    /// now. `Some` when reading must not go on this turn.
    #[cold]
    #[inline(never)]
    fn resume_stashed<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>) -> Option<Step> {
        if io
            .deferrals
            .is_full(io.token, S::MAX_DEFERRED, io.max_pending_output)
        {
            self.read_paused = true;
            return Some(Step::Continue);
        }
        self.stashed = false;
        match self.handle_input(0, io) {
            Ok(()) => {
                // What is left is one unfinished request: its frame clock starts now.
                self.frame_began = !self.partial.is_empty();
                None
            }
            Err(stop) => Some(self.on_stop(stop, io)),
        }
    }

    /// The service or the codec stopped the reading of a batch.
    fn on_stop<S: Service<Session = T>>(&mut self, stop: Stop, io: &mut Io<'_, S>) -> Step {
        match stop {
            Stop::Invalid(message) => self.on_invalid_request(message, io),
            Stop::Close => {
                self.partial = Vec::new();
                self.stashed = false;
                self.state = State::Draining(Graceful::Service);
            }
            Stop::Deferred => {
                // The unparsed rest is in `partial`; a completion resumes (see `flush`).
                self.stashed = true;
                self.read_paused = true;
            }
        }
        Step::Continue
    }

    /// Called by [`leak::on_read_eof`] for the reference behaviour: the peer will send
    /// nothing more, so stop reading; replies already queued are still delivered.
    pub fn drain_then_close(&mut self) -> Step {
        if !self.partial.is_empty() {
            log::debug!(
                "{}: closed mid-frame, {} bytes of an unfinished frame dropped",
                self.peer,
                self.partial.len()
            );
            self.partial = Vec::new();
        }
        self.state = State::Draining(Graceful::PeerEof);
        Step::Continue
    }

    /// Called by [`leak::on_read_eof`] for the leaky variant: do nothing, forever.
    pub fn ignore_eof(&mut self) -> Step {
        self.state = State::Leaked;
        Step::Continue
    }

    /// Answer every whole request in the first `n` bytes of the input buffer; keep the
    /// unfinished tail in `partial`.
    fn handle_input<S: Service<Session = T>>(
        &mut self,
        n: usize,
        io: &mut Io<'_, S>,
    ) -> Result<(), Stop> {
        let Io {
            input,
            service,
            codec,
            stats,
            warn,
            max_frame,
            deferrals,
            token,
            ..
        } = io;
        let max = *max_frame;
        // The loop's own bound, whatever the codec: a connection never holds more than this
        // of one request (a codec that forgets to refuse a large one is refused here).
        let limit = |max: usize| max.saturating_add(S::Codec::MAX_OVERHEAD);
        let mut data = &input[..n];
        let cx = Context {
            peer: self.peer,
            stats,
        };
        let mut reply =
            Reply::for_connection(&mut self.pending, deferrals, *token, S::MAX_DEFERRED);
        let mut requests = 0;
        // `n == 0`: no new bytes, answer what was stashed (see `resume_stashed`).
        let mut resuming = n == 0;

        let outcome = 'input: {
            // First finish the request left over from an earlier read. When the codec knows
            // how long it is, take only its bytes, so the common case below parses straight
            // from the read buffer without copying.
            while !self.partial.is_empty() && (!data.is_empty() || std::mem::take(&mut resuming)) {
                let held = self.partial.len();
                let need = match codec.decode(&self.partial, max) {
                    Decoded::Incomplete { need } => need.filter(|&need| need > held),
                    // `partial` only ever holds an unfinished request; a codec that now sees
                    // more gets everything and the loop below sorts it out.
                    _ => None,
                };
                let take = need.map_or(data.len(), |need| (need - held).min(data.len()));
                grow_towards(&mut self.partial, take, need.unwrap_or(held + take));
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                let mut at = 0;
                loop {
                    match codec.decode(&self.partial[at..], max) {
                        Decoded::Request { request, used } => {
                            if used > limit(max) {
                                break 'input Err(too_large(used, max));
                            }
                            service.call(request, &mut self.session, &mut reply, &cx);
                            requests += 1;
                            at += used;
                            if reply.interrupted() {
                                break;
                            }
                        }
                        // Not reserved up front from an announced length: a peer could then
                        // make us allocate max_frame per connection by sending four bytes.
                        Decoded::Incomplete { .. } => break,
                        Decoded::Invalid(e) => break 'input Err(Stop::Invalid(e.to_string())),
                    }
                }
                if reply.interrupted() {
                    if reply.wants_close() {
                        break 'input Err(Stop::Close);
                    }
                    self.partial.drain(..at);
                    self.partial.extend_from_slice(data);
                    break 'input Err(Stop::Deferred);
                }
                if at == self.partial.len() {
                    self.partial = Vec::new();
                } else if at > 0 {
                    // A new request began behind the finished ones.
                    self.partial.drain(..at);
                    self.frame_began = true;
                }
                if self.partial.len() > limit(max) {
                    break 'input Err(too_large(self.partial.len(), max));
                }
            }
            loop {
                match codec.decode(data, max) {
                    // No size check here: a request parsed in place from the read buffer
                    // holds no memory of the connection's (the codec was told `max`).
                    Decoded::Request { request, used } => {
                        service.call(request, &mut self.session, &mut reply, &cx);
                        requests += 1;
                        data = &data[used..];
                        if reply.interrupted() {
                            if reply.wants_close() {
                                break 'input Err(Stop::Close);
                            }
                            // Whole requests, maybe an unfinished one: at most one read.
                            self.partial.extend_from_slice(data);
                            break 'input Err(Stop::Deferred);
                        }
                    }
                    Decoded::Incomplete { .. } => {
                        if !data.is_empty() {
                            if data.len() > limit(max) {
                                break 'input Err(too_large(data.len(), max));
                            }
                            if self.partial.is_empty() {
                                self.frame_began = true;
                            }
                            self.partial.extend_from_slice(data);
                        }
                        break 'input Ok(());
                    }
                    Decoded::Invalid(e) => break 'input Err(Stop::Invalid(e.to_string())),
                }
            }
        };
        reply.hold_rest();
        if let Some((count, first)) = reply.take_errors() {
            if warn.allow() {
                log::warn!(
                    "{}: bad request: {first} ({count} in this read){}",
                    self.peer,
                    warn.suppressed_note()
                );
            }
        }
        stats.add(Counter::Requests, requests);
        outcome
    }

    /// The stream cannot be resynchronised after an invalid request: tell the peer why, stop
    /// reading, and close once the error reply is flushed.
    fn on_invalid_request<S: Service<Session = T>>(&mut self, message: String, io: &mut Io<'_, S>) {
        if io.warn.allow() {
            log::warn!(
                "{}: {message}; closing{}",
                self.peer,
                io.warn.suppressed_note()
            );
        }
        S::Codec::encode_error(self.output_in_order(io), &message);
        io.stats.add(Counter::Requests, 1);
        self.partial = Vec::new();
        self.stashed = false;
        self.state = State::Draining(Graceful::Protocol);
    }

    /// Replies completed on another thread are now in order (`replies`, possibly empty: a
    /// completion behind a waiting one releases nothing but may end a read pause).
    pub fn on_deferred<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        replies: &[u8],
    ) -> Step {
        if matches!(self.state, State::Leaked | State::Lingering(_)) {
            return Step::Continue;
        }
        if !replies.is_empty() {
            self.lend_output(io);
            self.pending.extend_from_slice(replies);
        }
        self.flush(io).unwrap_or(Step::Continue)
    }

    /// Where a reply of the loop's own goes: behind waiting deferred replies, if any.
    fn output_in_order<'b, S: Service<Session = T>>(
        &'b mut self,
        io: &'b mut Io<'_, S>,
    ) -> &'b mut Vec<u8> {
        if io.deferrals.is_waiting(io.token) {
            io.deferrals.tail(io.token)
        } else {
            &mut self.pending
        }
    }

    /// Write what the socket takes; close if draining and done. `None` means keep going.
    fn flush<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>) -> Option<Step> {
        if let Some(close) = self.write_pending() {
            return Some(close);
        }
        if self.has_pending_output() {
            return None;
        }
        self.return_output(io);
        match self.state {
            // A deferred reply still to come: its completion flushes again (or the drain
            // or idle timeout ends the wait).
            State::Draining(_) if io.deferrals.is_waiting(io.token) => None,
            State::Draining(why) => Some(self.finish_writing(io, why)),
            _ if self.read_paused
                && io
                    .deferrals
                    .is_full(io.token, S::MAX_DEFERRED, io.max_pending_output) =>
            {
                None
            }
            _ if self.read_paused => {
                // Room again: resume reading the requests we left in the socket.
                Some(Step::Again)
            }
            _ => None,
        }
    }

    /// Every reply is flushed: close, or shut down writing and linger if input may be unread.
    fn finish_writing<S: Service<Session = T>>(
        &mut self,
        io: &mut Io<'_, S>,
        why: Graceful,
    ) -> Step {
        if why == Graceful::PeerEof || !io.linger {
            return Step::Close(why.reason());
        }
        // The FIN goes out after the replies already queued in the kernel.
        if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
            log::debug!("{}: shutdown(Write) failed: {e}; closing", self.peer);
            return Step::Close(why.reason());
        }
        self.state = State::Lingering(why);
        self.read_paused = false;
        Step::Linger
    }

    /// Read and throw away what the peer still sends, until its FIN (then close: nothing is
    /// left unread, so close sends no RST), an error, or [`LINGER_MAX_DISCARD`] bytes.
    fn discard<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>, why: Graceful) -> Step {
        for _ in 0..READS_PER_TURN {
            match self.stream.read(io.input) {
                Ok(0) => {
                    io.fins.insert(io.token, Instant::now());
                    return Step::Close(why.reason());
                }
                Ok(n) => {
                    self.discarded = self.discarded.saturating_add(n as u32);
                    if self.discarded >= LINGER_MAX_DISCARD {
                        log::debug!(
                            "{}: still sending after {} discarded bytes; closing",
                            self.peer,
                            self.discarded
                        );
                        return Step::Close(why.reason());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The close was decided already; a reset now does not change why.
                Err(_) => return Step::Close(why.reason()),
            }
        }
        Step::Again
    }

    /// One `write` per readiness in the common case: every reply of the batch at once.
    fn write_pending(&mut self) -> Option<Step> {
        while self.has_pending_output() {
            match self.stream.write(&self.pending[self.sent..]) {
                Ok(0) => return Some(Step::Close(CloseReason::Error(0))),
                Ok(n) => {
                    self.sent += n;
                    self.progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Step::Close(CloseReason::from_io(&e))),
            }
        }
        None
    }

    /// Borrow the loop's output buffer if we hold none, so replies need no allocation.
    fn lend_output<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>) {
        if self.pending.capacity() == 0 {
            std::mem::swap(&mut self.pending, io.output);
            self.sent = 0;
        }
    }

    /// All sent: give the buffer back (or drop it), so an idle connection owns none.
    fn return_output<S: Service<Session = T>>(&mut self, io: &mut Io<'_, S>) {
        self.pending.clear();
        self.sent = 0;
        if self.pending.capacity() > io.output.capacity() {
            std::mem::swap(&mut self.pending, io.output);
        }
        self.pending = Vec::new();
    }
}

/// Make room in `partial` for `take` more bytes of a frame of `want` bytes in all: doubling,
/// as `Vec` does, but never more than one read ahead of what arrived, nor past the frame's
/// own size, so a peer holds at most what it sent plus [`READ_CHUNK`] (plain doubling held
/// up to twice what was sent, and a max-size frame 2 MiB).
fn grow_towards(partial: &mut Vec<u8>, take: usize, want: usize) {
    let need = partial.len() + take;
    if need > partial.capacity() {
        let target = (partial.capacity() * 2)
            .min(need + READ_CHUNK)
            .min(want)
            .max(need);
        partial.reserve_exact(target - partial.len());
    }
}

/// Why reading a connection's input stopped early.
#[derive(Debug)]
enum Stop {
    /// The codec (or the loop's size bound) refused the stream, with this message.
    Invalid(String),
    /// The service asked to close ([`Reply::close`]).
    Close,
    /// The connection's deferred requests reached [`Service::MAX_DEFERRED`]; the rest of
    /// the input is in `partial`.
    Deferred,
}

/// The loop's refusal of a request holding `held` bytes when the limit is `max`.
fn too_large(held: usize, max: usize) -> Stop {
    Stop::Invalid(format!(
        "invalid request: {held} bytes exceed max_frame {max}"
    ))
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Shutdown, TcpListener};
    use std::thread;
    use std::time::Duration;

    use mio::{Events, Interest, Poll, Token};

    use crate::codec::LengthPrefixed;
    use crate::service::{Reference, PING, PING_REPLY};

    /// Upper bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);

    /// A connection over loopback (server side, non-blocking as the loop makes it) and its
    /// blocking peer.
    fn pair() -> (Connection, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, addr) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (
            Connection::new(TcpStream::from_std(accepted), addr, ()),
            peer,
        )
    }

    /// What the loop owns and lends to handlers through [`Io`].
    struct Parts {
        input: Vec<u8>,
        output: Vec<u8>,
        service: Reference,
        codec: LengthPrefixed,
        stats: Stats,
        warn: Throttle,
        fins: HashMap<Token, Instant>,
        deferrals: Deferrals,
    }

    impl Parts {
        /// A read buffer of `input` bytes, so the read budget is `READS_PER_TURN * input`.
        fn new(input: usize) -> Parts {
            Parts {
                input: vec![0; input],
                output: Vec::with_capacity(4096),
                service: Reference,
                codec: LengthPrefixed,
                stats: Stats::default(),
                warn: Throttle::default(),
                fins: HashMap::new(),
                deferrals: Deferrals::new(None),
            }
        }

        fn io(&mut self) -> Io<'_, Reference> {
            Io {
                input: &mut self.input,
                output: &mut self.output,
                service: &mut self.service,
                codec: &mut self.codec,
                stats: &self.stats,
                warn: &mut self.warn,
                max_frame: 1 << 20,
                max_pending_output: 1 << 20,
                eof_policy: EofPolicy::Close,
                linger: true,
                fins: &mut self.fins,
                deferrals: &mut self.deferrals,
                token: Token(0),
            }
        }
    }

    /// Wait until `len` bytes are readable on the server side, without consuming them
    /// (shared with the property tests in `props`).
    pub(super) fn wait_buffered(conn: &mut Connection, len: usize) {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0; len + 1];
        loop {
            match conn.stream_mut().peek(&mut buf) {
                Ok(n) if n >= len => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("peek: {e}"),
            }
            assert!(Instant::now() < deadline, "{len} bytes never arrived");
            thread::yield_now();
        }
    }

    /// A connection registered edge-triggered with its own poll, driven the way the loop
    /// drives it: one `on_event` per event, with the event's readiness.
    struct Looped {
        conn: Connection,
        peer: std::net::TcpStream,
        poll: Poll,
        events: Events,
        parts: Parts,
    }

    impl Looped {
        fn new() -> Looped {
            let (mut conn, peer) = pair();
            let poll = Poll::new().unwrap();
            poll.registry()
                .register(
                    conn.stream_mut(),
                    Token(0),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .unwrap();
            peer.set_read_timeout(Some(WAIT)).unwrap();
            let mut looped = Looped {
                conn,
                peer,
                poll,
                events: Events::with_capacity(8),
                parts: Parts::new(READ_CHUNK),
            };
            // The first writable edge of a fresh socket: take it out of the way.
            looped.turn(Duration::from_millis(50));
            looped
        }

        /// One turn: wait up to `limit` for events and hand each to the connection. The
        /// verdict of the last event, or `None` if no event came.
        fn turn(&mut self, limit: Duration) -> Option<Step> {
            self.poll.poll(&mut self.events, Some(limit)).unwrap();
            let mut verdict = None;
            for event in self.events.iter() {
                let ready = Readiness {
                    readable: event.is_readable() || event.is_read_closed(),
                    read_closed: event.is_read_closed(),
                    writable: event.is_writable(),
                    error: event.is_error(),
                };
                let mut io = self.parts.io();
                verdict = Some(self.conn.on_event(&mut io, ready));
            }
            verdict
        }

        /// Turns until the connection asks to be closed; the reason. Fails if no event
        /// comes for a second: under edge-triggered polling that is a connection stuck in
        /// CLOSE_WAIT for good.
        fn until_closed(&mut self) -> CloseReason {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                match self.turn(Duration::from_secs(1)) {
                    Some(Step::Close(reason)) => return reason,
                    Some(_) => {}
                    None => panic!("no event for 1 s and not closed: stuck (CLOSE_WAIT)"),
                }
            }
            panic!("not closed within {WAIT:?}");
        }

        /// Everything the peer receives until EOF.
        fn peer_reads_to_eof(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            self.peer.read_to_end(&mut got).unwrap();
            got
        }
    }

    const PING_FRAME: [u8; 5] = [0, 0, 0, 1, PING];
    const PONG_FRAME: [u8; 5] = [0, 0, 0, 1, PING_REPLY];

    /// Data and the FIN in one readiness: the read of the data is short, but the event said
    /// read-closed, so reading goes on to the 0 (else no event ever comes again).
    #[test]
    fn data_and_fin_in_one_readiness_are_both_seen() {
        let mut looped = Looped::new();
        looped.peer.write_all(&PING_FRAME).unwrap();
        looped.peer.shutdown(Shutdown::Write).unwrap();
        // Both must be in the socket before the event is taken, so they share one edge:
        // the socket is in CLOSE_WAIT once its FIN is in.
        let port = looped.conn.stream_mut().local_addr().unwrap().port();
        let deadline = Instant::now() + WAIT;
        while !crate::procfs::tcp_rows(std::process::id())
            .unwrap()
            .iter()
            .any(|row| row.local_port == port && row.state == crate::procfs::TCP_CLOSE_WAIT)
        {
            assert!(Instant::now() < deadline, "the FIN never arrived");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(looped.until_closed(), CloseReason::PeerEof);
        drop(looped.conn.stream_mut().shutdown(Shutdown::Write));
        assert_eq!(looped.peer_reads_to_eof(), PONG_FRAME);
    }

    /// After a short read the connection stops without the read that would return
    /// `WouldBlock`; data that arrives before the next poll raises its own edge.
    #[test]
    fn data_arriving_after_a_short_read_raises_a_new_event() {
        let mut looped = Looped::new();
        looped.peer.write_all(&PING_FRAME).unwrap();
        assert_eq!(looped.turn(WAIT), Some(Step::Continue));
        // Between that short read and the next poll:
        looped.peer.write_all(&PING_FRAME).unwrap();
        let mut pongs = [0; 10];
        let deadline = Instant::now() + WAIT;
        let mut got = 0;
        looped
            .peer
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        while got < pongs.len() {
            assert!(
                Instant::now() < deadline,
                "the second PING was never answered"
            );
            looped.turn(Duration::from_millis(100));
            if let Ok(n) = looped.peer.read(&mut pongs[got..]) {
                got += n;
            }
        }
        assert_eq!(pongs, [PONG_FRAME, PONG_FRAME].concat()[..]);
    }

    /// A FIN alone (nothing sent): the event reports it, the read returns 0, the
    /// connection closes.
    #[test]
    fn a_fin_alone_closes() {
        let mut looped = Looped::new();
        looped.peer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(looped.until_closed(), CloseReason::PeerEof);
    }

    /// A half-close behind a thousand pipelined requests: every reply, then the close.
    #[test]
    fn half_close_after_pipelined_requests_gets_every_reply() {
        let mut looped = Looped::new();
        looped.peer.write_all(&PING_FRAME.repeat(1000)).unwrap();
        looped.peer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(looped.until_closed(), CloseReason::PeerEof);
        drop(looped.conn.stream_mut().shutdown(Shutdown::Write));
        assert_eq!(looped.peer_reads_to_eof(), PONG_FRAME.repeat(1000));
    }

    /// Guards the read budget: input left in the socket when the budget is spent must come
    /// back as `Step::Again`, since edge-triggered epoll will not signal it again.
    #[test]
    fn spent_read_budget_with_input_left_asks_to_be_called_again() {
        let (mut conn, mut peer) = pair();
        let mut parts = Parts::new(64);
        let budget = READS_PER_TURN * parts.input.len();
        let pings = 4 * budget / 5 + 1;
        let ping: &[u8] = &[0, 0, 0, 1, PING];
        peer.write_all(&ping.repeat(pings)).unwrap();
        wait_buffered(&mut conn, pings * ping.len());

        let mut io = parts.io();
        assert_eq!(conn.on_event(&mut io, Readiness::RETRY), Step::Again);
        // The loop's retry after `Again`: no new event, called as readable.
        let mut retries = 0;
        while conn.on_event(&mut io, Readiness::RETRY) == Step::Again {
            retries += 1;
            assert!(retries < 100, "never drained");
        }
        assert!(
            retries >= 3,
            "only {retries} retries for 4 budgets of input"
        );
        assert!(!conn.has_pending_output());
        assert_eq!(io.stats.get(Counter::Requests), pings as u64);

        conn.stream_mut().shutdown(Shutdown::Write).unwrap();
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let mut replies = Vec::new();
        peer.read_to_end(&mut replies).unwrap();
        assert_eq!(replies, [0, 0, 0, 1, PING_REPLY].repeat(pings));
    }

    /// Guards the memory per idle connection (141 B measured, most of it this struct in the
    /// slab): the close machinery must not grow it. 104 bytes in a release build on 64-bit
    /// Linux, where the socket is 4; debug builds add a selector id to mio's socket.
    #[test]
    fn a_connection_stays_within_104_bytes() {
        let socket = std::mem::size_of::<TcpStream>();
        let limit = (socket + 100).next_multiple_of(8);
        let size = std::mem::size_of::<Connection>();
        assert!(
            size <= limit,
            "Connection is {size} bytes, more than {limit}"
        );
    }

    /// Guards the error flag: an event with `error` set (the peer's RST) closes at once
    /// as `Reset`, without waiting for a read or write to fail.
    #[test]
    fn error_event_after_peer_reset_closes_as_reset() {
        let (mut conn, peer) = pair();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(conn.stream_mut(), Token(0), Interest::READABLE)
            .unwrap();
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer);

        // Wait for the error readiness the loop would see (take_error would consume it).
        let deadline = Instant::now() + WAIT;
        let mut events = Events::with_capacity(8);
        while !events.iter().any(|e| e.is_error()) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no error event after the peer's reset");
            poll.poll(&mut events, Some(left)).unwrap();
        }

        let mut parts = Parts::new(64);
        let mut io = parts.io();
        assert_eq!(
            conn.on_event(
                &mut io,
                Readiness {
                    error: true,
                    ..Readiness::default()
                }
            ),
            Step::Close(CloseReason::Reset)
        );
    }
}
