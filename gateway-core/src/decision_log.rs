//! The decision log: one JSON line per client request, the same from the
//! simulator (`simulate --decisions`) and the proxy (`proxy --decisions`), so
//! that the two can be compared line by line.

use crate::key::RequestInfo;
use crate::lifecycle::OutcomeRecord;
use crate::time::Nanos;
use serde::Serialize;
use std::collections::BTreeMap;

/// One line of the decision log.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    /// The request's number: a trace line or the client's sequence number (the
    /// proxy takes it from `x-limitlab-request`, else counts arrivals).
    pub request: u64,
    pub client: String,
    /// The identities the policy can key on: `ip`, `subscription`, `product`.
    pub key: BTreeMap<String, String>,
    /// 0 for a first call, n for the SDK's retry n.
    pub attempt: u32,
    /// Since the run started (the scenario's start, or the proxy's).
    pub arrival_ms: f64,
    pub status: u16,
    /// A `Reason`'s one spelling.
    pub reason: &'static str,
    /// The backend of each attempt, in order.
    pub backends: Vec<String>,
    pub latency_ms: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Who sent a request, as the decision log names it.
pub struct Caller<'a> {
    pub request: u64,
    pub client: &'a str,
    pub attempt: u32,
    pub info: &'a RequestInfo,
}

impl Decision {
    /// The line of a finished request that arrived `arrival` after the run's
    /// `start` and took `latency`.
    pub fn new(caller: Caller<'_>, start: Nanos, record: &OutcomeRecord, latency: Nanos) -> Decision {
        Decision {
            request: caller.request,
            client: caller.client.to_owned(),
            key: key_values(caller.info),
            attempt: caller.attempt,
            arrival_ms: millis(record.arrived.saturating_sub(start)),
            status: record.status,
            reason: record.reason.as_str(),
            backends: record.attempts.iter().map(|a| a.backend.to_string()).collect(),
            latency_ms: millis(latency),
            prompt_tokens: record.usage.prompt_tokens,
            completion_tokens: record.usage.completion_tokens,
        }
    }
}

fn millis(n: Nanos) -> f64 {
    n.0 as f64 / 1e6
}

fn key_values(info: &RequestInfo) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    keys.insert("ip".to_owned(), info.ip.clone());
    if let Some(s) = &info.subscription {
        keys.insert("subscription".to_owned(), s.id.clone());
    }
    if let Some(p) = &info.product {
        keys.insert("product".to_owned(), p.clone());
    }
    keys
}
