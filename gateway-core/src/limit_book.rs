//! The limit book: every limit's counters and the requests they hold, with
//! `handle_request` on the way in and `handle_response` on the way out.

use crate::counters::RowId;
use crate::delta::{Change, CounterDelta};
use crate::key::{KeyExpr, RequestInfo};
use crate::limiter::{BucketShape, Check, WindowGrid};
use crate::policy::{Algorithm, Limit, Policy, Quota, RateLimit, TokenLimit};
use crate::reason::Reason;
use crate::store::{ClassId, Counter, Shape, Store};
use crate::time::{format_hh_mm_ss, Nanos};
use cache_hint as hint;
use smallvec::SmallVec;
use std::collections::VecDeque;

/// Identifies one client request between `handle_request` and `handle_response`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl RequestId {
    /// The slot half: unique among one gateway's requests in flight, so drivers
    /// may index their own per-request state by it.
    pub fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// What the limit book decided for a request on its way in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestDecision {
    /// Every limit admitted it: forward it, then report the outcome with `handle_response`.
    Forward(Admitted),
    /// A limit rejected it: answer the client with this; the request is finished.
    Reject(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: RequestId,
    /// Policy variables set on the way in (`*_variable_name`), in policy order.
    pub variables: Vec<(String, i64)>,
}

/// The response APIM sends for a rejection, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// A limit reason ([`Reason::is_limit`]).
    pub reason: Reason,
    /// Index of the rejecting limit in the policy.
    pub limit_index: usize,
    /// `None` only for a quota that never renews (`renewal_period = 0`).
    pub retry_after_secs: Option<u64>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub variables: Vec<(String, i64)>,
}

/// What became of a forwarded request, as the driver observed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseInfo {
    /// The final status the client receives; `None` when no response came at all
    /// (transport failure, client gone), which matches no increment condition.
    pub status: Option<u16>,
    /// Tokens the backend reported (`usage.total_tokens`) or the driver counted.
    pub total_tokens: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// What the limit book adds to the client's response on the way out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    pub headers: Vec<(String, String)>,
    pub variables: Vec<(String, i64)>,
    /// Tokens charged to each distinct token counter (the same figure for each).
    pub tokens_charged: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreError {
    UnknownRequest(RequestId),
    /// An attempt reported while the response is being delivered, or the reverse.
    WrongPhase(RequestId),
}

impl std::fmt::Display for CoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoreError::UnknownRequest(id) => write!(f, "request {} is not in flight", id.0),
            CoreError::WrongPhase(id) => write!(f, "request {} is not in the phase this event belongs to", id.0),
        }
    }
}

impl std::error::Error for CoreError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Amount {
    Calls,
    Bytes,
    Tokens,
    /// Tokens set aside at admission (reserve mode), settled on the way out.
    Reserved,
    /// A marker (amount 1): this request's tokens are settled on the counter.
    Settled,
}

struct CompiledLimit {
    limit: Limit,
    key: KeyExpr,
    /// The first earlier limit with the same key expression: its key is this
    /// limit's key for every request, so it is neither written nor looked up again.
    same_key_as: Option<usize>,
    /// The rate, quota or tokens-per-minute counters.
    primary: Option<ClassId>,
    /// The token-quota counters of a token limit.
    token_quota: Option<ClassId>,
}

/// The counter rows the limits of one request pinned. A pinned row keeps its
/// key, so the row stands for the key: the book holds no key text of its own.
#[derive(Default)]
struct KeyBook {
    /// `rows[i]` is limit i's key's row, pinned once for each limit; only limits
    /// that ran have one. Inline for a policy of up to four limits, so the rows
    /// can be found (and asked for early) from the ledger itself.
    rows: SmallVec<[RowId; 4]>,
}

impl KeyBook {
    /// Computes the next limit's key and pins its row. A limit whose key
    /// expression an earlier limit shares takes that limit's row as it is; a key
    /// an earlier limit of this request computed reuses its row without a lookup.
    /// A key that is not one field of the request is written in `scratch`.
    fn push(&mut self, limit: &CompiledLimit, req: &RequestInfo, store: &mut Store, now: Nanos, scratch: &mut String) {
        if let Some(earlier) = limit.same_key_as {
            let row = self.rows[earlier];
            store.pin_again(row);
            self.rows.push(row);
            return;
        }
        let key = limit.key.read(req, scratch);
        let row = match self.rows.iter().find(|&&row| store.key(row) == key) {
            Some(&row) => {
                store.pin_again(row);
                row
            }
            None => store.pin(now, key),
        };
        self.rows.push(row);
    }

