//! `limitlab decide`: the core's decisions on a request log, one line each.

use anyhow::{bail, Context, Result};
use gateway_core::time::parse_rfc3339;
use gateway_core::{LimitBook, Nanos, Policy, RequestDecision, RequestId, RequestInfo, ResponseInfo, Subscription};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    t_ms: u64,
    #[serde(default)]
    ip: String,
    subscription: Option<String>,
    product: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The backend's status for an admitted request (default 200; null: no response).
    #[serde(default = "ok_status")]
    status: Option<u16>,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    latency_ms: u64,
    prompt_tokens: Option<u64>,
    max_tokens: Option<u64>,
    /// How many completions the request asked for (its `n`); one when absent.
    n: Option<u64>,
    #[serde(default)]
    bytes: u64,
}

fn ok_status() -> Option<u16> {
    Some(200)
}

/// The instant the request log's `t_ms` counts from.
const START: &str = "2024-01-01T09:00:00Z";

/// A policy file as `policy check` reads one (native TOML, or APIM policy XML
/// with every error reported); the XML's backend side is not used here.
fn load_policy(path: &Path) -> Result<Policy> {
    let doc = crate::policy::load(path, &apim_policy::ReadOptions::default()).map_err(anyhow::Error::msg)?;
    for warning in &doc.warnings {
        eprintln!("{}:{warning} (warning)", path.display());
    }
    Ok(doc.policy)
}

pub fn run(policy_path: &Path, requests_path: &Path) -> Result<()> {
    let policy = load_policy(policy_path)?;
    let lines = read_lines(requests_path)?;
    let start = parse_rfc3339(START).map_err(anyhow::Error::msg)?;
    let mut gw = LimitBook::new(&policy, 0);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "policy {} ({} limits), requests {} from {START}",
        policy_path.display(),
        policy.limits.len(),
        requests_path.display()
    )?;
    let (mut admitted, mut rejected) = (0, BTreeMap::<u16, u64>::new());
    // Responses wait in time order; they complete before a later request arrives.
    let mut pending: Vec<(u64, usize, RequestId)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        complete_until(&mut gw, &mut pending, &lines, start, line.t_ms, &mut out)?;
        let now = start + Nanos::from_millis(line.t_ms);
        match gw.handle_request(now, &request(line)) {
            RequestDecision::Forward(a) => {
                admitted += 1;
                pending.push((line.t_ms + line.latency_ms, i, a.id));
                pending.sort();
            }
            RequestDecision::Reject(r) => {
                *rejected.entry(r.status).or_default() += 1;
                writeln!(
                    out,
                    "{:>9.3}s  #{:<4} {:<16} {} by limit {}  {}",
                    secs(line.t_ms),
                    i + 1,
                    line.ip,
                    r.status,
                    r.limit_index,
                    r.body
                )?;
            }
        }
    }
    complete_until(&mut gw, &mut pending, &lines, start, u64::MAX, &mut out)?;
    let rejected_text: Vec<String> = rejected.iter().map(|(s, n)| format!("{n} x {s}")).collect();
    writeln!(
        out,
        "{} requests: {admitted} admitted, rejected: {}",
        lines.len(),
        if rejected_text.is_empty() { "none".into() } else { rejected_text.join(", ") }
    )?;
    Ok(())
}

fn complete_until(
    gw: &mut LimitBook,
    pending: &mut Vec<(u64, usize, RequestId)>,
    lines: &[Line],
    start: Nanos,
    t_ms: u64,
    out: &mut impl Write,
) -> Result<()> {
    while pending.first().is_some_and(|p| p.0 <= t_ms) {
        let (done_ms, i, id) = pending.remove(0);
        let line = &lines[i];
        let info = ResponseInfo {
            status: line.status,
            total_tokens: line.total_tokens,
            request_bytes: line.bytes,
            response_bytes: 0,
        };
        let completed = gw.handle_response(start + Nanos::from_millis(done_ms), id, &info)?;
        let status = line.status.map_or("no response".to_owned(), |s| s.to_string());
        let headers: Vec<String> = completed.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(
            out,
            "{:>9.3}s  #{:<4} {:<16} {status} from the backend (sent at {:.3}s)  {}",
            secs(done_ms),
            i + 1,
            line.ip,
            secs(line.t_ms),
            headers.join(", ")
        )?;
    }
    Ok(())
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn request(line: &Line) -> RequestInfo {
    RequestInfo {
        ip: line.ip.clone(),
        subscription: line.subscription.as_ref().map(|s| Subscription {
            id: s.clone(),
            key: s.clone(),
            name: s.clone(),
        }),
        product: line.product.clone(),
        headers: line.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        prompt_tokens_estimate: line.prompt_tokens,
        max_tokens: line.max_tokens,
        choices: line.n,
    }
}

fn read_lines(path: &Path) -> Result<Vec<Line>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines: Vec<Line> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        if lines.last().is_some_and(|prev| prev.t_ms > line.t_ms) {
            bail!(
                "{}:{}: `t_ms` {} is earlier than the line before; sort the log by time",
                path.display(),
                n + 1,
                line.t_ms
            );
        }
        lines.push(line);
    }
    Ok(lines)
}
