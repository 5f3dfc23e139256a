//! The proxy's logs as an operator reads them: plain text when stderr is a file,
//! JSON lines whose record is an object, every refusal with why, and `/metrics`
//! served until the work in flight has ended.

use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;

use common::{spawn, Process};

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("limitlab-proxy-logs-{}-{name}.log", std::process::id()))
}

/// A mock and a proxy in front of it (`extra` proxy flags), logging into `log`.
fn stack(log: &Path, extra: &[&str]) -> (Process, Process) {
    let mock = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    let backend = format!("primary={}", mock.urls[0]);
    let base = ["proxy", "--config", "examples/proxy.toml", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let args: Vec<&str> = base.into_iter().chain(["--backend", &backend]).chain(extra.iter().copied()).collect();
    (mock, spawn(&args, 2, Some(log)))
}

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

async fn calls(urls: &[String]) {
    let client = reqwest::Client::new();
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5});
    let ok = client.post(format!("{}{CHAT}", urls[0])).header("api-key", "demo-key").json(&body).send().await;
    assert_eq!(ok.unwrap().status(), 200);
    let keyless = client.post(format!("{}{CHAT}", urls[0])).json(&body).send().await.unwrap();
    assert_eq!(keyless.status(), 401);
    // A body announced far beyond `max_body_bytes` is refused at once with 413,
    // not waited for until `client_timeout` (408).
    let huge = client
        .post(format!("{}{CHAT}", urls[0]))
        .header("api-key", "demo-key")
        .header("content-length", "999999999")
        .body("{}")
        .send()
        .await;
    // The proxy answers before reading a body that never comes; the client may
    // see the answer or the connection closing under its unsent bytes.
    if let Ok(r) = huge {
        assert_eq!(r.status(), 413);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

#[tokio::test]
async fn text_logs_to_a_file_carry_no_colour_and_name_each_refusal() {
    let log = log_path("text");
    let (_mock, proxy) = stack(&log, &[]);
    calls(&proxy.urls).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a file:\n{text}");
    assert!(
        text.contains("refusal=\"missing-subscription-key\"") || text.contains("refusal=missing-subscription-key"),
        "{text}"
    );
    assert!(text.contains("status=401"), "{text}");
    assert!(text.contains("body-too-large") && text.contains("status=413"), "{text}");
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn json_logs_nest_the_record_and_log_refusals() {
    let log = log_path("json");
    let (_mock, proxy) = stack(&log, &["--log-json"]);
    calls(&proxy.urls).await;
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let request = lines.iter().find(|l| l["target"] == "limitlab::request").expect("a request line");
    assert!(request["fields"]["record"].is_object(), "{request}");
    assert_eq!(request["fields"]["record"]["reason"], "ok");
    let refusals: Vec<&Value> = lines.iter().filter(|l| l["target"] == "limitlab::refusal").collect();
    let named = |name: &str, status: u64| {
        refusals.iter().any(|l| l["fields"]["refusal"] == name && l["fields"]["status"] == status)
    };
    assert!(named("missing-subscription-key", 401), "{refusals:?}");
    assert!(named("body-too-large", 413), "{refusals:?}");
    let _ = std::fs::remove_file(log);
}
