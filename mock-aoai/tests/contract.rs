//! Contract tests: a real server on a real socket, a real HTTP client, and every
//! response body (stream chunks included) validated against Azure OpenAI's
//! published inference spec (`tests/spec/aoai-inference-2024-10-21.json`).

use mock_aoai::MockConfig;
use serde_json::{json, Value};
use std::path::Path;

/// Azure OpenAI's published inference spec (azure-rest-api-specs, MIT), vendored so a
/// clean clone tests against it.
const SPEC: &str = "tests/spec/aoai-inference-2024-10-21.json";

/// The spec's schemas, with OpenAPI 3.0's `nullable: true` turned into JSON
/// Schema's `"type": [T, "null"]`, validated as draft 2020-12.
struct Spec {
    root: Value,
}

impl Spec {
    fn load() -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut root: Value = serde_json::from_str(&text).expect("the spec is JSON");
        nullable_to_null(&mut root);
        // The embeddings response is written inline in the path; give it a name.
        let embeddings = root["paths"]["/deployments/{deployment-id}/embeddings"]["post"]["responses"]["200"]
            ["content"]["application/json"]["schema"]
            .clone();
        root["components"]["schemas"]["limitlabEmbeddingsResponse"] = embeddings;
        Spec { root }
    }

    fn check(&self, schema: &str, instance: &Value) {
        let mut root = self.root.clone();
        root["$ref"] = json!(format!("#/components/schemas/{schema}"));
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema {schema}: {e}"));
        let errors: Vec<String> =
            validator.iter_errors(instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{schema}: {errors:#?}\n{instance:#}");
    }
}

fn nullable_to_null(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                // OpenAPI 3.0: `nullable` admits null, also past an `enum`.
                if let Some(Value::Array(values)) = map.get_mut("enum") {
                    values.push(Value::Null);
                }
                match map.get("type").cloned() {
                    Some(Value::String(t)) => {
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".into(), json!([inner, { "type": "null" }]));
                    }
                }
            }
            map.values_mut().for_each(nullable_to_null);
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_null),
        _ => {}
    }
}

struct Server {
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn start(config: &str) -> Server {
        let config = MockConfig::from_toml("test", config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(mock_aoai::server::serve(listener, config, std::future::pending()));
        Server { base, client: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap()
    }
}

const CONFIG: &str = r#"
seed = 7

[[deployments]]
name = "chat"
model = "gpt-4o"
tpm = 1000000
completion_tokens = { fixed = 12 }
latency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 0 } }

[[deployments]]
name = "old"
model = "gpt-35-turbo-instruct"
tpm = 1000000
completion_tokens = { fixed = 5 }
latency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 0 } }

[[deployments]]
name = "embed"
model = "text-embedding-3-small"
tpm = 1000000
latency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 0 } }

[[deployments]]
name = "tiny"
model = "gpt-4o"
tpm = 1000
rpm = 600
completion_tokens = { fixed = 5 }
latency = { ttft_ms = { fixed = 0 }, per_token_ms = { fixed = 0 } }
"#;

const V: &str = "?api-version=2024-10-21";

fn events(body: &str) -> Vec<&str> {
    body.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").expect("SSE data lines")).collect()
}

#[tokio::test]
async fn chat_completions_match_the_spec_plain_and_streamed() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]);
    let r = server.post(&format!("/openai/deployments/chat/chat/completions{V}"), json!({"messages": messages})).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    // 3 priming + (3 + "system" + "Be brief.") + (3 + "user" + "Hello there") in o200k_base.
    assert_eq!(body["usage"]["prompt_tokens"], 3 + (3 + 1 + 3) + (3 + 1 + 2));

    let streamed =
        json!({"messages": messages, "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 4});
    let r = server.post(&format!("/openai/deployments/chat/chat/completions{V}"), streamed).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream; charset=utf-8");
    let text = r.text().await.unwrap();
    let events = events(&text);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    for chunk in &chunks {
        spec.check("createChatCompletionStreamResponse", chunk);
    }
    let content: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned)).collect();
    assert_eq!(tokenizer::count("gpt-4o", &content), 4, "the streamed text has max_tokens tokens");
    let finish = chunks.iter().find_map(|c| c["choices"].get(0)?["finish_reason"].as_str().map(str::to_owned));
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
}

