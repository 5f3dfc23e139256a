//! The proxy against scripted backends (wiremock, and the mock's broken streams):
//! retry waits, failover, circuit breaking, timeouts and final statuses are the
//! core's decisions, carried out over real HTTP.

use proxy::server::Proxy;
use proxy::ProxyConfig;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod common;

struct Running {
    base: String,
    admin: String,
    client: reqwest::Client,
}

async fn start(config: &str) -> Running {
    let config = ProxyConfig::from_toml("test.toml", config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let admin_base = format!("http://{}", admin.local_addr().unwrap());
    let proxy = Arc::new(Proxy::new(config).unwrap());
    tokio::spawn(proxy::serve(proxy, listener, admin, std::future::pending()));
    Running { base, admin: admin_base, client: reqwest::Client::new() }
}

impl Running {
    async fn chat(&self, body: Value) -> reqwest::Response {
        self.chat_with(&[("api-key", "k")], body).await
    }

    /// A chat call that carries exactly `fields` besides what the client adds.
    async fn chat_with(&self, fields: &[(&str, &str)], body: Value) -> reqwest::Response {
        let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", self.base);
        let request = fields.iter().fold(self.client.post(url), |r, (name, value)| r.header(*name, *value));
        request.json(&body).send().await.unwrap()
    }

    async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }
}

/// A real mock deployment from the mock config `text`, serving on a free port; its URL.
async fn start_mock(text: &str) -> String {
    let mock = mock_aoai::MockConfig::from_toml("mock.toml", text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(mock_aoai::server::serve(listener, mock, std::future::pending()));
    url
}

fn config(primary: &str, secondary: &str, routing_extra: &str, limits: &str) -> String {
    format!(
        r#"
[[subscriptions]]
id = "s"
key = "k"
products = ["p"]

[[products]]
name = "p"
{limits}

[routing]
set_backend = "primary"
backends = [
    {{ id = "primary", url = "{primary}" {breaker} }},
    {{ id = "secondary", url = "{secondary}" }},
]
{routing_extra}
"#,
        breaker = if routing_extra.contains("#breaker") {
            ", circuit_breaker = { failure_count = 2, interval = 60, statuses = \">=500\", trip_duration = 30 }"
        } else {
            ""
        }
    )
}

const RETRY: &str = "retry = { condition = \"429, >=500\", count = 3, interval = 0.2, switch = [{ when = \"429, >=500\", backend = \"secondary\" }] }";

fn ok_body() -> Value {
    json!({"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
}

#[tokio::test]
async fn a_429_fails_over_to_the_secondary_after_the_retry_interval() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .and(path_regex("/openai/.*"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .expect(1)
        .mount(&primary)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .expect(1)
        .mount(&secondary)
        .await;
    let proxy = start(&config(&primary.uri(), &secondary.uri(), RETRY, "")).await;
    let started = Instant::now();
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    let waited = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(waited >= Duration::from_millis(200), "the retry interval is waited: {waited:?}");
    let m = proxy.metrics().await;
    assert!(waited < Duration::from_millis(900), "APIM-compatible mode ignores Retry-After: {waited:?}\n{m}");
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("limitlab_failovers_total 1"), "{metrics}");
    assert!(metrics.contains("limitlab_tokens_total{key=\"s\",backend=\"secondary\",kind=\"prompt\"} 10"), "{metrics}");
}

#[tokio::test]
async fn honoring_retry_after_waits_the_backends_advice() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after-ms", "700"))
        .mount(&primary)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .mount(&secondary)
        .await;
    let routing = format!("honor_retry_after = true\n{RETRY}");
    let proxy = start(&config(&primary.uri(), &secondary.uri(), &routing, "")).await;
    let started = Instant::now();
    assert_eq!(proxy.chat(json!({"messages": []})).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(700), "{:?}", started.elapsed());
}

#[tokio::test]
async fn when_retries_run_out_the_client_gets_the_last_response_unchanged() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("primary down"))
        .expect(1)
        .mount(&primary)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("secondary busy").insert_header("x-from", "secondary"))
        .expect(3)
        .mount(&secondary)
        .await;
    let proxy = start(&config(&primary.uri(), &secondary.uri(), RETRY, "")).await;
    let r = proxy.chat(json!({"messages": []})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-from"], "secondary");
    assert_eq!(r.text().await.unwrap(), "secondary busy");
}

#[tokio::test]
async fn a_tripped_breaker_answers_503_without_calling_the_backend() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(2).mount(&primary).await;
    // A second product, whose lifecycle keeps breakers of its own.
    let other_product =
        "#breaker\n[[subscriptions]]\nid = \"s2\"\nkey = \"k2\"\nproducts = [\"q\"]\n[[products]]\nname = \"q\"\n";
    let proxy = start(&config(&primary.uri(), &secondary.uri(), other_product, "")).await;
    assert_eq!(proxy.chat(json!({})).await.status(), 500);
    assert_eq!(proxy.chat(json!({})).await.status(), 500);
    let r = proxy.chat(json!({})).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 29);
    let metrics = proxy.metrics().await;
    for (labels, open) in [("product=\"p\",backend=\"primary\"", 1), ("product=\"q\",backend=\"primary\"", 0)] {
        assert!(metrics.contains(&format!("limitlab_circuit_open{{{labels}}} {open}")), "{labels}: {metrics}");
    }
}

#[tokio::test]
async fn a_slow_backend_times_out_with_504() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()).set_delay(Duration::from_millis(2500)))
        .mount(&primary)
        .await;
    let proxy = start(&config(&primary.uri(), &secondary.uri(), "timeout = 1", "")).await;
    let started = Instant::now();
    let r = proxy.chat(json!({})).await;
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(2000));
}

#[tokio::test]
async fn a_client_that_leaves_during_an_attempt_is_logged_as_client_gone() {
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()).set_delay(Duration::from_millis(2000)))
        .mount(&primary)
        .await;
    let proxy = start(&config(&primary.uri(), &secondary.uri(), "", "")).await;
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    let impatient = proxy.client.post(url).header("api-key", "k").json(&json!({})).timeout(Duration::from_millis(300));
    assert!(impatient.send().await.is_err(), "the client gives up first");
    // The proxy sees the connection close and ends the request in the core.
    let mut metrics = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = proxy.metrics().await;
        if metrics.contains("reason=\"client-gone\"") {
            break;
        }
    }
    assert!(
        metrics.contains("limitlab_requests_total{status=\"499\",reason=\"client-gone\",product=\"p\",backend=\"\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_aborts_a_stream_is_logged_as_499_client_gone() {
    // A slow stream: 200 tokens at 20 ms each.
    let text = "seed = 1\n[[deployments]]\nname = \"gpt-4o\"\nmodel = \"gpt-4o\"\ntpm = 100000000\nrpm = 100000000\n\
                completion_tokens = { fixed = 200 }\nlatency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 20 } }\n";
    let mock_url = start_mock(text).await;
    let proxy = start(&config(&mock_url, &mock_url, "", "")).await;
    let streamed = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})).await;
    assert_eq!(streamed.status(), 200);
    let mut chunks = streamed.bytes_stream();
    assert!(futures_util::StreamExt::next(&mut chunks).await.is_some(), "a first chunk");
    drop(chunks);
    let mut metrics = String::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = proxy.metrics().await;
        if metrics.contains("reason=\"client-gone\"") {
            break;
        }
    }
    let line = "limitlab_requests_total{status=\"499\",reason=\"client-gone\",product=\"p\",backend=\"primary\"} 1";
    assert!(metrics.contains(line), "{metrics}");
}

