//! `loadtest limit-server` is correct for the reference protocol: split frames are kept until
//! complete, pipelined frames are all answered, EOF closes, an invalid length is answered with
//! ERROR and closed. Every test is bounded by socket timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ECHO: u8 = 0x01;
const PING: u8 = 0x02;

/// The server process; killed when dropped.
struct Limit {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Limit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Limit {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["limit-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start limit-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("expected `listening on ADDR`, got {line:?}"))
        .parse()
        .expect("address");
    Limit { child, addr }
}

fn connect(server: &Limit) -> TcpStream {
    let s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut f = (data.len() as u32 + 1).to_be_bytes().to_vec();
    f.push(op);
    f.extend_from_slice(data);
    f
}

/// Read one reply frame: (op, data).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reply length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("reply body");
    (body[0], body[1..].to_vec())
}

/// Read until EOF (bounded by the read timeout): what the server sent before closing.
fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server should close (EOF), not time out or reset");
    rest
}

#[test]
fn a_frame_split_at_every_byte_is_answered_once_whole() {
    let server = start();
    let mut s = connect(&server);
    s.set_nodelay(true).unwrap();
    let request = frame(ECHO, b"split me");
    for i in 0..request.len() {
        s.write_all(&request[i..i + 1]).unwrap();
        // Give the server a readiness per byte, so each byte is its own read.
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_frame(&mut s), (0x81, b"split me".to_vec()));
    s.write_all(&frame(PING, &[])).unwrap();
    assert_eq!(
        read_frame(&mut s),
        (0x82, Vec::new()),
        "the connection went on"
    );
}

#[test]
fn pipelined_frames_are_all_answered_in_order() {
    let server = start();
    let mut s = connect(&server);
    let mut burst = Vec::new();
    for i in 0..100u8 {
        burst.extend(frame(ECHO, &[i; 64]));
    }
    burst.extend(frame(PING, &[]));
    s.write_all(&burst).unwrap();
    for i in 0..100u8 {
        assert_eq!(read_frame(&mut s), (0x81, vec![i; 64]), "reply {i}");
    }
    assert_eq!(read_frame(&mut s).0, 0x82);
}

#[test]
fn eof_closes_the_connection_after_its_replies() {
    let server = start();
    let mut s = connect(&server);
    let mut requests = frame(PING, &[]);
    requests.extend(frame(ECHO, b"last"));
    s.write_all(&requests).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut want = frame(0x82, &[]);
    want.extend(frame(0x81, b"last"));
    assert_eq!(
        read_to_eof(&mut s),
        want,
        "both replies, then the server's FIN"
    );
}

#[test]
fn an_invalid_length_is_answered_with_error_then_closed() {
    let server = start();
    for len in [0u32, (1 << 20) + 1] {
        let mut s = connect(&server);
        s.write_all(&len.to_be_bytes()).unwrap();
        let reply = read_to_eof(&mut s);
        assert!(
            reply.len() > 5 && reply[4] == 0xFF,
            "length {len}: expected an ERROR frame then EOF, got {reply:?}"
        );
        let text = String::from_utf8_lossy(&reply[5..]);
        assert!(text.contains("length"), "length {len}: message {text:?}");
    }
    // The server is still serving others.
    let mut s = connect(&server);
    s.write_all(&frame(PING, &[])).unwrap();
    assert_eq!(read_frame(&mut s).0, 0x82);
}
