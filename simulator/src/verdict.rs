//! The verdict at the top of the summary and the HTML report: which limit
//! refused whom, how much, and the `limitlab sweep` command that would size it.

use crate::report::{ClientReport, Report};
use crate::scenario::Scenario;
use gateway_core::{Limit, Reason};

/// Above this share of a client's calls, a refusal reason is worth a line.
const NOTABLE_SHARE: f64 = 0.01;
/// Above this share of a backend's attempts, its throttling is worth a line.
const NOTABLE_THROTTLING: f64 = 0.05;

/// A few sentences, one per finding; `path` is how the user named the scenario.
pub fn verdict(report: &Report, scenario: &Scenario, path: &str) -> Vec<String> {
    let mut lines: Vec<String> = report.clients.iter().filter_map(|c| client_line(c, scenario, path)).collect();
    lines.extend(report.backends.iter().filter_map(|b| {
        let share = if b.attempts == 0 { 0.0 } else { b.throttled as f64 / b.attempts as f64 };
        let tpm = scenario.backends.iter().find(|d| d.name == b.name).map(|d| d.tpm)?;
        (share > NOTABLE_THROTTLING).then(|| {
            format!(
                "backend {} throttled {:.0}% of its attempts (429s from the deployment); size it with: \
                 limitlab sweep {path} --vary backends.{}.tpm={} --slo \"backend.{}.throttled_ratio<=0.05\"",
                b.name,
                share * 100.0,
                b.name,
                around(tpm),
                b.name
            )
        })
    }));
    if lines.is_empty() {
        lines.push("no limit refused a notable share of any client's calls, and no backend throttled much".into());
    }
    lines
}

/// What refused a client most, if anything refused a notable share.
fn client_line(c: &ClientReport, scenario: &Scenario, path: &str) -> Option<String> {
    if c.requests == 0 || c.refused_ratio < NOTABLE_SHARE {
        return None;
    }
    let refusals: Vec<(Reason, u64)> = Reason::ALL
        .into_iter()
        .filter(|r| r.is_limit() || *r == Reason::NoBackend)
        .filter_map(|r| c.by_reason.get(r.as_str()).map(|n| (r, *n)))
        .collect();
    let &(top, top_calls) = refusals.iter().max_by_key(|(r, n)| (*n, std::cmp::Reverse(*r as usize)))?;
    let parts: Vec<String> = refusals.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut line = format!(
        "{}: {:.0}% of {} calls refused ({}); mostly {top}, {:.0}% of its calls",
        c.name,
        c.refused_ratio * 100.0,
        c.requests,
        parts.join(", "),
        top_calls as f64 / c.requests as f64 * 100.0
    );
    if let Some((field, value)) = limit_field(scenario, top) {
        line += &format!(
            "; size it with: limitlab sweep {path} --vary {field}={} --slo \"client.{}.refused_ratio<=0.05\"",
            around(value),
            c.name
        );
    }
    Some(line)
}

/// The sweep path and current value of the limit behind a refusal reason.
fn limit_field(scenario: &Scenario, reason: Reason) -> Option<(&'static str, u64)> {
    let limits = &scenario.gateway.policy().limits;
    limits.iter().find_map(|l| match (reason, l) {
        (Reason::RateLimit, Limit::RateLimit(r) | Limit::RateLimitByKey(r)) => {
            Some(("gateway.policy.rate_limit.calls", r.0.calls))
        }
        (Reason::Quota, Limit::Quota(q) | Limit::QuotaByKey(q)) => q.0.calls.map(|c| ("gateway.policy.quota.calls", c)),
        (Reason::TokenLimit, Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t)) => {
            t.0.tokens_per_minute.map(|n| ("gateway.policy.token_limit.tokens_per_minute", n))
        }
        (Reason::TokenQuota, Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t)) => {
            t.0.token_quota.map(|n| ("gateway.policy.token_limit.token_quota", n))
        }
        _ => None,
    })
}

/// Values around `current`, from itself to eight times it.
fn around(current: u64) -> String {
    [1, 2, 4, 8].map(|k| current.saturating_mul(k).to_string()).join(",")
}