    /// Forgets the latest limit's key.
    fn pop(&mut self, store: &mut Store) {
        if let Some(row) = self.rows.pop() {
            store.unpin(row);
        }
    }

    fn row(&self, limit: usize) -> RowId {
        self.rows[limit]
    }

    fn ran(&self) -> usize {
        self.rows.len()
    }

    /// Unpins every row.
    fn release(&mut self, store: &mut Store) {
        self.rows.drain(..).for_each(|row| store.unpin(row));
    }
}

/// What one request has added to counters and to its response so far.
#[derive(Default)]
struct Effects {
    /// (class, limit whose key was used, what, how much): a shared counter counts a request once.
    added: Vec<(ClassId, usize, Amount, u64)>,
    headers: Vec<(String, String)>,
    variables: Vec<(String, i64)>,
}

impl Effects {
    /// What this request added to the counter of family `class` in `row`: rows
    /// stand for keys, since a pinned row keeps its key.
    fn added(&self, keys: &KeyBook, class: ClassId, row: RowId, amount: Amount) -> u64 {
        self.added
            .iter()
            .filter(|&&(c, l, a, _)| c == class && a == amount && keys.row(l) == row)
            .fold(0, |sum, e| sum.saturating_add(e.3))
    }

    fn note(&mut self, class: ClassId, limit: usize, amount: Amount, n: u64) {
        self.added.push((class, limit, amount, n));
    }
}

/// Per-request state between the way in and the way out; recycled, so a steady
/// stream of requests allocates nothing for it.
#[derive(Default)]
struct Ledger {
    keys: KeyBook,
    effects: Effects,
    /// When the request was admitted: the instant its reservations were stamped at.
    admitted_at: Nanos,
    /// How many of `effects.added` the journal has already seen.
    journaled: usize,
}

impl Ledger {
    fn clear(&mut self) {
        debug_assert!(self.keys.rows.is_empty(), "a free slot's ledger pins nothing");
        self.effects.added.clear();
        self.effects.headers.clear();
        self.effects.variables.clear();
        self.journaled = 0;
    }
}

struct Slot {
    generation: u32,
    /// Whether a request holds this slot between the way in and the way out.
    live: bool,
    /// Filled in place, and kept with its buffers when the slot is freed.
    ledger: Ledger,
}

/// The requests in flight; a `RequestId` is a slot index and its generation.
#[derive(Default)]
struct Requests {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl Requests {
    /// A free slot with a cleared ledger, not yet live.
    fn claim(&mut self) -> usize {
        let index = self.free.pop().map(|i| i as usize).unwrap_or_else(|| {
            self.slots.push(Slot { generation: 0, live: false, ledger: Ledger::default() });
            self.slots.len() - 1
        });
        debug_assert!(!self.slots[index].live, "a free slot holds no request");
        self.slots[index].ledger.clear();
        index
    }

    /// The claimed slot's request is admitted and gets its id.
    fn admit(&mut self, index: usize) -> RequestId {
        let slot = &mut self.slots[index];
        slot.live = true;
        self.live += 1;
        let index = u32::try_from(index).expect("fewer than 2^32 requests in flight");
        RequestId(u64::from(slot.generation) << 32 | u64::from(index))
    }

    /// The slot of the request in flight with this id.
    fn find(&self, id: RequestId) -> Option<usize> {
        let slot = self.slots.get(id.slot())?;
        (slot.live && slot.generation == id.generation()).then_some(id.slot())
    }

