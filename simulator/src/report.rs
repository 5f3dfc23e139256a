//! Streaming statistics of a run and the report written from them. Memory does not
//! grow with the run's length except for the per-minute series (and the decision
//! log, only when asked for).

use crate::scenario::{Client, Identity, Scenario};
use crate::traffic::Call;
use gateway_core::routing::AttemptOutcome;
use gateway_core::{Nanos, OutcomeRecord, Reason};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

/// The report's schema version; bump it when a field changes meaning.
/// 2: latency figures are over served calls only (calls that reached a backend),
/// and refusals have their own (`refused`, `refused_ratio`, `retry_after_s_*`).
/// Added to version 2 without changing a meaning: `mode` and `complete`.
pub const SCHEMA_VERSION: u32 = 2;

pub use gateway_core::Decision;

/// Calls counted by reason: an array while a run counts (every call adds one),
/// a map by name in the report.
#[derive(Clone, Copy, Debug, Default)]
struct Tally([u64; Reason::ALL.len()]);

impl Tally {
    fn add(&mut self, reason: Reason) {
        self.0[reason as usize] += 1;
    }

    /// The reasons that counted at least one call, by name.
    fn to_map(self) -> BTreeMap<&'static str, u64> {
        Reason::ALL.iter().map(|&r| (r.as_str(), self.0[r as usize])).filter(|&(_, n)| n > 0).collect()
    }
}

struct ClientStats {
    name: String,
    requests: u64,
    by_reason: Tally,
    /// (status, calls), in order of first appearance: a request finds its status
    /// among a handful in a short scan (the report sorts them).
    by_status: Vec<(u16, u64)>,
    sdk_retries: u64,
    gateway_retries: u64,
    failovers: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Calls that reached a backend, and their latency: a refusal's instant
    /// answer is not a latency anyone waited for.
    served: u64,
    latency_us: Histogram<u64>,
    /// Calls the gateway answered itself before any backend (a limit, or no
    /// backend available), and the `Retry-After` they carried.
    refused: u64,
    retry_after_s: Histogram<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BackendStats {
    pub name: String,
    pub attempts: u64,
    pub ok: u64,
    pub throttled: u64,
    pub errors_5xx: u64,
    pub timeouts: u64,
    pub transport_failures: u64,
}

/// One minute of the run (minute 0 starts at the scenario's start).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MinuteStats {
    pub minute: u64,
    /// Finished calls by the decision log's reasons.
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Tokens charged per client, in scenario order.
    pub client_tokens: Vec<u64>,
    /// Per backend, in scenario order: tokens delivered, 429s, 5xx.
    pub backend_tokens: Vec<u64>,
    pub backend_throttled: Vec<u64>,
    pub backend_5xx: Vec<u64>,
    /// Requests that tried more than one backend.
    pub failovers: u64,
    /// Per client: the most tokens one caller key was charged in this minute
    /// (when the policy has a per-key token limit to compare it with).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub busiest_key_tokens: Vec<u64>,
}

/// Tokens per caller key in the current minute, per client, for
/// `busiest_key_tokens`. Keys are hashed (no string is kept per call); only the
/// maximum is read, so no map order reaches an output.
struct KeyMinutes {
    minute: usize,
    per_client: Vec<KeyTable>,
}

/// One client's caller keys in the current minute: a generated client's keys
/// by caller number, in a dense table stamped with its minute (nothing to clear,
/// no hashing); a trace's by hashed key.
#[derive(Default)]
struct KeyTable {
    /// (minute + 1, tokens) per caller slot; a stale minute reads as 0.
    dense: Vec<(u32, u64)>,
    sparse: std::collections::HashMap<u64, u64, KeyHashState>,
}

/// The key a call's tokens count against (its subscription, else its IP): for a
/// generated call its caller's slot, one slot for all when the client's callers
/// share an address.
fn caller_key<'c>(client: &Client, call: &'c Call) -> CallerKey<'c> {
    match (call.caller, &client.identity, &client.ip) {
        (Some(caller), Identity::Subscription { .. }, _) | (Some(caller), _, None) => CallerKey::Slot(caller),
        (Some(_), _, Some(_)) => CallerKey::Slot(0),
        (None, _, _) => CallerKey::Text(call.info.subscription.as_ref().map_or(&call.info.ip, |s| &s.id)),
    }
}

/// Which caller key a finished call is charged to.
pub enum CallerKey<'a> {
    /// A generated client's caller number (its key's slot).
    Slot(usize),
    /// A trace line's key.
    Text(&'a str),
}

