//! `[counters] mode = "exact"` against a real `redis-server`: three replicas
//! sharing one store decide exactly as one core does, and a burst spread over
//! three proxies never gets more calls through than the limit.

mod common;

use common::replica;
use gateway_core::{LimitBook, Nanos, Policy, RequestDecision, RequestInfo, ResponseInfo};
use proptest::prelude::*;
use proxy::counters::{CountersConfig, StoreState};
use proxy::exact::Exact;
use redis_harness::Redis;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Every kind of counter: sliding and bucket rate limits, a call and bandwidth
/// quota in a fixed window, and a reserving token limit (reserve, then reconcile
/// at completion) with an hourly token quota; the core's own instant-sync
/// property test uses the same policy.
const ALL_COUNTERS: &str = include_str!("../../gateway-core/tests/data/all-counters.toml");

/// A core, alone or as one replica of a fleet sharing counters in exact mode.
struct Node {
    exact: Option<Exact<LimitBook>>,
    state: Arc<StoreState>,
    book: Mutex<LimitBook>,
}

impl Node {
    fn alone(policy: &Policy) -> Node {
        Node { exact: None, state: Arc::default(), book: Mutex::new(LimitBook::new(policy, 1)) }
    }

    fn replica(policy: &Policy, store: &str, prefix: &str, n: usize) -> Node {
        let config: CountersConfig =
            toml::from_str(&format!("store = \"{store}\"\nmode = \"exact\"\nkey_prefix = \"{prefix}\"")).unwrap();
        let mut book = LimitBook::new(policy, n as u64 + 7);
        book.enable_journal();
        let exact = Exact::new(&config, ["p"].into_iter(), format!("replica-{n}")).unwrap();
        Node { exact: Some(exact), state: Arc::default(), book: Mutex::new(book) }
    }

    /// Makes `call` at `now`: directly when alone, in the fleet's order otherwise.
    async fn run<R: Send + 'static>(
        &self,
        now: Nanos,
        call: impl FnOnce(&mut LimitBook, Nanos) -> R + Send + 'static,
    ) -> R {
        match &self.exact {
            None => call(&mut self.book.lock().unwrap(), now),
            Some(exact) => exact.call(&self.state, 0, &self.book, move || now, call, |_, _, _| {}).await,
        }
    }
}

impl Node {
    /// A replica's arrival, as the proxy makes it: made without waiting; the
    /// request's last call (or `all_shipped`, before a refusal is answered)
    /// ships its changes and waits for them.
    async fn arrive(&self, now: Nanos, req: RequestInfo) -> Option<gateway_core::RequestId> {
        let exact = self.exact.as_ref().expect("a replica");
        let call = move |book: &mut LimitBook, now| match book.handle_request(now, &req) {
            RequestDecision::Forward(a) => Some(a.id),
            RequestDecision::Reject(_) => None,
        };
        let id = exact.call_unshipped(&self.state, 0, &self.book, move || now, call, |_, _, _| {}).await;
        if id.is_none() {
            exact.all_shipped(&self.state, 0).await;
        }
        id
    }
}

/// Caller `n`'s request (from IP 10.0.0.n) asking for `max_tokens`, with a
/// prompt estimated at 20 tokens.
fn request(n: u64, max_tokens: u64) -> RequestInfo {
    RequestInfo {
        ip: format!("10.0.0.{n}"),
        max_tokens: Some(max_tokens),
        prompt_tokens_estimate: Some(20),
        ..RequestInfo::default()
    }
}

/// A call: (gap in ms, caller, latency in ms, status, tokens, max_tokens).
type Call = (u64, usize, u64, u16, u64, u64);