    /// Frees a claimed or live slot; a live one's id becomes stale.
    fn free(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        debug_assert!(slot.ledger.keys.rows.is_empty(), "a freed request pins nothing");
        if slot.live {
            slot.live = false;
            slot.generation = slot.generation.wrapping_add(1);
            self.live -= 1;
        }
        self.free.push(index as u32);
    }
}

/// The sans-IO limit book of one gateway: the policy's limits, their counters
/// per key, and the ledger of each request they admitted until its response.
pub struct LimitBook {
    limits: Vec<CompiledLimit>,
    store: Store,
    requests: Requests,
    last_now: Nanos,
    /// Counter changes not yet polled, when journaling is on.
    journal: Option<VecDeque<CounterDelta>>,
    /// Where keys that are not one field of the request are written.
    scratch: String,
}

const MINUTE: Nanos = Nanos::from_secs(60);

impl LimitBook {
    /// Builds the limit book. `hash_seed` seeds the counter maps' hasher: fixed in a
    /// simulation, random in a server (the core never draws it itself).
    pub fn new(policy: &Policy, hash_seed: u64) -> LimitBook {
        let mut shapes: Vec<(&'static str, Shape)> = Vec::new();
        let mut class_of = |namespace: &'static str, shape: Shape| -> ClassId {
            if let Some(i) = shapes.iter().position(|&(n, s)| n == namespace && s == shape) {
                return i;
            }
            shapes.push((namespace, shape));
            shapes.len() - 1
        };
        let mut limits: Vec<CompiledLimit> = policy.limits.iter().map(|limit| compile(limit, &mut class_of)).collect();
        for i in 0..limits.len() {
            limits[i].same_key_as = (0..i).find(|&j| limits[j].key == limits[i].key);
        }
        let store = Store::new(shapes.iter().map(|&(_, shape)| shape).collect(), hash_seed);
        LimitBook {
            limits,
            store,
            requests: Requests::default(),
            last_now: Nanos::ZERO,
            journal: None,
            scratch: String::new(),
        }
    }

    /// Keeps a journal of every counter change, drained with [`LimitBook::poll_delta`].
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(VecDeque::new);
    }

    /// The next counter change this gateway made, oldest first.
    pub fn poll_delta(&mut self) -> Option<CounterDelta> {
        self.journal.as_mut()?.pop_front()
    }

    /// Applies another replica's counter change as it arrives at `now`. Calls
    /// and tokens keep the instant they were counted at, so they leave sliding
    /// windows when they would have; a change to a window or period that has
    /// since ended is moot.
    pub fn handle_delta(&mut self, now: Nanos, delta: &CounterDelta) {
        let now = self.observe(now);
        self.store.apply(now, delta);
    }

    /// See [`crate::Hints::lookup`]. Keys that are not one field of the request
    /// are written into a buffer of the hint's own, so the book is not changed.
    pub(crate) fn hint_lookup(&self, req: &RequestInfo) {
        let mut scratch = String::new();
        for limit in self.limits.iter().filter(|limit| limit.same_key_as.is_none()) {
            self.store.prefetch_lookup(limit.key.read(req, &mut scratch));
        }
    }

    /// See [`crate::Hints::counters`].
    pub(crate) fn hint_counters(&self, req: &RequestInfo) {
        let mut scratch = String::new();
        for limit in self.limits.iter().filter(|limit| limit.same_key_as.is_none()) {
            self.store.prefetch(limit.key.read(req, &mut scratch));
        }
    }

    /// See [`crate::Hints::request`]: the ledger of request `id`.
    pub(crate) fn hint_request(&self, id: RequestId) {
        if let Some(slot) = self.requests.slots.get(id.slot()) {
            hint::prefetch(slot);
        }
    }

    /// See [`crate::Hints::request_counters`]: reads the ledger and asks for the
    /// counter rows it pinned and what it added.
    pub(crate) fn hint_request_counters(&self, id: RequestId) {
        let Some(slot) = self.requests.slots.get(id.slot()) else {
            return;
        };
        for &row in &slot.ledger.keys.rows {
            self.store.prefetch_row(row);
        }
        hint::prefetch(slot.ledger.effects.added.as_slice());
    }

    /// Runs the limits in order on an arriving request.
    pub fn handle_request(&mut self, now: Nanos, req: &RequestInfo) -> RequestDecision {
        let now = self.observe(now);
        self.evict(now);
        let slot = self.requests.claim();
        let LimitBook { limits, store, requests, journal, scratch, .. } = self;
        let ledger = &mut requests.slots[slot].ledger;
        ledger.admitted_at = now;
        for (index, limit) in limits.iter().enumerate() {
            ledger.keys.push(limit, req, store, now, scratch);
            if let Err(rejection) = check(limit, index, store, now, req, ledger) {
                let settled = settle_rejected(limits, store, now, journal, ledger, rejection);
                requests.free(slot);
                return RequestDecision::Reject(settled);
            }
        }
        let variables = std::mem::take(&mut ledger.effects.variables);
        record_deltas(journal, store, now, ledger);
        let id = requests.admit(slot);
        RequestDecision::Forward(Admitted { id, variables })
    }

