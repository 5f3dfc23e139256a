//! A fleet of `limitlab proxy` processes sharing counters through a real
//! `redis-server`, in lagged and in exact mode: when one replica is killed, the
//! others go on sharing, and together they keep the limit.

mod common;

use common::{spawn, Process};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: usize = 6;

fn fleet_config(dir: &std::path::Path, mode: &str, backend: &str, redis_port: u16) -> std::path::PathBuf {
    let text = format!(
        r#"
anonymous_product = "p"

[counters]
store = "redis://127.0.0.1:{redis_port}/0"
mode = "{mode}"
sync_interval = "100ms"
key_prefix = "{mode}"

[[products]]
name = "p"
[[products.policy.limits]]
type = "rate-limit-by-key"
calls = {LIMIT}
renewal_period = 60
counter_key = {{ const = "all" }}

[routing]
set_backend = "b"
backends = [{{ id = "b", url = "{backend}" }}]
"#
    );
    let path = dir.join(format!("fleet-{mode}.toml"));
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
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (Debian: apt install redis-server; .ci/run installs it)");
    let _redis = Process { child: redis, urls: Vec::new() };
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
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
