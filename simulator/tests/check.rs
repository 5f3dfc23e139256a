//! `aigw check`: promises against perturbed runs, and shrinking to the smallest case.

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
    // The written case reproduces the failure with `aigw simulate`.
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
