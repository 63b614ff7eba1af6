//! Chaos: a couple of thousand peers, each a seeded random mix of everything a careless or
//! hostile client sends — pipelined ECHO of every size, PING, unknown ops, garbage, `L == 0`,
//! `L > max_frame`, frames cut short, all written in randomly split pieces — and each ending
//! its own way: FIN after its replies, half-close then read to EOF, RST, or gone without
//! reading. A model of the protocol predicts every reply; peers that read check theirs byte
//! for byte, then the server must have counted every close once, be back to its start fds,
//! and never have kept a socket in CLOSE_WAIT longer than the linger bound.
//!
//! Seeded: `CHAOS_SEED=N` replays a run's plans (timing still varies); the seed is printed at
//! the start and in every failure.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use closewait::frame::FrameError;
use closewait::testing::procfs::{self, TCP_CLOSE_WAIT};
use common::seeded;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Peers in the run.
const PEERS: usize = 2000;
/// Peers connected at once.
const CONCURRENCY: usize = 128;
/// `--max-frame` for the run: large frames still span several reads, and the run stays cheap.
const MAX_FRAME: usize = 256 * 1024;
/// Bytes a peer sends after an invalid length at most: what a careless client has in flight,
/// well inside any bound on input a closing server reads and discards.
const MAX_AFTER_INVALID: usize = 64 * 1024;
/// Bytes a peer that does not read while it writes may send: its replies then always fit in
/// the server's output bound, so the server never stops reading it and its writes never block.
const MAX_UNREAD: usize = 256 * 1024;
/// Longest a server socket may stay in CLOSE_WAIT: the default `--linger-timeout`.
const LINGER_BOUND: Duration = Duration::from_secs(5);
/// Peers start only within this time; the run fails if they have not all started by then.
const RUN_LIMIT: Duration = Duration::from_secs(25);
/// How often the watcher samples the server's TCP states.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How a peer ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// Read every predicted reply, then close (FIN).
    Fin,
    /// Half-close after sending, then read every reply and the server's EOF.
    HalfCloseRead,
    /// Close with RST (SO_LINGER 0) after sending, reading nothing.
    Reset,
    /// Close after sending without reading anything (FIN; RST if replies had arrived).
    Abandon,
}

impl End {
    fn reads(self) -> bool {
        matches!(self, End::Fin | End::HalfCloseRead)
    }
}

/// One reply the model predicts.
#[derive(Debug)]
enum Expected {
    /// This frame, byte for byte.
    Frame(Vec<u8>),
    /// A STATS reply: its counters change, so only its op is predictable.
    Stats,
}

/// What the protocol promises for a stream.
struct Model {
    replies: Vec<Expected>,
    /// Offset just past the header of the first invalid length, if any: the server answers
    /// it with an ERROR frame and closes, whatever follows.
    invalid_at: Option<usize>,
}

/// Predict the replies to `stream` from the protocol as documented: frames of `u32` length
/// `1..=max_frame`, ECHO and PING answered, any other op but STATS answered with an ERROR
/// frame, an illegal length answered with an ERROR frame and then the close, an unfinished
/// frame at the end unanswered.
fn model(stream: &[u8]) -> Model {
    let mut replies = Vec::new();
    let mut at = 0;
    while let Some(header) = stream.get(at..at + 4) {
        let len = u32::from_be_bytes(header.try_into().unwrap());
        let refused = match len as usize {
            0 => Some(FrameError::Empty),
            n if n > MAX_FRAME => Some(FrameError::TooLarge {
                len,
                max: MAX_FRAME,
            }),
            _ => None,
        };
        if let Some(e) = refused {
            replies.push(Expected::Frame(frame(ERROR, e.to_string().as_bytes())));
            return Model {
                replies,
                invalid_at: Some(at + 4),
            };
        }
        let Some(body) = stream.get(at + 4..at + 4 + len as usize) else {
            break; // cut short: no reply
        };
        let (op, data) = (body[0], &body[1..]);
        replies.push(match op {
            ECHO => Expected::Frame(frame(ECHO_REPLY, data)),
            PING => Expected::Frame(frame(PING_REPLY, b"")),
            STATS => Expected::Stats,
            // The reference service's text for an unknown op.
            _ => Expected::Frame(frame(ERROR, format!("unknown op 0x{op:02x}").as_bytes())),
        });
        at += 4 + len as usize;
    }
    Model {
        replies,
        invalid_at: None,
    }
}