    /// Applies deferred increments and token usage once the response is known.
    pub fn handle_response(&mut self, now: Nanos, id: RequestId, info: &ResponseInfo) -> Result<Completed, CoreError> {
        let now = self.observe(now);
        let slot = self.requests.find(id).ok_or(CoreError::UnknownRequest(id))?;
        let LimitBook { limits, store, requests, journal, .. } = self;
        let ledger = &mut requests.slots[slot].ledger;
        finish(limits, store, now, ledger, info);
        record_deltas(journal, store, now, ledger);
        let completed = Completed {
            headers: std::mem::take(&mut ledger.effects.headers),
            variables: std::mem::take(&mut ledger.effects.variables),
            tokens_charged: info.total_tokens,
        };
        ledger.keys.release(store);
        requests.free(slot);
        Ok(completed)
    }

    /// The next instant at which the core has work (evicting idle counters).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.store.next_deadline()
    }

    /// Lets the core do timed work: evicts counters that have become idle.
    pub fn handle_timeout(&mut self, now: Nanos) {
        let now = self.observe(now);
        self.evict(now);
    }

    /// How many counters are held (every family's, for each key held); bounded by
    /// the keys active in the last period.
    pub fn counter_count(&self) -> usize {
        self.store.counter_count()
    }

    pub fn in_flight_count(&self) -> usize {
        self.requests.live
    }

    fn evict(&mut self, now: Nanos) {
        self.store.evict(now);
    }

    /// Time never goes backwards inside the core: a late `now` is read as the latest
    /// one seen, so drivers on several threads cannot make a window shrink.
    fn observe(&mut self, now: Nanos) -> Nanos {
        self.last_now = self.last_now.max(now);
        self.last_now
    }
}

/// A request a limit rejected: the rejecting policy counts nothing; the ones
/// before it settle now. Out of line, so the admitted request's path stays small.
#[cold]
#[inline(never)]
fn settle_rejected(
    limits: &[CompiledLimit],
    store: &mut Store,
    now: Nanos,
    journal: &mut Option<VecDeque<CounterDelta>>,
    ledger: &mut Ledger,
    mut rejection: Rejection,
) -> Rejection {
    ledger.keys.pop(store);
    let info = ResponseInfo { status: Some(rejection.status), ..ResponseInfo::default() };
    finish(limits, store, now, ledger, &info);
    record_deltas(journal, store, now, ledger);
    rejection.variables.splice(0..0, ledger.effects.variables.drain(..));
    ledger.keys.release(store);
    rejection
}

/// Turns the request's new notes into journal entries: each note is exactly
/// one counter change (a token charge settles what was reserved).
#[inline]
fn record_deltas(journal: &mut Option<VecDeque<CounterDelta>>, store: &Store, now: Nanos, ledger: &mut Ledger) {
    if let Some(journal) = journal.as_mut() {
        journal_deltas(journal, store, now, ledger);
    }
}

#[inline(never)]
fn journal_deltas(journal: &mut VecDeque<CounterDelta>, store: &Store, now: Nanos, ledger: &mut Ledger) {
    let Ledger { keys, effects, admitted_at, journaled } = ledger;
    for &(class, limit, amount, n) in &effects.added[*journaled..] {
        let key = store.key(keys.row(limit));
        let change = match amount {
            Amount::Calls | Amount::Reserved => Change::Count(n),
            Amount::Bytes => Change::Bytes(n),
            Amount::Settled => continue,
            Amount::Tokens if store.is_calendar(class) => Change::Count(n),
            Amount::Tokens => {
                let reserved = effects.added(keys, class, keys.row(limit), Amount::Reserved);
                match n.checked_sub(reserved) {
                    Some(excess) => Change::Count(excess),
                    None => Change::Uncount { amount: reserved - n, stamped: *admitted_at },
                }
            }
        };
        if matches!(change, Change::Count(0) | Change::Bytes(0) | Change::Uncount { amount: 0, .. }) {
            continue;
        }
        journal.push_back(CounterDelta { class, key: key.to_owned(), at: now, change });
    }
    *journaled = effects.added.len();
}

fn check(
    limit: &CompiledLimit,
    index: usize,
    store: &mut Store,
    now: Nanos,
    req: &RequestInfo,
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    match &limit.limit {
        Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
            check_rate(now, index, r, limit.primary.expect("rate counters"), store, ledger)
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            check_quota(now, index, q, limit.primary.expect("quota counters"), store, ledger)
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            check_tokens(now, index, t, (limit.primary, limit.token_quota), store, ledger, token_estimate(t, req))
        }
    }
}

