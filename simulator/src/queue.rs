//! The engine's future events, popped in exact (time, sequence) order.
//!
//! A calendar queue: the next [`BUCKETS`] buckets of 2^[`SHIFT`] ns each (about
//! 17 s in all) are a ring of vectors; an event beyond that horizon waits in a
//! binary heap until its bucket comes within reach. The bucket holding the current
//! instant is sorted once when it becomes current and then drained from its end.
//!
//! Most events of a simulation are due within seconds (the next arrival, a
//! backend's answer), so a push is an append to a vector and a pop takes the last
//! element of a short sorted one. A binary heap of every pending event instead
//! walks a dozen levels of an array larger than the L1 cache on every pop.

use gateway_core::Nanos;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Bucket width: 2^22 ns, about 4.2 ms.
const SHIFT: u32 = 22;
/// Buckets in the ring (a power of two): a horizon of about 17.6 s.
const BUCKETS: u64 = 4096;

struct Entry<E> {
    at: Nanos,
    seq: u64,
    event: E,
}

impl<E> Entry<E> {
    /// (time, sequence) as one number: one wide comparison instead of two.
    fn key(&self) -> u128 {
        u128::from(self.at.0) << 64 | u128::from(self.seq)
    }

    fn bucket(&self) -> u64 {
        self.at.0 >> SHIFT
    }
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Entry<E>) -> bool {
        self.key() == other.key()
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Entry<E>) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Entry<E>) -> Ordering {
        self.key().cmp(&other.key())
    }
}

pub(crate) struct EventQueue<E> {
    /// The current bucket's events, sorted by descending (time, sequence): the
    /// next event is the last.
    current: Vec<Entry<E>>,
    /// The absolute number of the current bucket (instant >> SHIFT).
    cursor: u64,
    /// Bucket `b` for `cursor < b < cursor + BUCKETS` is `ring[b % BUCKETS]`, unsorted.
    ring: Vec<Vec<Entry<E>>>,
    /// Events held in the ring.
    in_ring: usize,
    /// Events at or beyond `cursor + BUCKETS` when pushed.
    far: BinaryHeap<Reverse<Entry<E>>>,
}

impl<E> EventQueue<E> {
    /// An empty queue whose current bucket holds `start`.
    pub fn new(start: Nanos) -> EventQueue<E> {
        EventQueue {
            current: Vec::new(),
            cursor: start.0 >> SHIFT,
            ring: (0..BUCKETS).map(|_| Vec::new()).collect(),
            in_ring: 0,
            far: BinaryHeap::new(),
        }
    }

    /// Queues `event` at `at`, with a sequence number higher than every queued
    /// one's. `at` is never before the last popped instant.
    pub fn push(&mut self, at: Nanos, seq: u64, event: E) {
        let entry = Entry { at, seq, event };
        let bucket = entry.bucket();
        debug_assert!(bucket >= self.cursor, "an event is never scheduled in the past");
        if bucket <= self.cursor {
            // Its sequence is the highest, so it goes before (in the descending
            // order) every entry due at its instant or later.
            let key = entry.key();
            let i = self.current.partition_point(|e| e.key() > key);
            self.current.insert(i, entry);
        } else if bucket < self.cursor + BUCKETS {
            self.ring[(bucket % BUCKETS) as usize].push(entry);
            self.in_ring += 1;
        } else {
            self.far.push(Reverse(entry));
        }
    }

    /// Whether an event is queued at or before `now`, the instant of the last pop
    /// (or the start): such an event is in the current bucket.
    pub fn has_due(&self, now: Nanos) -> bool {
        self.current.last().is_some_and(|e| e.at <= now)
    }

    /// The event `n` places after the next one, when the current bucket holds it:
    /// a look ahead for cache hints, which may miss events in later buckets.
    pub fn peek(&self, n: usize) -> Option<&E> {
        let i = self.current.len().checked_sub(n + 1)?;
        Some(&self.current[i].event)
    }

    /// The next event in (time, sequence) order, and its instant.
    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        loop {
            if let Some(entry) = self.current.pop() {
                return Some((entry.at, entry.event));
            }
            let next = match self.in_ring {
                0 => self.far.peek()?.0.bucket(),
                _ => self.cursor + 1,
            };
            self.enter(next);
        }
    }

    /// Makes `bucket` current: brings far events within the new horizon into the
    /// ring, then sorts the bucket's events.
    fn enter(&mut self, bucket: u64) {
        debug_assert!(self.current.is_empty(), "a bucket is left only once drained");
        self.cursor = bucket;
        while self.far.peek().is_some_and(|e| e.0.bucket() < bucket + BUCKETS) {
            let Reverse(entry) = self.far.pop().expect("just peeked");
            self.ring[(entry.bucket() % BUCKETS) as usize].push(entry);
            self.in_ring += 1;
        }
        // The drained vector goes back to the ring, so buckets keep their capacity.
        std::mem::swap(&mut self.current, &mut self.ring[(bucket % BUCKETS) as usize]);
        self.in_ring -= self.current.len();
        self.current.sort_unstable_by_key(|e| Reverse(e.key()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Gaps from "at once" through "within a bucket" and "a few buckets on" to
    /// "beyond the ring's horizon".
    fn gap() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0..(1u64 << SHIFT),
            0..(64u64 << SHIFT),
            (BUCKETS << SHIFT) - 5..(BUCKETS << SHIFT) + 5,
            0..((3 * BUCKETS) << SHIFT),
        ]
    }

    proptest! {
        /// Interleaved pushes and pops give exactly the order of a binary heap of
        /// (time, sequence), the queue this one replaces.
        #[test]
        fn pops_in_time_then_sequence_order(
            start in 0u64..(1 << 40),
            ops in proptest::collection::vec((any::<bool>(), gap()), 1..400),
        ) {
            let mut queue = EventQueue::new(Nanos(start));
            let mut model = BinaryHeap::new();
            let (mut now, mut seq) = (Nanos(start), 0u64);
            for (is_push, gap) in ops {
                if is_push {
                    seq += 1;
                    queue.push(now + Nanos(gap), seq, seq);
                    model.push(Reverse((now + Nanos(gap), seq)));
                } else {
                    let expected = model.pop().map(|Reverse((at, seq))| (at, seq));
                    prop_assert_eq!(queue.pop(), expected);
                    if let Some((at, _)) = expected {
                        now = at;
                    }
                }
                let due = model.peek().is_some_and(|Reverse((at, _))| *at <= now);
                prop_assert_eq!(queue.has_due(now), due);
                // A look ahead, when it sees an event, sees the right one.
                let mut next: Vec<_> = model.iter().map(|Reverse((at, seq))| (*at, *seq)).collect();
                next.sort_unstable();
                for n in 0..2 {
                    if let Some(&seq) = queue.peek(n) {
                        prop_assert_eq!(Some(seq), next.get(n).map(|e| e.1));
                    }
                }
            }
            while let Some(Reverse((at, seq))) = model.pop() {
                prop_assert_eq!(queue.pop(), Some((at, seq)));
            }
            prop_assert_eq!(queue.pop(), None);
        }
    }
}
