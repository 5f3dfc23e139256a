//! Latency figures are over calls that reached a backend; refusals have figures
//! of their own (report schema 2).

use simulator::report::SCHEMA_VERSION;
use simulator::Scenario;
use std::path::Path;

fn report(name: &str) -> simulator::Report {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name);
    let scenario = Scenario::load(&path).unwrap();
    simulator::run(&scenario, path.parent().unwrap(), None, true).unwrap().report
}

#[test]
fn a_refusal_is_not_a_latency_and_has_figures_of_its_own() {
    assert_eq!(SCHEMA_VERSION, 2);
    let report = report("seed-ip-limits.toml");
    let power = report.clients.iter().find(|c| c.name == "power-user").unwrap();
    let limits = ["rate-limit", "quota", "bandwidth-quota", "token-limit", "token-quota", "no-backend"];
    let refused: u64 = limits.iter().filter_map(|r| power.by_reason.get(r)).sum();
    assert!(refused > power.requests / 2, "the power user is mostly refused: {refused} of {}", power.requests);
    assert_eq!(power.refused, refused);
    assert_eq!(power.served + power.refused, power.requests);
    assert!((power.refused_ratio - refused as f64 / power.requests as f64).abs() < 1e-12);
    // Served calls wait for a backend (hundreds of ms at least); the instant
    // refusals, counted before, put the p50 at 0 ms and the CDF's foot at 40%.
    let (q0, min_ms) = power.latency_ms_cdf[0];
    assert_eq!(q0, 0.0);
    assert!(min_ms >= 100.0, "the fastest served call: {min_ms} ms");
    assert!(power.latency_ms_p50.unwrap() >= min_ms);
    // The rate limit's 429s said when to come back: within its 60 s window.
    let (p50, max) = (power.retry_after_s_p50.unwrap(), power.retry_after_s_max.unwrap());
    assert!((1.0..=60.0).contains(&p50) && max >= p50, "retry-after p50 {p50} s, max {max} s");
}

#[test]
fn a_client_never_served_has_no_latency_rather_than_zero() {
    // Both clients share one address and its single call an hour (a quota); `early` makes
    // it at 0.1 s, so every call of `late` is refused.
    let mut text = String::from(
        "name = \"t\"\nstart = \"2024-01-01T00:00:00Z\"\nduration = \"1m\"\nseed = 1\n\
         [[gateway.policy.limits]]\ntype = \"quota-by-key\"\ncalls = 1\nrenewal_period = 3600\ncounter_key = \"ip\"\n\
         [gateway.routing]\nset_backend = \"b\"\nbackends = [{ id = \"b\", url = \"http://b\" }]\n\
         [[backends]]\nname = \"b\"\nmodel = \"gpt-4o\"\ntpm = 1000000\n",
    );
    for (name, rate) in [("early", 10), ("late", 1)] {
        text += &format!(
            "[[clients]]\nname = \"{name}\"\ncallers = 1\nip = \"10.9.9.9\"\narrival = {{ constant = {{ rate_per_s = {rate} }} }}\n\
             prompt_tokens = {{ fixed = 10 }}\ncompletion_tokens = {{ fixed = 10 }}\nretries = {{ max_retries = 0 }}\n"
        );
    }
    let scenario = Scenario::from_toml("t.toml", &text).unwrap();
    let report = simulator::run(&scenario, Path::new("."), None, false).unwrap().report;
    let late = report.clients.iter().find(|c| c.name == "late").unwrap();
    assert_eq!((late.served, late.refused), (0, late.requests));
    assert!(late.requests > 50, "{}", late.requests);
    assert_eq!(late.latency_ms_p50, None);
    assert_eq!(late.latency_ms_p99, None);
    assert!(late.latency_ms_cdf.is_empty());
    let json = serde_json::to_value(late).unwrap();
    assert!(json["latency_ms_p95"].is_null(), "{json}");
    // Its summary row says so, rather than 0.0 ms.
    let row = report.summary().lines().find(|l| l.starts_with("late")).unwrap().to_owned();
    assert!(row.trim_end().ends_with('-'), "{row}");
}

/// The per-key token limit is drawn against a per-key figure: the busiest caller
/// key's tokens in each minute, which never exceeds the client's sum.
#[test]
fn the_busiest_key_per_minute_is_a_per_key_figure() {
    let report = report("seed-ip-limits.toml");
    let power = report.clients.iter().position(|c| c.name == "power-user").unwrap();
    let mut peak = 0;
    for m in &report.minutes {
        assert_eq!(m.busiest_key_tokens.len(), report.clients.len());
        for c in 0..report.clients.len() {
            assert!(
                m.busiest_key_tokens[c] <= m.client_tokens[c],
                "minute {}: one key above its client's sum",
                m.minute
            );
        }
        peak = peak.max(m.busiest_key_tokens[power]);
    }
    // The power user is one IP and reaches the 5,000-token limit. A fixed minute
    // spans parts of two sliding ones, and without `estimate_prompt_tokens` APIM
    // admits every call while the counted tokens (charged at completion) are
    // below the limit, so a burst in flight passes it: the figure shows by how much.
    assert!((5_000..=20_000).contains(&peak), "the power user's busiest minute: {peak} tokens");
    let charts = simulator::plots::charts(
        &Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/seed-ip-limits.toml")).unwrap(),
        &report,
    );
    let tokens = charts.iter().find(|c| c.file == "client-tokens").unwrap();
    assert!(tokens.title.starts_with("Busiest caller key"), "{}", tokens.title);
    assert_eq!(tokens.limits.len(), 1, "the per-key limit, drawn against per-key lines");
}
