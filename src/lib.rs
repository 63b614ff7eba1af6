//! closewait: a mio TCP server that holds persistent connections for months without leaking
//! a single file descriptor.
//!
//! A socket whose peer has closed sits in CLOSE_WAIT, holding an fd, until *this* process
//! closes it; the kernel never times it out. A server that misses the peer's FIN therefore
//! leaks one fd per peer close until `accept` fails with `Too many open files`. closewait is
//! built around not doing that, and around never being the process that hits the fd limit:
//!
//! - a read returning 0 (the peer's FIN) ends the connection in the same loop turn, after the
//!   replies to what was already received are flushed ([`connection`], [`leak`]);
//! - the connection cap comes from `RLIMIT_NOFILE` minus a reserve, and at the cap the server
//!   stops accepting instead of failing in `accept` ([`limits`]);
//! - EMFILE/ENFILE on accept back off without spinning and recover by themselves ([`limits`]);
//! - frame size, pending output, idle time and the time to finish a frame are bounded per
//!   connection ([`frame`], [`connection`], [`timers`]), and the memory all connections hold
//!   together is bounded too ([`memory`]);
//! - a close that may leave input unread lingers (shut down writing, discard input until the
//!   peer's FIN), so the kernel sends FIN, not an RST that would destroy replies in flight
//!   ([`connection`]).
//!
//! # Using it
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
//! To serve another protocol over the same framing, implement [`Service`] and start the
//! server with [`Server::with_service`]; nothing else changes (see `docs/template.md` and
//! `examples/counter.rs`).
//!
//! # Layout
//!
//! In suggested reading order:
//!
//! 1. [`server`](Server) — the event loop: the only code that polls, closes and accepts.
//! 2. [`connection`] — one connection's state machine: read, answer, flush, close.
//! 3. [`leak`] — the one seam where the leaky variant (`--leaky`) differs.
//! 4. [`frame`] — framing: length prefix, limits, partial frames; never what an op means.
//! 5. [`service`] — the [`Service`] trait and the reference ECHO/PING/STATS service.
//! 6. [`limits`] — the fd budget, the cap, the accept gate and the EMFILE back-off.
//! 7. [`timers`] — idle, frame and linger deadlines in O(1).
//! 8. [`memory`] — the memory budget over all connections, and whom it evicts.
//! 9. `connections` — the slab registry: one connection, one entry, one registered fd.
//! 10. `listener` — socket2 listener with an explicit backlog and inherited socket options.
//! 11. [`stats`] — the counters behind STATS and the shutdown summary.
//! 12. [`throttle`] — rate limit for log lines a peer can trigger.
//! 13. [`config`] and [`cli`] — what an operator can set, and the thin binary around it.
//! 14. [`procfs`] — counting a process's fds and CLOSE_WAIT sockets from `/proc`.
//! 15. [`systemd`] — socket activation (`LISTEN_FDS`) and readiness notification.
//!
//! The docs in `docs/` tell the same story at length: `close-wait.md` (the leak),
//! `diagnose.md` (finding it), `fd-budget.md` (the limits), `architecture.md` (this code),
//! `template.md` (your service), `operations.md` (running it), `loadtest.md` and
//! `performance.md` (the numbers).
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod connection;
mod connections;
pub mod frame;
pub mod leak;
pub mod limits;
mod listener;
pub mod memory;
pub mod procfs;
mod server;
pub mod service;
pub mod stats;
pub mod systemd;
pub mod throttle;
pub mod timers;

pub use config::{Config, EofPolicy, WhenFull};
pub use server::{Handle, Server};
pub use service::{Context, Reply, Service};
