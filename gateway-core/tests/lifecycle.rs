//! The whole life of a request through `Lifecycle`: limits, attempts, retries,
//! failover, delivery, and tokens charged exactly once.

use gateway_core::routing::{AttemptOutcome, Routing};
use gateway_core::{
    Delivery, Finished, Lifecycle, LimitBook, Nanos, Policy, Reason, RequestDecision, RequestInfo, ResponseInfo, Step,
    Usage,
};
use proptest::prelude::*;

const SEED: &str = include_str!("../../policies/seed-failover-routing.toml");

fn routing(text: &str) -> Routing {
    toml::from_str(text).unwrap_or_else(|e| panic!("test routing does not parse: {e}"))
}

fn policy(text: &str) -> Policy {
    Policy::from_toml(text).unwrap_or_else(|e| panic!("test policy does not parse: {e}"))
}

fn outcome(word: &str) -> AttemptOutcome {
    match word {
        "timeout" => AttemptOutcome::Timeout,
        "reset" => AttemptOutcome::TransportFailure,
        status => AttemptOutcome::Response { status: status.parse().unwrap(), retry_after: None },
    }
}

fn usage(total: u64) -> Usage {
    Usage { prompt_tokens: total / 2, completion_tokens: total - total / 2 }
}

/// Runs one request whose attempts end as `script` says (each attempt takes
/// `latency_ms` and reports 10 tokens, the delivered body 100; a `timeout` gets
/// no answer, and the lifecycle's own deadline ends it) and returns a trace:
/// `backend+start:result` per attempt, then `=> status reason tokens`. The
/// driver keeps no timer of its own: it sleeps until `poll_timeout`.
fn run(pipeline: &mut Lifecycle, start: Nanos, script: &[&str], latency_ms: u64) -> String {
    let req = RequestInfo { ip: "10.0.0.1".into(), ..Default::default() };
    let mut trace = Vec::new();
    let mut step = pipeline.handle_request(start, &req, 0);
    let mut script = script.iter();
    let mut now = start;
    let finished: Finished = loop {
        match step {
            Step::Forward { id, attempt } => {
                let word = script.next().unwrap_or_else(|| panic!("script ran out: {trace:?}"));
                trace.push(format!("{}+{}s:{word}", attempt.backend, (now - start).as_secs_f64()));
                if *word == "timeout" {
                    step = until_deadline(pipeline, &mut now);
                    continue;
                }
                now = now + Nanos::from_millis(latency_ms);
                step = pipeline.handle_attempt(now, id, outcome(word), usage(10), 0).unwrap();
            }
            Step::Wait { .. } => step = until_deadline(pipeline, &mut now),
            Step::Deliver { id } => {
                let delivery = Delivery { usage: usage(100), ..Default::default() };
                break pipeline.handle_delivered(now + Nanos::from_millis(10), id, delivery).unwrap();
            }
            Step::Respond(finished) => break finished,
        }
    };
    let record = &finished.record;
    format!("{} => {} {} {}", trace.join(" "), record.status, record.reason, record.tokens_charged())
}

/// Sleeps until the lifecycle's next deadline and reports it, as a driver does.
fn until_deadline(pipeline: &mut Lifecycle, now: &mut Nanos) -> Step {
    *now = pipeline.poll_timeout().expect("a request waits on a deadline");
    pipeline.handle_timeout(*now, &mut || 0);
    let step = pipeline.poll_step().expect("the deadline decided a step");
    assert_eq!(pipeline.poll_step(), None, "one request, one step");
    step
}

fn check(routing_text: &str, script: &[&str], expected: &str) {
    let mut pipeline = Lifecycle::new(&Policy::default(), routing(routing_text), 0).unwrap();
    let trace = run(&mut pipeline, Nanos::from_secs(1_000), script, 100);
    assert_eq!(trace, expected, "script {script:?}");
    assert_eq!(pipeline.limits().in_flight_count(), 0, "the request is over");
}