/// A chat call's chunks, validated against the spec, and its `[DONE]` checked.
async fn streamed_chunks(spec: &Spec, server: &Server, body: Value) -> Vec<Value> {
    let r = server.post(&format!("/openai/deployments/chat/chat/completions{V}"), body).await;
    let text = r.text().await.unwrap();
    let events = events(&text);
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    chunks.iter().for_each(|chunk| spec.check("createChatCompletionStreamResponse", chunk));
    chunks
}

#[tokio::test]
async fn json_answers_and_tool_calls_match_the_spec_plain_and_streamed() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let path = format!("/openai/deployments/chat/chat/completions{V}");
    let schema =
        json!({ "type": "object", "properties": { "city": { "type": "string" }, "days": { "type": "integer" } } });
    let format =
        json!({ "type": "json_schema", "json_schema": { "name": "forecast", "schema": schema, "strict": true } });
    let messages = json!([{ "role": "user", "content": "Forecast?" }]);
    let r = server.post(&path, json!({ "messages": messages, "response_format": format })).await;
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value = serde_json::from_str(content).expect("the content is JSON");
    assert!(answer["city"].is_string() && answer["days"].is_i64(), "{answer}");
    assert_eq!((tokenizer::count("gpt-4o", content), &body["usage"]["completion_tokens"]), (12, &json!(12)));

    let tools = json!([{ "type": "function", "function": { "name": "forecast", "parameters": schema } }]);
    let r = server.post(&path, json!({ "messages": messages, "tools": tools })).await;
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    let choice = &body["choices"][0];
    let arguments = choice["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap();
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(tokenizer::count("gpt-4o", "forecast") + tokenizer::count("gpt-4o", arguments), 12);

    let chunks = streamed_chunks(&spec, &server, json!({ "messages": messages, "tools": tools, "stream": true })).await;
    let calls = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["tool_calls"].get(0));
    let streamed: String = calls.filter_map(|call| call["function"]["arguments"].as_str()).collect();
    assert_eq!(streamed, arguments, "the streamed pieces join to the call's arguments");
    let opening = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    assert!(opening["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{opening}");
    assert_eq!(opening["function"]["name"], "forecast", "the opening chunk names the function");

    let functions = json!([{ "name": "forecast", "parameters": schema }]);
    let r = server.post(&path, json!({ "messages": messages, "functions": functions })).await;
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    assert_eq!(body["choices"][0]["finish_reason"], "function_call");
    assert_eq!(body["choices"][0]["message"]["function_call"]["arguments"], arguments);
}

#[tokio::test]
async fn log_probabilities_come_when_asked_and_match_the_spec() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let chat = format!("/openai/deployments/chat/chat/completions{V}");
    let messages = json!([{ "role": "user", "content": "Hello" }]);
    let body: Value = server
        .post(&chat, json!({ "messages": messages, "logprobs": true, "top_logprobs": 3 }))
        .await
        .json()
        .await
        .unwrap();
    spec.check("createChatCompletionResponse", &body);
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let text: String = content.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(text, body["choices"][0]["message"]["content"], "one entry for each token written");
    assert!(content.iter().all(|e| e["top_logprobs"].as_array().map(Vec::len) == Some(3)));
    let plain: Value = server.post(&chat, json!({ "messages": messages })).await.json().await.unwrap();
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null, "none unless asked");

    let streamed = json!({ "messages": messages, "logprobs": true, "stream": true, "max_tokens": 3 });
    let chunks = streamed_chunks(&spec, &server, streamed).await;
    let entries: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["logprobs"]["content"].get(0)).collect();
    assert_eq!(entries.len(), 3, "{chunks:#?}");

    let old = format!("/openai/deployments/old/completions{V}");
    let body: Value = server.post(&old, json!({ "prompt": "Say", "logprobs": 2 })).await.json().await.unwrap();
    spec.check("createCompletionResponse", &body);
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().map(Vec::len), Some(5));
    assert_eq!(logprobs["text_offset"][1], 3, "after \"The\"");

    for (path, body, needle) in [
        (&chat, json!({ "messages": messages, "top_logprobs": 2 }), "`top_logprobs` needs `logprobs`"),
        (
            &chat,
            json!({ "messages": messages, "logprobs": true, "top_logprobs": 21 }),
            "`top_logprobs` must be from 0 to 20",
        ),
        (&chat, json!({ "messages": messages, "logprobs": 1 }), "`logprobs` must be a boolean"),
        (&old, json!({ "prompt": "Say", "logprobs": 6 }), "`logprobs` must be from 0 to 5"),
    ] {
        let r = server.post(path, body).await;
        assert_eq!(r.status(), 400);
        let error: Value = r.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains(needle), "{error}");
    }
}

