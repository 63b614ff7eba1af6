//! closewait: a mio TCP server that holds persistent connections for months without leaking
//! a single file descriptor.
//!
//! A socket whose peer has closed sits in CLOSE_WAIT, holding an fd, until *this* process
//! closes it; the kernel never times it out. A server that misses the peer's FIN therefore
//! leaks one fd per peer close until `accept` fails with `Too many open files`. closewait is
//! built around not doing that, and around never being the process that hits the fd limit:
//!
//! - a read returning 0 (the peer's FIN) ends the connection in the same loop turn, after the
//!   replies to what was already received are flushed (`connection`, `leak`);
//! - the connection cap comes from `RLIMIT_NOFILE` minus a reserve, and at the cap the server
//!   stops accepting instead of failing in `accept` (`limits`);
//! - EMFILE/ENFILE on accept back off without spinning and recover by themselves (`limits`);
//! - request size, pending output, idle time and the time to finish a request are bounded
//!   per connection whatever the wire format (`connection`, `timers`), and the memory all
//!   connections hold together is bounded too (`memory`);
//! - a close that may leave input unread lingers (shut down writing, discard input until the
//!   peer's FIN), so the kernel sends FIN, not an RST that would destroy replies in flight
//!   (`connection`).
//!
//! # The API: a template for your server
//!
//! What is public is what a service author needs, and nothing more; everything above is
//! internal and may change. The promise is this list:
//!
//! - [`Server`], [`Config`] and [`Handle`]: bind, run, stop, and read the counters
//!   ([`stats::Stats`], read-only: a service reads them, only the server writes them).
//! - [`Service`], [`Context`] and [`Reply`]: what a request means and how it is answered,
//!   including an error that is the peer's fault (logged) or an ordinary answer (not), and
//!   closing after a reply (QUIT); the service's state per connection
//!   ([`Service::Session`], given back with its [`CloseReason`]).
//! - [`Reply::defer`] and [`Deferred`]: a request answered later from another thread,
//!   replies still in request order.
//! - [`stats::ServiceCounter`]: the service's own counters, in STATS and the metrics next
//!   to the server's ([`Server::register`]).
//! - [`Codec`] and [`Decoded`]: the wire format a service picks; [`LengthPrefixed`] (module
//!   [`frame`]) is the default and the reference protocol's ([`service`] has its ops).
//! - [`cli`]: the server flags and start-up of a service's own binary.
//! - `testing` (feature `testing`): an in-process server, a client and fd/CLOSE_WAIT counts
//!   for a service's tests.
//!
//! The deliberately leaky variant that the load test compares against is not reachable from
//! this API: only the `closewait` binary (`--leaky`) and the load test can run it.
//!
//! ```
//! use closewait::{Config, Server};
//!
//! let server = Server::bind(Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() })?;
//! println!("listening on {}", server.local_addr());
//! let handle = server.handle();
//! let thread = std::thread::spawn(move || server.run());
//! handle.shutdown();
//! thread.join().unwrap()?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! To serve your own protocol, implement [`Service`] (and, for another wire format, a
//! [`Codec`]) and start the server with [`Server::with_service`]; nothing else changes. See
//! `docs/template.md`, `examples/counter.rs` (the default codec), `examples/auth.rs` (state
//! per connection, the service's own counters) and `examples/resp.rs` (the
//! Redis protocol, driven by the real `redis-cli` and `redis-benchmark` in its tests).
//!
//! # Layout
//!
//! In suggested reading order (internal modules in plain text):
//!
//! 1. `server` ([`Server`]) — the event loop: the only code that polls, closes and accepts.
//! 2. `connection` — one connection's state machine: read, answer, flush, close.
//! 3. `leak` — the one seam where the leaky variant (`--leaky`) differs.
//! 4. [`codec`] — the wire-format trait; [`frame`] — the default codec: length prefix,
//!    limits, partial frames; never what an op means.
//! 5. [`service`] — the [`Service`] trait, [`Reply`], and the reference ECHO/PING/STATS service.
//! 6. [`deferred`] — replies answered on other threads, kept in request order.
//! 7. `limits` — the fd budget, the cap, the accept gate and the EMFILE back-off.
//! 8. `timers` — idle, frame and linger deadlines in O(1).
//! 9. `memory` — the memory budget over all connections, and whom it evicts.
//! 10. `connections` — the slab registry: one connection, one entry, one registered fd.
//! 11. `listener` — socket2 listener with an explicit backlog and inherited socket options.
//! 12. [`stats`] — the counters behind STATS and the shutdown summary.
//! 13. `throttle` — rate limit for log lines a peer can trigger.
//! 14. [`config`] and [`cli`] — what an operator can set, and a server process's start-up.
//! 15. `systemd` — socket activation (`LISTEN_FDS`) and readiness notification.
//! 16. `metrics` — the Prometheus endpoint (`--metrics`), on a thread of its own.
//! 17. `procfs` — a process's fds and TCP sockets by state from `/proc` (the metrics'
//!     CLOSE_WAIT fallback; public as `testing::procfs`, the test kit's).
//!
//! The docs in `docs/` tell the same story at length: `close-wait.md` (the leak),
//! `diagnose.md` (finding it), `fd-budget.md` (the limits), `architecture.md` (this code),
//! `template.md` (your service), `operations.md` (running it), `loadtest.md` and
//! `performance.md` (the numbers).
#![deny(missing_docs)]

pub mod cli;
pub mod codec;
pub mod config;
mod connection;
mod connections;
pub mod deferred;
#[doc(hidden)]
pub mod demo;
pub mod frame;
mod leak;
mod limits;
mod listener;
mod memory;
mod metrics;
// The test kit publishes it as `testing::procfs`; the server itself uses only a part.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
mod procfs;
mod server;
pub mod service;
pub mod stats;
mod systemd;
#[cfg(feature = "testing")]
pub mod testing;
mod throttle;
mod timers;

pub use codec::{Codec, Decoded, LengthPrefixed};
pub use config::{Config, WhenFull};
pub use connection::CloseReason;
pub use deferred::Deferred;
pub use server::{Handle, Server};
pub use service::{Context, Reply, Service};
