//! The service: what a request means. Replace this to build a new server on closewait.
//!
//! The loop hands a service one whole frame body at a time (op byte + data, never empty, at
//! most `max_frame` bytes) and the service appends zero or more reply frames through
//! [`Reply`]. A service never sees a socket, a partial frame or a length prefix, and never
//! decides when a connection closes: framing and the connection state machine own that.
//!
//! [`Reference`] is the protocol every closewait tool speaks: ECHO, PING and STATS.

use std::fmt;
use std::net::SocketAddr;

use crate::frame;
use crate::stats::Stats;

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

/// A protocol: turns one request body into replies.
///
/// Each event-loop worker owns its own instance (made by the factory given to
/// [`crate::Server::with_service`]), so `call` takes `&mut self` and needs no locking; state
/// shared between workers is the implementor's to synchronise.
pub trait Service {
    /// Answer one request. `request` is a whole frame body: op byte first, never empty.
    fn call(&mut self, request: &[u8], reply: &mut Reply<'_>, cx: &Context<'_>);
}

/// Where a service writes its replies: frames appended to the connection's output, in
/// request order, without intermediate allocation.
pub struct Reply<'a> {
    out: &'a mut Vec<u8>,
    errors: u32,
    first_error: Option<String>,
}

impl<'a> Reply<'a> {
    /// A writer appending reply frames to `out`. The loop makes one per read; a service's
    /// unit tests can make one to call [`Service::call`] without a socket.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Reply {
            out,
            errors: 0,
            first_error: None,
        }
    }

    /// Send one frame with body `op` + `data`.
    pub fn send(&mut self, op: u8, data: &[u8]) {
        frame::encode(self.out, op, data);
    }

    /// Send one frame whose data `write` appends in place (for replies built piecewise).
    pub fn send_with(&mut self, op: u8, write: impl FnOnce(&mut Vec<u8>)) {
        frame::encode_with(self.out, op, write);
    }

    /// Send an ERROR frame with this message. The connection stays usable; the loop logs
    /// the first error of each read batch with the peer's address.
    pub fn error(&mut self, message: impl fmt::Display) {
        let text = message.to_string();
        self.send(ERROR, text.as_bytes());
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(text);
        }
    }

    /// Errors sent through this writer, and the first one's text.
    pub(crate) fn take_errors(&mut self) -> Option<(u32, String)> {
        let errors = std::mem::take(&mut self.errors);
        self.first_error.take().map(|text| (errors, text))
    }
}

/// The reference service: ECHO, PING and STATS. Stateless, so it costs nothing per worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Service for Reference {
    fn call(&mut self, request: &[u8], reply: &mut Reply<'_>, cx: &Context<'_>) {
        let (op, data) = (request[0], &request[1..]);
        match op {
            ECHO => reply.send(ECHO_REPLY, data),
            PING => reply.send(PING_REPLY, &[]),
            STATS => reply.send_with(STATS_REPLY, |out| cx.stats.write_text(out)),
            _ => reply.error(format_args!("unknown op 0x{op:02x}")),
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
        let mut reply = Reply::new(&mut out);
        Reference.call(request, &mut reply, &cx);
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
    fn unknown_op_is_an_error_frame_naming_the_op() {
        let (out, errors) = call(b"\x7fxyz");
        assert_eq!(out[4], ERROR);
        assert_eq!(&out[5..], b"unknown op 0x7f");
        assert_eq!(errors, Some((1, "unknown op 0x7f".to_string())));
    }
}
