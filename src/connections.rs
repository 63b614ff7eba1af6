//! The registry: the slab of connections, their poll registrations and their deadlines.
//!
//! **Invariant:** one connection = one slab entry = one registered fd, and at most one node
//! in each deadline list (idle, frame, linger). Only this module touches the slab, so that
//! invariant is kept in two functions: [`insert`] (register, then store) and [`remove`]
//! (deregister, unlink from every list, drop = close).
//!
//! [`insert`]: Registry::insert
//! [`remove`]: Registry::remove

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry as PollRegistry, Token};
use slab::Slab;

use crate::connection::Connection;
use crate::timers::DeadlineList;

/// Connections by token. A token is the slab key, so lookup is an index.
#[derive(Debug)]
pub struct Registry<T = ()> {
    slab: Slab<Connection<T>>,
    /// Last byte in or out; open and draining connections.
    idle: Option<DeadlineList>,
    /// First byte of the unfinished frame; connections in the middle of a frame.
    frame: Option<DeadlineList>,
    /// Start of a lingering close; lingering connections (which leave the other two lists).
    linger: Option<DeadlineList>,
}

impl<T> Registry<T> {
    /// An empty registry; a timeout of `None` keeps no deadlines of that kind.
    pub fn new(
        idle_timeout: Option<Duration>,
        frame_timeout: Option<Duration>,
        linger_timeout: Option<Duration>,
    ) -> Registry<T> {
        Registry {
            slab: Slab::new(),
            idle: idle_timeout.map(DeadlineList::new),
            frame: frame_timeout.map(DeadlineList::new),
            linger: linger_timeout.map(DeadlineList::new),
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Register `stream` for reads and writes and store it, with the session `open` makes.
    ///
    /// Both interests are registered once, for the connection's whole life: edge-triggered
    /// writable events come only after a write hit a full buffer, so this costs no wake-ups,
    /// and it saves a `reregister` syscall each time output backs up. Readable is never
    /// dropped: without it epoll does not report the peer's FIN.
    pub fn insert(
        &mut self,
        poll: &PollRegistry,
        mut stream: TcpStream,
        peer: SocketAddr,
        open: impl FnOnce() -> T,
        now: Instant,
    ) -> io::Result<Token> {
        let entry = self.slab.vacant_entry();
        let token = Token(entry.key());
        poll.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        // The session is made only once the socket is registered, so every session made is
        // given back at its close.
        entry.insert(Connection::new(stream, peer, open()));
        if let Some(idle) = &mut self.idle {
            idle.touch(token.0, now);
        }
        Ok(token)
    }

    /// The connection for `token`, if it is still open (events for closed ones are stale).
    pub fn get_mut(&mut self, token: Token) -> Option<&mut Connection<T>> {
        self.slab.get_mut(token.0)
    }

    /// Record activity on `token` at `now` (pushes its idle deadline back).
    pub fn touch(&mut self, token: Token, now: Instant) {
        if let Some(idle) = &mut self.idle {
            idle.touch(token.0, now);
        }
    }

    /// Note where `token` stands in its current frame after a handler ran: a frame that
    /// began starts the frame clock, and no frame in progress stops it.
    pub fn track_frame(&mut self, token: Token, began: bool, in_frame: bool, now: Instant) {
        if let Some(frame) = &mut self.frame {
            if !in_frame {
                frame.remove(token.0);
            } else if began {
                frame.touch(token.0, now);
            }
        }
    }

    /// `token` began a lingering close at `now`: from here only the linger clock applies.
    pub fn start_linger(&mut self, token: Token, now: Instant) {
        for list in [&mut self.idle, &mut self.frame].into_iter().flatten() {
            list.remove(token.0);
        }
        if let Some(linger) = &mut self.linger {
            linger.touch(token.0, now);
        }
    }

    /// The earliest deadline of any kind.
    pub fn next_deadline(&self) -> Option<Instant> {
        let next =
            |list: &Option<DeadlineList>| list.as_ref().and_then(DeadlineList::next_deadline);
        let earliest = crate::server::earliest;
        earliest(
            next(&self.idle),
            earliest(next(&self.frame), next(&self.linger)),
        )
    }

    /// A connection whose idle deadline passed, taken off the idle list (still open).
    pub fn pop_idle(&mut self, now: Instant) -> Option<Token> {
        self.idle.as_mut()?.pop_expired(now).map(Token)
    }

    /// A connection whose frame deadline passed, taken off the frame list (still open).
    pub fn pop_frame(&mut self, now: Instant) -> Option<Token> {
        self.frame.as_mut()?.pop_expired(now).map(Token)
    }

    /// A connection whose linger deadline passed, taken off the linger list (still open).
    pub fn pop_linger(&mut self, now: Instant) -> Option<Token> {
        self.linger.as_mut()?.pop_expired(now).map(Token)
    }

    /// The connection holding the most memory (partial frame and pending replies, plus
    /// `elsewhere`: what the loop holds for it, such as replies behind a deferred request),
    /// if any holds some. A scan, but it only runs when the memory budget is exceeded.
    pub fn largest_holder(&self, elsewhere: impl Fn(Token) -> usize) -> Option<(Token, usize)> {
        self.slab
            .iter()
            .map(|(key, conn)| (Token(key), conn.buffered() + elsewhere(Token(key))))
            .filter(|&(_, held)| held > 0)
            .max_by_key(|&(_, held)| held)
    }

    /// Tokens of every open connection.
    pub fn tokens(&self) -> Vec<Token> {
        self.slab.iter().map(|(key, _)| Token(key)).collect()
    }

    /// Deregister, forget and close the connection. Returns it (already deregistered) so
    /// the caller can log about it; dropping it closes the fd. `None` if already removed,
    /// which makes closing idempotent.
    pub fn remove(&mut self, poll: &PollRegistry, token: Token) -> Option<Connection<T>> {
        let mut conn = self.slab.try_remove(token.0)?;
        for list in [&mut self.idle, &mut self.frame, &mut self.linger]
            .into_iter()
            .flatten()
        {
            list.remove(token.0);
        }
        // Deregister before the fd closes (mio requires it, and it keeps a reused slab key
        // from receiving this socket's stale events). Failure only means epoll already
        // forgot the fd.
        if let Err(e) = poll.deregister(conn.stream_mut()) {
            log::debug!("{}: deregister failed: {e}", conn.peer());
        }
        Some(conn)
    }
}
