//! End to end: `limitlab mock` (two of them) and `limitlab proxy` as real processes,
//! driven by a real HTTP client, with the shipped `examples/proxy.toml`.

use serde_json::{json, Value};
use std::process::Command;

mod common;

use common::{spawn, Process};

struct Stack {
    primary: Process,
    secondary: Process,
    proxy: Process,
    client: reqwest::Client,
}

fn stack() -> Stack {
    let primary = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    let secondary = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    let p = format!("primary={}", primary.urls[0]);
    let s = format!("secondary={}", secondary.urls[0]);
    let proxy = spawn(
        &[
            "proxy",
            "--config",
            "examples/proxy.toml",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--backend",
            &p,
            "--backend",
            &s,
        ],
        2,
        None,
    );
    Stack { primary, secondary, proxy, client: reqwest::Client::new() }
}

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

impl Stack {
    async fn chat(&self, body: Value) -> reqwest::Response {
        let url = format!("{}{CHAT}", self.proxy.urls[0]);
        self.client.post(url).header("api-key", "demo-key").json(&body).send().await.unwrap()
    }
}

fn hello() -> Value {
    json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20})
}

#[tokio::test]
async fn the_eleventh_call_in_a_minute_gets_apims_429() {
    let stack = stack();
    for i in 0..10 {
        assert_eq!(stack.chat(hello()).await.status(), 200, "call {}", i + 1);
    }
    let r = stack.chat(hello()).await;
    assert_eq!(r.status(), 429);
    let secs: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((58..=60).contains(&secs), "retry-after {secs}");
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"statusCode\": 429, \"message\": \"Rate limit is exceeded. Try again in {secs} seconds.\"}}")
    );
}

#[tokio::test]
async fn usage_of_plain_and_streamed_calls_lands_in_the_token_counter() {
    let stack = stack();
    let r = stack.chat(hello()).await;
    let consumed: u64 = r.headers()["consumed-tokens"].to_str().unwrap().parse().unwrap();
    let remaining: u64 = r.headers()["remaining-tokens"].to_str().unwrap().parse().unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(consumed, body["usage"]["total_tokens"].as_u64().unwrap());
    assert_eq!(remaining, 5000 - consumed);
    // A stream with its usage chunk, and one without (counted from the text).
    for include_usage in [true, false] {
        let mut streamed = hello();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": include_usage});
        let text = stack.chat(streamed).await.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    let r = stack.chat(hello()).await;
    let after: u64 = r.headers()["remaining-tokens"].to_str().unwrap().parse().unwrap();
    // Each call: 8 prompt tokens ("Hello" framed) and 20 completion tokens (mocks/fast.toml).
    assert_eq!(after, 5000 - 4 * 28, "two plain and two streamed calls of 28 tokens each");
}

/// The usage a stream's last chunk reports.
fn streamed_usage(text: &str) -> Value {
    let chunks = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).filter(|e| *e != "[DONE]");
    let usage = chunks.filter_map(|e| serde_json::from_str::<Value>(e).ok()).find(|c| !c["usage"].is_null());
    usage.map(|c| c["usage"].clone()).expect("a usage chunk")
}