#[test]
fn seed_failover_policy_through_the_whole_lifecycle() {
    // Retry n waits min(8, 1 + (2^(n-1) - 1)·u) after the failed attempt; draw 0 is u = 0.8.
    check(
        SEED,
        &["429"; 6],
        "primary+0s:429 secondary+1.1s:429 secondary+3s:429 secondary+6.5s:429 secondary+13.2s:429 \
         secondary+21.3s:429 => 429 backend-error 160",
    );
    check(SEED, &["503", "200"], "primary+0s:503 secondary+1.1s:200 => 200 ok 120");
    check(SEED, &["200"], "primary+0s:200 => 200 ok 110");
    check(SEED, &["400"], "primary+0s:400 => 400 backend-error 110");
    // A timeout is seen as 504 and a reset as 500: the seed's `>= 500` fails over.
    // A timeout is the lifecycle's own: 300 s (APIM's default) after the attempt
    // went out with no answer; the timed-out attempt reported no tokens.
    check(SEED, &["timeout", "200"], "primary+0s:timeout secondary+301.000000001s:200 => 200 ok 110");
    check(SEED, &["reset", "200"], "primary+0s:reset secondary+1.1s:200 => 200 ok 120");
    check(
        SEED,
        &["reset"; 6],
        "primary+0s:reset secondary+1.1s:reset secondary+3s:reset secondary+6.5s:reset \
         secondary+13.2s:reset secondary+21.3s:reset => 500 transport-failure 60",
    );
    let with_transport =
        SEED.replace("first_fast_retry = false", "first_fast_retry = true\non_transport_failure = true");
    check(
        &with_transport,
        &["reset", "timeout", "200"],
        "primary+0s:reset secondary+0.1s:timeout secondary+301.900000001s:200 => 200 ok 120",
    );
}

#[test]
fn a_response_after_the_attempt_timeout_is_a_timeout() {
    let text = SEED.replace("set_backend = \"primary\"", "set_backend = \"primary\"\ntimeout = 2");
    let mut pipeline = Lifecycle::new(&Policy::default(), routing(&text), 0).unwrap();
    let trace = run(&mut pipeline, Nanos::from_secs(1_000), &["200"; 6], 2_001);
    // Each answer comes after the 2 s timeout: every attempt is a timeout, seen as
    // 504, so the seed's `>= 500` retries until its count runs out.
    let expected = "primary+0s:200 secondary+3.001s:200 secondary+6.802s:200 secondary+12.203s:200 \
                    secondary+20.804s:200 secondary+30.805s:200 => 504 timeout 60";
    assert_eq!(trace, expected);
}

const BREAKER: &str = r#"
set_backend = "only"

[[backends]]
id = "only"
url = "http://only"
circuit_breaker = { failure_count = 1, interval = 60, statuses = ">=500", trip_duration = 30 }
"#;

#[test]
fn an_open_breaker_answers_503_with_retry_after() {
    let mut pipeline = Lifecycle::new(&Policy::default(), routing(BREAKER), 0).unwrap();
    let t = Nanos::from_secs(1_000);
    assert_eq!(run(&mut pipeline, t, &["500"], 100), "only+0s:500 => 500 backend-error 110");
    let req = RequestInfo::default();
    let Step::Respond(finished) = pipeline.handle_request(t + Nanos::from_secs(10), &req, 0) else {
        panic!("a tripped backend must not be tried")
    };
    let generated = finished.generated.unwrap();
    assert_eq!(generated.status, 503);
    // Tripped at t + 0.1 s for 30 s: 20.1 s remain, rounded up.
    assert!(generated.headers.contains(&("Retry-After".to_owned(), "21".to_owned())), "{:?}", generated.headers);
    assert_eq!(finished.record.reason, Reason::NoBackend);
    assert_eq!(run(&mut pipeline, t + Nanos::from_secs(31), &["200"], 100), "only+0s:200 => 200 ok 110");
}

