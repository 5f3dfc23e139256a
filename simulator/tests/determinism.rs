//! Every shipped scenario runs, and two runs give byte-identical reports and
//! decision logs.

use std::path::Path;

fn run(path: &Path) -> (String, String) {
    let scenario = simulator::Scenario::load(path).unwrap_or_else(|e| panic!("{e}"));
    let outcome = simulator::run(&scenario, path.parent().unwrap(), None, true).unwrap_or_else(|e| panic!("{e}"));
    let report = serde_json::to_string_pretty(&outcome.report).unwrap();
    let decisions: String = outcome.decisions.iter().map(|d| serde_json::to_string(d).unwrap() + "\n").collect();
    (report, decisions)
}

#[test]
fn every_shipped_scenario_runs_and_is_deterministic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 6, "the shipped scenarios: {paths:?}");
    for path in paths {
        let (report, decisions) = run(&path);
        let again = run(&path);
        assert!(report == again.0, "{}: report.json differs between runs", path.display());
        assert!(decisions == again.1, "{}: the decision log differs between runs", path.display());
        assert!(decisions.lines().count() > 50, "{}: too little traffic to show anything", path.display());
    }
}

#[test]
fn another_seed_gives_another_run() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/seed-ip-limits.toml");
    let scenario = simulator::Scenario::load(&path).unwrap();
    let a = simulator::run(&scenario, path.parent().unwrap(), Some(1), false).unwrap();
    let b = simulator::run(&scenario, path.parent().unwrap(), Some(2), false).unwrap();
    assert_ne!(serde_json::to_string(&a.report).unwrap(), serde_json::to_string(&b.report).unwrap());
}

/// The committed example report (`examples/reports/seed-ip-limits/report.json`)
/// is what the simulator produces today, byte for byte; regenerate it with
/// `limitlab simulate scenarios/seed-ip-limits.toml --out examples/reports/seed-ip-limits`
/// when a change is meant to alter results.
#[test]
fn the_committed_example_report_is_reproduced() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("scenarios/seed-ip-limits.toml");
    let scenario = simulator::Scenario::load(&path).unwrap();
    let outcome = simulator::run(&scenario, path.parent().unwrap(), None, false).unwrap();
    let fresh = serde_json::to_string_pretty(&outcome.report).unwrap() + "\n";
    let committed = std::fs::read_to_string(root.join("examples/reports/seed-ip-limits/report.json")).unwrap();
    assert!(fresh == committed, "report.json differs from the committed example; regenerate it if that is intended");
}

#[test]
fn the_report_files_are_written_with_their_plots() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("scenarios/replicas-local.toml");
    let scenario = simulator::Scenario::load(&path).unwrap();
    let outcome = simulator::run(&scenario, path.parent().unwrap(), None, false).unwrap();
    let dir = std::env::temp_dir().join(format!("limitlab-report-test-{}", std::process::id()));
    simulator::output::write_report(&dir, &scenario, "scenario.toml", &outcome.report).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 5, "five inline plots");
    assert!(!html.contains("<script") && !html.contains("src=\"http"), "self-contained");
    for plot in ["requests", "client-tokens", "backend-tokens", "latency-cdf", "backend-failures"] {
        let png = std::fs::read(dir.join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{plot}.png is a PNG");
        assert!(dir.join(format!("{plot}.svg")).exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
