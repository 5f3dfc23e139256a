//! Token counting as the service does it, with the model's real vocabulary
//! and tiktoken's splitting, by `bpe-openai` (whose vocabularies are compiled
//! in: nothing is downloaded). It counts in time linear in the text: tiktoken's
//! own merging takes time quadratic in the length of a run of letters, and a
//! client's 100 kB run took 3.5 s of the proxy's CPU to count (see
//! `long_runs_are_counted_as_tiktoken_counts_them`).

use bpe_openai::Tokenizer;
use serde_json::Value;

pub mod image;

/// The tokenizer of a model: `o200k_base` for gpt-4o, gpt-4.1, gpt-5 and the o-series;
/// `cl100k_base` for gpt-4, gpt-35-turbo and the embedding models.
pub fn tokenizer(model: &str) -> &'static Tokenizer {
    match is_o200k(model) {
        true => bpe_openai::o200k_base(),
        false => bpe_openai::cl100k_base(),
    }
}

fn is_o200k(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-4.5")
        || m.starts_with("gpt-5")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4")
}

pub fn count(model: &str, text: &str) -> u64 {
    tokenizer(model).count(text) as u64
}

/// The text of tokens in the model's vocabulary (a prompt or input sent as
/// tokens), with any bytes that are not UTF-8 replaced; the first token that is
/// not in the vocabulary is the error.
pub fn decode(model: &str, tokens: &[u32]) -> Result<String, u32> {
    let bpe = &tokenizer(model).bpe;
    if let Some(unknown) = tokens.iter().find(|t| **t as usize >= bpe.num_tokens()) {
        return Err(*unknown);
    }
    Ok(String::from_utf8_lossy(&bpe.decode_tokens(tokens)).into_owned())
}

/// The prompt tokens of chat messages, with the framing the service adds: 3 per
/// message, 1 more for a `name`, and 3 priming the reply (OpenAI's published rule).
/// Content given as parts counts its text parts and its images (by the
/// published vision rules, [`image`]); the tool calls an assistant
/// message made count their functions' names and arguments.
pub fn count_chat(model: &str, messages: &[Value]) -> u64 {
    let bpe = tokenizer(model);
    let count = |s: &str| bpe.count(s) as u64;
    let mut total = 3;
    for message in messages {
        total += 3;
        for (key, value) in message.as_object().into_iter().flatten() {
            match (key.as_str(), value) {
                ("name", Value::String(s)) => total += count(s) + 1,
                (_, Value::String(s)) => total += count(s),
                ("content", Value::Array(parts)) => total += parts.iter().map(|p| part(model, p, count)).sum::<u64>(),
                ("tool_calls", Value::Array(calls)) => {
                    total +=
                        calls.iter().filter_map(|c| c.get("function")).map(|f| function_call(f, count)).sum::<u64>()
                }
                ("function_call", function) => total += function_call(function, count),
                _ => {}
            }
        }
    }
    total
}

/// A content part: its text, or an image (see [`image`]).
fn part(model: &str, part: &Value, count: impl Fn(&str) -> u64) -> u64 {
    if let Some(tokens) = image::part_tokens(model, part) {
        return tokens;
    }
    part.get("text").and_then(Value::as_str).map_or(0, count)
}

/// A function call's name and arguments.
fn function_call(function: &Value, count: impl Fn(&str) -> u64) -> u64 {
    let text = |field: &str| function.get(field).and_then(Value::as_str).map_or(0, &count);
    text("name") + text("arguments")
}

