//! Exact mode: every counter-changing call the core makes is made against the
//! fleet's shared counters, in one order that every replica replays.
//!
//! Redis holds, per product, the stream of counter changes (as in lagged mode)
//! and a lock. A replica that has calls for a product to make (a request's
//! admission, an attempt's outcome, a completion's token charge) takes the lock
//! and, in the same script, reads the changes the others made since it last
//! looked; it applies them (`handle_delta`, each at the instant it was made)
//! and makes its calls with the core as usual. So the core's rules stay in the
//! core, in one place, and every replica's counters go through the same
//! sequence of changes that one gateway's would.
//!
//! The lock is a lease: the replica keeps it while calls keep coming. While it
//! holds it no other replica can change or read the counters, so its calls are
//! made at once, on its own counters, with no round trip. A request's changes
//! are in the stream before its client hears back. Its calls are made without
//! waiting ([`Exact::call_unshipped`]), and the gateway waits for every change
//! so far ([`Exact::all_shipped`], or a last call made with [`Exact::call`])
//! before it answers the client. So a delivered response waits for one
//! shipment, which carries its arrival's, its attempt's and its completion's
//! changes together; a request that waits to retry has its changes shipped
//! meanwhile ([`Exact::ship_soon`]). The waiting call ships every
//! change made so far itself, one shipment at a time; the others wait for its
//! answer (group commit). A shipper task renews the lease every millisecond
//! and lets go when calls stop for 20 ms, or as soon as a shipment's answer
//! says another replica waits. A waiting replica leaves its
//! name in the product's `wanted` key, and the lock goes to it next. The
//! holder lets go only after the last change made under it is in the stream,
//! so the next holder reads everything before deciding.
//!
//! While the store cannot be reached, calls are made on the local counters, as
//! in lagged mode (or refused, with `on_store_error = "reject"`), their changes
//! wait in a backlog, and they are shipped once the lock is taken again. Each
//! change carries its replica's sequence number, so a batch shipped twice (its
//! answer lost) is applied once.

use crate::counters::{read_batch, Batch, BatchOut, CountersConfig, StoreState, BATCH_CHANGES, MAX_BACKLOG};
use gateway_core::{CounterDelta, Lifecycle, LimitBook, Nanos};
use redis::aio::ConnectionManager;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What exact mode runs calls on: something that holds a product's limit book.
pub trait Journaled {
    fn book(&mut self) -> &mut LimitBook;
}

impl Journaled for LimitBook {
    fn book(&mut self) -> &mut LimitBook {
        self
    }
}

impl Journaled for Lifecycle {
    fn book(&mut self) -> &mut LimitBook {
        self.limits_mut()
    }
}

/// A call waiting for its product's turn.
type Job<T> = Box<dyn FnOnce(&mut T, Nanos) + Send>;

/// How long the lock outlives the last exchange that took or renewed it: a
/// replica that dies holding it stops the others for this long.
const LOCK_TTL: Duration = Duration::from_millis(500);

/// Calls are made under a lease only while this much of it is left (counted
/// from before the exchange that took or renewed it was sent, so never longer
/// than Redis keeps the lock); the rest is time for their changes to be
/// shipped before the lock can pass on.
const LEASE_MARGIN: Duration = Duration::from_millis(250);

/// How often the lease holder ships its changes and asks whether another
/// replica waits.
const SHIP_EVERY: Duration = Duration::from_millis(1);

/// A holder whose calls stopped for this long lets go (at once when another
/// replica waits). Longer than the gaps of a steady stream of calls (a load
/// generator's timer ticks once a millisecond, and a busy machine stretches
/// that), so that such a stream keeps its lease instead of taking the lock
/// again, a round trip in an arrival's way, after every gap.
const IDLE_LET_GO: Duration = Duration::from_millis(20);

/// How long a waiting replica's claim on the next turn lasts unless renewed
/// by its next attempt, so that a replica that died waiting stops no one for
/// long.
const WANT_TTL: Duration = Duration::from_millis(20);

/// How long one exchange with the store may take before it counts as an error
/// (waiting for a lock that a dead replica held included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// The most changes one script returns; more are read with XRANGE while the
/// lock is held.
const READ_BATCH: usize = 10_000;

