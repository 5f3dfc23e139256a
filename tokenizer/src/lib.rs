//! Token counting as the service does it, with the model's real tokenizer
//! (`tiktoken-rs`, whose vocabularies are compiled in: nothing is downloaded).

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The tokenizer of a model: `o200k_base` for gpt-4o, gpt-4.1, gpt-5 and the o-series;
/// `cl100k_base` for gpt-4, gpt-35-turbo and the embedding models.
pub fn tokenizer(model: &str) -> &'static CoreBPE {
    let m = model.to_ascii_lowercase();
    let o200k = m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-4.5")
        || m.starts_with("gpt-5")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4");
    match o200k {
        true => tiktoken_rs::o200k_base_singleton(),
        false => tiktoken_rs::cl100k_base_singleton(),
    }
}

pub fn count(model: &str, text: &str) -> u64 {
    tokenizer(model).encode_ordinary(text).len() as u64
}

/// The prompt tokens of chat messages, with the framing the service adds: 3 per
/// message, 1 more for a `name`, and 3 priming the reply (OpenAI's published rule).
/// Content given as parts counts its text parts.
pub fn count_chat(model: &str, messages: &[Value]) -> u64 {
    let bpe = tokenizer(model);
    let count = |s: &str| bpe.encode_ordinary(s).len() as u64;
    let mut total = 3;
    for message in messages {
        total += 3;
        for (key, value) in message.as_object().into_iter().flatten() {
            match (key.as_str(), value) {
                ("name", Value::String(s)) => total += count(s) + 1,
                (_, Value::String(s)) => total += count(s),
                ("content", Value::Array(parts)) => {
                    total += parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(count).sum::<u64>()
                }
                _ => {}
            }
        }
    }
    total
}

/// The prompt tokens of a Responses API request (`POST /openai/v1/responses`):
/// its `instructions` as a system message, then its `input`, a string (one user
/// message) or a list of items, each counted as a chat message is, with the
/// chat framing. Azure does not publish the Responses API's own framing; the
/// chat rule is the nearest published one.
pub fn count_responses(model: &str, body: &Value) -> u64 {
    let mut messages = Vec::new();
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        messages.push(serde_json::json!({ "role": "system", "content": instructions }));
    }
    match body.get("input") {
        Some(Value::String(text)) => messages.push(serde_json::json!({ "role": "user", "content": text })),
        Some(Value::Array(items)) => messages.extend(items.iter().cloned()),
        _ => {}
    }
    count_chat(model, &messages)
}

/// Deterministic completion text of exactly `tokens` tokens: words that are one
/// token each in both vocabularies, so the text a client counts matches `usage`.
pub fn completion_text(tokens: u64) -> String {
    (0..tokens).map(completion_word).collect()
}

/// The i-th token of a completion, as streamed.
pub fn completion_word(i: u64) -> &'static str {
    const WORDS: [&str; 12] =
        [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " and", " runs", " away"];
    let word = WORDS[(i % WORDS.len() as u64) as usize];
    if i == 0 {
        // The first token carries no leading space, as a model's reply begins.
        return "The";
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_match_tiktoken_for_known_prompts() {
        // Figures published in OpenAI's cookbook ("How to count tokens with tiktoken").
        assert_eq!(count("gpt-35-turbo", "tiktoken is great!"), 6);
        assert_eq!(count("gpt-4", "Hello, world!"), 4);
        // OpenAI's cookbook example: 129 prompt tokens for gpt-4 and gpt-35-turbo.
        let messages = json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]);
        assert_eq!(count_chat("gpt-4", messages.as_array().unwrap()), 129);
        assert_eq!(count_chat("gpt-4o", messages.as_array().unwrap()), 124);
    }

    #[test]
    fn responses_requests_count_as_the_chat_messages_they_amount_to() {
        let check = |body: serde_json::Value, messages: serde_json::Value| {
            let expected = count_chat("gpt-4o", messages.as_array().unwrap());
            assert_eq!(count_responses("gpt-4o", &body), expected, "{body}");
        };
        check(json!({"input": "Say hello"}), json!([{"role": "user", "content": "Say hello"}]));
        check(
            json!({"instructions": "Be brief.", "input": "Say hello"}),
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]),
        );
        let items = json!([
            {"role": "user", "content": [{"type": "input_text", "text": "What is in this picture?"}]},
            {"role": "assistant", "content": "A fox."},
        ]);
        check(json!({"input": items}), items.clone());
        check(json!({"model": "gpt-4o"}), json!([]));
        // Nothing at all is the chat framing alone, and any text adds to it.
        assert_eq!(count_responses("gpt-4o", &json!({})), 3);
        assert!(count_responses("gpt-4o", &json!({"input": "a much longer prompt than none"})) > 3 + 3);
    }

    #[test]
    fn completion_text_has_exactly_the_tokens_it_claims() {
        for model in ["gpt-4o", "gpt-35-turbo"] {
            for n in [0, 1, 2, 11, 12, 13, 100, 1000] {
                assert_eq!(count(model, &completion_text(n)), n, "{model}, {n} tokens");
            }
        }
    }
}
