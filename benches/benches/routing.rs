//! Criterion benchmark of the routing decisions of one request with one retry and
//! a failover (the seed article's `<backend>` section), no I/O.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway_core::routing::{AttemptOutcome, Next, Router, Routing};
use gateway_core::Nanos;
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

criterion_group!(benches, failover);
criterion_main!(benches);