/// Takes the lock (KEYS[1]) for token ARGV[1] if it is free (or already this
/// token's) and no other replica claimed the next turn (KEYS[3]), and returns
/// the changes after ARGV[3] in the stream (KEYS[2]). Otherwise claims the next
/// turn for replica ARGV[5] unless another has, and returns false.
const ACQUIRE: &str = r"
local holder = redis.call('GET', KEYS[1])
local wanted = redis.call('GET', KEYS[3])
if (not holder or holder == ARGV[1]) and (not wanted or wanted == ARGV[5]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if wanted then redis.call('DEL', KEYS[3]) end
  return redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+', 'COUNT', ARGV[4])
end
if not wanted or wanted == ARGV[5] then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
return false
";

/// Appends the batches of changes (ARGV[3..]) of replica ARGV[2] and releases
/// the lock if token ARGV[1] still holds it. Returns whether it held, the id of
/// the last entry appended, and whether another replica waits for the lock. (A
/// lease that goes on is renewed with a transaction, [`Inner::renew`].)
const LET_GO: &str = r"
local held = redis.call('GET', KEYS[1]) == ARGV[1]
local last = ''
for i = 3, #ARGV do
  last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'r', ARGV[2], 'e', ARGV[i])
end
if held then redis.call('DEL', KEYS[1]) end
return {held and 1 or 0, last, redis.call('EXISTS', KEYS[3])}
";