/// The map's keys are already hashes (foldhash's, with a fixed seed): they are
/// used as they are, so a charge hashes its key once.
type KeyHashState = std::hash::BuildHasherDefault<AlreadyHashed>;

#[derive(Default)]
struct AlreadyHashed(u64);

impl std::hash::Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys, which are hashes already")
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

pub struct Recorder {
    clients: Vec<ClientStats>,
    backends: Vec<BackendStats>,
    /// Each minute's figures, and its calls by reason (put in the figures' map
    /// when the report is made).
    minutes: Vec<(MinuteStats, Tally)>,
    /// (arrival order, decision), when a decision log is asked for.
    decisions: Option<Vec<(u64, Decision)>>,
    /// Tokens per caller key (subscription, else IP) over a sliding minute, and the
    /// largest minute seen; kept only when a promise asks for it.
    key_tokens: Option<(BTreeMap<String, gateway_core::limiter::SlidingLog>, u64)>,
    key_minutes: Option<KeyMinutes>,
    /// The scenario backend each routing backend name stands for, found by the
    /// name's allocation: the router hands out clones of one `Arc` per backend,
    /// so a pointer comparison replaces a string comparison for every call.
    backend_of_name: Vec<(Arc<str>, Option<usize>)>,
}

impl Recorder {
    pub fn new(scenario: &Scenario, keep_decisions: bool) -> Recorder {
        let clients = scenario
            .clients
            .iter()
            .map(|c| ClientStats {
                name: c.name.clone(),
                requests: 0,
                by_reason: Tally::default(),
                by_status: Vec::new(),
                sdk_retries: 0,
                gateway_retries: 0,
                failovers: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                served: 0,
                latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
                refused: 0,
                retry_after_s: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds"),
            })
            .collect();
        let backends =
            scenario.backends.iter().map(|b| BackendStats { name: b.name.clone(), ..Default::default() }).collect();
        let wants_keys = scenario.expect.iter().any(|e| e.figure.as_deref() == Some("max_key_tokens_per_minute"));
        Recorder {
            clients,
            backends,
            minutes: Vec::new(),
            decisions: keep_decisions.then(Vec::new),
            key_tokens: wants_keys.then(|| (BTreeMap::new(), 0)),
            key_minutes: per_key_token_limit(scenario).then(|| KeyMinutes {
                minute: 0,
                per_client: scenario.clients.iter().map(|_| Default::default()).collect(),
            }),
            backend_of_name: Vec::new(),
        }
    }

    fn minute(&mut self, since_start: Nanos) -> &mut (MinuteStats, Tally) {
        let m = (since_start.0 / 60_000_000_000) as usize;
        while self.minutes.len() <= m {
            let minute = self.minutes.len() as u64;
            let (c, b) = (self.clients.len(), self.backends.len());
            let stats = MinuteStats {
                minute,
                by_reason: BTreeMap::new(),
                client_tokens: vec![0; c],
                backend_tokens: vec![0; b],
                backend_throttled: vec![0; b],
                backend_5xx: vec![0; b],
                failovers: 0,
                busiest_key_tokens: if self.key_minutes.is_some() { vec![0; c] } else { Vec::new() },
            };
            self.minutes.push((stats, Tally::default()));
        }
        &mut self.minutes[m]
    }

    /// Whether `key_minute_tokens` wants the caller keys of finished calls.
    pub fn tracks_key_minutes(&self) -> bool {
        self.key_minutes.is_some()
    }

    /// Charges `tokens` to a client's caller key in the minute of `since_start`.
    pub fn key_minute_tokens(&mut self, client: usize, key: CallerKey<'_>, since_start: Nanos, tokens: u64) {
        use std::hash::BuildHasher;
        let minute = (since_start.0 / 60_000_000_000) as usize;
        let Some(k) = &mut self.key_minutes else { return };
        if k.minute != minute {
            k.per_client.iter_mut().for_each(|t| t.sparse.clear());
            k.minute = minute;
        }
        let table = &mut k.per_client[client];
        let total = match key {
            CallerKey::Slot(slot) => {
                if table.dense.len() <= slot {
                    table.dense.resize(slot + 1, (0, 0));
                }
                let stamp = minute as u32 + 1;
                let entry = &mut table.dense[slot];
                let before = if entry.0 == stamp { entry.1 } else { 0 };
                *entry = (stamp, before.saturating_add(tokens));
                entry.1
            }
            CallerKey::Text(text) => {
                let hash = foldhash::fast::FixedState::with_seed(0).hash_one(text);
                let total = table.sparse.entry(hash).or_default();
                *total = total.saturating_add(tokens);
                *total
            }
        };
        let (m, _) = self.minute(since_start);
        m.busiest_key_tokens[client] = m.busiest_key_tokens[client].max(total);
    }

