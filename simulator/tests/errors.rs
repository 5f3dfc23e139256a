//! Bad scenarios and traces: the file, line, column and field, and a suggestion.

use std::path::Path;

fn error(text: &str) -> String {
    simulator::Scenario::from_toml("scenarios/bad.toml", text).unwrap_err()
}

const GOOD: &str = include_str!("../../scenarios/replicas-local.toml");

#[test]
fn the_shipped_example_is_good() {
    simulator::Scenario::from_toml("replicas-local.toml", GOOD).unwrap();
}

#[test]
fn errors_name_the_place_and_suggest_the_closest_name() {
    let check = |text: String, needles: &[&str]| {
        let err = error(&text);
        for needle in needles {
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        }
    };
    check(
        GOOD.replace("callers = 1", "calers = 1"),
        &["scenarios/bad.toml:", "unknown field `calers`", "did you mean `callers`?"],
    );
    check(GOOD.replace("constant = {", "constnat = {"), &["unknown variant `constnat`", "did you mean `constant`?"]);
    check(GOOD.replace("tpm = 1000000", "tpm = -1"), &["scenarios/bad.toml:", "tpm = -1"]);
    check(
        GOOD.replace("duration = \"10m\"", "duration = \"10 parsecs\""),
        &["scenarios/bad.toml:7:12:", "duration unit"],
    );
    check(
        GOOD.replace("set_backend = \"aoai\"", "set_backend = \"aoia\""),
        &["`aoia` is neither a backend nor a pool"],
    );
    check(GOOD.replace("rate_per_s = 1", "rate_per_s = 0"), &["arrival rates must be above 0"]);
    for n in ["0", "129"] {
        check(
            GOOD.replace("callers = 1", &format!("callers = 1\nn = {n}")),
            &["clients[0]", "`n` must be from 1 to 128"],
        );
    }
    // Backends are checked as the mock checks its deployments.
    check(GOOD.replace("tpm = 1000000", "tpm = 0"), &["backends[0] (`aoai`): `tpm` and `rpm` must be at least 1"]);
    // The simulated clock counts nanoseconds from 1970 in 64 bits: it ends in 2554
    // (this scenario lasts 10 minutes).
    // A scenario past that end would otherwise run with every instant clamped to it.
    let start = GOOD.lines().find(|l| l.starts_with("start = ")).expect("a start line");
    check(GOOD.replace(start, "start = \"9999-12-31T00:00:00Z\""), &["`start`", "after 2554-07-21T23:34:33Z"]);
    check(GOOD.replace(start, "start = \"1969-12-31T23:59:59Z\""), &["`start`", "before 1970-01-01T00:00:00Z"]);
    check(
        GOOD.replace(start, "start = \"2554-07-21T23:30:00Z\""),
        &["`start` plus `duration` ends after 2554-07-21T23:34:33Z"],
    );
}

#[test]
fn trace_errors_name_the_line_and_field() {
    let dir = std::env::temp_dir().join(format!("limitlab-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.jsonl");
    std::fs::write(&trace, "{\"t_ms\": 1, \"ip\": \"a\"}\n{\"t_ms\": 2, \"prompt_tokns\": 5}\n").unwrap();
    let err = simulator::trace::load(&trace).unwrap_err();
    assert!(err.contains("t.jsonl:2:") && err.contains("unknown field `prompt_tokns`"), "{err}");
    assert!(err.contains("did you mean `prompt_tokens`?"), "{err}");
    // A CSV trace without times would put every request at the start.
    let csv = dir.join("t.csv");
    std::fs::write(&csv, "ip,prompt_tokens\n10.0.0.1,5\n").unwrap();
    let err = simulator::trace::load(&csv).unwrap_err();
    assert!(err.contains("t.csv:1: no `t_ms` column"), "{err}");
    // `n` is read from either form; outside 1 to 128 it is the line's error.
    std::fs::write(&csv, "t_ms,n\n1,2\n5,0\n").unwrap();
    let lines = simulator::trace::load(&csv).unwrap();
    assert_eq!(lines[0].n, Some(2));
    let err = simulator::trace::check(&csv, &lines, 60_000).unwrap_err();
    assert!(err.contains("t.csv:3: `n`: must be from 1 to 128, not 0"), "{err}");
    std::fs::write(&trace, "{\"t_ms\": 1, \"n\": 3}\n{\"t_ms\": 2, \"n\": 129}\n").unwrap();
    let lines = simulator::trace::load(&trace).unwrap();
    let err = simulator::trace::check(&trace, &lines, 60_000).unwrap_err();
    assert!(err.contains("t.jsonl:2: `n`: must be from 1 to 128, not 129"), "{err}");
    std::fs::remove_dir_all(Path::new(&dir)).unwrap();
}
