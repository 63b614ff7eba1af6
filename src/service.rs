//! The service: what a request means. Replace this to build a new server on closewait.
//!
//! The loop hands a service one whole request at a time, as its [`Codec`] cut it out of the
//! stream (for the default codec, a frame body: op byte + data, never empty, at most
//! `max_frame` bytes), and the service appends zero or more replies through [`Reply`]. A
//! service never sees a socket or a partial request, and never closes a connection itself:
//! it may only ask, through [`Reply::close`], and the connection state machine does it.
//!
//! [`Reference`] is the protocol every closewait tool speaks: ECHO, PING and STATS.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;

use crate::codec::{Codec, LengthPrefixed};
use crate::connection::CloseReason;
use crate::deferred::{Deferrals, Deferred};
use crate::frame;
use crate::stats::Stats;
use mio::Token;

/// Request op: reply [`ECHO_REPLY`] with the same data.
pub const ECHO: u8 = 0x01;
/// Request op: reply [`PING_REPLY`] with no data.
pub const PING: u8 = 0x02;
/// Request op: reply [`STATS_REPLY`] with `name value` lines.
pub const STATS: u8 = 0x03;
/// Reply op to [`ECHO`].
pub const ECHO_REPLY: u8 = 0x81;
/// Reply op to [`PING`].
pub const PING_REPLY: u8 = 0x82;
/// Reply op to [`STATS`].
pub const STATS_REPLY: u8 = 0x83;
/// Reply op for any error; the data is a UTF-8 message for the peer.
pub const ERROR: u8 = 0xFF;

/// What a request handler knows about where the request came from.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The peer's address, for logs.
    pub peer: SocketAddr,
    /// Process-wide counters (the reference service reports them).
    pub stats: &'a Stats,
}

/// A protocol: turns one request into replies.
///
/// Each event-loop worker owns its own instance (made by the factory given to
/// [`crate::Server::with_service`]), so `call` takes `&mut self` and needs no locking; state
/// shared between workers is the implementor's to synchronise.
pub trait Service {
    /// The wire format: [`LengthPrefixed`] for closewait's own framing (requests are frame
    /// bodies, `&[u8]`), or a [`Codec`] of your own.
    type Codec: Codec;

    /// What the service remembers about one connection (who authenticated, what it
    /// subscribed to), made by [`open`](Service::open) and handed to every request of that
    /// connection. `()` for a service that remembers nothing: a zero-sized session adds not
    /// one byte to a connection. Keep it small, or boxed: every idle connection holds one.
    type Session: Default;

    /// Requests of one connection that may wait for a [deferred](Reply::defer) reply at
    /// once. At the bound the loop stops handing that connection's requests to the
    /// service, even in the middle of a read (the rest of the read waits, unparsed, in the
    /// connection), and stops reading it, as it does when its output backs up, until one
    /// completes.
    const MAX_DEFERRED: usize = 64;

    /// A connection from `peer` was accepted: make its session (by default,
    /// `Session::default()`).
    fn open(&mut self, peer: SocketAddr) -> Self::Session {
        let _ = peer;
        Self::Session::default()
    }

    /// Answer one request, in the connection's request order, by writing zero or more
    /// replies to `reply`. For [`LengthPrefixed`], `request` is a whole frame body: op byte
    /// first, never empty, at most `max_frame` bytes.
    fn call(
        &mut self,
        request: <Self::Codec as Codec>::Request<'_>,
        session: &mut Self::Session,
        reply: &mut Reply<'_, Self::Codec>,
        cx: &Context<'_>,
    );

    /// The connection ended, for `reason`: its session comes back for the service's own
    /// cleanup and counters. Called once per opened session, after the socket is closed.
    fn close(&mut self, session: Self::Session, reason: CloseReason) {
        let _ = (session, reason);
    }
}

