//! Deferred replies: a request answered later, from any thread, with replies still leaving
//! in request order.
//!
//! A service that calls [`Reply::defer`](crate::Reply::defer) gets a [`Deferred`] handle and
//! may send it to another thread (a pool of its own); the handle's
//! [`complete`](Deferred::complete) puts the reply in the worker's inbox (`Inbox`) and wakes the
//! loop (mio `Waker`). The loop applies completions at the top of its next turn, and never
//! lets a reply overtake an earlier one: while a connection has a request waiting, every
//! later reply of that connection is held in the connection's queue (`Queue`), in order, and goes
//! to the connection's output only once everything before it is there.
//!
//! This module never touches a socket, and nothing here lives in `Connection`: an idle
//! connection, or one that never deferred, costs nothing. A queue exists in the worker's
//! `Deferrals` only while a request of its connection is waiting.
//!
//! **Hazard: slab keys are reused.** A handle names its connection by token *and* by the
//! serial of the queue it was made for; a connection that closed and a new one in the same
//! slot have different serials, so a late handle answers nobody instead of a stranger.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use mio::{Token, Waker};

use crate::codec::{Codec, LengthPrefixed};
use crate::service::Reply;

/// The text of the error reply a dropped, never completed handle answers with.
pub const DROPPED: &str = "request dropped without a reply";

/// One worker's mailbox: completed replies from other threads, and the waker of its loop.
#[derive(Debug)]
pub(crate) struct Inbox {
    done: Mutex<Vec<Completion>>,
    waker: Waker,
}

impl Inbox {
    pub(crate) fn new(waker: Waker) -> Inbox {
        Inbox {
            done: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// Wake the loop (shutdown, or a completion).
    pub(crate) fn wake(&self) -> std::io::Result<()> {
        self.waker.wake()
    }

    fn post(&self, completion: Completion) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.push(completion);
        // One wake-up per batch: the loop takes the whole list when it runs.
        if done.len() == 1 {
            drop(done);
            if let Err(e) = self.waker.wake() {
                log::error!("could not wake a worker for a deferred reply: {e}");
            }
        }
    }

    /// Every completion posted since the last call.
    pub(crate) fn take(&self) -> Vec<Completion> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A reply made on another thread, for slot `id` of queue `serial` of connection `token`.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) token: Token,
    serial: u64,
    id: u64,
    bytes: Vec<u8>,
}

/// A request answered later: send it to any thread, then [`complete`](Deferred::complete)
/// it. Its reply leaves in request order: replies to later requests of the same connection
/// wait behind it. Dropped without completing, it answers with an error reply
/// ([`DROPPED`]) rather than leave the peer waiting; completed after its connection closed,
/// it does nothing.
#[must_use = "a deferred request is answered by completing its handle (dropping it sends an error)"]
pub struct Deferred<C: Codec = LengthPrefixed> {
    /// `None` for a [`Reply`] made outside a server (a unit test): the answer is dropped.
    inbox: Option<Arc<Inbox>>,
    token: Token,
    serial: u64,
    id: u64,
    done: bool,
    codec: PhantomData<fn() -> C>,
}

impl<C: Codec> Deferred<C> {
    /// Answer the request: `write` writes its replies as `Service::call` would (any of
    /// [`Reply`]'s methods; [`Reply::close`] and [`Reply::defer`] are not honoured here).
    /// Callable from any thread.
    pub fn complete(mut self, write: impl FnOnce(&mut Reply<'_, C>)) {
        let mut bytes = Vec::new();
        write(&mut Reply::new(&mut bytes));
        self.done = true;
        self.post(bytes);
    }

    fn post(&mut self, bytes: Vec<u8>) {
        if let Some(inbox) = &self.inbox {
            inbox.post(Completion {
                token: self.token,
                serial: self.serial,
                id: self.id,
                bytes,
            });
        }
    }
}

impl<C: Codec> Drop for Deferred<C> {
    fn drop(&mut self) {
        if !self.done {
            let mut bytes = Vec::new();
            C::encode_error(&mut bytes, DROPPED);
            self.post(bytes);
        }
    }
}

impl<C: Codec> std::fmt::Debug for Deferred<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deferred({:?}#{}/{})", self.token, self.serial, self.id)
    }
}

