//! Property tests of framing on the real read path (run with the unit tests, since a
//! connection is internal): a [`Connection`] fed a random stream over loopback, split
//! into random reads, must call the service with exactly the frames [`frame::decode`] finds
//! in the stream in one piece, refuse the same length with the same ERROR frame, and never
//! hold memory for bytes the peer did not send.
//!
//! The memory is measured, not inferred: `allocation_counter` counts this thread's heap while
//! the connection handles each read, so whatever growth policy its buffers follow is what the
//! property sees.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use super::tests::wait_buffered;
use super::{CloseReason, Connection, Io, Readiness, Step, READ_CHUNK};
use crate::frame::{self, FrameError, HEADER_LEN};
use crate::leak::EofPolicy;
use crate::service::{Context, Reply, Service, ERROR};
use crate::stats::Stats;
use crate::throttle::Throttle;
use crate::{Decoded, LengthPrefixed};
use mio::net::TcpStream;
use proptest::collection::vec;
use proptest::prelude::*;

/// The server's default frame limit: large frames span many reads, as in production.
const MAX_FRAME: usize = 1 << 20;
/// Largest single write of the peer. Below the socket's initial receive window, so each write
/// arrives whole before the connection reads it, and it is then exactly one read.
const MAX_PIECE: usize = 32 * 1024;
/// Upper bound on waiting for a write to arrive.
const WAIT: Duration = Duration::from_secs(10);

/// A service that remembers every request body and answers nothing, so the connection's
/// only heap is what it keeps of the peer's input.
#[derive(Default)]
struct Recorder {
    bodies: Vec<Vec<u8>>,
}

impl Service for Recorder {
    type Codec = LengthPrefixed;
    type Session = ();

    fn call(&mut self, request: &[u8], _: &mut (), _: &mut Reply<'_>, _: &Context<'_>) {
        // The recording is the test's memory, not the connection's.
        allocation_counter::opt_out(|| self.bodies.push(request.to_vec()));
    }
}

/// What `frame::decode` makes of the whole stream at once.
struct OnePiece {
    bodies: Vec<Vec<u8>>,
    /// Offset where each frame ends, in order.
    ends: Vec<usize>,
    invalid: Option<FrameError>,
}

fn decode_in_one_piece(stream: &[u8]) -> OnePiece {
    let (mut bodies, mut ends, mut at) = (Vec::new(), Vec::new(), 0);
    loop {
        match frame::decode(&stream[at..], MAX_FRAME) {
            Decoded::Request {
                request: body,
                used,
            } => {
                bodies.push(body.to_vec());
                at += used;
                ends.push(at);
            }
            Decoded::Incomplete { .. } => {
                return OnePiece {
                    bodies,
                    ends,
                    invalid: None,
                }
            }
            Decoded::Invalid(e) => {
                return OnePiece {
                    bodies,
                    ends,
                    invalid: Some(e),
                }
            }
        }
    }
}

/// The server side of a loopback connection, non-blocking as the loop makes it, and its peer.
fn pair() -> (Connection, std::net::TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    // Each write goes out at once instead of waiting for the previous one's ACK.
    peer.set_nodelay(true).unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let (accepted, addr) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    (
        Connection::new(TcpStream::from_std(accepted), addr, ()),
        peer,
    )
}

/// One segment of a stream: a legal frame (large ones span many reads), a refused length,
/// or bytes that are neither.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    let body_len = prop_oneof![
        3 => 1..64usize,
        2 => 64..8192usize,
        2 => 60_000..400_000usize,
        1 => Just(MAX_FRAME),
    ];
    prop_oneof![
        8 => (any::<u8>(), body_len).prop_map(|(op, len)| {
            // Patterned, not random, data: cheap to make at any size and still shows a
            // misplaced byte.
            let data: Vec<u8> = (1..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            frame::encode(&mut out, op, &data);
            out
        }),
        1 => vec(any::<u8>(), 1..8),
        1 => Just(vec![0; HEADER_LEN]),
        1 => ((MAX_FRAME as u32 + 1)..=u32::MAX).prop_map(|len| len.to_be_bytes().to_vec()),
    ]
}

/// A stream and the ascending offsets where reads split it: anywhere, or within a few bytes
/// of where a segment starts, so that headers are split too. Gaps longer than [`MAX_PIECE`]
/// are sent in pieces of that size.
fn split_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    vec(segment(), 1..6)
        .prop_flat_map(|segments| {
            let starts: Vec<usize> = segments
                .iter()
                .scan(0, |at, s| {
                    let start = *at;
                    *at += s.len();
                    Some(start)
                })
                .collect();
            let stream = segments.concat();
            let len = stream.len();
            let cut = prop_oneof![
                0..=len,
                (proptest::sample::select(starts), 0..=HEADER_LEN + 1)
                    .prop_map(move |(start, off)| (start + off).min(len)),
            ];
            (Just(stream), vec(cut, 0..16))
        })
        .prop_map(|(stream, mut cuts)| {
            cuts.sort_unstable();
            cuts.dedup();
            (stream, cuts)
        })
}

