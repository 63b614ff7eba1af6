//! The wire format, as a trait a service picks: where one request ends, and how a reply or an
//! error is written. Nothing else.
//!
//! A codec is pure: it looks at the bytes a connection received so far and answers "need
//! more", "one request of N bytes" or "invalid"; it never sees a socket, never allocates to
//! decode, and never decides what a request means (the [`crate::Service`] does) nor when a
//! connection closes (the loop does). The loop owns every bound, whatever the codec: the
//! largest request ([`crate::Config::max_frame`], enforced on the bytes a request holds even
//! if a codec forgets to), pending output, the time to finish a request, and the memory budget.
//!
//! The default codec is closewait's length-prefixed framing, [`LengthPrefixed`] (in
//! [`crate::frame`]). `examples/resp.rs` implements the Redis protocol with the same trait.
//!
//! One codec value exists per worker thread (made with `Default`), not per connection, so a
//! codec adds nothing to the memory an idle connection costs.

use std::fmt;

pub use crate::frame::LengthPrefixed;

/// A wire format: how requests are cut out of a byte stream and how errors are written.
///
/// `decode` must be a function of the bytes alone: the loop may call it again on the same
/// prefix after more bytes arrived (a request split across reads), and must get the same
/// answer for every split (test it like `src/frame.rs`: every split of every input).
pub trait Codec: Default {
    /// One decoded request as the service receives it, borrowing the received bytes (for
    /// [`LengthPrefixed`], the frame body: `&[u8]`).
    type Request<'a>;
    /// Why a stream cannot be read further; its `Display` text goes to the peer in an error
    /// reply, and to the log with the peer's address.
    type Error: fmt::Display;
    /// Bytes of framing a request may carry on top of `max_request` (a length prefix, say).
    /// The loop refuses an unfinished request once it holds more than
    /// `max_request + MAX_OVERHEAD` bytes.
    const MAX_OVERHEAD: usize = 0;

    /// Look for one request at the start of `buf`. `max_request` is the configured limit:
    /// refuse a request announced larger as early as the format allows, so the loop never
    /// buffers a request it will refuse.
    fn decode<'a>(
        &mut self,
        buf: &'a [u8],
        max_request: usize,
    ) -> Decoded<Self::Request<'a>, Self::Error>;

    /// Append an error reply carrying `message` (the ERROR frame of the default codec). Used
    /// by [`crate::Reply::error`] and by the loop itself: before closing on an invalid
    /// request, a frame timeout or the memory budget, and to refuse a connection at the cap.
    fn encode_error(out: &mut Vec<u8>, message: &str);
}

/// What a codec found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<R, E> {
    /// A whole request, and how many bytes of the buffer it used.
    Request {
        /// The request, for the service.
        request: R,
        /// Bytes to consume from the buffer (framing included).
        used: usize,
    },
    /// Not enough bytes yet; keep them and read more.
    Incomplete {
        /// The request needs at least this many bytes in all, counted from the start of the
        /// buffer, if the codec knows (a length prefix does). With it the loop copies only
        /// this request's bytes out of a read and parses the rest in place; `None` makes the
        /// loop keep every byte it reads until the request completes.
        need: Option<usize>,
    },
    /// The stream cannot be resynchronised: the loop sends an error reply with this text,
    /// stops reading and closes.
    Invalid(E),
}
