//! Exact mode: every counter-changing call the core makes is made against the
//! fleet's shared counters, in one order that every replica replays.
//!
//! Redis holds, per product, the stream of counter changes (as in lagged mode)
//! and a lock. A replica that has calls for a product to make (a request's
//! admission, an attempt's outcome, a completion's token charge) takes the lock
//! and, in the same script, reads the changes the others made since it last
//! looked; it applies them (`handle_delta`, each at the instant it was made),
//! makes its calls with the core as usual, and ships the calls' changes while
//! releasing the lock, in a second script. So the core's rules stay in the
//! core, in one place, and every replica's counters go through the same
//! sequence of changes that one gateway's would: two round trips per batch.
//!
//! Calls queue per product; the replica that takes its turn makes every call
//! queued by then (group commit), so a busy replica pays the two round trips
//! once per batch, not once per call.
//!
//! While the store cannot be reached, calls are made on the local counters, as
//! in lagged mode (or refused, with `on_store_error = "reject"`), their changes
//! wait in a backlog, and they are shipped with the next batch once it is back.
//! Each change carries its replica's sequence number, so a batch shipped twice
//! (its answer lost) is applied once.

use crate::counters::{read_batch, Batch, BatchOut, CountersConfig, StoreState, BATCH_CHANGES, MAX_BACKLOG};
use gateway_core::{CounterDelta, Lifecycle, LimitBook, Nanos};
use redis::aio::ConnectionManager;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
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

/// How long a replica holds a product's lock at most: one that dies holding it
/// stops the others for this long.
const LOCK_TTL_MS: u64 = 500;

/// How long one exchange with the store may take before it counts as an error
/// (waiting for a lock that a dead replica held included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(LOCK_TTL_MS * 2);

/// The most changes one script returns; more are read with XRANGE while the
/// lock is held.
const READ_BATCH: usize = 10_000;

/// Takes the lock (KEYS[1]) if free and returns the changes after ARGV[3] in
/// the stream (KEYS[2]); false if another replica holds the lock.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+', 'COUNT', ARGV[4])
end
return false
";

/// Appends the batches of changes (ARGV[3..]) of replica ARGV[2] and releases
/// the lock if this replica still holds it; returns whether it did and the id
/// of the last entry appended.
const RELEASE: &str = r"
local held = redis.call('GET', KEYS[1]) == ARGV[1]
local last = ''
for i = 3, #ARGV do
  last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'r', ARGV[2], 'e', ARGV[i])
end
if held then redis.call('DEL', KEYS[1]) end
return {held and 1 or 0, last}
";

