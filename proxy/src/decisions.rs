//! `limitlab proxy --decisions FILE`: the simulator's decision log, written by
//! the proxy, one JSON line per client request as it finishes.

use gateway_core::decision_log::Caller;
use gateway_core::{Decision, Finished, Nanos, RequestInfo};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Headers a load generator (`limitlab load`, a test) sets so that each line
/// names the scenario's request: its number, client and SDK attempt.
pub const REQUEST_HEADER: &str = "x-limitlab-request";
pub const CLIENT_HEADER: &str = "x-limitlab-client";
pub const ATTEMPT_HEADER: &str = "x-limitlab-attempt";

pub struct DecisionLog {
    out: Mutex<BufWriter<std::fs::File>>,
    /// Numbers requests that carry no `x-limitlab-request`, in arrival order.
    arrivals: AtomicU64,
    /// Where `arrival_ms` counts from: the proxy's start.
    start: Nanos,
}

/// What the decision log says of a request besides its outcome.
pub struct Tags<'a> {
    pub headers: &'a axum::http::HeaderMap,
    /// The subscription's id: the client, when no header names one.
    pub subscription: &'a str,
    pub info: &'a RequestInfo,
}

impl DecisionLog {
    pub fn new(file: std::fs::File, start: Nanos) -> DecisionLog {
        DecisionLog { out: Mutex::new(BufWriter::new(file)), arrivals: AtomicU64::new(0), start }
    }

    /// Writes the line of a finished request. A line is flushed at once: the log
    /// is for runs that compare, where a line lost at a crash would be a lie.
    pub fn write(&self, tags: Tags<'_>, finished: &Finished) {
        let header = |name: &str| tags.headers.get(name).and_then(|v| v.to_str().ok());
        let request = header(REQUEST_HEADER).and_then(|v| v.parse().ok());
        let request = request.unwrap_or_else(|| self.arrivals.fetch_add(1, Ordering::Relaxed));
        let client = header(CLIENT_HEADER).unwrap_or(tags.subscription);
        let attempt = header(ATTEMPT_HEADER).and_then(|v| v.parse().ok()).unwrap_or(0);
        let record = &finished.record;
        let caller = Caller { request, client, attempt, info: tags.info };
        let decision = Decision::new(caller, self.start, record, record.finished.saturating_sub(record.arrived));
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let written = serde_json::to_writer(&mut *out, &decision)
            .map_err(std::io::Error::other)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the decision log");
        }
    }
}