/// Distinguishes `Exact`s in one process (tests run several replicas) in the
/// per-thread connection table.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// One connection per worker thread and store: its driver runs on the
    /// thread's own runtime, so a round trip never wakes another thread.
    static CONNECTIONS: RefCell<Vec<(u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

/// Exact mode's exchange with the store; cheap to clone (the shipper task
/// holds one).
pub struct Exact<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Exact<T> {
    fn clone(&self) -> Exact<T> {
        Exact { inner: self.inner.clone() }
    }
}

struct Inner<T> {
    id: u64,
    client: redis::Client,
    replica: String,
    /// Set when an exchange fails: calls are then made locally, without waiting
    /// on the store, until the background turn ([`Exact::flush`], every
    /// `sync_interval`) reaches it again.
    suspended: AtomicBool,
    sequence: AtomicU64,
    acquire: redis::Script,
    let_go: redis::Script,
    products: Vec<Product<T>>,
}

struct Product<T> {
    stream: String,
    lock: String,
    wanted: String,
    queue: Mutex<Vec<Job<T>>>,
    /// Held by the replica's task that takes the lock and makes the queued
    /// calls, across its round trips, and by the shipper while it lets go of
    /// the lock; FIFO, so every queued call is made by the next turn.
    turn: tokio::sync::Mutex<()>,
    /// Taken after the product's core (never the other way round) and never
    /// held across a round trip.
    position: Mutex<Position>,
    /// Calls made under leases, so that the shipper sees when they stop.
    calls: AtomicU64,
    /// Wakes the shipper: an arrival made changes that no call waits for yet.
    work: tokio::sync::Notify,
    /// Wakes the calls waiting for their changes to be shipped.
    acked: tokio::sync::Notify,
}

impl<T> Product<T> {
    /// Lets the calls whose changes go up to sequence number `upto` go on.
    fn release(&self, position: &mut Position, upto: u64) {
        position.released = position.released.max(upto);
        self.acked.notify_waiters();
    }
}

/// Where this replica has read a product's stream, and what it has to ship.
#[derive(Default)]
struct Position {
    last_id: Option<String>,
    /// Changes made here, not yet shipped: the last `backlog.len()` of the
    /// `changes_made`, so their sequence numbers follow from the two.
    backlog: VecDeque<CounterDelta>,
    /// The highest sequence number applied from each other replica.
    applied: BTreeMap<String, u64>,
    /// How many changes this replica has made to the product: the last one's
    /// sequence number (they are numbered from 1, one after another).
    changes_made: u64,
    /// The lock, while this replica holds it.
    lease: Option<Lease>,
    /// The changes up to this sequence number are in the stream, or were given
    /// up on while the store failed: a call's effect (a request forwarded, a
    /// response returned) waits until its changes are, so that a replica that
    /// dies never takes a change with it that the client already acted on.
    released: u64,
    /// Whether a shipment is on its way (one at a time, so they land in order).
    in_flight: bool,
    /// When the last shipment was sent.
    last_shipped: Option<Instant>,
    /// Another replica asked for the lock: the shipper lets go at its next tick.
    wanted: bool,
    /// Whether a shipper task runs: set when one is spawned, cleared by the
    /// shipper itself in the same critical section in which it sees the lease
    /// gone, so a lease never lacks a shipper.
    shipping: bool,
}

struct Lease {
    token: String,
    /// When Redis lets the lock go at the earliest, as far as this replica
    /// can tell: `LOCK_TTL` after the last exchange that took or renewed it
    /// was sent.
    expires: Instant,
}

impl Position {
    /// Whether calls may be made under this replica's lease at `now`.
    fn decides_at(&self, now: Instant) -> bool {
        self.lease.as_ref().is_some_and(|lease| lease.decides_at(now))
    }

    /// Moves the changes the core journaled into the backlog.
    fn take_changes(&mut self, state: &StoreState, book: &mut LimitBook) {
        while let Some(delta) = book.poll_delta() {
            if self.backlog.len() >= MAX_BACKLOG {
                self.backlog.pop_front();
                state.dropped.fetch_add(1, Ordering::Relaxed);
            }
            self.changes_made += 1;
            self.backlog.push_back(delta);
        }
        state.backlog.store(self.backlog.len() as u64, Ordering::Relaxed);
    }
}

impl Lease {
    /// Whether calls may be made under the lease at `now`: with time left to
    /// ship their changes before the lock can pass on.
    fn decides_at(&self, now: Instant) -> bool {
        now + LEASE_MARGIN < self.expires
    }
}

/// How an attempt to ship went.
enum Shipped {
    /// Shipped (or, the store failing, given up on: the lease is gone).
    Done,
    /// Another shipment is on its way; its answer wakes the calls that wait.
    Busy,
    /// No lease: nothing is shipped.
    Gone,
}

impl<T: Journaled + Send + 'static> Exact<T> {
    pub fn new<'a>(
        config: &CountersConfig,
        products: impl Iterator<Item = &'a str>,
        replica: String,
    ) -> Result<Exact<T>, String> {
        let url = config.url()?;
        let client = redis::Client::open(url).map_err(|e| format!("`counters.store`: {e}"))?;
        let products = products
            .map(|name| Product {
                stream: format!("{}:{name}:changes", config.key_prefix),
                lock: format!("{}:{name}:lock", config.key_prefix),
                wanted: format!("{}:{name}:wanted", config.key_prefix),
                queue: Mutex::new(Vec::new()),
                turn: tokio::sync::Mutex::new(()),
                position: Mutex::new(Position::default()),
                calls: AtomicU64::new(0),
                acked: tokio::sync::Notify::new(),
                work: tokio::sync::Notify::new(),
            })
            .collect();
        let inner = Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            client,
            replica,
            suspended: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
            acquire: redis::Script::new(ACQUIRE),
            let_go: redis::Script::new(LET_GO),
            products,
        };
        Ok(Exact { inner: Arc::new(inner) })
    }

    /// Makes `call` on `target` (product `product`'s core) in the fleet's order:
    /// after every change any replica made before it, and shipped before any
    /// made after it. Returns once every change made so far is in the store,
    /// so that what the caller does with the result (an answer to a client)
    /// never outlives a replica that dies. `clock` reads the core's time. If
    /// the task awaiting this is dropped before the call is made, the call is
    /// made anyway and its result goes to `abandoned`, which must end what it
    /// started.
    pub async fn call<R: Send + 'static>(
        &self,
        state: &Arc<StoreState>,
        product: usize,
        target: &Mutex<T>,
        clock: impl Fn() -> Nanos,
        call: impl FnOnce(&mut T, Nanos) -> R + Send + 'static,
        abandoned: impl FnOnce(&mut T, Nanos, R) + Send + 'static,
    ) -> R {
        let result = self.call_unshipped(state, product, target, clock, call, abandoned).await;
        self.all_shipped(state, product).await;
        result
    }

    /// Wakes the shipper if changes wait: for calls whose effect takes a while
    /// (a request on its way to its backend), so that their changes are in the
    /// store by the time the client is answered.
    pub fn ship_soon(&self, product: usize) {
        let entry = &self.inner.products[product];
        let position = lock(&entry.position);
        if position.released < position.changes_made {
            entry.work.notify_one();
        }
    }

    /// Returns once every change made to `product` so far is in the store (or
    /// given up on, the store failing).
    pub async fn all_shipped(&self, state: &StoreState, product: usize) {
        let mark = lock(&self.inner.products[product].position).changes_made;
        let began = Instant::now();
        self.durable(state, product, mark).await;
        let mut timings = state.timings.lock().unwrap_or_else(|e| e.into_inner());
        timings.wait_s.saturating_record(began.elapsed().as_micros().max(1) as u64);
    }

    /// [`Exact::call`] without the wait: returns once the call is made (under
    /// a live lease at once, otherwise in a turn), its changes not yet
    /// shipped. They go with the next shipment: one that [`Exact::ship_soon`]
    /// asks for, the next [`Exact::all_shipped`] (which the caller must await
    /// before anything the call decided reaches a client), or the shipper's
    /// next tick. Meanwhile no other replica can decide: this one holds the
    /// lock until they are shipped.
    pub async fn call_unshipped<R: Send + 'static>(
        &self,
        state: &Arc<StoreState>,
        product: usize,
        target: &Mutex<T>,
        clock: impl Fn() -> Nanos,
        call: impl FnOnce(&mut T, Nanos) -> R + Send + 'static,
        abandoned: impl FnOnce(&mut T, Nanos, R) + Send + 'static,
    ) -> R {
        let entry = &self.inner.products[product];
        let call = match self.under_lease(state, product, target, &clock, call) {
            Ok(result) => return result,
            Err(call) => call,
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let job: Job<T> = Box::new(move |t: &mut T, now: Nanos| {
            let result = call(t, now);
            if let Err(result) = tx.send(result) {
                abandoned(t, now, result);
            }
        });
        lock(&entry.queue).push(job);
        let turn = entry.turn.lock().await;
        let result = match rx.try_recv() {
            Ok(result) => result,
            Err(_) => {
                self.take_turn(state, product, target, &clock).await;
                rx.try_recv().expect("a turn makes every call queued before it")
            }
        };
        // The turn goes before waiting for the store: letting go of a lease
        // takes it.
        drop(turn);
        result
    }

    /// Makes `call` at once if this replica holds a lease with time left (no
    /// other replica can change the counters meanwhile). Otherwise gives the
    /// call back.
    fn under_lease<R, F: FnOnce(&mut T, Nanos) -> R>(
        &self,
        state: &StoreState,
        product: usize,
        target: &Mutex<T>,
        clock: &impl Fn() -> Nanos,
        call: F,
    ) -> Result<R, F> {
        if self.inner.suspended.load(Ordering::Relaxed) {
            return Err(call);
        }
        let entry = &self.inner.products[product];
        let mut t = lock(target);
        let mut position = lock(&entry.position);
        if !position.decides_at(Instant::now()) {
            return Err(call);
        }
        let result = call(&mut t, clock());
        position.take_changes(state, t.book());
        entry.calls.fetch_add(1, Ordering::Relaxed);
        Ok(result)
    }

    /// Waits until the changes up to sequence number `mark` are shipped (or
    /// given up on, the store failing). The waiting call ships them itself,
    /// with every change made so far, unless a shipment is on its way; then
    /// it waits for that one's answer and looks again (group commit).
    async fn durable(&self, state: &StoreState, product: usize, mark: u64) {
        let entry = &self.inner.products[product];
        loop {
            let acked = entry.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if self.inner.suspended.load(Ordering::Relaxed) || lock(&entry.position).released >= mark {
                return;
            }
            match self.inner.ship(state, product).await {
                Shipped::Done => {}
                Shipped::Busy => acked.await,
                // Without a lease every change is released; this is defensive.
                Shipped::Gone => return,
            }
        }
    }

    /// Catches up with the store and ships this replica's changes, making no
    /// call of its own: run every `sync_interval`, so that changes made while
    /// the store was away go as soon as it is back, even on an idle replica.
    pub async fn flush(&self, state: &Arc<StoreState>, product: usize, target: &Mutex<T>, clock: impl Fn() -> Nanos) {
        // A store that failed is first asked without the turn held, so that
        // calls never queue behind a store that does not answer.
        if self.inner.suspended.load(Ordering::Relaxed) && self.inner.within(state, self.inner.ping()).await.is_none() {
            return;
        }
        let _turn = self.inner.products[product].turn.lock().await;
        self.take_turn(state, product, target, &clock).await;
    }

    /// One turn, with the turn held: under a lease that has time left, the
    /// queued calls are made at once; otherwise the lock is taken with the
    /// changes made meanwhile, they are applied, and then the calls are made.
    /// While the store is suspended, the calls are made locally and their
    /// changes wait.
    async fn take_turn(&self, state: &Arc<StoreState>, product: usize, target: &Mutex<T>, clock: &impl Fn() -> Nanos) {
        let inner = &self.inner;
        let entry = &inner.products[product];
        if inner.suspended.load(Ordering::Relaxed) {
            let calls = inner.run_jobs(state, product, target, clock, Vec::new(), None);
            state.local_calls.fetch_add(calls, Ordering::Relaxed);
            return;
        }
        let (token, after) = {
            let position = lock(&entry.position);
            if position.decides_at(Instant::now()) {
                drop(position);
                let calls = inner.run_jobs(state, product, target, clock, Vec::new(), None);
                entry.calls.fetch_add(calls, Ordering::Relaxed);
                return;
            }
            // A lease running out is taken again with its own token.
            let token = match &position.lease {
                Some(lease) => lease.token.clone(),
                None => format!("{}:{}", inner.replica, inner.sequence.fetch_add(1, Ordering::Relaxed)),
            };
            (token, position.last_id.clone())
        };
        let sent = Instant::now();
        let Some(changes) = inner.within(state, inner.lock_and_read(product, &token, after)).await else {
            lose_lease(entry, &mut lock(&entry.position));
            let calls = inner.run_jobs(state, product, target, clock, Vec::new(), None);
            state.local_calls.fetch_add(calls, Ordering::Relaxed);
            return;
        };
        record_round_trip(state, sent);
        state.acquisitions.fetch_add(1, Ordering::Relaxed);
        let lease = Lease { token, expires: sent + LOCK_TTL };
        let calls = inner.run_jobs(state, product, target, clock, changes, Some(lease));
        entry.calls.fetch_add(calls, Ordering::Relaxed);
        let unshipped = {
            let mut position = lock(&entry.position);
            let unshipped = position.lease.is_some() && !position.shipping;
            position.shipping |= unshipped;
            unshipped
        };
        if unshipped {
            tokio::spawn(self.clone().ship_while_held(state.clone(), product));
        }
    }

    /// The lease holder's shipper: ships an arrival's changes at once, every
    /// [`SHIP_EVERY`] renews the lease (shipping what waits) unless a shipment
    /// just did, and lets go once calls stop or another replica asks for the
    /// lock.
    async fn ship_while_held(self, state: Arc<StoreState>, product: usize) {
        let entry = &self.inner.products[product];
        let mut calls_seen = entry.calls.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            tokio::select! {
                () = entry.work.notified() => {
                    self.inner.ship(&state, product).await;
                }
                () = tokio::time::sleep(SHIP_EVERY) => {}
            }
            let (wanted, fresh) = {
                let mut position = lock(&entry.position);
                if position.lease.is_none() {
                    position.shipping = false;
                    return;
                }
                (position.wanted, position.last_shipped.is_some_and(|at| at.elapsed() < SHIP_EVERY))
            };
            let calls = entry.calls.load(Ordering::Relaxed);
            if calls != calls_seen {
                (calls_seen, quiet_since) = (calls, Instant::now());
            }
            if wanted || quiet_since.elapsed() >= IDLE_LET_GO {
                return self.inner.let_go(&state, product).await;
            }
            if !fresh {
                self.inner.ship(&state, product).await;
            }
        }
    }
}