#[tokio::test]
async fn streamed_calls_and_json_without_usage_are_charged_what_the_mock_bills() {
    let weather = json!([{ "type": "function", "function": { "name": "get_weather", "parameters": {
        "type": "object", "properties": { "city": { "type": "string" }, "days": { "type": "integer" } } } } }]);
    let asked = json!([{ "role": "user", "content": "Weather in Oslo, as JSON?" }]);
    for body in [
        json!({ "messages": asked, "tools": weather }),
        json!({ "messages": asked, "response_format": { "type": "json_object" } }),
    ] {
        let stack = stack();
        let r = stack.chat(hello()).await;
        let before: u64 = r.headers()["remaining-tokens"].to_str().unwrap().parse().unwrap();
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({ "include_usage": true });
        let billed =
            streamed_usage(&stack.chat(streamed.clone()).await.text().await.unwrap())["total_tokens"].as_u64().unwrap();
        // The same call without its usage chunk: the proxy counts the call's
        // name and arguments, or the JSON, as the mock spelled them.
        streamed["stream_options"] = json!({ "include_usage": false });
        let text = stack.chat(streamed).await.text().await.unwrap();
        assert!(
            text.contains(if body.get("tools").is_some() {
                "\"tool_calls\""
            } else {
                "\"delta\":{\"content\":\"answer\"}"
            }),
            "{text}"
        );
        let r = stack.chat(hello()).await;
        let after: u64 = r.headers()["remaining-tokens"].to_str().unwrap().parse().unwrap();
        assert_eq!(before - after, 2 * billed + 28, "{body}");
    }
}

#[tokio::test]
async fn a_background_response_is_charged_once_when_a_read_shows_it_done() {
    let stack = stack();
    let remaining =
        |r: &reqwest::Response| -> u64 { r.headers()["remaining-tokens"].to_str().unwrap().parse().unwrap() };
    let before = remaining(&stack.chat(hello()).await);
    let responses = format!("{}/openai/v1/responses", stack.proxy.urls[0]);
    let created = stack.client.post(&responses).bearer_auth("demo-key");
    let created = created.json(&json!({ "model": "gpt-4o", "input": "Say hello", "background": true }));
    let queued: Value = created.send().await.unwrap().json().await.unwrap();
    assert_eq!(queued["status"], "queued", "{queued}");
    let read = format!("{responses}/{}", queued["id"].as_str().unwrap());
    let mut done = Value::Null;
    for _ in 0..2 {
        // Read twice: the response is charged at the first read that shows it done, once.
        done = stack.client.get(&read).bearer_auth("demo-key").send().await.unwrap().json().await.unwrap();
        assert_eq!(done["status"], "completed", "{done}");
    }
    let after = remaining(&stack.chat(hello()).await);
    let used = done["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(before - after, used + 28, "the background response's {used} tokens and one more call's 28");
}

#[tokio::test]
async fn a_primary_outage_fails_over_to_the_secondary_and_no_key_is_401() {
    let stack = stack();
    let outage = json!({"deployment": "gpt-4o", "faults": {"outages": [{"start": "0s", "end": "1h", "status": 503}]}});
    let r = stack.client.post(format!("{}/_mock/faults", stack.primary.urls[0])).json(&outage).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(stack.chat(hello()).await.status(), 200);
    let stats = |url: String| async { stack.client.get(url).send().await.unwrap().json::<Value>().await.unwrap() };
    let primary = stats(format!("{}/_mock/stats", stack.primary.urls[0])).await;
    let secondary = stats(format!("{}/_mock/stats", stack.secondary.urls[0])).await;
    assert_eq!(primary["deployments"]["gpt-4o"]["faults"], 1);
    assert_eq!(secondary["deployments"]["gpt-4o"]["completed"], 1);
    let metrics =
        stack.client.get(format!("{}/metrics", stack.proxy.urls[1])).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("limitlab_failovers_total 1"), "{metrics}");

    let keyless = stack.client.post(format!("{}{CHAT}", stack.proxy.urls[0])).json(&hello()).send().await.unwrap();
    assert_eq!(keyless.status(), 401);
    assert!(keyless.text().await.unwrap().contains("missing subscription key"));
}

/// A mock that takes `ttft_ms` before it answers.
fn slow_mock(ttft_ms: u64) -> (Process, TempFile) {
    let path = TempFile(std::env::temp_dir().join(format!("limitlab-{}-slow-mock.toml", std::process::id())));
    let config = format!(
        "seed = 1\n[[deployments]]\nname = \"gpt-4o\"\nmodel = \"gpt-4o\"\ntpm = 1000000000\n\
         completion_tokens = {{ fixed = 5 }}\nlatency = {{ ttft_ms = {{ fixed = {ttft_ms} }}, per_token_ms = {{ fixed = 0 }} }}\n"
    );
    std::fs::write(&path.0, config).unwrap();
    let mock = spawn(&["mock", "--config", path.0.to_str().unwrap(), "--listen", "127.0.0.1:0"], 1, None);
    (mock, path)
}

