//! A scenario's traffic: when its clients call, who each caller is, what each
//! call asks for, and when the client's SDK retries. The engine draws it in
//! simulated time; `limitlab load` draws the same calls from the same streams
//! and sends them in wall-clock time, so both play one traffic.

use crate::scenario::{Arrival, Client, Identity, Scenario};
use crate::trace::{self, TraceLine};
use gateway_core::{Nanos, RequestInfo, Subscription};
use mock_aoai::round_to_u64;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;

/// One client call (an SDK retry is a new call with `attempt + 1`).
#[derive(Clone, Debug, Default)]
pub struct Call {
    pub client: usize,
    /// The caller's number for a generated call (`None` for a trace line).
    pub caller: Option<usize>,
    /// Trace line, or a sequence number.
    pub request: u64,
    pub attempt: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub info: RequestInfo,
}

/// The run's span: arrival curves (ramps, daily curves) are clocked by it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub start: Nanos,
    pub end: Nanos,
}

/// The ChaCha stream of client `client`'s calls and gaps.
pub fn call_stream(seed: u64, client: usize) -> ChaCha8Rng {
    stream(seed, 1000 + client as u64)
}

/// The ChaCha stream of client `client`'s SDK retry jitter.
pub fn retry_stream(seed: u64, client: usize) -> ChaCha8Rng {
    stream(seed, 1_000_000 + client as u64)
}

fn stream(seed: u64, number: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(number);
    rng
}

/// The gap from `now` to a generated client's next arrival.
pub fn next_gap(c: &Client, rng: &mut ChaCha8Rng, clock: Clock, now: Nanos) -> Nanos {
    let exp = |rng: &mut ChaCha8Rng, rate: f64| -(1.0 - rng.random::<f64>()).ln() / rate;
    let since_start = now.saturating_sub(clock.start);
    let secs = match &c.arrival {
        Arrival::Constant { rate_per_s } => 1.0 / rate_per_s,
        Arrival::Poisson { rate_per_s } => exp(rng, *rate_per_s),
        Arrival::Bursts { rate_per_s, on, off } => {
            let cycle = on.0 .0 + off.0 .0;
            let gap = exp(rng, *rate_per_s);
            let next = since_start.0 + (gap * 1e9) as u64;
            // A gap that lands in the silent part moves to the next burst.
            match cycle == 0 || next % cycle < on.0 .0 {
                true => gap,
                false => ((next / cycle + 1) * cycle - since_start.0) as f64 / 1e9,
            }
        }
        Arrival::Ramp { from_per_s, to_per_s } => {
            let duration = (clock.end - clock.start).as_secs_f64().max(1e-9);
            let rate = |t: f64| from_per_s + (to_per_s - from_per_s) * (t / duration).clamp(0.0, 1.0);
            thinned(rng, since_start.as_secs_f64(), duration, from_per_s.max(*to_per_s), rate)
        }
        Arrival::Daily { peak_per_s, trough_per_s, peak_hour } => {
            // The hour of day in UTC of the scenario's own clock.
            let day_start = now.0 / 86_400_000_000_000 * 86_400_000_000_000;
            let rate = |t: f64| {
                let hours = ((day_start as f64 / 1e9 + t) / 3600.0) % 24.0;
                let phase = std::f64::consts::TAU * (hours - peak_hour) / 24.0;
                trough_per_s + (peak_per_s - trough_per_s) * (1.0 + phase.cos()) / 2.0
            };
            let since_day_start = |t: Nanos| t.0.saturating_sub(day_start) as f64 / 1e9;
            thinned(rng, since_day_start(now), since_day_start(clock.end), *peak_per_s, rate)
        }
        Arrival::Trace { .. } => unreachable!("traces are scheduled up front"),
    };
    Nanos(round_to_u64(secs * 1e9).max(1))
}

/// Fills `call` with a generated client's next call (its `request` number is
/// given on arrival), reusing its buffers.
pub fn draw_call(call: &mut Call, client: usize, c: &Client, rng: &mut ChaCha8Rng, address_base: u32) {
    let caller = rng.random_range(0..c.callers);
    let prompt_tokens = round_to_u64(c.prompt_tokens.sample(rng));
    let completion_tokens = round_to_u64(c.completion_tokens.sample(rng)).max(1);
    let stream = rng.random::<f64>() < c.stream_share;
    call.client = client;
    call.caller = Some(caller);
    call.request = 0;
    call.attempt = 0;
    call.prompt_tokens = prompt_tokens;
    call.completion_tokens = completion_tokens;
    call.max_tokens = c.max_tokens;
    call.stream = stream;
    set_identity(&mut call.info, address_base, caller, c, prompt_tokens);
}