#[tokio::test]
async fn every_choice_a_call_asks_for_is_charged_with_or_without_a_usage_chunk() {
    let text = "seed = 1\n[[deployments]]\nname = \"gpt-4o\"\nmodel = \"gpt-4o\"\ntpm = 100000000\nrpm = 100000000\n\
                completion_tokens = { fixed = 6 }\nlatency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 0 } }\n";
    let mock_url = start_mock(text).await;
    let proxy = start(&config(&mock_url, &mock_url, "", "")).await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let completion = |metrics: &str| charged(metrics, "completion").parse::<u64>().unwrap_or(0);
    // (request, completion tokens charged: 6 for each choice).
    let cases = [
        (json!({"messages": messages, "n": 3}), 18),
        (json!({"messages": messages, "n": 2, "stream": true, "stream_options": {"include_usage": true}}), 12),
        // No usage chunk: each choice's streamed text is counted.
        (json!({"messages": messages, "n": 2, "stream": true}), 12),
    ];
    for (request, tokens) in cases {
        let before = completion(&proxy.metrics().await);
        let r = proxy.chat(request.clone()).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        // The charge is made as the body ends; wait for it, then a little more
        // for any charge beyond it.
        let mut metrics = proxy.metrics().await;
        for _ in 0..40 {
            if completion(&metrics) - before >= tokens {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            metrics = proxy.metrics().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = proxy.metrics().await;
        assert_eq!(completion(&metrics) - before, tokens, "{request}:\n{metrics}");
    }
}

#[tokio::test]
async fn a_broken_stream_is_charged_for_what_was_sent() {
    // A real mock deployment whose streams always break midway.
    let text = "seed = 1\n[[deployments]]\nname = \"gpt-4o\"\nmodel = \"gpt-4o\"\ntpm = 100000000\nrpm = 100000000\n\
                completion_tokens = { fixed = 400 }\nlatency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 1 } }\n\
                faults = { broken_stream = 1.0 }\n";
    let mock_url = start_mock(text).await;
    let limits = "[[products.policy.limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 100000\nremaining_tokens_header_name = \"remaining\"\n";
    let proxy = start(&config(&mock_url, &mock_url, "", limits)).await;
    let streamed = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})).await;
    assert_eq!(streamed.status(), 200);
    // Read chunk by chunk: what arrived before the break is what the client got.
    let mut chunks = streamed.bytes_stream();
    let mut received = Vec::new();
    while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut chunks).await {
        received.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    assert!(!text.contains("[DONE]"), "the stream broke");
    let sent: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    let sent_tokens = tokenizer::count("gpt-4o", &sent);
    // The charge happens when the proxy sees the stream end; give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = proxy.metrics().await;
    let prompt = 8; // 3 + (3 + "user" + "hi") in o200k_base
    assert!(sent_tokens > 0, "the mock's seed breaks this stream after some tokens");
    assert!(
        metrics.contains(&format!("kind=\"completion\"}} {sent_tokens}")),
        "charged completion tokens = streamed ({sent_tokens}):\n{metrics}"
    );
    assert!(metrics.contains(&format!("kind=\"prompt\"}} {prompt}")), "{metrics}");
}

#[tokio::test]
async fn a_malformed_backend_answer_becomes_502() {
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", garbage.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = garbage.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"this is not HTTP at all\r\n\r\n").await;
        }
    });
    let proxy = start(&config(&url, &url, "", "")).await;
    let r = proxy.chat(json!({})).await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("not valid HTTP"));
    assert!(proxy.metrics().await.contains("reason=\"bad-response\""));
}

/// A backend that answers 200 with a `Content-Length` of 1,000 and closes after 10 bytes.
async fn truncating_backend() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
            let _ = socket.write_all(format!("{head}{{\"id\": \"x\"").as_bytes()).await;
        }
    });
    url
}

#[tokio::test]
async fn a_body_that_breaks_is_the_cores_502_and_increment_conditions_see_502() {
    let url = truncating_backend().await;
    // Counted only on 2xx: a broken body is a 502, so it is not counted, and the
    // second call is still admitted.
    let limits = "[[products.policy.limits]]\ntype = \"rate-limit-by-key\"\ncalls = 1\nrenewal_period = 60\ncounter_key = \"ip\"\nincrement_condition = \"200-299\"\n";
    let proxy = start(&config(&url, &url, "", limits)).await;
    for call in 1..=2 {
        let r = proxy.chat(json!({})).await;
        assert_eq!(r.status(), 502, "call {call}");
        assert_eq!(
            r.text().await.unwrap(),
            r#"{"statusCode": 502, "message": "Bad gateway: the backend's response was incomplete"}"#
        );
    }
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            "limitlab_requests_total{status=\"502\",reason=\"bad-response\",product=\"p\",backend=\"primary\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn trusted_proxies_name_the_client_by_x_forwarded_for() {
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let limits = "[[products.policy.limits]]\ntype = \"rate-limit-by-key\"\ncalls = 1\nrenewal_period = 60\ncounter_key = \"ip\"\n";
    async fn send(proxy: &Running, forwarded: &str) -> u16 {
        proxy.chat_with(&[("api-key", "k"), ("x-forwarded-for", forwarded)], json!({})).await.status().as_u16()
    }
    let trusting =
        start(&format!("trusted_proxies = [\"127.0.0.1\"]\n{}", config(&backend.uri(), &backend.uri(), "", limits)))
            .await;
    assert_eq!(send(&trusting, "203.0.113.5").await, 200);
    assert_eq!(send(&trusting, "203.0.113.5").await, 429, "the same client");
    assert_eq!(
        send(&trusting, "198.51.100.7, 203.0.113.5").await,
        429,
        "the right-most untrusted address is the client"
    );
    assert_eq!(send(&trusting, "203.0.113.9").await, 200, "another client");
    let untrusting = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    assert_eq!(send(&untrusting, "203.0.113.5").await, 200);
    assert_eq!(send(&untrusting, "203.0.113.9").await, 429, "the header is ignored: both are 127.0.0.1");
}

