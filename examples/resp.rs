//! A small key-value server in the Redis protocol (RESP2) on closewait: a codec of its own,
//! and clients nobody here wrote (`redis-cli`, `redis-benchmark`) talking to it unchanged.
//!
//! The codec, [`Resp`], cuts requests out of the stream in both of the forms Redis accepts:
//! multibulk (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`, what every client library sends) and inline
//! (`PING\r\n`, what a person types into telnet). The service, [`Redis`], answers PING,
//! ECHO, GET, SET, DEL, INCR and QUIT, and an error for any other command. The store is
//! shared by all workers and bounded ([`MAX_KEYS`]; values by `--max-frame`).
//!
//! Everything else is closewait's: the connection cap, backpressure for clients that do not
//! read, idle and request deadlines, the memory budget, and closing on the peer's FIN.
//!
//! ```sh
//! cargo run --release --example resp -- --listen 127.0.0.1:6379
//! redis-cli -p 6379 SET greeting hello
//! redis-benchmark -p 6379 -t ping,set,get,incr -P 16 -q
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use clap::Parser;
use closewait::{Codec, Context, Decoded, Reply, Server, Service};

/// Most keys the store holds: a client must not be able to grow our memory without bound.
const MAX_KEYS: usize = 100_000;
/// Longest inline request line, as Redis (`PROTO_INLINE_MAX_SIZE`).
const MAX_INLINE: usize = 64 * 1024;
/// Most arguments of one multibulk request, as Redis.
const MAX_ARGS: i64 = 1024 * 1024;
/// Longest `*N` or `$N` header line we wait for before calling it garbage.
const MAX_HEADER_LINE: usize = 32;

// ---------------------------------------------------------------------------------------
// The codec: bytes -> one command, and how errors look on the wire.
// ---------------------------------------------------------------------------------------

/// RESP2 requests (inline and multibulk); replies are written by [`RespReply`].
#[derive(Default)]
pub struct Resp;

/// One request: its arguments, still in the received bytes (decoding allocates nothing).
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// Inline: the line. Multibulk: the `$len\r\ndata\r\n` items, already validated.
    raw: &'a [u8],
    argc: usize,
    inline: bool,
}

impl<'a> Command<'a> {
    /// Number of arguments, the command name included (0 for an empty request).
    pub fn len(&self) -> usize {
        self.argc
    }

    /// Whether the request has no arguments at all (an empty line, `*0`).
    pub fn is_empty(&self) -> bool {
        self.argc == 0
    }

    /// The arguments, the command name first.
    pub fn args(&self) -> Args<'a> {
        Args {
            rest: self.raw,
            left: self.argc,
            inline: self.inline,
        }
    }
}

/// Iterator over a [`Command`]'s arguments.
pub struct Args<'a> {
    rest: &'a [u8],
    left: usize,
    inline: bool,
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.inline {
            let start = self.rest.iter().position(|b| !b.is_ascii_whitespace())?;
            let rest = &self.rest[start..];
            let end = rest
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            self.rest = &rest[end..];
            return Some(&rest[..end]);
        }
        // `$len\r\n` then len bytes then `\r\n`: checked by `decode`, so only re-walked here.
        let (len, at) = header(self.rest, 1)?;
        let arg = &self.rest[at..at + len as usize];
        self.rest = &self.rest[at + len as usize + 2..];
        Some(arg)
    }
}

/// Why a stream is not RESP; the text is what Redis itself answers.
#[derive(Debug)]
pub enum RespError {
    /// A header line that is not a number in range.
    Length(&'static str),
    /// A multibulk item that does not start with `$`.
    Expected(u8),
    /// A bulk argument not followed by CRLF.
    MissingCrlf,
    /// An inline line longer than [`MAX_INLINE`] with no end in sight.
    InlineTooLong,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Length(what) => write!(f, "Protocol error: invalid {what} length"),
            RespError::Expected(got) => {
                write!(
                    f,
                    "Protocol error: expected '$', got '{}'",
                    got.escape_ascii()
                )
            }
            RespError::MissingCrlf => f.write_str("Protocol error: bulk not followed by CRLF"),
            RespError::InlineTooLong => f.write_str("Protocol error: too big inline request"),
        }
    }
}

impl Codec for Resp {
    type Request<'a> = Command<'a>;
    type Error = RespError;

