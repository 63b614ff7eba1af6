//! Chaos on the deferred bound: a hundred peers of the pool example, each a seeded
//! random plan of SLEEP (deferred to the pool, 0-3 ms), LOST (its handle dropped: ERROR),
//! PING and ECHO (answered at once, held behind waiting ones), some sent as floods of up to
//! two hundred small frames in one write so that one read crosses `MAX_WAITING`, all cut
//! into pieces that often split a frame. That is the path where the loop stops calling the
//! service in the middle of a read, keeps the rest unparsed in the connection and answers it
//! when a completion brings the connection under the bound.
//!
//! Every peer checks its replies byte for byte and in request order against a model, and
//! the server's EOF when it half-closed. A wrapper around the pool's service checks the
//! bound per connection as it is called: a SLEEP of `ms` called at `t` cannot have completed
//! before `t + ms`, so requests still inside their sleep are certainly waiting, and never
//! may `MAX_WAITING` of them wait when another is deferred. The frame timeout is shorter than
//! stashed requests wait for the busy pool: whole requests waiting for the service are not
//! an unfinished frame. At the end every job and request is counted once, every connection
//! closed on its peer's EOF, no fd and no CLOSE_WAIT socket is left, and the server stops
//! cleanly.
//!
//! Seeded: `POOL_CHAOS_SEED=N` replays a run's plans (timing still varies); the seed is
//! printed at the start and in every failure.

