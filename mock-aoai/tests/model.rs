//! The behaviour model against Azure's rules, and the config reader's errors.

use gateway_core::Nanos;
use mock_aoai::model::{LimitKind, ModelRequest, ModelResponse, Operation};
use mock_aoai::{DeploymentModel, MockConfig};
use proptest::prelude::*;

fn deployment(extra: &str) -> DeploymentModel {
    let text = format!(
        "[[deployments]]\nname = \"d\"\nmodel = \"gpt-4o\"\ntpm = 6000\ncompletion_tokens = {{ fixed = 50 }}\n{extra}"
    );
    let config = MockConfig::from_toml("test.toml", &text).unwrap();
    DeploymentModel::new(config.deployments[0].clone(), 9, Nanos::ZERO)
}

fn chat(prompt_tokens: u64, max_tokens: Option<u64>) -> ModelRequest {
    ModelRequest {
        operation: Operation::ChatCompletions,
        prompt_tokens,
        max_tokens,
        best_of: None,
        choices: 1,
        generated: 1,
        stream: false,
        completion_tokens: None,
    }
}

proptest! {
    /// Whatever arrives, the admitted cost in any 60 s is at most `tpm` and the
    /// admitted requests in any 10 s at most `rpm / 6`.
    #[test]
    fn admission_never_exceeds_tpm_or_rpm(
        requests in prop::collection::vec((0u64..5_000, 0u64..400, prop::option::of(0u64..2_000)), 1..200),
        rpm in prop::option::of(6u64..600),
    ) {
        let extra = rpm.map_or(String::new(), |r| format!("rpm = {r}\n"));
        let mut model = deployment(&extra);
        let per_10s = model.config().requests_per_10s();
        let mut t = 0;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (gap_ms, prompt, max_tokens) in requests {
            t += gap_ms;
            let req = chat(prompt, max_tokens);
            let cost = model.cost(&req);
            if let ModelResponse::Complete(_) = model.handle_request(Nanos::from_millis(t), &req) {
                admitted.push((t, cost));
            }
        }
        for &(end, _) in &admitted {
            let tokens: u64 = admitted.iter().filter(|a| a.0 + 60_000 > end && a.0 <= end).map(|a| a.1).sum();
            let calls = admitted.iter().filter(|a| a.0 + 10_000 > end && a.0 <= end).count() as u64;
            prop_assert!(tokens <= 6000, "{} tokens in the minute ending at {} ms", tokens, end);
            prop_assert!(calls <= per_10s, "{} requests in the 10 s ending at {} ms", calls, end);
        }
    }
}

#[test]
fn azure_defaults_and_costs() {
    let model = deployment("");
    // 6 RPM per 1,000 TPM: 36 RPM, 6 per 10 s.
    assert_eq!((model.config().rpm(), model.config().requests_per_10s()), (36, 6));
    assert_eq!(model.cost(&chat(100, Some(200))), 300);
    assert_eq!(model.cost(&chat(100, None)), 100 + 4096, "the default allowance when max_tokens is absent");
    let best_of = ModelRequest { best_of: Some(3), ..chat(100, Some(200)) };
    assert_eq!(model.cost(&best_of), 700);
    let embed = ModelRequest { operation: Operation::Embeddings, ..chat(100, Some(200)) };
    assert_eq!(model.cost(&embed), 100);
}

#[test]
fn a_throttled_caller_that_waits_retry_after_is_admitted() {
    let mut model = deployment("rpm = 6000\n");
    let req = chat(1000, Some(1000));
    for i in 0..3 {
        assert!(matches!(model.handle_request(Nanos::from_secs(i), &req), ModelResponse::Complete(_)));
    }
    let ModelResponse::Throttled(t) = model.handle_request(Nanos::from_secs(10), &req) else { panic!() };
    assert_eq!(t.limit, LimitKind::Tokens);
    // The first 2,000 leave the window at 60 s.
    assert_eq!(t.retry_after, Nanos::from_secs(50));
    assert_eq!(t.remaining_tokens, 0);
    let at = Nanos::from_secs(10) + t.retry_after;
    assert!(matches!(model.handle_request(at, &req), ModelResponse::Complete(_)));
}