/// One worker's queues of replies held for order, by connection.
#[derive(Debug)]
pub(crate) struct Deferrals {
    inbox: Option<Arc<Inbox>>,
    queues: HashMap<Token, Queue>,
    next_serial: u64,
}

/// One connection's replies from its first waiting request on, in request order.
#[derive(Debug)]
struct Queue {
    serial: u64,
    /// The id of `slots[0]`; ids grow by one per slot.
    first: u64,
    slots: VecDeque<Slot>,
    waiting: usize,
}

#[derive(Debug)]
enum Slot {
    /// A deferred request not completed yet.
    Waiting,
    /// Replies ready, held behind an earlier waiting one.
    Ready(Vec<u8>),
}

impl Deferrals {
    pub(crate) fn new(inbox: Option<Arc<Inbox>>) -> Deferrals {
        Deferrals {
            inbox,
            queues: HashMap::new(),
            next_serial: 0,
        }
    }

    /// Whether `token` has a request waiting (then its replies go to [`Deferrals::tail`]).
    /// The empty check first: on the hot path no connection is deferring.
    #[inline]
    pub(crate) fn is_waiting(&self, token: Token) -> bool {
        !self.queues.is_empty() && self.queues.contains_key(&token)
    }

    /// Whether `token` holds as many waiting requests as a connection may, or as many held
    /// reply bytes as its output bound: then it is read-paused, like output backpressure.
    /// Checked before every read: the common case (no queue at all) is one length test.
    #[inline]
    pub(crate) fn is_full(&self, token: Token, max_waiting: usize, max_bytes: usize) -> bool {
        !self.queues.is_empty() && self.is_full_slow(token, max_waiting, max_bytes)
    }

    #[cold]
    #[inline(never)]
    fn is_full_slow(&self, token: Token, max_waiting: usize, max_bytes: usize) -> bool {
        self.queues.get(&token).is_some_and(|q| {
            q.waiting >= max_waiting
                || q.slots
                    .iter()
                    .map(|s| match s {
                        Slot::Ready(b) => b.len(),
                        Slot::Waiting => 0,
                    })
                    .sum::<usize>()
                    >= max_bytes
        })
    }

    /// Bytes of replies `token` holds behind a waiting request (allocated capacity), for the
    /// memory budget. The common case (no connection deferring) is one length test.
    #[inline]
    pub(crate) fn held(&self, token: Token) -> usize {
        if self.queues.is_empty() {
            0
        } else {
            self.held_slow(token)
        }
    }

    #[cold]
    #[inline(never)]
    fn held_slow(&self, token: Token) -> usize {
        self.queues.get(&token).map_or(0, |q| {
            q.slots
                .iter()
                .map(|s| match s {
                    Slot::Ready(b) => b.capacity(),
                    Slot::Waiting => 0,
                })
                .sum()
        })
    }

    /// Add a waiting slot for `token` and make its handle.
    #[cold]
    #[inline(never)]
    pub(crate) fn defer<C: Codec>(&mut self, token: Token) -> Deferred<C> {
        let next_serial = &mut self.next_serial;
        let queue = self.queues.entry(token).or_insert_with(|| {
            *next_serial += 1;
            Queue {
                serial: *next_serial,
                first: 0,
                slots: VecDeque::new(),
                waiting: 0,
            }
        });
        let id = queue.first + queue.slots.len() as u64;
        queue.slots.push_back(Slot::Waiting);
        queue.waiting += 1;
        Deferred {
            inbox: self.inbox.clone(),
            token,
            serial: queue.serial,
            id,
            done: false,
            codec: PhantomData,
        }
    }

    /// Requests of `token` waiting for their deferred reply now.
    pub(crate) fn waiting(&self, token: Token) -> usize {
        self.queues.get(&token).map_or(0, |q| q.waiting)
    }