#[test]
fn limits_reject_before_any_backend_and_headers_come_back_on_delivery() {
    let policy = policy(
        r#"
        [[limits]]
        type = "rate-limit-by-key"
        calls = 1
        renewal_period = 60
        counter_key = "ip"
        remaining_calls_header_name = "x-remaining"
        "#,
    );
    let mut pipeline = Lifecycle::new(&policy, routing(SEED), 0).unwrap();
    let t = Nanos::from_secs(1_000);
    let req = RequestInfo { ip: "10.0.0.1".into(), ..Default::default() };
    let Step::Forward { id, .. } = pipeline.handle_request(t, &req, 0) else { panic!() };
    assert!(matches!(pipeline.handle_attempt(t, id, outcome("200"), Usage::default(), 0), Ok(Step::Deliver { .. })));
    let finished = pipeline.handle_delivered(t, id, Delivery::default()).unwrap();
    assert_eq!(finished.headers, [("x-remaining".to_owned(), "0".to_owned())]);
    let Step::Respond(rejected) = pipeline.handle_request(t, &req, 0) else { panic!() };
    assert_eq!(rejected.record.status, 429);
    assert!(rejected.record.attempts.is_empty());
    assert_eq!(
        rejected.generated.unwrap().body,
        r#"{"statusCode": 429, "message": "Rate limit is exceeded. Try again in 60 seconds."}"#
    );
}

#[test]
fn events_out_of_phase_or_for_unknown_requests_are_errors_not_panics() {
    let mut pipeline = Lifecycle::new(&Policy::default(), routing(SEED), 0).unwrap();
    let t = Nanos::from_secs(1);
    let Step::Forward { id, .. } = pipeline.handle_request(t, &RequestInfo::default(), 0) else { panic!() };
    assert!(pipeline.handle_delivered(t, id, Delivery::default()).is_err(), "no response to deliver yet");
    let Ok(Step::Deliver { .. }) = pipeline.handle_attempt(t, id, outcome("200"), Usage::default(), 0) else {
        panic!()
    };
    assert!(pipeline.handle_attempt(t, id, outcome("200"), Usage::default(), 0).is_err(), "already delivering");
    pipeline.handle_delivered(t, id, Delivery::default()).unwrap();
    assert!(pipeline.handle_delivered(t, id, Delivery::default()).is_err(), "finished twice");
}

const TOKENS: &str = r#"
[[limits]]
type = "azure-openai-token-limit"
counter_key = { const = "all" }
tokens_per_minute = 1000000000
remaining_tokens_header_name = "x-remaining-tokens"

[[limits]]
type = "llm-token-limit"
counter_key = { const = "all" }
tokens_per_minute = 1000000000
token_quota = 1000000000
token_quota_period = "Daily"
"#;

const FAST_RETRY: &str = r#"
set_backend = "pool"

[[backends]]
id = "a"
url = "http://a"

[[backends]]
id = "b"
url = "http://b"

[[pools]]
id = "pool"
strategy = "round-robin"
members = [{ backend = "a" }, { backend = "b" }]

[retry]
condition = "429, >=500"
on_transport_failure = true
count = 3
interval = 0.05
"#;

