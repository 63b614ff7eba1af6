//! A named-counter service on closewait: the template in `docs/template.md`, runnable.
//!
//! Same framing as the reference server (`u32` big-endian length, then an op byte and data);
//! only what the ops mean changes:
//!
//! | request                  | reply                                        |
//! |--------------------------|----------------------------------------------|
//! | `0x10 INCR` + name       | `0x90` + the new value, `u64` big-endian     |
//! | `0x11 GET` + name        | `0x91` + the value (0 if never incremented)  |
//! | `0x02 PING`, `0x03 STATS`| as the reference server (delegated to it)    |
//! | anything else            | `0xFF` ERROR + a message                     |
//!
//! Counters are shared by all workers (`Arc<Mutex<..>>`): with `--workers N` the kernel
//! spreads connections over the workers, and a counter must not depend on which worker a
//! client landed on. The lock is held for one hash-map update, never across I/O.
//!
//! Run it with every closewait server flag (`cli::ServerArgs`, reused through
//! `#[command(flatten)]`; the demo's `--leaky` is not among them):
//!
//! ```sh
//! cargo run --release --example counter -- --listen 127.0.0.1:0 --workers 2
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use closewait::service::{Reference, PING, STATS};
use closewait::{Context, LengthPrefixed, Reply, Server, Service};

/// Request op: add one to the named counter; reply [`INCR_REPLY`] with the new value.
pub const INCR: u8 = 0x10;
/// Request op: read the named counter; reply [`GET_REPLY`] with its value.
pub const GET: u8 = 0x11;
/// Reply op to [`INCR`].
pub const INCR_REPLY: u8 = 0x90;
/// Reply op to [`GET`].
pub const GET_REPLY: u8 = 0x91;
/// Longest counter name, in bytes.
pub const MAX_NAME: usize = 255;
/// Most distinct counters: a peer must not be able to grow our memory without bound.
pub const MAX_COUNTERS: usize = 100_000;

/// Counter values by name, shared by every worker.
pub type Counters = Arc<Mutex<HashMap<Vec<u8>, u64>>>;

/// One worker's service: a handle on the shared counters.
pub struct Counter {
    /// The counters, shared with the other workers.
    pub counters: Counters,
}

impl Service for Counter {
    type Codec = LengthPrefixed;
    type Session = ();

    fn call(&mut self, request: &[u8], _: &mut (), reply: &mut Reply<'_>, cx: &Context<'_>) {
        // The loop guarantees a whole frame body: never empty, at most --max-frame bytes.
        let (op, name) = (request[0], &request[1..]);
        match op {
            INCR | GET if name.is_empty() || name.len() > MAX_NAME => {
                reply.error(format_args!("counter name must be 1..={MAX_NAME} bytes"))
            }
            INCR => match self.incr(name) {
                Some(value) => reply.send(INCR_REPLY, &value.to_be_bytes()),
                // An answer (the table is full), not the peer's fault: not logged.
                None => {
                    reply.answer_error(format_args!("too many counters (at most {MAX_COUNTERS})"))
                }
            },
            GET => reply.send(GET_REPLY, &self.get(name).to_be_bytes()),
            // Keep the reference ops so the usual tools (health checks, STATS) still work.
            PING | STATS => Reference.call(request, &mut (), reply, cx),
            _ => reply.error(format_args!("unknown op 0x{op:02x}")),
        }
    }
}

impl Counter {
    fn incr(&self, name: &[u8]) -> Option<u64> {
        let mut counters = self.lock();
        if let Some(value) = counters.get_mut(name) {
            *value = value.saturating_add(1);
            return Some(*value);
        }
        if counters.len() >= MAX_COUNTERS {
            return None;
        }
        counters.insert(name.to_vec(), 1);
        Some(1)
    }

    fn get(&self, name: &[u8]) -> u64 {
        self.lock().get(name).copied().unwrap_or(0)
    }

    /// The map stays consistent even if another worker panicked while holding the lock
    /// (each update is a single insert or increment), so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, u64>> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `counter` command line: every closewait server flag, nothing else.
#[derive(Parser)]
#[command(name = "counter", about = "A named-counter service on closewait")]
struct CounterArgs {
    #[command(flatten)]
    server: closewait::cli::ServerArgs,
}

fn main() -> ExitCode {
    let args = CounterArgs::parse();
    closewait::cli::init_logging();
    let counters = Counters::default();
    // The same start-up as the closewait binary: listening line, signals, exit code.
    closewait::cli::serve(Server::with_service(args.server.to_config(), move || {
        Counter {
            counters: counters.clone(),
        }
    }))
}

/// Unit tests of the service alone, without a socket: `closewait::testing::call` runs one
/// request body through `call` and returns the replies as `(op, data)`. This is the cheapest
/// place to test what your ops mean; tests/example_counter.rs tests the same service served
/// over TCP (and runs these tests: it includes this file).
#[cfg(test)]
mod tests {
    use super::*;
    use closewait::service::{ERROR, PING_REPLY};
    use closewait::testing::call;

    fn request(op: u8, name: &[u8]) -> Vec<u8> {
        [&[op], name].concat()
    }

    #[test]
    fn incr_counts_per_name_and_get_reads_without_counting() {
        let mut service = Counter {
            counters: Counters::default(),
        };
        for expected in 1..=3u64 {
            assert_eq!(
                call(&mut service, &request(INCR, b"a")),
                [(INCR_REPLY, expected.to_be_bytes().to_vec())]
            );
        }
        assert_eq!(
            call(&mut service, &request(GET, b"a")),
            [(GET_REPLY, 3u64.to_be_bytes().to_vec())]
        );
        assert_eq!(
            call(&mut service, &request(GET, b"never")),
            [(GET_REPLY, 0u64.to_be_bytes().to_vec())]
        );
    }

    #[test]
    fn bad_names_and_unknown_ops_get_one_error_each_and_reference_ops_still_work() {
        let mut service = Counter {
            counters: Counters::default(),
        };
        for bad in [
            request(INCR, b""),
            request(GET, &[b'x'; MAX_NAME + 1]),
            vec![0x7f],
        ] {
            let replies = call(&mut service, &bad);
            assert_eq!(replies.len(), 1, "{replies:?}");
            assert_eq!(replies[0].0, ERROR, "{replies:?}");
        }
        assert_eq!(call(&mut service, &[PING]), [(PING_REPLY, vec![])]);
    }
}