#[tokio::test]
async fn clients_may_speak_http2() {
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2
        .post(format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base))
        .header("api-key", "k")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
}

/// Fields that a `Connection` header names are hop-by-hop (RFC 9110 §7.6.1):
/// the proxy passes on neither them nor `Connection`, in either direction,
/// and every other field as it came.
#[tokio::test]
async fn fields_named_by_connection_are_not_passed_on() {
    let backend = MockServer::start().await;
    let answer = ResponseTemplate::new(200)
        .set_body_json(ok_body())
        .insert_header("connection", "x-internal")
        .insert_header("x-internal", "backend's own")
        .insert_header("x-kept", "1");
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let fields = [
        ("api-key", "k"),
        ("connection", "X-Private, keep-alive"),
        ("x-private", "for the proxy"),
        ("x-public", "for the backend"),
    ];
    let r = proxy.chat_with(&fields, json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-internal").is_none(), "{:?}", r.headers());
    assert_eq!(r.headers()["x-kept"], "1");
    let received = backend.received_requests().await.unwrap();
    let headers = &received[0].headers;
    assert!(headers.get("x-private").is_none() && headers.get("connection").is_none(), "{headers:?}");
    assert_eq!(headers["x-public"], "for the backend");
}

#[tokio::test]
async fn a_key_in_apims_subscription_header_is_never_passed_on() {
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let fields = [("Ocp-Apim-Subscription-Key", "k"), ("x-public", "for the backend")];
    let r = proxy.chat_with(&fields, json!({})).await;
    assert_eq!(r.status(), 200);
    let received = backend.received_requests().await.unwrap();
    let headers = &received[0].headers;
    assert!(headers.get("ocp-apim-subscription-key").is_none(), "the client's key reached the backend: {headers:?}");
    assert_eq!(headers["x-public"], "for the backend");
}

#[tokio::test]
async fn a_bearer_token_that_is_a_key_is_read_as_the_key_and_never_passed_on() {
    // The `openai` SDK's plain client (`OpenAI(base_url=.../openai/v1/)`) sends
    // its key as `Authorization: Bearer KEY`.
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    assert_eq!(proxy.chat_with(&[("authorization", "Bearer k")], json!({})).await.status(), 200);
    let received = backend.received_requests().await.unwrap();
    assert!(received[0].headers.get("authorization").is_none(), "the client's key reached the backend");
    // A bearer token that is no key (a JWT, say) is still no key at all.
    let r = proxy.chat_with(&[("authorization", "Bearer e30.e30.c2ln")], json!({})).await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("missing subscription key"));
    assert_eq!(proxy.chat_with(&[("authorization", "Basic k")], json!({})).await.status(), 401);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let backend = MockServer::start().await;
    let proxy = start(&format!("max_body_bytes = 1000\n{}", config(&backend.uri(), &backend.uri(), "", ""))).await;
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "x".repeat(2000)}]})).await;
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn a_policy_files_set_headers_apply_to_the_backend_request_and_the_response() {
    use wiremock::matchers::header;
    let backend = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("x-team", "blue"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .expect(1)
        .mount(&backend)
        .await;
    let dir = std::env::temp_dir().join(format!("limitlab-set-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xml = dir.join("policy.xml");
    std::fs::write(
        &xml,
        r#"<policies>
  <inbound><base /><set-header name="X-Team" exists-action="override"><value>blue</value></set-header></inbound>
  <backend><base /></backend>
  <outbound><base /><set-header name="X-Served-By" exists-action="override"><value>limitlab</value></set-header></outbound>
  <on-error><base /></on-error>
</policies>"#,
    )
    .unwrap();
    let text = config(&backend.uri(), &backend.uri(), "", "")
        .replace("name = \"p\"\n", &format!("name = \"p\"\npolicy = {:?}\n", xml.display().to_string()));
    let proxy = start(&text).await;
    let r = proxy.chat(json!({})).await;
    assert_eq!(r.status(), 200, "the backend saw X-Team: blue");
    assert_eq!(r.headers()["x-served-by"], "limitlab");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_backends_absurd_usage_saturates_the_counters() {
    // u64::MAX tokens twice: without a token limit both are delivered, and the
    // token counters must stop at the top rather than wrap (or panic).
    let backend = MockServer::start().await;
    let max = u64::MAX;
    let body = json!({"usage": {"prompt_tokens": max, "completion_tokens": max, "total_tokens": max}});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(body)).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    for _ in 0..2 {
        assert_eq!(proxy.chat(json!({"messages": []})).await.status(), 200);
    }
    let metrics = proxy.metrics().await;
    let line = format!("limitlab_tokens_total{{key=\"s\",backend=\"primary\",kind=\"prompt\"}} {max}");
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test]
async fn an_empty_key_is_a_missing_key() {
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    for request in [
        proxy.client.post(&url).header("api-key", ""),
        proxy.client.post(&url).header("Ocp-Apim-Subscription-Key", ""),
        proxy.client.post(format!("{url}&subscription-key=")),
    ] {
        let r = request.json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.text().await.unwrap().contains("missing subscription key"));
    }
}

#[tokio::test]
async fn an_anonymous_product_serves_keyless_calls_without_a_subscription() {
    // As APIM serves an API that requires no subscription: no key, no
    // subscription and no product in the policy's view, so a limit keyed on
    // the subscription counts every anonymous call under one empty key.
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let limits = "[[products.policy.limits]]\ntype = \"rate-limit-by-key\"\ncalls = 2\nrenewal_period = 60\n\
                  counter_key = \"subscription_id\"\n";
    let text = format!("anonymous_product = \"p\"\n{}", config(&backend.uri(), &backend.uri(), "", limits));
    let proxy = start(&text).await;
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(proxy.client.post(&url).json(&json!({"messages": []})).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "keyless calls share the empty subscription key");
    assert_eq!(
        proxy.chat(json!({"messages": []})).await.status(),
        200,
        "a keyed call counts under its own subscription"
    );
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("limitlab_tokens_total{key=\"\",backend=\"primary\",kind=\"prompt\"}"), "{metrics}");
    let bad = format!("anonymous_product = \"nope\"\n{}", config(&backend.uri(), &backend.uri(), "", ""));
    let error = ProxyConfig::from_toml("bad.toml", &bad).map(|_| ()).unwrap_err();
    assert!(error.contains("`anonymous_product`: no product named `nope`"), "{error}");
}

#[tokio::test]
async fn limits_keyed_by_a_header_or_a_jwt_count_each_value_apart() {
    let backend = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(ok_body())).mount(&backend).await;
    let limits = r#"
[[products.policy.limits]]
type = "rate-limit-by-key"
calls = 1
renewal_period = 60
counter_key = { header = { name = "X-Team", default = "none" } }

[[products.policy.limits]]
type = "rate-limit-by-key"
calls = 2
renewal_period = 60
counter_key = { jwt = { claim = "sub", header = "X-User-Token" } }
"#;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    // A token whose payload is {"sub":"u1"}; its signature is not checked.
    let token = "Bearer e30.eyJzdWIiOiJ1MSJ9.c2ln";
    let call = |team: Option<&str>| {
        let mut request = proxy.client.post(&url).header("api-key", "k").header("x-user-token", token);
        if let Some(team) = team {
            request = request.header("x-team", team);
        }
        async move { request.json(&json!({})).send().await.unwrap().status().as_u16() }
    };
    // The header limit counts each team apart, a missing header as "none"; the
    // JWT limit counts the one user across all of them.
    let statuses = [call(Some("a")).await, call(Some("a")).await, call(Some("b")).await, call(None).await];
    assert_eq!(statuses, [200, 429, 200, 429]);
}