impl<T> Inner<T> {
    /// Ships what the lease's calls changed so far and renews the lease,
    /// without holding the turn while the exchange runs: calls go on being
    /// made meanwhile (no one else can make any while the lock is held). One
    /// shipment at a time, so that they land in order.
    async fn ship(&self, state: &StoreState, product: usize) -> Shipped {
        let entry = &self.products[product];
        let (token, batches, upto) = {
            let mut position = lock(&entry.position);
            if position.in_flight {
                return Shipped::Busy;
            }
            let Some(token) = position.lease.as_ref().map(|lease| lease.token.clone()) else {
                return Shipped::Gone;
            };
            position.in_flight = true;
            (token, self.encode(&mut position), position.changes_made)
        };
        let guard = InFlight { product: entry };
        let sent = Instant::now();
        let reply = self.within(state, self.renew(product, &token, batches)).await;
        let mut position = lock(&entry.position);
        std::mem::forget(guard);
        position.in_flight = false;
        let Some((held, last, wanted)) = reply else {
            lose_lease(entry, &mut position);
            return Shipped::Done;
        };
        record_round_trip(state, sent);
        self.shipped(state, &mut position, upto, held, last);
        entry.release(&mut position, upto);
        position.wanted |= wanted;
        position.last_shipped = Some(sent);
        match position.lease.as_mut() {
            Some(lease) if held => lease.expires = sent + LOCK_TTL,
            _ => {
                tracing::warn!(lock = %entry.lock, "counters: a lease ran out before its changes were shipped");
                lose_lease(entry, &mut position);
            }
        }
        Shipped::Done
    }

