//! Criterion benchmarks of one request with one retry and a failover (the seed
//! article's `<backend>` section), no I/O: the router alone, and the whole
//! lifecycle through `Lifecycle` (limits, attempts, delivery, token books, record).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway_core::routing::{AttemptOutcome, Next, Router, Routing};
use gateway_core::{Delivery, Lifecycle, Nanos, Policy, RequestInfo, Step, Usage};
use std::hint::black_box;

const SEED: &str = include_str!("../../policies/seed-failover-routing.toml");

fn failover(c: &mut Criterion) {
    let routing: Routing = toml::from_str(SEED).expect("bench routing parses");
    let mut router = Router::new(routing).expect("valid");
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("request_with_one_failover", |b| {
        let mut now = Nanos::from_secs(1_700_000_000);
        let mut draw = 0x9e37_79b9_7f4a_7c15u64;
        b.iter(|| {
            now = now + Nanos::from_millis(1);
            draw = draw.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (mut route, first) = router.start(now, draw).expect("no breakers");
            let throttled = AttemptOutcome::Response { status: 429, retry_after: None };
            let Next::Retry { attempt, wait } = router.handle_outcome(now, &mut route, &first.backend, throttled, draw)
            else {
                unreachable!("429 is retried")
            };
            let ok = AttemptOutcome::Response { status: 200, retry_after: None };
            black_box(router.handle_outcome(now + wait, &mut route, &attempt.backend, ok, draw))
        });
    });
    group.finish();
}

/// The seed article's per-IP limits and token limit in front of its failover.
const SEED_LIMITS: &str = include_str!("../../policies/seed-ip-limits.toml");

fn lifecycle(c: &mut Criterion) {
    let routing: Routing = toml::from_str(SEED).expect("bench routing parses");
    let policy = Policy::from_toml(SEED_LIMITS).expect("bench policy parses");
    let mut pipeline = Lifecycle::new(&policy, routing, 1).expect("valid");
    let requests: Vec<RequestInfo> = (0..10_000u32)
        .map(|i| RequestInfo {
            ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            prompt_tokens_estimate: Some(200),
            ..Default::default()
        })
        .collect();
    let mut group = c.benchmark_group("lifecycle");
    group.throughput(Throughput::Elements(1));
    // Criterion calls the routine once per sample: the clock lives outside it, as
    // the pipeline's state does, so time keeps moving forward.
    let mut now = Nanos::from_secs(1_700_000_000);
    let mut draw = 0x9e37_79b9_7f4a_7c15u64;
    let mut i = 0;
    group.bench_function("request_with_one_failover_10k_keys", |b| {
        b.iter(|| {
            // Each key comes back every 10,000 requests (about 1,000 s): far below
            // its limits, so every iteration runs the whole lifecycle.
            now = now + Nanos::from_millis(100);
            draw = draw.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            i = (i + 1) % requests.len();
            let step = pipeline.handle_request(now, &requests[i], draw);
            let Step::Forward { id, .. } = step else { unreachable!("each key is far below its limits: {step:?}") };
            let throttled = AttemptOutcome::Response { status: 429, retry_after: None };
            let Ok(Step::Wait { .. }) = pipeline.handle_attempt(now, id, throttled, Usage::default(), draw) else {
                unreachable!("429 is retried on the secondary after the retry interval")
            };
            // The retry's instant is the lifecycle's; at it, the retry is sent.
            let at = pipeline.poll_timeout_of(id).expect("the retry's instant");
            let Some(Step::Forward { .. }) = pipeline.handle_timeout_of(at, id, draw) else {
                unreachable!("the retry goes out at its instant")
            };
            let ok = AttemptOutcome::Response { status: 200, retry_after: None };
            let Ok(Step::Deliver { .. }) = pipeline.handle_attempt(at, id, ok, Usage::default(), draw) else {
                unreachable!("200 is delivered")
            };
            let usage = Usage { prompt_tokens: 200, completion_tokens: 100 };
            now = at;
            black_box(pipeline.handle_delivered(at, id, Delivery { usage, ..Default::default() }))
        });
    });
    group.finish();
}

// No plots: criterion's plotters backend panics on machines without system fonts
// (servers, CI images), and the figures are in the terminal output anyway.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = failover, lifecycle
}
criterion_main!(benches);
