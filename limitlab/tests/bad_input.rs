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

fn scratch(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("limitlab-bad-input-{}-{name}", std::process::id()));
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
    let (code, out, err) = limitlab(&["decide", "policies/seed-ip-limits.xml", "examples/decide-requests.jsonl"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("22 requests: 16 admitted"), "{out}");
    let bad = scratch("bad.toml", "[[limits]]\ntype = \"rate-limit\"\ncalls = 0\nrenewal_period = 60\n");
    check(
        &["decide", &bad, "examples/decide-requests.jsonl"],
        2,
        &format!("{bad}:1:1: limits[0]: rate-limit: `calls`"),
    );
    let (_, _, err) = limitlab(&["decide", &bad, "examples/decide-requests.jsonl"]);
    assert_eq!(err.trim_end().lines().count(), 2, "one located line and the source line: {err}");
    let broken = scratch("broken.toml", "x = [\n");
    check(&["decide", &broken, "examples/decide-requests.jsonl"], 2, &format!("{broken}:1:6: unclosed array"));
}

#[test]
fn output_paths_are_checked_before_the_run() {
    // A file where a directory should be: the run would be lost at its end.
    let file = scratch("not-a-dir", "");
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