/// Where a service writes its replies: appended to the connection's output, in request
/// order, without intermediate allocation.
///
/// Any codec: [`append`](Reply::append) (bytes already in the codec's format),
/// [`error`](Reply::error), [`answer_error`](Reply::answer_error) and
/// [`close`](Reply::close). [`LengthPrefixed`] adds [`send`](Reply::send) and
/// [`send_with`](Reply::send_with); another codec's reply helpers build on `append` (see
/// `examples/resp.rs`).
pub struct Reply<'a, C = LengthPrefixed> {
    out: &'a mut Vec<u8>,
    /// The worker's deferred replies, while the loop drives a connection (`None` outside).
    deferrals: Option<&'a mut Deferrals>,
    token: Token,
    /// Where in `out` the replies that must wait begin (behind a waiting deferred request of
    /// this connection); they are moved to its queue when the batch ends or at the next
    /// `defer`, so writing a reply never has to ask where it goes.
    held: Option<usize>,
    errors: u32,
    first_error: Option<String>,
    close: bool,
    /// The connection's bound on requests waiting for deferred replies
    /// ([`Service::MAX_DEFERRED`]; unbounded outside a server).
    max_deferred: usize,
    /// Set by `close`, or by a `defer` that reached `max_deferred`: the loop must stop
    /// handing this connection requests. One flag, so the loop tests one byte per request.
    interrupted: bool,
    codec: PhantomData<fn() -> C>,
}

impl<'a, C: Codec> Reply<'a, C> {
    /// A writer appending replies to `out`. The loop makes one per read; a service's unit
    /// tests can make one to call [`Service::call`] without a socket.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Reply {
            out,
            deferrals: None,
            token: Token(0),
            held: None,
            errors: 0,
            first_error: None,
            close: false,
            max_deferred: usize::MAX,
            interrupted: false,
            codec: PhantomData,
        }
    }

    /// The writer for connection `token`'s replies, which go behind its waiting deferred
    /// requests if it has any.
    pub(crate) fn for_connection(
        out: &'a mut Vec<u8>,
        deferrals: &'a mut Deferrals,
        token: Token,
        max_deferred: usize,
    ) -> Self {
        let held = deferrals.is_waiting(token).then_some(out.len());
        Reply {
            deferrals: Some(deferrals),
            token,
            held,
            max_deferred,
            ..Reply::new(out)
        }
    }

    /// The batch is over: replies written behind a waiting request join its queue.
    #[inline]
    pub(crate) fn hold_rest(&mut self) {
        if self.held.is_some() {
            self.hold();
        }
    }

    #[cold]
    #[inline(never)]
    fn hold(&mut self) {
        if let (Some(mark), Some(deferrals)) = (self.held, self.deferrals.as_deref_mut()) {
            deferrals.hold(self.token, &self.out[mark..]);
            self.out.truncate(mark);
        }
    }

    /// Answer this request later, from any thread: the handle goes to a thread of yours,
    /// which calls [`Deferred::complete`] with the reply. Replies to this connection's later
    /// requests wait behind it, so the peer still gets them in request order. Nothing is
    /// written for this request now (and anything written to this `Reply` after `defer`
    /// goes after the deferred reply). See `examples/pool.rs`.
    ///
    /// Outside a server (a `Reply` made with [`Reply::new`]) the deferred answer is dropped.
    pub fn defer(&mut self) -> Deferred<C> {
        if self.deferrals.is_none() {
            return Deferrals::new(None).defer(self.token);
        }
        // Replies written since the last deferral of this batch go before this one.
        self.hold();
        self.held = Some(self.out.len());
        let Some(deferrals) = self.deferrals.as_deref_mut() else {
            unreachable!("checked above")
        };
        let handle = deferrals.defer(self.token);
        if deferrals.waiting(self.token) >= self.max_deferred {
            // At the bound: the rest of this read waits in the connection, unparsed.
            self.interrupted = true;
        }
        handle
    }

    /// Append one reply that `write` encodes in place, in the codec's format (for a codec of
    /// your own: the helpers that write its reply types call this).
    #[inline]
    pub fn append(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(self.out);
    }

    /// Send an error reply for a request the peer got wrong (unknown op, malformed
    /// arguments): the peer's fault, so the loop logs it — the first error of each read
    /// batch, with the peer's address, rate-limited. The connection stays usable.
    ///
    /// `message` is anything `Display`: a `&str`, a `String`, or `format_args!(..)` (which
    /// formats without an intermediate `String` of yours).
    pub fn error(&mut self, message: impl fmt::Display) {
        let text = message.to_string();
        C::encode_error(self.out, &text);
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(text);
        }
    }

    /// Send an error reply that is an ordinary answer ("no such key", "too many counters"),
    /// not a fault of the peer: nothing is logged. The connection stays usable.
    pub fn answer_error(&mut self, message: impl fmt::Display) {
        C::encode_error(self.out, &message.to_string());
    }

    /// Close the connection once the replies written so far are sent (a QUIT command): the
    /// requests this connection sent after this one are neither answered nor read.
    pub fn close(&mut self) {
        self.close = true;
        self.interrupted = true;
    }

    /// Whether [`close`](Reply::close) was called.
    pub(crate) fn wants_close(&self) -> bool {
        self.close
    }

    /// Whether the loop must stop handing requests to the service: a close, or this
    /// connection's deferred requests at their bound.
    #[inline]
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Errors sent through [`error`](Reply::error), and the first one's text.
    pub(crate) fn take_errors(&mut self) -> Option<(u32, String)> {
        let errors = std::mem::take(&mut self.errors);
        self.first_error.take().map(|text| (errors, text))
    }
}