    /// Ships the rest and releases the lock, after any shipment on its way.
    /// The lease is gone before the exchange starts, so no call is made under
    /// it meanwhile, and the turn is held throughout, so the next lock is
    /// taken after this one is let go.
    async fn let_go(&self, state: &StoreState, product: usize) {
        let entry = &self.products[product];
        let _turn = entry.turn.lock().await;
        let (lease, batches, upto) = loop {
            let acked = entry.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let taken = {
                let mut position = lock(&entry.position);
                if position.in_flight {
                    None
                } else {
                    position.shipping = false;
                    position.wanted = false;
                    let Some(lease) = position.lease.take() else { return };
                    Some((lease, self.encode(&mut position), position.changes_made))
                }
            };
            match taken {
                Some(taken) => break taken,
                None => acked.await,
            }
        };
        let sent = Instant::now();
        let reply = self.within(state, self.release(product, &lease.token, batches)).await;
        let mut position = lock(&entry.position);
        if let Some((held, last, _)) = reply {
            record_round_trip(state, sent);
            self.shipped(state, &mut position, upto, held, last);
            if !held {
                tracing::warn!(lock = %entry.lock, "counters: a lease ran out before its changes were shipped");
            }
        }
        // Shipped, or the store failed: either way no call waits any longer.
        let made = position.changes_made;
        entry.release(&mut position, made);
    }