fn check_rate(
    now: Nanos,
    index: usize,
    r: &RateLimit,
    class: ClassId,
    store: &mut Store,
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    let row = ledger.keys.row(index);
    let own = ledger.effects.added(&ledger.keys, class, row, Amount::Calls);
    let count_now = own == 0 && r.increment_condition.is_none();
    let (check, remaining) = match store.counter(row, class) {
        Counter::Sliding(period, log) => {
            log.expire(now, period);
            let check = match (log.total() - own) + r.increment_count <= r.calls {
                true => Check::Admit,
                false => {
                    Check::Reject { retry_in: log.wait_until_at_most(now, period, r.calls - r.increment_count + own) }
                }
            };
            if check == Check::Admit && count_now {
                log.add(now, r.increment_count);
            }
            (check, r.calls.saturating_sub(log.total()))
        }
        Counter::Bucket(shape, bucket) => {
            bucket.refill(shape, now);
            let check = bucket.check(shape, r.increment_count, own);
            if check == Check::Admit && count_now {
                bucket.take(shape, r.increment_count);
            }
            // The division behind `available` is only paid for when a header needs it.
            let wanted = r.remaining_calls_header_name.is_some() || r.remaining_calls_variable_name.is_some();
            (check, if wanted { bucket.available(shape).max(0) as u64 } else { 0 })
        }
        _ => unreachable!("rate limits compile to sliding or bucket counters"),
    };
    if let Check::Reject { retry_in } = check {
        return Err(rate_rejection(r, index, retry_in));
    }
    let effects = &mut ledger.effects;
    if count_now {
        effects.note(class, index, Amount::Calls, r.increment_count);
    }
    if r.increment_condition.is_none() {
        push_header(&mut effects.headers, &r.remaining_calls_header_name, remaining);
        push_header(&mut effects.headers, &r.total_calls_header_name, r.calls);
        set_var(&mut effects.variables, &r.remaining_calls_variable_name, remaining as i64);
    }
    Ok(())
}

// Cold: building a rejection (strings, headers) is kept out of the admitted
// request's path, so that path's code stays small in the instruction cache.
#[cold]
#[inline(never)]
fn rate_rejection(r: &RateLimit, index: usize, retry_in: Nanos) -> Rejection {
    let mut rejection =
        reject(Reason::RateLimit, index, Some(retry_in.retry_after_secs()), r.retry_after_header_name.as_deref());
    set_var(&mut rejection.variables, &r.retry_after_variable_name, rejection.retry_after_secs.unwrap_or(0) as i64);
    push_header(&mut rejection.headers, &r.remaining_calls_header_name, 0);
    push_header(&mut rejection.headers, &r.total_calls_header_name, r.calls);
    rejection
}

fn check_quota(
    now: Nanos,
    index: usize,
    q: &Quota,
    class: ClassId,
    store: &mut Store,
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    let row = ledger.keys.row(index);
    let own = ledger.effects.added(&ledger.keys, class, row, Amount::Calls);
    let (grid, window) = store.window(row, class, now);
    // Only a rejection needs the wait, and its division: it is worked out then.
    let retry_after = || grid.window_end(now).map(|end| end.saturating_sub(now).retry_after_secs());
    if q.calls.is_some_and(|calls| (window.calls - own) + q.increment_count > calls) {
        return Err(reject(Reason::Quota, index, retry_after(), None));
    }
    if q.bandwidth.is_some_and(|b| window.bytes >= b.0) {
        return Err(reject(Reason::BandwidthQuota, index, retry_after(), None));
    }
    if own == 0 && q.increment_condition.is_none() {
        window.calls = window.calls.saturating_add(q.increment_count);
        ledger.effects.note(class, index, Amount::Calls, q.increment_count);
    }
    Ok(())
}

type TokenClasses = (Option<ClassId>, Option<ClassId>);

/// What a token limit counts a request as before its usage is known: the prompt
/// estimate (`estimate_prompt_tokens`), that plus the completion allowance for each
/// choice asked for (reserve mode), or nothing (APIM's default: only tokens already
/// used count).
fn token_estimate(t: &TokenLimit, req: &RequestInfo) -> Option<u64> {
    let prompt = req.prompt_tokens_estimate.unwrap_or(0);
    if t.reserve {
        let allowance = req.max_tokens.unwrap_or(t.reserve_default_max_tokens);
        let choices = req.choices.unwrap_or(1).max(1);
        return Some(prompt.saturating_add(allowance.saturating_mul(choices)));
    }
    t.estimate_prompt_tokens.then_some(prompt)
}