    /// Charges a finished call's `tokens` to its caller key, for the figures
    /// that want them (`max_key_tokens_per_minute`, the busiest key per minute).
    pub fn caller_tokens(&mut self, client: &Client, call: &Call, now: Nanos, since_start: Nanos, tokens: u64) {
        if self.tracks_keys() {
            let key = call.info.subscription.as_ref().map_or(&call.info.ip, |s| &s.id);
            self.key_tokens(key, now, tokens);
        }
        if self.tracks_key_minutes() {
            self.key_minute_tokens(call.client, caller_key(client, call), since_start, tokens);
        }
    }

    pub fn tracks_keys(&self) -> bool {
        self.key_tokens.is_some()
    }

    /// Charges a caller key's tokens at `now` (completion time) to its sliding minute.
    pub fn key_tokens(&mut self, key: &str, now: Nanos, tokens: u64) {
        let Some((logs, max)) = &mut self.key_tokens else { return };
        if !logs.contains_key(key) {
            logs.insert(key.to_owned(), Default::default());
        }
        let log = logs.get_mut(key).expect("inserted");
        log.expire(now, Nanos::from_secs(60));
        log.add(now, tokens);
        *max = (*max).max(log.total());
    }

    pub fn wants_decisions(&self) -> bool {
        self.decisions.is_some()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        client: usize,
        since_start: Nanos,
        order: u64,
        record: &OutcomeRecord,
        reason: Reason,
        latency: Nanos,
        retry_after_secs: Option<u64>,
        decision: Option<Decision>,
    ) {
        // Names are compared by address first: the router hands out clones of
        // one `Arc` per backend, and `Arc<str>`'s `==` always reads the text.
        let failover = match record.attempts.split_first() {
            Some((first, rest)) => {
                rest.iter().any(|a| !Arc::ptr_eq(&a.backend, &first.backend) && a.backend != first.backend)
            }
            None => false,
        };
        let c = &mut self.clients[client];
        c.requests += 1;
        c.by_reason.add(reason);
        match c.by_status.iter_mut().find(|(status, _)| *status == record.status) {
            Some((_, calls)) => *calls += 1,
            None => c.by_status.push((record.status, 1)),
        }
        c.gateway_retries += record.attempts.len().saturating_sub(1) as u64;
        c.failovers += u64::from(failover);
        c.prompt_tokens = c.prompt_tokens.saturating_add(record.usage.prompt_tokens);
        c.completion_tokens = c.completion_tokens.saturating_add(record.usage.completion_tokens);
        if record.attempts.is_empty() {
            c.refused += 1;
            if let Some(secs) = retry_after_secs {
                c.retry_after_s.saturating_record(secs.max(1));
            }
        } else {
            c.served += 1;
            c.latency_us.saturating_record((latency.0 / 1000).max(1));
        }
        let tokens = record.usage.total();
        let delivered_by = match record.reason {
            Reason::Ok | Reason::BackendError | Reason::ClientGone => record.attempts.last().map(|a| &a.backend),
            _ => None,
        };
        let backend = delivered_by.and_then(|name| self.backend_index(name));
        let (m, reasons) = self.minute(since_start);
        reasons.add(reason);
        m.client_tokens[client] = m.client_tokens[client].saturating_add(tokens);
        m.failovers += u64::from(failover);
        if let Some(b) = backend {
            m.backend_tokens[b] = m.backend_tokens[b].saturating_add(tokens);
        }
        // Matched apart, not as a pair: a pair would copy the decision even when
        // there is none, for every call.
        if let Some(decision) = decision {
            if let Some(log) = &mut self.decisions {
                log.push((order, decision));
            }
        }
    }

    /// The scenario backend named `name`, if any.
    fn backend_index(&mut self, name: &Arc<str>) -> Option<usize> {
        if let Some(&(_, index)) = self.backend_of_name.iter().find(|(known, _)| Arc::ptr_eq(known, name)) {
            return index;
        }
        let index = self.backends.iter().position(|b| *b.name == **name);
        // Bounded: a run's backends are named once, when its routing is built.
        if self.backend_of_name.len() < 64 {
            self.backend_of_name.push((Arc::clone(name), index));
        }
        index
    }

    pub fn sdk_retry(&mut self, client: usize) {
        self.clients[client].sdk_retries += 1;
    }

