//! The limit pipeline: `handle_request` on the way in, `handle_response` on the way out.

use crate::counters::CounterMap;
use crate::key::{KeyExpr, RequestInfo};
use crate::limiter::{Bucket, BucketShape, Check, FixedWindow, SlidingLog, WindowGrid};
use crate::policy::{Algorithm, Limit, Policy, Quota, RateLimit, TokenLimit};
use crate::time::{format_hh_mm_ss, CalendarPeriod, Nanos};
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

/// What the pipeline decided for a request on its way in.
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

/// Why a limit rejected a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    RateLimit,
    CallQuota,
    BandwidthQuota,
    TokensPerMinute,
    TokenQuota,
}

impl RejectReason {
    pub fn status(self) -> u16 {
        match self {
            RejectReason::RateLimit | RejectReason::TokensPerMinute => 429,
            RejectReason::CallQuota | RejectReason::BandwidthQuota | RejectReason::TokenQuota => 403,
        }
    }
}

/// The response APIM sends for a rejection, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: RejectReason,
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

/// What the pipeline adds to the client's response on the way out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    pub headers: Vec<(String, String)>,
    pub variables: Vec<(String, i64)>,
    /// Tokens charged to each distinct token counter (the same figure for each).
    pub tokens_charged: u64,
}

/// A change one gateway made to one of its counters, for replicas that share
/// counters through a store with synchronisation lag: each applies the others'
/// changes with [`Gateway::handle_delta`] when they arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterDelta {
    /// The counter family; replicas built from one policy number them alike.
    pub class: usize,
    pub key: String,
    /// When the change was made.
    pub at: Nanos,
    pub change: Change,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Calls or tokens counted at `at` (a sliding log's entry, a bucket's take, a
    /// window's or calendar period's count).
    Count(u64),
    /// Bytes counted in the fixed window of `at`.
    Bytes(u64),
    /// Part of a reservation stamped at `stamped` given back.
    Uncount { amount: u64, stamped: Nanos },
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

/// The counter families; limits with the same namespace and shape share counters.
enum Counters {
    Sliding { id: ClassId, period: Nanos, map: CounterMap<SlidingLog> },
    Bucket { id: ClassId, shape: BucketShape, map: CounterMap<Bucket> },
    Fixed { id: ClassId, grid: WindowGrid, map: CounterMap<FixedWindow> },
    Calendar { id: ClassId, period: CalendarPeriod, map: CounterMap<CalendarCount> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Sliding(Nanos),
    Bucket(BucketShape),
    Fixed(WindowGrid),
    Calendar(CalendarPeriod),
}

#[derive(Clone, Debug, Default)]
struct CalendarCount {
    period_end: Nanos,
    tokens: u64,
}

impl crate::counters::Renew for CalendarCount {
    fn renew(&mut self, fresh: CalendarCount) {
        *self = fresh;
    }
}

type ClassId = usize;

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
    /// The rate, quota or tokens-per-minute counters.
    primary: Option<ClassId>,
    /// The token-quota counters of a token limit.
    token_quota: Option<ClassId>,
}

/// The keys the limits of one request computed, in one buffer.
#[derive(Default)]
struct KeyBook {
    text: String,
    /// `ends[i]` is where limit i's key ends in `text`; only limits that ran have one.
    ends: Vec<usize>,
}

impl KeyBook {
    fn push(&mut self, expr: &KeyExpr, req: &RequestInfo) {
        expr.write(req, &mut self.text);
        self.ends.push(self.text.len());
    }

    fn pop(&mut self) {
        self.ends.pop();
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }

    fn get(&self, limit: usize) -> &str {
        let start = if limit == 0 { 0 } else { self.ends[limit - 1] };
        &self.text[start..self.ends[limit]]
    }

    fn ran(&self) -> usize {
        self.ends.len()
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
    fn added(&self, keys: &KeyBook, class: ClassId, key: &str, amount: Amount) -> u64 {
        self.added.iter().filter(|&&(c, l, a, _)| c == class && a == amount && keys.get(l) == key).map(|e| e.3).sum()
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
        self.keys.text.clear();
        self.keys.ends.clear();
        self.effects.added.clear();
        self.effects.headers.clear();
        self.effects.variables.clear();
        self.journaled = 0;
    }
}

struct Slot {
    generation: u32,
    ledger: Option<Ledger>,
}

/// The sans-IO limit pipeline of one gateway.
pub struct Gateway {
    limits: Vec<CompiledLimit>,
    classes: Vec<Counters>,
    /// In-flight requests; a `RequestId` is a slot index and its generation.
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    spare_ledgers: Vec<Ledger>,
    in_flight: usize,
    last_now: Nanos,
    /// Counter changes not yet polled, when journaling is on.
    journal: Option<VecDeque<CounterDelta>>,
}

const MINUTE: Nanos = Nanos::from_secs(60);

impl Gateway {
    /// Builds the pipeline. `hash_seed` seeds the counter maps' hasher: fixed in a
    /// simulation, random in a server (the core never draws it itself).
    pub fn new(policy: &Policy, hash_seed: u64) -> Gateway {
        let mut shapes: Vec<(&'static str, Shape)> = Vec::new();
        let mut class_of = |namespace: &'static str, shape: Shape| -> ClassId {
            if let Some(i) = shapes.iter().position(|&(n, s)| n == namespace && s == shape) {
                return i;
            }
            shapes.push((namespace, shape));
            shapes.len() - 1
        };
        let limits = policy.limits.iter().map(|limit| compile(limit, &mut class_of)).collect();
        let classes = shapes.iter().enumerate().map(|(id, &(_, shape))| Counters::new(id, shape, hash_seed)).collect();
        Gateway {
            limits,
            classes,
            slots: Vec::new(),
            free_slots: Vec::new(),
            spare_ledgers: Vec::new(),
            in_flight: 0,
            last_now: Nanos::ZERO,
            journal: None,
        }
    }

    /// Keeps a journal of every counter change, drained with [`Gateway::poll_delta`].
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
        let Some(counters) = self.classes.get_mut(delta.class) else {
            debug_assert!(false, "replicas share one policy");
            return;
        };
        counters.apply(now, delta);
    }

    /// Runs the limits in order on an arriving request.
    pub fn handle_request(&mut self, now: Nanos, req: &RequestInfo) -> RequestDecision {
        let now = self.observe(now);
        self.evict(now);
        let mut ledger = self.spare_ledgers.pop().unwrap_or_default();
        ledger.clear();
        ledger.admitted_at = now;
        for (index, limit) in self.limits.iter().enumerate() {
            ledger.keys.push(&limit.key, req);
            if let Err(mut rejection) = check(limit, index, &mut self.classes, now, req, &mut ledger) {
                // The rejecting policy counts nothing; the ones before it settle now.
                ledger.keys.pop();
                let info = ResponseInfo { status: Some(rejection.status), ..ResponseInfo::default() };
                finish(&self.limits, &mut self.classes, now, &mut ledger, &info);
                self.record_deltas(now, &mut ledger);
                rejection.variables.splice(0..0, ledger.effects.variables.drain(..));
                self.spare_ledgers.push(ledger);
                return RequestDecision::Reject(rejection);
            }
        }
        let variables = std::mem::take(&mut ledger.effects.variables);
        self.record_deltas(now, &mut ledger);
        let id = self.admit(ledger);
        RequestDecision::Forward(Admitted { id, variables })
    }

    /// Applies deferred increments and token usage once the response is known.
    pub fn handle_response(&mut self, now: Nanos, id: RequestId, info: &ResponseInfo) -> Result<Completed, CoreError> {
        let now = self.observe(now);
        let mut ledger = self.release(id).ok_or(CoreError::UnknownRequest(id))?;
        finish(&self.limits, &mut self.classes, now, &mut ledger, info);
        self.record_deltas(now, &mut ledger);
        let completed = Completed {
            headers: std::mem::take(&mut ledger.effects.headers),
            variables: std::mem::take(&mut ledger.effects.variables),
            tokens_charged: info.total_tokens,
        };
        self.spare_ledgers.push(ledger);
        Ok(completed)
    }

    /// The next instant at which the core has work (evicting idle counters).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.classes.iter().filter_map(Counters::next_deadline).min()
    }

    /// Lets the core do timed work: evicts counters that have become idle.
    pub fn handle_timeout(&mut self, now: Nanos) {
        let now = self.observe(now);
        self.evict(now);
    }

    /// How many counters are held; bounded by the keys active in the last period.
    pub fn counter_count(&self) -> usize {
        self.classes.iter().map(Counters::len).sum()
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight
    }

    fn evict(&mut self, now: Nanos) {
        self.classes.iter_mut().for_each(|c| c.evict(now));
    }

    /// Turns the request's new notes into journal entries: each note is exactly
    /// one counter change (a token charge settles what was reserved).
    fn record_deltas(&mut self, now: Nanos, ledger: &mut Ledger) {
        let Some(journal) = self.journal.as_mut() else { return };
        let Ledger { keys, effects, admitted_at, journaled } = ledger;
        for &(class, limit, amount, n) in &effects.added[*journaled..] {
            let key = keys.get(limit);
            let change = match amount {
                Amount::Calls | Amount::Reserved => Change::Count(n),
                Amount::Bytes => Change::Bytes(n),
                Amount::Settled => continue,
                Amount::Tokens if matches!(self.classes[class], Counters::Calendar { .. }) => Change::Count(n),
                Amount::Tokens => {
                    let reserved = effects.added(keys, class, key, Amount::Reserved);
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

    /// Time never goes backwards inside the core: a late `now` is read as the latest
    /// one seen, so drivers on several threads cannot make a window shrink.
    fn observe(&mut self, now: Nanos) -> Nanos {
        self.last_now = self.last_now.max(now);
        self.last_now
    }

    fn admit(&mut self, ledger: Ledger) -> RequestId {
        self.in_flight += 1;
        let index = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, ledger: None });
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 requests in flight")
            }
        };
        let slot = &mut self.slots[index as usize];
        debug_assert!(slot.ledger.is_none(), "a free slot holds no request");
        slot.ledger = Some(ledger);
        RequestId(u64::from(slot.generation) << 32 | u64::from(index))
    }

    fn release(&mut self, id: RequestId) -> Option<Ledger> {
        let index = id.slot();
        let slot = self.slots.get_mut(index)?;
        if slot.generation != id.generation() {
            return None;
        }
        let ledger = slot.ledger.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free_slots.push(index as u32);
        self.in_flight -= 1;
        Some(ledger)
    }
}

