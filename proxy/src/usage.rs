//! Reading token usage from what a backend sent: `usage` in a JSON body, or, in
//! an SSE stream, the final usage chunk, else the streamed text counted.

use gateway_core::Usage;
use serde_json::Value;

/// `usage` of a JSON response body, if it has one; the rest of the body is
/// skipped, not built.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<Counts>,
    }
    #[derive(serde::Deserialize)]
    struct Counts {
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let usage = serde_json::from_slice::<Body>(body).ok()?.usage?;
    Some(Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens })
}

fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage")?;
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    Some(Usage { prompt_tokens: prompt, completion_tokens: completion })
}

/// Follows an SSE stream chunk by chunk, without holding it: keeps the partial
/// last line, the usage chunk when one comes, and the streamed text's tokens.
#[derive(Debug)]
pub struct StreamTracker {
    model: String,
    partial: Vec<u8>,
    usage: Option<Usage>,
    completion_tokens: u64,
}

impl StreamTracker {
    pub fn new(model: &str) -> StreamTracker {
        StreamTracker { model: model.to_owned(), partial: Vec::new(), usage: None, completion_tokens: 0 }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = std::str::from_utf8(data).unwrap_or("").trim();
        if data.is_empty() || data == "[DONE]" {
            return;
        }
        let Ok(value) = serde_json::from_str::<Value>(data) else { return };
        if let Some(usage) = usage_of(&value) {
            self.usage = Some(usage);
        }
        for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str);
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                self.completion_tokens = self.completion_tokens.saturating_add(tokenizer::count(&self.model, text));
            }
        }
    }

    /// The usage to charge: the stream's own usage chunk, else the prompt as
    /// counted before forwarding plus the completion tokens streamed so far.
    pub fn usage(&self, prompt_tokens: u64) -> Usage {
        self.usage.unwrap_or(Usage { prompt_tokens, completion_tokens: self.completion_tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_chunks_win_and_text_is_counted_otherwise() {
        let mut t = StreamTracker::new("gpt-4o");
        t.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"The\"}}]}\n\nda");
        t.feed(b"ta: {\"choices\":[{\"delta\":{\"content\":\" quick brown\"}}]}\n\n");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 3 });
        t.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\ndata: [DONE]\n\n");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 9, completion_tokens: 4 });
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":5,"completion_tokens":2}}"#),
            Some(Usage { prompt_tokens: 5, completion_tokens: 2 })
        );
        assert_eq!(from_json(b"not json"), None);
    }
}