    pub fn backend_attempt(&mut self, backend: usize, since_start: Nanos, outcome: &AttemptOutcome) {
        self.tally_attempt(backend, since_start, outcome, 1);
    }

    /// Undoes `backend_attempt`: the attempt was recorded with the answer its
    /// backend would give, and the gateway timed it out first.
    pub fn retract_attempt(&mut self, backend: usize, since_start: Nanos, outcome: &AttemptOutcome) {
        self.tally_attempt(backend, since_start, outcome, -1);
    }

    fn tally_attempt(&mut self, backend: usize, since_start: Nanos, outcome: &AttemptOutcome, by: i64) {
        let b = &mut self.backends[backend];
        let count = |n: &mut u64| *n = n.wrapping_add_signed(by);
        count(&mut b.attempts);
        match outcome {
            AttemptOutcome::Response { status, .. } if *status < 400 => count(&mut b.ok),
            AttemptOutcome::Response { status: 429, .. } => count(&mut b.throttled),
            AttemptOutcome::Response { status, .. } if *status >= 500 => count(&mut b.errors_5xx),
            AttemptOutcome::Response { .. } => {}
            AttemptOutcome::Timeout => count(&mut b.timeouts),
            AttemptOutcome::TransportFailure | AttemptOutcome::BadResponse => count(&mut b.transport_failures),
        }
        let throttled = matches!(outcome, AttemptOutcome::Response { status: 429, .. });
        let error = matches!(outcome, AttemptOutcome::Response { status, .. } if *status >= 500);
        let (m, _) = self.minute(since_start);
        m.backend_throttled[backend] = m.backend_throttled[backend].wrapping_add_signed(by * i64::from(throttled));
        m.backend_5xx[backend] = m.backend_5xx[backend].wrapping_add_signed(by * i64::from(error));
    }

    /// The decision log in arrival order.
    pub fn decisions(&self) -> Vec<Decision> {
        let mut log = self.decisions.clone().unwrap_or_default();
        log.sort_by_key(|e| e.0);
        log.into_iter().map(|e| e.1).collect()
    }

    pub fn report(&self, scenario: &Scenario, seed: u64) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            mode: Mode::Simulation,
            complete: true,
            scenario: scenario.name.clone(),
            seed,
            start: scenario.start.clone(),
            duration_s: scenario.duration.0.as_secs_f64(),
            clients: self.clients.iter().map(ClientReport::from).collect(),
            backends: self.backends.clone(),
            minutes: self
                .minutes
                .iter()
                .map(|(m, reasons)| MinuteStats { by_reason: reasons.to_map(), ..m.clone() })
                .collect(),
            max_key_tokens_per_minute: self.key_tokens.as_ref().map(|k| k.1),
        }
    }
}

/// Where a report's figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The simulator's, in simulated time.
    Simulation,
    /// What a live gateway answered `limitlab load`, in wall-clock time.
    Live,
}

/// `report.json`: every figure of the summary, and the per-minute series.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    /// `simulation`, or `live` for `limitlab load`'s report of a live gateway.
    pub mode: Mode,
    /// Whether the run played the whole scenario (a live run stopped by Ctrl-C
    /// or `--max-requests` did not).
    pub complete: bool,
    pub scenario: String,
    pub seed: u64,
    pub start: String,
    pub duration_s: f64,
    pub clients: Vec<ClientReport>,
    pub backends: Vec<BackendStats>,
    pub minutes: Vec<MinuteStats>,
    /// The most tokens any caller key was charged in a sliding minute (only when a
    /// promise asks for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_key_tokens_per_minute: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClientReport {
    pub name: String,
    /// Calls that reached the gateway, SDK retries included.
    pub requests: u64,
    /// Calls by reason ([`Reason::as_str`]: `ok`, `rate-limit`, `quota`, ...),
    /// only those that ended at least one call.
    pub by_reason: BTreeMap<&'static str, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub rejected_ratio: f64,
    pub sdk_retries: u64,
    pub gateway_retries: u64,
    pub failovers: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Calls that reached a backend (whatever it answered).
    pub served: u64,
    /// Latency of served calls only, from arrival to the response's end; `null`
    /// when no call was served.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub latency_ms_max: Option<f64>,
    /// (quantile, latency ms) pairs of served calls, for the CDF plot.
    pub latency_ms_cdf: Vec<(f64, f64)>,
    /// Calls the gateway answered itself before any backend: a limit's 429 or
    /// 403, or 503 with no backend available.
    pub refused: u64,
    pub refused_ratio: f64,
    /// The `Retry-After` refusals carried, in seconds (`null` when none did).
    pub retry_after_s_p50: Option<f64>,
    pub retry_after_s_max: Option<f64>,
}