#[allow(dead_code)]
#[path = "../examples/pool.rs"]
mod pool;

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use closewait::deferred::DROPPED;
use closewait::service::{ECHO, ECHO_REPLY, ERROR, PING, PING_REPLY};
use closewait::stats::Counter as Stat;
use closewait::testing::{frame, own_fds, wait_until, TestServer, WAIT};
use closewait::{CloseReason, Config, Context, LengthPrefixed, Reply, Server, Service};
use common::seeded;
use pool::{PoolCounters, Slow, ThreadPool, LOST, MAX_WAITING, SLEEP, SLEEP_REPLY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Peers in the run.
const PEERS: usize = 100;
/// Peers connected at once.
const CONCURRENCY: usize = 32;
/// Pool threads: few, so that the pool is the bottleneck and connections sit at the bound.
const POOL_THREADS: usize = 2;
/// Longest SLEEP a plan asks for, in ms.
const MAX_SLEEP_MS: u16 = 3;
/// Most frames in one flood (one write, so one read of the server's crosses the bound).
const MAX_FLOOD: usize = 200;
/// The server's frame timeout: far longer than a peer takes between two pieces of a frame,
/// shorter than a flood's requests wait in the connection while the saturated pool answers
/// them `MAX_WAITING` at a time (a frame clock that ran on them would close connections).
const FRAME_TIMEOUT: Duration = Duration::from_millis(500);
/// Peers start only within this time; the run fails if they have not all started by then.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// A request of a plan and the reply the pool example promises for it.
fn request(rng: &mut StdRng, large: bool) -> (Vec<u8>, Vec<u8>) {
    let len = if large {
        rng.random_range(0..8 * 1024)
    } else {
        rng.random_range(0..12)
    };
    let mut data = vec![0; len];
    rng.fill(&mut data[..]);
    match rng.random_range(0..100) {
        0..60 => {
            let ms = rng.random_range(0..=MAX_SLEEP_MS);
            let body = [&ms.to_be_bytes()[..], &data].concat();
            (frame(SLEEP, &body), frame(SLEEP_REPLY, &data))
        }
        60..63 => (frame(LOST, &data), frame(ERROR, DROPPED.as_bytes())),
        63..80 => (frame(PING, b""), frame(PING_REPLY, b"")),
        _ => (frame(ECHO, &data), frame(ECHO_REPLY, &data)),
    }
}

/// One peer's script.
struct Plan {
    stream: Vec<u8>,
    /// Ascending offsets where the stream is split into separate writes.
    cuts: Vec<usize>,
    /// The replies, in request order, concatenated.
    replies: Vec<u8>,
    /// Requests in the stream, and how many of them the pool gets (SLEEP and LOST).
    requests: usize,
    deferred: usize,
    /// Shut down writing after the last piece, then expect the server's EOF after the
    /// replies (else close once every reply is read).
    half_close: bool,
}

impl Plan {
    fn new(rng: &mut StdRng) -> Plan {
        let mut plan = Plan {
            stream: Vec::new(),
            cuts: Vec::new(),
            replies: Vec::new(),
            requests: 0,
            deferred: 0,
            half_close: rng.random_bool(0.5),
        };
        for _ in 0..rng.random_range(1..=3) {
            // A flood of small frames in one write (most of them short, to keep the run
            // short), or a few frames of any size.
            let (count, large) = if rng.random_bool(0.5) {
                let most = if rng.random_bool(0.5) { 40 } else { MAX_FLOOD };
                (rng.random_range(MAX_WAITING + 1..=most), false)
            } else {
                (rng.random_range(1..=12), rng.random_bool(0.3))
            };
            for _ in 0..count {
                let (request, reply) = request(rng, large);
                plan.requests += 1;
                if matches!(request[4], SLEEP | LOST) {
                    plan.deferred += 1;
                }
                plan.stream.extend(request);
                plan.replies.extend(reply);
            }
            plan.cuts.push(plan.stream.len());
        }
        // Cuts anywhere, most inside a frame: a frame split across reads, and the request
        // that reaches the bound finished from the connection's buffer.
        for _ in 0..rng.random_range(0..6) {
            plan.cuts.push(rng.random_range(1..plan.stream.len()));
        }
        plan.cuts.sort_unstable();
        plan.cuts.dedup();
        plan
    }

    fn describe(&self) -> String {
        format!(
            "{} requests ({} deferred) in {} B, {} writes, {}",
            self.requests,
            self.deferred,
            self.stream.len(),
            self.cuts.len(),
            if self.half_close {
                "half-closed"
            } else {
                "closed after its replies"
            }
        )
    }
}

/// Run one peer; `Err` says what differed from the model.
fn run_peer(addr: SocketAddr, plan: &Plan, rng: &mut StdRng) -> Result<(), String> {
    let (stream, reader) = seeded::peer_stream(addr)?;
    thread::scope(|scope| {
        // Read while writing: a peer that does not read would stop the server reading it
        // (its output bound) with a frame maybe unfinished, which is the frame timeout's
        // business, not this test's.
        let replies = scope.spawn(|| check_replies(reader, plan));
        let mut from = 0;
        for &to in &plan.cuts {
            (&stream)
                .write_all(&plan.stream[from..to])
                .map_err(|e| format!("write at {from}: {e}"))?;
            from = to;
            // Shape the traffic so that pieces often reach the server in separate reads.
            if rng.random_bool(0.3) {
                thread::yield_now();
            }
        }
        if plan.half_close {
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
        }
        replies.join().expect("reader thread")
    })
}

/// Read every reply and compare it with the model; then, after a half-close, the EOF.
fn check_replies(mut stream: TcpStream, plan: &Plan) -> Result<(), String> {
    let want = &plan.replies;
    let mut got = vec![0; want.len()];
    let mut at = 0;
    while at < want.len() {
        let cut_short = match stream.read(&mut got[at..]) {
            Ok(0) => "EOF".to_string(),
            Ok(n) => {
                at += n;
                continue;
            }
            Err(e) => e.to_string(),
        };
        return Err(format!(
            "{cut_short} after {at} of {} reply bytes; {}",
            want.len(),
            first_difference(want, &got[..at])
        ));
    }
    if got != *want {
        return Err(first_difference(want, &got));
    }
    if plan.half_close {
        seeded::expect_eof(&stream)?;
    }
    Ok(())
}

/// The first reply of `got` that is not the one in `want`, or the first missing one.
fn first_difference(want: &[u8], got: &[u8]) -> String {
    let (mut at, mut index) = (0, 0);
    while at < want.len() {
        let len = 4 + u32::from_be_bytes(want[at..at + 4].try_into().unwrap()) as usize;
        let expected = &want[at..at + len];
        let Some(seen) = got.get(at..) else { break };
        if !seen.starts_with(expected) {
            let seen = match seen.get(..4) {
                Some(header) => {
                    let len = 4 + u32::from_be_bytes(header.try_into().unwrap()) as usize;
                    &seen[..len.min(seen.len())]
                }
                None => seen,
            };
            if seen.is_empty() {
                return format!(
                    "reply {index} and on missing: next expected {}",
                    show(expected)
                );
            }
            return format!(
                "reply {index} (at byte {at}) differs: expected {}, got {}",
                show(expected),
                show(seen)
            );
        }
        at += len;
        index += 1;
    }
    "no reply differs".into()
}

/// A reply frame for a failure message: its op and the start of its data, as text.
fn show(frame: &[u8]) -> String {
    match frame.get(4..) {
        Some([op, data @ ..]) => format!(
            "op {op:#04x} {:?} ({} B)",
            String::from_utf8_lossy(&data[..data.len().min(40)]),
            data.len()
        ),
        _ => format!("{frame:?}"),
    }
}

/// What the wrapper saw, shared by every worker's copy.
#[derive(Default)]
struct Seen {
    /// Most deferred requests of one connection certainly waiting at once (this one
    /// included).
    most_waiting: AtomicUsize,
    /// Requests deferred while the connection certainly had `MAX_WAITING` waiting.
    past_bound: Mutex<Vec<String>>,
    /// Connections closed for another reason than the peer's EOF.
    other_closes: Mutex<Vec<String>>,
}

/// The pool example's service, watched: per connection, the SLEEPs still inside their sleep.
struct Watched {
    slow: Slow,
    seen: Arc<Seen>,
}

/// A connection's SLEEPs that cannot have completed before these instants.
#[derive(Default)]
struct Sleeping {
    until: Vec<Instant>,
    requests: usize,
}

impl Service for Watched {
    type Codec = LengthPrefixed;
    type Session = Sleeping;
    const MAX_DEFERRED: usize = MAX_WAITING;

    fn call(
        &mut self,
        request: &[u8],
        session: &mut Sleeping,
        reply: &mut Reply<'_>,
        cx: &Context<'_>,
    ) {
        let index = session.requests;
        session.requests += 1;
        if matches!(request[0], SLEEP | LOST) {
            // Taken before the pool gets the job: its sleep starts after this instant.
            let now = Instant::now();
            session.until.retain(|&until| until > now);
            let waiting = session.until.len() + 1;
            self.seen.most_waiting.fetch_max(waiting, Ordering::Relaxed);
            if waiting > MAX_WAITING {
                self.seen.past_bound.lock().unwrap().push(format!(
                    "{}: request {index} deferred while {} earlier ones were still asleep",
                    cx.peer,
                    waiting - 1
                ));
            }
            if request[0] == SLEEP {
                let ms = u16::from_be_bytes([request[1], request[2]]);
                session.until.push(now + Duration::from_millis(ms.into()));
            }
        }
        self.slow.call(request, &mut (), reply, cx);
    }

    fn close(&mut self, session: Sleeping, reason: CloseReason) {
        if reason != CloseReason::PeerEof {
            self.seen.other_closes.lock().unwrap().push(format!(
                "a connection closed ({reason:?}) after {} requests",
                session.requests
            ));
        }
    }
}

#[test]
fn peers_flooding_past_the_deferred_bound_get_every_reply_in_order() {
    let seed = seeded::run_seed("POOL_CHAOS_SEED", "pool chaos");

    let baseline = own_fds();
    let counters = PoolCounters::default();
    let pool = ThreadPool::new(POOL_THREADS, counters.clone());
    let seen = Arc::new(Seen::default());
    let make = {
        let (counters, seen) = (counters.clone(), seen.clone());
        move || Watched {
            slow: Slow {
                pool: Arc::clone(&pool),
                counters: counters.clone(),
            },
            seen: seen.clone(),
        }
    };
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        frame_timeout: Some(FRAME_TIMEOUT),
        ..Config::default()
    };
    let server = Server::with_service(config, make).expect("bind");
    let server = TestServer::run(counters.register(server));
    let stats = server.handle().stats();
    let addr = server.addr();

    let next = AtomicUsize::new(0);
    let totals = Mutex::new((0usize, 0usize));
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..CONCURRENCY {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= PEERS || started.elapsed() > RUN_LIMIT {
                    return;
                }
                let mut rng = StdRng::seed_from_u64(seeded::peer_seed(seed, index));
                let plan = Plan::new(&mut rng);
                {
                    let mut totals = totals.lock().unwrap();
                    totals.0 += plan.requests;
                    totals.1 += plan.deferred;
                }
                if let Err(why) = run_peer(addr, &plan, &mut rng) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("peer {index} ({}): {why}", plan.describe()));
                }
            });
        }
    });
    let ran = next.load(Ordering::Relaxed).min(PEERS);
    let (requests, deferred) = totals.into_inner().unwrap();
    let most_waiting = seen.most_waiting.load(Ordering::Relaxed);
    eprintln!(
        "pool chaos: {ran} peers, {requests} requests ({deferred} deferred) in {:.1?}; at most \
         {most_waiting} of a connection certainly waiting, {} in the pool at once",
        started.elapsed(),
        counters.peak.get()
    );

    // The bound first: past it, peers fail too (a frame timeout on a head left waiting).
    let past_bound = seen.past_bound.lock().unwrap();
    assert!(
        past_bound.is_empty(),
        "seed {seed}: {} requests deferred past the bound ({MAX_WAITING} a connection); first \
         ones:\n{}",
        past_bound.len(),
        past_bound[..past_bound.len().min(20)].join("\n")
    );
    let failures = failures.into_inner().unwrap();
    seeded::assert_every_peer_as_modelled(seed, &failures, ran, PEERS, RUN_LIMIT);
    assert!(
        wait_until(WAIT, || stats.get(Stat::Active) == 0),
        "seed {seed}: {} connections left open",
        stats.get(Stat::Active)
    );
    let other_closes = seen.other_closes.lock().unwrap();
    assert!(
        other_closes.is_empty(),
        "seed {seed}: {} connections closed otherwise than by their peer; first ones:\n{}",
        other_closes.len(),
        other_closes[..other_closes.len().min(20)].join("\n")
    );
    // The wrapper's measure is a lower bound; the run must have reached the bound for the
    // stash to have been exercised.
    assert_eq!(
        most_waiting, MAX_WAITING,
        "seed {seed}: no connection reached the bound"
    );
    // Nothing lost or answered twice: every request counted once, every job once.
    assert_eq!(stats.get(Stat::Requests), requests as u64, "seed {seed}");
    assert_eq!(counters.jobs.get(), deferred as u64, "seed {seed}");
    assert_eq!(counters.waiting.get(), 0, "seed {seed}");
    // Only connections with work in the pool count in `pool_waiting`, and at most
    // CONCURRENCY peers are connected at once.
    assert!(
        counters.peak.get() <= (CONCURRENCY * MAX_WAITING) as u64,
        "seed {seed}: {} requests waiting at once, more than {CONCURRENCY} connections x \
         {MAX_WAITING}",
        counters.peak.get()
    );
    assert_eq!(stats.get(Stat::Accepted), PEERS as u64, "seed {seed}");
    assert_eq!(stats.get(Stat::ClosedEof), PEERS as u64, "seed {seed}");
    assert_eq!(stats.get(Stat::BufferedBytes), 0, "seed {seed}");
    assert_eq!(server.close_wait(), 0, "seed {seed}: sockets in CLOSE_WAIT");
    server.stop().expect("a clean stop");
    assert!(
        wait_until(WAIT, || own_fds() == baseline),
        "seed {seed}: {} fds open, {baseline} before the server",
        own_fds()
    );
}