#[test]
fn two_subscriptions_with_one_key_are_refused_even_from_the_environment() {
    std::env::set_var("LIMITLAB_TEST_DUPLICATE_KEY", "k");
    let text = config("http://127.0.0.1:9", "http://127.0.0.1:9", "", "").replacen(
        "[[products]]",
        "[[subscriptions]]\nid = \"t\"\nkey_env = \"LIMITLAB_TEST_DUPLICATE_KEY\"\nproducts = [\"p\"]\n\n[[products]]",
        1,
    );
    let config = ProxyConfig::from_toml("test.toml", &text).unwrap();
    let err = Proxy::new(config).err().expect("refused");
    assert!(err.contains("subscriptions `s` and `t` have the same key"), "{err}");
}

/// `config` with a credential on each backend.
fn config_with_credentials(
    primary: &str,
    primary_credential: &str,
    secondary: &str,
    secondary_credential: &str,
) -> String {
    config(primary, secondary, RETRY, "")
        .replacen(
            &format!("url = \"{primary}\" "),
            &format!("url = \"{primary}\", credential = {primary_credential} "),
            1,
        )
        .replacen(
            &format!("url = \"{secondary}\" "),
            &format!("url = \"{secondary}\", credential = {secondary_credential} "),
            1,
        )
}

#[tokio::test]
async fn backends_get_their_own_credential_and_never_the_clients_key() {
    std::env::set_var("LIMITLAB_TEST_BEARER", "from-env");
    let (primary, secondary) = (MockServer::start().await, MockServer::start().await);
    // Each backend answers 200 only with its own credential; anything else is a 429,
    // which the retry would carry to the other backend and the metrics would show.
    Mock::given(wiremock::matchers::header("api-key", "primary-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .mount(&primary)
        .await;
    Mock::given(wiremock::matchers::header("authorization", "Bearer from-env"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .mount(&secondary)
        .await;
    for backend in [&primary, &secondary] {
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(429)).with_priority(10).mount(backend).await;
    }
    let text = config_with_credentials(
        &primary.uri(),
        "{ api_key = \"primary-secret\" }",
        &secondary.uri(),
        "{ bearer_env = \"LIMITLAB_TEST_BEARER\" }",
    );
    let proxy = start(&text).await;
    assert_eq!(proxy.chat(json!({})).await.status(), 200);
    let sent = primary.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].headers.get_all("api-key").iter().collect::<Vec<_>>(),
        ["primary-secret"],
        "not the client's `k`"
    );
    // The secondary, reached once the primary is down, gets its bearer token.
    primary.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&primary).await;
    assert_eq!(proxy.chat(json!({})).await.status(), 200);
    let sent = secondary.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].headers.get("api-key").is_none(), "the client's key is never forwarded");
}

#[test]
fn a_credential_from_an_unset_variable_is_refused_at_start() {
    let text = config_with_credentials(
        "http://127.0.0.1:9",
        "{ api_key_env = \"LIMITLAB_TEST_NEVER_SET\" }",
        "http://127.0.0.1:8",
        "{ api_key = \"bad\\nvalue\" }",
    );
    let err = Proxy::new(ProxyConfig::from_toml("test.toml", &text).unwrap()).err().expect("refused");
    assert!(
        err.contains("backend `primary`: environment variable `LIMITLAB_TEST_NEVER_SET` is not set or empty"),
        "{err}"
    );
    std::env::set_var("LIMITLAB_TEST_SET_LATER", "fine");
    let text = text.replace("LIMITLAB_TEST_NEVER_SET", "LIMITLAB_TEST_SET_LATER");
    let err = Proxy::new(ProxyConfig::from_toml("test.toml", &text).unwrap()).err().expect("refused");
    assert!(err.contains("backend `secondary`: the `api-key` credential is not a valid header value"), "{err}");
}

