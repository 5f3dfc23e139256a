//! Exactness: `scenarios/trace-replay.toml` through the simulator, every decision
//! checked against a reference model of the seed policy written here, independently
//! of gateway-core: per IP, 10 calls per sliding 60 s (counted on arrival), 100
//! calls per clock hour counted when a 2xx response completes, and 5,000 tokens per
//! sliding minute counted when the response completes. Backends answer in exactly
//! 1 s and never fail; arrivals at an instant go before completions at it.

use std::collections::BTreeMap;
use std::path::Path;

#[derive(serde::Deserialize)]
struct Line {
    t_ms: u64,
    ip: String,
    prompt_tokens: u64,
    max_tokens: u64,
    completion_tokens: u64,
}

#[derive(Default)]
struct Ip {
    calls_ms: Vec<u64>,
    /// (completion instant, tokens) of admitted requests.
    completions: Vec<(u64, u64)>,
}

fn reference(lines: &[Line]) -> Vec<(u16, &'static str)> {
    let mut ips: BTreeMap<&str, Ip> = BTreeMap::new();
    lines
        .iter()
        .map(|l| {
            let ip = ips.entry(&l.ip).or_default();
            let t = l.t_ms;
            if ip.calls_ms.iter().filter(|&&c| c + 60_000 > t).count() >= 10 {
                return (429, "rate-limit");
            }
            ip.calls_ms.push(t);
            // The scenario starts at 09:00 and lasts 10 minutes: one quota hour.
            if ip.completions.iter().filter(|c| c.0 < t).count() + 1 > 100 {
                return (403, "quota");
            }
            let tokens: u64 = ip.completions.iter().filter(|c| c.0 < t && c.0 + 60_000 > t).map(|c| c.1).sum();
            if tokens >= 5000 {
                return (429, "token-limit");
            }
            ip.completions.push((t + 1000, l.prompt_tokens + l.completion_tokens.min(l.max_tokens)));
            (200, "ok")
        })
        .collect()
}

#[test]
fn trace_replay_matches_the_reference_model_decision_by_decision() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let text = std::fs::read_to_string(root.join("traces/example.jsonl")).unwrap();
    let mut lines: Vec<(usize, Line)> =
        text.lines().enumerate().map(|(i, l)| (i, serde_json::from_str(l).unwrap())).collect();
    lines.sort_by_key(|(i, l)| (l.t_ms, *i));
    let order: Vec<usize> = lines.iter().map(|(i, _)| *i).collect();
    let lines: Vec<Line> = lines.into_iter().map(|(_, l)| l).collect();
    let expected = reference(&lines);

    let scenario = simulator::Scenario::load(&root.join("trace-replay.toml")).unwrap();
    let outcome = simulator::run(&scenario, &root, None, true).unwrap();
    assert_eq!(outcome.decisions.len(), lines.len(), "one decision per trace line");
    let mut kinds = BTreeMap::new();
    for (k, d) in outcome.decisions.iter().enumerate() {
        assert_eq!(d.request, order[k] as u64, "decision {k} is for trace line {}", order[k]);
        assert_eq!(
            (d.status, d.reason),
            expected[k],
            "trace line {} at {} ms ({})",
            d.request,
            d.arrival_ms,
            lines[k].ip
        );
        *kinds.entry(d.reason).or_insert(0) += 1;
    }
    // The trace exercises more than one limit, or the test would prove little.
    assert!(kinds.len() >= 3, "{kinds:?}");
}