fn check_tokens(
    now: Nanos,
    index: usize,
    t: &TokenLimit,
    classes: TokenClasses,
    store: &mut Store,
    ledger: &mut Ledger,
    estimate: Option<u64>,
) -> Result<(), Rejection> {
    let Ledger { keys, effects, .. } = ledger;
    let row = keys.row(index);
    if let (Some(class), Some(tpm)) = (classes.0, t.tokens_per_minute) {
        // A counter shared with an earlier limit already holds this request's reservation.
        let own = effects.added(keys, class, row, Amount::Reserved);
        if let Check::Reject { retry_in } = store.counter(row, class).check_tpm(now, tpm, estimate, own) {
            return Err(token_rejection(Reason::TokenLimit, index, retry_in.retry_after_secs(), t));
        }
    }
    if let (Some(class), Some(quota)) = (classes.1, t.token_quota) {
        let count = store.calendar(row, class, now);
        let over = match estimate {
            None => count.tokens >= quota,
            Some(estimate) => count.tokens.saturating_add(estimate) > quota,
        };
        if over {
            let secs = count.period_end.saturating_sub(now).retry_after_secs();
            return Err(token_rejection(Reason::TokenQuota, index, secs, t));
        }
    }
    if let (true, Some(class), Some(estimate)) = (t.reserve, classes.0, estimate) {
        if effects.added(keys, class, row, Amount::Reserved) == 0 {
            store.counter(row, class).reserve_tpm(now, estimate);
            effects.note(class, index, Amount::Reserved, estimate);
        }
    }
    Ok(())
}

/// The way out: deferred increments, bandwidth, tokens, and the response headers,
/// for every limit that ran.
fn finish(limits: &[CompiledLimit], store: &mut Store, now: Nanos, ledger: &mut Ledger, info: &ResponseInfo) {
    for (index, limit) in limits.iter().enumerate().take(ledger.keys.ran()) {
        match &limit.limit {
            Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
                finish_rate(now, index, r, limit.primary.expect("rate counters"), store, ledger, info)
            }
            Limit::Quota(q) | Limit::QuotaByKey(q) => {
                finish_quota(now, index, q, limit.primary.expect("quota counters"), store, ledger, info)
            }
            Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
                finish_tokens(now, index, t, (limit.primary, limit.token_quota), store, ledger, info)
            }
        }
    }
}

fn finish_rate(
    now: Nanos,
    index: usize,
    r: &RateLimit,
    class: ClassId,
    store: &mut Store,
    ledger: &mut Ledger,
    info: &ResponseInfo,
) {
    let Some(condition) = &r.increment_condition else { return };
    let row = ledger.keys.row(index);
    let counts = info.status.is_some_and(|s| condition.matches(s))
        && ledger.effects.added(&ledger.keys, class, row, Amount::Calls) == 0;
    let remaining = match store.counter(row, class) {
        Counter::Sliding(period, log) => {
            log.expire(now, period);
            if counts {
                log.add(now, r.increment_count);
            }
            r.calls.saturating_sub(log.total())
        }
        Counter::Bucket(shape, bucket) => {
            bucket.refill(shape, now);
            if counts {
                bucket.take(shape, r.increment_count);
            }
            bucket.available(shape).max(0) as u64
        }
        _ => unreachable!("rate limits compile to sliding or bucket counters"),
    };
    let effects = &mut ledger.effects;
    if counts {
        effects.note(class, index, Amount::Calls, r.increment_count);
    }
    push_header(&mut effects.headers, &r.remaining_calls_header_name, remaining);
    push_header(&mut effects.headers, &r.total_calls_header_name, r.calls);
    set_var(&mut effects.variables, &r.remaining_calls_variable_name, remaining as i64);
}

fn finish_quota(
    now: Nanos,
    index: usize,
    q: &Quota,
    class: ClassId,
    store: &mut Store,
    ledger: &mut Ledger,
    info: &ResponseInfo,
) {
    let matches = match &q.increment_condition {
        None => true,
        Some(condition) => info.status.is_some_and(|s| condition.matches(s)),
    };
    if !matches {
        return;
    }
    let row = ledger.keys.row(index);
    let count_calls =
        q.increment_condition.is_some() && ledger.effects.added(&ledger.keys, class, row, Amount::Calls) == 0;
    let bytes = info.request_bytes.saturating_add(info.response_bytes);
    let count_bytes =
        q.bandwidth.is_some() && bytes > 0 && ledger.effects.added(&ledger.keys, class, row, Amount::Bytes) == 0;
    if !count_calls && !count_bytes {
        return;
    }
    let (_, window) = store.window(row, class, now);
    if count_calls {
        window.calls = window.calls.saturating_add(q.increment_count);
        ledger.effects.note(class, index, Amount::Calls, q.increment_count);
    }
    if count_bytes {
        window.bytes = window.bytes.saturating_add(bytes);
        ledger.effects.note(class, index, Amount::Bytes, bytes);
    }
}