#[tokio::test]
async fn n_gives_that_many_choices_and_usage_counts_them_all() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let chat = format!("/openai/deployments/chat/chat/completions{V}");
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let r = server.post(&chat, json!({"messages": messages, "n": 3})).await;
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    let choices = body["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices.iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2]);
    for c in choices {
        assert_eq!(tokenizer::count("gpt-4o", c["message"]["content"].as_str().unwrap()), 12);
    }
    assert_eq!(body["usage"]["completion_tokens"], 3 * 12, "usage counts every choice");

    // Streamed: each choice's tokens under its index, the usage of them all.
    let streamed = json!({"messages": messages, "n": 2, "max_tokens": 4, "stream": true,
        "stream_options": {"include_usage": true}});
    let text = server.post(&chat, streamed).await.text().await.unwrap();
    let events = events(&text);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    for chunk in &chunks {
        spec.check("createChatCompletionStreamResponse", chunk);
    }
    let text_of = |index: u64| -> String {
        let of_choice = |c: &Value| {
            let choice = c["choices"].get(0).filter(|choice| choice["index"] == index)?;
            choice["delta"]["content"].as_str().map(str::to_owned)
        };
        chunks.iter().filter_map(of_choice).collect()
    };
    assert_eq!(tokenizer::count("gpt-4o", &text_of(0)), 4);
    assert_eq!(text_of(0), text_of(1));
    let finishes = chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|c| c["finish_reason"] == "length"));
    assert_eq!(finishes.count(), 2);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 2 * 4);

    // Legacy completions, and what Azure refuses.
    let old = format!("/openai/deployments/old/completions{V}");
    let body: Value = server.post(&old, json!({"prompt": "x", "n": 2})).await.json().await.unwrap();
    spec.check("createCompletionResponse", &body);
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["completion_tokens"], 2 * 5);
    // `n` choices for each prompt of a list.
    let body: Value = server.post(&old, json!({"prompt": ["x", "y", "z"], "n": 2})).await.json().await.unwrap();
    let indices: Vec<u64> = body["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2, 3, 4, 5]);
    assert_eq!(body["usage"]["completion_tokens"], 6 * 5);
    // `best_of` candidates are generated and billed for each prompt; `n` come back.
    let body: Value = server.post(&old, json!({"prompt": ["x", "y"], "best_of": 3})).await.json().await.unwrap();
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["completion_tokens"], 2 * 3 * 5);
    let refused = [
        (json!({"prompt": "x", "best_of": 2, "n": 3}), "`best_of` (2) must be at least `n` (3)"),
        (json!({"prompt": "x", "best_of": 21}), "`best_of` must be from 1 to 20"),
        (json!({"prompt": "x", "best_of": 0}), "`best_of` must be from 1 to 20"),
        (json!({"prompt": "x", "best_of": 2, "stream": true}), "cannot be streamed"),
    ];
    for (request, message) in refused {
        let r = server.post(&old, request.clone()).await;
        assert_eq!(r.status(), 400, "{request}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{request}: {body}");
    }
    for n in [json!(0), json!(129), json!("2"), json!(1.5)] {
        let r = server.post(&chat, json!({"messages": messages, "n": n})).await;
        assert_eq!(r.status(), 400, "n = {n}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("`n`"), "n = {n}: {body}");
    }
}