    fn decode<'a>(&mut self, buf: &'a [u8], max_request: usize) -> Decoded<Command<'a>, RespError> {
        match buf.first() {
            None => Decoded::Incomplete { need: None },
            Some(b'*') => decode_multibulk(buf, max_request),
            Some(_) => decode_inline(buf),
        }
    }

    fn encode_error(out: &mut Vec<u8>, message: &str) {
        // An error reply is one line: a message must not end it early.
        out.extend_from_slice(b"-ERR ");
        out.extend(
            message
                .bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }
}

/// `*N\r\n` then N bulk strings `$len\r\ndata\r\n`.
fn decode_multibulk(buf: &[u8], max_request: usize) -> Decoded<Command<'_>, RespError> {
    let incomplete = Decoded::Incomplete { need: None };
    let (argc, start) = match header_line(buf, 1, "multibulk") {
        Ok(Some(found)) => found,
        Ok(None) => return incomplete,
        Err(e) => return Decoded::Invalid(e),
    };
    if argc > MAX_ARGS {
        return Decoded::Invalid(RespError::Length("multibulk"));
    }
    let argc = argc.max(0) as usize; // `*0` and `*-1` are empty requests, as in Redis
    let mut at = start;
    for _ in 0..argc {
        match buf.get(at) {
            None => return incomplete,
            Some(b'$') => {}
            Some(&other) => return Decoded::Invalid(RespError::Expected(other)),
        }
        let (len, data) = match header_line(buf, at + 1, "bulk") {
            Ok(Some((len, data))) if usize::try_from(len).is_ok_and(|len| len <= max_request) => {
                (len, data)
            }
            Ok(Some(_)) => return Decoded::Invalid(RespError::Length("bulk")),
            Ok(None) => return incomplete,
            Err(e) => return Decoded::Invalid(e),
        };
        let end = data + len as usize;
        // The length is known: tell the loop, so a large value is copied once, not per read.
        let Some(crlf) = buf.get(end..end + 2) else {
            return Decoded::Incomplete {
                need: Some(end + 2),
            };
        };
        if crlf != b"\r\n" {
            return Decoded::Invalid(RespError::MissingCrlf);
        }
        at = end + 2;
    }
    Decoded::Request {
        request: Command {
            raw: &buf[start..at],
            argc,
            inline: false,
        },
        used: at,
    }
}

/// A line of words separated by spaces, ended by `\n` (or `\r\n`).
fn decode_inline(buf: &[u8]) -> Decoded<Command<'_>, RespError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Decoded::Invalid(RespError::InlineTooLong)
        } else {
            Decoded::Incomplete { need: None }
        };
    };
    let line = &buf[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let argc = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|word| !word.is_empty())
        .count();
    Decoded::Request {
        request: Command {
            raw: line,
            argc,
            inline: true,
        },
        used: newline + 1,
    }
}

/// The number in the `\r\n`-terminated line starting at `buf[from]`, and where the next line
/// starts; `None` if the line is not complete yet.
fn header_line(
    buf: &[u8],
    from: usize,
    what: &'static str,
) -> Result<Option<(i64, usize)>, RespError> {
    let rest = buf.get(from..).unwrap_or_default();
    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
        return if rest.len() > MAX_HEADER_LINE {
            Err(RespError::Length(what))
        } else {
            Ok(None)
        };
    };
    std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|digits| digits.parse().ok())
        .map(|n| Some((n, from + end + 2)))
        .ok_or(RespError::Length(what))
}

/// [`header_line`] for input already validated by `decode`.
fn header(buf: &[u8], from: usize) -> Option<(i64, usize)> {
    header_line(buf, from, "bulk").ok().flatten()
}

/// RESP2 replies, on closewait's [`Reply`] (through [`Reply::append`]).
pub trait RespReply {
    /// `+text\r\n`, e.g. `+OK`.
    fn simple(&mut self, text: &str);
    /// `$len\r\ndata\r\n`.
    fn bulk(&mut self, data: &[u8]);
    /// `$-1\r\n`: no such key.
    fn null(&mut self);
    /// `:n\r\n`.
    fn integer(&mut self, n: i64);
}

