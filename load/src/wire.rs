//! What a call sends and what it reads back: Azure OpenAI's chat request with a
//! prompt of the drawn token count, and the usage of a JSON or SSE answer.

use gateway_core::Usage;
use serde_json::{json, Value};
use simulator::traffic::Call;

/// The tokens a chat request costs besides its content: 3 for the message, 1
/// for its role (`user` is one token in every vocabulary) and 3 priming the
/// reply (the rule `tokenizer::count_chat` and the service apply).
pub const CHAT_FRAMING_TOKENS: u64 = 7;

/// The JSON body of a call: one user message whose content is `prompt_tokens -
/// 7` one-token words, so that the service counts exactly the drawn prompt
/// (a prompt drawn below 7 tokens becomes 7, the least a chat request costs).
pub fn chat_body(call: &Call) -> Vec<u8> {
    let content = tokenizer::completion_text(call.prompt_tokens.saturating_sub(CHAT_FRAMING_TOKENS));
    let mut body = json!({ "messages": [{ "role": "user", "content": content }] });
    if let Some(max) = call.max_tokens {
        body["max_tokens"] = json!(max);
    }
    if let Some(n) = call.info.choices {
        body["n"] = json!(n);
    }
    if call.stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
    }
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// The usage an answer reports: the `usage` of a JSON body, or of the last SSE
/// chunk that carries one. `None` when the body has none (an error, an answer
/// that is not Azure OpenAI's, a stream that broke before its usage).
pub fn usage(body: &[u8], event_stream: bool) -> Option<Usage> {
    if !event_stream {
        let value: Value = serde_json::from_slice(body).ok()?;
        return usage_of(&value);
    }
    let text = std::str::from_utf8(body).ok()?;
    // The last chunk with a usage counts: read from the end.
    text.lines()
        .rev()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find_map(|chunk| usage_of(&chunk))
}

fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    let field = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage { prompt_tokens: field("prompt_tokens"), completion_tokens: field("completion_tokens") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_costs_exactly_the_drawn_tokens_as_the_service_counts_them() {
        for (prompt_tokens, expected) in [(7, 7), (8, 8), (200, 200), (1234, 1234), (3, 7)] {
            let call = Call { prompt_tokens, max_tokens: Some(50), ..Call::default() };
            let body: Value = serde_json::from_slice(&chat_body(&call)).unwrap();
            let messages = body["messages"].as_array().unwrap();
            for model in ["gpt-4o", "gpt-35-turbo"] {
                assert_eq!(tokenizer::count_chat(model, messages), expected, "{model}, {prompt_tokens}");
            }
            assert_eq!(body["max_tokens"], 50);
        }
    }

    #[test]
    fn usage_comes_from_the_body_or_the_last_chunk_that_has_it() {
        let json = br#"{"usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}"#;
        assert_eq!(usage(json, false), Some(Usage { prompt_tokens: 12, completion_tokens: 30 }));
        let sse =
            "data: {\"choices\": [], \"usage\": null}\n\ndata: {\"choices\": [], \"usage\": {\"prompt_tokens\": 5, \
                   \"completion_tokens\": 9}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(sse.as_bytes(), true), Some(Usage { prompt_tokens: 5, completion_tokens: 9 }));
        assert_eq!(usage(b"<html>bad gateway</html>", false), None);
        assert_eq!(usage(b"data: {\"choices\": []}\n\n", true), None);
    }
}