#[tokio::test]
async fn completions_and_embeddings_match_the_spec() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let r =
        server.post(&format!("/openai/deployments/old/completions{V}"), json!({"prompt": "Say this is a test"})).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    spec.check("createCompletionResponse", &body);
    assert_eq!(body["usage"]["prompt_tokens"], 5);

    let r =
        server.post(&format!("/openai/deployments/old/completions{V}"), json!({"prompt": "x", "stream": true})).await;
    let text = r.text().await.unwrap();
    let events = events(&text);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    for e in &events[..events.len() - 1] {
        let mut chunk: Value = serde_json::from_str(e).unwrap();
        // The service sends `"finish_reason": null` until the last chunk, which the
        // spec (written for whole responses) does not allow; everything else must match.
        if chunk["choices"][0]["finish_reason"].is_null() {
            chunk["choices"][0]["finish_reason"] = json!("stop");
        }
        spec.check("createCompletionResponse", &chunk);
    }

    let r = server.post(&format!("/openai/deployments/embed/embeddings{V}"), json!({"input": ["a", "b c"]})).await;
    let body: Value = r.json().await.unwrap();
    spec.check("limitlabEmbeddingsResponse", &body);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 1536);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn prompts_and_inputs_may_be_sent_as_tokens() {
    // LangChain's embeddings send token arrays; the service embeds what they
    // spell and counts them as they are.
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let embed = format!("/openai/deployments/embed/embeddings{V}");
    let ids = |text: &str| tokenizer::tokenizer("text-embedding-3-small").encode(text);
    let as_text: Value = server.post(&embed, json!({"input": ["a", "b c"]})).await.json().await.unwrap();
    let as_tokens: Value = server.post(&embed, json!({"input": [ids("a"), ids("b c")]})).await.json().await.unwrap();
    spec.check("limitlabEmbeddingsResponse", &as_tokens);
    assert_eq!(as_tokens["data"], as_text["data"], "tokens embed as the text they spell");
    assert_eq!(as_tokens["usage"]["prompt_tokens"], 3);
    let one: Value = server.post(&embed, json!({"input": ids("b c")})).await.json().await.unwrap();
    assert_eq!(one["data"][0]["embedding"], as_text["data"][1]["embedding"]);
    assert_eq!(one["usage"]["prompt_tokens"], 2);
    // A legacy completion's prompt as tokens counts them as they are.
    let old = format!("/openai/deployments/old/completions{V}");
    let body: Value = server.post(&old, json!({"prompt": [1, 2, 3, 4]})).await.json().await.unwrap();
    spec.check("createCompletionResponse", &body);
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    // (input, the field its error names)
    let refused = [
        (json!([]), "`input` is required"),
        (json!([1, -2]), "`input[1]` must be a token"),
        (json!([[5], "x"]), "`input[1]` must be a non-empty array of tokens, as `input[0]` is"),
        (json!([[5], []]), "`input[1]` must be a non-empty array of tokens"),
        (json!(["x", [5]]), "`input[1]` must be a string, as `input[0]` is"),
        (json!([{"text": "x"}]), "`input[0]` must be a non-empty array of tokens"),
        (json!([[5, 5_000_000_000u64]]), "`input[0][1]` must be a token"),
        (json!([[5, 3000000]]), "`input[0]`: 3000000 is not a token of text-embedding-3-small's vocabulary"),
    ];
    for (input, message) in refused {
        let r = server.post(&embed, json!({"input": input})).await;
        assert_eq!(r.status(), 400, "{input}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{input}: {body}");
    }
}

