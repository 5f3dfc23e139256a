//! The per-key counting structures. Each is exact, integer-only and knows when it
//! has become indistinguishable from a fresh one (`idle_at`), which is when the
//! counter store may evict it.

use crate::time::{Nanos, NANOS_PER_SEC};
use std::collections::VecDeque;

/// What a check answered: admitted, or rejected until at least `retry_in` has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Admit,
    Reject { retry_in: Nanos },
}

/// A sliding-window log: amounts counted at instants, summed over `(now - period, now]`.
///
/// Used for calls (`rate-limit`, classic tiers) and tokens (token limit, classic
/// tiers). Amounts at one instant are merged, so a burst costs one entry.
#[derive(Clone, Debug, Default)]
pub struct SlidingLog {
    entries: Entries,
    total: u64,
}

/// A sliding log's entries, oldest first. Most keys hold a few entries (those
/// of the last period, and older ones until the next look expires them), so up
/// to [`INLINE_ENTRIES`] live inline, in the counter's own memory, and a longer
/// log moves to the heap until it empties. With two inline, a quarter of the
/// simulator's per-key logs were on the heap, each a cache miss of its own.
#[derive(Clone, Debug)]
enum Entries {
    Inline { len: u8, items: [Entry; INLINE_ENTRIES] },
    Heap(VecDeque<Entry>),
}

const INLINE_ENTRIES: usize = 4;

/// An amount counted at an instant.
type Entry = (Nanos, u64);

impl Default for Entries {
    fn default() -> Entries {
        Entries::Inline { len: 0, items: [(Nanos::ZERO, 0); INLINE_ENTRIES] }
    }
}

