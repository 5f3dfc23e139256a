//! The counter store of one gateway: one row per key string, holding the state of
//! every counter family for that key side by side.
//!
//! A request's limits usually share one key (the caller's IP or subscription), so
//! one hash lookup finds every counter the request touches, and they sit in
//! adjacent memory. A request in flight pins its rows, so the way out reaches them
//! by [`RowId`] with no lookup at all.
//!
//! Every row holds a state for every family, made fresh when the row is made. A
//! fresh state is exactly what a family's first use would have created (a full
//! bucket refilled later is still full, an empty log or window counts nothing), so
//! holding states a key never uses changes memory, not decisions.

use crate::counters::{CounterMap, RowId};
use crate::delta::{Change, CounterDelta};
use crate::limiter::{Bucket, BucketShape, Check, FixedWindow, SlidingLog, WindowGrid};
use crate::time::{CalendarPeriod, Nanos};
use smallvec::SmallVec;

/// Index of a counter family; limits with the same namespace and shape share one.
pub(crate) type ClassId = usize;

/// A counter family's kind and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Sliding(Nanos),
    Bucket(BucketShape),
    Fixed(WindowGrid),
    Calendar(CalendarPeriod),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct CalendarCount {
    pub period_end: Nanos,
    pub tokens: u64,
}

/// One family's counter for one key.
enum State {
    Sliding(SlidingLog),
    Bucket(Bucket),
    Fixed(FixedWindow),
    Calendar(CalendarCount),
}

impl State {
    fn fresh(shape: Shape, now: Nanos) -> State {
        match shape {
            Shape::Sliding(_) => State::Sliding(SlidingLog::default()),
            Shape::Bucket(shape) => State::Bucket(Bucket::full(shape, now)),
            Shape::Fixed(_) => State::Fixed(FixedWindow::default()),
            Shape::Calendar(_) => State::Calendar(CalendarCount::default()),
        }
    }

    /// After this instant the state is indistinguishable from a fresh one.
    fn idle_at(&self, shape: Shape, now: Nanos) -> Nanos {
        match (shape, self) {
            (Shape::Sliding(period), State::Sliding(log)) => log.idle_at(period),
            (Shape::Bucket(shape), State::Bucket(bucket)) => bucket.idle_at(shape),
            // A window that counted nothing is fresh; one that counted is idle once
            // time has left it (a quota that never renews keeps its count for good).
            (Shape::Fixed(_), State::Fixed(w)) if w.calls == 0 && w.bytes == 0 => Nanos::ZERO,
            (Shape::Fixed(_), State::Fixed(w)) if w.holds(now) => w.end(),
            (Shape::Fixed(grid), State::Fixed(w)) if w.index < grid.index(now) => Nanos::ZERO,
            (Shape::Fixed(grid), State::Fixed(_)) => grid.window_end(now).unwrap_or(Nanos::MAX),
            (Shape::Calendar(_), State::Calendar(count)) => count.period_end,
            _ => unreachable!("a row holds each family's own kind of state"),
        }
    }
}

/// Every family's counter for one key, inline for up to four families.
pub(crate) struct Row {
    states: SmallVec<[State; 4]>,
}

impl Row {
    fn fresh(families: &[Shape], now: Nanos) -> Row {
        Row { states: families.iter().map(|&shape| State::fresh(shape, now)).collect() }
    }

    fn idle_at(&self, families: &[Shape], now: Nanos) -> Nanos {
        let idle = self.states.iter().zip(families).map(|(state, &shape)| state.idle_at(shape, now));
        idle.max().unwrap_or(Nanos::ZERO)
    }
}

