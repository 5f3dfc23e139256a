//! The proxy's request log: one line per finished request (its outcome record)
//! and one per refusal before the policy. As text through `tracing`, or, with
//! `--log-json`, as JSON lines whose `record` is an object, not a string.

use gateway_core::Finished;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Writes request lines as JSON objects (`--log-json`).
pub fn write_json(enabled: bool) {
    JSON.store(enabled, Ordering::Relaxed);
}

/// The log line of a finished request.
pub fn request(finished: &Finished) {
    // The record is serialized only when someone reads request logs.
    if !tracing::enabled!(target: "limitlab::request", tracing::Level::INFO) {
        return;
    }
    let record = &finished.record;
    let reason = record.reason.as_str();
    if JSON.load(Ordering::Relaxed) {
        let fields =
            serde_json::json!({"message": "request", "status": record.status, "reason": reason, "record": record});
        return json_line("limitlab::request", fields);
    }
    let text = serde_json::to_string(record).unwrap_or_default();
    tracing::info!(target: "limitlab::request", status = record.status, reason, record = %text, "request");
}

/// The log line of a request refused before the policy ran (no key, a body
/// too large or too slow, an unknown path), with why.
pub fn refusal(status: u16, refusal: &str) {
    if !tracing::enabled!(target: "limitlab::refusal", tracing::Level::INFO) {
        return;
    }
    if JSON.load(Ordering::Relaxed) {
        let fields = serde_json::json!({"message": "refused", "status": status, "refusal": refusal});
        return json_line("limitlab::refusal", fields);
    }
    tracing::info!(target: "limitlab::refusal", status, refusal, "refused");
}

/// One line in the shape of `tracing-subscriber`'s JSON format.
fn json_line(target: &str, fields: serde_json::Value) {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let timestamp = gateway_core::time::format_rfc3339(gateway_core::Nanos(since_epoch.as_nanos() as u64));
    let line = serde_json::json!({"timestamp": timestamp, "level": "INFO", "fields": fields, "target": target});
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}