/// An HTTP/1.1 backend over TLS whose certificate (for `localhost`) is signed by
/// no public authority; returns its URL and its certificate as PEM.
async fn private_tls_backend() -> (String, String) {
    let (acceptor, _, pem) = common::localhost_tls(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else { return };
                let service = hyper::service::service_fn(|_| async {
                    let body = http_body_util::Full::new(axum::body::Bytes::from(ok_body().to_string()));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (url, pem)
}

#[tokio::test]
async fn an_https_backend_signed_by_a_private_ca_is_trusted_only_through_ca_files() {
    let (url, pem) = private_tls_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pem).unwrap();
    let plain = config(&url, &url, "", "");
    // Without the authority the handshake fails: the attempt is a transport
    // failure, which APIM answers with its 500.
    let untrusting = start(&plain).await;
    assert_eq!(untrusting.chat(json!({})).await.status(), 500);
    assert!(untrusting.metrics().await.contains("reason=\"transport-failure\""));
    let trusting = start(&format!("ca_files = [{:?}]\n{plain}", ca_file.display().to_string())).await;
    let r = trusting.chat(json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["usage"]["total_tokens"], 15);
}

#[test]
fn ca_files_that_cannot_be_read_or_hold_no_certificate_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("limitlab-test-empty-ca.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let missing = dir.path().join("limitlab-test-no-such-ca.pem");
    for (file, expected) in [(&missing, "limitlab-test-no-such-ca.pem: "), (&empty, "no certificate in the file")] {
        let text =
            format!("ca_files = [{:?}]\n{}", file.display().to_string(), config("https://h", "https://h", "", ""));
        let err = Proxy::new(ProxyConfig::from_toml("test.toml", &text).unwrap()).err().expect("refused");
        assert!(err.contains("`ca_files`: ") && err.contains(expected), "{err}");
    }
}

#[tokio::test]
async fn a_long_uri_and_huge_headers_get_apims_414_and_431_with_bodies() {
    let backend = MockServer::start().await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let long = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x={}",
        proxy.base,
        "a".repeat(20_000)
    );
    let r = proxy.client.post(long).header("api-key", "k").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 414);
    assert_eq!(r.text().await.unwrap(), r#"{"statusCode": 414, "message": "Request URI too long"}"#);
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    let mut request = proxy.client.post(url).header("api-key", "k").json(&json!({}));
    for i in 0..10 {
        request = request.header(format!("x-big-{i}"), "b".repeat(8_000));
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.text().await.unwrap(), r#"{"statusCode": 431, "message": "Request header fields too large"}"#);
}

#[tokio::test]
async fn a_paced_stream_reaches_the_client_as_it_comes_not_at_its_end() {
    // Six tokens 150 ms apart: the proxy passes on in batches what has already
    // arrived, and must never hold an event back waiting for the next.
    let text = "seed = 1\n[[deployments]]\nname = \"gpt-4o\"\nmodel = \"gpt-4o\"\ntpm = 100000000\nrpm = 100000000\n\
                completion_tokens = { fixed = 6 }\nlatency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 150 } }\n";
    let mock_url = start_mock(text).await;
    let proxy = start(&config(&mock_url, &mock_url, "", "")).await;
    let started = Instant::now();
    let streamed = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})).await;
    assert_eq!(streamed.status(), 200);
    let mut chunks = streamed.bytes_stream();
    // When each content token reached the client.
    let mut arrivals = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
        let chunk = chunk.unwrap();
        let tokens = String::from_utf8_lossy(&chunk).matches("\"content\":\"").count();
        arrivals.extend(std::iter::repeat_n(started.elapsed(), tokens));
    }
    // The role chunk has empty content; the six tokens follow it.
    assert_eq!(arrivals.len(), 7, "the role chunk and six tokens");
    for (i, pair) in arrivals[1..].windows(2).enumerate() {
        let gap = pair[1].saturating_sub(pair[0]);
        assert!(gap >= Duration::from_millis(100), "token {} came {gap:?} after the one before: {arrivals:?}", i + 2);
    }
}

/// `body` compressed as `coding` (`gzip` or `deflate`, the latter zlib-wrapped
/// as RFC 9110 defines it).
fn compressed(coding: &str, body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let level = flate2::Compression::default();
    match coding {
        "gzip" => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            encoder.write_all(body).unwrap();
            encoder.finish().unwrap()
        }
        "deflate" => {
            let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
            encoder.write_all(body).unwrap();
            encoder.finish().unwrap()
        }
        other => panic!("no encoder for {other}"),
    }
}

/// A backend that compresses its answer as `coding` always, asked or not, as
/// a backend behind a CDN or another gateway may.
async fn compressing_backend(coding: &'static str, content_type: &'static str, body: &'static [u8]) -> MockServer {
    let backend = MockServer::start().await;
    let answer = ResponseTemplate::new(200)
        .insert_header("content-encoding", coding)
        .set_body_raw(compressed(coding, body), content_type);
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    backend
}

fn charged(metrics: &str, kind: &str) -> String {
    let prefix = format!("limitlab_tokens_total{{key=\"s\",backend=\"primary\",kind=\"{kind}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or("none").to_owned()
}

#[tokio::test]
async fn backends_are_asked_for_bodies_the_proxy_can_read() {
    // A backend that compresses when the request allows it, as HTTP servers do:
    // the `openai` SDKs send `Accept-Encoding: gzip, deflate`.
    let backend = MockServer::start().await;
    let answer = |request: &wiremock::Request| {
        let accepted = request.headers.get("accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or("");
        let body = serde_json::to_vec(&ok_body()).unwrap();
        match accepted.contains("gzip") {
            true => ResponseTemplate::new(200)
                .insert_header("content-encoding", "gzip")
                .set_body_raw(compressed("gzip", &body), "application/json"),
            false => ResponseTemplate::new(200).set_body_raw(body, "application/json"),
        }
    };
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let fields = [("api-key", "k"), ("accept-encoding", "gzip, deflate")];
    let r = proxy.chat_with(&fields, json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none(), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 15);
    let received = backend.received_requests().await.unwrap();
    assert_eq!(received[0].headers["accept-encoding"], "identity");
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("10".into(), "5".into()), "{metrics}");
}

#[tokio::test]
async fn a_body_compressed_unasked_is_passed_on_as_it_came_and_charged_its_usage() {
    for coding in ["gzip", "deflate"] {
        let body = br#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;
        let backend = compressing_backend(coding, "application/json", body).await;
        let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
        let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], coding);
        assert_eq!(r.bytes().await.unwrap(), compressed(coding, body), "{coding}: the client gets the backend's bytes");
        let metrics = proxy.metrics().await;
        let charges = (charged(&metrics, "prompt"), charged(&metrics, "completion"));
        assert_eq!(charges, ("10".into(), "5".into()), "{coding}: {metrics}");
        assert!(metrics.contains("limitlab_usage_unreadable_total 0"), "{metrics}");
    }
}

#[tokio::test]
async fn a_stream_compressed_unasked_is_charged_its_usage_chunk() {
    let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15}}\n\n\
        data: [DONE]\n\n";
    let backend = compressing_backend("gzip", "text/event-stream", stream).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.bytes().await.unwrap(), compressed("gzip", stream));
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("10".into(), "5".into()), "{metrics}");
}

#[tokio::test]
async fn a_body_the_proxy_cannot_read_is_charged_its_prompt_and_counted() {
    // Brotli, say: passed on untouched, its usage unknown. The prompt, counted
    // with the tokenizer, is charged, and `/metrics` says why nothing more is.
    let backend = MockServer::start().await;
    let answer = ResponseTemplate::new(200)
        .insert_header("content-encoding", "br")
        .set_body_raw(vec![0x1b, 0x2c, 0x00, 0xf8, 0xa5], "application/json");
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "br");
    let metrics = proxy.metrics().await;
    let prompt: u64 = charged(&metrics, "prompt").parse().unwrap_or(0);
    assert!(prompt > 0, "the prompt is charged: {metrics}");
    assert!(metrics.contains("limitlab_usage_unreadable_total 1"), "{metrics}");
}

/// A chat call whose body is `body` as given, with `Content-Encoding: coding`.
async fn coded_chat(proxy: &Running, coding: &str, body: Vec<u8>) -> reqwest::Response {
    let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", proxy.base);
    let request = proxy.client.post(url).header("api-key", "k").header("content-type", "application/json");
    request.header("content-encoding", coding).body(body).send().await.unwrap()
}

