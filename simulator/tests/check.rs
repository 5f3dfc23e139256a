//! `limitlab check`: promises against perturbed runs, and shrinking to the smallest case.

use std::path::Path;

const THRESHOLD: &str = r#"
name = "threshold"
start = "2024-01-01T00:00:00Z"
duration = "10m"
seed = 1

[gateway.routing]
set_backend = "b"
backends = [{ id = "b", url = "http://b" }]

[[gateway.policy.limits]]
type = "rate-limit-by-key"
calls = 30
renewal_period = 60
counter_key = "ip"

[[backends]]
name = "b"
model = "gpt-4o"
tpm = 100000000
rpm = 100000000
latency = { ttft_ms = { fixed = 10 }, per_token_ms = { fixed = 0 } }

[[clients]]
name = "steady"
arrival = { constant = { rate_per_s = 1 } }
retries = { max_retries = 0 }

[[expect]]
never_rejected = "steady"

[check]
rate_scale = [0.2, 2.0]
"#;

#[test]
fn a_failure_shrinks_to_the_smallest_rate_that_breaks_the_promise() {
    // 30 calls per 60 s: a steady caller is refused once it sends more than one
    // call every two seconds, so the smallest failing rate factor is just above 0.5.
    let scenario = simulator::Scenario::from_toml("threshold.toml", THRESHOLD).unwrap();
    let failure = simulator::check::check(&scenario, Path::new("."), 64, 1).unwrap().expect("rates up to 2x break it");
    assert!((0.5..0.52).contains(&failure.case.rate_scale), "shrunk to {:?}", failure.case);
    assert_eq!(failure.promise, "client `steady` is never rejected");
    assert!(failure.measured > 0.0);
    // The written case reproduces the failure with `limitlab simulate`.
    let again = simulator::Scenario::from_toml("case.toml", &failure.scenario).unwrap();
    let report = simulator::run(&again, Path::new("."), None, false).unwrap().report;
    assert_eq!(report.clients[0].rejected_ratio, failure.measured);
}

#[test]
fn the_shipped_example_holds_and_the_raised_limit_breaks_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let base = simulator::Scenario::load(&dir.join("tenant-tpm.toml")).unwrap();
    assert_eq!(simulator::check::check(&base, &dir, 40, 1).unwrap(), None);
    let raised = simulator::Scenario::load(&dir.join("tenant-tpm-raised.toml")).unwrap();
    let failure = simulator::check::check(&raised, &dir, 40, 1).unwrap().expect("the raised limit breaks a promise");
    assert!(failure.promise.contains("chat"), "{}", failure.promise);
}

#[test]
fn the_same_seed_finds_the_same_case() {
    let scenario = simulator::Scenario::from_toml("threshold.toml", THRESHOLD).unwrap();
    let a = simulator::check::check(&scenario, Path::new("."), 32, 7).unwrap();
    let b = simulator::check::check(&scenario, Path::new("."), 32, 7).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_promises_are_refused() {
    let bad = THRESHOLD.replace("never_rejected = \"steady\"", "figure = \"client.stedy.rejected_ratio\"\nat_most = 0");
    let scenario = simulator::Scenario::from_toml("bad.toml", &bad).unwrap();
    let err = simulator::check::check(&scenario, Path::new("."), 1, 1).unwrap_err();
    assert!(err.contains("client.steady.rejected_ratio"), "{err}");
}

#[test]
fn no_key_gets_more_tokens_per_minute_than_promised() {
    // 30 admitted calls per minute of 200 + 100 tokens: 9,000 tokens in a minute.
    let with = |at_most: u64| {
        THRESHOLD
            .replace(
                "never_rejected = \"steady\"",
                &format!("figure = \"max_key_tokens_per_minute\"\nat_most = {at_most}"),
            )
            .replace("rate_scale = [0.2, 2.0]", "rate_scale = [1.0, 1.0]")
    };
    let holds = simulator::Scenario::from_toml("t.toml", &with(9000)).unwrap();
    assert_eq!(simulator::check::check(&holds, Path::new("."), 4, 1).unwrap(), None);
    let breaks = simulator::Scenario::from_toml("t.toml", &with(8999)).unwrap();
    let failure = simulator::check::check(&breaks, Path::new("."), 4, 1).unwrap().expect("9,000 > 8,999");
    assert_eq!(failure.measured, 9000.0);
}

#[test]
fn perturbations_pack_arrivals_into_bursts_and_move_faults() {
    let text = THRESHOLD.replace(
        "latency = { ttft_ms = { fixed = 10 }, per_token_ms = { fixed = 0 } }",
        "latency = { ttft_ms = { fixed = 10 }, per_token_ms = { fixed = 0 } }\nfaults = { outages = [{ start = \"60s\", end = \"120s\" }] }",
    );
    let scenario = simulator::Scenario::from_toml("threshold.toml", &text).unwrap();
    let case =
        simulator::check::Case { rate_scale: 1.0, token_scale: 1.0, burstiness: 4.0, fault_shift_s: 30, seed: 1 };
    let moved = simulator::check::perturb(&scenario, case);
    let simulator::scenario::Arrival::Bursts { rate_per_s, on, off } = &moved.clients[0].arrival else { panic!() };
    assert_eq!((*rate_per_s, on.0.as_secs_f64(), off.0.as_secs_f64()), (4.0, 15.0, 45.0));
    let outage = &moved.backends[0].faults.outages[0];
    assert_eq!((outage.start.0.as_secs_f64(), outage.end.0.as_secs_f64()), (90.0, 150.0));
    // The same average rate: as many calls, packed into a quarter of each minute.
    let calm = simulator::run(&scenario, Path::new("."), None, false).unwrap().report;
    let bursty = simulator::run(&moved, Path::new("."), None, false).unwrap().report;
    let (a, b) = (calm.clients[0].requests as f64, bursty.clients[0].requests as f64);
    assert!((a - b).abs() / a < 0.1, "{a} calls calm, {b} bursty (Poisson within bursts)");
}
