//! Framing: where one message ends and the next begins. Nothing else.
//!
//! Every message in both directions is `u32` big-endian length `L`, then `L` bytes of body,
//! with `1 <= L <= max_frame`. This module turns bytes into frame bodies and bodies into bytes.
//! It never decides what a body means (that is the [`crate::service`]'s job) and never touches
//! a socket, so every split of a frame across reads can be tested without one.

use std::fmt;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// The result of looking for one frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame: its body, and how many bytes (header included) it used.
    Frame {
        /// The frame body: op byte then data. Never empty.
        body: &'a [u8],
        /// Bytes to consume from the buffer.
        used: usize,
    },
    /// Not enough bytes yet; keep them and read more.
    Incomplete,
    /// The length prefix is illegal. The stream cannot be resynchronised: answer, then close.
    Invalid(FrameError),
}

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

/// Look for one frame at the start of `buf`.
///
/// The length is validated as soon as its 4 bytes are in, before the body arrives, so a peer
/// announcing 4 GiB is refused at once instead of being buffered up to the limit.
pub fn decode(buf: &[u8], max_frame: usize) -> Decoded<'_> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Decoded::Incomplete;
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
        Some(body) => Decoded::Frame { body, used },
        None => Decoded::Incomplete,
    }
}

/// Append one frame with body `op` + `data` to `out`.
pub fn encode(out: &mut Vec<u8>, op: u8, data: &[u8]) {
    encode_with(out, op, |out| out.extend_from_slice(data));
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

    /// Feed `stream` to a decoder in the pieces given by `cuts`, as a connection would:
    /// keep the unconsumed tail, append the next read, decode every whole frame.
    fn decode_in_pieces(stream: &[u8], cuts: &[usize], max: usize) -> Vec<Vec<u8>> {
        let mut pending = Vec::new();
        let mut bodies = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
            pending.extend_from_slice(&stream[from..to]);
            from = to;
            let mut at = 0;
            while let Decoded::Frame { body, used } = decode(&pending[at..], max) {
                bodies.push(body.to_vec());
                at += used;
            }
            pending.drain(..at);
        }
        assert!(pending.is_empty(), "bytes left over: {pending:?}");
        bodies
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
            Decoded::Frame { used: 20, .. }
        ));
    }

    #[test]
    fn partial_header_and_partial_body_are_incomplete() {
        let stream = frame(0x01, b"abc");
        for end in 0..stream.len() {
            assert_eq!(
                decode(&stream[..end], 16),
                Decoded::Incomplete,
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
}