/// One peer's script.
struct Plan {
    stream: Vec<u8>,
    /// Ascending offsets where the stream is split into separate writes.
    cuts: Vec<usize>,
    end: End,
    /// A reading peer that reads only once it has sent everything (else it reads while it
    /// writes). The server then still holds replies when the rest of the input arrives.
    read_late: bool,
    model: Model,
}

impl Plan {
    fn new(rng: &mut StdRng) -> Plan {
        let end = match rng.random_range(0..4) {
            0 => End::Fin,
            1 => End::HalfCloseRead,
            2 => End::Reset,
            _ => End::Abandon,
        };
        let read_late = end.reads() && rng.random_bool(0.5);
        // Half the peers are honest (maybe careless at the end); the rest misbehave.
        let hostile = rng.random_bool(0.5);
        let mut stream = Vec::new();
        if hostile && rng.random_bool(0.3) {
            // A large reply still on its way when an invalid length arrives: the case where
            // closing with unread input destroys replies already written.
            let mut data = vec![0; rng.random_range(64 * 1024..MAX_FRAME)];
            rng.fill(&mut data[..]);
            stream.extend(frame(ECHO, &data));
        }
        for _ in 0..rng.random_range(1..=12) {
            match rng.random_range(0..100) {
                0..45 => {
                    let len = match rng.random_range(0..100) {
                        0..70 => rng.random_range(0..64),
                        70..90 => rng.random_range(64..4096),
                        90..98 => rng.random_range(4096..100_000),
                        _ => rng.random_range(100_000..MAX_FRAME), // up to exactly max_frame
                    };
                    let mut data = vec![0; len];
                    rng.fill(&mut data[..]);
                    stream.extend(frame(ECHO, &data));
                }
                45..75 => stream.extend(frame(PING, b"")),
                75..85 => {
                    let op = loop {
                        let op: u8 = rng.random();
                        if !matches!(op, ECHO | PING | STATS) {
                            break op;
                        }
                    };
                    let mut data = vec![0; rng.random_range(0..32)];
                    rng.fill(&mut data[..]);
                    stream.extend(frame(op, &data));
                }
                85..90 if hostile => stream.extend([0, 0, 0, 0]),
                90..95 if hostile => {
                    let len = rng.random_range(MAX_FRAME as u32 + 1..=u32::MAX);
                    stream.extend(len.to_be_bytes());
                }
                95..100 if hostile => {
                    let mut garbage = vec![0; rng.random_range(1..64)];
                    rng.fill(&mut garbage[..]);
                    stream.extend(garbage);
                }
                _ => stream.extend(frame(PING, b"")),
            }
        }
        if rng.random_bool(0.2) {
            // End mid-frame: inside the header, or inside the body.
            let mut data = vec![0; rng.random_range(1..2000)];
            rng.fill(&mut data[..]);
            let whole = frame(ECHO, &data);
            stream.extend(&whole[..rng.random_range(1..whole.len())]);
        }
        let invalid_at = model(&stream).invalid_at;
        if let Some(at) = invalid_at {
            stream.truncate(at + rng.random_range(0..=MAX_AFTER_INVALID));
        }
        if !end.reads() || read_late {
            stream.truncate(MAX_UNREAD);
        }
        let mut cuts: Vec<usize> = (0..rng.random_range(0..8))
            .map(|_| rng.random_range(0..=stream.len()))
            .collect();
        if let Some(at) = invalid_at.filter(|&at| at < stream.len()) {
            // Often the bytes after an invalid length come in a later write, as from a
            // client that pipelines without waiting: the server has stopped reading by then.
            if rng.random_bool(0.5) {
                cuts.push(at);
            }
        }
        cuts.sort_unstable();
        let model = model(&stream);
        Plan {
            stream,
            cuts,
            end,
            read_late,
            model,
        }
    }

    /// Its kind, for the summary: the end, and whether the stream has an invalid length with
    /// bytes after it (input the server may not have read when it decides to close).
    fn kind(&self) -> (End, &'static str) {
        let shape = match self.model.invalid_at {
            None => "valid frames only",
            Some(at) if at == self.stream.len() => "invalid length last",
            Some(_) => "invalid length, more bytes after",
        };
        (self.end, shape)
    }
}