/// A file removed when the test ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_the_call_in_flight_finish_and_exits_0() {
    let (mock, _config) = slow_mock(1500);
    let backend = format!("primary={}", mock.urls[0]);
    let mut proxy = spawn(
        &["proxy", "--config", "examples/proxy.toml", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
            .into_iter()
            .chain(["--backend", &backend, "--threads", "2"])
            .collect::<Vec<_>>(),
        2,
        None,
    );
    let url = format!("{}{CHAT}", proxy.urls[0]);
    let client = reqwest::Client::new();
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5});
    let in_flight = tokio::spawn(client.post(&url).header("api-key", "demo-key").json(&body).send());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let killed = Command::new("kill").args(["-TERM", &proxy.child.id().to_string()]).status().unwrap();
    assert!(killed.success(), "kill -TERM the proxy");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let refused = reqwest::Client::new().post(&url).header("api-key", "demo-key").json(&body).send().await;
    assert!(refused.as_ref().is_err_and(|e| e.is_connect()), "a new call after SIGTERM: {refused:?}");
    // `/metrics` is still served while the call in flight finishes.
    let metrics = reqwest::Client::new().get(format!("{}/metrics", proxy.urls[1])).send().await;
    assert_eq!(metrics.map(|r| r.status().as_u16()).ok(), Some(200), "metrics after SIGTERM, before the end");
    let answered = in_flight.await.unwrap().expect("the call in flight is answered");
    assert_eq!(answered.status(), 200);
    let usage: Value = answered.json().await.unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let status = proxy.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

/// The decision line of the simulator's `primary-down` scenario for a call while
/// the primary refuses connections: (status, reason, backends).
fn simulated_outage_call() -> (u64, String, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("limitlab-{}-primary-down", std::process::id()));
    let decisions = dir.join("decisions.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_limitlab"))
        .args(["simulate", "scenarios/primary-down.toml", "--out", dir.to_str().unwrap()])
        .args(["--decisions", decisions.to_str().unwrap()])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&decisions).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // The outage runs from the fifth minute to the tenth.
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| (300_000.0..600_000.0).contains(&l["arrival_ms"].as_f64().unwrap()))
        .expect("a call during the outage");
    let backends = line["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect();
    (line["status"].as_u64().unwrap(), line["reason"].as_str().unwrap().to_owned(), backends)
}

#[tokio::test]
async fn a_stopped_primary_fails_over_as_the_simulator_says() {
    let mut stack = stack();
    // The primary's process is gone: its port refuses connections.
    stack.primary.child.kill().unwrap();
    stack.primary.child.wait().unwrap();
    let r = stack.chat(hello()).await;
    let status = r.status().as_u16();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    let secondary =
        stack.client.get(format!("{}/_mock/stats", stack.secondary.urls[0])).send().await.unwrap().json::<Value>();
    assert_eq!(secondary.await.unwrap()["deployments"]["gpt-4o"]["completed"], 1);
    let metrics =
        stack.client.get(format!("{}/metrics", stack.proxy.urls[1])).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("limitlab_failovers_total 1"), "{metrics}");
    let proxied = "limitlab_requests_total{status=\"200\",reason=\"ok\",product=\"starter\",backend=\"secondary\"} 1";
    assert!(metrics.contains(proxied), "{metrics}");
    // The simulator decides the same for a call while its primary refuses connections.
    let simulated = simulated_outage_call();
    assert_eq!(simulated, (200, "ok".to_owned(), vec!["primary".to_owned(), "secondary".to_owned()]));
}
