//! Criterion benchmarks of gateway-core decisions (no I/O).
//!
//! Each iteration is one request through `handle_request` plus its
//! `handle_response`, on keys drawn round-robin from 10,000 active ones, with the
//! clock advancing 1 ms per request so every key is seen every 10 simulated seconds.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway_core::{LimitBook, Nanos, Policy, RequestDecision, RequestInfo, ResponseInfo};
use std::hint::black_box;

const KEYS: usize = 10_000;

fn requests() -> Vec<RequestInfo> {
    (0..KEYS)
        .map(|i| RequestInfo { ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255), ..Default::default() })
        .collect()
}

/// One decision and its completion; returns whether the request was admitted.
fn decide(gw: &mut LimitBook, now: Nanos, req: &RequestInfo) -> bool {
    match gw.handle_request(now, req) {
        RequestDecision::Forward(a) => {
            let info = ResponseInfo { status: Some(200), total_tokens: 30, ..ResponseInfo::default() };
            black_box(gw.handle_response(now, a.id, &info).expect("in flight"));
            true
        }
        RequestDecision::Reject(r) => {
            black_box(r);
            false
        }
    }
}

fn bench_policy(c: &mut Criterion, name: &str, policy_toml: &str) {
    let policy = Policy::from_toml(policy_toml).expect("bench policy parses");
    let reqs = requests();
    let mut group = c.benchmark_group("decision_10k_keys");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::from_parameter(name), |b| {
        let mut gw = LimitBook::new(&policy, 42);
        let mut now = Nanos::from_secs(1_700_000_000);
        // Warm every key so the maps hold 10,000 live counters.
        for req in &reqs {
            decide(&mut gw, now, req);
        }
        let mut i = 0;
        b.iter(|| {
            now = now + Nanos::from_millis(1);
            i = (i + 1) % KEYS;
            decide(&mut gw, now, black_box(&reqs[i]))
        });
        assert!(gw.counter_count() <= KEYS * policy.limits.len(), "one counter per active key and limit at most");
    });
    group.finish();
}

fn limits(c: &mut Criterion) {
    let rate = |calls: u32, algorithm: &str| {
        format!("[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = {calls}\nrenewal_period = 60\ncounter_key = \"ip\"\nalgorithm = \"{algorithm}\"\n")
    };
    bench_policy(c, "rate_limit_sliding_admit", &rate(10, "sliding-window"));
    bench_policy(c, "rate_limit_sliding_mostly_reject", &rate(1, "sliding-window"));
    bench_policy(c, "rate_limit_bucket_admit", &rate(10, "token-bucket"));
    bench_policy(
        c,
        "token_limit_tpm",
        "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 5000\n",
    );
    let seed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/seed-ip-limits.toml"))
        .expect("seed policy");
    bench_policy(c, "seed_policy_three_limits", &seed);
}

// No plots: criterion's plotters backend panics on machines without system fonts
// (servers, CI images), and the figures are in the terminal output anyway.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = limits
}
criterion_main!(benches);
