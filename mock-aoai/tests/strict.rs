//! The mock refuses what Azure refuses: an operation the deployment's model does
//! not serve, a request that can never fit the deployment's TPM, an api-version
//! Azure does not serve, and a fault schedule that ends before it starts.

use mock_aoai::MockConfig;
use serde_json::{json, Value};

const CONFIG: &str = "seed = 1\n\
    [[deployments]]\nname = \"chat\"\nmodel = \"gpt-4o\"\ntpm = 1000\n\
    [[deployments]]\nname = \"embed\"\nmodel = \"text-embedding-3-small\"\ntpm = 100000\n";

async fn start() -> String {
    let config = MockConfig::from_toml("test", CONFIG).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(mock_aoai::server::serve(listener, config, std::future::pending()));
    url
}

/// POSTs `body` to `path` and returns (status, body).
async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{url}{path}")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn check(got: (u16, Value), status: u16, code: &str, needle: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"].as_str().unwrap().contains(needle), "{}", got.1);
}

const V: &str = "api-version=2024-10-21";

#[tokio::test]
async fn an_operation_the_model_does_not_serve_is_azures_400() {
    let url = start().await;
    let embed_on_chat = post(&url, &format!("/openai/deployments/chat/embeddings?{V}"), json!({"input": "hi"})).await;
    check(
        embed_on_chat,
        400,
        "OperationNotSupported",
        "embeddings operation does not work with the specified model, gpt-4o",
    );
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let chat_on_embed = post(&url, &format!("/openai/deployments/embed/chat/completions?{V}"), chat.clone()).await;
    check(chat_on_embed, 400, "OperationNotSupported", "chatCompletion operation");
    assert_eq!(post(&url, &format!("/openai/deployments/chat/chat/completions?{V}"), chat).await.0, 200);
}

#[tokio::test]
async fn a_request_larger_than_a_minute_of_tokens_is_400_not_a_429_to_retry() {
    let url = start().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
    let got = post(&url, &format!("/openai/deployments/chat/chat/completions?{V}"), body).await;
    check(got, 400, "invalid_request_error", "more than this deployment's rate limit of 1000 tokens per minute");
}

#[tokio::test]
async fn an_api_version_azure_does_not_serve_is_404() {
    let url = start().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let got = post(&url, "/openai/deployments/chat/chat/completions?api-version=2099-01-01", body).await;
    check(got, 400, "BadRequest", "API version not supported");
}

#[tokio::test]
async fn an_outage_that_ends_before_it_starts_is_refused() {
    let url = start().await;
    let faults = json!({"deployment": "chat", "faults": {"outages": [{"start": "30s", "end": "10s"}]}});
    let got = post(&url, "/_mock/faults", faults).await;
    check(got, 400, "BadRequest", "ends (10 s) no later than it starts (30 s)");
    let text = format!("{CONFIG}faults = {{ outages = [{{ start = \"30s\", end = \"10s\" }}] }}\n");
    let error = MockConfig::from_toml("bad.toml", &text).unwrap_err();
    assert!(error.contains("no later than it starts"), "{error}");
}
