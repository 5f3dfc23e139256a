//! The instants at which the lifecycle acts on its own: each attempt's timeout
//! and each retry's send instant. Drivers learn the next one from
//! `Lifecycle::poll_timeout` and report it with `Lifecycle::handle_timeout`; none
//! computes a timeout or a wait itself.

use crate::limit_book::RequestId;
use crate::time::Nanos;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// One attempt's timeout instant.
#[derive(Clone, Copy, Debug)]
struct AttemptDeadline {
    at: Nanos,
    id: RequestId,
    /// Cleared when the attempt ends before its timeout (most do).
    live: bool,
}

/// Names an attempt's entry so that it can be cancelled in O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

#[derive(Default)]
pub(crate) struct Deadlines {
    /// Attempt timeouts in the order attempts were sent. Every attempt of a
    /// lifecycle has the same timeout and time never runs backwards in the core,
    /// so this is also the order of their instants: a queue, not a heap, and a
    /// cancelled entry is a flag, dropped when it reaches the front.
    attempts: VecDeque<AttemptDeadline>,
    /// The ticket of `attempts[0]`.
    first: u64,
    /// Retry instants. Rare (only after a failed attempt with a wait), so a heap;
    /// an entry whose request has moved on is skipped by the lifecycle.
    retries: BinaryHeap<Reverse<(Nanos, RequestId)>>,
}

impl Deadlines {
    pub(crate) fn add_attempt(&mut self, at: Nanos, id: RequestId) -> Ticket {
        debug_assert!(self.attempts.back().is_none_or(|last| last.at <= at), "attempt deadlines come in order");
        self.attempts.push_back(AttemptDeadline { at, id, live: true });
        Ticket(self.first + self.attempts.len() as u64 - 1)
    }

    /// The attempt ended before its timeout: its deadline is void.
    pub(crate) fn cancel_attempt(&mut self, ticket: Ticket) {
        if let Some(entry) = ticket.0.checked_sub(self.first).and_then(|i| self.attempts.get_mut(i as usize)) {
            entry.live = false;
        }
        self.drop_cancelled();
    }

    fn drop_cancelled(&mut self) {
        while self.attempts.front().is_some_and(|front| !front.live) {
            self.attempts.pop_front();
            self.first += 1;
        }
    }

    pub(crate) fn add_retry(&mut self, at: Nanos, id: RequestId) {
        self.retries.push(Reverse((at, id)));
    }

    /// Pops retry entries from the top while `stale` says so.
    pub(crate) fn drop_retries_while(&mut self, mut stale: impl FnMut(Nanos, RequestId) -> bool) {
        while self.retries.peek().is_some_and(|Reverse((at, id))| stale(*at, *id)) {
            self.retries.pop();
        }
    }

    /// The earliest instant of all.
    pub(crate) fn next(&self) -> Option<Nanos> {
        let attempt = self.attempts.front().map(|d| d.at);
        let retry = self.retries.peek().map(|Reverse((at, _))| *at);
        match (attempt, retry) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }

    /// The earliest deadline due at `now`, if any; ties go to the attempt.
    pub(crate) fn pop_due(&mut self, now: Nanos) -> Option<Due> {
        self.drop_cancelled();
        let attempt = self.attempts.front().filter(|d| d.at <= now).map(|d| d.at);
        let retry = self.retries.peek().filter(|Reverse((at, _))| *at <= now).map(|Reverse((at, _))| *at);
        match (attempt, retry) {
            (Some(a), r) if r.is_none_or(|r| a <= r) => {
                let entry = self.attempts.pop_front().expect("just seen");
                self.first += 1;
                Some(Due::AttemptTimeout(entry.id))
            }
            (_, Some(_)) => self.retries.pop().map(|Reverse((at, id))| Due::Retry(at, id)),
            (None, None) => None,
            (Some(_), None) => unreachable!("matched by the first arm"),
        }
    }
}

/// A deadline that has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// The request's current attempt has had no answer within its timeout.
    AttemptTimeout(RequestId),
    /// The request's retry was due at this instant (if it still waits for it).
    Retry(Nanos, RequestId),
}