    /// Forgets the changes up to sequence number `upto` once shipped, and
    /// moves this replica's position past its own entries when it held the
    /// lock (no one else wrote in between).
    fn shipped(&self, state: &StoreState, position: &mut Position, upto: u64, held: bool, last: String) {
        let oldest = position.changes_made + 1 - position.backlog.len() as u64;
        let gone = (upto + 1).saturating_sub(oldest).min(position.backlog.len() as u64);
        position.backlog.drain(..gone as usize);
        state.shipped.fetch_add(gone, Ordering::Relaxed);
        state.backlog.store(position.backlog.len() as u64, Ordering::Relaxed);
        if held && !last.is_empty() {
            position.last_id = Some(last);
        }
    }

    /// The backlog as batches of changes, each with its first sequence number.
    fn encode(&self, position: &mut Position) -> Vec<String> {
        let oldest = position.changes_made + 1 - position.backlog.len() as u64;
        let changes = position.backlog.make_contiguous();
        let batches = changes.chunks(BATCH_CHANGES).enumerate().map(|(n, chunk)| {
            let first_seq = Some(oldest + (n * BATCH_CHANGES) as u64);
            let batch = BatchOut { replica: &self.replica, first_seq, changes: chunk };
            serde_json::to_string(&batch).expect("a change serializes")
        });
        batches.collect()
    }

    /// Applies the others' changes, then makes every queued call, then moves the
    /// calls' changes into the backlog; the lease just taken, if any, starts
    /// once the changes are applied. Returns how many calls it made.
    fn run_jobs(
        &self,
        state: &StoreState,
        product: usize,
        target: &Mutex<T>,
        clock: &impl Fn() -> Nanos,
        changes: Vec<(String, Option<Batch>)>,
        lease: Option<Lease>,
    ) -> u64
    where
        T: Journaled,
    {
        let entry = &self.products[product];
        let jobs = std::mem::take(&mut *lock(&entry.queue));
        let calls = jobs.len() as u64;
        let mut t = lock(target);
        let mut position = lock(&entry.position);
        for (id, batch) in changes {
            position.last_id = Some(id);
            if let Some(batch) = batch {
                apply(state, &mut position, t.book(), batch, clock);
            }
        }
        if lease.is_some() {
            position.lease = lease;
        }
        for job in jobs {
            let now = clock();
            job(&mut t, now);
        }
        position.take_changes(state, t.book());
        calls
    }