#[tokio::test]
async fn a_compressed_request_is_read_for_its_prompt_and_passed_on_as_sent() {
    // A stream without a usage chunk is charged its prompt as counted from the
    // request: the same whether the client compressed the body or not.
    let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: [DONE]\n\n";
    let backend = MockServer::start().await;
    let answer = ResponseTemplate::new(200).set_body_raw(stream, "text/event-stream");
    Mock::given(method("POST")).respond_with(answer).mount(&backend).await;
    let request = json!({"messages": [{"role": "user", "content": "How many tokens is this prompt?"}], "stream": true});
    let plain = serde_json::to_vec(&request).unwrap();
    let mut prompts = Vec::new();
    for coding in ["identity", "gzip", "deflate"] {
        let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
        let body = if coding == "identity" { plain.clone() } else { compressed(coding, &plain) };
        let r = coded_chat(&proxy, coding, body.clone()).await;
        assert_eq!(r.status(), 200, "{coding}");
        let _ = r.bytes().await.unwrap();
        let received = backend.received_requests().await.unwrap();
        let last = received.last().unwrap();
        assert_eq!(last.body, body, "{coding}: the backend gets the body as sent");
        assert_eq!(last.headers["content-encoding"], coding);
        prompts.push(charged(&proxy.metrics().await, "prompt"));
    }
    assert!(prompts[0].parse::<u64>().unwrap() > 5, "{prompts:?}");
    assert_eq!(prompts, vec![prompts[0].clone(); 3], "identity, gzip, deflate");
}

#[tokio::test]
async fn a_request_body_the_proxy_cannot_read_is_refused() {
    let backend = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body()))
        .expect(0)
        .mount(&backend)
        .await;
    let proxy = start(&format!("max_body_bytes = 1000\n{}", config(&backend.uri(), &backend.uri(), "", ""))).await;
    let check = |status: u16, coding: &'static str, body: Vec<u8>| {
        let proxy = &proxy;
        async move {
            let r = coded_chat(proxy, coding, body).await;
            assert_eq!(r.status(), status, "{coding}");
            let answer: Value = r.json().await.unwrap();
            assert_eq!(answer["statusCode"], status, "{coding}: an APIM-like body");
        }
    };
    check(415, "br", vec![0x1b, 0x2c, 0x00, 0xf8]).await;
    check(415, "gzip, br", vec![0x1b, 0x2c]).await;
    check(400, "gzip", b"{\"messages\": []}".to_vec()).await;
    // Small on the wire, over the body limit once decoded.
    let bomb = compressed("gzip", format!("{{\"messages\": [], \"pad\": \"{}\"}}", " ".repeat(5000)).as_bytes());
    assert!(bomb.len() < 1000);
    check(413, "gzip", bomb).await;
}

/// A Responses API call (`POST /openai/v1/responses`) with `body`.
async fn responses(proxy: &Running, body: Value) -> reqwest::Response {
    let url = format!("{}/openai/v1/responses", proxy.base);
    proxy.client.post(url).header("api-key", "k").json(&body).send().await.unwrap()
}

/// A backend that answers every call, whatever its method, with `body` as `content_type`.
async fn answering(content_type: &str, body: &str) -> MockServer {
    let backend = MockServer::start().await;
    let answer = ResponseTemplate::new(200).set_body_raw(body.as_bytes().to_vec(), content_type);
    Mock::given(path_regex(".*")).respond_with(answer).mount(&backend).await;
    backend
}

#[tokio::test]
async fn a_responses_api_body_is_charged_its_input_and_output_tokens() {
    // Before, `usage` without `prompt_tokens` was read as no usage: zero tokens.
    let body = r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4o",
        "output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]}]}],
        "usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,
        "output_tokens_details":{"reasoning_tokens":0},"total_tokens":14}}"#;
    let backend = answering("application/json", body).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = responses(&proxy, json!({"model": "gpt-4o", "input": "Say hello"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), body, "the client gets the backend's body");
    let requests = backend.received_requests().await.unwrap();
    assert_eq!(requests[0].url.path(), "/openai/v1/responses", "the path is passed on");
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("11".into(), "3".into()), "{metrics}");
    assert!(metrics.contains("limitlab_usage_unreadable_total 0"), "{metrics}");
}

#[tokio::test]
async fn a_responses_api_stream_is_charged_at_its_completed_event() {
    // No `[DONE]` ends a Responses stream: its last event carries the usage.
    let stream = "event: response.created\n\
        data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n\
        event: response.output_text.delta\n\
        data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hello\"}\n\n\
        event: response.completed\n\
        data: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":4,\"total_tokens\":16}}}\n\n";
    let backend = answering("text/event-stream", stream).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = responses(&proxy, json!({"model": "gpt-4o", "input": "Say hello", "stream": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), stream);
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("12".into(), "4".into()), "{metrics}");
}

#[tokio::test]
async fn a_responses_api_stream_without_usage_is_charged_its_prompt_and_text() {
    // The prompt as a Responses request counts it (instructions, then input),
    // and the text deltas streamed.
    let stream = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello there\"}\n\n";
    let backend = answering("text/event-stream", stream).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let request = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Say hello", "stream": true});
    let r = responses(&proxy, request.clone()).await;
    assert_eq!(r.text().await.unwrap(), stream);
    let metrics = proxy.metrics().await;
    let prompt = tokenizer::count_responses("gpt-4o", &request);
    let completion = tokenizer::count("gpt-4o", "Hello there");
    assert_eq!(charged(&metrics, "prompt"), prompt.to_string(), "{metrics}");
    assert_eq!(charged(&metrics, "completion"), completion.to_string(), "{metrics}");
}

#[tokio::test]
async fn a_usage_of_an_unknown_shape_is_charged_the_prompt_and_counted() {
    let backend = answering("application/json", r#"{"id":"x","usage":{"total_tokens":99}}"#).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    let metrics = proxy.metrics().await;
    let prompt = tokenizer::count_chat("gpt-4o", &[json!({"role": "user", "content": "hi"})]);
    assert_eq!(charged(&metrics, "prompt"), prompt.to_string(), "{metrics}");
    assert!(["none", "0"].contains(&charged(&metrics, "completion").as_str()), "no completion: {metrics}");
    assert!(metrics.contains("limitlab_usage_unreadable_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_document_sized_prompt_is_estimated_in_full() {
    // 50,000 tokens a minute, estimated prompts. Prompts this large are counted
    // off the worker thread; the estimate must still be the whole prompt's:
    // about 40,000 tokens fit, 60,000 do not.
    let limits = "[[products.policy.limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\n\
        tokens_per_minute = 50000\nestimate_prompt_tokens = true\n";
    let backend =
        answering("application/json", r#"{"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    for (words, status) in [(60_000, 429), (40_000, 200)] {
        let prompt = " word".repeat(words);
        let r = proxy.chat(json!({"messages": [{"role": "user", "content": prompt}]})).await;
        assert_eq!(r.status(), status, "{words} words: {}", r.text().await.unwrap());
    }
}

#[tokio::test]
async fn a_reserving_token_limit_sets_no_completion_aside_for_embeddings() {
    // 1,000 tokens a minute. A chat call without `max_tokens` reserves the
    // default allowance (4,096) and cannot fit; an embeddings call generates
    // nothing, so its prompt alone is reserved.
    let limits = "[[products.policy.limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\n\
        tokens_per_minute = 1000\nestimate_prompt_tokens = true\nreserve = true\n";
    let backend = answering(
        "application/json",
        r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}],
        "usage":{"prompt_tokens":2,"total_tokens":2}}"#,
    )
    .await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    let url = format!("{}/openai/deployments/emb/embeddings?api-version=2024-10-21", proxy.base);
    let r = proxy.client.post(url).header("api-key", "k").json(&json!({"input": "two words"})).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = proxy.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 429, "the default allowance still applies to a generation");
}

