//! A map from key to counter state with eviction of idle counters.
//!
//! Counters live in a slab; a hash table maps a key's hash to its slot, and a
//! hashed timing wheel holds every slot once, in the bucket of the instant it is
//! next due for an idle check. When a bucket's time has passed, each of its counters
//! is asked when it becomes idle (indistinguishable from a fresh one); if that time
//! has passed it is removed, else it moves to the bucket of that instant. Memory is
//! thus bounded by the keys active within the last period (plus one bucket), and
//! every operation is O(1): no heap of keys, no string comparisons beyond the one
//! a lookup needs.
//!
//! A driver that holds a counter across calls (a request in flight) pins it by its
//! [`RowId`]: a pinned counter is never removed, so the id stays valid and the way
//! back needs no lookup.
//!
//! Eviction is never observable in a decision (an evicted counter is exactly a
//! fresh one), so its granularity, and how long a pin delays it, only change
//! memory. Hash-map iteration order is never observed: the wheel's buckets are
//! walked in time order, each in the order its slots were scheduled.

use crate::slot_index::SlotIndex;
use crate::time::Nanos;
use compact_str::CompactString;
use std::hash::BuildHasher;

pub type FixedHasher = foldhash::fast::FixedState;

/// Bucket width: 2^27 ns, about 134 ms.
const BUCKET_SHIFT: u32 = 27;
/// How long after becoming idle a counter may still be held: one bucket.
pub const EVICTION_LAG: Nanos = Nanos(1 << BUCKET_SHIFT);
/// Buckets in the wheel (a power of two): one turn is about 137 s. Counters due
/// later wait in their bucket through whole turns, untouched but for a comparison.
const WHEEL_BUCKETS: usize = 1024;

/// A counter's place in its [`CounterMap`], valid while the counter is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowId(u32);

struct Slot<S> {
    hash: u64,
    key: CompactString,
    /// When the wheel next looks at this counter.
    due: Nanos,
    /// Holders of this slot's `RowId`; a pinned counter is not removed.
    pins: u32,
    state: S,
}

pub struct CounterMap<S> {
    hasher: FixedHasher,
    /// Slot numbers by key hash.
    index: SlotIndex,
    /// The counters; a freed slot is reused (with its key's buffer) for the next key.
    slots: Vec<Slot<S>>,
    free: Vec<u32>,
    wheel: Vec<Vec<u32>>,
    /// The absolute number (instant >> BUCKET_SHIFT) of the next bucket to walk.
    cursor: u64,
}

