//! One vocabulary: every place that tells why a request ended spells the reason as
//! the core's `Reason` does. Each test reads what users read (the decision log,
//! `report.json`, the summary table, the HTML report, the proxy's request log and its
//! `/metrics`) and fails on a name `Reason::from_name` does not know.

mod common;

use common::{limitlab, spawn};
use gateway_core::Reason;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Checks that every name is a reason's spelling, and that the place showed at
/// least the reasons `expected` (so that a parser that finds nothing cannot pass).
fn check(place: &str, names: &BTreeSet<String>, expected: &[Reason]) {
    let unknown: Vec<&String> = names.iter().filter(|n| Reason::from_name(n).is_none()).collect();
    assert!(unknown.is_empty(), "{place} prints reasons the core does not have: {unknown:?}");
    for reason in expected {
        assert!(names.contains(reason.as_str()), "{place} never shows {reason}: {names:?}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("limitlab-vocabulary-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The header cells of a table between the cells `after` and `before`.
fn between(cells: &[String], after: &str, before: &str) -> BTreeSet<String> {
    let start = cells.iter().position(|c| c == after).expect("the first fixed column") + 1;
    let end = cells.iter().position(|c| c == before).expect("the last fixed column");
    cells[start..end].iter().cloned().collect()
}

fn summary_reasons(stdout: &str) -> BTreeSet<String> {
    let header = stdout.lines().find(|l| l.starts_with("client ")).expect("a summary header");
    let cells: Vec<String> = header.split_whitespace().map(str::to_owned).collect();
    between(&cells, "requests", "sdk-retry")
}

fn html_reasons(html: &str) -> BTreeSet<String> {
    let row = html.split("<tr>").find(|r| r.starts_with("<th>client</th>")).expect("the client table");
    let cells: Vec<String> =
        row.split("<th>").skip(1).map(|c| c.split("</th>").next().unwrap_or_default().to_owned()).collect();
    between(&cells, "calls", "SDK retries")
}

fn report_reasons(report: &Value) -> BTreeSet<String> {
    let clients = report["clients"].as_array().expect("clients");
    let minutes = report["minutes"].as_array().expect("minutes");
    let tables = clients.iter().chain(minutes).map(|row| row["by_reason"].as_object().expect("by_reason"));
    tables.flat_map(|t| t.keys().cloned()).collect()
}

fn decision_reasons(log: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(log).unwrap();
    let lines = text.lines().map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"));
    lines.map(|l| l["reason"].as_str().expect("a reason field").to_owned()).collect()
}

#[test]
fn the_simulators_outputs_spell_reasons_as_the_core_does() {
    let cases: [(&str, &[Reason]); 2] = [
        ("seed-ip-limits", &[Reason::Ok, Reason::RateLimit, Reason::Quota, Reason::TokenLimit]),
        ("primary-outage", &[Reason::Ok, Reason::BackendError]),
    ];
    for (scenario, expected) in cases {
        let dir = scratch(scenario);
        let decisions = dir.join("decisions.jsonl");
        let (code, stdout, stderr) = limitlab(&[
            "simulate",
            &format!("scenarios/{scenario}.toml"),
            "--out",
            dir.to_str().unwrap(),
            "--decisions",
            decisions.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        check(&format!("{scenario}: summary table"), &summary_reasons(&stdout), expected);
        let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        check(&format!("{scenario}: report.json"), &report_reasons(&report), expected);
        let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
        check(&format!("{scenario}: report.html"), &html_reasons(&html), expected);
        check(&format!("{scenario}: decision log"), &decision_reasons(&decisions), expected);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn metric_reasons(metrics: &str) -> BTreeSet<String> {
    let labels = metrics.split("reason=\"").skip(1);
    labels.map(|rest| rest.split('"').next().unwrap_or_default().to_owned()).collect()
}

/// The reasons of the request log's JSON lines: the line's own field and the
/// outcome record's.
fn request_log_reasons(log: &str) -> BTreeSet<String> {
    let lines = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok());
    let requests = lines.filter(|l| l["target"] == "limitlab::request");
    let mut names = BTreeSet::new();
    for line in requests {
        let fields = &line["fields"];
        names.insert(fields["reason"].as_str().expect("a reason field").to_owned());
        let record: Value = match &fields["record"] {
            Value::String(text) => serde_json::from_str(text).expect("a JSON record"),
            other => other.clone(),
        };
        names.insert(record["reason"].as_str().expect("the record's reason").to_owned());
    }
    names
}

#[tokio::test]
async fn the_proxys_request_log_and_metrics_spell_reasons_as_the_core_does() {
    let dir = scratch("proxy");
    let log = dir.join("proxy.log");
    let primary = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    let backend = format!("primary={}", primary.urls[0]);
    let args = ["proxy", "--config", "examples/proxy.toml", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let args: Vec<&str> = args.into_iter().chain(["--backend", &backend, "--log-json"]).collect();
    let proxy = spawn(&args, 2, Some(&log));
    let urls = &proxy.urls;
    let client = reqwest::Client::new();
    let chat = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", urls[0]);
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5});
    // The policy admits 10 calls a minute per IP: the eleventh is the rate limit's.
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(client.post(&chat).header("api-key", "demo-key").json(&body).send().await.unwrap().status());
    }
    assert_eq!(statuses.last().map(|s| s.as_u16()), Some(429), "{statuses:?}");
    let metrics = client.get(format!("{}/metrics", urls[1])).send().await.unwrap().text().await.unwrap();
    check("/metrics", &metric_reasons(&metrics), &[Reason::Ok, Reason::RateLimit]);
    // The request log is written when each request ends; give the last line a moment.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let written = std::fs::read_to_string(&log).unwrap();
    check("the request log", &request_log_reasons(&written), &[Reason::Ok, Reason::RateLimit]);
    let _ = std::fs::remove_dir_all(&dir);
}