    /// Runs one exchange under [`EXCHANGE_TIMEOUT`]; a failure is counted, marks
    /// the store unreachable and makes calls local until the background turn
    /// reaches the store again.
    async fn within<V>(
        &self,
        state: &StoreState,
        exchange: impl std::future::Future<Output = redis::RedisResult<V>>,
    ) -> Option<V> {
        let error = match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
            Ok(Ok(value)) => {
                self.suspended.store(false, Ordering::Relaxed);
                if !state.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("counters: the store is reachable; every call is made against it");
                }
                return Some(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        state.errors.fetch_add(1, Ordering::Relaxed);
        if state.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, "counters: the store cannot be reached; deciding on local counters");
        }
        CONNECTIONS.with(|c| c.borrow_mut().retain(|(id, _)| *id != self.id));
        self.suspended.store(true, Ordering::Relaxed);
        None
    }

    async fn ping(&self) -> redis::RedisResult<()> {
        let mut con = self.connection().await?;
        redis::cmd("PING").query_async(&mut con).await
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let known = CONNECTIONS.with(|c| c.borrow().iter().find(|(id, _)| *id == self.id).map(|(_, c)| c.clone()));
        if let Some(connection) = known {
            return Ok(connection);
        }
        // One quick try: a store that is away is retried by the next
        // background turn, not by a request waiting on it.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(EXCHANGE_TIMEOUT / 2))
            .set_response_timeout(Some(EXCHANGE_TIMEOUT))
            .set_number_of_retries(1);
        let fresh = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        CONNECTIONS.with(|c| c.borrow_mut().push((self.id, fresh.clone())));
        Ok(fresh)
    }

    /// Takes the product's lock, waiting while another replica holds it (and
    /// claiming the next turn meanwhile), and reads every change after this
    /// replica's position.
    async fn lock_and_read(
        &self,
        product: usize,
        token: &str,
        after: Option<String>,
    ) -> redis::RedisResult<Vec<(String, Option<Batch>)>> {
        let mut con = self.connection().await?;
        let entry = &self.products[product];
        // A replica new to the fleet replays what the stream holds, so that it
        // starts from the fleet's counters, not from empty ones.
        let after = after.unwrap_or_else(|| "0-0".to_owned());
        let mut spins = 0u32;
        let first: redis::streams::StreamRangeReply = loop {
            let mut invocation = self.acquire.key(&entry.lock);
            invocation.key(&entry.stream).key(&entry.wanted);
            invocation.arg(token).arg(LOCK_TTL.as_millis() as u64).arg(&after).arg(READ_BATCH);
            invocation.arg(&self.replica).arg(WANT_TTL.as_millis() as u64);
            let reply: Option<redis::streams::StreamRangeReply> = invocation.invoke_async(&mut con).await?;
            if let Some(reply) = reply {
                break reply;
            }
            // Held by another replica, which lets go within a shipment or two
            // of seeing the claim: ask again at once a few times, then give the
            // runtime a millisecond.
            spins += 1;
            if spins > 8 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let mut changes = Vec::new();
        let mut more = first.ids.len() == READ_BATCH;
        self.decode(&entry.stream, first, &mut changes);
        while more {
            let from =
                format!("({}", changes.last().map_or(after.as_str(), |(id, _): &(String, Option<Batch>)| id.as_str()));
            let next: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&entry.stream)
                .arg(from)
                .arg("+")
                .arg("COUNT")
                .arg(READ_BATCH)
                .query_async(&mut con)
                .await?;
            more = next.ids.len() == READ_BATCH;
            self.decode(&entry.stream, next, &mut changes);
        }
        Ok(changes)
    }

    /// The stream's entries in order, as batches; this replica's own, and any
    /// limitlab did not write, are `None` (skipped, but read past).
    fn decode(&self, stream: &str, reply: redis::streams::StreamRangeReply, into: &mut Vec<(String, Option<Batch>)>) {
        for item in reply.ids {
            let batch = read_batch(stream, &self.replica, &item);
            into.push((item.id, batch));
        }
    }

    /// Appends `batches` to the product's stream and releases the lock if
    /// `token` still holds it. Returns whether it did, the last entry's id,
    /// and whether another replica waits.
    async fn release(
        &self,
        product: usize,
        token: &str,
        batches: Vec<String>,
    ) -> redis::RedisResult<(bool, String, bool)> {
        let mut con = self.connection().await?;
        let entry = &self.products[product];
        let mut invocation = self.let_go.key(&entry.lock);
        invocation.key(&entry.stream).key(&entry.wanted);
        invocation.arg(token).arg(&self.replica);
        for batch in batches {
            invocation.arg(batch);
        }
        let (held, last, wanted): (u8, String, u8) = invocation.invoke_async(&mut con).await?;
        Ok((held == 1, last, wanted == 1))
    }

    /// Appends `batches` to the product's stream and renews the lock for
    /// [`LOCK_TTL`]: one transaction (`MULTI` and `EXEC`, so nothing runs
    /// between its commands) that reads the lock's holder, appends, renews and
    /// asks whether another replica waits. Returns whether `token` held the
    /// lock, the last entry's id, and whether another replica waits. It takes
    /// a third of the store's time a script does. The renewal is not
    /// conditional: a replica whose lease ran out and passed on extends the
    /// next holder's lock by at most [`LOCK_TTL`], which only delays the fleet
    /// if that holder dies meanwhile; it learns from the holder read that its
    /// lease is gone.
    async fn renew(
        &self,
        product: usize,
        token: &str,
        batches: Vec<String>,
    ) -> redis::RedisResult<(bool, String, bool)> {
        let mut con = self.connection().await?;
        let entry = &self.products[product];
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("GET").arg(&entry.lock);
        for batch in &batches {
            pipe.cmd("XADD").arg(&entry.stream).arg("MAXLEN").arg("~").arg(100_000).arg("*");
            pipe.arg("r").arg(&self.replica).arg("e").arg(batch);
        }
        pipe.cmd("PEXPIRE").arg(&entry.lock).arg(LOCK_TTL.as_millis() as u64).ignore();
        pipe.cmd("EXISTS").arg(&entry.wanted);
        let replies: Vec<redis::Value> = pipe.query_async(&mut con).await?;
        let [holder, appended @ .., wanted] = replies.as_slice() else {
            return Err((redis::ErrorKind::UnexpectedReturnType, "a shipment's transaction answered nothing").into());
        };
        let holder: Option<String> = redis::from_redis_value(holder.clone())?;
        let last: String = match appended.last() {
            Some(id) => redis::from_redis_value(id.clone())?,
            None => String::new(),
        };
        let wanted: u8 = redis::from_redis_value(wanted.clone())?;
        Ok((holder.as_deref() == Some(token), last, wanted == 1))
    }
}