/// One family's counter for one key, with the family's parameters.
pub(crate) enum Counter<'a> {
    Sliding(Nanos, &'a mut SlidingLog),
    Bucket(BucketShape, &'a mut Bucket),
    Fixed(WindowGrid, &'a mut FixedWindow),
    Calendar(CalendarPeriod, &'a mut CalendarCount),
}

pub(crate) struct Store {
    families: Vec<Shape>,
    rows: CounterMap<Row>,
}

impl Store {
    /// `hash_seed` lets a server pick an unpredictable seed against hash flooding
    /// while a simulation keeps a fixed one.
    pub fn new(families: Vec<Shape>, hash_seed: u64) -> Store {
        Store { families, rows: CounterMap::new(hash_seed) }
    }

    pub fn is_calendar(&self, class: ClassId) -> bool {
        matches!(self.families[class], Shape::Calendar(_))
    }

    /// The row of `key`, made fresh when absent, pinned until [`Store::unpin`].
    pub fn pin(&mut self, now: Nanos, key: &str) -> RowId {
        let row = self.row(now, key);
        self.rows.pin(row);
        row
    }

    /// The row of `key`, made fresh when absent; valid until the next eviction.
    fn row(&mut self, now: Nanos, key: &str) -> RowId {
        let families = &self.families;
        self.rows.find_or_insert(now, key, || Row::fresh(families, now))
    }

    /// See [`CounterMap::prefetch_lookup`].
    pub(crate) fn prefetch_lookup(&self, key: &str) {
        self.rows.prefetch_lookup(key);
    }

    /// See [`CounterMap::prefetch`].
    pub(crate) fn prefetch(&self, key: &str) {
        self.rows.prefetch(key);
    }

    /// See [`CounterMap::prefetch_row`].
    pub(crate) fn prefetch_row(&self, row: RowId) {
        self.rows.prefetch_row(row);
    }

    /// The key of a pinned row.
    pub fn key(&self, row: RowId) -> &str {
        self.rows.key(row)
    }

    /// Pins a row already pinned once more (another limit with the same key).
    pub fn pin_again(&mut self, row: RowId) {
        self.rows.pin(row);
    }

    pub fn unpin(&mut self, row: RowId) {
        self.rows.unpin(row);
    }

    /// Family `class`'s counter in a pinned row. Inlined, so the caller's own
    /// match on the family folds into this one.
    #[inline]
    pub fn counter(&mut self, row: RowId, class: ClassId) -> Counter<'_> {
        let state = &mut self.rows.state_mut(row).states[class];
        match (self.families[class], state) {
            (Shape::Sliding(period), State::Sliding(log)) => Counter::Sliding(period, log),
            (Shape::Bucket(shape), State::Bucket(bucket)) => Counter::Bucket(shape, bucket),
            (Shape::Fixed(grid), State::Fixed(window)) => Counter::Fixed(grid, window),
            (Shape::Calendar(period), State::Calendar(count)) => Counter::Calendar(period, count),
            _ => unreachable!("a row holds each family's own kind of state"),
        }
    }

    /// The counter of the fixed window holding `now`, and that window's grid.
    pub fn window(&mut self, row: RowId, class: ClassId, now: Nanos) -> (WindowGrid, &mut FixedWindow) {
        let Counter::Fixed(grid, window) = self.counter(row, class) else {
            unreachable!("quotas compile to fixed windows")
        };
        window.roll(grid, now);
        (grid, window)
    }

    /// The token count of the calendar period holding `now`.
    pub fn calendar(&mut self, row: RowId, class: ClassId, now: Nanos) -> &mut CalendarCount {
        let Counter::Calendar(period, count) = self.counter(row, class) else {
            unreachable!("token quotas are calendar counters")
        };
        if count.period_end <= now {
            *count = CalendarCount { period_end: period.bounds(now).1, tokens: 0 };
        }
        count
    }

    /// Applies another replica's change (see [`crate::Gateway::handle_delta`]).
    pub fn apply(&mut self, now: Nanos, delta: &CounterDelta) {
        if delta.class >= self.families.len() {
            debug_assert!(false, "replicas share one policy");
            return;
        }
        let row = self.row(now, &delta.key);
        self.apply_to(row, now, delta);
    }

    fn apply_to(&mut self, row: RowId, now: Nanos, delta: &CounterDelta) {
        let class = delta.class;
        match (self.counter(row, class), delta.change) {
            (Counter::Sliding(period, log), Change::Count(n)) => {
                log.insert(delta.at, n);
                log.expire(now, period);
            }
            (Counter::Sliding(period, log), Change::Uncount { amount, stamped }) => {
                log.refund(stamped, amount);
                log.expire(now, period);
            }
            (Counter::Bucket(shape, bucket), Change::Count(n)) => {
                bucket.refill(shape, now);
                bucket.take(shape, n);
            }
            (Counter::Bucket(shape, bucket), Change::Uncount { amount, .. }) => {
                bucket.refill(shape, now);
                bucket.give_back(shape, amount);
            }
            // A change made in a window that has since ended is moot.
            (Counter::Fixed(grid, _), _) if grid.index(delta.at) != grid.index(now) => {}
            (Counter::Fixed(..), Change::Count(n)) => {
                let calls = &mut self.window(row, class, now).1.calls;
                *calls = calls.saturating_add(n);
            }
            (Counter::Fixed(..), Change::Bytes(n)) => {
                let bytes = &mut self.window(row, class, now).1.bytes;
                *bytes = bytes.saturating_add(n);
            }
            (Counter::Calendar(period, _), Change::Count(n)) => {
                let count = self.calendar(row, class, now);
                if period.bounds(delta.at).1 == count.period_end {
                    count.tokens = count.tokens.saturating_add(n);
                }
            }
            (_, change) => debug_assert!(false, "a {change:?} does not fit this counter family"),
        }
    }

    /// Removes the rows that have become idle and are not pinned.
    pub fn evict(&mut self, now: Nanos) {
        let families = &self.families;
        self.rows.evict(now, |row| row.idle_at(families, now));
    }

    pub fn next_deadline(&self) -> Option<Nanos> {
        self.rows.next_deadline()
    }

    /// Counter states held: every family's, for each key with a row.
    pub fn counter_count(&self) -> usize {
        self.rows.len() * self.families.len()
    }
}

impl Counter<'_> {
    /// The tokens-per-minute check: without an estimate, rejected iff the window
    /// already holds `tpm` tokens; with one, iff counted plus estimate exceeds `tpm`.
    /// `credit` is what this same request already reserved on the counter.
    pub fn check_tpm(self, now: Nanos, tpm: u64, estimate: Option<u64>, credit: u64) -> Check {
        match self {
            Counter::Sliding(period, log) => {
                log.expire(now, period);
                let counted = log.total().saturating_sub(credit);
                let (over, allowed) = match estimate {
                    None => (counted >= tpm, tpm - 1),
                    Some(estimate) => (counted.saturating_add(estimate) > tpm, tpm.saturating_sub(estimate)),
                };
                let allowed = allowed.saturating_add(credit);
                match over {
                    false => Check::Admit,
                    true => Check::Reject { retry_in: log.wait_until_at_most(now, period, allowed) },
                }
            }
            Counter::Bucket(shape, bucket) => {
                bucket.refill(shape, now);
                match estimate {
                    None => bucket.check_positive(shape),
                    // An estimate larger than the bucket can never pass; the honest
                    // advice is to wait until the bucket is full.
                    Some(estimate) if estimate > shape.capacity => {
                        Check::Reject { retry_in: bucket.idle_at(shape).saturating_sub(now) }
                    }
                    Some(estimate) => bucket.check(shape, estimate, credit),
                }
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }

    /// Sets tokens aside at admission (reserve mode), stamped at `now`.
    pub fn reserve_tpm(self, now: Nanos, tokens: u64) {
        match self {
            Counter::Sliding(period, log) => {
                log.expire(now, period);
                log.add(now, tokens);
            }
            Counter::Bucket(shape, bucket) => {
                bucket.refill(shape, now);
                bucket.take(shape, tokens);
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }

    /// Charges a request's tokens, settling what it reserved (`reserved` tokens at
    /// instant `reserved.0`): a reservation that was too large gives the difference
    /// back where it was stamped, one too small charges the excess now. Returns the
    /// tokens remaining in the minute.
    pub fn settle_tpm(self, now: Nanos, tpm: u64, reserved: (Nanos, u64), tokens: u64) -> u64 {
        let (reserved_at, reserved) = reserved;
        match self {
            Counter::Sliding(period, log) => {
                log.expire(now, period);
                match tokens.checked_sub(reserved) {
                    Some(excess) => log.add(now, excess),
                    None => log.refund(reserved_at, reserved - tokens),
                }
                tpm.saturating_sub(log.total())
            }
            Counter::Bucket(shape, bucket) => {
                bucket.refill(shape, now);
                match tokens.checked_sub(reserved) {
                    Some(excess) => bucket.take(shape, excess),
                    None => bucket.give_back(shape, reserved - tokens),
                }
                bucket.available(shape).max(0) as u64
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }
}
