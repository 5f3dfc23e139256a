//! The proxy decides as the simulator predicts: one request timeline (per-IP
//! limits, a per-tenant token limit, a 429 storm on the primary, then the primary
//! down) played through `limitlab proxy` over real sockets, in front of two
//! `limitlab mock`s with fixed latency and scripted faults, and through
//! `limitlab simulate`. Every request's status, reason, backends and tokens must
//! be equal in the two decision logs.
//!
//! What cannot be equal, and is not compared: `latency_ms` and `arrival_ms`. The
//! simulator's are exact (50 ms per attempt, 100 ms per retry wait); the proxy's
//! are wall-clock time on a shared machine, with scheduling and loopback delays on
//! top. The fixture keeps every request at least 300 ms from a fault window's
//! edge, so that those delays cannot move a request across one.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::spawn;

const FIXTURE: &str = "limitlab/tests/differential";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The decision log's lines by request number: (status, reason, backends, tokens).
type Lines = Vec<(u64, u64, String, Vec<String>, (u64, u64))>;

fn read_decisions(path: &Path) -> Lines {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|d| {
            let backends = d["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect();
            let tokens = (d["prompt_tokens"].as_u64().unwrap(), d["completion_tokens"].as_u64().unwrap());
            let reason = d["reason"].as_str().unwrap().to_owned();
            (d["request"].as_u64().unwrap(), d["status"].as_u64().unwrap(), reason, backends, tokens)
        })
        .collect();
    lines.sort_by_key(|l| l.0);
    lines
}

fn simulated(dir: &Path) -> Lines {
    let log = dir.join("simulated.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_limitlab"))
        .args(["simulate", &format!("{FIXTURE}/scenario.toml"), "--out", dir.join("report").to_str().unwrap()])
        .args(["--decisions", log.to_str().unwrap()])
        .current_dir(root())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    read_decisions(&log)
}

/// Plays the trace against the proxy, each line at its instant from `t0`, open loop.
async fn play(proxy: &str, t0: Instant) {
    let trace = std::fs::read_to_string(root().join(FIXTURE).join("trace.jsonl")).unwrap();
    let client = reqwest::Client::new();
    let mut calls = Vec::new();
    for (n, line) in trace.lines().enumerate() {
        let line: Value = serde_json::from_str(line).unwrap();
        tokio::time::sleep_until((t0 + Duration::from_millis(line["t_ms"].as_u64().unwrap())).into()).await;
        let request = client
            .post(format!("{proxy}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"))
            .header("api-key", "differential-key")
            .header("x-forwarded-for", line["ip"].as_str().unwrap())
            .header("x-tenant", line["headers"]["x-tenant"].as_str().unwrap())
            .header("x-limitlab-request", n.to_string())
            .header("x-limitlab-client", "trace")
            .json(&json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": line["max_tokens"]}));
        calls.push(tokio::spawn(request.send()));
    }
    for call in calls {
        call.await.unwrap().expect("the proxy answers");
    }
}

#[tokio::test]
async fn the_proxy_decides_every_request_as_the_simulator_does() {
    let dir = std::env::temp_dir().join(format!("limitlab-differential-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mock = format!("{FIXTURE}/mock.toml");
    let primary = spawn(&["mock", "--config", &mock, "--listen", "127.0.0.1:0"], 1, None);
    let secondary = spawn(&["mock", "--config", &mock, "--listen", "127.0.0.1:0"], 1, None);
    let log = dir.join("proxy.jsonl");
    let (p, s) = (format!("primary={}", primary.urls[0]), format!("secondary={}", secondary.urls[0]));
    let config = format!("{FIXTURE}/proxy.toml");
    let args = ["proxy", "--config", &config, "--backend", &p, "--backend", &s, "--decisions", log.to_str().unwrap()];
    let proxy = spawn(&args, 2, None);
    // The primary's faults, clocked from now: the replay starts with them.
    let faults: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(FIXTURE).join("faults.json")).unwrap()).unwrap();
    let client = reqwest::Client::new();
    let set = client
        .post(format!("{}/_mock/faults", primary.urls[0]))
        .json(&json!({"deployment": "gpt-4o", "faults": faults}));
    assert_eq!(set.send().await.unwrap().status(), 200);
    play(&proxy.urls[0], Instant::now()).await;
    let expected = simulated(&dir);
    assert_eq!(expected.len(), 14, "every trace line is decided");
    // Each line is written as its request finishes; the last answers are back.
    let mut live = read_decisions(&log);
    for _ in 0..50 {
        if live.len() == expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        live = read_decisions(&log);
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (sim, prox) in expected.iter().zip(&live) {
        assert_eq!(sim, prox, "request {}: simulated (left) and proxied (right)", sim.0);
    }
    assert_eq!(expected.len(), live.len());
    // The timeline shows every mechanism at least once.
    let reasons: Vec<&str> = expected.iter().map(|l| l.2.as_str()).collect();
    assert!(reasons.contains(&"rate-limit") && reasons.contains(&"token-limit"), "{reasons:?}");
    assert!(expected.iter().filter(|l| l.3.len() == 2).count() >= 6, "the storm and the outage fail over");
}
