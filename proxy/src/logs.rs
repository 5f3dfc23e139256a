//! The proxy's request log: one line per finished request (its outcome record)
//! and one per refusal before the policy.
//!
//! Embedded, the proxy emits them as `tracing` events. The CLI, which owns the
//! log's format, has them written straight to stderr instead ([`write_lines`]),
//! in the format its `tracing` subscriber gives every other line: text, or with
//! `--log-json` JSON lines whose `record` is an object, not a string. A request
//! line through `tracing`'s formatter cost about 12,000 instructions, a sixth
//! of a proxied request's; written directly, about 5,000.

use gateway_core::{Finished, OutcomeRecord};
use std::cell::RefCell;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

/// How request and refusal lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// As `tracing` events, for whatever subscriber is installed.
    Events,
    /// Written to stderr as `tracing-subscriber`'s text format writes them.
    Text,
    /// Written to stderr as `tracing-subscriber`'s JSON format writes them.
    Json,
}

static LINES: AtomicU8 = AtomicU8::new(Lines::Events as u8);

/// Chooses how request and refusal lines are written (the CLI: `Text`, or
/// `Json` with `--log-json`). Whether they are written at all is still the
/// `tracing` filter's choice (`LIMITLAB_LOG`).
pub fn write_lines(lines: Lines) {
    LINES.store(lines as u8, Ordering::Relaxed);
}

fn lines() -> Lines {
    match LINES.load(Ordering::Relaxed) {
        n if n == Lines::Text as u8 => Lines::Text,
        n if n == Lines::Json as u8 => Lines::Json,
        _ => Lines::Events,
    }
}

const REQUEST: &str = "limitlab::request";
const REFUSAL: &str = "limitlab::refusal";

/// The log line of a finished request.
pub fn request(finished: &Finished) {
    // The record is serialized only when someone reads request logs.
    if !tracing::enabled!(target: "limitlab::request", tracing::Level::INFO) {
        return;
    }
    match lines() {
        Lines::Events => request_event(&finished.record),
        Lines::Text => line(|out| request_text(out, &finished.record)),
        Lines::Json => line(|out| request_json(out, &finished.record)),
    }
}

/// The log line of a request refused before the policy ran (no key, a body
/// too large or too slow, an unknown path), with why.
pub fn refusal(status: u16, refusal: &str) {
    if !tracing::enabled!(target: "limitlab::refusal", tracing::Level::INFO) {
        return;
    }
    match lines() {
        Lines::Events => refusal_event(status, refusal),
        Lines::Text => line(|out| refusal_text(out, status, refusal)),
        Lines::Json => line(|out| refusal_json(out, status, refusal)),
    }
}

fn request_event(record: &OutcomeRecord) {
    let text = serde_json::to_string(record).unwrap_or_default();
    let reason = record.reason.as_str();
    tracing::info!(target: "limitlab::request", status = record.status, reason, record = %text, "request");
}

fn request_text(out: &mut Vec<u8>, record: &OutcomeRecord) {
    text_start(out, REQUEST, "request");
    let _ = write!(out, " status={} reason={:?} record=", record.status, record.reason.as_str());
    json(out, record);
}