#[tokio::test]
async fn a_reserving_token_limit_reserves_the_responses_apis_max_output_tokens() {
    // Were `max_output_tokens` not read, the default of 1 token would be
    // reserved and both calls admitted.
    let limits = "[[products.policy.limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\n\
        tokens_per_minute = 1000\nestimate_prompt_tokens = true\nreserve = true\nreserve_default_max_tokens = 1\n";
    let backend = answering("application/json", r#"{"usage":{"input_tokens":5,"output_tokens":5}}"#).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    let r = responses(&proxy, json!({"model": "gpt-4o", "input": "hi", "max_output_tokens": 5000})).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    let r = responses(&proxy, json!({"model": "gpt-4o", "input": "hi", "max_output_tokens": 50})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_reserving_token_limit_sets_aside_max_tokens_for_each_choice_asked_for() {
    // 1,000 tokens a minute. Each choice may run to `max_tokens` (400): two
    // choices fit, three (`n`, or a legacy completion's `best_of`) do not.
    let limits = "[[products.policy.limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\n\
        tokens_per_minute = 1000\nestimate_prompt_tokens = true\nreserve = true\n";
    let backend =
        answering("application/json", r#"{"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", limits)).await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"messages": messages, "max_tokens": 400, "n": 3}), 429),
        (json!({"messages": messages, "max_tokens": 400, "n": 1, "best_of": 4}), 429),
        (json!({"messages": messages, "max_completion_tokens": 400, "n": 2}), 200),
        (json!({"messages": messages, "max_tokens": 400}), 200),
    ];
    for (request, status) in cases {
        let r = proxy.chat(request.clone()).await;
        assert_eq!(r.status(), status, "{request}: {}", r.text().await.unwrap());
    }
    // A legacy completion asks for `n` for each of its prompts (a list of
    // numbers is one prompt, as tokens).
    let url = format!("{}/openai/deployments/old/completions?api-version=2024-10-21", proxy.base);
    let cases = [
        (json!({"prompt": ["a", "b", "c"], "max_tokens": 400}), 429),
        (json!({"prompt": ["a"], "max_tokens": 400, "n": 3}), 429),
        (json!({"prompt": ["a", "b"], "max_tokens": 400}), 200),
        (json!({"prompt": [1, 2, 3, 4], "max_tokens": 400, "n": 2}), 200),
    ];
    for (request, status) in cases {
        let r = proxy.client.post(&url).header("api-key", "k").json(&request).send().await.unwrap();
        assert_eq!(r.status(), status, "{request}: {}", r.text().await.unwrap());
    }
}

#[tokio::test]
async fn a_streamed_tool_call_without_usage_is_charged_its_arguments() {
    // Most clients do not ask for a usage chunk: the stream is charged its
    // prompt and what the model wrote, and a tool call's arguments are that.
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Oslo\\\"}\"}}]}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n\
        data: [DONE]\n\n";
    let backend = answering("text/event-stream", stream).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    // The prompt is its messages and the tools it offers, which it pays for too.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}}}}}]);
    let request =
        json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools, "stream": true});
    let r = proxy.chat(request.clone()).await;
    assert_eq!(r.text().await.unwrap(), stream);
    let metrics = proxy.metrics().await;
    let completion = tokenizer::count("gpt-4o", "get_weather") + tokenizer::count("gpt-4o", "{\"city\": \"Oslo\"}");
    assert_eq!(charged(&metrics, "completion"), completion.to_string(), "{metrics}");
    let prompt = tokenizer::count_chat_request("gpt-4o", &request);
    let messages_alone = tokenizer::count_chat("gpt-4o", request["messages"].as_array().unwrap());
    assert!(prompt > messages_alone + 20, "the tools count: {prompt} against {messages_alone}");
    assert_eq!(charged(&metrics, "prompt"), prompt.to_string(), "{metrics}");
}

/// Answers the calls it gets with `bodies` in turn (JSON), the last one for ever after.
struct InTurn {
    bodies: Vec<&'static str>,
    calls: std::sync::atomic::AtomicUsize,
}

impl wiremock::Respond for InTurn {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = self.bodies[call.min(self.bodies.len() - 1)];
        ResponseTemplate::new(200).set_body_raw(body.as_bytes().to_vec(), "application/json")
    }
}

async fn get(proxy: &Running, path: &str) -> reqwest::Response {
    proxy.client.get(format!("{}{path}", proxy.base)).header("api-key", "k").send().await.unwrap()
}

const FINISHED: &str = r#"{"id":"resp_1","object":"response","status":"completed","background":false,
    "output":[],"usage":{"input_tokens":11,"output_tokens":3,"total_tokens":14}}"#;

#[tokio::test]
async fn a_stored_response_read_again_is_not_charged_again() {
    // A retrieval of a stored response or chat completion uses no tokens: were
    // it charged, each read would count the call's tokens once more.
    let backend = answering("application/json", FINISHED).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    assert_eq!(responses(&proxy, json!({"model": "gpt-4o", "input": "hi"})).await.status(), 200);
    for path in ["/openai/v1/responses/resp_1", "/openai/v1/responses/resp_1", "/openai/v1/chat/completions/chatcmpl_1"]
    {
        assert_eq!(get(&proxy, path).await.status(), 200, "{path}");
    }
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("11".into(), "3".into()), "{metrics}");
}

