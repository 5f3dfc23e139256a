//! `limitlab sweep`: values, paths, SLOs, the recommendation rule, and determinism
//! whatever the number of threads.

use simulator::sweep::{self, parse_slo, parse_vary, recommend, Point, SweepOptions};
use std::collections::BTreeMap;
use std::path::Path;

fn scenario() -> (simulator::Scenario, std::path::PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/seed-ip-limits.toml");
    (simulator::Scenario::load(&path).unwrap(), path.parent().unwrap().to_owned())
}

#[test]
fn values_are_lists_or_ranges_with_a_step() {
    assert_eq!(parse_vary("a.b=1000,2000,5000").unwrap().values, [1000.0, 2000.0, 5000.0]);
    assert_eq!(parse_vary("a.b=1000..5000:1000").unwrap().values, [1000.0, 2000.0, 3000.0, 4000.0, 5000.0]);
    assert_eq!(parse_vary("a.b=0.1..0.3:0.1").unwrap().values.len(), 3);
    for bad in ["a.b", "a.b=1..5", "a.b=5..1:1", "a.b=1..5:0", "a.b=x,2"] {
        assert!(parse_vary(bad).is_err(), "{bad}");
    }
}

#[test]
fn slos_name_figures_with_either_latency_spelling() {
    let s = parse_slo("client.office.latency_p99_ms<=4000").unwrap();
    assert_eq!((s.figure.as_str(), s.bound), ("client.office.latency_ms_p99", 4000.0));
    assert!(parse_slo("rejected_ratio=0.1").is_err());
    let (scenario, _) = scenario();
    let err = sweep::check_slos(&scenario, &[parse_slo("client.ofice.rejected_ratio<=0.1").unwrap()]).unwrap_err();
    assert!(err.contains("client.office.rejected_ratio"), "{err}");
}

#[test]
fn paths_reach_backends_clients_and_policy_limits() {
    let (scenario, _) = scenario();
    let s = sweep::apply(&scenario, "backends.primary.tpm", 12345.0).unwrap();
    assert_eq!(s.backends[0].tpm, 12345);
    let s = sweep::apply(&scenario, "clients.office.rate_per_s", 0.75).unwrap();
    assert_eq!(s.clients[0].arrival, simulator::scenario::Arrival::Poisson { rate_per_s: 0.75 });
    let s = sweep::apply(&scenario, "gateway.policy.token_limit.tokens_per_minute", 777.0).unwrap();
    let gateway_core::Limit::AzureOpenAiTokenLimit(t) = &s.gateway.policy().limits[2] else { panic!() };
    assert_eq!(t.tokens_per_minute, Some(777));
    let s = sweep::apply(&scenario, "gateway.policy.rate_limit.calls", 30.0).unwrap();
    let gateway_core::Limit::RateLimitByKey(r) = &s.gateway.policy().limits[0] else { panic!() };
    assert_eq!(r.calls, 30);
    let err = sweep::apply(&scenario, "backends.primary.tmp", 1.0).unwrap_err();
    assert!(err.contains("nearest valid paths: backends.primary.tpm"), "{err}");
    let err = sweep::apply(&scenario, "gateway.policy.rate_limit.calls", 0.0).unwrap_err();
    assert!(err.contains("calls"), "a value the policy refuses is an error: {err}");
}

fn point(values: &[f64], passes: bool) -> Point {
    Point {
        values: values.to_vec(),
        figures: BTreeMap::new(),
        slo_pass_rate: if passes { 1.0 } else { 0.0 },
        passes,
        margins: Vec::new(),
        simulated_requests: 0,
    }
}

#[test]
fn the_recommendation_is_the_cheapest_passing_point_in_flag_order() {
    let points =
        [point(&[1.0, 9.0], false), point(&[2.0, 5.0], true), point(&[2.0, 1.0], true), point(&[3.0, 0.0], true)];
    // The first --vary matters most: 2 beats 3 however small the second value.
    assert_eq!(recommend(&points), Some(2));
    assert_eq!(recommend(&[point(&[1.0], false), point(&[2.0], false)]), None, "no point is an answer, not an error");
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let (scenario, base) = scenario();
    let run = |jobs: usize| {
        let options = SweepOptions {
            varies: vec![parse_vary("backends.primary.tpm=10000..40000:10000").unwrap()],
            seeds: 3,
            slos: vec![parse_slo("backend.primary.throttled_ratio<=0.05").unwrap()],
            jobs,
            pass_share: 0.95,
        };
        serde_json::to_string(&sweep::sweep(&scenario, &base, &options, &|_, _| {}).unwrap()).unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}
