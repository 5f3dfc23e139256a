//! A map from key to counter state with eviction of idle counters.
//!
//! Every counter has exactly one entry in an expiry heap. When its deadline comes,
//! the counter is asked when it becomes idle (indistinguishable from a fresh one);
//! if that time has passed it is removed, else it is rescheduled. Memory is thus
//! bounded by the keys active within the last period, and iteration order of the
//! hash map is never observed: only the heap's (deadline, key) order is.

use crate::time::Nanos;
use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub type FixedHasher = foldhash::fast::FixedState;

pub struct CounterMap<S> {
    map: HashMap<String, S, FixedHasher>,
    expiry: BinaryHeap<Reverse<(Nanos, Box<str>)>>,
}

impl<S> CounterMap<S> {
    /// `hash_seed` lets a server pick an unpredictable seed against hash flooding
    /// while a simulation keeps a fixed one.
    pub fn new(hash_seed: u64) -> CounterMap<S> {
        CounterMap { map: HashMap::with_hasher(FixedHasher::with_seed(hash_seed)), expiry: BinaryHeap::new() }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&S> {
        self.map.get(key)
    }

    /// The counter for `key`, created fresh (and scheduled for an idle check at
    /// `now`) when absent.
    pub fn entry(&mut self, now: Nanos, key: &str, fresh: impl FnOnce() -> S) -> &mut S {
        match self.map.entry_ref(key) {
            EntryRef::Occupied(entry) => entry.into_mut(),
            EntryRef::Vacant(entry) => {
                self.expiry.push(Reverse((now, Box::from(key))));
                entry.insert(fresh())
            }
        }
    }

    /// Removes the counters idle at `now`; reschedules the rest that came due.
    pub fn evict(&mut self, now: Nanos, idle_at: impl Fn(&S) -> Nanos) {
        while let Some(Reverse((deadline, _))) = self.expiry.peek() {
            if *deadline > now {
                return;
            }
            let Reverse((_, key)) = self.expiry.pop().expect("peeked");
            let Some(state) = self.map.get(&*key) else {
                debug_assert!(false, "every scheduled key has a counter");
                continue;
            };
            let idle = idle_at(state);
            if idle <= now {
                self.map.remove(&*key);
            } else {
                self.expiry.push(Reverse((idle, key)));
            }
        }
    }

    /// The next instant at which `evict` has work.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.expiry.peek().map(|Reverse((t, _))| *t)
    }
}