fn check(
    limit: &CompiledLimit,
    index: usize,
    classes: &mut [Counters],
    now: Nanos,
    req: &RequestInfo,
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    match &limit.limit {
        Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
            check_rate(now, index, r, &mut classes[limit.primary.expect("rate counters")], ledger)
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            check_quota(now, index, q, limit.primary.expect("quota counters"), classes, ledger)
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            check_tokens(now, index, t, (limit.primary, limit.token_quota), classes, ledger, token_estimate(t, req))
        }
    }
}

fn check_rate(
    now: Nanos,
    index: usize,
    r: &RateLimit,
    counters: &mut Counters,
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    let class = counters.class_id();
    let key = ledger.keys.get(index);
    let own = ledger.effects.added(&ledger.keys, class, key, Amount::Calls);
    let count_now = own == 0 && r.increment_condition.is_none();
    let (check, remaining) = match counters {
        Counters::Sliding { period, map, .. } => {
            let log = map.entry(now, key, SlidingLog::default);
            log.expire(now, *period);
            let check = match (log.total() - own) + r.increment_count <= r.calls {
                true => Check::Admit,
                false => {
                    Check::Reject { retry_in: log.wait_until_at_most(now, *period, r.calls - r.increment_count + own) }
                }
            };
            if check == Check::Admit && count_now {
                log.add(now, r.increment_count);
            }
            (check, r.calls.saturating_sub(log.total()))
        }
        Counters::Bucket { shape, map, .. } => {
            let bucket = map.entry(now, key, || Bucket::full(*shape, now));
            bucket.refill(*shape, now);
            let check = bucket.check(*shape, r.increment_count, own);
            if check == Check::Admit && count_now {
                bucket.take(*shape, r.increment_count);
            }
            // The division behind `available` is only paid for when a header needs it.
            let wanted = r.remaining_calls_header_name.is_some() || r.remaining_calls_variable_name.is_some();
            (check, if wanted { bucket.available(*shape).max(0) as u64 } else { 0 })
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

fn rate_rejection(r: &RateLimit, index: usize, retry_in: Nanos) -> Rejection {
    let mut rejection =
        reject(RejectReason::RateLimit, index, Some(retry_in.retry_after_secs()), r.retry_after_header_name.as_deref());
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
    classes: &mut [Counters],
    ledger: &mut Ledger,
) -> Result<(), Rejection> {
    let key = ledger.keys.get(index);
    let own = ledger.effects.added(&ledger.keys, class, key, Amount::Calls);
    let Counters::Fixed { grid, map, .. } = &mut classes[class] else {
        unreachable!("quotas compile to fixed windows")
    };
    let window = window_entry(map, *grid, now, key);
    let retry_after = grid.window_end(now).map(|end| end.saturating_sub(now).retry_after_secs());
    if q.calls.is_some_and(|calls| (window.calls - own) + q.increment_count > calls) {
        return Err(reject(RejectReason::CallQuota, index, retry_after, None));
    }
    if q.bandwidth.is_some_and(|b| window.bytes >= b.0) {
        return Err(reject(RejectReason::BandwidthQuota, index, retry_after, None));
    }
    if own == 0 && q.increment_condition.is_none() {
        window.calls += q.increment_count;
        ledger.effects.note(class, index, Amount::Calls, q.increment_count);
    }
    Ok(())
}

type TokenClasses = (Option<ClassId>, Option<ClassId>);

/// What a token limit counts a request as before its usage is known: the prompt
/// estimate (`estimate_prompt_tokens`), that plus the completion allowance (reserve
/// mode), or nothing (APIM's default: only tokens already used count).
fn token_estimate(t: &TokenLimit, req: &RequestInfo) -> Option<u64> {
    let prompt = req.prompt_tokens_estimate.unwrap_or(0);
    if t.reserve {
        return Some(prompt.saturating_add(req.max_tokens.unwrap_or(t.reserve_default_max_tokens)));
    }
    t.estimate_prompt_tokens.then_some(prompt)
}

fn check_tokens(
    now: Nanos,
    index: usize,
    t: &TokenLimit,
    classes: TokenClasses,
    counters: &mut [Counters],
    ledger: &mut Ledger,
    estimate: Option<u64>,
) -> Result<(), Rejection> {
    let Ledger { keys, effects, .. } = ledger;
    let key = keys.get(index);
    if let (Some(class), Some(tpm)) = (classes.0, t.tokens_per_minute) {
        // A counter shared with an earlier limit already holds this request's reservation.
        let own = effects.added(keys, class, key, Amount::Reserved);
        if let Check::Reject { retry_in } = counters[class].check_tpm(now, key, tpm, estimate, own) {
            return Err(token_rejection(RejectReason::TokensPerMinute, index, retry_in.retry_after_secs(), t));
        }
    }
    if let (Some(class), Some(quota)) = (classes.1, t.token_quota) {
        let Counters::Calendar { period, map, .. } = &mut counters[class] else {
            unreachable!("token quotas are calendar counters")
        };
        let count = calendar_entry(map, *period, now, key);
        let over = match estimate {
            None => count.tokens >= quota,
            Some(estimate) => count.tokens.saturating_add(estimate) > quota,
        };
        if over {
            let secs = count.period_end.saturating_sub(now).retry_after_secs();
            return Err(token_rejection(RejectReason::TokenQuota, index, secs, t));
        }
    }
    if let (true, Some(class), Some(estimate)) = (t.reserve, classes.0, estimate) {
        if effects.added(keys, class, key, Amount::Reserved) == 0 {
            counters[class].reserve_tpm(now, key, estimate);
            effects.note(class, index, Amount::Reserved, estimate);
        }
    }
    Ok(())
}

/// The way out: deferred increments, bandwidth, tokens, and the response headers,
/// for every limit that ran.
fn finish(limits: &[CompiledLimit], classes: &mut [Counters], now: Nanos, ledger: &mut Ledger, info: &ResponseInfo) {
    for (index, limit) in limits.iter().enumerate().take(ledger.keys.ran()) {
        match &limit.limit {
            Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
                finish_rate(now, index, r, &mut classes[limit.primary.expect("rate counters")], ledger, info)
            }
            Limit::Quota(q) | Limit::QuotaByKey(q) => {
                finish_quota(now, index, q, limit.primary.expect("quota counters"), classes, ledger, info)
            }
            Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
                finish_tokens(now, index, t, (limit.primary, limit.token_quota), classes, ledger, info)
            }
        }
    }
}

fn finish_rate(
    now: Nanos,
    index: usize,
    r: &RateLimit,
    counters: &mut Counters,
    ledger: &mut Ledger,
    info: &ResponseInfo,
) {
    let Some(condition) = &r.increment_condition else { return };
    let class = counters.class_id();
    let key = ledger.keys.get(index);
    let counts = info.status.is_some_and(|s| condition.matches(s))
        && ledger.effects.added(&ledger.keys, class, key, Amount::Calls) == 0;
    let remaining = match counters {
        Counters::Sliding { period, map, .. } => {
            let log = map.entry(now, key, SlidingLog::default);
            log.expire(now, *period);
            if counts {
                log.add(now, r.increment_count);
            }
            r.calls.saturating_sub(log.total())
        }
        Counters::Bucket { shape, map, .. } => {
            let bucket = map.entry(now, key, || Bucket::full(*shape, now));
            bucket.refill(*shape, now);
            if counts {
                bucket.take(*shape, r.increment_count);
            }
            bucket.available(*shape).max(0) as u64
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
    classes: &mut [Counters],
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
    let key = ledger.keys.get(index);
    let count_calls =
        q.increment_condition.is_some() && ledger.effects.added(&ledger.keys, class, key, Amount::Calls) == 0;
    let bytes = info.request_bytes + info.response_bytes;
    let count_bytes =
        q.bandwidth.is_some() && bytes > 0 && ledger.effects.added(&ledger.keys, class, key, Amount::Bytes) == 0;
    if !count_calls && !count_bytes {
        return;
    }
    let Counters::Fixed { grid, map, .. } = &mut classes[class] else {
        unreachable!("quotas compile to fixed windows")
    };
    let window = window_entry(map, *grid, now, key);
    if count_calls {
        window.calls += q.increment_count;
        ledger.effects.note(class, index, Amount::Calls, q.increment_count);
    }
    if count_bytes {
        window.bytes += bytes;
        ledger.effects.note(class, index, Amount::Bytes, bytes);
    }
}

fn finish_tokens(
    now: Nanos,
    index: usize,
    t: &TokenLimit,
    classes: TokenClasses,
    counters: &mut [Counters],
    ledger: &mut Ledger,
    info: &ResponseInfo,
) {
    let tokens = info.total_tokens;
    let key = ledger.keys.get(index);
    if let (Some(class), Some(tpm)) = (classes.0, t.tokens_per_minute) {
        // A counter shared by several limits of the request is settled once.
        let settled = ledger.effects.added(&ledger.keys, class, key, Amount::Settled) > 0;
        let (reserved, charge) = match settled {
            true => (0, 0),
            false => (ledger.effects.added(&ledger.keys, class, key, Amount::Reserved), tokens),
        };
        let remaining = counters[class].settle_tpm(now, key, tpm, (ledger.admitted_at, reserved), charge);
        let effects = &mut ledger.effects;
        if !settled {
            effects.note(class, index, Amount::Settled, 1);
            effects.note(class, index, Amount::Tokens, tokens);
        }
        push_header(&mut effects.headers, &t.remaining_tokens_header_name, remaining);
        set_var(&mut effects.variables, &t.remaining_tokens_variable_name, remaining as i64);
    }
    if let (Some(class), Some(quota)) = (classes.1, t.token_quota) {
        let charge = if ledger.effects.added(&ledger.keys, class, key, Amount::Tokens) == 0 { tokens } else { 0 };
        let Counters::Calendar { period, map, .. } = &mut counters[class] else {
            unreachable!("token quotas are calendar counters")
        };
        let count = calendar_entry(map, *period, now, key);
        count.tokens += charge;
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
            (r.counter_key.clone().unwrap_or(KeyExpr::SubscriptionId), Some(class_of(namespace, shape)), None)
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            let grid = WindowGrid {
                origin_ns: q.first_period_start.as_nanos_i128(),
                period: Nanos::from_secs(q.renewal_period),
            };
            (
                q.counter_key.clone().unwrap_or(KeyExpr::SubscriptionId),
                Some(class_of(namespace, Shape::Fixed(grid))),
                None,
            )
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            let tpm = t.tokens_per_minute.map(|tpm| match t.algorithm {
                Algorithm::SlidingWindow => class_of(namespace, Shape::Sliding(MINUTE)),
                Algorithm::TokenBucket => {
                    class_of(namespace, Shape::Bucket(BucketShape { capacity: tpm, period: MINUTE }))
                }
            });
            let quota = t.token_quota_period.map(|p| class_of(namespace, Shape::Calendar(p)));
            (t.counter_key.clone(), tpm, quota)
        }
    };
    CompiledLimit { limit: limit.clone(), key, primary, token_quota }
}

impl Counters {
    fn new(id: ClassId, shape: Shape, seed: u64) -> Counters {
        match shape {
            Shape::Sliding(period) => Counters::Sliding { id, period, map: CounterMap::new(seed) },
            Shape::Bucket(shape) => Counters::Bucket { id, shape, map: CounterMap::new(seed) },
            Shape::Fixed(grid) => Counters::Fixed { id, grid, map: CounterMap::new(seed) },
            Shape::Calendar(period) => Counters::Calendar { id, period, map: CounterMap::new(seed) },
        }
    }

    fn class_id(&self) -> ClassId {
        match self {
            Counters::Sliding { id, .. }
            | Counters::Bucket { id, .. }
            | Counters::Fixed { id, .. }
            | Counters::Calendar { id, .. } => *id,
        }
    }

    fn len(&self) -> usize {
        match self {
            Counters::Sliding { map, .. } => map.len(),
            Counters::Bucket { map, .. } => map.len(),
            Counters::Fixed { map, .. } => map.len(),
            Counters::Calendar { map, .. } => map.len(),
        }
    }

    fn next_deadline(&self) -> Option<Nanos> {
        match self {
            Counters::Sliding { map, .. } => map.next_deadline(),
            Counters::Bucket { map, .. } => map.next_deadline(),
            Counters::Fixed { map, .. } => map.next_deadline(),
            Counters::Calendar { map, .. } => map.next_deadline(),
        }
    }

    fn evict(&mut self, now: Nanos) {
        match self {
            Counters::Sliding { period, map, .. } => map.evict(now, |log| log.idle_at(*period)),
            Counters::Bucket { shape, map, .. } => map.evict(now, |b| b.idle_at(*shape)),
            Counters::Fixed { grid, map, .. } => {
                let current = grid.index(now);
                // A window counter is idle once time has left its window (a quota
                // that never renews keeps its counter for good).
                map.evict(
                    now,
                    |w| if w.index < current { Nanos::ZERO } else { grid.window_end(now).unwrap_or(Nanos::MAX) },
                )
            }
            Counters::Calendar { map, .. } => map.evict(now, |c| c.period_end),
        }
    }

    /// Applies another replica's change (see [`Gateway::handle_delta`]).
    fn apply(&mut self, now: Nanos, delta: &CounterDelta) {
        let key = delta.key.as_str();
        match (self, delta.change) {
            (Counters::Sliding { period, map, .. }, Change::Count(n)) => {
                let log = map.entry(now, key, SlidingLog::default);
                log.insert(delta.at, n);
                log.expire(now, *period);
            }
            (Counters::Sliding { period, map, .. }, Change::Uncount { amount, stamped }) => {
                let log = map.entry(now, key, SlidingLog::default);
                log.refund(stamped, amount);
                log.expire(now, *period);
            }
            (Counters::Bucket { shape, map, .. }, Change::Count(n)) => {
                let bucket = map.entry(now, key, || Bucket::full(*shape, now));
                bucket.refill(*shape, now);
                bucket.take(*shape, n);
            }
            (Counters::Bucket { shape, map, .. }, Change::Uncount { amount, .. }) => {
                let bucket = map.entry(now, key, || Bucket::full(*shape, now));
                bucket.refill(*shape, now);
                bucket.give_back(*shape, amount);
            }
            // A change made in a window that has since ended is moot.
            (Counters::Fixed { grid, .. }, _) if grid.index(delta.at) != grid.index(now) => {}
            (Counters::Fixed { grid, map, .. }, Change::Count(n)) => window_entry(map, *grid, now, key).calls += n,
            (Counters::Fixed { grid, map, .. }, Change::Bytes(n)) => window_entry(map, *grid, now, key).bytes += n,
            (Counters::Calendar { period, map, .. }, Change::Count(n)) => {
                let count = calendar_entry(map, *period, now, key);
                if period.bounds(delta.at).1 == count.period_end {
                    count.tokens += n;
                }
            }
            (_, change) => debug_assert!(false, "a {change:?} does not fit this counter family"),
        }
    }

    /// The tokens-per-minute check: without an estimate, rejected iff the window
    /// already holds `tpm` tokens; with one, iff counted plus estimate exceeds `tpm`.
    /// `credit` is what this same request already reserved on the counter.
    fn check_tpm(&mut self, now: Nanos, key: &str, tpm: u64, estimate: Option<u64>, credit: u64) -> Check {
        match self {
            Counters::Sliding { period, map, .. } => {
                let log = map.entry(now, key, SlidingLog::default);
                log.expire(now, *period);
                let counted = log.total().saturating_sub(credit);
                let (over, allowed) = match estimate {
                    None => (counted >= tpm, tpm - 1),
                    Some(estimate) => (counted.saturating_add(estimate) > tpm, tpm.saturating_sub(estimate)),
                };
                let allowed = allowed.saturating_add(credit);
                match over {
                    false => Check::Admit,
                    true => Check::Reject { retry_in: log.wait_until_at_most(now, *period, allowed) },
                }
            }
            Counters::Bucket { shape, map, .. } => {
                let bucket = map.entry(now, key, || Bucket::full(*shape, now));
                bucket.refill(*shape, now);
                match estimate {
                    None => bucket.check_positive(*shape),
                    // An estimate larger than the bucket can never pass; the honest
                    // advice is to wait until the bucket is full.
                    Some(estimate) if estimate > shape.capacity => {
                        Check::Reject { retry_in: bucket.idle_at(*shape).saturating_sub(now) }
                    }
                    Some(estimate) => bucket.check(*shape, estimate, credit),
                }
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }

    /// Sets tokens aside at admission (reserve mode), stamped at `now`.
    fn reserve_tpm(&mut self, now: Nanos, key: &str, tokens: u64) {
        match self {
            Counters::Sliding { period, map, .. } => {
                let log = map.entry(now, key, SlidingLog::default);
                log.expire(now, *period);
                log.add(now, tokens);
            }
            Counters::Bucket { shape, map, .. } => {
                let bucket = map.entry(now, key, || Bucket::full(*shape, now));
                bucket.refill(*shape, now);
                bucket.take(*shape, tokens);
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }

    /// Charges a request's tokens, settling what it reserved (`reserved` tokens at
    /// instant `reserved.0`): a reservation that was too large gives the difference
    /// back where it was stamped, one too small charges the excess now. Returns the
    /// tokens remaining in the minute.
    fn settle_tpm(&mut self, now: Nanos, key: &str, tpm: u64, reserved: (Nanos, u64), tokens: u64) -> u64 {
        let (reserved_at, reserved) = reserved;
        match self {
            Counters::Sliding { period, map, .. } => {
                let log = map.entry(now, key, SlidingLog::default);
                log.expire(now, *period);
                match tokens.checked_sub(reserved) {
                    Some(excess) => log.add(now, excess),
                    None => log.refund(reserved_at, reserved - tokens),
                }
                tpm.saturating_sub(log.total())
            }
            Counters::Bucket { shape, map, .. } => {
                let bucket = map.entry(now, key, || Bucket::full(*shape, now));
                bucket.refill(*shape, now);
                match tokens.checked_sub(reserved) {
                    Some(excess) => bucket.take(*shape, excess),
                    None => bucket.give_back(*shape, reserved - tokens),
                }
                bucket.available(*shape).max(0) as u64
            }
            _ => unreachable!("tokens per minute are sliding or bucket counters"),
        }
    }
}

/// The counter of `key`'s current fixed window.
fn window_entry<'m>(
    map: &'m mut CounterMap<FixedWindow>,
    grid: WindowGrid,
    now: Nanos,
    key: &str,
) -> &'m mut FixedWindow {
    let window = map.entry(now, key, FixedWindow::default);
    window.roll(grid.index(now));
    window
}

fn calendar_entry<'m>(
    map: &'m mut CounterMap<CalendarCount>,
    period: CalendarPeriod,
    now: Nanos,
    key: &str,
) -> &'m mut CalendarCount {
    let count = map.entry(now, key, CalendarCount::default);
    if count.period_end <= now {
        *count = CalendarCount { period_end: period.bounds(now).1, tokens: 0 };
    }
    count
}

fn reject(
    reason: RejectReason,
    limit_index: usize,
    retry_after_secs: Option<u64>,
    header_name: Option<&str>,
) -> Rejection {
    let status = reason.status();
    let message = match (reason, retry_after_secs) {
        (RejectReason::RateLimit, Some(n)) => format!("Rate limit is exceeded. Try again in {n} seconds."),
        (RejectReason::TokensPerMinute, Some(n)) => format!("Token limit is exceeded. Try again in {n} seconds."),
        (RejectReason::CallQuota, Some(n)) => {
            format!("Out of call volume quota. Quota will be replenished in {}.", format_hh_mm_ss(n))
        }
        (RejectReason::BandwidthQuota, Some(n)) => {
            format!("Out of bandwidth quota. Quota will be replenished in {}.", format_hh_mm_ss(n))
        }
        (RejectReason::TokenQuota, Some(n)) => format!("Token quota is exceeded. Try again in {}.", format_hh_mm_ss(n)),
        (RejectReason::CallQuota, None) => "Out of call volume quota. Quota will not be replenished.".to_owned(),
        (RejectReason::BandwidthQuota, None) => "Out of bandwidth quota. Quota will not be replenished.".to_owned(),
        (_, None) => unreachable!("only quotas that never renew have no retry-after"),
    };
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    if let Some(n) = retry_after_secs {
        headers.push((header_name.unwrap_or("Retry-After").to_owned(), n.to_string()));
    }
    let body = format!("{{\"statusCode\": {status}, \"message\": \"{message}\"}}");
    Rejection { status, reason, limit_index, retry_after_secs, headers, body, variables: Vec::new() }
}

fn token_rejection(reason: RejectReason, index: usize, secs: u64, t: &TokenLimit) -> Rejection {
    let mut rejection = reject(reason, index, Some(secs), t.retry_after_header_name.as_deref());
    set_var(&mut rejection.variables, &t.retry_after_variable_name, secs as i64);
    let remaining_header = match reason {
        RejectReason::TokenQuota => &t.remaining_quota_tokens_header_name,
        _ => &t.remaining_tokens_header_name,
    };
    push_header(&mut rejection.headers, remaining_header, 0);
    rejection
}

fn push_header(headers: &mut Vec<(String, String)>, name: &Option<String>, value: u64) {
    if let Some(name) = name {
        headers.push((name.clone(), value.to_string()));
    }
}

fn set_var(variables: &mut Vec<(String, i64)>, name: &Option<String>, value: i64) {
    if let Some(name) = name {
        variables.push((name.clone(), value));
    }
}