impl Entries {
    fn as_slices(&self) -> (&[Entry], &[Entry]) {
        match self {
            Entries::Inline { len, items } => (&items[..*len as usize], &[]),
            Entries::Heap(deque) => deque.as_slices(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(Nanos, u64)> {
        let (a, b) = self.as_slices();
        a.iter().chain(b)
    }

    // `front` and `back` match directly rather than through `as_slices`: the
    // window's expiry asks for the front once per entry it looks at.
    fn front(&self) -> Option<&(Nanos, u64)> {
        match self {
            Entries::Inline { len: 0, .. } => None,
            Entries::Inline { items, .. } => Some(&items[0]),
            Entries::Heap(deque) => deque.front(),
        }
    }

    fn back(&self) -> Option<&(Nanos, u64)> {
        match self {
            Entries::Inline { len: 0, .. } => None,
            Entries::Inline { len, items } => Some(&items[*len as usize - 1]),
            Entries::Heap(deque) => deque.back(),
        }
    }

    fn get_mut(&mut self, i: usize) -> &mut (Nanos, u64) {
        match self {
            Entries::Inline { len, items } => &mut items[..*len as usize][i],
            Entries::Heap(deque) => &mut deque[i],
        }
    }

    fn back_mut(&mut self) -> Option<&mut (Nanos, u64)> {
        match self {
            Entries::Inline { len: 0, .. } => None,
            Entries::Inline { len, items } => Some(&mut items[*len as usize - 1]),
            Entries::Heap(deque) => deque.back_mut(),
        }
    }

    fn pop_front(&mut self) {
        match self {
            Entries::Inline { len: 0, .. } => {}
            Entries::Inline { len, items } => {
                // The whole (fixed-size) array turns, a few moves and no call;
                // the old front lands past `len`, where nothing reads it.
                items.rotate_left(1);
                *len -= 1;
            }
            Entries::Heap(deque) => {
                deque.pop_front();
                if deque.is_empty() {
                    *self = Entries::default();
                }
            }
        }
    }

    fn binary_search(&self, at: Nanos) -> Result<usize, usize> {
        match self {
            Entries::Inline { len, items } => items[..*len as usize].binary_search_by_key(&at, |e| e.0),
            Entries::Heap(deque) => deque.binary_search_by_key(&at, |e| e.0),
        }
    }

    /// Appends, inline and without a call in the usual cases (room inline, or
    /// a log already on the heap); a full inline log moves to the heap.
    #[inline]
    fn push_back(&mut self, entry: (Nanos, u64)) {
        match self {
            Entries::Inline { len, items } if (*len as usize) < INLINE_ENTRIES => {
                items[*len as usize] = entry;
                *len += 1;
            }
            Entries::Heap(deque) => deque.push_back(entry),
            Entries::Inline { .. } => self.insert(INLINE_ENTRIES, entry),
        }
    }

    fn insert(&mut self, i: usize, entry: (Nanos, u64)) {
        match self {
            Entries::Inline { len, items } if (*len as usize) < INLINE_ENTRIES => {
                items[i..=*len as usize].rotate_right(1);
                items[i] = entry;
                *len += 1;
            }
            Entries::Inline { items, .. } => {
                let mut deque = VecDeque::with_capacity(2 * INLINE_ENTRIES);
                deque.extend(items.iter().copied());
                deque.insert(i, entry);
                *self = Entries::Heap(deque);
            }
            // Most entries are stamped now, the newest: appending skips the
            // general insertion's shifting logic.
            Entries::Heap(deque) if i == deque.len() => deque.push_back(entry),
            Entries::Heap(deque) => deque.insert(i, entry),
        }
    }
}

impl SlidingLog {
    /// Drops what has left the window: an entry at `t` is outside iff `t <= now - period`.
    pub fn expire(&mut self, now: Nanos, period: Nanos) {
        // A long log (a deployment's requests per minute) is read from its front
        // as time goes by: the lines a few expiries on are asked for now.
        if let Entries::Heap(deque) = &self.entries {
            if let Some(ahead) = deque.get(16) {
                cache_hint::prefetch(ahead);
            }
        }
        while let Some(&(t, amount)) = self.entries.front() {
            if t.saturating_add(period) > now {
                break;
            }
            self.entries.pop_front();
            self.total -= amount;
        }
    }

    /// The amount in the window; call [`SlidingLog::expire`] first.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Counts `amount` at `now`. A window holds at most `u64::MAX` in all: the
    /// excess is dropped, so the total stays the exact sum of the entries and a
    /// full window reads as full (a wrapped one would read as nearly empty).
    pub fn add(&mut self, now: Nanos, amount: u64) {
        let amount = amount.min(u64::MAX - self.total);
        if amount == 0 {
            return;
        }
        self.total += amount;
        match self.entries.back_mut() {
            Some((t, a)) if *t == now => *a += amount,
            _ => {
                debug_assert!(self.entries.back().is_none_or(|&(t, _)| t <= now), "time went backwards");
                self.entries.push_back((now, amount));
            }
        }
    }

    /// Counts `amount` at `at`, which may be earlier than the latest entry (a
    /// change another replica made, arriving late); the log stays in time order.
    pub fn insert(&mut self, at: Nanos, amount: u64) {
        if self.entries.back().is_none_or(|&(t, _)| t <= at) {
            return self.add(at, amount);
        }
        let amount = amount.min(u64::MAX - self.total);
        if amount == 0 {
            return;
        }
        self.total += amount;
        match self.entries.binary_search(at) {
            Ok(i) => self.entries.get_mut(i).1 += amount,
            Err(i) => self.entries.insert(i, (at, amount)),
        }
    }

    /// Takes back up to `amount` counted at instant `at` (a reservation settled for
    /// less than it held). An entry that has left the window is gone and needs nothing.
    pub fn refund(&mut self, at: Nanos, amount: u64) {
        let Ok(i) = self.entries.binary_search(at) else { return };
        let entry = self.entries.get_mut(i);
        let back = amount.min(entry.1);
        entry.1 -= back;
        self.total -= back;
    }

    /// How long until the window total is at most `allowed`, if nothing else arrives.
    pub fn wait_until_at_most(&self, now: Nanos, period: Nanos, allowed: u64) -> Nanos {
        let mut total = self.total;
        for &(t, amount) in self.entries.iter() {
            if total <= allowed {
                break;
            }
            total -= amount;
            if total <= allowed {
                return t.saturating_add(period).saturating_sub(now);
            }
        }
        Nanos::ZERO
    }

    /// After this instant the log is empty.
    pub fn idle_at(&self, period: Nanos) -> Nanos {
        self.entries.back().map_or(Nanos::ZERO, |&(t, _)| t.saturating_add(period))
    }
}

/// A token bucket in exact integer arithmetic.
///
/// One unit of the counted thing costs `period_ns` micro-units and the bucket refills
/// `capacity` micro-units per nanosecond, which is `capacity / period` units per
/// second with no rounding. The level may go below zero when usage is charged after
/// the fact (tokens), and then the key waits until the debt is repaid.
#[derive(Clone, Debug)]
pub struct Bucket {
    level: i128,
    at: Nanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketShape {
    pub capacity: u64,
    pub period: Nanos,
}

impl BucketShape {
    fn unit(&self) -> i128 {
        self.period.0 as i128
    }

    fn full(&self) -> i128 {
        self.capacity as i128 * self.unit()
    }

    /// The time, rounded up to a nanosecond, to refill `deficit` micro-units.
    fn refill_time(&self, deficit: i128) -> Nanos {
        let capacity = self.capacity as i128;
        let wait = deficit.div_euclid(capacity) + i128::from(deficit.rem_euclid(capacity) != 0);
        Nanos(wait.clamp(0, u64::MAX as i128) as u64)
    }
}

impl Bucket {
    pub fn full(shape: BucketShape, now: Nanos) -> Bucket {
        Bucket { level: shape.full(), at: now }
    }

    pub fn refill(&mut self, shape: BucketShape, now: Nanos) {
        let elapsed = now.saturating_sub(self.at).0 as i128;
        self.level = (self.level + elapsed * shape.capacity as i128).min(shape.full());
        self.at = self.at.max(now);
    }

    /// Whole units available now (negative when in debt); call `refill` first.
    pub fn available(&self, shape: BucketShape) -> i64 {
        let units = self.level.div_euclid(shape.unit());
        units.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// Admits iff at least `needed` units are in the bucket, counting `credit` units
    /// this same request already took (a shared counter charges a request once).
    pub fn check(&self, shape: BucketShape, needed: u64, credit: u64) -> Check {
        let needed = needed as i128 * shape.unit();
        let level = self.level + credit as i128 * shape.unit();
        if level >= needed {
            return Check::Admit;
        }
        Check::Reject { retry_in: shape.refill_time(needed - level) }
    }

    /// Admits iff the bucket holds more than nothing (the debt-tolerant rule for tokens).
    pub fn check_positive(&self, shape: BucketShape) -> Check {
        if self.level > 0 {
            return Check::Admit;
        }
        Check::Reject { retry_in: shape.refill_time(1 - self.level) }
    }

    pub fn take(&mut self, shape: BucketShape, units: u64) {
        self.level -= units as i128 * shape.unit();
    }

    /// Returns units taken earlier (a reservation settled for less); never above full.
    pub fn give_back(&mut self, shape: BucketShape, units: u64) {
        self.level = (self.level + units as i128 * shape.unit()).min(shape.full());
    }

    /// After this instant the bucket is full again, as a fresh one would be.
    pub fn idle_at(&self, shape: BucketShape) -> Nanos {
        let missing = shape.full() - self.level;
        if missing <= 0 {
            return self.at;
        }
        let wait = missing.div_euclid(shape.capacity as i128) + 1;
        self.at.saturating_add(Nanos(wait.clamp(0, u64::MAX as i128) as u64))
    }
}

/// A counter for one fixed window, identified by its index; a new index resets it.
#[derive(Clone, Debug, Default)]
pub struct FixedWindow {
    pub index: i64,
    pub calls: u64,
    pub bytes: u64,
    /// Instants known to lie in window `index`: `start <= t < end`. Empty until
    /// the first roll. A roll inside them needs no division.
    start: Nanos,
    end: Nanos,
}

impl FixedWindow {
    /// Makes this the counter of the window of `grid` holding `now`: the same
    /// window keeps its counts, another starts from zero.
    pub fn roll(&mut self, grid: WindowGrid, now: Nanos) {
        if self.holds(now) {
            return;
        }
        let index = grid.index(now);
        if self.index != index {
            *self = FixedWindow { index, ..FixedWindow::default() };
        }
        (self.start, self.end) = grid.bounds(index);
    }

    /// Whether `now` is known to lie in this counter's window.
    pub fn holds(&self, now: Nanos) -> bool {
        self.start <= now && now < self.end
    }

    /// The end of the window as [`WindowGrid::window_end`] gives it (`Nanos::MAX`
    /// for one that never ends), for an instant it [`holds`](FixedWindow::holds).
    pub fn end(&self) -> Nanos {
        self.end
    }
}

/// Fixed windows of `period` aligned to `origin_ns` (which may precede 1970).
/// A period of zero is one window that never ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowGrid {
    pub origin_ns: i128,
    pub period: Nanos,
}

impl WindowGrid {
    /// `floor((t - first_period_start) / renewal_period)`.
    pub fn index(&self, now: Nanos) -> i64 {
        if self.period == Nanos::ZERO {
            return 0;
        }
        let offset = now.0 as i128 - self.origin_ns;
        // A grid that starts before `now` (the usual case) divides in 64 bits,
        // several times cheaper than the general 128-bit division.
        if let Ok(offset) = u64::try_from(offset) {
            return i64::try_from(offset / self.period.0).unwrap_or(i64::MAX);
        }
        offset.div_euclid(self.period.0 as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The end of the window holding `now`, or `None` when the window never ends.
    pub fn window_end(&self, now: Nanos) -> Option<Nanos> {
        if self.period == Nanos::ZERO {
            return None;
        }
        Some(self.bounds(self.index(now)).1)
    }

    /// Window `index`'s instants `[start, end)` within the range of `Nanos`
    /// (`end` is `Nanos::MAX` for the one window of a zero period).
    pub fn bounds(&self, index: i64) -> (Nanos, Nanos) {
        if self.period == Nanos::ZERO {
            return (Nanos::ZERO, Nanos::MAX);
        }
        let start = self.origin_ns + index as i128 * self.period.0 as i128;
        let clamp = |t: i128| Nanos(t.clamp(0, u64::MAX as i128) as u64);
        (clamp(start), clamp(start + self.period.0 as i128))
    }
}

pub fn secs(s: u64) -> Nanos {
    Nanos(s * NANOS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Add(u64, u64),
        Insert(u64, u64),
        Refund(u64, u64),
        Expire(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..5u64, 1..4u64).prop_map(|(dt, n)| Op::Add(dt, n)),
            (0..40u64, 1..4u64).prop_map(|(t, n)| Op::Insert(t, n)),
            (0..40u64, 1..4u64).prop_map(|(t, n)| Op::Refund(t, n)),
            (0..5u64).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// The log with inline entries holds exactly what a plain deque would.
        #[test]
        fn inline_entries_behave_like_a_deque(ops in proptest::collection::vec(op(), 0..60)) {
            let period = Nanos(10);
            let (mut log, mut model) = (SlidingLog::default(), VecDeque::<(Nanos, u64)>::new());
            let mut now = Nanos::ZERO;
            for op in ops {
                match op {
                    Op::Add(dt, n) => {
                        now = now + Nanos(dt);
                        log.add(now, n);
                        match model.back_mut() {
                            Some((t, a)) if *t == now => *a += n,
                            _ => model.push_back((now, n)),
                        }
                    }
                    Op::Insert(t, n) => {
                        let at = Nanos(t.min(now.0));
                        log.insert(at, n);
                        match model.binary_search_by_key(&at, |e| e.0) {
                            Ok(i) => model[i].1 += n,
                            Err(i) => model.insert(i, (at, n)),
                        }
                    }
                    Op::Refund(t, n) => {
                        log.refund(Nanos(t), n);
                        if let Ok(i) = model.binary_search_by_key(&Nanos(t), |e| e.0) {
                            model[i].1 -= n.min(model[i].1);
                        }
                    }
                    Op::Expire(dt) => {
                        now = now + Nanos(dt);
                        log.expire(now, period);
                        while model.front().is_some_and(|&(t, _)| t + period <= now) {
                            model.pop_front();
                        }
                    }
                }
                let held: Vec<_> = log.entries.iter().copied().collect();
                prop_assert_eq!(&held, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(log.total(), model.iter().map(|e| e.1).sum::<u64>());
                prop_assert_eq!(log.entries.back().copied(), model.back().copied());
                prop_assert_eq!(log.entries.iter().count(), model.len());
            }
        }

        /// A window that remembers its bounds rolls exactly as one that divides
        /// on every roll: the same index and counts at every instant, in any
        /// order, and the end it remembers is the grid's.
        #[test]
        fn remembered_bounds_roll_like_the_division(
            origin in prop_oneof![-1_000..1_000i128, -(1i128 << 70)..(1i128 << 70)],
            period in prop_oneof![Just(0u64), 1..100u64, any::<u64>()],
            instants in proptest::collection::vec((any::<u64>(), -3..3i128, -1..=1i128, any::<bool>()), 1..40),
        ) {
            let grid = WindowGrid { origin_ns: origin, period: Nanos(period) };
            // Half the instants lie on or next to a window's edge.
            let near_edge = |t: u64, k: i128, d: i128| {
                let window = (t as i128 - origin).div_euclid(i128::from(period.max(1))) + k;
                let at = origin + window * i128::from(period) + d;
                Nanos(at.clamp(0, u64::MAX as i128) as u64)
            };
            let mut window = FixedWindow::default();
            let (mut index, mut calls) = (0i64, 0u64);
            for (t, k, d, edge) in instants {
                let now = if edge { near_edge(t % 4_000, k, d) } else { Nanos(t) };
                window.roll(grid, now);
                window.calls += 1;
                if grid.index(now) != index {
                    (index, calls) = (grid.index(now), 0);
                }
                calls += 1;
                prop_assert_eq!((window.index, window.calls), (index, calls));
                if window.holds(now) {
                    prop_assert_eq!(window.end(), grid.window_end(now).unwrap_or(Nanos::MAX));
                }
                // Past the ends of `Nanos` or of an `i64` index, a window may
                // remember nothing and divide on every roll.
                let edge = now == Nanos::MAX || index == i64::MIN || index == i64::MAX;
                prop_assert!(window.holds(now) || edge, "a roll remembers the window of `now`");
            }
        }

        /// The 64-bit fast path gives the window index the floor division gives,
        /// for grids starting before, at and after `now`, and before 1970.
        #[test]
        fn window_index_is_the_floor_division(
            now in prop_oneof![0..1_000u64, any::<u64>()],
            origin in prop_oneof![-1_000..1_000i128, -(1i128 << 70)..(1i128 << 70)],
            period in prop_oneof![1..100u64, any::<u64>()],
        ) {
            let grid = WindowGrid { origin_ns: origin, period: Nanos(period) };
            let floor = (now as i128 - origin).div_euclid(period as i128);
            prop_assert_eq!(grid.index(Nanos(now)), floor.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
        }
    }
}