    /// Where replies of `token` go while a request before them waits. Only called when
    /// [`Deferrals::is_waiting`]. Out of line: the hot path (no deferral) never calls it.
    #[cold]
    #[inline(never)]
    pub(crate) fn tail(&mut self, token: Token) -> &mut Vec<u8> {
        let queue = self.queues.get_mut(&token).expect("a queue while waiting");
        if !matches!(queue.slots.back(), Some(Slot::Ready(_))) {
            queue.slots.push_back(Slot::Ready(Vec::new()));
        }
        match queue.slots.back_mut() {
            Some(Slot::Ready(bytes)) => bytes,
            _ => unreachable!("a Ready slot was just pushed"),
        }
    }

    /// Queue `bytes` (replies to requests after a waiting one) behind it, if `token` has a
    /// request waiting.
    pub(crate) fn hold(&mut self, token: Token, bytes: &[u8]) {
        if !bytes.is_empty() && self.is_waiting(token) {
            self.tail(token).extend_from_slice(bytes);
        }
    }

    /// File a completion; the replies it releases (everything now in order), appended to
    /// `released`, and for which connection. A completion for a closed connection (no queue,
    /// or a queue of a later connection in the same slot) releases nothing.
    pub(crate) fn apply(&mut self, done: Completion, released: &mut Vec<u8>) -> Option<Token> {
        let queue = self.queues.get_mut(&done.token)?;
        if queue.serial != done.serial {
            return None; // a stale handle: its connection closed, the slot was reused
        }
        let index = done.id.checked_sub(queue.first)?;
        let slot = queue.slots.get_mut(usize::try_from(index).ok()?)?;
        debug_assert!(matches!(slot, Slot::Waiting), "completed twice");
        *slot = Slot::Ready(done.bytes);
        queue.waiting -= 1;
        while let Some(Slot::Ready(_)) = queue.slots.front() {
            if let Some(Slot::Ready(bytes)) = queue.slots.pop_front() {
                released.extend_from_slice(&bytes);
            }
            queue.first += 1;
        }
        if queue.waiting == 0 {
            debug_assert!(queue.slots.is_empty(), "ready slots left behind no waiter");
            self.queues.remove(&done.token);
        }
        Some(done.token)
    }

    /// The connection closed: forget its queue, so its handles answer nobody.
    pub(crate) fn forget(&mut self, token: Token) {
        if !self.queues.is_empty() {
            self.queues.remove(&token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion<C: Codec>(mut handle: Deferred<C>, bytes: &[u8]) -> Completion {
        handle.done = true;
        Completion {
            token: handle.token,
            serial: handle.serial,
            id: handle.id,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn replies_leave_in_request_order_whatever_order_they_complete_in() {
        let mut d = Deferrals::new(None);
        let t = Token(3);
        let first = d.defer::<LengthPrefixed>(t);
        d.tail(t).extend_from_slice(b"b");
        let second = d.defer::<LengthPrefixed>(t);
        d.tail(t).extend_from_slice(b"d");
        let mut out = Vec::new();
        assert_eq!(d.apply(completion(second, b"c"), &mut out), Some(t));
        assert!(out.is_empty(), "released behind a waiting request: {out:?}");
        assert!(d.is_waiting(t));
        d.apply(completion(first, b"a"), &mut out);
        assert_eq!(out, b"abcd");
        assert!(!d.is_waiting(t));
    }

    #[test]
    fn a_handle_of_a_closed_connection_does_not_answer_the_next_one_in_its_slot() {
        let mut d = Deferrals::new(None);
        let t = Token(0);
        let old = d.defer::<LengthPrefixed>(t);
        d.forget(t);
        let new = d.defer::<LengthPrefixed>(t);
        let mut out = Vec::new();
        assert_eq!(d.apply(completion(old, b"stale"), &mut out), None);
        assert!(out.is_empty());
        d.apply(completion(new, b"fresh"), &mut out);
        assert_eq!(out, b"fresh");
    }
}
