//! The loop's bounds hold whatever the codec: a codec that never refuses anything (a line
//! codec waiting for `\n`, with no limit of its own) still cannot make a connection hold more
//! than `max_frame` bytes of one request, nor take longer than the frame timeout to finish
//! one, and its own error format carries the loop's refusals.

use std::io::{Read, Write};
use std::time::Duration;

use closewait::stats::Counter;
use closewait::testing::{wait_until, TestServer, WAIT};
use closewait::{Codec, Config, Context, Decoded, Reply, Service};

/// Requests are lines; no line is ever too long for it (the loop's job). Errors are `-` lines.
#[derive(Default)]
struct Lines;

impl Codec for Lines {
    type Request<'a> = &'a [u8];
    type Error = std::convert::Infallible;

    fn decode<'a>(&mut self, buf: &'a [u8], _: usize) -> Decoded<&'a [u8], Self::Error> {
        match buf.iter().position(|&b| b == b'\n') {
            Some(end) => Decoded::Request {
                request: &buf[..end],
                used: end + 1,
            },
            None => Decoded::Incomplete { need: None },
        }
    }

    fn encode_error(out: &mut Vec<u8>, message: &str) {
        out.extend_from_slice(format!("-{message}\n").as_bytes());
    }
}

/// Echoes each line back with a `+`.
struct Echo;

impl Service for Echo {
    type Codec = Lines;
    type Session = ();

    fn call(&mut self, line: &[u8], _: &mut (), reply: &mut Reply<'_, Lines>, _: &Context<'_>) {
        reply.append(|out| {
            out.push(b'+');
            out.extend_from_slice(line);
            out.push(b'\n');
        });
    }
}

const MAX: usize = 1024;

fn start(frame_timeout: Option<Duration>) -> TestServer {
    TestServer::start_with(
        Config {
            max_frame: MAX,
            frame_timeout,
            ..Config::default()
        },
        || Echo,
    )
}

/// Everything the server sends until it closes.
fn read_to_eof(stream: &mut std::net::TcpStream) -> String {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("the server closes");
    text
}

#[test]
fn a_request_longer_than_max_frame_is_refused_by_the_loop_in_the_codecs_format() {
    let server = start(None);
    let mut client = std::net::TcpStream::connect(server.addr()).unwrap();
    client.write_all(b"short\n").unwrap();
    // Split across writes, so the unfinished line is held between reads.
    for _ in 0..4 {
        client.write_all(&[b'x'; MAX / 2]).unwrap();
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let text = read_to_eof(&mut client);
    assert!(text.starts_with("+short\n-invalid request: "), "{text:?}");
    assert!(
        text.ends_with(&format!("exceed max_frame {MAX}\n")),
        "{text:?}"
    );
    let stats = server.handle().stats();
    // The reason is counted a moment after `active` drops: wait for the reason.
    assert!(
        wait_until(WAIT, || stats.get(Counter::ClosedProtocol) == 1),
        "not closed as a protocol error"
    );
    assert_eq!(stats.get(Counter::Active), 0);
}

#[test]
fn an_unfinished_request_of_any_codec_meets_the_frame_deadline() {
    let server = start(Some(Duration::from_secs(1)));
    let mut client = std::net::TcpStream::connect(server.addr()).unwrap();
    client.write_all(b"no newline yet").unwrap();
    let text = read_to_eof(&mut client);
    assert_eq!(text, "-frame not completed in 1 s\n");
    drop(client); // the lingering close waits for our FIN
    let stats = server.handle().stats();
    assert!(
        wait_until(WAIT, || stats.get(Counter::ClosedFrameTimeout) == 1),
        "not closed at the frame deadline"
    );
    assert_eq!(stats.get(Counter::Active), 0);
}