/// Distinguishes `Exact`s in one process (tests run several replicas) in the
/// per-thread connection table.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// One connection per worker thread and store: its driver runs on the
    /// thread's own runtime, so a round trip never wakes another thread.
    static CONNECTIONS: RefCell<Vec<(u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

pub struct Exact<T> {
    id: u64,
    client: redis::Client,
    replica: String,
    /// Set when an exchange fails: calls are then made locally, without waiting
    /// on the store, until the background turn ([`Exact::flush`], every
    /// `sync_interval`) reaches it again.
    suspended: AtomicBool,
    sequence: AtomicU64,
    acquire: redis::Script,
    release: redis::Script,
    products: Vec<Product<T>>,
}

struct Product<T> {
    stream: String,
    lock: String,
    queue: Mutex<Vec<Job<T>>>,
    /// Held by the replica's task that makes the queued calls, across its
    /// round trips; FIFO, so every queued call is made by the next turn.
    turn: tokio::sync::Mutex<Position>,
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
                queue: Mutex::new(Vec::new()),
                turn: tokio::sync::Mutex::new(Position::default()),
            })
            .collect();
        Ok(Exact {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            client,
            replica,
            suspended: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
            products,
        })
    }

    /// Makes `call` on `target` (product `product`'s core) in the fleet's order:
    /// after every change any replica made before it, and shipped before any
    /// made after it. `clock` reads the core's time. If the task awaiting this
    /// is dropped before the call is made, the call is made anyway and its
    /// result goes to `abandoned`, which must end what it started.
    pub async fn call<R: Send + 'static>(
        &self,
        state: &StoreState,
        product: usize,
        target: &Mutex<T>,
        clock: impl Fn() -> Nanos,
        call: impl FnOnce(&mut T, Nanos) -> R + Send + 'static,
        abandoned: impl FnOnce(&mut T, Nanos, R) + Send + 'static,
    ) -> R {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let job: Job<T> = Box::new(move |t: &mut T, now: Nanos| {
            let result = call(t, now);
            if let Err(result) = tx.send(result) {
                abandoned(t, now, result);
            }
        });
        let entry = &self.products[product];
        lock(&entry.queue).push(job);
        let mut position = entry.turn.lock().await;
        if let Ok(result) = rx.try_recv() {
            return result;
        }
        self.take_turn(state, product, &mut position, target, &clock).await;
        rx.try_recv().expect("a turn makes every call queued before it")
    }

    /// Catches up with the store and ships this replica's changes, making no
    /// call of its own: run every `sync_interval`, so that changes made while
    /// the store was away go as soon as it is back, even on an idle replica.
    pub async fn flush(&self, state: &StoreState, product: usize, target: &Mutex<T>, clock: impl Fn() -> Nanos) {
        // A store that failed is first asked without the turn held, so that
        // calls never queue behind a store that does not answer.
        if self.suspended.load(Ordering::Relaxed) && self.within(state, self.ping()).await.is_none() {
            return;
        }
        let mut position = self.products[product].turn.lock().await;
        self.take_turn(state, product, &mut position, target, &clock).await;
    }

    /// One turn: take the lock and the changes made meanwhile, apply them, make
    /// the queued calls, ship their changes and release the lock. While the
    /// store is suspended, the calls are made locally and their changes wait.
    async fn take_turn(
        &self,
        state: &StoreState,
        product: usize,
        position: &mut Position,
        target: &Mutex<T>,
        clock: &impl Fn() -> Nanos,
    ) {
        let started = Instant::now();
        let token = format!("{}:{}", self.replica, self.sequence.fetch_add(1, Ordering::Relaxed));
        let changes = match self.suspended.load(Ordering::Relaxed) {
            false => self.within(state, self.lock_and_read(product, &token, position)).await,
            true => None,
        };
        let shared = changes.is_some();
        let calls = self.run_jobs(state, product, position, target, clock, changes.unwrap_or_default());
        if !shared {
            state.local_calls.fetch_add(calls, Ordering::Relaxed);
        } else if let Some(()) = self.within(state, self.ship_and_unlock(product, &token, position)).await {
            state.shipped.fetch_add(position.backlog.len() as u64, Ordering::Relaxed);
            position.backlog.clear();
            let mut timings = state.timings.lock().unwrap_or_else(|e| e.into_inner());
            timings.round_trip_s.saturating_record(started.elapsed().as_micros().max(1) as u64);
        }
        state.backlog.store(position.backlog.len() as u64, Ordering::Relaxed);
    }

    /// Applies the others' changes, then makes every queued call, then moves the
    /// calls' changes (and any made outside a turn) into the backlog. Returns
    /// how many calls it made.
    fn run_jobs(
        &self,
        state: &StoreState,
        product: usize,
        position: &mut Position,
        target: &Mutex<T>,
        clock: &impl Fn() -> Nanos,
        changes: Vec<(String, Option<Batch>)>,
    ) -> u64 {
        let jobs = std::mem::take(&mut *lock(&self.products[product].queue));
        let calls = jobs.len() as u64;
        let mut t = lock(target);
        for (id, entry) in changes {
            position.last_id = Some(id);
            if let Some(batch) = entry {
                self.apply(state, position, t.book(), batch, clock);
            }
        }
        for job in jobs {
            let now = clock();
            job(&mut t, now);
        }
        while let Some(delta) = t.book().poll_delta() {
            if position.backlog.len() >= MAX_BACKLOG {
                position.backlog.pop_front();
                state.dropped.fetch_add(1, Ordering::Relaxed);
            }
            position.changes_made += 1;
            position.backlog.push_back(delta);
        }
        calls
    }

    /// Applies another replica's batch of changes, each at the instant it was
    /// made, skipping those already applied.
    fn apply(
        &self,
        state: &StoreState,
        position: &mut Position,
        book: &mut LimitBook,
        batch: Batch,
        clock: &impl Fn() -> Nanos,
    ) {
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

    /// Runs one exchange under [`EXCHANGE_TIMEOUT`]; a failure is counted, marks
    /// the store unreachable and makes calls local until `retry_after` passes.
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

    /// Takes the product's lock, waiting while another replica holds it, and
    /// reads every change after this replica's position.
    async fn lock_and_read(
        &self,
        product: usize,
        token: &str,
        position: &Position,
    ) -> redis::RedisResult<Vec<(String, Option<Batch>)>> {
        let mut con = self.connection().await?;
        let entry = &self.products[product];
        // A replica new to the fleet replays what the stream holds, so that it
        // starts from the fleet's counters, not from empty ones.
        let after = position.last_id.clone().unwrap_or_else(|| "0-0".to_owned());
        let mut spins = 0u32;
        let first: redis::streams::StreamRangeReply = loop {
            let mut invocation = self.acquire.key(&entry.lock);
            invocation.key(&entry.stream).arg(token).arg(LOCK_TTL_MS).arg(&after).arg(READ_BATCH);
            let reply: Option<redis::streams::StreamRangeReply> = invocation.invoke_async(&mut con).await?;
            if let Some(reply) = reply {
                break reply;
            }
            // Held by another replica for a round trip or two: ask again at
            // once a few times, then give the runtime a millisecond.
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

    /// Ships the backlog and releases the lock; moves this replica's position
    /// past its own changes when no one else wrote in between.
    async fn ship_and_unlock(&self, product: usize, token: &str, position: &mut Position) -> redis::RedisResult<()> {
        let mut con = self.connection().await?;
        let entry = &self.products[product];
        let mut invocation = self.release.key(&entry.lock);
        invocation.key(&entry.stream).arg(token).arg(&self.replica);
        let oldest = position.changes_made + 1 - position.backlog.len() as u64;
        for (n, chunk) in position.backlog.make_contiguous().chunks(BATCH_CHANGES).enumerate() {
            let first_seq = Some(oldest + (n * BATCH_CHANGES) as u64);
            let batch = BatchOut { replica: &self.replica, first_seq, changes: chunk };
            invocation.arg(serde_json::to_string(&batch).expect("a change serializes"));
        }
        let (held, last): (u8, String) = invocation.invoke_async(&mut con).await?;
        if held == 1 && !last.is_empty() {
            position.last_id = Some(last);
        }
        if held == 0 {
            tracing::warn!(lock = %entry.lock, "counters: a turn outlasted its lock; changes were shipped anyway");
        }
        Ok(())
    }
}

fn lock<V>(mutex: &Mutex<V>) -> std::sync::MutexGuard<'_, V> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