#[tokio::test]
async fn dimensions_shorten_a_text_embedding_3_vector_and_nothing_else() {
    let ada = "\n[[deployments]]\nname = \"ada\"\nmodel = \"text-embedding-ada-002\"\ntpm = 1000000\n";
    let server = Server::start(&format!("{CONFIG}{ada}")).await;
    let embed = format!("/openai/deployments/embed/embeddings{V}");
    let vector = |body: &Value| -> Vec<f64> {
        body["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let full: Value = server.post(&embed, json!({"input": "a"})).await.json().await.unwrap();
    let short: Value = server.post(&embed, json!({"input": "a", "dimensions": 256})).await.json().await.unwrap();
    let (full, short) = (vector(&full), vector(&short));
    assert_eq!(short.len(), 256);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm(&short) - 1.0).abs() < 1e-5, "unit length: {}", norm(&short));
    // The full vector cut at 256 points the same way.
    let scale = norm(&full[..256]);
    for (a, b) in short.iter().zip(&full[..256]) {
        assert!((a - b / scale).abs() < 1e-5, "{a} against {}", b / scale);
    }
    let same: Value = server.post(&embed, json!({"input": "a", "dimensions": 1536})).await.json().await.unwrap();
    assert_eq!(vector(&same), full, "the model's own length changes nothing");
    // (deployment, dimensions, what the 400 says)
    let refused = [
        ("embed", json!(0), "`dimensions` must be from 1 to 1536"),
        ("embed", json!(1537), "`dimensions` must be from 1 to 1536"),
        ("embed", json!("256"), "`dimensions` must be a whole number"),
        ("ada", json!(256), "text-embedding-ada-002 does not support specifying dimensions"),
    ];
    for (deployment, dimensions, message) in refused {
        let path = format!("/openai/deployments/{deployment}/embeddings{V}");
        let r = server.post(&path, json!({"input": "a", "dimensions": dimensions})).await;
        assert_eq!(r.status(), 400, "{deployment} {dimensions}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{body}");
    }
}

#[tokio::test]
async fn the_v1_api_names_the_deployment_in_the_body() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let r = server.post("/openai/v1/chat/completions", json!({"model": "chat", "messages": messages})).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    spec.check("createChatCompletionResponse", &body);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    let streamed = json!({"model": "chat", "messages": messages, "stream": true, "max_tokens": 3});
    let text = server.post("/openai/v1/chat/completions", streamed).await.text().await.unwrap();
    assert_eq!(events(&text).last(), Some(&"[DONE]"));
    let body: Value =
        server.post("/openai/v1/completions", json!({"model": "old", "prompt": "x"})).await.json().await.unwrap();
    spec.check("createCompletionResponse", &body);
    let body: Value =
        server.post("/openai/v1/embeddings", json!({"model": "embed", "input": "a"})).await.json().await.unwrap();
    spec.check("limitlabEmbeddingsResponse", &body);
    // (path, body, status, what the error says)
    let refused = [
        ("/openai/v1/chat/completions", json!({"messages": messages}), 400, "`model` is required"),
        ("/openai/v1/chat/completions", json!({"model": "nope", "messages": messages}), 404, "does not exist"),
        ("/openai/v1/embeddings", json!({"model": "chat", "input": "a"}), 400, "embeddings"),
        (
            "/openai/v1/chat/completions?api-version=2024-10-21",
            json!({"model": "chat", "messages": messages}),
            400,
            "API version not supported",
        ),
    ];
    for (path, request, status, message) in refused {
        let r = server.post(path, request).await;
        assert_eq!(r.status(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{path}: {body}");
    }
    // The models it lists are the names its requests take as `model`.
    let get = |path: &str| server.client.get(format!("{}{path}", server.base)).send();
    let list: Value = get("/openai/v1/models").await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["chat", "embed", "old", "tiny"]);
    let one: Value = get("/openai/v1/models/embed").await.unwrap().json().await.unwrap();
    assert_eq!((one["id"].as_str(), one["object"].as_str()), (Some("embed"), Some("model")));
    assert_eq!(get("/openai/v1/models/nope").await.unwrap().status(), 404);
}