fn request_json(out: &mut Vec<u8>, record: &OutcomeRecord) {
    json_start(out, "request");
    let _ = write!(out, r#","status":{},"reason":"#, record.status);
    json(out, record.reason.as_str());
    out.extend_from_slice(br#","record":"#);
    json(out, record);
    json_end(out, REQUEST);
}

fn refusal_event(status: u16, refusal: &str) {
    tracing::info!(target: "limitlab::refusal", status, refusal, "refused");
}

fn refusal_text(out: &mut Vec<u8>, status: u16, refusal: &str) {
    text_start(out, REFUSAL, "refused");
    let _ = write!(out, " status={status} refusal={refusal:?}");
}

fn refusal_json(out: &mut Vec<u8>, status: u16, refusal: &str) {
    json_start(out, "refused");
    let _ = write!(out, r#","status":{status},"refusal":"#);
    json(out, refusal);
    json_end(out, REFUSAL);
}

/// Builds a line in this thread's buffer and writes it to stderr in one write,
/// so that lines from several threads never interleave.
fn line(build: impl FnOnce(&mut Vec<u8>)) {
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    LINE.with_borrow_mut(|out| {
        out.clear();
        build(out);
        out.push(b'\n');
        let _ = std::io::stderr().lock().write_all(out);
    });
}

fn timestamp() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    gateway_core::time::format_rfc3339(gateway_core::Nanos(since_epoch.as_nanos() as u64))
}

/// `2026-12-07T11:06:41.412720Z  INFO limitlab::request: request`, as the
/// text format starts a line (ANSI colour is never written: stderr is then a
/// file or a pipe, or a person who asked for plain lines).
fn text_start(out: &mut Vec<u8>, target: &str, message: &str) {
    let _ = write!(out, "{}  INFO {target}: {message}", timestamp());
}

/// `{"timestamp":…,"level":"INFO","fields":{"message":…`, the JSON format's order.
fn json_start(out: &mut Vec<u8>, message: &str) {
    let _ = write!(out, r#"{{"timestamp":"{}","level":"INFO","fields":{{"message":"{message}""#, timestamp());
}

/// Closes the fields and names the target.
fn json_end(out: &mut Vec<u8>, target: &str) {
    let _ = write!(out, r#"}},"target":"{target}"}}"#);
}

/// `value` as JSON, appended.
fn json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::{Nanos, Reason, Usage};
    use std::sync::{Arc, Mutex};

    /// What a `tracing-subscriber` formatter writes for `event`: the reference
    /// that the lines written directly must match.
    fn formatted(json: bool, event: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false);
        match json {
            true => tracing::subscriber::with_default(builder.json().finish(), event),
            false => tracing::subscriber::with_default(builder.finish(), event),
        }
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn direct(build: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        build(&mut out);
        out.push(b'\n');
        String::from_utf8(out).unwrap()
    }

    /// A text line with its timestamp cut off, and the timestamp.
    fn split_text(line: &str) -> (&str, &str) {
        line.split_once(' ').unwrap()
    }

    /// A JSON line as a value, its timestamp taken out, and the record nested
    /// as an object where the subscriber has it as a string.
    fn json_value(line: &str) -> (serde_json::Value, String) {
        let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
        let timestamp = value.as_object_mut().unwrap().remove("timestamp").unwrap();
        if let Some(record) = value["fields"].get("record").and_then(|r| r.as_str()) {
            value["fields"]["record"] = serde_json::from_str(record).unwrap();
        }
        (value, timestamp.as_str().unwrap().to_owned())
    }

    fn check(event: impl Fn(), text: impl Fn(&mut Vec<u8>), json: impl Fn(&mut Vec<u8>)) {
        let (theirs, ours) = (formatted(false, &event), direct(text));
        let ((their_time, their_rest), (our_time, our_rest)) = (split_text(&theirs), split_text(&ours));
        assert_eq!(our_rest, their_rest);
        assert_eq!(our_time.len(), their_time.len(), "{our_time} against {their_time}");
        gateway_core::time::parse_rfc3339(our_time).unwrap();
        let (theirs, ours) = (formatted(true, &event), direct(json));
        let ((their_value, their_time), (our_value, our_time)) = (json_value(&theirs), json_value(&ours));
        assert_eq!(our_value, their_value, "{ours} against {theirs}");
        assert_eq!(our_time.len(), their_time.len(), "{our_time} against {their_time}");
    }

    #[test]
    fn lines_written_directly_are_the_subscribers_lines() {
        let record = OutcomeRecord {
            arrived: Nanos(1_796_641_601_254_623_685),
            finished: Nanos(1_796_641_601_412_690_472),
            attempts: Default::default(),
            status: 429,
            reason: Reason::RateLimit,
            usage: Usage { prompt_tokens: 19, completion_tokens: 21 },
        };
        check(|| request_event(&record), |out| request_text(out, &record), |out| request_json(out, &record));
        for why in ["missing-subscription-key", "a \"quoted\" \\ reason\n"] {
            check(|| refusal_event(401, why), |out| refusal_text(out, 401, why), |out| refusal_json(out, 401, why));
        }
    }
}