fn finish_tokens(
    now: Nanos,
    index: usize,
    t: &TokenLimit,
    classes: TokenClasses,
    store: &mut Store,
    ledger: &mut Ledger,
    info: &ResponseInfo,
) {
    let tokens = info.total_tokens;
    let row = ledger.keys.row(index);
    if let (Some(class), Some(tpm)) = (classes.0, t.tokens_per_minute) {
        // A counter shared by several limits of the request is settled once.
        let settled = ledger.effects.added(&ledger.keys, class, row, Amount::Settled) > 0;
        let (reserved, charge) = match settled {
            true => (0, 0),
            false => (ledger.effects.added(&ledger.keys, class, row, Amount::Reserved), tokens),
        };
        let remaining = store.counter(row, class).settle_tpm(now, tpm, (ledger.admitted_at, reserved), charge);
        let effects = &mut ledger.effects;
        if !settled {
            effects.note(class, index, Amount::Settled, 1);
            effects.note(class, index, Amount::Tokens, tokens);
        }
        push_header(&mut effects.headers, &t.remaining_tokens_header_name, remaining);
        set_var(&mut effects.variables, &t.remaining_tokens_variable_name, remaining as i64);
    }
    if let (Some(class), Some(quota)) = (classes.1, t.token_quota) {
        let charge = if ledger.effects.added(&ledger.keys, class, row, Amount::Tokens) == 0 { tokens } else { 0 };
        let count = store.calendar(row, class, now);
        count.tokens = count.tokens.saturating_add(charge);
        let remaining = quota.saturating_sub(count.tokens);
        let effects = &mut ledger.effects;
        effects.note(class, index, Amount::Tokens, charge);
        push_header(&mut effects.headers, &t.remaining_quota_tokens_header_name, remaining);
        set_var(&mut effects.variables, &t.remaining_quota_tokens_variable_name, remaining as i64);
    }
    let effects = &mut ledger.effects;
    push_header(&mut effects.headers, &t.tokens_consumed_header_name, tokens);
    set_var(&mut effects.variables, &t.tokens_consumed_variable_name, tokens as i64);
}

fn compile(limit: &Limit, class_of: &mut impl FnMut(&'static str, Shape) -> ClassId) -> CompiledLimit {
    let namespace = limit.element();
    let (key, primary, token_quota) = match limit {
        Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
            let period = Nanos::from_secs(r.renewal_period);
            let shape = match r.algorithm {
                Algorithm::SlidingWindow => Shape::Sliding(period),
                Algorithm::TokenBucket => Shape::Bucket(BucketShape { capacity: r.calls, period }),
            };
            (limit.counter_key(), Some(class_of(namespace, shape)), None)
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            let grid = WindowGrid {
                origin_ns: q.first_period_start.as_nanos_i128(),
                period: Nanos::from_secs(q.renewal_period),
            };
            (limit.counter_key(), Some(class_of(namespace, Shape::Fixed(grid))), None)
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            let tpm = t.tokens_per_minute.map(|tpm| match t.algorithm {
                Algorithm::SlidingWindow => class_of(namespace, Shape::Sliding(MINUTE)),
                Algorithm::TokenBucket => {
                    class_of(namespace, Shape::Bucket(BucketShape { capacity: tpm, period: MINUTE }))
                }
            });
            let quota = t.token_quota_period.map(|p| class_of(namespace, Shape::Calendar(p)));
            (limit.counter_key(), tpm, quota)
        }
    };
    CompiledLimit { limit: limit.clone(), key, same_key_as: None, primary, token_quota }
}

/// The openings of the messages of APIM's limit refusals (as `reject` writes
/// them), by status and reason.
const REFUSAL_MESSAGES: [(u16, &str, Reason); 5] = [
    (429, "Rate limit is exceeded.", Reason::RateLimit),
    (429, "Token limit is exceeded.", Reason::TokenLimit),
    (403, "Out of call volume quota.", Reason::Quota),
    (403, "Out of bandwidth quota.", Reason::BandwidthQuota),
    (403, "Token quota is exceeded.", Reason::TokenQuota),
];

