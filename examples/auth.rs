//! State per connection: a client must authenticate before anything else, and the service
//! keeps its own counters. The session-state example of `docs/template.md`, runnable.
//!
//! Same framing as the reference server; what changes is that each connection has a
//! [`Session`] (made at accept, handed to every request, given back at the close):
//!
//! | request                         | reply                                              |
//! |---------------------------------|----------------------------------------------------|
//! | `0x20 AUTH` + password          | `0xA0` + `welcome`; a wrong one: ERROR (3: closed) |
//! | `0x21 WHOAMI` (authenticated)   | `0xA1` + this session's requests, `u64` big-endian |
//! | `ECHO`, `PING`, `STATS` (auth.) | as the reference server (delegated to it)          |
//! | anything before AUTH            | `0xFF` ERROR `authenticate first`                  |
//!
//! Its own counters, in STATS and the metrics next to the server's: `auth_logins`,
//! `auth_refused`, and the gauge `auth_sessions` (authenticated connections open now).
//!
//! ```sh
//! cargo run --release --example auth -- --listen 127.0.0.1:0 --password hunter2
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use closewait::service::{Reference, ECHO, PING, STATS};
use closewait::stats::ServiceCounter;
use closewait::{CloseReason, Context, LengthPrefixed, Reply, Server, Service};

/// Request op: authenticate with the password; reply [`AUTH_REPLY`].
pub const AUTH: u8 = 0x20;
/// Request op: how many requests this session made; reply [`WHOAMI_REPLY`].
pub const WHOAMI: u8 = 0x21;
/// Reply op to [`AUTH`].
pub const AUTH_REPLY: u8 = 0xA0;
/// Reply op to [`WHOAMI`].
pub const WHOAMI_REPLY: u8 = 0xA1;
/// Wrong passwords a connection may try before it is closed.
pub const MAX_FAILURES: u8 = 3;

/// What the service remembers about one connection. Small, as every connection holds one.
#[derive(Debug, Default)]
pub struct Session {
    authenticated: bool,
    failures: u8,
    requests: u64,
}

/// The service's own counters: made once, registered with the server, cloned to each worker.
#[derive(Clone)]
pub struct AuthCounters {
    /// Successful AUTHs.
    pub logins: ServiceCounter,
    /// Wrong passwords.
    pub refused: ServiceCounter,
    /// Authenticated connections open now.
    pub sessions: ServiceCounter,
}

impl AuthCounters {
    /// The counters, not yet registered.
    pub fn new() -> AuthCounters {
        AuthCounters {
            logins: ServiceCounter::counter("auth_logins", "Successful AUTH requests."),
            refused: ServiceCounter::counter(
                "auth_refused",
                "AUTH requests with a wrong password.",
            ),
            sessions: ServiceCounter::gauge("auth_sessions", "Authenticated connections open now."),
        }
    }

    /// Show them in STATS and the metrics of `server`.
    pub fn register<S: Service + 'static>(&self, server: Server<S>) -> Server<S> {
        server
            .register(&self.logins)
            .register(&self.refused)
            .register(&self.sessions)
    }
}

impl Default for AuthCounters {
    fn default() -> Self {
        AuthCounters::new()
    }
}

/// One worker's service: the password and the shared counters.
pub struct Auth {
    /// The password every client must send first.
    pub password: Vec<u8>,
    /// Counters shared with the other workers (and the server's STATS).
    pub counters: AuthCounters,
}

impl Service for Auth {
    type Codec = LengthPrefixed;
    type Session = Session;

    fn open(&mut self, peer: SocketAddr) -> Session {
        log::debug!("{peer}: new session");
        Session::default()
    }

    fn call(
        &mut self,
        request: &[u8],
        session: &mut Session,
        reply: &mut Reply<'_>,
        cx: &Context<'_>,
    ) {
        let (op, data) = (request[0], &request[1..]);
        session.requests += 1;
        match op {
            AUTH if data == self.password.as_slice() => {
                if !session.authenticated {
                    session.authenticated = true;
                    self.counters.sessions.add(1);
                }
                self.counters.logins.add(1);
                reply.send(AUTH_REPLY, b"welcome");
            }
            AUTH => {
                self.counters.refused.add(1);
                session.failures += 1;
                reply.error("wrong password");
                if session.failures >= MAX_FAILURES {
                    reply.close();
                }
            }
            _ if !session.authenticated => reply.answer_error("authenticate first (AUTH)"),
            WHOAMI => reply.send(WHOAMI_REPLY, &session.requests.to_be_bytes()),
            ECHO | PING | STATS => Reference.call(request, &mut (), reply, cx),
            _ => reply.error(format_args!("unknown op 0x{op:02x}")),
        }
    }

    fn close(&mut self, session: Session, reason: CloseReason) {
        if session.authenticated {
            self.counters.sessions.sub(1);
        }
        log::debug!("session of {} requests ended: {reason}", session.requests);
    }
}

/// `auth` command line: every closewait server flag, and the password.
#[derive(Parser)]
#[command(
    name = "auth",
    about = "A service that wants a password first, on closewait"
)]
struct AuthArgs {
    #[command(flatten)]
    server: closewait::cli::ServerArgs,
    /// The password clients must send in AUTH.
    #[arg(long, default_value = "secret")]
    password: String,
}

fn main() -> ExitCode {
    let args = AuthArgs::parse();
    closewait::cli::init_logging();
    let counters = AuthCounters::new();
    let password = args.password.into_bytes();
    let make = {
        let counters = counters.clone();
        move || Auth {
            password: password.clone(),
            counters: counters.clone(),
        }
    };
    let server = Server::with_service(args.server.to_config(), make);
    closewait::cli::serve(server.map(|server| counters.register(server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use closewait::service::{ERROR, PING_REPLY};
    use closewait::testing::{frame, replies, respond};

    fn service() -> Auth {
        Auth {
            password: b"pw".to_vec(),
            counters: AuthCounters::new(),
        }
    }

    #[test]
    fn nothing_but_auth_before_auth_and_everything_after() {
        let mut service = service();
        let input = [
            frame(PING, b""),
            frame(AUTH, b"pw"),
            frame(PING, b""),
            frame(WHOAMI, b""),
        ]
        .concat();
        let out = replies(&respond(&mut service, &input));
        assert_eq!(out[0].0, ERROR, "{out:?}");
        assert_eq!(out[1], (AUTH_REPLY, b"welcome".to_vec()));
        assert_eq!(out[2], (PING_REPLY, vec![]));
        assert_eq!(out[3], (WHOAMI_REPLY, 4u64.to_be_bytes().to_vec()));
        assert_eq!(service.counters.logins.get(), 1);
        assert_eq!(service.counters.sessions.get(), 0, "closed after the input");
    }
}