const CDF_QUANTILES: [f64; 26] = [
    0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925,
    0.95, 0.975, 0.99, 0.995, 0.999, 1.0,
];

impl From<&ClientStats> for ClientReport {
    fn from(c: &ClientStats) -> ClientReport {
        let served = |value: f64| (c.served > 0).then_some(value);
        let q = |p: f64| c.latency_us.value_at_quantile(p) as f64 / 1000.0;
        let waits = !c.retry_after_s.is_empty();
        let ok = c.by_reason.0[Reason::Ok as usize];
        ClientReport {
            name: c.name.clone(),
            requests: c.requests,
            by_reason: c.by_reason.to_map(),
            by_status: c.by_status.iter().copied().collect(),
            rejected_ratio: if c.requests == 0 { 0.0 } else { (c.requests - ok) as f64 / c.requests as f64 },
            sdk_retries: c.sdk_retries,
            gateway_retries: c.gateway_retries,
            failovers: c.failovers,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            served: c.served,
            latency_ms_p50: served(q(0.50)),
            latency_ms_p95: served(q(0.95)),
            latency_ms_p99: served(q(0.99)),
            latency_ms_max: served(c.latency_us.max() as f64 / 1000.0),
            latency_ms_cdf: match c.served {
                0 => Vec::new(),
                _ => CDF_QUANTILES.iter().map(|&p| (p, q(p))).collect(),
            },
            refused: c.refused,
            refused_ratio: if c.requests == 0 { 0.0 } else { c.refused as f64 / c.requests as f64 },
            retry_after_s_p50: waits.then(|| c.retry_after_s.value_at_quantile(0.5) as f64),
            retry_after_s_max: waits.then(|| c.retry_after_s.max() as f64),
        }
    }
}

/// Whether the policy has a token limit per minute, whose per-key figure the
/// report then draws.
fn per_key_token_limit(scenario: &Scenario) -> bool {
    use gateway_core::Limit;
    scenario.gateway.policy().limits.iter().any(|l| match l {
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => t.0.tokens_per_minute.is_some(),
        _ => false,
    })
}

/// A latency figure as tables show it: `-` when no call was served.
pub fn millis_text(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"))
}

impl Report {
    /// The reasons the tables show: `ok`, and every other reason that ended at
    /// least one call, in [`Reason::ALL`]'s order.
    pub fn reasons_shown(&self) -> Vec<Reason> {
        let ended_some = |r: Reason| self.clients.iter().any(|c| c.by_reason.contains_key(r.as_str()));
        Reason::ALL.into_iter().filter(|&r| r == Reason::Ok || ended_some(r)).collect()
    }

    /// The summary table printed after a run. Reason columns are headed with the
    /// reasons' own names, as the decision log and `report.json` spell them.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ =
            writeln!(out, "scenario {} (seed {}), {} s from {}", self.scenario, self.seed, self.duration_s, self.start);
        let reasons = self.reasons_shown();
        let width = |r: &Reason| r.as_str().len().max(7);
        let _ = write!(out, "{:<14} {:>8}", "client", "requests");
        for r in &reasons {
            let _ = write!(out, " {:>w$}", r.as_str(), w = width(r));
        }
        let _ = writeln!(
            out,
            " {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
            "sdk-retry", "failover", "tokens", "p50 ms", "p95 ms", "p99 ms"
        );
        for c in &self.clients {
            let _ = write!(out, "{:<14} {:>8}", c.name, c.requests);
            for r in &reasons {
                let _ = write!(out, " {:>w$}", c.by_reason.get(r.as_str()).copied().unwrap_or(0), w = width(r));
            }
            let _ = writeln!(
                out,
                " {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
                c.sdk_retries,
                c.failovers,
                c.prompt_tokens.saturating_add(c.completion_tokens),
                millis_text(c.latency_ms_p50),
                millis_text(c.latency_ms_p95),
                millis_text(c.latency_ms_p99)
            );
        }
        let _ = writeln!(out, "(latency: calls that reached a backend; a refusal is answered at once and not counted)");
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>8} {:>9} {:>7} {:>8} {:>8}",
            "backend", "attempts", "ok", "429", "5xx", "timeout", "reset"
        );
        for b in &self.backends {
            let _ = writeln!(
                out,
                "{:<14} {:>8} {:>8} {:>9} {:>7} {:>8} {:>8}",
                b.name, b.attempts, b.ok, b.throttled, b.errors_5xx, b.timeouts, b.transport_failures
            );
        }
        out
    }
}
