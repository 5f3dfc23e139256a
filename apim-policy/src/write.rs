//! Native policy → APIM XML, for `limitlab policy export` and round-trip tests.
//!
//! Only what APIM's XML can say is written: the limits' attributes, the backend
//! choice, the retry with its switches and the timeout. limitlab's own options
//! (`algorithm`, `reserve`) are tier settings or extensions with no XML form.

use crate::expr::{write_condition, write_key};
use gateway_core::routing::Routing;
use gateway_core::{Limit, Policy};
use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn attr(out: &mut String, name: &str, value: impl ToString) {
    let _ = write!(out, " {name}=\"{}\"", escape(&value.to_string()));
}

fn opt(out: &mut String, name: &str, value: &Option<String>) {
    if let Some(v) = value {
        attr(out, name, v);
    }
}

/// The policy (and the routing's backend side, when given) as a `<policies>` document.
pub fn write(policy: &Policy, routing: Option<&Routing>) -> String {
    let mut out = String::from("<policies>\n  <inbound>\n    <base />\n");
    for limit in &policy.limits {
        out.push_str("    ");
        write_limit(&mut out, limit);
        out.push('\n');
    }
    if let Some(r) = routing {
        let _ = writeln!(out, "    <set-backend-service backend-id=\"{}\" />", escape(&r.set_backend));
    }
    out.push_str("  </inbound>\n  <backend>\n");
    match routing {
        Some(r) => write_backend(&mut out, r),
        None => out.push_str("    <base />\n"),
    }
    out.push_str("  </backend>\n  <outbound>\n    <base />\n  </outbound>\n  <on-error>\n    <base />\n  </on-error>\n</policies>\n");
    out
}

fn write_backend(out: &mut String, r: &Routing) {
    let forward = format!("<forward-request timeout=\"{}\" buffer-request-body=\"true\" />", r.timeout);
    let Some(retry) = &r.retry else {
        let _ = writeln!(out, "    {forward}");
        return;
    };
    out.push_str("    <retry");
    attr(out, "condition", format!("@({})", write_condition(&retry.condition)));
    attr(out, "count", retry.count);
    attr(out, "interval", retry.interval);
    if let Some(d) = retry.delta {
        attr(out, "delta", d);
    }
    if let Some(m) = retry.max_interval {
        attr(out, "max-interval", m);
    }
    attr(out, "first-fast-retry", retry.first_fast_retry);
    out.push_str(">\n");
    if !retry.switch.is_empty() {
        out.push_str("      <choose>\n");
        for s in &retry.switch {
            let _ = writeln!(
                out,
                "        <when condition=\"{}\">\n          <set-backend-service backend-id=\"{}\" />\n        </when>",
                escape(&format!("@({})", write_condition(&s.when))),
                escape(&s.backend)
            );
        }
        out.push_str("      </choose>\n");
    }
    let _ = writeln!(out, "      {forward}\n    </retry>");
}

fn write_limit(out: &mut String, limit: &Limit) {
    let _ = write!(out, "<{}", limit.element());
    match limit {
        Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
            attr(out, "calls", r.calls);
            attr(out, "renewal-period", r.renewal_period);
            if let Some(k) = &r.counter_key {
                attr(out, "counter-key", format!("@({})", write_key(k)));
            }
            if let Some(c) = &r.increment_condition {
                attr(out, "increment-condition", format!("@({})", write_condition(c)));
            }
            attr(out, "increment-count", r.increment_count);
            opt(out, "retry-after-header-name", &r.retry_after_header_name);
            opt(out, "retry-after-variable-name", &r.retry_after_variable_name);
            opt(out, "remaining-calls-header-name", &r.remaining_calls_header_name);
            opt(out, "remaining-calls-variable-name", &r.remaining_calls_variable_name);
            opt(out, "total-calls-header-name", &r.total_calls_header_name);
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            if let Some(c) = q.calls {
                attr(out, "calls", c);
            }
            if let Some(b) = q.bandwidth {
                attr(out, "bandwidth", b.0 / 1024);
            }
            attr(out, "renewal-period", q.renewal_period);
            if let Some(k) = &q.counter_key {
                attr(out, "counter-key", format!("@({})", write_key(k)));
            }
            if let Some(c) = &q.increment_condition {
                attr(out, "increment-condition", format!("@({})", write_condition(c)));
            }
            attr(out, "increment-count", q.increment_count);
            let start = serde_json::to_value(q.first_period_start).ok();
            if let Some(serde_json::Value::String(s)) = start {
                attr(out, "first-period-start", s);
            }
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            attr(out, "counter-key", format!("@({})", write_key(&t.counter_key)));
            if let Some(n) = t.tokens_per_minute {
                attr(out, "tokens-per-minute", n);
            }
            if let Some(n) = t.token_quota {
                attr(out, "token-quota", n);
            }
            if let Some(p) = t.token_quota_period {
                if let Ok(serde_json::Value::String(s)) = serde_json::to_value(p) {
                    attr(out, "token-quota-period", s);
                }
            }
            attr(out, "estimate-prompt-tokens", t.estimate_prompt_tokens);
            opt(out, "retry-after-header-name", &t.retry_after_header_name);
            opt(out, "retry-after-variable-name", &t.retry_after_variable_name);
            opt(out, "remaining-tokens-header-name", &t.remaining_tokens_header_name);
            opt(out, "remaining-tokens-variable-name", &t.remaining_tokens_variable_name);
            opt(out, "tokens-consumed-header-name", &t.tokens_consumed_header_name);
            opt(out, "tokens-consumed-variable-name", &t.tokens_consumed_variable_name);
            opt(out, "remaining-quota-tokens-header-name", &t.remaining_quota_tokens_header_name);
            opt(out, "remaining-quota-tokens-variable-name", &t.remaining_quota_tokens_variable_name);
        }
    }
    out.push_str(" />");
}