/// The lease is gone (the store failed, or the lock ran out): the calls
/// waiting for their changes go on; those changes wait for the next lease.
fn lose_lease<T>(entry: &Product<T>, position: &mut Position) {
    position.lease = None;
    let made = position.changes_made;
    entry.release(position, made);
}

/// Clears a shipment's mark if the task shipping it is dropped on the way (its
/// client went away): its changes stay in the backlog for the next one.
struct InFlight<'a, T> {
    product: &'a Product<T>,
}

impl<T> Drop for InFlight<'_, T> {
    fn drop(&mut self) {
        lock(&self.product.position).in_flight = false;
        self.product.acked.notify_waiters();
    }
}

/// Applies another replica's batch of changes, each at the instant it was
/// made, skipping those already applied.
fn apply(state: &StoreState, position: &mut Position, book: &mut LimitBook, batch: Batch, clock: &impl Fn() -> Nanos) {
    let seen = position.applied.entry(batch.replica).or_insert(0);
    let mut timings = state.timings.lock().unwrap_or_else(|e| e.into_inner());
    let now = clock();
    for (i, delta) in batch.changes.iter().enumerate() {
        if let Some(first) = batch.first_seq {
            let seq = first + i as u64;
            if seq <= *seen {
                continue;
            }
            *seen = seq;
        }
        book.handle_delta(delta.at, delta);
        state.applied.fetch_add(1, Ordering::Relaxed);
        timings.lag_s.saturating_record((now.saturating_sub(delta.at).0 / 1000).max(1));
    }
}

fn record_round_trip(state: &StoreState, sent: Instant) {
    let mut timings = state.timings.lock().unwrap_or_else(|e| e.into_inner());
    timings.round_trip_s.saturating_record(sent.elapsed().as_micros().max(1) as u64);
}

fn lock<V>(mutex: &Mutex<V>) -> std::sync::MutexGuard<'_, V> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