#[test]
fn requests_are_limited_per_ten_seconds() {
    let mut model = deployment("");
    let req = chat(1, Some(1));
    for _ in 0..6 {
        assert!(matches!(model.handle_request(Nanos::from_secs(1), &req), ModelResponse::Complete(_)));
    }
    let ModelResponse::Throttled(t) = model.handle_request(Nanos::from_secs(2), &req) else { panic!() };
    assert_eq!((t.limit, t.retry_after), (LimitKind::Requests, Nanos::from_secs(9)));
}

#[test]
fn completions_are_capped_by_max_tokens() {
    let mut model = deployment("");
    let ModelResponse::Complete(c) = model.handle_request(Nanos::ZERO, &chat(10, Some(20))) else { panic!() };
    assert_eq!((c.completion_tokens, c.finish_reason), (20, mock_aoai::model::FinishReason::Length));
    let ModelResponse::Complete(c) = model.handle_request(Nanos::ZERO, &chat(10, Some(100))) else { panic!() };
    assert_eq!((c.completion_tokens, c.finish_reason), (50, mock_aoai::model::FinishReason::Stop));
}

#[test]
fn same_seed_same_responses() {
    let faults = "faults = { error_rates = { \"500\" = 0.2 }, broken_stream = 0.3, connection_reset = 0.1 }\n\
                  latency = { ttft_ms = { lognormal = { median = 300, p99 = 2000 } }, per_token_ms = { uniform = { min = 5, max = 30 } } }\n\
                  rpm = 100000\n";
    let run = |seed: u64| {
        let config = MockConfig::from_toml(
            "t",
            &format!("[[deployments]]\nname = \"d\"\nmodel = \"gpt-4o\"\ntpm = 100000000\n{faults}"),
        )
        .unwrap();
        let mut model = DeploymentModel::new(config.deployments[0].clone(), seed, Nanos::ZERO);
        (0..500)
            .map(|i| {
                model
                    .handle_request(Nanos::from_millis(i * 100), &ModelRequest { stream: true, ..chat(100, Some(500)) })
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    let responses = run(1);
    let faults = responses.iter().filter(|r| matches!(r, ModelResponse::Fault { status: 500, .. })).count();
    let resets = responses.iter().filter(|r| matches!(r, ModelResponse::Reset)).count();
    let broken =
        responses.iter().filter(|r| matches!(r, ModelResponse::Complete(c) if c.break_after.is_some())).count();
    // 10% resets; of the rest 20% faults; of those completed 30% broken: loose bounds on 500 draws.
    assert!((30..=70).contains(&resets), "{resets} resets");
    assert!((60..=120).contains(&faults), "{faults} faults");
    assert!((90..=180).contains(&broken), "{broken} broken streams");
}

/// Each request owns its draws: raising a fault rate turns some requests into
/// faults but leaves every other request's latency, length and broken stream as
/// they were.
#[test]
fn a_fault_rate_does_not_reshuffle_other_requests() {
    let run = |error_rate: f64| {
        let config = MockConfig::from_toml(
            "t",
            &format!(
                "[[deployments]]\nname = \"d\"\nmodel = \"gpt-4o\"\ntpm = 100000000\nrpm = 100000000\n\
                 completion_tokens = {{ lognormal = {{ median = 100, p99 = 900 }} }}\n\
                 latency = {{ ttft_ms = {{ lognormal = {{ median = 300, p99 = 2000 }} }}, per_token_ms = {{ normal = {{ mean = 20, std = 5 }} }} }}\n\
                 faults = {{ error_rates = {{ \"503\" = {error_rate} }}, broken_stream = 0.5 }}\n"
            ),
        )
        .unwrap();
        let mut model = DeploymentModel::new(config.deployments[0].clone(), 4, Nanos::ZERO);
        let stream = ModelRequest { stream: true, ..chat(100, None) };
        (0..400).map(|i| model.handle_request(Nanos::from_millis(i * 100), &stream)).collect::<Vec<_>>()
    };
    let (calm, faulty) = (run(0.0), run(0.3));
    let faults = faulty.iter().filter(|r| matches!(r, ModelResponse::Fault { .. })).count();
    assert!((80..=160).contains(&faults), "{faults} faults");
    let mut compared = 0;
    for (a, b) in calm.iter().zip(&faulty) {
        if let (ModelResponse::Complete(a), ModelResponse::Complete(b)) = (a, b) {
            assert_eq!(a, b);
            compared += 1;
        }
    }
    assert_eq!(compared, 400 - faults);
    let lengths: std::collections::BTreeSet<u64> = calm
        .iter()
        .filter_map(|r| match r {
            ModelResponse::Complete(c) => Some(c.completion_tokens),
            _ => None,
        })
        .collect();
    assert!(lengths.len() > 100, "the lengths are drawn, not fixed: {} distinct", lengths.len());
}

#[test]
fn outages_and_spikes_follow_their_schedule() {
    let mut model = deployment(
        "rpm = 100000\nfaults = { outages = [{ start = \"10s\", end = \"20s\", status = 503 }, { start = \"30s\", end = \"40s\", mode = \"hang\" }], \
         latency_spikes = [{ start = \"50s\", end = \"60s\", extra_ms = 5000 }] }\n\
         latency = { ttft_ms = { fixed = 100 }, per_token_ms = { fixed = 0 } }\n",
    );
    let mut at = |s: u64| model.handle_request(Nanos::from_secs(s), &chat(1, Some(1)));
    assert!(matches!(at(5), ModelResponse::Complete(_)));
    assert!(matches!(at(10), ModelResponse::Fault { status: 503, .. }));
    assert!(matches!(at(20), ModelResponse::Complete(_)));
    assert!(matches!(at(35), ModelResponse::Hang));
    let ModelResponse::Complete(c) = at(55) else { panic!() };
    assert_eq!(c.time_to_first_token, Nanos::from_millis(5_100));
}

#[test]
fn bad_configs_name_the_file_line_and_field() {
    let check = |text: &str, needles: &[&str]| {
        let err = MockConfig::from_toml("mocks/bad.toml", text).unwrap_err();
        for needle in needles {
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        }
    };
    let base = "[[deployments]]\nname = \"d\"\nmodel = \"gpt-4o\"\n";
    check(&format!("{base}tpm = 1000\ntmp = 5\n"), &["mocks/bad.toml:5:", "unknown field `tmp`", "tmp = 5"]);
    check(&format!("{base}tpm = -5\n"), &["mocks/bad.toml:4:7", "tpm = -5"]);
    check(
        &format!("{base}tpm = 1000\nfaults = {{ broken_stream = 1.5 }}\n"),
        &["mocks/bad.toml:5:", "between 0 and 1", "broken_stream"],
    );
    check(
        &format!("{base}tpm = 1000\nfaults = {{ error_rates = {{ \"501\" = 0.1 }} }}\n"),
        &[":5:", "\"500\", \"502\""],
    );
    check(&format!("{base}tpm = 0\n"), &["mocks/bad.toml", "deployments[0] (`d`): `tpm` and `rpm` must be at least 1"]);
    check(&format!("{base}tpm = 1000\nrpm = 0\n"), &["`tpm` and `rpm` must be at least 1"]);
    check(&base.replace("name = \"d\"", "name = \"\"").replace("model", "tpm = 1\nmodel"), &["`name` is empty"]);
    check("seed = 1\n", &["mocks/bad.toml", "deployments"]);
}