#[derive(Clone, Debug)]
struct Script {
    /// (result, tokens its response reported) per attempt, as many as the request needs.
    attempts: Vec<(&'static str, u64)>,
    /// Tokens the delivered body or stream carried (what was sent, if it broke).
    delivered: u64,
}

fn script() -> impl Strategy<Value = Script> {
    let result = prop::sample::select(vec!["200", "429", "500", "503", "400", "timeout", "reset"]);
    (prop::collection::vec((result, 0u64..400), 4), 0u64..2_000)
        .prop_map(|(attempts, delivered)| Script { attempts, delivered })
}

proptest! {
    /// Whatever the interleaving of requests, responses, retries and broken
    /// streams, every token reported is charged exactly once: per request, in
    /// total, and in the token counters.
    #[test]
    fn every_token_is_charged_exactly_once(
        scripts in prop::collection::vec(script(), 1..10),
        picks in prop::collection::vec(any::<u64>(), 80),
    ) {
        let mut pipeline = Lifecycle::new(&policy(TOKENS), routing(FAST_RETRY), 7).unwrap();
        let mut now = Nanos::from_secs(1_000);
        // Per request: (step awaiting the driver, attempts made, tokens reported).
        let mut live: Vec<(usize, Step, usize, u64)> = Vec::new();
        let mut finished: Vec<(usize, Finished, u64)> = Vec::new();
        for (i, _) in scripts.iter().enumerate() {
            let step = pipeline.handle_request(now, &RequestInfo::default(), picks[i % picks.len()]);
            live.push((i, step, 0, 0));
        }
        let mut k = 0;
        while !live.is_empty() {
            let pick = (picks[k % picks.len()] as usize + k) % live.len();
            k += 1;
            now = now + Nanos::from_millis(1);
            let (i, step, made, reported) = live.swap_remove(pick);
            let script = &scripts[i];
            let next = match step {
                Step::Wait { id } => {
                    now = now.max(pipeline.poll_timeout_of(id).expect("a retry's instant"));
                    let step = pipeline.handle_timeout_of(now, id, k as u64).expect("due");
                    Some((step, made, reported))
                }
                Step::Forward { id, .. } => {
                    let (word, tokens) = script.attempts[made.min(script.attempts.len() - 1)];
                    let step = pipeline.handle_attempt(now, id, outcome(word), usage(tokens), k as u64).unwrap();
                    Some((step, made + 1, reported + tokens))
                }
                Step::Deliver { id } => {
                    let delivery = Delivery { usage: usage(script.delivered), ..Default::default() };
                    let f = pipeline.handle_delivered(now, id, delivery).unwrap();
                    finished.push((i, f, reported + script.delivered));
                    None
                }
                Step::Respond(f) => {
                    finished.push((i, f, reported));
                    None
                }
            };
            if let Some((step, made, reported)) = next {
                prop_assert!(made <= 4, "at most count + 1 attempts");
                live.push((i, step, made, reported));
            }
        }
        prop_assert_eq!(pipeline.limits().in_flight_count(), 0);
        let mut total = 0;
        for (i, f, reported) in &finished {
            prop_assert_eq!(f.record.tokens_charged(), *reported, "request {}", i);
            prop_assert_eq!(f.record.attempts.iter().map(|a| a.tokens).sum::<u64>(), *reported);
            total += reported;
        }
        // The request that finished last read the counter after every charge (all
        // within one minute), so the counter holds exactly the tokens reported.
        let last = &finished.iter().max_by_key(|f| f.1.record.finished).expect("at least one request").1;
        let remaining: u64 = last.headers[0].1.parse().unwrap();
        prop_assert_eq!(1_000_000_000 - remaining, total);
    }

    /// Reserve mode: the tokens a key is charged, stamped when each request was
    /// admitted, never exceed `tokens_per_minute` in any 60-second window, however
    /// many requests run at once and however long they take.
    #[test]
    fn reserve_mode_never_exceeds_tokens_per_minute(
        requests in prop::collection::vec((0u64..180_000, 0u64..800, 1u64..1_200, 0u64..=100, 1u64..90_000), 1..60),
    ) {
        let tpm = 4_000;
        let text = format!(
            "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = {tpm}\nreserve = true\n"
        );
        let mut gw = LimitBook::new(&policy(&text), 3);
        let start = Nanos::from_secs(1_000);
        // Events in time order: arrivals (kind 1) after completions (kind 0) at the same instant.
        let mut events: Vec<(u64, u8, usize)> = Vec::new();
        for (i, &(arrive, _, _, _, duration)) in requests.iter().enumerate() {
            events.push((arrive, 1, i));
            events.push((arrive + duration, 0, i));
        }
        events.sort();
        let mut ids = vec![None; requests.len()];
        let mut charged: Vec<(u64, u64)> = Vec::new();
        for (t, kind, i) in events {
            let (arrive, prompt, max_tokens, used_pct, _) = requests[i];
            let now = start + Nanos::from_millis(t);
            let req = RequestInfo { ip: "k".into(), prompt_tokens_estimate: Some(prompt), max_tokens: Some(max_tokens), ..Default::default() };
            if kind == 1 {
                if let RequestDecision::Forward(a) = gw.handle_request(now, &req) {
                    ids[i] = Some(a.id);
                }
            } else if let Some(id) = ids[i] {
                let total = prompt + max_tokens * used_pct / 100;
                gw.handle_response(now, id, &ResponseInfo { status: Some(200), total_tokens: total, ..Default::default() }).unwrap();
                charged.push((arrive, total));
            }
        }
        // Window sums only change at admissions, so checking the minute ending at
        // each admission checks every window.
        for &(t, _) in &charged {
            let window: u64 = charged.iter().filter(|&&(s, _)| s + 60_000 > t && s <= t).map(|c| c.1).sum();
            prop_assert!(window <= tpm, "{} tokens in the minute ending at {} ms", window, t);
        }
    }
}

#[test]
fn without_reserve_concurrent_requests_overshoot_and_with_it_they_cannot() {
    let overshoot = |reserve: bool| -> u64 {
        let text = format!(
            "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 1000\nreserve = {reserve}\n"
        );
        let mut gw = LimitBook::new(&policy(&text), 0);
        let req = RequestInfo {
            ip: "k".into(),
            prompt_tokens_estimate: Some(100),
            max_tokens: Some(400),
            ..Default::default()
        };
        let t = Nanos::from_secs(1);
        // Ten requests arrive together; each will use 500 tokens.
        let ids: Vec<_> = (0..10)
            .filter_map(|_| match gw.handle_request(t, &req) {
                RequestDecision::Forward(a) => Some(a.id),
                RequestDecision::Reject(_) => None,
            })
            .collect();
        let info = ResponseInfo { status: Some(200), total_tokens: 500, ..Default::default() };
        ids.iter().map(|&id| gw.handle_response(t + Nanos::from_secs(5), id, &info).unwrap().tokens_charged).sum()
    };
    assert_eq!(overshoot(false), 5_000, "APIM's rule admits all ten: five times the limit");
    assert_eq!(overshoot(true), 1_000, "reserve admits two");
}

#[test]
fn reserve_settles_to_the_real_usage_and_charges_an_excess() {
    let text = "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 1000\nreserve = true\nremaining_tokens_header_name = \"r\"\n";
    let mut gw = LimitBook::new(&policy(text), 0);
    let t = Nanos::from_secs(1);
    let req =
        |max| RequestInfo { ip: "k".into(), prompt_tokens_estimate: Some(100), max_tokens: max, ..Default::default() };
    let admit = |gw: &mut LimitBook, r: &RequestInfo| match gw.handle_request(t, r) {
        RequestDecision::Forward(a) => a.id,
        RequestDecision::Reject(r) => panic!("rejected: {}", r.body),
    };
    let remaining = |gw: &mut LimitBook, id, tokens| {
        let info = ResponseInfo { status: Some(200), total_tokens: tokens, ..Default::default() };
        gw.handle_response(t, id, &info).unwrap().headers[0].1.clone()
    };
    let a = admit(&mut gw, &req(Some(500)));
    // Reserved 600; used 150: 850 remain.
    assert_eq!(remaining(&mut gw, a, 150), "850");
    // No max_tokens: the default allowance (4096) is more than a minute holds.
    assert!(matches!(gw.handle_request(t, &req(None)), RequestDecision::Reject(_)));
    let b = admit(&mut gw, &req(Some(300)));
    // Reserved 400 but used 700 (a prompt estimate too low): the excess is charged, not lost.
    assert_eq!(remaining(&mut gw, b, 700), "150");
}

#[test]
fn reserve_sets_aside_the_allowance_once_for_each_choice() {
    let text = "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 1000\nreserve = true\nreserve_default_max_tokens = 200\n";
    let t = Nanos::from_secs(1);
    let ask = |max_tokens, choices| RequestInfo {
        ip: "k".into(),
        prompt_tokens_estimate: Some(100),
        max_tokens,
        choices,
        ..Default::default()
    };
    let admitted =
        |gw: &mut LimitBook, req: &RequestInfo| matches!(gw.handle_request(t, req), RequestDecision::Forward(_));
    // (max_tokens, choices, what the reservation leaves of the minute's 1,000 for a
    // prompt of 100; None: refused). What is left is probed with a second request
    // of no prompt whose allowance is one token more than that, then exactly that.
    let check = |max_tokens, choices, left: Option<u64>| {
        let mut gw = LimitBook::new(&policy(text), 0);
        let first = admitted(&mut gw, &ask(max_tokens, choices));
        assert_eq!(first, left.is_some(), "{max_tokens:?} x {choices:?}");
        let Some(left) = left else { return };
        let probe = |max| RequestInfo { prompt_tokens_estimate: Some(0), ..ask(Some(max), None) };
        assert!(!admitted(&mut gw, &probe(left + 1)), "{max_tokens:?} x {choices:?}: more than {left} left");
        assert!(admitted(&mut gw, &probe(left)), "{max_tokens:?} x {choices:?}: less than {left} left");
    };
    check(Some(300), None, Some(600));
    check(Some(300), Some(1), Some(600));
    check(Some(300), Some(0), Some(600));
    check(Some(300), Some(2), Some(300));
    check(Some(300), Some(3), Some(0));
    check(Some(300), Some(4), None);
    check(None, Some(4), Some(100));
    check(None, Some(5), None);
    check(Some(u64::MAX), Some(u64::MAX), None);
}

const PRIORITY_POOL: &str = r#"
set_backend = "pool"

[[backends]]
id = "a"
url = "http://a"
circuit_breaker = { failure_count = 2, interval = 10, statuses = "429, >=500", trip_duration = 5 }

[[backends]]
id = "b"
url = "http://b"
circuit_breaker = { failure_percent = 50, interval = 10, statuses = ">=500", trip_duration = 8 }

[[backends]]
id = "c"
url = "http://c"
circuit_breaker = { failure_count = 1, interval = 10, statuses = "429, >=500", trip_duration = 3 }

[[backends]]
id = "d"
url = "http://d"
circuit_breaker = { failure_count = 1, interval = 10, statuses = ">=500", trip_duration = 20 }

[[pools]]
id = "pool"
strategy = "priority"
members = [
    { backend = "a", priority = 0 },
    { backend = "b", priority = 0, weight = 3 },
    { backend = "c", priority = 1 },
    { backend = "d", priority = 2 },
]

[retry]
condition = "429, >=500"
on_transport_failure = true
count = 3
interval = 0.5
"#;

/// The reference circuit breaker: the rule written out plainly.
#[derive(Clone, Debug, Default)]
struct RefBreaker {
    log: Vec<(u64, bool)>,
    open_until: u64,
}

impl RefBreaker {
    /// (failure_count, failure_percent, counts 429, trip ms) per backend a, b, c, d.
    const RULES: [(Option<u64>, Option<u64>, bool, u64); 4] = [
        (Some(2), None, true, 5_000),
        (None, Some(50), false, 8_000),
        (Some(1), None, true, 3_000),
        (Some(1), None, false, 20_000),
    ];