/// The sizes of the writes that send `len` bytes split at `cuts`.
fn pieces(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().filter(|&&c| c > 0).chain(std::iter::once(&len)) {
        let mut gap = to - from;
        while gap > 0 {
            sizes.push(gap.min(MAX_PIECE));
            gap -= gap.min(MAX_PIECE);
        }
        from = to;
    }
    sizes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The connection's own buffering (finishing a frame left over from an earlier read,
    /// parsing the rest straight from the read buffer) is as split-proof as the decoder, and
    /// what it keeps between reads is bounded by what the peer sent: the bytes of the
    /// unfinished frame received so far, plus at most one read's worth of slack.
    #[test]
    fn any_split_read_by_a_connection_decodes_like_one_piece_and_holds_only_what_was_sent(
        (stream, cuts) in split_stream(),
    ) {
        let expected = decode_in_one_piece(&stream);
        let (mut conn, mut peer) = pair();
        let mut input = vec![0; READ_CHUNK];
        let mut output = Vec::with_capacity(4096);
        let mut service = Recorder::default();
        let stats = Stats::default();
        let mut warn = Throttle::default();
        // The loop's FIN clock, with room for this connection: its memory is the loop's.
        let mut fins = std::collections::HashMap::with_capacity(1);
        let mut deferrals = crate::deferred::Deferrals::new(None);
        let mut io = Io {
            input: &mut input,
            output: &mut output,
            service: &mut service,
            codec: &mut LengthPrefixed,
            stats: &stats,
            warn: &mut warn,
            max_frame: MAX_FRAME,
            max_pending_output: 1 << 20,
            eof_policy: EofPolicy::Close,
            linger: true,
            fins: &mut fins,
            deferrals: &mut deferrals,
            token: mio::Token(0),
        };

        // Net heap the connection allocated over all its reads: what it holds now.
        let mut held: i64 = 0;
        let mut sent = 0;
        let mut step = Step::Continue;
        for len in pieces(stream.len(), &cuts) {
            if step != Step::Continue {
                break;
            }
            let piece = &stream[sent..sent + len];
            peer.write_all(piece).unwrap();
            sent += piece.len();
            wait_buffered(&mut conn, piece.len());
            held += allocation_counter::measure(|| {
                step = conn.on_event(&mut io, Readiness::RETRY);
            })
            .bytes_current;

            let complete = expected.ends.iter().take_while(|&&end| end <= sent).last();
            let unfinished = sent - complete.copied().unwrap_or(0);
            prop_assert!(
                held <= (unfinished + READ_CHUNK) as i64,
                "after {} of {} bytes, {} of them in an unfinished frame, the connection \
                 holds {} B (bound {} B)",
                sent, stream.len(), unfinished, held, unfinished + READ_CHUNK
            );
        }

        let reason = if let Some(e) = expected.invalid {
            // A lingering close: the ERROR frame, the server's FIN, and the connection kept
            // until ours.
            prop_assert_eq!(&step, &Step::Linger);
            let mut reply = Vec::new();
            peer.read_to_end(&mut reply).unwrap();
            let mut want = Vec::new();
            frame::encode(&mut want, ERROR, e.to_string().as_bytes());
            prop_assert_eq!(reply, want, "the ERROR frame, then EOF, for {:?}", e);
            CloseReason::Protocol
        } else {
            prop_assert_eq!(&step, &Step::Continue);
            CloseReason::PeerEof
        };
        // The peer's FIN ends it; whatever unfinished frame the connection kept is freed.
        peer.shutdown(Shutdown::Write).unwrap();
        let deadline = Instant::now() + WAIT;
        while !matches!(step, Step::Close(_)) {
            prop_assert!(Instant::now() < deadline, "no close after the peer's FIN: {:?}", step);
            thread::yield_now();
            held += allocation_counter::measure(|| {
                step = conn.on_event(&mut io, Readiness::RETRY);
            })
            .bytes_current;
        }
        prop_assert_eq!(step, Step::Close(reason));
        prop_assert_eq!(held, 0, "heap still held once closed");
        let bodies = &io.service.bodies;
        prop_assert_eq!(bodies.len(), expected.bodies.len(), "frame count");
        prop_assert!(*bodies == expected.bodies, "frame bodies differ");
    }
}
