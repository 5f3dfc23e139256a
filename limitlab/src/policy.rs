//! `limitlab policy check` and `limitlab policy import`: what limitlab understands of APIM
//! policy files.

use anyhow::Result;
use apim_policy::{PolicyDocument, ReadOptions};
use gateway_core::routing::Retry;
use gateway_core::{KeyExpr, Limit};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

pub fn options(strict: bool, named: &[String]) -> Result<ReadOptions> {
    let mut named_values = BTreeMap::new();
    for pair in named {
        let (k, v) = pair.split_once('=').ok_or_else(|| anyhow::anyhow!("`{pair}`: use --named-value NAME=VALUE"))?;
        named_values.insert(k.to_owned(), v.to_owned());
    }
    Ok(ReadOptions { strict, named_values })
}

/// A policy file, or every error in it, in file order, each as one located
/// line and the offending source line. A `.toml` file is a native policy (its
/// limits only); anything else is read as APIM policy XML, as `decide`,
/// scenarios and the proxy config read them.
pub fn load(path: &Path, options: &ReadOptions) -> Result<PolicyDocument, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let shown = path.display().to_string();
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
        let policy = gateway_core::Policy::from_toml_file(&shown, &text)?;
        return Ok(PolicyDocument { policy, ..PolicyDocument::default() });
    }
    apim_policy::read_all(&text, options)
        .map_err(|errors| errors.iter().map(|d| d.render(&shown, &text)).collect::<Vec<_>>().join("\n"))
}

/// Exit status 0 when every file is understood, 2 otherwise (errors on stderr as
/// `FILE:LINE:COL: message`).
pub fn check(files: &[PathBuf], options: &ReadOptions) -> Result<bool> {
    let mut ok = true;
    for path in files {
        match load(path, options) {
            Ok(doc) => {
                for w in &doc.warnings {
                    eprintln!("{}:{w} (warning)", path.display());
                }
                say_raw!("{}", summary(path, &doc));
            }
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// The equivalent native TOML: the limits, loadable as a policy file, then the
/// backend side as comments to paste into a scenario's `[gateway.routing]` or the
/// proxy's `[routing]`.
pub fn import(path: &Path, options: &ReadOptions) -> Result<bool> {
    let doc = match load(path, options) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("{e}");
            return Ok(false);
        }
    };
    for w in &doc.warnings {
        eprintln!("{}:{w} (warning)", path.display());
    }
    say!("# Imported from {} by limitlab policy import.", path.display());
    say_raw!("{}", toml::to_string(&doc.policy)?);
    let mut routing = toml::Table::new();
    if let Some(b) = &doc.backend_id {
        routing.insert("set_backend".into(), b.as_str().into());
    }
    if let Some(r) = &doc.retry {
        routing.insert("retry".into(), toml::Value::try_from(r)?);
    }
    if let Some(t) = doc.timeout {
        routing.insert("timeout".into(), (t as i64).into());
    }
    if !routing.is_empty() {
        say!("\n# The backend side, for [gateway.routing] (scenarios) or [routing] (proxy):");
        for line in toml::to_string(&routing)?.lines() {
            say!("# {line}");
        }
    }
    Ok(true)
}

fn key(k: &KeyExpr) -> String {
    match k {
        KeyExpr::Ip => "client IP".into(),
        KeyExpr::SubscriptionId => "subscription id".into(),
        KeyExpr::SubscriptionKey => "subscription key".into(),
        KeyExpr::SubscriptionName => "subscription name".into(),
        KeyExpr::Product => "product".into(),
        KeyExpr::Header { name, .. } => format!("header {name}"),
        KeyExpr::Jwt { claim, header, .. } => format!("JWT claim {claim} of {header}"),
        KeyExpr::Const(c) => format!("\"{c}\""),
        KeyExpr::Concat(parts) => parts.iter().map(key).collect::<Vec<_>>().join(" + "),
    }
}

fn describe_limit(l: &Limit) -> String {
    match l {
        Limit::RateLimit(r) | Limit::RateLimitByKey(r) => {
            let by = r.counter_key.as_ref().map_or("subscription id".into(), key);
            let when = r.increment_condition.as_ref().map_or(String::new(), |c| format!(", counted on {c}"));
            format!("{} calls per {} s by {by}{when}", r.calls, r.renewal_period)
        }
        Limit::Quota(q) | Limit::QuotaByKey(q) => {
            let by = q.counter_key.as_ref().map_or("subscription id".into(), key);
            let mut parts = Vec::new();
            if let Some(c) = q.calls {
                parts.push(format!("{c} calls"));
            }
            if let Some(b) = q.bandwidth {
                parts.push(format!("{b}"));
            }
            let when = q.increment_condition.as_ref().map_or(String::new(), |c| format!(", counted on {c}"));
            format!("{} per {} s by {by}{when}", parts.join(" and "), q.renewal_period)
        }
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            let mut parts = Vec::new();
            if let Some(n) = t.tokens_per_minute {
                parts.push(format!("{n} tokens per minute"));
            }
            if let (Some(q), Some(p)) = (t.token_quota, t.token_quota_period) {
                parts.push(format!("{q} tokens per {p:?} period"));
            }
            let estimate = if t.estimate_prompt_tokens { ", prompt estimated before forwarding" } else { "" };
            format!("{} by {}{estimate}", parts.join(" and "), key(&t.counter_key))
        }
    }
}

fn describe_retry(r: &Retry) -> String {
    let wait = match (r.delta, r.max_interval) {
        (None, _) => format!("{} s each", r.interval),
        (Some(d), None) => format!("{} + (n - 1)·{d} s before retry n", r.interval),
        (Some(d), Some(m)) => {
            format!("min({m}, {} + (2^(n-1) - 1)·{d}·u) s before retry n, u in [0.8, 1.2)", r.interval)
        }
    };
    let fast = if r.first_fast_retry { "; the first retry at once" } else { "" };
    let mut out = format!("on {}: up to {} retries, {wait}{fast}", r.condition, r.count);
    for s in &r.switch {
        let _ = write!(out, "; on {} switch to {}", s.when, s.backend);
    }
    out
}

fn summary(path: &Path, doc: &PolicyDocument) -> String {
    let mut out = format!("{}: understood\n  limits, in order:\n", path.display());
    for l in &doc.policy.limits {
        let _ = writeln!(out, "    {}: {}", l.element(), describe_limit(l));
    }
    if doc.policy.limits.is_empty() {
        out.push_str("    (none)\n");
    }
    match (&doc.backend_id, &doc.base_url) {
        (Some(b), _) => {
            let _ = writeln!(out, "  backend: {b}");
        }
        (None, Some(u)) => {
            let _ = writeln!(out, "  backend: {u}");
        }
        _ => out.push_str("  backend: the configuration's `set_backend`\n"),
    }
    if let Some(r) = &doc.retry {
        let _ = writeln!(out, "  retry: {}", describe_retry(r));
    }
    if let Some(t) = doc.timeout {
        let _ = writeln!(out, "  timeout: {t} s per attempt");
    }
    for h in &doc.set_headers {
        let _ = writeln!(out, "  set-header: {} ({})", h.name, h.exists_action);
    }
    if let Some(m) = &doc.managed_identity {
        let _ = writeln!(out, "  managed identity for {m}: the backends' configured credentials are used");
    }
    for m in &doc.token_metrics {
        let _ = writeln!(out, "  {}: dimensions {}", m.element, m.dimensions.join(", "));
    }
    out
}
