//! Framing: where one message ends and the next begins. Nothing else. This is the default
//! [`Codec`], [`LengthPrefixed`].
//!
//! Every message in both directions is `u32` big-endian length `L`, then `L` bytes of body,
//! with `1 <= L <= max_frame`. This module turns bytes into frame bodies and bodies into bytes.
//! It never decides what a body means (that is the [`crate::service`]'s job) and never touches
//! a socket, so every split of a frame across reads can be tested without one.

use std::fmt;

use crate::codec::{Codec, Decoded};
use crate::service::ERROR;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// A length prefix the protocol forbids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// `L == 0`: a frame must carry at least the op byte.
    Empty,
    /// `L > max_frame`.
    TooLarge {
        /// The length the peer announced.
        len: u32,
        /// The configured limit.
        max: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Empty => write!(
                f,
                "invalid frame: length 0 (a frame carries at least an op byte)"
            ),
            FrameError::TooLarge { len, max } => {
                write!(f, "invalid frame: length {len} exceeds max_frame {max}")
            }
        }
    }
}

/// closewait's own wire format, the default [`Codec`]: `u32` big-endian length, then that
/// many bytes of body (op byte, then data). A service using it receives the body, `&[u8]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LengthPrefixed;

impl Codec for LengthPrefixed {
    type Request<'a> = &'a [u8];
    type Error = FrameError;
    const MAX_OVERHEAD: usize = HEADER_LEN;

    #[inline]
    fn decode<'a>(&mut self, buf: &'a [u8], max_request: usize) -> Decoded<&'a [u8], FrameError> {
        decode(buf, max_request)
    }

    fn encode_error(out: &mut Vec<u8>, message: &str) {
        encode(out, ERROR, message.as_bytes());
    }
}

