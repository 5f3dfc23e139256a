//! A tiny timeline runner shared by the data-driven tests.
#![allow(dead_code)]

use gateway_core::{LimitBook, Nanos, Policy, RequestDecision, RequestInfo, ResponseInfo, Subscription};

/// One client request in a test timeline.
#[derive(Clone, Debug, Default)]
pub struct Call {
    pub at_ms: u64,
    pub caller: &'static str,
    /// The backend's status; `None` means no response ever came.
    pub status: Option<u16>,
    pub tokens: u64,
    pub estimate: Option<u64>,
    pub bytes: u64,
    /// Milliseconds from admission to response.
    pub latency_ms: u64,
}

pub fn call(at_ms: u64, caller: &'static str) -> Call {
    Call { at_ms, caller, status: Some(200), ..Call::default() }
}

impl Call {
    pub fn status(mut self, s: Option<u16>) -> Call {
        self.status = s;
        self
    }
    pub fn tokens(mut self, t: u64) -> Call {
        self.tokens = t;
        self
    }
    pub fn estimate(mut self, e: u64) -> Call {
        self.estimate = Some(e);
        self
    }
    pub fn bytes(mut self, b: u64) -> Call {
        self.bytes = b;
        self
    }
    pub fn latency(mut self, ms: u64) -> Call {
        self.latency_ms = ms;
        self
    }
}

/// The outcome of one call, written compactly: `"ok"` or `"STATUS@LIMIT/RETRY"`
/// (`"429@0/58"`: limit 0 answered 429 with `Retry-After: 58`; `-` for none).
pub fn outcome(d: &RequestDecision) -> String {
    match d {
        RequestDecision::Forward(_) => "ok".to_owned(),
        RequestDecision::Reject(r) => {
            let retry = r.retry_after_secs.map_or("-".to_owned(), |n| n.to_string());
            format!("{}@{}/{}", r.status, r.limit_index, retry)
        }
    }
}

pub fn request_for(c: &Call) -> RequestInfo {
    RequestInfo {
        ip: c.caller.to_owned(),
        subscription: Some(Subscription {
            id: format!("sub-{}", c.caller),
            key: format!("key-{}", c.caller),
            name: c.caller.to_owned(),
        }),
        product: Some("starter".to_owned()),
        headers: vec![],
        prompt_tokens_estimate: c.estimate,
        max_tokens: None,
        choices: None,
    }
}

pub fn policy(toml_text: &str) -> Policy {
    Policy::from_toml(toml_text).unwrap_or_else(|e| panic!("test policy does not parse: {e}"))
}

/// Runs the calls as a timeline (requests and responses in time order, requests
/// first at equal times) from `start`, and returns each call's outcome plus, for
/// admitted calls, the headers added to their responses.
pub fn run_at(policy_text: &str, start: Nanos, calls: &[Call]) -> (Vec<String>, Vec<Vec<(String, String)>>) {
    let mut gw = LimitBook::new(&policy(policy_text), 7);
    // (time, phase, index): phase 0 = request, 1 = response.
    let mut events: Vec<(u64, u8, usize)> = calls.iter().enumerate().map(|(i, c)| (c.at_ms, 0, i)).collect();
    let mut ids = vec![None; calls.len()];
    let mut outcomes = vec![String::new(); calls.len()];
    let mut headers = vec![Vec::new(); calls.len()];
    events.sort();
    while !events.is_empty() {
        let (t, phase, i) = events.remove(0);
        let now = start + Nanos::from_millis(t);
        let c = &calls[i];
        if phase == 0 {
            let d = gw.handle_request(now, &request_for(c));
            outcomes[i] = outcome(&d);
            match d {
                RequestDecision::Forward(a) => {
                    ids[i] = Some(a.id);
                    let at = (t + c.latency_ms, 1, i);
                    let pos = events.partition_point(|e| *e <= at);
                    events.insert(pos, at);
                }
                RequestDecision::Reject(r) => headers[i] = r.headers,
            }
        } else {
            let info = ResponseInfo {
                status: c.status,
                total_tokens: c.tokens,
                request_bytes: c.bytes / 2,
                response_bytes: c.bytes - c.bytes / 2,
            };
            headers[i] = gw.handle_response(now, ids[i].expect("admitted"), &info).expect("in flight").headers;
        }
    }
    (outcomes, headers)
}

pub fn run(policy_text: &str, calls: &[Call]) -> Vec<String> {
    run_at(policy_text, Nanos::from_secs(1_700_000_000), calls).0
}

/// Asserts a timeline's outcomes, naming the first call that differs.
pub fn check(policy_text: &str, calls: &[Call], expected: &[&str]) {
    check_at(policy_text, Nanos::from_secs(1_700_000_000), calls, expected)
}

pub fn check_at(policy_text: &str, start: Nanos, calls: &[Call], expected: &[&str]) {
    assert_eq!(calls.len(), expected.len(), "one expectation per call");
    let (got, _) = run_at(policy_text, start, calls);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g, e, "call {i} ({:?}) of {got:?}", calls[i]);
    }
}
