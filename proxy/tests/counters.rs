//! `[counters]` against a real `redis-server`: lagged replicas share their
//! counts, a store that cannot be reached is counted and survived (or refused
//! with 503), changes made while it was down are shipped when it returns, and
//! exact mode waits once per answer.

mod common;

use common::replica;
use proxy::ProxyConfig;
use redis_harness::{free_port, Redis};
use serde_json::json;
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn config(backend: &str, store: &str, on_error: &str) -> String {
    config_in("lagged", backend, store, on_error)
}

fn config_in(mode: &str, backend: &str, store: &str, on_error: &str) -> String {
    format!(
        r#"
anonymous_product = "p"
subscriptions = []

[counters]
store = "{store}"
mode = "{mode}"
sync_interval = "100ms"
on_store_error = "{on_error}"

[[products]]
name = "p"
[[products.policy.limits]]
type = "rate-limit-by-key"
calls = 4
renewal_period = 60
counter_key = {{ const = "all" }}

[routing]
set_backend = "b"
backends = [{{ id = "b", url = "{backend}" }}]
"#
    )
}

async fn backend() -> MockServer {
    let server = MockServer::start().await;
    let body = json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(body)).mount(&server).await;
    server
}

async fn settle() {
    // Three sync intervals: shipped by one replica, read by the other.
    tokio::time::sleep(Duration::from_millis(350)).await;
}

#[tokio::test]
async fn lagged_replicas_share_their_counts_through_redis() {
    let redis = Redis::start();
    let backend = backend().await;
    let text = config(&backend.uri(), &redis.url(), "local");
    let (a, b) = (replica(&text).await, replica(&text).await);
    settle().await;
    for _ in 0..3 {
        assert_eq!(a.call().await, 200);
    }
    settle().await;
    // B has seen A's three calls: one more is admitted, then the limit holds.
    assert_eq!(b.call().await, 200);
    assert_eq!(b.call().await, 429);
    settle().await;
    assert_eq!(a.call().await, 429, "A has seen B's call");
    let metrics = b.metrics().await;
    assert!(metrics.contains("limitlab_store_reachable 1"), "{metrics}");
    assert!(metrics.contains("limitlab_store_changes_applied_total 3"), "{metrics}");
    assert!(metrics.contains("limitlab_store_sync_lag_seconds_count 3"), "{metrics}");
}

#[tokio::test]
async fn an_unreachable_store_is_survived_with_local_counters_or_refused_with_503() {
    for mode in ["lagged", "exact"] {
        unreachable_store_in(mode).await;
    }
}

async fn unreachable_store_in(mode: &str) {
    let backend = backend().await;
    let nowhere = format!("redis://127.0.0.1:{}/0", free_port());
    let local = replica(&config_in(mode, &backend.uri(), &nowhere, "local")).await;
    // An exchange that cannot connect fails within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(local.call().await, 200, "{mode}: local counters decide");
    let metrics = local.metrics().await;
    assert!(metrics.contains("limitlab_store_reachable 0"), "{metrics}");
    assert!(!metrics.contains("limitlab_store_errors_total 0"), "errors are counted: {metrics}");
    let reject = replica(&config_in(mode, &backend.uri(), &nowhere, "reject")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", reject.base);
    let response = reqwest::Client::new().post(url).json(&json!({"messages": []})).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["statusCode"], 503);
    assert!(body["message"].as_str().unwrap().contains("counter store"), "{body}");
}

#[tokio::test]
async fn changes_made_while_the_store_is_down_are_shipped_when_it_returns() {
    for mode in ["lagged", "exact"] {
        store_down_and_back_in(mode).await;
    }
}

async fn store_down_and_back_in(mode: &str) {
    let redis = Redis::start();
    let port = redis.port;
    let backend = backend().await;
    let text = config_in(mode, &backend.uri(), &redis.url(), "local");
    let (a, b) = (replica(&text).await, replica(&text).await);
    settle().await;
    drop(redis);
    settle().await;
    for _ in 0..4 {
        assert_eq!(a.call().await, 200, "A decides on its own counters meanwhile");
    }
    // A failed exchange ends within a second; the next one counts the backlog.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(b.call().await, 200, "B has not heard of them: the store is down");
    let metrics = a.metrics().await;
    assert!(metrics.contains("limitlab_store_backlog 4"), "A keeps its changes for later: {metrics}");
    if mode == "exact" {
        // Three calls to the core per request: arrival, the attempt's outcome, the completion.
        assert!(metrics.contains("limitlab_store_local_calls_total 12"), "the fallback is counted: {metrics}");
    }
    let _back = Redis::start_on(port);
    // Reconnection, then A ships its four changes and B applies them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.call().await, 429, "B now counts A's four calls");
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("limitlab_store_reachable 1") && metrics.contains("limitlab_store_backlog 0"),
        "{metrics}"
    );
}

/// Exact mode waits once per answer, whatever the answer: four calls admitted
/// and two refused make six waits (`limitlab_store_wait_seconds`), each for a
/// shipment that holds the request's changes, so none are left behind.
#[tokio::test]
async fn an_exact_replica_waits_once_per_answer() {
    let redis = Redis::start();
    let backend = backend().await;
    let a = replica(&config_in("exact", &backend.uri(), &redis.url(), "local")).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(a.call().await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "the limit of 4");
    let metrics = a.metrics().await;
    assert!(metrics.contains("limitlab_store_wait_seconds_count 6"), "one wait per answer: {metrics}");
    assert!(metrics.contains("limitlab_store_backlog 0"), "every change is shipped: {metrics}");
    assert!(!metrics.contains("limitlab_store_lock_acquisitions_total 0"), "the lock was taken: {metrics}");
}

#[test]
fn bad_stores_are_refused_when_the_config_loads() {
    let bad = config("http://b", "http://127.0.0.1:6379", "local");
    let error = ProxyConfig::from_toml("c.toml", &bad).map(|_| ()).unwrap_err();
    assert!(error.contains("not a redis:// or rediss:// URL"), "{error}");
    let bad = config("http://b", "redis://127.0.0.1:6379", "local").replace("\"lagged\"", "\"eventual\"");
    let error = ProxyConfig::from_toml("c.toml", &bad).map(|_| ()).unwrap_err();
    assert!(error.contains("eventual") && error.contains("exact"), "{error}");
}
