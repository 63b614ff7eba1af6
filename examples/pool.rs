//! Slow work off the loop, replies still in order: requests answered from a small pool of
//! std threads fed by a channel (no async runtime). The deferred example of
//! `docs/template.md`, runnable.
//!
//! A `call` must never block the loop's thread; one that needs something slow (a disk, a
//! database, another service) [defers](closewait::Reply::defer) the request and hands the
//! handle to a thread of its own, which completes it when the answer is ready. The loop
//! sends replies in request order whatever order they complete in, reads no more than
//! [`MAX_WAITING`] waiting requests of one connection at a time, and answers a handle
//! dropped without a reply with an ERROR frame.
//!
//! | request                         | reply                                                  |
//! |---------------------------------|--------------------------------------------------------|
//! | `0x30 SLEEP` + `u16` ms + data  | `0xB0` + data, from a pool thread after sleeping ms    |
//! | `0x31 LOST`                     | ERROR `request dropped without a reply` (pool drops it)|
//! | `ECHO`, `PING`, `STATS`         | as the reference server, at once (still in order)      |
//!
//! Its counters: `pool_jobs` (requests deferred), `pool_waiting` (not answered yet) and
//! `pool_waiting_peak` (most not answered at once).
//!
//! ```sh
//! cargo run --release --example pool -- --listen 127.0.0.1:0 --threads 4
//! ```

use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use closewait::service::{Reference, ECHO, PING, STATS};
use closewait::stats::ServiceCounter;
use closewait::{Context, Deferred, LengthPrefixed, Reply, Server, Service};

/// Request op: sleep `u16` big-endian milliseconds on a pool thread, then echo the rest.
pub const SLEEP: u8 = 0x30;
/// Request op: the pool drops the request without answering it.
pub const LOST: u8 = 0x31;
/// Reply op to [`SLEEP`].
pub const SLEEP_REPLY: u8 = 0xB0;
/// Requests of one connection waiting for the pool at once; beyond it the loop stops
/// reading that connection until one is answered.
pub const MAX_WAITING: usize = 8;

/// One deferred request on its way to a pool thread.
struct Job {
    deferred: Deferred,
    op: u8,
    data: Vec<u8>,
}

/// A fixed pool of threads taking jobs from one channel. Shared by every worker's service;
/// the threads end when the last service (and so the last sender) is gone.
pub struct ThreadPool {
    jobs: Mutex<Sender<Job>>,
}

impl ThreadPool {
    /// Start `threads` threads.
    pub fn new(threads: usize, counters: PoolCounters) -> Arc<ThreadPool> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads {
            let (queue, counters) = (queue.clone(), counters.clone());
            thread::Builder::new()
                .name(format!("pool-{index}"))
                .spawn(move || work(&queue, &counters))
                .expect("spawn a pool thread");
        }
        Arc::new(ThreadPool {
            jobs: Mutex::new(jobs),
        })
    }

    /// Queue `job`. If the pool is gone the job is dropped, and its handle answers ERROR.
    fn submit(&self, job: Job) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = jobs.send(job);
    }
}

/// A pool thread: take a job, do it (slowly), answer it; until the channel closes.
fn work(queue: &Mutex<Receiver<Job>>, counters: &PoolCounters) {
    loop {
        // The lock is held only while waiting for a job, never while doing one.
        let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // every sender is gone: the server stopped
        };
        match job.op {
            SLEEP => {
                let ms = u16::from_be_bytes([job.data[0], job.data[1]]);
                thread::sleep(Duration::from_millis(ms.into()));
                let rest = &job.data[2..];
                counters.waiting.sub(1);
                job.deferred.complete(|reply| reply.send(SLEEP_REPLY, rest));
            }
            // Dropping the handle answers the peer with an ERROR frame.
            _ => {
                counters.waiting.sub(1);
                drop(job.deferred);
            }
        }
    }
}

/// The pool's counters, in STATS and the metrics.
#[derive(Clone)]
pub struct PoolCounters {
    /// Requests deferred to the pool.
    pub jobs: ServiceCounter,
    /// Deferred requests not answered yet (queued or being worked on).
    pub waiting: ServiceCounter,
    /// Most requests waiting at once.
    pub peak: ServiceCounter,
}

impl Default for PoolCounters {
    fn default() -> Self {
        PoolCounters {
            jobs: ServiceCounter::counter("pool_jobs", "Requests deferred to the pool."),
            waiting: ServiceCounter::gauge("pool_waiting", "Deferred requests not answered yet."),
            peak: ServiceCounter::gauge("pool_waiting_peak", "Most requests waiting at once."),
        }
    }
}

impl PoolCounters {
    /// Show them in STATS and the metrics of `server`.
    pub fn register<S: Service + 'static>(&self, server: Server<S>) -> Server<S> {
        server
            .register(&self.jobs)
            .register(&self.waiting)
            .register(&self.peak)
    }
}

/// One worker's service: a handle on the shared pool.
pub struct Slow {
    /// The pool every worker feeds.
    pub pool: Arc<ThreadPool>,
    /// Its counters.
    pub counters: PoolCounters,
}

impl Service for Slow {
    type Codec = LengthPrefixed;
    type Session = ();
    const MAX_DEFERRED: usize = MAX_WAITING;

    fn call(&mut self, request: &[u8], _: &mut (), reply: &mut Reply<'_>, cx: &Context<'_>) {
        let (op, data) = (request[0], &request[1..]);
        match op {
            SLEEP if data.len() < 2 => reply.error("SLEEP wants a u16 of milliseconds"),
            SLEEP | LOST => {
                // Not a single blocking call on the loop's thread: the work goes to the pool.
                let deferred = reply.defer();
                self.counters.jobs.add(1);
                self.counters.waiting.add(1);
                self.counters.peak.max(self.counters.waiting.get());
                let data = data.to_vec();
                self.pool.submit(Job { deferred, op, data });
            }
            ECHO | PING | STATS => Reference.call(request, &mut (), reply, cx),
            _ => reply.error(format_args!("unknown op 0x{op:02x}")),
        }
    }
}

/// `pool` command line: every closewait server flag, and the pool's size.
#[derive(Parser)]
#[command(
    name = "pool",
    about = "Slow requests answered from a thread pool, on closewait"
)]
struct PoolArgs {
    #[command(flatten)]
    server: closewait::cli::ServerArgs,
    /// Pool threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = PoolArgs::parse();
    closewait::cli::init_logging();
    let counters = PoolCounters::default();
    let pool = ThreadPool::new(args.threads, counters.clone());
    let make = {
        let counters = counters.clone();
        move || Slow {
            pool: pool.clone(),
            counters: counters.clone(),
        }
    };
    let server = Server::with_service(args.server.to_config(), make);
    closewait::cli::serve(server.map(|server| counters.register(server)))
}