impl<S> CounterMap<S> {
    /// `hash_seed` lets a server pick an unpredictable seed against hash flooding
    /// while a simulation keeps a fixed one.
    pub fn new(hash_seed: u64) -> CounterMap<S> {
        CounterMap {
            hasher: FixedHasher::with_seed(hash_seed),
            index: SlotIndex::default(),
            slots: Vec::new(),
            free: Vec::new(),
            wheel: Vec::new(),
            cursor: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&S> {
        let hash = self.hasher.hash_one(key);
        let i = self.index.find(hash, |i| same_key(&self.slots[i as usize].key, key))?;
        Some(&self.slots[i as usize].state)
    }

    /// The counter for `key`, created fresh (and scheduled for an idle check at
    /// `now`) when absent.
    pub fn entry(&mut self, now: Nanos, key: &str, fresh: impl FnOnce() -> S) -> &mut S {
        let row = self.find_or_insert(now, key, fresh);
        self.state_mut(row)
    }

    /// Where the counter for `key` is, created fresh when absent (see [`CounterMap::entry`]).
    pub fn find_or_insert(&mut self, now: Nanos, key: &str, fresh: impl FnOnce() -> S) -> RowId {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        if let Some(i) = self.index.find(hash, |i| same_key(&slots[i as usize].key, key)) {
            return RowId(i);
        }
        let i = self.allocate(hash, key, now, fresh());
        self.index.insert(hash, i);
        self.schedule(i, now);
        RowId(i)
    }

    /// The first half of a hint that `key` will be looked up soon: asks for the
    /// index entries where its lookup starts, reading nothing that may be cold.
    /// No state changes and nothing a decision reads depends on it.
    pub(crate) fn prefetch_lookup(&self, key: &str) {
        self.index.prefetch(self.hasher.hash_one(key));
    }

    /// Asks the CPU to bring the counter of `key` into its cache, without waiting
    /// for it; best called a little after [`CounterMap::prefetch_lookup`], when
    /// the index entries it reads are at hand. A hint, like that one.
    pub(crate) fn prefetch(&self, key: &str) {
        let hash = self.hasher.hash_one(key);
        // The first entry with the hash's tag, its key unread: comparing keys
        // would wait for the very counter asked for, and tags are 32 bits, so
        // another key's tag is seldom there.
        let found = self.index.find(hash, |_| true);
        if let Some(slot) = found.and_then(|i| self.slots.get(i as usize)) {
            cache_hint::prefetch(slot);
        }
    }

    /// Asks for the counter at `row` toward the CPU's cache (a hint, like
    /// [`CounterMap::prefetch`]); a row that is not there is ignored.
    pub(crate) fn prefetch_row(&self, row: RowId) {
        if let Some(slot) = self.slots.get(row.0 as usize) {
            cache_hint::prefetch(slot);
        }
    }

    /// The key of the counter at `row`, which the caller has pinned or has just found.
    pub fn key(&self, row: RowId) -> &str {
        &self.slots[row.0 as usize].key
    }

    /// The counter at `row`, which the caller has pinned or has just found.
    pub fn state_mut(&mut self, row: RowId) -> &mut S {
        &mut self.slots[row.0 as usize].state
    }

    /// Keeps the counter at `row` (and so `row` itself) until a matching `unpin`.
    pub fn pin(&mut self, row: RowId) {
        self.slots[row.0 as usize].pins += 1;
    }

    pub fn unpin(&mut self, row: RowId) {
        let pins = &mut self.slots[row.0 as usize].pins;
        debug_assert!(*pins > 0, "unpinned more often than pinned");
        *pins -= 1;
    }

    fn allocate(&mut self, hash: u64, key: &str, now: Nanos, state: S) -> u32 {
        if let Some(i) = self.free.pop() {
            let slot = &mut self.slots[i as usize];
            slot.hash = hash;
            slot.key.clear();
            slot.key.push_str(key);
            slot.due = now;
            debug_assert_eq!(slot.pins, 0, "a free slot is not pinned");
            slot.state = state;
            return i;
        }
        self.slots.push(Slot { hash, key: CompactString::from(key), due: now, pins: 0, state });
        u32::try_from(self.slots.len() - 1).ok().filter(|&i| i < u32::MAX).expect("fewer than 2^32 - 1 counters")
    }

    fn schedule(&mut self, i: u32, due: Nanos) {
        if self.wheel.is_empty() {
            self.wheel = vec![Vec::new(); WHEEL_BUCKETS];
            self.cursor = bucket_of(due);
        }
        self.slots[i as usize].due = due;
        self.wheel[bucket_of(due) as usize % WHEEL_BUCKETS].push(i);
    }

    /// Removes the counters idle at `now` whose buckets have passed; reschedules
    /// the others that came due.
    pub fn evict(&mut self, now: Nanos, idle_at: impl Fn(&S) -> Nanos) {
        let current = bucket_of(now);
        if self.wheel.is_empty() || self.cursor >= current {
            return;
        }
        // After a long quiet spell one turn visits every bucket once.
        self.cursor = self.cursor.max(current.saturating_sub(WHEEL_BUCKETS as u64));
        while self.cursor < current {
            self.walk(self.cursor, now, &idle_at);
            self.cursor += 1;
        }
    }

    /// Looks at the counters of bucket `number`, which ends at or before `now`.
    fn walk(&mut self, number: u64, now: Nanos, idle_at: &impl Fn(&S) -> Nanos) {
        let end = Nanos((number + 1) << BUCKET_SHIFT);
        let position = number as usize % WHEEL_BUCKETS;
        let mut list = std::mem::take(&mut self.wheel[position]);
        for i in list.drain(..) {
            let slot = &self.slots[i as usize];
            if slot.due >= end {
                // Due in a later turn of the wheel.
                self.wheel[position].push(i);
                continue;
            }
            let idle = idle_at(&slot.state);
            if idle <= now && slot.pins == 0 {
                self.remove(i);
            } else {
                // A pinned idle counter is looked at again in the current bucket.
                self.schedule(i, idle.max(now));
            }
        }
        if self.wheel[position].is_empty() {
            // Keep the bucket's capacity for its next turn.
            self.wheel[position] = list;
        }
    }

    fn remove(&mut self, i: u32) {
        let hash = self.slots[i as usize].hash;
        let removed = self.index.remove(hash, i);
        debug_assert!(removed, "every scheduled slot is indexed");
        self.free.push(i);
    }

    /// An instant at which `evict` has work: the end of the first bucket holding a
    /// counter due in the current turn, or one turn ahead when all are due later.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if self.index.is_empty() {
            return None;
        }
        let turn = self.cursor..self.cursor + WHEEL_BUCKETS as u64;
        for number in turn.clone() {
            let end = Nanos((number + 1) << BUCKET_SHIFT);
            let bucket = &self.wheel[number as usize % WHEEL_BUCKETS];
            if bucket.iter().any(|&i| self.slots[i as usize].due < end) {
                return Some(end);
            }
        }
        Some(Nanos(turn.end << BUCKET_SHIFT))
    }
}

/// `a == b`, for the short keys counters have (an IP, an id), without a call to
/// `memcmp`: keys of up to 16 bytes compare as two words each (overlapping when
/// shorter than 16), a comparison made on every lookup.
#[inline]
fn same_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0..=3 => a == b,
        4..=7 => {
            let word = |s: &[u8], at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
            word(a, 0) == word(b, 0) && word(a, n - 4) == word(b, n - 4)
        }
        8..=16 => {
            let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
            word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8)
        }
        _ => a == b,
    }
}

