//! A fleet of `limitlab proxy` processes sharing counters through a real
//! `redis-server`, in lagged and in exact mode: when one replica is killed, the
//! others go on sharing, and together they keep the limit.

mod common;

use common::{spawn, Process};
use std::time::Duration;

const LIMIT: usize = 6;

fn fleet_config(dir: &std::path::Path, mode: &str, backend: &str, redis_port: u16) -> std::path::PathBuf {
    let limit = format!("type = \"rate-limit-by-key\"\ncalls = {LIMIT}\nrenewal_period = 60");
    write_config(dir, &format!("fleet-{mode}"), mode, backend, redis_port, &limit)
}

/// Writes `NAME.toml`: one product under `limit` (counted for everyone
/// together), its counters in `mode` on the Redis at `redis_port` under the
/// key prefix `NAME`, one backend.
fn write_config(
    dir: &std::path::Path,
    name: &str,
    mode: &str,
    backend: &str,
    redis_port: u16,
    limit: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
anonymous_product = "p"

[counters]
store = "redis://127.0.0.1:{redis_port}/0"
mode = "{mode}"
sync_interval = "100ms"
key_prefix = "{name}"

[[products]]
name = "p"
[[products.policy.limits]]
{limit}
counter_key = {{ const = "all" }}

[routing]
set_backend = "b"
backends = [{{ id = "b", url = "{backend}" }}]
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn call(front: &str) -> u16 {
    let url = format!("{front}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}"#;
    let response = reqwest::Client::new().post(url).body(body).send().await;
    response.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn settle() {
    // Four sync intervals: shipped by one replica, read by the others.
    tokio::time::sleep(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn a_killed_replica_leaves_the_others_sharing_and_keeping_the_limit() {
    let dir = std::env::temp_dir().join(format!("limitlab-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let redis = redis_harness::Redis::start();
    let port = redis.port;
    let mock = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    for mode in ["lagged", "exact"] {
        one_replica_killed(&dir, mode, &mock.urls[0], port).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn one_replica_killed(dir: &std::path::Path, mode: &str, backend: &str, port: u16) {
    let config = fleet_config(dir, mode, backend, port);
    let config = config.to_str().unwrap();
    let args = ["proxy", "--config", config, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let mut replicas: Vec<Process> = (0..3).map(|_| spawn(&args, 2, None)).collect();
    settle().await;
    // A call through each replica, each heard by the others before the next.
    for r in &replicas {
        assert_eq!(call(&r.urls[0]).await, 200, "{mode}: under the limit, every call is admitted");
        settle().await;
    }
    // One replica dies. The two left go on sharing, the dead one's call
    // included: together they admit exactly the 3 calls left of the limit of 6.
    let mut killed = replicas.remove(2);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        for r in &replicas {
            statuses.push(call(&r.urls[0]).await);
            settle().await;
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429], "{mode}: the survivors keep the limit of {LIMIT}");
}

/// Exact mode, one call allowed an hour, counted when its response is
/// delivered (`increment-condition`): the count is the change a replica must
/// have in the store before its client has the response.
fn one_call_config(dir: &std::path::Path, backend: &str, redis_port: u16, prefix: &str) -> std::path::PathBuf {
    let limit = "type = \"quota-by-key\"\ncalls = 1\nrenewal_period = 3600\nincrement_condition = \"200-399\"";
    write_config(dir, prefix, "exact", backend, redis_port, limit)
}

/// Sends one call and reads its answer as a client does: a buffered body
/// whole, a stream up to its `data: [DONE]` event (where SDKs stop reading).
async fn call_until_answered(front: &str, stream: bool) -> u16 {
    let url = format!("{front}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": stream});
    let mut response = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let mut seen = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        seen.extend_from_slice(&chunk);
        if stream && seen.windows(12).any(|w| w == b"data: [DONE]") {
            break;
        }
    }
    assert!(!stream || seen.windows(12).any(|w| w == b"data: [DONE]"), "the stream reached `[DONE]`");
    status
}

/// The promise behind exact mode's wait: once a client has its answer, the
/// request's counter changes are in the store, so a replica killed the moment
/// after cannot take them with it. Replica A answers the one call the quota
/// allows and is killed at once (its client just read the body, or the
/// stream's `[DONE]`); replica B must then refuse the next call. Several
/// rounds, since a replica that did not wait would still ship within about a
/// millisecond and could win the race now and then.
#[tokio::test]
async fn an_exact_replica_killed_right_after_answering_leaves_its_count_behind() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_owned();
    let redis = redis_harness::Redis::start();
    let port = redis.port;
    let mock = spawn(&["mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"], 1, None);
    for round in 0..8 {
        let stream = round % 2 == 1;
        let config = one_call_config(&dir, &mock.urls[0], port, &format!("durable-{round}"));
        let config = config.to_str().unwrap();
        let args = ["proxy", "--config", config, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        let mut a = spawn(&args, 2, None);
        let b = spawn(&args, 2, None);
        assert_eq!(call_until_answered(&a.urls[0], stream).await, 200, "round {round}: the quota's one call");
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        let status = call_until_answered(&b.urls[0], false).await;
        assert_eq!(status, 403, "round {round} (stream: {stream}): B counts the call A answered before it died");
    }
}