/// The limit that refused a call, read from an answer a gateway (APIM, or this
/// core behind the proxy) gave: its status and the `message` of its JSON body.
/// `None` when the answer is not a limit's refusal.
pub fn refusal_reason(status: u16, body: &[u8]) -> Option<Reason> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = value.get("message")?.as_str()?;
    REFUSAL_MESSAGES.iter().find(|(s, opening, _)| *s == status && message.starts_with(opening)).map(|m| m.2)
}

#[cold]
#[inline(never)]
fn reject(reason: Reason, limit_index: usize, retry_after_secs: Option<u64>, header_name: Option<&str>) -> Rejection {
    debug_assert!(reason.is_limit(), "{reason:?} is not a limit's");
    let status = match reason {
        Reason::RateLimit | Reason::TokenLimit => 429,
        _ => 403,
    };
    let message = match (reason, retry_after_secs) {
        (Reason::RateLimit, Some(n)) => format!("Rate limit is exceeded. Try again in {n} seconds."),
        (Reason::TokenLimit, Some(n)) => format!("Token limit is exceeded. Try again in {n} seconds."),
        (Reason::Quota, Some(n)) => {
            format!("Out of call volume quota. Quota will be replenished in {}.", format_hh_mm_ss(n))
        }
        (Reason::BandwidthQuota, Some(n)) => {
            format!("Out of bandwidth quota. Quota will be replenished in {}.", format_hh_mm_ss(n))
        }
        (Reason::TokenQuota, Some(n)) => format!("Token quota is exceeded. Try again in {}.", format_hh_mm_ss(n)),
        (Reason::Quota, None) => "Out of call volume quota. Quota will not be replenished.".to_owned(),
        (Reason::BandwidthQuota, None) => "Out of bandwidth quota. Quota will not be replenished.".to_owned(),
        _ => unreachable!("{reason:?}: only limits reject, and only quotas that never renew have no retry-after"),
    };
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    if let Some(n) = retry_after_secs {
        headers.push((header_name.unwrap_or("Retry-After").to_owned(), n.to_string()));
    }
    let body = format!("{{\"statusCode\": {status}, \"message\": \"{message}\"}}");
    Rejection { status, reason, limit_index, retry_after_secs, headers, body, variables: Vec::new() }
}

#[cold]
#[inline(never)]
fn token_rejection(reason: Reason, index: usize, secs: u64, t: &TokenLimit) -> Rejection {
    let mut rejection = reject(reason, index, Some(secs), t.retry_after_header_name.as_deref());
    set_var(&mut rejection.variables, &t.retry_after_variable_name, secs as i64);
    let remaining_header = match reason {
        Reason::TokenQuota => &t.remaining_quota_tokens_header_name,
        _ => &t.remaining_tokens_header_name,
    };
    push_header(&mut rejection.headers, remaining_header, 0);
    rejection
}

// Always inlined: the common case, no header configured, is one test at the
// call site instead of a call.
#[inline(always)]
fn push_header(headers: &mut Vec<(String, String)>, name: &Option<String>, value: u64) {
    if let Some(name) = name {
        headers.push((name.clone(), value.to_string()));
    }
}

#[inline(always)]
fn set_var(variables: &mut Vec<(String, i64)>, name: &Option<String>, value: i64) {
    if let Some(name) = name {
        variables.push((name.clone(), value));
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::{refusal_reason, reject};
    use crate::Reason;

    #[test]
    fn every_limit_refusal_reads_back_as_its_reason() {
        for reason in Reason::ALL.into_iter().filter(|r| r.is_limit()) {
            for secs in [Some(7), None].into_iter().filter(|s| {
                s.is_some() || !matches!(reason, Reason::RateLimit | Reason::TokenLimit | Reason::TokenQuota)
            }) {
                let r = reject(reason, 0, secs, None);
                assert_eq!(refusal_reason(r.status, r.body.as_bytes()), Some(reason), "{}", r.body);
            }
        }
        assert_eq!(refusal_reason(429, br#"{"error": {"code": "429", "message": "Requests to the ..."}}"#), None);
        assert_eq!(refusal_reason(403, br#"{"statusCode": 403, "message": "Rate limit is exceeded."}"#), None);
        assert_eq!(refusal_reason(429, b"not json"), None);
    }
}