#[tokio::test]
async fn azure_errors_have_azure_shapes() {
    let spec = Spec::load();
    let keyed = format!("api_keys = [\"secret\"]\n{CONFIG}");
    let server = Server::start(&keyed).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let check = |status: u16, code: &'static str| {
        let spec = &spec;
        move |r: (u16, Value)| {
            assert_eq!(r.0, status, "{}", r.1);
            assert_eq!(r.1["error"]["code"], code);
            spec.check("errorResponse", &r.1);
        }
    };
    let send = |path: String, body: Value, key: Option<&'static str>| {
        let mut request = server.client.post(format!("{}{path}", server.base)).json(&body);
        if let Some(key) = key {
            request = request.header("api-key", key);
        }
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    check(401, "401")(send(format!("/openai/deployments/chat/chat/completions{V}"), chat.clone(), None).await);
    check(401, "401")(send(format!("/openai/deployments/chat/chat/completions{V}"), chat.clone(), Some("wrong")).await);
    check(400, "BadRequest")(
        send("/openai/deployments/chat/chat/completions".into(), chat.clone(), Some("secret")).await,
    );
    check(404, "DeploymentNotFound")(
        send(format!("/openai/deployments/nope/chat/completions{V}"), chat.clone(), Some("secret")).await,
    );
    let bad =
        send(format!("/openai/deployments/chat/chat/completions{V}"), json!({"messages": "hi"}), Some("secret")).await;
    assert!(bad.1["error"]["message"].as_str().unwrap().contains("`messages`"));
    check(400, "BadRequest")(bad);
    let bad = send(
        format!("/openai/deployments/chat/chat/completions{V}"),
        json!({"messages": [{"role": "user"}], "max_tokens": -1}),
        Some("secret"),
    )
    .await;
    assert!(bad.1["error"]["message"].as_str().unwrap().contains("`max_tokens`"));
    let bearer = server
        .client
        .post(format!("{}/openai/deployments/chat/chat/completions{V}", server.base))
        .bearer_auth("secret")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
}

#[tokio::test]
async fn throttling_is_azures_429_exactly() {
    let spec = Spec::load();
    let server = Server::start(CONFIG).await;
    // tpm 1000: a request costing prompt + 600 fits once, not twice.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600});
    let ok = server.post(&format!("/openai/deployments/tiny/chat/completions{V}"), body.clone()).await;
    assert_eq!(ok.status(), 200);
    let r = server.post(&format!("/openai/deployments/tiny/chat/completions{V}"), body).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    let ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((59..=60).contains(&secs) && ms.div_ceil(1000) == secs, "retry-after {secs} s, {ms} ms");
    assert!(h.contains_key("x-ratelimit-remaining-requests"));
    assert_eq!(h["x-ratelimit-remaining-tokens"], (1000 - 600 - 8).to_string().as_str());
    let body: Value = r.json().await.unwrap();
    spec.check("errorResponse", &body);
    assert_eq!(body["error"]["code"], "429");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have \
             exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
        ),
        "{message}"
    );
    assert!(message.contains(&format!("Please retry after {secs} seconds.")));
}

