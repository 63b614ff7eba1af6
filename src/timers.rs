//! Deadlines for every connection, in O(1) per update and per expiry.
//!
//! The loop keeps three lists: idle time (since the last byte in or out), frame time (since
//! the first byte of an unfinished frame) and linger time (since a graceful close shut down
//! writing). Within one list all connections share one timeout, so a connection touched later
//! also expires later: an ordered list where "touch" moves a connection to the tail keeps the
//! list sorted by deadline without a heap or a wheel. The head is always the next to expire, so each loop
//! turn costs O(1) plus one step per connection actually expiring, however many are idle.
//! The list is intrusive over slab keys (one small node per slot, grown only as far as the
//! highest key ever touched, so a list nobody uses costs nothing), so it allocates nothing
//! per event. Time is always passed in (`now`), never read here, so tests need no sleeping.

use std::time::{Duration, Instant};

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    prev: u32,
    next: u32,
    /// `None` while the key is not in the list.
    deadline: Option<Instant>,
}

const UNLINKED: Node = Node {
    prev: NIL,
    next: NIL,
    deadline: None,
};

/// Connections ordered by deadline (last touch + the list's timeout), earliest first.
#[derive(Debug)]
pub struct DeadlineList {
    timeout: Duration,
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
}

impl DeadlineList {
    /// An empty list whose deadlines are `timeout` after each touch.
    pub fn new(timeout: Duration) -> DeadlineList {
        DeadlineList {
            timeout,
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// `key` was touched at `now`: its deadline becomes `now + timeout` (inserting it if new).
    pub fn touch(&mut self, key: usize, now: Instant) {
        if key >= self.nodes.len() {
            self.nodes.resize(key + 1, UNLINKED);
        }
        let k = key as u32;
        if self.tail != k {
            self.unlink(k);
            self.push_back(k);
        }
        self.nodes[key].deadline = Some(now + self.timeout);
    }

    /// Forget `key` (its connection closed, or what was timed is over). A no-op if it is not
    /// in the list.
    pub fn remove(&mut self, key: usize) {
        if key < self.nodes.len() {
            self.unlink(key as u32);
        }
    }

    /// The earliest deadline, if any connection is tracked.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes.get(self.head as usize).and_then(|n| n.deadline)
    }

    /// The key of a connection whose deadline is at or before `now`, removed from the list.
    pub fn pop_expired(&mut self, now: Instant) -> Option<usize> {
        match self.next_deadline() {
            Some(deadline) if deadline <= now => {
                let key = self.head;
                self.unlink(key);
                Some(key as usize)
            }
            _ => None,
        }
    }

    fn push_back(&mut self, k: u32) {
        self.nodes[k as usize].prev = self.tail;
        self.nodes[k as usize].next = NIL;
        match self.tail {
            NIL => self.head = k,
            tail => self.nodes[tail as usize].next = k,
        }
        self.tail = k;
    }

    fn unlink(&mut self, k: u32) {
        let node = self.nodes[k as usize];
        if node.deadline.is_none() {
            return;
        }
        match node.prev {
            NIL => self.head = node.next,
            prev => self.nodes[prev as usize].next = node.next,
        }
        match node.next {
            NIL => self.tail = node.prev,
            next => self.nodes[next as usize].prev = node.prev,
        }
        self.nodes[k as usize] = UNLINKED;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn drain(list: &mut DeadlineList, now: Instant) -> Vec<usize> {
        std::iter::from_fn(|| list.pop_expired(now)).collect()
    }

    #[test]
    fn expires_in_order_of_last_activity() {
        let t0 = Instant::now();
        let mut list = DeadlineList::new(10 * SEC);
        list.touch(3, t0);
        list.touch(1, t0 + SEC);
        list.touch(7, t0 + 2 * SEC);
        assert_eq!(list.next_deadline(), Some(t0 + 10 * SEC));
        assert_eq!(drain(&mut list, t0 + 9 * SEC), Vec::<usize>::new());
        assert_eq!(drain(&mut list, t0 + 11 * SEC), vec![3, 1]);
        assert_eq!(drain(&mut list, t0 + 20 * SEC), vec![7]);
        assert_eq!(list.next_deadline(), None);
    }

    #[test]
    fn touch_moves_a_connection_to_the_back() {
        let t0 = Instant::now();
        let mut list = DeadlineList::new(10 * SEC);
        list.touch(0, t0);
        list.touch(1, t0);
        list.touch(0, t0 + 5 * SEC);
        assert_eq!(drain(&mut list, t0 + 10 * SEC), vec![1]);
        assert_eq!(list.next_deadline(), Some(t0 + 15 * SEC));
    }

    #[test]
    fn removed_keys_never_expire_and_can_be_reused() {
        let t0 = Instant::now();
        let mut list = DeadlineList::new(SEC);
        for key in 0..4 {
            list.touch(key, t0);
        }
        list.remove(1);
        list.remove(3);
        list.remove(3);
        list.touch(3, t0 + SEC);
        assert_eq!(drain(&mut list, t0 + SEC), vec![0, 2]);
        assert_eq!(drain(&mut list, t0 + 2 * SEC), vec![3]);
    }

    #[test]
    fn a_thousand_idle_connections_cost_nothing_until_one_expires() {
        let t0 = Instant::now();
        let mut list = DeadlineList::new(SEC);
        for key in 0..1000 {
            list.touch(key, t0 + Duration::from_millis(key as u64));
        }
        assert_eq!(list.pop_expired(t0), None);
        assert_eq!(
            drain(&mut list, t0 + SEC + Duration::from_millis(2)),
            vec![0, 1, 2]
        );
    }
}