/// Look for one frame at the start of `buf`; a request is the frame's body.
///
/// The length is validated as soon as its 4 bytes are in, before the body arrives, so a peer
/// announcing 4 GiB is refused at once instead of being buffered up to the limit. Once the
/// header is in, [`Decoded::Incomplete`] tells how long the whole frame is.
#[inline]
pub fn decode(buf: &[u8], max_frame: usize) -> Decoded<&[u8], FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Decoded::Incomplete {
            need: Some(HEADER_LEN),
        };
    };
    let len = u32::from_be_bytes(*header);
    if len == 0 {
        return Decoded::Invalid(FrameError::Empty);
    }
    if len as usize > max_frame {
        return Decoded::Invalid(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    let used = HEADER_LEN + len as usize;
    match buf.get(HEADER_LEN..used) {
        Some(body) => Decoded::Request {
            request: body,
            used,
        },
        None => Decoded::Incomplete { need: Some(used) },
    }
}

/// Append one frame with body `op` + `data` to `out`.
#[inline]
pub fn encode(out: &mut Vec<u8>, op: u8, data: &[u8]) {
    // The length is known up front: two copies, where `encode_with`'s patching costs
    // three capacity checks and a second pass (a third of a pipelined request's
    // instructions went there). No `reserve`: its check would only add to the copies'.
    let [a, b, c, d] = ((1 + data.len()) as u32).to_be_bytes();
    out.extend_from_slice(&[a, b, c, d, op]);
    out.extend_from_slice(data);
}

/// Append one frame whose data `write` appends to `out`, so a reply can be produced in
/// place (no temporary buffer); the length prefix is patched once the size is known.
pub fn encode_with(out: &mut Vec<u8>, op: u8, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(op);
    write(out);
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, op, data);
        out
    }

    /// What a decoder made of a whole stream: the frame bodies, then how it stopped.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        bodies: Vec<Vec<u8>>,
        /// The refused length and the stream offset of its header, if one was refused.
        invalid: Option<(FrameError, usize)>,
        /// Bytes of an unfinished frame kept when the stream ended.
        left_over: usize,
    }

    /// Feed `stream` to a decoder in the pieces given by `cuts` (ascending offsets), as a
    /// connection would: keep the unconsumed tail, append the next read, decode every whole
    /// frame, stop at the first refused length.
    fn feed(stream: &[u8], cuts: &[usize], max: usize) -> Outcome {
        let mut pending = Vec::new();
        let mut bodies = Vec::new();
        let mut consumed = 0;
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
            pending.extend_from_slice(&stream[from..to]);
            from = to;
            let mut at = 0;
            loop {
                match decode(&pending[at..], max) {
                    Decoded::Request {
                        request: body,
                        used,
                    } => {
                        bodies.push(body.to_vec());
                        at += used;
                    }
                    Decoded::Incomplete { .. } => break,
                    Decoded::Invalid(e) => {
                        return Outcome {
                            bodies,
                            invalid: Some((e, consumed + at)),
                            left_over: 0,
                        }
                    }
                }
            }
            pending.drain(..at);
            consumed += at;
        }
        Outcome {
            bodies,
            invalid: None,
            left_over: pending.len(),
        }
    }

    fn decode_in_pieces(stream: &[u8], cuts: &[usize], max: usize) -> Vec<Vec<u8>> {
        let outcome = feed(stream, cuts, max);
        assert_eq!(
            (outcome.invalid, outcome.left_over),
            (None, 0),
            "stream did not end on a frame boundary"
        );
        outcome.bodies
    }

    #[test]
    fn encode_writes_big_endian_length_then_op_then_data() {
        assert_eq!(frame(0x81, b"hi"), [0, 0, 0, 3, 0x81, b'h', b'i']);
        assert_eq!(frame(0x82, b""), [0, 0, 0, 1, 0x82]);
    }

    #[test]
    fn decodes_every_split_of_two_frames_across_two_and_three_reads() {
        let mut stream = frame(0x01, b"hello");
        stream.extend(frame(0x02, b""));
        let want = vec![b"\x01hello".to_vec(), b"\x02".to_vec()];
        for a in 0..=stream.len() {
            assert_eq!(decode_in_pieces(&stream, &[a], 64), want, "split at {a}");
            for b in a..=stream.len() {
                assert_eq!(
                    decode_in_pieces(&stream, &[a, b], 64),
                    want,
                    "splits at {a}, {b}"
                );
            }
        }
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let stream = frame(0x01, &[7; 300]);
        let cuts: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(
            decode_in_pieces(&stream, &cuts, 1024),
            vec![frame(0x01, &[7; 300])[4..].to_vec()]
        );
    }

    #[test]
    fn zero_length_is_invalid() {
        assert_eq!(
            decode(&[0, 0, 0, 0], 16),
            Decoded::Invalid(FrameError::Empty)
        );
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        assert_eq!(
            decode(&[0, 0, 0, 17], 16),
            Decoded::Invalid(FrameError::TooLarge { len: 17, max: 16 })
        );
        assert_eq!(
            decode(&[0xFF, 0xFF, 0xFF, 0xFF], 1 << 20),
            Decoded::Invalid(FrameError::TooLarge {
                len: u32::MAX,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn exactly_max_frame_is_accepted() {
        let stream = frame(0x01, &[0; 15]);
        assert!(matches!(
            decode(&stream, 16),
            Decoded::Request { used: 20, .. }
        ));
    }

    #[test]
    fn partial_header_and_partial_body_are_incomplete() {
        let stream = frame(0x01, b"abc");
        for end in 0..stream.len() {
            assert!(
                matches!(decode(&stream[..end], 16), Decoded::Incomplete { .. }),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn error_text_names_the_length_and_the_limit() {
        let text = FrameError::TooLarge {
            len: 2_000_000,
            max: 1_048_576,
        }
        .to_string();
        assert!(
            text.contains("2000000") && text.contains("1048576"),
            "{text}"
        );
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Small, so that random bytes often read as a legal length and garbage decodes to
        /// frames as well as to refusals.
        const MAX: usize = 64;

        /// One piece of a stream a peer might send.
        fn segment() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                4 => (any::<u8>(), vec(any::<u8>(), 0..MAX)).prop_map(|(op, data)| frame(op, &data)),
                2 => vec(any::<u8>(), 1..12),
                1 => Just(vec![0, 0, 0, 0]),
                1 => ((MAX as u32 + 1)..=u32::MAX).prop_map(|len| len.to_be_bytes().to_vec()),
            ]
        }

        /// A stream and ascending cut offsets into it (duplicates are empty reads).
        fn split_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
            vec(segment(), 0..10)
                .prop_map(|segments| segments.concat())
                .prop_flat_map(|stream| {
                    let len = stream.len();
                    (Just(stream), vec(0..=len, 0..12))
                })
                .prop_map(|(stream, mut cuts)| {
                    cuts.sort_unstable();
                    (stream, cuts)
                })
        }

        proptest! {
            /// Where reads happen to split a stream never changes what it means: the same
            /// frames, the same refusal at the same offset, the same unfinished tail.
            #[test]
            fn any_split_decodes_like_the_stream_in_one_piece((stream, cuts) in split_stream()) {
                prop_assert_eq!(feed(&stream, &cuts, MAX), feed(&stream, &[], MAX));
            }

            /// A refusal needs only the four header bytes, so no caller ever buffers any
            /// of the body a refused length announces.
            #[test]
            fn a_refused_length_is_refused_on_its_header_alone(
                header in any::<[u8; HEADER_LEN]>(),
                body in vec(any::<u8>(), 0..MAX),
            ) {
                let mut stream = header.to_vec();
                stream.extend_from_slice(&body);
                if let Decoded::Invalid(e) = decode(&stream, MAX) {
                    prop_assert_eq!(decode(&header, MAX), Decoded::Invalid(e));
                }
            }
        }
    }
}