#[tokio::test]
async fn faults_can_be_scripted_at_run_time_and_are_counted() {
    let server = Server::start(CONFIG).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let outage = json!({"deployment": "chat", "faults": {"outages": [{"start": "0s", "end": "1h", "status": 503}]}});
    let r = server.client.post(format!("{}/_mock/faults", server.base)).json(&outage).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = server.post(&format!("/openai/deployments/chat/chat/completions{V}"), chat.clone()).await;
    assert_eq!(r.status(), 503);
    let bad = json!({"deployment": "chat", "faults": {"broken_stream": 1.5}});
    let r = server.client.post(format!("{}/_mock/faults", server.base)).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let stats: Value =
        server.client.get(format!("{}/_mock/stats", server.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["deployments"]["chat"]["faults"], 1);
    assert_eq!(stats["deployments"]["chat"]["requests"], 1);
}

#[tokio::test]
async fn broken_streams_and_resets_fail_the_transport() {
    let config = CONFIG.replacen(
        "completion_tokens = { fixed = 12 }",
        "completion_tokens = { fixed = 12 }\nfaults = { broken_stream = 1.0 }",
        1,
    );
    let server = Server::start(&config).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let sent = server
        .client
        .post(format!("{}/openai/deployments/chat/chat/completions{V}", server.base))
        .json(&body)
        .send()
        .await;
    // With no latency the break may come before the headers are flushed.
    let broke = match sent {
        Err(_) => true,
        Ok(r) => r.text().await.is_err(),
    };
    assert!(broke, "the stream breaks before [DONE]");

    let config = CONFIG.replacen("tpm = 1000000\n", "tpm = 1000000\nfaults = { connection_reset = 1.0 }\n", 1);
    let server = Server::start(&config).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let sent = server
        .client
        .post(format!("{}/openai/deployments/chat/chat/completions{V}", server.base))
        .json(&chat)
        .send()
        .await;
    let failed = match sent {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed, "a reset gives the client no complete response");
}

/// A Responses API stream's events: each `event:` name with its `data:` JSON.
fn named_events(body: &str) -> Vec<(String, Value)> {
    let event = |text: &str| {
        let (name, data) = text.split_once('\n').expect("an event line and a data line");
        let name = name.strip_prefix("event: ").expect("an event name").to_owned();
        (name, serde_json::from_str(data.strip_prefix("data: ").expect("a data line")).unwrap())
    };
    body.split("\n\n").filter(|e| !e.is_empty()).map(event).collect()
}

#[tokio::test]
async fn the_responses_api_answers_plain_and_streamed_with_its_usage() {
    let server = Server::start(CONFIG).await;
    let request = json!({"model": "chat", "instructions": "Be brief.", "input": "Hello there"});
    let r = server.post("/openai/v1/responses", request.clone()).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["object"].as_str(), body["status"].as_str()), (Some("response"), Some("completed")));
    assert!(body["id"].as_str().unwrap().starts_with("resp_"), "{body}");
    // The same prompt as the chat test's two messages, counted the same way.
    assert_eq!(body["usage"]["input_tokens"], 3 + (3 + 1 + 3) + (3 + 1 + 2));
    assert_eq!(body["usage"]["output_tokens"], 12);
    assert_eq!(body["usage"]["total_tokens"], 3 + (3 + 1 + 3) + (3 + 1 + 2) + 12);
    let text = body["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(tokenizer::count("gpt-4o", text), 12);

    let streamed = json!({"model": "chat", "input": "Hello there", "stream": true, "max_output_tokens": 4});
    let r = server.post("/openai/responses?api-version=2025-03-01-preview", streamed).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream; charset=utf-8");
    let events = named_events(&r.text().await.unwrap());
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"].as_str(), Some(name.as_str()), "the event name is its type");
        assert_eq!(data["sequence_number"], i, "{name}");
    }
    let deltas: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(tokenizer::count("gpt-4o", &deltas), 4, "the streamed text has max_output_tokens tokens");
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "response.incomplete", "cut short by max_output_tokens; no [DONE] follows");
    assert_eq!(data["response"]["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(data["response"]["usage"]["output_tokens"], 4);
    assert_eq!(data["response"]["output"][0]["content"][0]["text"].as_str(), Some(deltas.as_str()));
}

#[tokio::test]
async fn stored_responses_are_read_continued_and_deleted() {
    let server = Server::start(CONFIG).await;
    let create = |body: Value| server.post("/openai/v1/responses", body);
    let first: Value = create(json!({ "model": "chat", "input": "Hello" })).await.json().await.unwrap();
    let id = first["id"].as_str().unwrap();
    let url = format!("{}/openai/v1/responses/{id}", server.base);
    let read: Value = server.client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(read, first, "a retrieval shows the response as it was answered");

    let alone: Value = create(json!({ "model": "chat", "input": "Again", "store": false })).await.json().await.unwrap();
    let next: Value =
        create(json!({ "model": "chat", "input": "Again", "previous_response_id": id })).await.json().await.unwrap();
    let input = |r: &Value| r["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(input(&next), input(&alone) + first["usage"]["total_tokens"].as_u64().unwrap());
    assert_eq!((&next["previous_response_id"], &alone["store"]), (&json!(id), &json!(false)));

    let unknown = json!({ "model": "chat", "input": "Hi", "previous_response_id": alone["id"] });
    let r = create(unknown).await;
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert_eq!(
        (&error["error"]["code"], &error["error"]["param"]),
        (&json!("previous_response_not_found"), &json!("previous_response_id"))
    );

    let r = server.client.post(format!("{url}/cancel")).send().await.unwrap();
    assert_eq!(r.status(), 400, "only a background response is cancelled");
    let deleted: Value = server.client.delete(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(deleted, json!({ "id": id, "object": "response", "deleted": true }));
    for r in [server.client.get(&url).send().await.unwrap(), server.client.delete(&url).send().await.unwrap()] {
        assert_eq!(r.status(), 404);
        let error: Value = r.json().await.unwrap();
        assert_eq!(error["error"]["message"], format!("Response with id '{id}' not found."));
    }
    let dated = format!("{}/openai/responses/{id}?api-version=2024-10-21", server.base);
    assert_eq!(server.client.get(dated).send().await.unwrap().status(), 400, "a version from before the Responses API");
}

#[tokio::test]
async fn the_responses_api_refuses_what_azure_refuses() {
    let server = Server::start(CONFIG).await;
    let check = |status: u16, code: &'static str, needle: &'static str| {
        move |(got, body): (u16, Value)| {
            assert_eq!(got, status, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains(needle), "{body}");
        }
    };
    let send = |path: &'static str, body: Value| {
        let request = server.client.post(format!("{}{path}", server.base)).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let hello = json!({"model": "chat", "input": "Hello"});
    // A dated version from before the Responses API, and one the v1 path does not take.
    check(400, "BadRequest", "API version")(send("/openai/responses?api-version=2024-10-21", hello.clone()).await);
    check(400, "BadRequest", "API version")(send("/openai/v1/responses?api-version=2024-10-21", hello.clone()).await);
    assert_eq!(send("/openai/v1/responses?api-version=preview", hello).await.0, 200);
    check(400, "BadRequest", "`model`")(send("/openai/v1/responses", json!({"input": "Hello"})).await);
    check(400, "BadRequest", "`input`")(send("/openai/v1/responses", json!({"model": "chat"})).await);
    let no_role = json!({"model": "chat", "input": [{"content": "Hello"}]});
    check(400, "BadRequest", "`input[0]` must be a message with a `role`")(send("/openai/v1/responses", no_role).await);
    check(404, "DeploymentNotFound", "deployment")(
        send("/openai/v1/responses", json!({"model": "nope", "input": "Hello"})).await,
    );
    check(400, "OperationNotSupported", "responses operation")(
        send("/openai/v1/responses", json!({"model": "embed", "input": "Hello"})).await,
    );
}

#[tokio::test]
async fn a_requests_tools_count_in_its_prompt_as_the_service_counts_them() {
    // OpenAI's cookbook example ("How to count tokens with tiktoken", function
    // calling): 101 prompt tokens for a gpt-4o model, as its API counted them.
    let server = Server::start(CONFIG).await;
    let request = json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
            {"role": "user", "content": "What's the weather like in San Francisco?"}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["location"]}
        }}]
    });
    let r = server.post(&format!("/openai/deployments/chat/chat/completions{V}"), request).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 101, "{body}");
}

#[tokio::test]
async fn an_inline_image_counts_in_the_prompt_by_the_vision_rule() {
    // A real 300 x 200 PNG: gpt-4o bills 85 for an image and 170 for each
    // 512-pixel tile covering it (one here); at `low` detail, 85 alone.
    let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAASwAAADICAIAAADdvUsCAAAAxUlEQVR42u3BMQEAAADCoPVPbQsvoAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAOBvwAYAAbry13gAAAAASUVORK5CYII=";
    let server = Server::start(CONFIG).await;
    let path = format!("/openai/deployments/chat/chat/completions{V}");
    let prompt = |content: Value| {
        let (server, path) = (&server, &path);
        async move {
            let r = server.post(path, json!({"messages": [{"role": "user", "content": content}]})).await;
            let body: Value = r.json().await.unwrap();
            body["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let text = prompt(json!("What is in the picture?")).await;
    let with_image = |detail: &str| {
        let image = json!({"type": "image_url", "image_url": {"url": png, "detail": detail}});
        json!([{"type": "text", "text": "What is in the picture?"}, image])
    };
    assert_eq!(prompt(with_image("high")).await, text + 255);
    assert_eq!(prompt(with_image("low")).await, text + 85);
}