impl Reply<'_, LengthPrefixed> {
    /// Send one frame with body `op` + `data`.
    #[inline]
    pub fn send(&mut self, op: u8, data: &[u8]) {
        frame::encode(self.out, op, data);
    }

    /// Send one frame whose data `write` appends in place (for replies built piecewise):
    /// `reply.send_with(op, |out: &mut Vec<u8>| out.extend_from_slice(b"..."))`.
    #[inline]
    pub fn send_with(&mut self, op: u8, write: impl FnOnce(&mut Vec<u8>)) {
        frame::encode_with(self.out, op, write);
    }
}

/// The reference service: ECHO, PING and STATS. Stateless, so it costs nothing per worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Service for Reference {
    type Codec = LengthPrefixed;
    type Session = ();

    // Inlined into the read loop, the two ops a benchmark sends cost a few instructions;
    // the rest stays out of line so it does not stop that.
    #[inline(always)]
    fn call(&mut self, request: &[u8], _: &mut (), reply: &mut Reply<'_>, cx: &Context<'_>) {
        match request {
            [ECHO, data @ ..] => reply.send(ECHO_REPLY, data),
            [PING, ..] => reply.send(PING_REPLY, &[]),
            _ => Reference::rare(request, reply, cx),
        }
    }
}

impl Reference {
    #[cold]
    #[inline(never)]
    fn rare(request: &[u8], reply: &mut Reply<'_>, cx: &Context<'_>) {
        match request {
            [STATS, ..] => reply.send_with(STATS_REPLY, |out| cx.stats.write_text(out)),
            [op, ..] => reply.error(format_args!("unknown op 0x{op:02x}")),
            // The codec never passes an empty request; answered rather than assumed.
            [] => reply.error("empty request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(request: &[u8]) -> (Vec<u8>, Option<(u32, String)>) {
        let stats = Stats::default();
        let cx = Context {
            peer: SocketAddr::from(([127, 0, 0, 1], 9)),
            stats: &stats,
        };
        let mut out = Vec::new();
        let mut reply = Reply::<LengthPrefixed>::new(&mut out);
        Reference.call(request, &mut (), &mut reply, &cx);
        let errors = reply.take_errors();
        (out, errors)
    }

    #[test]
    fn echo_returns_the_same_data_under_the_reply_op() {
        assert_eq!(call(b"\x01abc").0, b"\x00\x00\x00\x04\x81abc");
    }

    #[test]
    fn ping_returns_an_empty_pong() {
        assert_eq!(call(b"\x02ignored").0, b"\x00\x00\x00\x01\x82");
    }

    #[test]
    fn stats_returns_name_value_lines() {
        let (out, _) = call(b"\x03");
        assert_eq!(out[4], STATS_REPLY);
        let text = std::str::from_utf8(&out[5..]).unwrap();
        assert!(text.lines().any(|l| l == "active 0"), "{text}");
    }

    #[test]
    fn an_answer_error_is_the_same_frame_but_not_reported_for_the_log() {
        let mut out = Vec::new();
        let mut reply = Reply::<LengthPrefixed>::new(&mut out);
        reply.answer_error("no such key");
        assert_eq!(reply.take_errors(), None);
        reply.error("bad op");
        assert_eq!(reply.take_errors(), Some((1, "bad op".to_string())));
        assert!(!reply.wants_close());
        reply.close();
        assert!(reply.wants_close());
        assert_eq!(
            out,
            b"\x00\x00\x00\x0c\xffno such key\x00\x00\x00\x07\xffbad op"
        );
    }

    #[test]
    fn unknown_op_is_an_error_frame_naming_the_op() {
        let (out, errors) = call(b"\x7fxyz");
        assert_eq!(out[4], ERROR);
        assert_eq!(&out[5..], b"unknown op 0x7f");
        assert_eq!(errors, Some((1, "unknown op 0x7f".to_string())));
    }
}
