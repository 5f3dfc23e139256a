//! Slot numbers by key hash, for [`crate::counters::CounterMap`]: open addressing
//! with linear probing in one array of words.
//!
//! A lookup starts at an entry that the hash alone decides, so a driver that
//! knows the next key can ask for that cache line first and for the counter it
//! names a little later (see [`crate::counters::CounterMap::prefetch_lookup`]):
//! neither step then waits on memory. A general hash table reads its control
//! bytes before it knows where its entries are, two misses in a row.
//!
//! An entry is the hash's high half (which also picks the entry's home) above
//! the slot number plus one; zero is empty. The table is kept at most half full,
//! so a probe usually ends in the line it starts in, and a removal shifts later
//! entries of its run back (no tombstones), so runs never grow from churn.

use cache_hint as hint;

const MIN_CAPACITY: usize = 16;

#[derive(Default)]
pub(crate) struct SlotIndex {
    entries: Vec<u64>,
    len: usize,
}

fn tag(hash: u64) -> u32 {
    (hash >> 32) as u32
}

fn entry(hash: u64, slot: u32) -> u64 {
    debug_assert!(slot < u32::MAX, "slot numbers stay below 2^32 - 1");
    u64::from(tag(hash)) << 32 | u64::from(slot + 1)
}

fn slot_of(entry: u64) -> u32 {
    entry as u32 - 1
}

/// Where the probe of an entry, or of a hash (whose high half an entry keeps),
/// starts in a table of `mask + 1` entries.
fn home(entry_or_hash: u64, mask: usize) -> usize {
    (entry_or_hash >> 32) as usize & mask
}

impl SlotIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    /// Asks for the cache line where a lookup of `hash` starts (a hint).
    pub(crate) fn prefetch(&self, hash: u64) {
        if let Some(start) = self.entries.get(home(hash, self.mask())) {
            hint::prefetch(start);
        }
    }

    /// The first slot with this hash for which `is` holds.
    pub fn find(&self, hash: u64, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.mask();
        let mut i = home(hash, mask);
        // Ends at an empty entry: the table is never full.
        loop {
            let &e = self.entries.get(i)?;
            if e == 0 {
                return None;
            }
            if (e >> 32) as u32 == tag(hash) && is(slot_of(e)) {
                return Some(slot_of(e));
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `slot`, whose key's hash is `hash` and which is not in the index.
    pub fn insert(&mut self, hash: u64, slot: u32) {
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        place(&mut self.entries, entry(hash, slot));
        self.len += 1;
    }

    /// Removes `slot`, added with `hash`; false when it is not there.
    pub fn remove(&mut self, hash: u64, slot: u32) -> bool {
        let (target, mask) = (entry(hash, slot), self.mask());
        let mut hole = home(target, mask);
        loop {
            match self.entries.get(hole) {
                None | Some(0) => return false,
                Some(&e) if e == target => break,
                Some(_) => hole = (hole + 1) & mask,
            }
        }
        // Each later entry of the run moves into the hole when the hole lies on
        // its way from its home, so every entry stays reachable from its home.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == 0 {
                break;
            }
            if j.wrapping_sub(home(e, mask)) & mask >= j.wrapping_sub(hole) & mask {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = 0;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let capacity = (self.entries.len() * 2).max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.entries, vec![0; capacity]);
        for e in old.into_iter().filter(|&e| e != 0) {
            place(&mut self.entries, e);
        }
    }
}

/// Puts `e` in the first empty entry from its home on.
fn place(entries: &mut [u64], e: u64) {
    let mask = entries.len() - 1;
    let mut i = home(e, mask);
    while entries[i] != 0 {
        i = (i + 1) & mask;
    }
    entries[i] = e;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64),
        Remove(usize),
    }

    /// Hashes whose high halves share few values, so runs form, wrap around the
    /// table's end and collide on their tags.
    fn hash() -> impl Strategy<Value = u64> {
        prop_oneof![(0u64..8).prop_map(|h| h << 32 | h), (0u64..64).prop_map(|h| h.rotate_right(6)), any::<u64>()]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![3 => hash().prop_map(Op::Insert), 2 => any::<usize>().prop_map(Op::Remove)]
    }

    proptest! {
        /// After every insertion and removal, each slot is found by its hash and
        /// nothing else is, as in a map from slot to hash.
        #[test]
        fn finds_exactly_what_a_map_holds(ops in proptest::collection::vec(op(), 1..300)) {
            let mut index = SlotIndex::default();
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            let mut next = 0u32;
            for op in ops {
                match op {
                    Op::Insert(hash) => {
                        index.insert(hash, next);
                        model.insert(next, hash);
                        next += 1;
                    }
                    Op::Remove(pick) => {
                        let Some((&slot, &hash)) = model.iter().nth(pick % model.len().max(1)) else { continue };
                        prop_assert!(index.remove(hash, slot));
                        prop_assert!(!index.remove(hash, slot));
                        model.remove(&slot);
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                prop_assert!(index.len() * 2 <= index.entries.len());
                for (&slot, &hash) in &model {
                    prop_assert_eq!(index.find(hash, |s| s == slot), Some(slot));
                }
                prop_assert_eq!(index.find(12345, |s| s == next), None);
            }
        }
    }

    #[test]
    fn an_empty_index_finds_and_removes_nothing() {
        let mut index = SlotIndex::default();
        assert_eq!(index.find(7, |_| true), None);
        assert!(!index.remove(7, 0));
        index.prefetch(7);
    }
}