/// The call of a trace line.
pub fn trace_call(client: usize, c: &Client, line: &TraceLine) -> Call {
    let max_tokens = line.max_tokens.or(c.max_tokens);
    let prompt_tokens = line.prompt_tokens.unwrap_or(c.prompt_tokens.mean().round() as u64);
    let mut info = RequestInfo {
        ip: line.ip.clone().unwrap_or_default(),
        subscription: line.subscription.as_ref().map(|s| Subscription {
            id: s.clone(),
            key: s.clone(),
            name: s.clone(),
        }),
        product: line.product.clone(),
        headers: line.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        prompt_tokens_estimate: Some(prompt_tokens),
        max_tokens,
        choices: line.n.or(c.n),
    };
    if info.ip.is_empty() {
        info.ip = "0.0.0.0".into();
    }
    Call {
        client,
        caller: None,
        request: line.line,
        attempt: 0,
        prompt_tokens,
        completion_tokens: line.completion_tokens.unwrap_or(c.completion_tokens.mean().round() as u64),
        max_tokens,
        stream: line.stream.unwrap_or(false),
        info,
    }
}

/// What the client got back, as its SDK's retry rule reads it.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
    pub now: Nanos,
}

/// When the client's SDK retries a call that got `answer`, like the `openai`
/// SDKs: 408, 409, 429 and 5xx, up to the client's `max_retries`, after the
/// answer's `Retry-After` when it is at most a minute, else after an exponential
/// backoff with jitter from `rng`. `None`: no retry.
pub fn sdk_retry_wait(c: &Client, attempt: u32, answer: Answer<'_>, rng: &mut ChaCha8Rng) -> Option<Nanos> {
    let status = answer.status;
    let retryable = status == 408 || status == 409 || status == 429 || status >= 500;
    if !retryable || attempt >= c.retries.max_retries {
        return None;
    }
    let advice =
        gateway_core::routing::parse_retry_after(answer.headers, answer.now).filter(|w| *w <= Nanos::from_secs(60));
    Some(advice.unwrap_or_else(|| {
        let base = (0.5 * 2f64.powi(attempt as i32)).min(8.0);
        let jitter = 1.0 - 0.25 * rng.random::<f64>();
        Nanos((base * jitter * 1e9) as u64)
    }))
}

/// A scenario's first calls (SDK retries come from answers) in the order the
/// engine has them arrive, numbered as it numbers them: `limitlab load` plays
/// these. Each generated client draws from its own stream exactly as the engine
/// does (a gap, then a call and the gap after it, ...), so the calls are the
/// simulation's whatever the other clients do.
pub struct Plan<'s> {
    scenario: &'s Scenario,
    clock: Clock,
    rngs: Vec<ChaCha8Rng>,
    address_bases: Vec<u32>,
    /// (arrival, push order, client or trace call).
    due: BinaryHeap<Reverse<(Nanos, u64, usize)>>,
    traces: Vec<Option<Call>>,
    pushed: u64,
    sequence: u64,
}