/// The prompt tokens a request's tool definitions add, by the rule OpenAI's
/// cookbook publishes ("How to count tokens with tiktoken", function calling):
/// per function a start (7 tokens with `o200k_base`, 10 with `cl100k_base`) and
/// `name:description`; per parameter 3 and `name:type:description` (a
/// description's final period dropped), an enum's values 3 each (less 3 for the
/// list); 12 to close the list. Chat's tools (`{"type": "function", "function":
/// {...}}`) and the Responses API's (the function's fields at the top) alike;
/// tools that are not functions (built-in ones) add nothing here.
pub fn count_tools(model: &str, tools: &[Value]) -> u64 {
    let bpe = tokenizer(model);
    let count = |s: &str| bpe.count(s) as i64;
    let start: i64 = if is_o200k(model) { 7 } else { 10 };
    let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).unwrap_or_default().to_owned();
    let functions = tools.iter().map(|t| t.get("function").unwrap_or(t)).filter(|f| f.get("name").is_some());
    let mut total: i64 = 0;
    for function in functions {
        let description = text(function, "description");
        total += start + count(&format!("{}:{}", text(function, "name"), description.trim_end_matches('.')));
        let properties = function.pointer("/parameters/properties").and_then(Value::as_object);
        let Some(properties) = properties.filter(|p| !p.is_empty()) else { continue };
        total += 3;
        for (name, property) in properties {
            total += 3;
            if let Some(values) = property.get("enum").and_then(Value::as_array) {
                total += -3 + values.iter().map(|v| 3 + v.as_str().map_or(0, count)).sum::<i64>();
            }
            let description = text(property, "description");
            total += count(&format!("{name}:{}:{}", text(property, "type"), description.trim_end_matches('.')));
        }
    }
    if total > 0 {
        total += 12;
    }
    total.max(0) as u64
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
    count_chat(model, &messages) + count_tools(model, tools_of(body))
}

/// The prompt tokens of a chat completions request: its `messages` and its
/// `tools` (or the older `functions`).
pub fn count_chat_request(model: &str, body: &Value) -> u64 {
    let messages = body.get("messages").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    count_chat(model, messages) + count_tools(model, tools_of(body))
}

