//! Bad input gets a clear error (exit 2) before any work, naming the file, line
//! and field; nothing that checks nothing passes.

mod common;

use common::limitlab;

/// Runs `limitlab ARGS`, checks its exit code and that stderr says `needle`, and
/// returns stdout.
fn check(args: &[&str], code: i32, needle: &str) -> String {
    let (got, out, err) = limitlab(args);
    assert_eq!(got, code, "limitlab {args:?}\nstdout: {out}\nstderr: {err}");
    assert!(err.contains(needle), "limitlab {args:?}: stderr lacks `{needle}`:\n{err}");
    out
}

/// Writes `text` to file `name` in `dir`, a test's own directory, removed when
/// the test ends (passed or failed).
fn scratch(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn checks_that_would_check_nothing_are_refused() {
    check(&["check", "scenarios/tenant-tpm.toml", "--cases", "0"], 2, "--cases");
    check(&["policy", "check"], 2, "FILES");
}

#[test]
fn decide_reads_policy_xml_and_locates_toml_errors_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = limitlab(&["decide", "policies/seed-ip-limits.xml", "examples/decide-requests.jsonl"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("22 requests: 16 admitted"), "{out}");
    let bad = scratch(&dir, "bad.toml", "[[limits]]\ntype = \"rate-limit\"\ncalls = 0\nrenewal_period = 60\n");
    check(
        &["decide", &bad, "examples/decide-requests.jsonl"],
        2,
        &format!("{bad}:1:1: limits[0]: rate-limit: `calls`"),
    );
    let (_, _, err) = limitlab(&["decide", &bad, "examples/decide-requests.jsonl"]);
    assert_eq!(err.trim_end().lines().count(), 2, "one located line and the source line: {err}");
    let broken = scratch(&dir, "broken.toml", "x = [\n");
    check(&["decide", &broken, "examples/decide-requests.jsonl"], 2, &format!("{broken}:1:6: unclosed array"));
}

#[test]
fn output_paths_are_checked_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // A file where a directory should be: the run would be lost at its end.
    let file = scratch(&dir, "not-a-dir", "");
    let inside = format!("{file}/report");
    // Refused before the run: no summary was printed, no case was tried.
    let refusals = [
        check(
            &["simulate", "scenarios/seed-ip-limits.toml", "--out", &inside],
            2,
            "cannot create the output directory",
        ),
        check(
            &["sweep", "scenarios/seed-ip-limits.toml", "--vary", "seed=1,2", "--out", &inside],
            2,
            "output directory",
        ),
        check(&["check", "scenarios/tenant-tpm.toml", "--out", &inside], 2, "output directory"),
        check(
            &["simulate", "scenarios/seed-ip-limits.toml", "--decisions", &format!("{file}/d.jsonl")],
            2,
            "cannot create",
        ),
    ];
    for out in refusals {
        assert!(!out.contains("client ") && !out.contains("case"), "the run started: {out}");
    }
}

/// A small scenario: `client` is the body of its one `[[clients]]` table.
fn scenario(dir: &tempfile::TempDir, name: &str, top: &str, client: &str) -> String {
    let text = format!(
        "name = \"bad\"\nstart = \"2024-01-01T00:00:00Z\"\nseed = 1\n{top}\n\
         [gateway.routing]\nset_backend = \"b\"\nbackends = [{{ id = \"b\", url = \"http://b\" }}]\n\
         [[backends]]\nname = \"b\"\nmodel = \"gpt-4o\"\ntpm = 1000000\n\
         [[clients]]\nname = \"c\"\n{client}\n"
    );
    scratch(dir, name, &text)
}

#[test]
fn empty_impossible_or_huge_scenarios_are_refused_before_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let poisson = "arrival = { poisson = { rate_per_s = 1 } }";
    let zero = scenario(&dir, "zero.toml", "duration = \"0s\"", poisson);
    check(&["simulate", &zero], 2, "`duration`: 0s simulates nothing");
    let no_tokens = scenario(&dir, "no-tokens.toml", "duration = \"1m\"", &format!("{poisson}\nmax_tokens = 0"));
    check(&["simulate", &no_tokens], 2, "`max_tokens = 0`");
    let huge = scenario(&dir, "huge.toml", "duration = \"1m\"", "arrival = { poisson = { rate_per_s = 1e12 } }");
    let out = check(&["simulate", &huge], 2, "would make about 6.000e13 calls");
    assert!(out.is_empty(), "refused before the run: {out}");
    let (code, _, err) = limitlab(&["simulate", &huge, "--allow-large", "--out", "/dev/null/x"]);
    assert_eq!(code, 2);
    assert!(!err.contains("would make"), "--allow-large lets it pass the bound: {err}");
    let scaled = scenario(
        &dir,
        "scaled.toml",
        "duration = \"10m\"\n[[expect]]\nfigure = \"rejected_ratio\"\nat_most = 1\n[check]\nrate_scale = [1, 1e6]",
        "arrival = { poisson = { rate_per_s = 1000 } }",
    );
    check(&["check", &scaled], 2, "with rates x 1000000");
}

#[test]
fn a_trace_that_is_empty_or_wrong_is_an_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let trace = |name: &str, lines: &str| {
        let path = scratch(&dir, name, lines);
        let file = std::path::Path::new(&path).file_name().unwrap().to_str().unwrap().to_owned();
        scenario(
            &dir,
            &format!("{name}.toml"),
            "duration = \"1m\"",
            &format!("arrival = {{ trace = {{ path = \"{file}\" }} }}"),
        )
    };
    let empty = trace("empty.jsonl", "\n");
    check(&["simulate", &empty], 2, "the trace has no requests");
    let bad_ip = trace("bad-ip.jsonl", "{\"t_ms\": 1, \"ip\": \"10.0.0.1\"}\n{\"t_ms\": 2, \"ip\": \"999.1.1.1\"}\n");
    check(&["simulate", &bad_ip], 2, "bad-ip.jsonl:2: `ip`: `999.1.1.1` is not an IP address");
    let late = trace("late.jsonl", "{\"t_ms\": 1, \"ip\": \"10.0.0.1\"}\n{\"t_ms\": 60000, \"ip\": \"10.0.0.1\"}\n");
    let out = dir.path().join("late-out");
    check(&["simulate", &late, "--out", out.to_str().unwrap()], 0, "late.jsonl:2: 1 of 2 lines come at or after");
}