/// Feeds the timed calls in one serialized order, call i to node i % n: its
/// arrival, then its completion `latency` later. Returns every decision and
/// every header the limits added.
async fn replay(nodes: &[Node], calls: &[Call]) -> Vec<String> {
    let mut events: Vec<(u64, u8, usize)> = Vec::new();
    let mut t = 0;
    for (i, call) in calls.iter().enumerate() {
        t += call.0 * 1_000_000;
        events.push((t, 0, i));
    }
    let mut ids = vec![None; calls.len()];
    let mut seen = Vec::new();
    while let Some(pos) = (0..events.len()).min_by_key(|&k| events[k]) {
        let (now, phase, i) = events.swap_remove(pos);
        let (_, caller, latency_ms, status, tokens, max_tokens) = calls[i];
        let node = &nodes[i % nodes.len()];
        if phase == 0 {
            let req = request(caller as u64, max_tokens);
            let decision = node
                .run(Nanos(now), move |book, now| match book.handle_request(now, &req) {
                    RequestDecision::Forward(a) => Ok(a.id),
                    RequestDecision::Reject(r) => Err(format!("{} {:?} {:?}", r.status, r.retry_after_secs, r.headers)),
                })
                .await;
            match decision {
                Ok(id) => {
                    ids[i] = Some(id);
                    events.push((now + latency_ms * 1_000_000, 1, i));
                    seen.push(format!("{i} in"));
                }
                Err(rejection) => seen.push(format!("{i} {rejection}")),
            }
        } else {
            let info = ResponseInfo {
                status: Some(status),
                total_tokens: tokens,
                request_bytes: 100,
                response_bytes: 4 * tokens,
            };
            let id = ids[i].unwrap();
            let headers =
                node.run(Nanos(now), move |book, now| book.handle_response(now, id, &info).unwrap().headers).await;
            seen.push(format!("{i} out {headers:?}"));
        }
    }
    seen
}

/// The same serialized calls through one in-process core and through three
/// replicas in exact mode on one Redis: every decision, every retry-after and
/// every remaining-count header is the same. (A runner of its own rather than
/// `proptest!`, so that the one `redis-server` of all cases is stopped at the end.)
#[test]
fn three_replicas_in_exact_mode_decide_as_one_core() {
    let redis = Redis::start();
    let policy = Policy::from_toml(ALL_COUNTERS).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let case = AtomicUsize::new(0);
    let calls = prop::collection::vec(
        (0u64..3_000, 0..3usize, 0u64..8_000, prop::sample::select(vec![200u16, 200, 429, 500]), 0u64..300, 1u64..200),
        1..120,
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let outcome = runner.run(&calls, |calls| {
        // Each case has keys of its own in the one store.
        let prefix = format!("case{}", case.fetch_add(1, Ordering::Relaxed));
        let (single, fleet) = runtime.block_on(async {
            let one = [Node::alone(&policy)];
            let three: Vec<Node> = (0..3).map(|n| Node::replica(&policy, &redis.url(), &prefix, n)).collect();
            (replay(&one, &calls).await, replay(&three, &calls).await)
        });
        prop_assert_eq!(single, fleet);
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    assert_eq!(case.load(Ordering::Relaxed), 48, "every case ran");
}

fn fleet_config(mode: &str, backend: &str, store: &str, prefix: &str) -> String {
    format!(
        r#"
anonymous_product = "p"
subscriptions = []

[counters]
store = "{store}"
mode = "{mode}"
sync_interval = "1s"
key_prefix = "{prefix}"

[[products]]
name = "p"
[[products.policy.limits]]
type = "rate-limit-by-key"
calls = 25
renewal_period = 60
counter_key = {{ const = "all" }}

[routing]
set_backend = "b"
backends = [{{ id = "b", url = "{backend}" }}]
"#
    )
}

/// Fires `per_replica` calls at each replica at once; returns (admitted, 429s).
async fn burst(replicas: &[String], per_replica: usize) -> (usize, usize) {
    let client = reqwest::Client::new();
    let calls = replicas.iter().flat_map(|base| {
        let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
        let client = client.clone();
        (0..per_replica).map(move |_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.post(url).json(&json!({"messages": []})).send().await.unwrap().status() })
        })
    });
    let statuses = futures_util::future::join_all(calls.collect::<Vec<_>>()).await;
    let statuses: Vec<u16> = statuses.into_iter().map(|s| s.unwrap().as_u16()).collect();
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(admitted + refused, statuses.len(), "only 200s and 429s: {statuses:?}");
    (admitted, refused)
}