#[tokio::test]
async fn a_background_response_is_charged_once_by_the_read_that_shows_it_finished() {
    let backend = MockServer::start().await;
    let created =
        r#"{"id":"resp_bg","object":"response","status":"queued","background":true,"output":[],"usage":null}"#;
    let running =
        r#"{"id":"resp_bg","object":"response","status":"in_progress","background":true,"output":[],"usage":null}"#;
    let finished = r#"{"id":"resp_bg","object":"response","status":"completed","background":true,"output":[],
        "usage":{"input_tokens":20,"output_tokens":7,"total_tokens":27}}"#;
    let reads = InTurn { bodies: vec![running, finished], calls: Default::default() };
    Mock::given(method("GET")).respond_with(reads).mount(&backend).await;
    let create = ResponseTemplate::new(200).set_body_raw(created.as_bytes().to_vec(), "application/json");
    Mock::given(method("POST")).respond_with(create).mount(&backend).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let r = responses(&proxy, json!({"model": "gpt-4o", "input": "hi", "background": true})).await;
    assert_eq!(r.status(), 200);
    for _ in 0..4 {
        assert_eq!(get(&proxy, "/openai/v1/responses/resp_bg").await.status(), 200);
    }
    let metrics = proxy.metrics().await;
    assert_eq!((charged(&metrics, "prompt"), charged(&metrics, "completion")), ("20".into(), "7".into()), "{metrics}");
}

/// A generation whose backend leaves out `usage` (a compatible server, a
/// gateway between) is charged its prompt and what the model wrote, as the
/// proxy counts them; a body that is no generation is charged nothing. Before,
/// both were charged zero, so such a backend passed every token limit.
#[tokio::test]
async fn a_generation_whose_answer_reports_no_usage_is_charged_as_counted() {
    async fn check(path: &str, request: Value, answer: Value, prompt: u64, completion: u64, missing: u32) {
        let backend = answering("application/json", &answer.to_string()).await;
        let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
        let r = proxy.client.post(format!("{}{path}", proxy.base)).header("api-key", "k").json(&request);
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap(), answer, "{path}: the client gets the backend's body");
        let metrics = proxy.metrics().await;
        let zero_as_none = |n: u64| if n == 0 { "none".to_owned() } else { n.to_string() };
        assert_eq!(charged(&metrics, "prompt"), zero_as_none(prompt), "{path}: {metrics}");
        assert_eq!(charged(&metrics, "completion"), zero_as_none(completion), "{path}: {metrics}");
        assert!(metrics.contains(&format!("limitlab_usage_missing_total {missing}")), "{path}: {metrics}");
    }
    let count = |text: &str| tokenizer::count("gpt-4o", text);
    let chat = json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}]});
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}});
    let answer = json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}}]});
    let written = count("Let me look.") + count("get_weather") + count("{\"city\":\"Oslo\"}");
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    check(path, chat.clone(), answer, tokenizer::count_chat_request("gpt-4o", &chat), written, 1).await;

    let answer = json!({"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": " a time"}]});
    let path = "/openai/deployments/gpt-4o/completions?api-version=2024-10-21";
    check(path, json!({"prompt": "Once upon"}), answer, count("Once upon"), count(" a time"), 1).await;

    let request = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Say hello"});
    let output = json!([
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "A greeting."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "wave", "arguments": "{}"}
    ]);
    let answer = json!({"id": "resp_1", "object": "response", "status": "completed", "output": output});
    let written = count("A greeting.") + count("Hello!") + count("wave") + count("{}");
    let prompt = tokenizer::count_responses("gpt-4o", &request);
    check("/openai/v1/responses", request, answer, prompt, written, 1).await;

    let answer = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]});
    let path = "/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21";
    check(path, json!({"input": "hello world"}), answer, count("hello world"), 0, 1).await;

    // Not a generation: nothing to charge, nothing missing.
    let answer = json!({"object": "file", "id": "file-1", "purpose": "batch"});
    check("/openai/files?api-version=2024-10-21", json!({"purpose": "batch"}), answer, 0, 0, 0).await;
}

/// A real 300 x 200 PNG (black), inline as the SDKs send a local image.
const PNG_300_BY_200: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAASwAAADICAIAAADdvUsCAAAAxUlEQVR42u3BMQEAAADCoPVPbQsvoAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAOBvwAYAAbry13gAAAAASUVORK5CYII=";

#[tokio::test]
async fn a_stream_without_usage_is_charged_the_images_in_its_prompt() {
    // Before, an image counted nothing: a stream without usage was charged its
    // text alone, a fraction of what the service bills for a picture.
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"A dark room.\"}}]}\n\ndata: [DONE]\n\n";
    let backend = answering("text/event-stream", stream).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let check = |detail: &'static str, image_tokens: u64| {
        let proxy = &proxy;
        async move {
            let before = proxy.metrics().await;
            let before: u64 = charged(&before, "prompt").parse().unwrap_or(0);
            let image = json!({"url": PNG_300_BY_200, "detail": detail});
            let content = json!([{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": image}]);
            let request = json!({"messages": [{"role": "user", "content": content}], "stream": true});
            assert_eq!(proxy.chat(request).await.text().await.unwrap(), stream);
            let text_alone = tokenizer::count_chat("gpt-4o", &[json!({"role": "user", "content": "Describe it."})]);
            let after: u64 = charged(&proxy.metrics().await, "prompt").parse().unwrap();
            assert_eq!(after - before, text_alone + image_tokens, "{detail}");
        }
    };
    // gpt-4o: 85 for the image, and 170 for the one 512-pixel tile 300 x 200 needs.
    check("auto", 85 + 170).await;
    check("low", 85).await;
}

#[tokio::test]
async fn a_websocket_handshake_gets_a_clear_501_and_never_reaches_the_backend() {
    // The Realtime API is a WebSocket. The proxy does not relay WebSockets (it
    // could not count their tokens); passed on as a plain GET, the handshake got
    // the client a backend's puzzling error instead.
    let backend = answering("application/json", &ok_body().to_string()).await;
    let proxy = start(&config(&backend.uri(), &backend.uri(), "", "")).await;
    let handshake = |key: Option<&str>, upgrade: &str| {
        let url = format!("{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o-realtime", proxy.base);
        let request = proxy.client.get(url).header("upgrade", upgrade).header("connection", "Upgrade");
        let request =
            request.header("sec-websocket-version", "13").header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        let request = match key {
            Some(key) => request.header("api-key", key),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };
    let r = handshake(Some("k"), "websocket").await;
    assert_eq!(r.status(), 501);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["statusCode"], 501, "{body}");
    assert!(body["message"].as_str().unwrap().contains("Realtime API"), "{body}");
    assert_eq!(handshake(Some("k"), "WebSocket/13, foo").await.status(), 501);
    // The key is checked first, as for any call.
    assert_eq!(handshake(None, "websocket").await.status(), 401);
    assert!(backend.received_requests().await.unwrap().is_empty(), "no handshake reached the backend");
    // Another upgrade (h2c) is ignored, as HTTP lets a server do: the call is served.
    assert_eq!(handshake(Some("k"), "h2c").await.status(), 200);
}
