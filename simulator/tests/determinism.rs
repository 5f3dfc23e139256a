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