    fn record(&mut self, rule: usize, t: u64, result: &str) {
        let (count, percent, counts_429, trip) = Self::RULES[rule];
        let failed = match result {
            "429" => counts_429,
            "timeout" | "reset" => true,
            status => status.parse::<u16>().unwrap() >= 500,
        };
        self.log.retain(|&(s, _)| s + 10_000 > t);
        self.log.push((t, failed));
        let failures = self.log.iter().filter(|e| e.1).count() as u64;
        let total = self.log.len() as u64;
        let tripped = count.is_some_and(|n| failures >= n) || percent.is_some_and(|p| failures * 100 >= p * total);
        if failed && tripped {
            self.open_until = t + trip;
            self.log.clear();
        }
    }
}

proptest! {
    /// Requests one after another through a priority pool with breakers, against
    /// a reference model: a tripped backend is never chosen before its open
    /// period ends, a lower priority is used only when every higher member is
    /// tripped, at most count + 1 attempts, and a 503 only when nothing is available.
    #[test]
    fn pools_and_breakers_match_the_reference(
        results in prop::collection::vec(prop::sample::select(vec!["200", "200", "429", "500", "503", "timeout", "reset"]), 1..120),
        gaps_ms in prop::collection::vec(0u64..3_000, 120),
        latencies_ms in prop::collection::vec(0u64..2_000, 120),
        draws in prop::collection::vec(any::<u64>(), 120),
    ) {
        let mut pipeline = Lifecycle::new(&Policy::default(), routing(PRIORITY_POOL), 0).unwrap();
        let ids = ["a", "b", "c", "d"];
        let priority = [0, 0, 1, 2];
        let mut reference = vec![RefBreaker::default(); 4];
        let mut results = results.iter();
        let mut t_ms = 0u64;
        let base = Nanos::from_secs(1_000);
        let ms = |n: Nanos| (n - base).0 / 1_000_000;
        for k in 0..120 {
            t_ms += gaps_ms[k];
            let mut at = base + Nanos::from_millis(t_ms);
            let mut step = pipeline.handle_request(at, &RequestInfo::default(), draws[k]);
            let mut attempts = 0;
            loop {
                match step {
                    Step::Wait { id } => {
                        at = pipeline.poll_timeout_of(id).expect("a retry's instant");
                        step = pipeline.handle_timeout_of(at, id, draws[k]).expect("due");
                    }
                    Step::Forward { id, attempt } => {
                        attempts += 1;
                        prop_assert!(attempts <= 4);
                        let at_ms = ms(at);
                        let i = ids.iter().position(|b| *b == &*attempt.backend).unwrap();
                        prop_assert!(reference[i].open_until <= at_ms, "{} chosen while tripped", ids[i]);
                        let best = (0..4).filter(|&j| reference[j].open_until <= at_ms).map(|j| priority[j]).min();
                        prop_assert_eq!(Some(priority[i]), best, "priority order at {} ms", at_ms);
                        let Some(result) = results.next() else { return Ok(()) };
                        t_ms = at_ms + latencies_ms[k];
                        reference[i].record(i, t_ms, result);
                        at = base + Nanos::from_millis(t_ms);
                        step = pipeline.handle_attempt(at, id, outcome(result), Usage::default(), draws[(k + attempts) % 120]).unwrap();
                    }
                    Step::Deliver { id } => {
                        pipeline.handle_delivered(base + Nanos::from_millis(t_ms), id, Delivery::default()).unwrap();
                        break;
                    }
                    Step::Respond(finished) => {
                        if finished.record.reason == Reason::NoBackend && attempts == 0 {
                            prop_assert!((0..4).all(|j| reference[j].open_until > t_ms), "503 with a member available");
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// A backend may report any usage (a bug, a hostile endpoint): counts that do not
/// fit saturate. Wrapped counters would read as nearly empty and admit everyone.
#[test]
fn absurd_usage_saturates_the_counters_instead_of_wrapping() {
    let token_limit = "[[limits]]\ntype = \"llm-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 5000\n\
                       token_quota = 100000\ntoken_quota_period = \"Daily\"\n";
    let bandwidth =
        "[[limits]]\ntype = \"quota-by-key\"\nbandwidth = \"1 MB\"\nrenewal_period = 3600\ncounter_key = \"ip\"\n";
    for text in [token_limit, bandwidth] {
        let mut pipeline = Lifecycle::new(&policy(text), routing(SEED), 0).unwrap();
        let req = RequestInfo { ip: "10.0.0.1".into(), ..Default::default() };
        let now = Nanos::from_secs(1_000);
        let Step::Forward { id, .. } = pipeline.handle_request(now, &req, 0) else { panic!("the first is admitted") };
        let ok = AttemptOutcome::Response { status: 200, retry_after: None };
        let Ok(Step::Deliver { id }) = pipeline.handle_attempt(now, id, ok, Usage::default(), 0) else {
            panic!("a 200 is delivered")
        };
        let usage = Usage { prompt_tokens: u64::MAX, completion_tokens: u64::MAX };
        let delivery = Delivery { usage, request_bytes: u64::MAX, response_bytes: u64::MAX, ..Delivery::default() };
        let finished = pipeline.handle_delivered(now, id, delivery).unwrap();
        assert_eq!(finished.record.tokens_charged(), u64::MAX, "the charge saturates");
        let Step::Respond(refused) = pipeline.handle_request(now + Nanos::from_secs(1), &req, 0) else {
            panic!("{text}: the counters are full, not wrapped to nearly empty")
        };
        assert!(refused.record.reason.is_limit(), "{:?}", refused.record.reason);
    }
}

/// Deadlines live in the core: a driver of many requests keeps one timer, set
/// to `poll_timeout`, and computes no timeout or wait of its own.
#[test]
fn a_driver_with_one_timer_gets_every_timeout_and_retry_from_the_core() {
    let text = SEED.replace("set_backend = \"primary\"", "set_backend = \"primary\"\ntimeout = 2");
    let mut pipeline = Lifecycle::new(&Policy::default(), routing(&text), 0).unwrap();
    let t0 = Nanos::from_secs(1_000);
    let ids: Vec<_> = (0..3u64)
        .map(|k| match pipeline.handle_request(t0 + Nanos::from_millis(k), &RequestInfo::default(), 0) {
            Step::Forward { id, .. } => id,
            other => panic!("admitted and sent: {other:?}"),
        })
        .collect();
    // Request 0 is answered in time; 1 and 2 hang.
    let answered = pipeline.handle_attempt(t0 + Nanos::from_millis(500), ids[0], outcome("200"), usage(10), 0);
    assert!(matches!(answered, Ok(Step::Deliver { .. })));
    // The next deadline is request 1's: 2 s after it went out, plus the instant
    // at which an answer is late.
    let first = pipeline.poll_timeout().unwrap();
    assert_eq!(first, t0 + Nanos::from_millis(1) + Nanos::from_secs(2) + Nanos(1));
    pipeline.handle_timeout(first - Nanos(1), &mut || 0);
    assert_eq!(pipeline.poll_step(), None, "nothing is due a nanosecond early");
    let mut steps = Vec::new();
    pipeline.handle_timeout(first + Nanos::from_millis(5), &mut || 0);
    while let Some(step) = pipeline.poll_step() {
        steps.push(step);
    }
    // Both hung attempts timed out, in the order they went out; each waits for
    // its retry (the seed's `>= 500` sees a timeout as 504).
    assert_eq!(steps, vec![Step::Wait { id: ids[1] }, Step::Wait { id: ids[2] }]);
    // A late answer to a timed-out attempt is refused, not counted twice.
    let late = pipeline.handle_attempt(first + Nanos::from_millis(6), ids[1], outcome("200"), usage(10), 0);
    assert!(late.is_err(), "{late:?}");
    // The retries go out at the core's instants: 1 s after each timeout (draw 0).
    let retry = pipeline.poll_timeout().unwrap();
    assert_eq!(retry, first + Nanos::from_millis(5) + Nanos::from_secs(1));
    pipeline.handle_timeout(retry, &mut || 0);
    let sent: Vec<_> = std::iter::from_fn(|| pipeline.poll_step()).collect();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| matches!(s, Step::Forward { attempt, .. } if &*attempt.backend == "secondary")));
}

#[test]
fn a_client_that_leaves_during_an_attempt_ends_the_request_as_client_gone() {
    let mut pipeline = Lifecycle::new(&policy(TOKENS), routing(SEED), 0).unwrap();
    let t = Nanos::from_secs(1_000);
    let Step::Forward { id, .. } = pipeline.handle_request(t, &RequestInfo::default(), 0) else { panic!() };
    let finished = pipeline.handle_client_gone(t + Nanos::from_secs(1), id).unwrap();
    assert_eq!(finished.record.reason, Reason::ClientGone);
    assert_eq!(pipeline.limits().in_flight_count(), 0);
    assert_eq!(pipeline.poll_timeout(), None, "its deadline went with it");
}
