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
use wiremock::matchers::{method, path_regex};
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

/// The tokens of `kind` a replica's `/metrics` shows charged, over all keys and backends.
fn tokens(metrics: &str, kind: &str) -> u64 {
    let lines =
        metrics.lines().filter(|l| l.starts_with("limitlab_tokens_total{") && l.contains(&format!("kind=\"{kind}\"")));
    lines.filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

#[tokio::test]
async fn a_background_response_is_charged_once_in_the_fleet_whichever_replica_reads_it() {
    // Behind a load balancer the reads of a background response land on any
    // replica. Each replica's own memory knew only what it created: a response
    // created through A and read through B was never charged.
    let redis = Redis::start();
    let backend = MockServer::start().await;
    let answer = |body: serde_json::Value| ResponseTemplate::new(200).set_body_json(body);
    let queued = json!({"id": "resp_bg", "object": "response", "status": "queued", "background": true, "usage": null});
    let usage = json!({"input_tokens": 20, "output_tokens": 7, "total_tokens": 27});
    let finished =
        json!({"id": "resp_bg", "object": "response", "status": "completed", "background": true, "usage": usage});
    let cancelled =
        json!({"id": "resp_bg", "object": "response", "status": "cancelled", "background": true, "usage": usage});
    Mock::given(method("GET")).respond_with(answer(finished)).mount(&backend).await;
    Mock::given(method("POST")).and(path_regex("/cancel$")).respond_with(answer(cancelled)).mount(&backend).await;
    Mock::given(method("POST")).respond_with(answer(queued)).mount(&backend).await;
    let text = config(&backend.uri(), &redis.url(), "local");
    let (a, b) = (replica(&text).await, replica(&text).await);
    let client = reqwest::Client::new();
    let send = |replica: &common::Replica, method: reqwest::Method, path: &str| {
        let request = client.request(method.clone(), format!("{}/openai/v1{path}", replica.base));
        let request = if method == reqwest::Method::POST {
            request.json(&json!({"model": "gpt-4o", "input": "hi", "background": true}))
        } else {
            request
        };
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let charged = || async {
        [
            tokens(&a.metrics().await, "prompt") + tokens(&b.metrics().await, "prompt"),
            tokens(&a.metrics().await, "completion") + tokens(&b.metrics().await, "completion"),
        ]
    };
    // Read through the other replica, then again through both.
    assert_eq!(send(&a, reqwest::Method::POST, "/responses").await, 200);
    assert_eq!(charged().await, [0, 0], "queued: nothing used yet");
    for replica in [&b, &a, &b] {
        assert_eq!(send(replica, reqwest::Method::GET, "/responses/resp_bg").await, 200);
    }
    assert_eq!(charged().await, [20, 7], "charged once, by B's first read");
    assert_eq!(tokens(&b.metrics().await, "prompt"), 20);
    // Cancelled through the other replica: the cancel's answer shows it finished.
    assert_eq!(send(&a, reqwest::Method::POST, "/responses").await, 200);
    assert_eq!(send(&b, reqwest::Method::POST, "/responses/resp_bg/cancel").await, 200);
    assert_eq!(send(&a, reqwest::Method::GET, "/responses/resp_bg").await, 200);
    assert_eq!(charged().await, [40, 14], "the second response charged once, by its cancel");
    let metrics = a.metrics().await;
    assert!(metrics.contains("limitlab_store_errors_total 0"), "{metrics}");
}

#[tokio::test]
async fn without_its_store_a_replica_charges_the_background_responses_it_made() {
    let backend = MockServer::start().await;
    let answer = |status: &str, usage: serde_json::Value| {
        let body = json!({"id": "resp_bg", "object": "response", "status": status, "background": true, "usage": usage});
        ResponseTemplate::new(200).set_body_json(body)
    };
    let usage = json!({"input_tokens": 20, "output_tokens": 7, "total_tokens": 27});
    Mock::given(method("GET")).respond_with(answer("completed", usage)).mount(&backend).await;
    Mock::given(method("POST")).respond_with(answer("queued", json!(null))).mount(&backend).await;
    let nobody = format!("redis://127.0.0.1:{}/0", free_port());
    let a = replica(&config(&backend.uri(), &nobody, "local")).await;
    let client = reqwest::Client::new();
    let create =
        client.post(format!("{}/openai/v1/responses", a.base)).json(&json!({"model": "gpt-4o", "input": "hi"}));
    assert_eq!(create.send().await.unwrap().status(), 200);
    for _ in 0..2 {
        let read = client.get(format!("{}/openai/v1/responses/resp_bg", a.base)).send().await.unwrap();
        assert_eq!(read.status(), 200);
    }
    let metrics = a.metrics().await;
    assert_eq!([tokens(&metrics, "prompt"), tokens(&metrics, "completion")], [20, 7], "{metrics}");
    assert!(!metrics.contains("limitlab_store_errors_total 0\n"), "the store's errors are counted: {metrics}");
}

#[test]
fn a_store_password_from_an_unset_variable_is_refused_at_start_in_either_mode() {
    for mode in ["lagged", "exact"] {
        let text = config_in(mode, "http://127.0.0.1:9", "redis://127.0.0.1:9/0", "local")
            .replace("[counters]\n", "[counters]\npassword_env = \"LIMITLAB_TEST_UNSET_PASSWORD\"\n");
        let config = ProxyConfig::from_toml("test.toml", &text).unwrap();
        let error = proxy::server::Proxy::new(config).err().expect("refused");
        assert!(
            error.contains("`counters.password_env`") && error.contains("LIMITLAB_TEST_UNSET_PASSWORD"),
            "{mode}: {error}"
        );
    }
}