fn bucket_of(t: Nanos) -> u64 {
    t.0 >> BUCKET_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Nanos = Nanos::from_secs(1);

    proptest::proptest! {
        /// Short keys compare as words: the same answer as `==`, for keys that
        /// differ anywhere, at every length around the word sizes.
        #[test]
        fn same_key_is_string_equality(
            a in "[a-c0-9.]{0,20}",
            flip in proptest::option::of(0usize..20),
        ) {
            let mut b = a.clone().into_bytes();
            if let Some(i) = flip.filter(|&i| i < b.len()) {
                b[i] = if b[i] == b'x' { b'y' } else { b'x' };
            }
            let b = String::from_utf8(b).expect("ascii");
            proptest::prop_assert_eq!(same_key(&a, &b), a == b);
            let shorter = &a[..a.len().saturating_sub(1)];
            proptest::prop_assert_eq!(same_key(&a, shorter), a == shorter);
        }
    }

    #[test]
    fn counters_live_until_idle_and_slots_are_reused() {
        // Each counter's value is the instant it becomes idle.
        let mut map: CounterMap<u64> = CounterMap::new(7);
        for k in 0..100u64 {
            *map.entry(Nanos::ZERO, &format!("key-{k}"), || 0) = (k + 1) * SECOND.0;
        }
        assert_eq!(map.len(), 100);
        map.evict(Nanos::from_secs(50), |&idle| Nanos(idle));
        // All were due at 0 s, in a bucket long past: keys 0..=49 are idle by 50 s.
        let left: Vec<u64> = (0..100).filter(|k| map.get(&format!("key-{k}")).is_some()).collect();
        assert_eq!(left, (50..100).collect::<Vec<_>>());
        // Key 50 is idle at 51 s but its bucket ends after that: it waits for the bucket.
        map.evict(Nanos::from_secs(51), |&idle| Nanos(idle));
        assert!(map.get("key-50").is_some());
        map.evict(Nanos::from_millis(51_200), |&idle| Nanos(idle));
        assert!(map.get("key-50").is_none());
        map.evict(Nanos::from_secs(1_000), |&idle| Nanos(idle));
        assert!(map.is_empty());
        assert_eq!(map.next_deadline(), None);
        let before = map.slots.len();
        *map.entry(Nanos::from_secs(1_000), "again", || 5) += 1;
        assert_eq!(map.slots.len(), before, "a freed slot is reused");
        assert_eq!(map.get("again"), Some(&6));
    }

    #[test]
    fn counters_due_after_a_whole_turn_survive_it() {
        let mut map: CounterMap<u64> = CounterMap::new(0);
        let far = Nanos::from_secs(3_600);
        *map.entry(Nanos::ZERO, "quota", || 0) = far.0;
        for s in (0..3_600).step_by(7) {
            map.evict(Nanos::from_secs(s), |&idle| Nanos(idle));
            assert_eq!(map.len(), 1, "at {s} s");
        }
        assert!(map.next_deadline().is_some_and(|d| d <= far + Nanos::from_secs(140)));
        map.evict(far + SECOND, |&idle| Nanos(idle));
        assert!(map.is_empty());
    }

    #[test]
    fn a_pinned_counter_outlives_its_idle_time_and_goes_once_unpinned() {
        let mut map: CounterMap<u64> = CounterMap::new(0);
        let row = map.find_or_insert(Nanos::ZERO, "held", || SECOND.0);
        map.pin(row);
        map.pin(row);
        map.evict(Nanos::from_secs(10), |&idle| Nanos(idle));
        assert_eq!(map.get("held"), Some(&SECOND.0), "pinned twice");
        map.unpin(row);
        map.evict(Nanos::from_secs(20), |&idle| Nanos(idle));
        assert_eq!(*map.state_mut(row), SECOND.0, "still pinned once: the row id stays valid");
        map.unpin(row);
        map.evict(Nanos::from_secs(20) + EVICTION_LAG, |&idle| Nanos(idle));
        assert!(map.is_empty(), "unpinned and idle: gone within a bucket");
    }

    #[test]
    fn a_prefetch_changes_nothing() {
        let mut map: CounterMap<u64> = CounterMap::new(3);
        for k in 0..1_000u64 {
            *map.entry(Nanos::ZERO, &k.to_string(), || 0) = k;
        }
        for k in (0..2_000u64).step_by(7) {
            map.prefetch_lookup(&k.to_string());
            map.prefetch(&k.to_string());
        }
        assert_eq!(map.len(), 1_000, "an absent key is not created");
        assert!((0..1_000u64).all(|k| map.get(&k.to_string()) == Some(&k)));
        assert!(map.get("1500").is_none());
    }

    #[test]
    fn a_long_quiet_spell_visits_each_bucket_once() {
        let mut map: CounterMap<u64> = CounterMap::new(0);
        for k in 0..10u64 {
            *map.entry(Nanos::from_millis(k * 300), &k.to_string(), || 0) = 0;
        }
        map.evict(Nanos::from_secs(86_400), |&idle| Nanos(idle));
        assert!(map.is_empty());
    }
}