impl<'s> Plan<'s> {
    pub fn new(scenario: &'s Scenario, base: &Path, seed: u64) -> Result<Plan<'s>, String> {
        let start = scenario.start_nanos();
        let clock = Clock { start, end: start + scenario.duration.0 };
        let mut plan = Plan {
            scenario,
            clock,
            rngs: (0..scenario.clients.len()).map(|i| call_stream(seed, i)).collect(),
            address_bases: scenario.caller_address_bases()?,
            due: BinaryHeap::new(),
            traces: Vec::new(),
            pushed: 0,
            sequence: 0,
        };
        for (i, c) in scenario.clients.iter().enumerate() {
            match &c.arrival {
                Arrival::Trace { path } => {
                    for line in trace::load(&base.join(path))? {
                        let at = start + Nanos::from_millis(line.t_ms);
                        plan.traces.push(Some(trace_call(i, c, &line)));
                        plan.push(at, usize::MAX - (plan.traces.len() - 1));
                    }
                }
                _ => {
                    let gap = next_gap(c, &mut plan.rngs[i], clock, start);
                    plan.push(start + gap, i);
                }
            }
        }
        Ok(plan)
    }

    fn push(&mut self, at: Nanos, what: usize) {
        self.pushed += 1;
        self.due.push(Reverse((at, self.pushed, what)));
    }

    /// The next first call and its arrival instant, until the scenario's end.
    pub fn next_call(&mut self) -> Option<(Nanos, Call)> {
        let Reverse((at, _, what)) = self.due.pop()?;
        if at >= self.clock.end {
            return None;
        }
        if what >= self.scenario.clients.len() {
            let call = self.traces[usize::MAX - what].take().expect("each trace line is played once");
            return Some((at, call));
        }
        let c = &self.scenario.clients[what];
        let mut call = Call::default();
        draw_call(&mut call, what, c, &mut self.rngs[what], self.address_bases[what]);
        call.request = self.sequence;
        self.sequence += 1;
        let gap = next_gap(c, &mut self.rngs[what], self.clock, at);
        self.push(at + gap, what);
        Some((at, call))
    }
}

/// Address `address` of 10.0.0.0/8 (below 2^24; see
/// `Scenario::caller_address_bases`), written without the formatting machinery:
/// it is built for every generated call. The bytes are put together on the stack
/// and appended at once.
pub fn write_caller_ip(ip: &mut String, address: u32) {
    debug_assert!(address < 1 << 24, "the address plan is 10.0.0.0/8");
    let (mut text, mut len) = ([0u8; 15], 0);
    let mut put = |byte: u8| {
        text[len] = byte;
        len += 1;
    };
    put(b'1');
    put(b'0');
    for octet in [address >> 16, address >> 8 & 255, address & 255] {
        let octet = octet as u8;
        put(b'.');
        if octet >= 100 {
            put(b'0' + octet / 100);
        }
        if octet >= 10 {
            put(b'0' + octet / 10 % 10);
        }
        put(b'0' + octet % 10);
    }
    // Every byte is an ASCII digit or a dot. Checked all the same: on 15 bytes the
    // check costs about 0.2 ns, and appending char by char instead costs 6 ns.
    ip.push_str(std::str::from_utf8(&text[..len]).expect("ASCII digits and dots"));
}

/// Makes `info` a generated call's identity, reusing its IP buffer: what
/// `RequestInfo { ip, prompt_tokens_estimate, max_tokens, ..default }` with the
/// client's identity would be.
pub fn set_identity(info: &mut RequestInfo, address_base: u32, caller: usize, c: &Client, prompt: u64) {
    // Every field by name: a field added to `RequestInfo` fails to compile here
    // rather than keep a previous call's value.
    let RequestInfo { ip, subscription, product, headers, prompt_tokens_estimate, max_tokens, choices } = info;
    ip.clear();
    match &c.ip {
        Some(fixed) => ip.push_str(fixed),
        None => write_caller_ip(ip, address_base + caller as u32),
    }
    *subscription = None;
    *product = None;
    headers.clear();
    *prompt_tokens_estimate = Some(prompt);
    *max_tokens = c.max_tokens;
    *choices = c.n;
    let who = || format!("{}-{caller}", c.name);
    match &c.identity {
        Identity::Ip => {}
        Identity::Subscription { product: name } => {
            let who = who();
            *subscription = Some(Subscription { id: who.clone(), key: format!("key-{who}"), name: who });
            *product = Some(name.clone());
        }
        Identity::Header { name } => headers.push((name.clone(), who())),
        Identity::Jwt => headers.push(("Authorization".into(), trace::jwt_for(&who()))),
    }
}

/// The gap to the next arrival of a Poisson process whose rate changes with time
/// (`rate(t)` at most `max`), by thinning: candidates at rate `max`, each kept with
/// probability `rate(t) / max`. A candidate at or after `end`, where nothing is
/// simulated, is taken as it is: a rate that falls to zero there (a ramp down to
/// 0/s) would otherwise reject candidates for ever.
fn thinned(rng: &mut ChaCha8Rng, t0: f64, end: f64, max: f64, rate: impl Fn(f64) -> f64) -> f64 {
    let mut t = t0;
    loop {
        t += -(1.0 - rng.random::<f64>()).ln() / max;
        if t >= end || rng.random::<f64>() * max < rate(t) {
            return t - t0;
        }
    }
}