impl RespReply for Reply<'_, Resp> {
    fn simple(&mut self, text: &str) {
        self.append(|out| {
            out.push(b'+');
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
    }

    fn bulk(&mut self, data: &[u8]) {
        self.append(|out| {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "${}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        });
    }

    fn null(&mut self) {
        self.append(|out| out.extend_from_slice(b"$-1\r\n"));
    }

    fn integer(&mut self, n: i64) {
        self.append(|out| {
            let _ = write!(out, ":{n}\r\n");
        });
    }
}

// ---------------------------------------------------------------------------------------
// The service: what each command means.
// ---------------------------------------------------------------------------------------

/// Values by key, shared by every worker.
pub type Store = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

/// One worker's service: a handle on the shared store.
pub struct Redis {
    /// The keys and values.
    pub store: Store,
}

impl Service for Redis {
    type Codec = Resp;
    type Session = ();

    fn call(
        &mut self,
        command: Command<'_>,
        _: &mut (),
        reply: &mut Reply<'_, Resp>,
        _: &Context<'_>,
    ) {
        let mut args = command.args();
        let Some(name) = args.next() else {
            return; // an empty line or `*0`: Redis answers nothing
        };
        let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
        let arity = command.len() - 1;
        let (a, b) = (args.next(), args.next());
        match (a, b) {
            _ if is("PING") && arity == 0 => reply.simple("PONG"),
            (Some(message), None) if is("PING") || is("ECHO") => reply.bulk(message),
            (Some(key), None) if is("GET") => match self.lock().get(key) {
                Some(value) => reply.bulk(value),
                None => reply.null(),
            },
            (Some(key), Some(value)) if is("SET") && arity == 2 => self.set(key, value, reply),
            (Some(first), _) if is("DEL") => {
                let mut store = self.lock();
                let removed = [first]
                    .into_iter()
                    .chain(b)
                    .chain(args)
                    .filter(|key| store.remove(*key).is_some())
                    .count();
                reply.integer(removed as i64);
            }
            (Some(key), None) if is("INCR") => self.incr(key, reply),
            _ if is("QUIT") => {
                reply.simple("OK");
                reply.close();
            }
            _ if ["PING", "ECHO", "GET", "SET", "DEL", "INCR"]
                .iter()
                .any(|c| is(c)) =>
            {
                reply.error(format_args!(
                    "wrong number of arguments for '{}' command",
                    name.to_ascii_lowercase().escape_ascii()
                ))
            }
            _ => reply.error(format_args!("unknown command '{}'", name.escape_ascii())),
        }
    }
}

impl Redis {
    fn set(&self, key: &[u8], value: &[u8], reply: &mut Reply<'_, Resp>) {
        let mut store = self.lock();
        if let Some(old) = store.get_mut(key) {
            old.clear();
            old.extend_from_slice(value);
        } else if store.len() >= MAX_KEYS {
            // The store is full: an ordinary answer, not the client's fault, so not logged.
            return reply.answer_error(format_args!("store full ({MAX_KEYS} keys)"));
        } else {
            store.insert(key.to_vec(), value.to_vec());
        }
        reply.simple("OK");
    }

    fn incr(&self, key: &[u8], reply: &mut Reply<'_, Resp>) {
        let mut store = self.lock();
        let current = match store.get(key) {
            None => 0,
            Some(value) => match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
            {
                Some(n) => n,
                // As Redis: an answer about the stored value, not a malformed request.
                None => return reply.answer_error("value is not an integer or out of range"),
            },
        };
        let Some(next) = current.checked_add(1) else {
            return reply.answer_error("increment or decrement would overflow");
        };
        if !store.contains_key(key) && store.len() >= MAX_KEYS {
            return reply.answer_error(format_args!("store full ({MAX_KEYS} keys)"));
        }
        store.insert(key.to_vec(), next.to_string().into_bytes());
        reply.integer(next);
    }

    /// The map stays consistent even if another worker panicked holding the lock (each
    /// update is one insert or remove), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Vec<u8>>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `resp` command line: every closewait server flag.
#[derive(Parser)]
#[command(
    name = "resp",
    about = "A small Redis-protocol key-value server on closewait"
)]
struct RespArgs {
    #[command(flatten)]
    server: closewait::cli::ServerArgs,
}

fn main() -> ExitCode {
    let args = RespArgs::parse();
    closewait::cli::init_logging();
    let store = Store::default();
    closewait::cli::serve(Server::with_service(args.server.to_config(), move || {
        Redis {
            store: store.clone(),
        }
    }))
}

/// The codec and the service without a socket: `closewait::testing::respond` feeds bytes
/// through the codec to the service and returns what a connection would send back.
/// `cargo test` runs these through tests/example_resp.rs, which also runs the real clients.
#[cfg(test)]
mod tests {
    use super::*;
    use closewait::testing::respond;

    fn redis() -> Redis {
        Redis {
            store: Store::default(),
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn multibulk_and_inline_requests_mean_the_same() {
        let mut r = redis();
        assert_eq!(text(respond(&mut r, b"*1\r\n$4\r\nPING\r\n")), "+PONG\r\n");
        assert_eq!(text(respond(&mut r, b"PING\r\n")), "+PONG\r\n");
        assert_eq!(text(respond(&mut r, b"echo  hi\n")), "$2\r\nhi\r\n");
        assert_eq!(
            text(respond(&mut r, b"*2\r\n$4\r\nECHO\r\n$5\r\na\r\nb!\r\n")),
            "$5\r\na\r\nb!\r\n",
            "a bulk argument may hold CRLF"
        );
    }

    #[test]
    fn set_get_incr_del() {
        let mut r = redis();
        let out = respond(
            &mut r,
            b"SET k 41\r\nINCR k\r\nGET k\r\nDEL k nope\r\nGET k\r\nINCR n\r\n",
        );
        assert_eq!(text(out), "+OK\r\n:42\r\n$2\r\n42\r\n:1\r\n$-1\r\n:1\r\n");
        let out = respond(&mut r, b"SET s abc\r\nINCR s\r\n");
        assert_eq!(
            text(out),
            "+OK\r\n-ERR value is not an integer or out of range\r\n"
        );
    }

    #[test]
    fn unknown_commands_and_wrong_arity_are_errors_and_the_stream_goes_on() {
        let out = respond(&mut redis(), b"FLUSHALL\r\nGET\r\nPING\r\n");
        assert_eq!(
            text(out),
            "-ERR unknown command 'FLUSHALL'\r\n\
             -ERR wrong number of arguments for 'get' command\r\n+PONG\r\n"
        );
    }

    #[test]
    fn quit_answers_then_nothing_after_it() {
        assert_eq!(text(respond(&mut redis(), b"QUIT\r\nPING\r\n")), "+OK\r\n");
    }

    #[test]
    fn garbage_gets_the_protocol_error_redis_sends() {
        let out = respond(&mut redis(), b"*1\r\n+PING\r\n");
        assert_eq!(text(out), "-ERR Protocol error: expected '$', got '+'\r\n");
        let out = respond(&mut redis(), b"*x\r\n");
        assert_eq!(
            text(out),
            "-ERR Protocol error: invalid multibulk length\r\n"
        );
    }

    /// Where reads split a stream never changes what it means.
    #[test]
    fn every_split_of_a_request_is_incomplete_until_its_last_byte() {
        let stream = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n";
        for end in 0..stream.len() {
            assert!(
                matches!(
                    Resp.decode(&stream[..end], 1 << 20),
                    Decoded::Incomplete { .. }
                ),
                "prefix of {end} bytes"
            );
        }
        let Decoded::Request { request, used } = Resp.decode(stream, 1 << 20) else {
            panic!("the whole request did not decode");
        };
        assert_eq!(used, stream.len());
        let args: Vec<&[u8]> = request.args().collect();
        assert_eq!(args, [&b"SET"[..], b"k", b"value"]);
    }

    /// Decode `stream` as a connection would when reads split it at `cuts`: keep the
    /// unfinished tail, append the next read, decode every whole request. The arguments of
    /// each request, and whether the stream was refused.
    fn feed(stream: &[u8], cuts: &[usize]) -> (Vec<Vec<Vec<u8>>>, bool) {
        let (mut pending, mut requests, mut from) = (Vec::new(), Vec::new(), 0);
        for &to in cuts.iter().chain([stream.len()].iter()) {
            pending.extend_from_slice(&stream[from..to]);
            from = to;
            let mut at = 0;
            loop {
                match Resp.decode(&pending[at..], 1 << 20) {
                    Decoded::Request { request, used } => {
                        requests.push(request.args().map(<[u8]>::to_vec).collect());
                        at += used;
                    }
                    Decoded::Incomplete { .. } => break,
                    Decoded::Invalid(_) => return (requests, true),
                }
            }
            pending.drain(..at);
        }
        (requests, false)
    }

    #[test]
    fn every_split_of_a_pipelined_stream_decodes_like_the_stream_in_one_piece() {
        let stream: &[u8] = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nv\r\nw\r\n\
            PING\r\n\r\n*0\r\necho  a b\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n*1\r\n+x";
        let whole = feed(stream, &[]);
        assert_eq!(whole.0.len(), 6, "{whole:?}");
        assert!(whole.1, "the stream ends with garbage");
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                assert_eq!(feed(stream, &[a, b]), whole, "splits at {a}, {b}");
            }
        }
    }

    #[test]
    fn a_bulk_length_over_the_limit_is_refused_on_its_header() {
        assert!(matches!(
            Resp.decode(b"*1\r\n$99999\r\n", 1024),
            Decoded::Invalid(RespError::Length("bulk"))
        ));
    }
}