fn tools_of(body: &Value) -> &[Value] {
    let tools = body.get("tools").or_else(|| body.get("functions")).and_then(Value::as_array);
    tools.map_or(&[][..], Vec::as_slice)
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

/// `text` as a model streams it: one piece per token, but for a character
/// whose bytes span tokens, which comes whole with the last of them. The
/// pieces join to `text`.
pub fn pieces(model: &str, text: &str) -> Vec<String> {
    let bpe = tokenizer(model);
    let mut pieces = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for token in bpe.encode(text) {
        pending.extend(bpe.bpe.token_bytes(token));
        if let Ok(piece) = std::str::from_utf8(&pending) {
            pieces.push(piece.to_owned());
            pending.clear();
        }
    }
    debug_assert!(pending.is_empty(), "the tokens of a string spell whole characters");
    pieces
}

/// The first `tokens` tokens of `text`, as a model cut short writes them (a
/// character left incomplete at the cut is dropped).
pub fn truncate(model: &str, text: &str, tokens: u64) -> String {
    let bpe = tokenizer(model);
    let ids = bpe.encode(text);
    let kept = &ids[..ids.len().min(tokens as usize)];
    let bytes = bpe.bpe.decode_tokens(kept);
    match std::str::from_utf8(&bytes) {
        Ok(text) => text.to_owned(),
        Err(e) => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pieces_join_to_the_text_and_number_its_tokens() {
        for (model, text) in
            [("gpt-4o", "{\"city\": \"Zürich\", \"n\": 3}"), ("gpt-4", "naïve 東京 json"), ("gpt-4o", "")]
        {
            let pieces = pieces(model, text);
            assert_eq!(pieces.concat(), text, "{model}: {text}");
            assert!(pieces.len() as u64 <= count(model, text), "{model}: {text}");
        }
        assert_eq!(pieces("gpt-4o", &completion_text(7)).len(), 7);
    }

    /// Counts as tiktoken's own merging does (`tiktoken-rs` as the reference,
    /// in tests only), long runs of one letter included, which tiktoken takes
    /// time quadratic in their length to count.
    #[test]
    fn long_runs_are_counted_as_tiktoken_counts_them() {
        let reference = |model: &str, text: &str| match is_o200k(model) {
            true => tiktoken_rs::o200k_base_singleton().encode_ordinary(text).len() as u64,
            false => tiktoken_rs::cl100k_base_singleton().encode_ordinary(text).len() as u64,
        };
        for model in ["gpt-4o", "gpt-4"] {
            for text in ["x".repeat(3_000), "ab".repeat(1_500), format!("{} tail", "é".repeat(700)), "7".repeat(3_001)]
            {
                assert_eq!(count(model, &text), reference(model, &text), "{model}: {}...", &text[..10]);
            }
        }
        // A megabyte in one run: counted at once (tiktoken would take minutes).
        assert_eq!(count("gpt-4o", &"x".repeat(1_000_000)), 125_000);
    }

    proptest::proptest! {
        #[test]
        fn counts_and_tokens_match_tiktoken(text in "[a-zA-Z0-9 \\n\\t.,!?'\"é東京𝔘😀_-]{0,120}") {
            for (model, reference) in [("gpt-4o", tiktoken_rs::o200k_base_singleton()), ("gpt-4", tiktoken_rs::cl100k_base_singleton())] {
                let tokens = reference.encode_ordinary(&text);
                proptest::prop_assert_eq!(count(model, &text), tokens.len() as u64);
                proptest::prop_assert_eq!(&tokenizer(model).encode(text.as_str()), &tokens);
                proptest::prop_assert_eq!(decode(model, &tokens), Ok(text.clone()));
            }
        }
    }

    #[test]
    fn truncate_keeps_the_first_tokens() {
        let text = completion_text(10);
        assert_eq!(truncate("gpt-4o", &text, 4), completion_text(4));
        assert_eq!(truncate("gpt-4o", &text, 40), text);
        assert!(count("gpt-4o", "𝔘") > 1, "the test needs a character of several tokens");
        assert_eq!(truncate("gpt-4o", "𝔘", 1), "", "a character cut in two is dropped");
    }

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
    fn tools_count_by_the_cookbooks_rule() {
        // OpenAI's cookbook ("How to count tokens with tiktoken", function
        // calling): 101 prompt tokens for gpt-4o-mini and 105 for gpt-4 and
        // gpt-3.5-turbo, as its API counted them.
        let tool = json!({"type": "function", "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["location"]}
        }});
        let body = json!({
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}
            ],
            "tools": [tool.clone()],
        });
        assert_eq!(count_chat_request("gpt-4o-mini", &body), 101);
        assert_eq!(count_chat_request("gpt-4", &body), 105);
        assert_eq!(count_chat_request("gpt-35-turbo", &body), 105);
        // The Responses API's flat tools, and the older `functions`, count alike;
        // built-in tools add nothing, and no tools at all nothing either.
        let flat = json!({"type": "function", "name": tool["function"]["name"], "description": tool["function"]["description"],
            "parameters": tool["function"]["parameters"]});
        assert_eq!(count_tools("gpt-4o", &[flat]), count_tools("gpt-4o", std::slice::from_ref(&tool)));
        assert_eq!(
            count_tools("gpt-4o", &[tool["function"].clone()]),
            count_tools("gpt-4o", std::slice::from_ref(&tool))
        );
        assert_eq!(count_tools("gpt-4o", &[json!({"type": "web_search_preview"})]), 0);
        assert_eq!(count_tools("gpt-4o", &[]), 0);
    }

    #[test]
    fn tool_calls_in_the_history_count_their_names_and_arguments() {
        let call = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
        ]});
        let bare = json!({"role": "assistant", "content": null});
        let added = count("gpt-4o", "get_weather") + count("gpt-4o", "{\"city\": \"Oslo\"}");
        assert_eq!(count_chat("gpt-4o", &[call]), count_chat("gpt-4o", std::slice::from_ref(&bare)) + added);
        let legacy =
            json!({"role": "assistant", "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}});
        let legacy_bare = json!({"role": "assistant"});
        assert_eq!(count_chat("gpt-4o", &[legacy]), count_chat("gpt-4o", &[legacy_bare]) + added);
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