/// 150 parallel calls over three replicas under a limit of 25: exact mode lets
/// exactly 25 through. The same burst in lagged mode (the control) lets each
/// replica count alone until its next sync, and overshoots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_over_three_exact_replicas_never_passes_the_limit() {
    let redis = Redis::start();
    let backend = MockServer::start().await;
    let body = json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
    let answer = ResponseTemplate::new(200).set_body_json(body).set_delay(Duration::from_millis(20));
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    for (mode, prefix) in [("exact", "burst-exact"), ("lagged", "burst-lagged")] {
        let config = fleet_config(mode, &backend.uri(), &redis.url(), prefix);
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(replica(&config).await.base);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (admitted, refused) = burst(&replicas, 50).await;
        match mode {
            "exact" => assert_eq!((admitted, refused), (25, 125), "exact: the limit across the fleet"),
            _ => assert!(admitted > 25, "lagged: each replica counts alone between syncs ({admitted} admitted)"),
        }
    }
}

/// How many counter changes a product's stream holds, over all its entries.
fn changes_in_stream(url: &str, stream: &str) -> usize {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut con).unwrap();
    let batches = reply.ids.iter().map(|entry| entry.get::<String>("e").expect("an entry holds its changes"));
    batches
        .map(|text| serde_json::from_str::<serde_json::Value>(&text).unwrap()["changes"].as_array().unwrap().len())
        .sum()
}

/// A request's changes are in the store before its client hears back (its
/// completion's call returns, or its refusal is answered), so a replica killed
/// right after answering leaves nothing behind that the fleet does not know:
/// after every request the stream holds exactly the changes one journaling
/// core made for the same calls.
#[test]
fn every_change_is_in_the_store_before_the_client_hears_back() {
    let redis = Redis::start();
    let policy = Policy::from_toml(ALL_COUNTERS).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let node = Node::replica(&policy, &redis.url(), "durable", 0);
    let mut alone = LimitBook::new(&policy, 1);
    alone.enable_journal();
    let mut expected = 0;
    for i in 0..40u64 {
        let now = Nanos(i * 50_000_000);
        let req = request(i % 3, 40);
        let admitted = match alone.handle_request(now, &req) {
            RequestDecision::Forward(a) => Some(a.id),
            RequestDecision::Reject(_) => None,
        };
        let id = runtime.block_on(node.arrive(now, req));
        assert_eq!(id.is_some(), admitted.is_some(), "call {i}: the same decision");
        let done = ResponseInfo { status: Some(200), total_tokens: 30 + i, request_bytes: 100, response_bytes: 200 };
        if let Some(id) = id {
            alone.handle_response(now, admitted.unwrap(), &done).unwrap();
            runtime.block_on(node.run(now, move |book, now| {
                book.handle_response(now, id, &done).unwrap();
            }));
        }
        while alone.poll_delta().is_some() {
            expected += 1;
        }
        assert_eq!(changes_in_stream(&redis.url(), "durable:p:changes"), expected, "after call {i}");
    }
    assert!(expected > 40, "the calls changed counters ({expected} changes)");
}

/// A replica whose lock another replica now holds (its lease ran out while it
/// stalled, and the lock passed on) learns so from its next shipment and stops
/// deciding on its own: its next call waits for the lock and takes it again.
/// A replica that kept believing in its lease would decide beside the holder.
#[test]
fn a_lease_taken_over_in_the_store_is_given_up_at_the_next_shipment() {
    let redis = Redis::start();
    let policy = Policy::from_toml(ALL_COUNTERS).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let node = Node::replica(&policy, &redis.url(), "taken", 0);
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let call = |i: u64| {
        let req = request(i, 40);
        node.run(Nanos(i * 1_000_000), move |book, now| {
            matches!(book.handle_request(now, &req), RequestDecision::Forward(_))
        })
    };
    assert!(runtime.block_on(call(1)), "the first call is admitted");
    assert_eq!(node.state.acquisitions.load(Ordering::Relaxed), 1);
    let _: () =
        redis::cmd("SET").arg("taken:p:lock").arg("another-replica").arg("PX").arg(300).query(&mut con).unwrap();
    // The next shipment (the shipper's renewal, or this call's own) sees the
    // other holder; a call after that cannot be made before the lock is free.
    runtime.block_on(call(2));
    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    runtime.block_on(call(3));
    assert_eq!(node.state.acquisitions.load(Ordering::Relaxed), 2, "the lock was taken again");
    let holder: String = redis::cmd("GET").arg("taken:p:lock").query(&mut con).unwrap();
    assert!(holder.starts_with("replica-0:"), "the lock is this replica's again, not still the other's: {holder}");
}