/// Run one peer; `Err` says what differed from the model.
fn run_peer(addr: SocketAddr, plan: &Plan, rng: &mut StdRng) -> Result<(), String> {
    let (stream, reader) = seeded::peer_stream(addr)?;
    let (written, all_written) = mpsc::channel();
    thread::scope(|scope| {
        let replies = plan.end.reads().then(|| {
            scope.spawn(move || {
                if plan.read_late {
                    let _ = all_written.recv();
                }
                check_replies(reader, plan)
            })
        });
        // Writes may fail once the server has closed after an invalid length; what the peer
        // then receives is the reader's to judge.
        let _ = write_in_pieces(&stream, plan, rng);
        match plan.end {
            End::HalfCloseRead => {
                let _ = stream.shutdown(Shutdown::Write);
            }
            End::Reset => {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            End::Fin | End::Abandon => {}
        }
        let _ = written.send(());
        let verdict = match replies {
            Some(reader) => reader.join().expect("reader thread"),
            None => Ok(()),
        };
        drop(stream);
        verdict
    })
}

fn write_in_pieces(mut stream: &TcpStream, plan: &Plan, rng: &mut StdRng) -> io::Result<()> {
    let mut from = 0;
    for &to in plan.cuts.iter().chain(std::iter::once(&plan.stream.len())) {
        stream.write_all(&plan.stream[from..to])?;
        from = to;
        // Shape the traffic so the pieces reach the server in separate reads.
        if rng.random_bool(0.3) {
            thread::sleep(Duration::from_micros(rng.random_range(0..2000)));
        }
    }
    Ok(())
}

/// Read every predicted reply and compare it; then, if the server is to close (invalid
/// length, or the peer half-closed), its EOF.
fn check_replies(mut stream: TcpStream, plan: &Plan) -> Result<(), String> {
    let model = &plan.model;
    let mut got = 0usize;
    for (i, want) in model.replies.iter().enumerate() {
        let mut header = [0u8; 4];
        let mut body = Vec::new();
        let read = stream.read_exact(&mut header).and_then(|()| {
            body.resize(u32::from_be_bytes(header) as usize, 0);
            stream.read_exact(&mut body)
        });
        if let Err(e) = read {
            return Err(format!(
                "reply {i} of {}: {e} after {got} reply bytes",
                model.replies.len()
            ));
        }
        got += 4 + body.len();
        let ok = match want {
            Expected::Frame(frame) => frame[..4] == header && frame[4..] == body,
            Expected::Stats => body.first() == Some(&STATS_REPLY),
        };
        if !ok {
            let want = match want {
                Expected::Frame(frame) => format!("{:?}", &frame[..frame.len().min(44)]),
                Expected::Stats => "a STATS reply".into(),
            };
            return Err(format!(
                "reply {i} differs: expected {want}, got header {header:?} body {} B {:?}",
                body.len(),
                &body[..body.len().min(40)]
            ));
        }
    }
    if model.invalid_at.is_some() || plan.end == End::HalfCloseRead {
        seeded::expect_eof(&stream)?;
    }
    Ok(())
}

/// Samples the server's sockets and remembers each CLOSE_WAIT socket's first sighting.
struct Watcher {
    first_seen: HashMap<u64, Instant>,
    longest: Duration,
}

impl Watcher {
    fn sample(&mut self, pid: u32) {
        let Ok(rows) = procfs::tcp_rows(pid) else {
            return;
        };
        let now = Instant::now();
        let waiting: Vec<u64> = rows
            .iter()
            .filter(|r| r.state == TCP_CLOSE_WAIT)
            .map(|r| r.inode)
            .collect();
        self.first_seen.retain(|inode, _| waiting.contains(inode));
        for inode in waiting {
            let since = *self.first_seen.entry(inode).or_insert(now);
            self.longest = self.longest.max(now - since);
        }
    }
}

#[test]
fn thousands_of_chaotic_peers_get_every_promised_reply_and_leave_nothing_behind() {
    let seed = seeded::run_seed("CHAOS_SEED", "chaos");

    let max_frame = MAX_FRAME.to_string();
    let server = Server::start(&["--max-frame", &max_frame]);
    let baseline = server.fds();
    let mut observer = server.connect();
    observer.ping();

    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let kinds = Mutex::new(BTreeMap::<(End, &str), (usize, usize)>::new());
    let started = Instant::now();
    let mut watcher = Watcher {
        first_seen: HashMap::new(),
        longest: Duration::ZERO,
    };
    let (addr, pid) = (server.addr, server.pid());
    thread::scope(|scope| {
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                scope.spawn(|| loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= PEERS || started.elapsed() > RUN_LIMIT {
                        return;
                    }
                    let mut rng = StdRng::seed_from_u64(seeded::peer_seed(seed, index));
                    let plan = Plan::new(&mut rng);
                    let verdict = run_peer(addr, &plan, &mut rng);
                    let mut kinds = kinds.lock().unwrap();
                    let tally = kinds.entry(plan.kind()).or_default();
                    tally.0 += 1;
                    if let Err(why) = verdict {
                        tally.1 += 1;
                        failures.lock().unwrap().push(format!(
                            "peer {index} ({:?}, {}, {} B in {} writes, {} replies): {why}",
                            plan.end,
                            plan.kind().1,
                            plan.stream.len(),
                            plan.cuts.len() + 1,
                            plan.model.replies.len()
                        ));
                    }
                })
            })
            .collect();
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                watcher.sample(pid);
                thread::sleep(SAMPLE_EVERY);
            }
        });
        for worker in workers {
            worker.join().expect("peer worker");
        }
        done.store(true, Ordering::Relaxed);
    });
    let ran = next.load(Ordering::Relaxed).min(PEERS);
    let elapsed = started.elapsed();

    let summary: Vec<String> = kinds
        .lock()
        .unwrap()
        .iter()
        .map(|((end, shape), (peers, failed))| {
            format!("{end:?}, {shape}: {failed} of {peers} failed")
        })
        .collect();
    eprintln!(
        "chaos: {ran} peers in {elapsed:.1?}; longest CLOSE_WAIT {:?}\n  {}",
        watcher.longest,
        summary.join("\n  ")
    );
    let failures = failures.into_inner().unwrap();
    seeded::assert_every_peer_as_modelled(seed, &failures, ran, PEERS, RUN_LIMIT);

    // Every peer has closed its side: the server must have closed every connection, each
    // counted once under one reason.
    let mut stats = observer.stats();
    let all_closed = wait_until(WAIT, || {
        stats = observer.stats();
        stats["active"] == 1
    });
    assert!(all_closed, "seed {seed}: connections left open: {stats:?}");
    let closed = closed_total(&stats);
    assert_eq!(
        stats["accepted"],
        PEERS as u64 + 1,
        "seed {seed}: {stats:?}"
    );
    assert_eq!(
        closed + stats["rejected"],
        stats["accepted"] - stats["active"],
        "seed {seed}: closes counted != accepted - active: {stats:?}"
    );
    // No peer idles, stalls, trickles or comes near the memory budget; nothing is left
    // lingering or buffered once all are gone.
    for name in [
        "closed_error",
        "closed_idle",
        "closed_write_stall",
        "closed_shutdown",
        "closed_frame_timeout",
        "closed_memory",
        "lingering",
        "buffered_bytes",
    ] {
        assert_eq!(stats[name], 0, "seed {seed}: {name}: {stats:?}");
    }
    // Each reading peer's close reason is known; the others' depends on timing (an RST can
    // overtake the server's reading of an invalid length).
    let kinds = kinds.into_inner().unwrap();
    let count = |pick: &dyn Fn(End, &str) -> bool| -> u64 {
        kinds
            .iter()
            .filter(|((end, shape), _)| pick(*end, shape))
            .map(|(_, (peers, _))| *peers as u64)
            .sum()
    };
    let valid = |shape: &str| shape == "valid frames only";
    let readers_valid = count(&|end, shape| end.reads() && valid(shape));
    let readers_invalid = count(&|end, shape| end.reads() && !valid(shape));
    let any_invalid = count(&|_, shape| !valid(shape));
    assert!(
        stats["closed_eof"] >= readers_valid,
        "seed {seed}: {readers_valid} reading peers sent only valid frames: {stats:?}"
    );
    assert!(
        (readers_invalid..=any_invalid).contains(&stats["closed_protocol"]),
        "seed {seed}: {readers_invalid} reading peers of {any_invalid} sent an invalid length: \
         {stats:?}"
    );
    observer.echo(b"the server survived");

    server.wait_for_fds(baseline + 1);
    watcher.sample(pid);
    assert!(
        watcher.longest <= LINGER_BOUND,
        "seed {seed}: a socket stayed in CLOSE_WAIT for {:?} (bound {LINGER_BOUND:?})",
        watcher.longest
    );
}
