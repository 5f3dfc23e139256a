//! Arrival processes produce the traffic they promise, and CSV traces replay like
//! their JSONL twins.

use std::path::Path;

fn calls(arrival: &str) -> u64 {
    let text = format!(
        r#"
name = "arrivals"
start = "2024-01-01T00:00:00Z"
duration = "1h"
seed = 9
[gateway.routing]
set_backend = "b"
backends = [{{ id = "b", url = "http://b" }}]
[[backends]]
name = "b"
model = "gpt-4o"
tpm = 100000000000
rpm = 100000000000
latency = {{ ttft_ms = {{ fixed = 10 }}, per_token_ms = {{ fixed = 0 }} }}
[[clients]]
name = "c"
arrival = {arrival}
retries = {{ max_retries = 0 }}
"#
    );
    let scenario = simulator::Scenario::from_toml("arrivals.toml", &text).unwrap();
    let outcome = simulator::run(&scenario, Path::new("."), None, false).unwrap();
    outcome.report.clients[0].requests
}

#[test]
fn arrivals_come_at_their_rates() {
    let within = |got: u64, expected: f64, tolerance: f64| {
        assert!((got as f64 - expected).abs() <= expected * tolerance, "{got} calls, expected about {expected}");
    };
    // One hour: the last arrival exactly at the end is outside the run.
    assert_eq!(calls("{ constant = { rate_per_s = 2 } }"), 7199);
    within(calls("{ poisson = { rate_per_s = 2 } }"), 7200.0, 0.05);
    within(calls("{ ramp = { from_per_s = 0.5, to_per_s = 3.5 } }"), 7200.0, 0.05);
    // On 5 of every 15 minutes.
    within(calls("{ bursts = { rate_per_s = 6, on = \"5m\", off = \"10m\" } }"), 7200.0, 0.05);
    // Midnight to 1 am with the peak at 12:00: close to the trough.
    let night = calls("{ daily = { peak_per_s = 10, trough_per_s = 1, peak_hour = 12 } }");
    within(night, 3600.0 * (1.0 + 9.0 * (1.0 + (std::f64::consts::TAU * 11.5 / 24.0).cos()) / 2.0), 0.06);
}

/// A rate that falls to zero at the end has a last arrival: the run ends there
/// (its next gap once searched for ever for an instant with a rate above zero).
#[test]
fn a_ramp_down_to_zero_ends() {
    let expected = 3600.0 * 4.0 / 2.0;
    let got = calls("{ ramp = { from_per_s = 4, to_per_s = 0 } }");
    assert!((got as f64 - expected).abs() <= expected * 0.05, "{got} calls, expected about {expected}");
    let dawn = calls("{ daily = { peak_per_s = 4, trough_per_s = 0, peak_hour = 12 } }");
    assert!(dawn > 0, "a daily curve with a zero trough still has arrivals");
}

#[test]
fn a_csv_trace_replays_like_its_jsonl_twin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let jsonl = std::fs::read_to_string(root.join("traces/example.jsonl")).unwrap();
    let mut csv = String::from("t_ms,ip,prompt_tokens,max_tokens,completion_tokens,stream\n");
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let stream = v.get("stream").map_or(String::new(), |s| s.to_string());
        csv += &format!(
            "{},{},{},{},{},{stream}\n",
            v["t_ms"],
            v["ip"].as_str().unwrap(),
            v["prompt_tokens"],
            v["max_tokens"],
            v["completion_tokens"]
        );
    }
    let dir = std::env::temp_dir().join(format!("limitlab-csv-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("example.csv"), csv).unwrap();
    let text = std::fs::read_to_string(root.join("trace-replay.toml")).unwrap();
    let csv_scenario = text.replace("traces/example.jsonl", dir.join("example.csv").to_str().unwrap());
    let run = |text: &str| {
        let label = root.join("trace-replay.toml").display().to_string();
        let scenario = simulator::Scenario::from_toml(&label, text).unwrap();
        let outcome = simulator::run(&scenario, &root, None, true).unwrap();
        outcome.decisions.iter().map(|d| (d.request, d.status, d.reason)).collect::<Vec<_>>()
    };
    // `request` is the 0-based line of the file: in a CSV the header is line 0.
    let shifted: Vec<_> = run(&text).into_iter().map(|(r, s, why)| (r + 1, s, why)).collect();
    assert_eq!(shifted, run(&csv_scenario));
    std::fs::write(dir.join("bad.csv"), "t_ms,ip,promt_tokens\n1,a,2\n").unwrap();
    let err = simulator::trace::load(&dir.join("bad.csv")).unwrap_err();
    assert!(err.contains("bad.csv:1:") && err.contains("did you mean `prompt_tokens`?"), "{err}");
    std::fs::write(dir.join("bad.csv"), "t_ms,ip,prompt_tokens\n1,a,many\n").unwrap();
    let err = simulator::trace::load(&dir.join("bad.csv")).unwrap_err();
    assert!(err.contains("bad.csv:2: `prompt_tokens`: `many` is not a whole number"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `limitlab load` plays `traffic::Plan`: its first calls must be the engine's,
/// call for call (number, client, instant, identity), for every kind of arrival
/// and identity, with a trace among them.
#[test]
fn the_plan_of_a_live_run_is_the_simulations_traffic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    for name in
        ["seed-ip-limits.toml", "seed-jwt-limits.toml", "live-loop.toml", "noisy-neighbour.toml", "trace-replay.toml"]
    {
        let path = dir.join(name);
        let Ok(scenario) = simulator::Scenario::load(&path) else { panic!("{name} loads") };
        let outcome = simulator::run(&scenario, &dir, None, true).unwrap();
        let simulated: Vec<(u64, String, String, String)> = outcome
            .decisions
            .iter()
            .filter(|d| d.attempt == 0)
            .map(|d| (d.request, d.client.clone(), format!("{:.3}", d.arrival_ms), format!("{:?}", d.key)))
            .collect();
        let mut plan = simulator::traffic::Plan::new(&scenario, &dir, scenario.seed).unwrap();
        let mut planned = Vec::new();
        while let Some((at, call)) = plan.next_call() {
            let arrival_ms = (at - scenario.start_nanos()).0 as f64 / 1e6;
            let key = gateway_core::Decision::new(
                gateway_core::decision_log::Caller { request: 0, client: "", attempt: 0, info: &call.info },
                scenario.start_nanos(),
                &empty_record(at),
                gateway_core::Nanos::ZERO,
            )
            .key;
            let client = scenario.clients[call.client].name.clone();
            planned.push((call.request, client, format!("{arrival_ms:.3}"), format!("{key:?}")));
        }
        // The engine leaves calls still in flight at the end out of its log.
        assert!(planned.len() >= simulated.len() && planned.len() <= simulated.len() + 20, "{name}");
        let mut planned_done: Vec<_> = planned.into_iter().filter(|p| simulated.contains(p)).collect();
        planned_done.sort();
        let mut simulated_sorted = simulated.clone();
        simulated_sorted.sort();
        assert_eq!(planned_done, simulated_sorted, "{name}: the plan's calls are the simulation's");
        assert!(!simulated.is_empty(), "{name}");
    }
}

fn empty_record(at: gateway_core::Nanos) -> gateway_core::OutcomeRecord {
    gateway_core::OutcomeRecord {
        arrived: at,
        finished: at,
        attempts: Default::default(),
        status: 200,
        reason: gateway_core::Reason::Ok,
        usage: Default::default(),
    }
}
