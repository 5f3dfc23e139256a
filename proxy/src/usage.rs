//! Reading token usage from what a backend sent: `usage` in a JSON body, or, in
//! an SSE stream, the final usage chunk, else the streamed text counted.

use axum::http::{header, HeaderMap};
use gateway_core::Usage;
use serde_json::Value;
use std::io::{Read, Write};

/// A body's content coding (its `Content-Encoding`), as far as reading its
/// usage goes. The proxy asks backends for `identity`; a backend that
/// compresses anyway (behind a CDN or another gateway) is read through gzip
/// and deflate, the codings HTTP servers use. Any other coding, or several
/// applied in turn, cannot be read: its usage is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    /// RFC 9110's `deflate`: the zlib format.
    Deflate,
    Unreadable,
}

impl Coding {
    pub fn of(headers: &HeaderMap) -> Coding {
        let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
        let Some(value) = values.next() else { return Coding::Identity };
        if values.next().is_some() {
            return Coding::Unreadable;
        }
        let name = value.to_str().unwrap_or("?").trim();
        let is = |coding: &str| name.eq_ignore_ascii_case(coding);
        match () {
            () if name.is_empty() || is("identity") => Coding::Identity,
            () if is("gzip") || is("x-gzip") => Coding::Gzip,
            () if is("deflate") => Coding::Deflate,
            () => Coding::Unreadable,
        }
    }
}

/// A body whose usage cannot be read: its coding is not one the proxy
/// decodes, it does not decode, it decodes to more than the proxy reads, or
/// its `usage` is of a shape the proxy does not know.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreadable;

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A coding the proxy does not decode.
    Coding,
    /// The bytes are not what the coding says.
    Corrupt,
    /// It decodes to more than the limit.
    TooLarge,
}

/// `body` decoded from `coding`, if it decodes to at most `limit` bytes.
pub fn decode(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut decoded = Vec::new();
    let take = limit as u64 + 1;
    let read = match coding {
        Coding::Identity if body.len() <= limit => return Ok(body.to_vec()),
        Coding::Identity => return Err(DecodeError::TooLarge),
        Coding::Gzip => flate2::read::MultiGzDecoder::new(body).take(take).read_to_end(&mut decoded),
        Coding::Deflate => flate2::read::ZlibDecoder::new(body).take(take).read_to_end(&mut decoded),
        Coding::Unreadable => return Err(DecodeError::Coding),
    };
    match read {
        Ok(n) if n <= limit => Ok(decoded),
        Ok(_) => Err(DecodeError::TooLarge),
        Err(_) => Err(DecodeError::Corrupt),
    }
}

/// `usage` of a buffered body sent in `coding` (`None` when it has none),
/// reading at most `limit` decoded bytes.
pub fn from_body(coding: Coding, body: &[u8], limit: usize) -> Result<Option<Usage>, Unreadable> {
    if coding == Coding::Identity {
        return from_json(body);
    }
    let decoded = decode(coding, body, limit).map_err(|_| Unreadable)?;
    from_json(&decoded)
}

/// What a Responses API body says of its response: enough to follow one made
/// in the background.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseState {
    pub id: String,
    pub status: String,
    pub background: bool,
}

impl ResponseState {
    /// The state of the response object in a buffered body sent in `coding`
    /// (`None` for any other body).
    pub fn of(coding: Coding, body: &[u8], limit: usize) -> Option<ResponseState> {
        #[derive(serde::Deserialize)]
        struct Fields {
            object: Option<String>,
            id: Option<String>,
            status: Option<String>,
            background: Option<bool>,
        }
        let body = decoded(coding, body, limit)?;
        let fields: Fields = serde_json::from_slice(&body).ok()?;
        if fields.object.as_deref() != Some("response") {
            return None;
        }
        let background = fields.background.unwrap_or(false);
        Some(ResponseState { id: fields.id?, status: fields.status?, background })
    }

    /// Whether the response is done, one way or another: its usage is final.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "incomplete" | "failed" | "cancelled")
    }
}

/// A stream's decoder, fed the coded bytes; what it decodes waits in its `Vec`.
enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(coding: Coding) -> Option<Decoder> {
        match coding {
            Coding::Gzip => Some(Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new()))),
            Coding::Deflate => Some(Decoder::Deflate(flate2::write::ZlibDecoder::new(Vec::new()))),
            Coding::Identity | Coding::Unreadable => None,
        }
    }

    /// Decodes `chunk`; the bytes decoded so far are taken from `decoded`.
    fn decode(&mut self, chunk: &[u8], decoded: &mut Vec<u8>) -> std::io::Result<()> {
        // Flushed after each chunk: the decoders hold what they decode until
        // the next write otherwise, and a stream's `[DONE]` must be seen when
        // it arrives.
        let output = match self {
            Decoder::Gzip(d) => {
                d.write_all(chunk)?;
                d.flush()?;
                d.get_mut()
            }
            Decoder::Deflate(d) => {
                d.write_all(chunk)?;
                d.flush()?;
                d.get_mut()
            }
        };
        decoded.clear();
        std::mem::swap(output, decoded);
        Ok(())
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Gzip(_) => "Decoder::Gzip",
            Decoder::Deflate(_) => "Decoder::Deflate",
        })
    }
}

/// `usage` of a JSON response body, in either of Azure OpenAI's shapes: chat
/// completions, completions and embeddings count `prompt_tokens` and
/// `completion_tokens`; the Responses API counts `input_tokens` and
/// `output_tokens`. `None` for a body that is not JSON or has no `usage` (an
/// error, an operation that reports none); unreadable for a `usage` of any
/// other shape, which is never read as zero. The rest of the body is skipped,
/// not built.
pub fn from_json(body: &[u8]) -> Result<Option<Usage>, Unreadable> {
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<Counts>,
    }
    #[derive(serde::Deserialize)]
    struct Counts {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
    let counts = match serde_json::from_slice::<Body>(body) {
        Ok(Body { usage: None }) => return Ok(None),
        Ok(Body { usage: Some(counts) }) => counts,
        // Not JSON at all, or a `usage` whose counts are not whole numbers.
        Err(_) if has_usage(body) => return Err(Unreadable),
        Err(_) => return Ok(None),
    };
    let usage = match (counts.prompt_tokens, counts.input_tokens) {
        (Some(prompt), _) => Usage { prompt_tokens: prompt, completion_tokens: counts.completion_tokens.unwrap_or(0) },
        (None, Some(input)) => Usage { prompt_tokens: input, completion_tokens: counts.output_tokens.unwrap_or(0) },
        (None, None) => return Err(Unreadable),
    };
    Ok(Some(usage))
}

/// Whether `body` is JSON with a `usage` member that is not null.
fn has_usage(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("usage").is_some_and(|u| !u.is_null()))
}

fn usage_of(value: &Value) -> Option<Usage> {
    usage_of_counts(value.get("usage")?)
}

/// Follows an SSE stream chunk by chunk, without holding its events: keeps the
/// partial last line, the usage chunk when one comes, and the streamed text
/// (the content alone, a fraction of the stream's bytes). The text
/// is counted only if the stream ends without a usage chunk: most streams end
/// with one, and the tokenizer is the dearest part of following a stream.
#[derive(Debug)]
pub struct StreamTracker {
    model: String,
    partial: Vec<u8>,
    usage: Option<Usage>,
    /// The streamed pieces of text, one after the other; `ends` marks where each
    /// ends. Each piece is counted on its own, as the stream delivered it.
    text: String,
    ends: Vec<usize>,
    /// Whether the stream's last event (`data: [DONE]`, or a Responses API
    /// stream's finished response) has come: the client has had all it asked for.
    done: bool,
    /// The stream's decoder, when its backend compressed it.
    decoder: Option<Decoder>,
    decoded: Vec<u8>,
    /// Whether the stream's coding is one the proxy cannot read, or its bytes
    /// did not decode: nothing more of it is read.
    unreadable: bool,
}

impl StreamTracker {
    pub fn new(model: &str) -> StreamTracker {
        StreamTracker::with_coding(model, Coding::Identity)
    }

    /// A tracker of a stream sent in `coding`.
    pub fn with_coding(model: &str, coding: Coding) -> StreamTracker {
        StreamTracker {
            model: model.to_owned(),
            partial: Vec::new(),
            usage: None,
            text: String::new(),
            ends: Vec::new(),
            done: false,
            decoder: Decoder::new(coding),
            decoded: Vec::new(),
            unreadable: coding == Coding::Unreadable,
        }
    }

    /// Whether the stream could not be read (see [`Coding`]): its usage is
    /// then the prompt alone.
    pub fn unreadable(&self) -> bool {
        self.unreadable
    }

    /// Marks the body unreadable (a buffered body that did not decode): its
    /// usage is the prompt alone.
    pub fn give_up(&mut self) {
        self.unreadable = true;
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.unreadable {
            return;
        }
        let Some(decoder) = self.decoder.as_mut() else { return self.feed_plain(chunk) };
        let mut decoded = std::mem::take(&mut self.decoded);
        match decoder.decode(chunk, &mut decoded) {
            Ok(()) => self.feed_plain(&decoded),
            Err(_) => self.unreadable = true,
        }
        self.decoded = decoded;
    }

    fn feed_plain(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                self.partial.extend_from_slice(rest);
                return;
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..=end]);
            self.line(&line);
            line.clear();
            self.partial = line;
            rest = &rest[end + 1..];
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.line(&rest[..=end]);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = data.trim_ascii();
        self.done |= data == b"[DONE]";
        if data.is_empty() || self.done {
            return;
        }
        // The fields read, parsed in place; an event of another shape is read
        // as a generic value, so that nothing it holds is missed.
        match serde_json::from_slice::<Event<'_>>(data) {
            Ok(event) => self.event(event),
            Err(_) => self.value(data),
        }
    }

    fn event(&mut self, event: Event<'_>) {
        if let Some(usage) = event.usage.as_ref().and_then(usage_of_counts) {
            self.usage = Some(usage);
        }
        for choice in event.choices {
            let Some(delta) = choice.delta else {
                self.push_text(choice.text.as_deref());
                continue;
            };
            // A `delta.content` that is there, even null, is the choice's text.
            let text = match delta.content {
                Some(content) => content,
                None => choice.text,
            };
            self.push_text(text.as_deref());
            self.push_text(delta.refusal.as_deref());
            let calls = delta.tool_calls.into_iter().flatten().filter_map(|call| call.function);
            for function in calls.chain(delta.function_call) {
                self.push_text(function.name.as_deref());
                self.push_text(function.arguments.as_deref());
            }
        }
        if let Some(kind) = event.kind.as_deref() {
            let usage = event.response.and_then(|r| r.usage);
            let called = event.item.filter(|item| item.kind.as_deref() == Some("function_call")).and_then(|i| i.name);
            self.responses_event(kind, event.delta.as_deref(), called.as_deref(), usage.as_ref());
        }
    }

    fn value(&mut self, data: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
        if let Some(usage) = usage_of(&value) {
            self.usage = Some(usage);
        }
        for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
            for text in choice_texts(choice, "delta") {
                self.push_text(Some(text));
            }
        }
        if let Some(kind) = value.get("type").and_then(Value::as_str) {
            let delta = value.get("delta").and_then(Value::as_str);
            let item =
                value.get("item").filter(|item| item.get("type").and_then(Value::as_str) == Some("function_call"));
            let called = item.and_then(|item| item.get("name")).and_then(Value::as_str);
            self.responses_event(kind, delta, called, value.pointer("/response/usage"));
        }
    }

    /// An event of a Responses API stream: its text deltas are the reply's
    /// text, as is the name of a function call it opens (`called`, whose
    /// arguments follow as deltas), and its last event (the response
    /// completed, incomplete or failed) carries the response with its usage.
    /// No `[DONE]` follows it: that event is where the client has all it asked for.
    fn responses_event(&mut self, kind: &str, delta: Option<&str>, called: Option<&str>, usage: Option<&Value>) {
        if RESPONSES_TEXT_DELTAS.contains(&kind) {
            self.push_text(delta);
        }
        if kind == "response.output_item.added" {
            self.push_text(called);
        }
        if RESPONSES_LAST_EVENTS.contains(&kind) {
            self.done = true;
            if let Some(usage) = usage.and_then(usage_of_counts) {
                self.usage = Some(usage);
            }
        }
    }

    fn push_text(&mut self, text: Option<&str>) {
        let Some(text) = text.filter(|t| !t.is_empty()) else { return };
        self.text.push_str(text);
        self.ends.push(self.text.len());
    }

    /// Whether the stream's last event has been fed: `data: [DONE]`, or a
    /// Responses API stream's completed, incomplete or failed response.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The usage to charge: the stream's own usage chunk, else the prompt as
    /// counted before forwarding plus the completion tokens streamed so far.
    pub fn usage(&self, prompt_tokens: u64) -> Usage {
        if let Some(usage) = self.usage {
            return usage;
        }
        let mut completion_tokens = 0u64;
        let mut start = 0;
        for &end in &self.ends {
            completion_tokens = completion_tokens.saturating_add(tokenizer::count(&self.model, &self.text[start..end]));
            start = end;
        }
        Usage { prompt_tokens, completion_tokens }
    }
}

/// The Responses API's stream events whose `delta` is text the model wrote
/// (its reply, a refusal, a tool call's arguments, a summary of its reasoning):
/// what a stream without usage is charged for.
const RESPONSES_TEXT_DELTAS: [&str; 5] = [
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta",
];

/// The Responses API's last stream events, each with the response and its usage.
const RESPONSES_LAST_EVENTS: [&str; 3] = ["response.completed", "response.incomplete", "response.failed"];

/// The fields of a stream event that the tracker reads: a chat or completions
/// chunk's `choices` and `usage`, or a Responses API event's `type`, text
/// `delta` and `response`.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    response: Option<ResponseUsage>,
    #[serde(default, borrow)]
    item: Option<Item<'a>>,
}

/// An output item a Responses API event carries: the name of a function call
/// is text the model wrote.
#[derive(serde::Deserialize)]
struct Item<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
}

/// The response a Responses API event carries, of which its usage is read.
#[derive(serde::Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    /// `Some(None)`: the field is there and null.
    #[serde(default, borrow, deserialize_with = "present")]
    content: Option<Option<std::borrow::Cow<'a, str>>>,
    /// A refusal, and the calls of tools (or of the older `function_call`) the
    /// model makes: text it writes as much as its content is.
    #[serde(default, borrow)]
    refusal: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(default, borrow)]
    function_call: Option<Function<'a>>,
}

#[derive(serde::Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<Function<'a>>,
}

/// A streamed piece of a function call: its name (in the first piece) and its arguments.
#[derive(serde::Deserialize)]
struct Function<'a> {
    #[serde(default, borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// The text a chat or completions choice holds, read generically from its
/// `part` (a stream chunk's `delta`, a buffered answer's `message`): its
/// content (else the choice's `text`), its refusal, and its function calls'
/// names and arguments.
fn choice_texts<'a>(choice: &'a Value, part: &str) -> Vec<&'a str> {
    let part = choice.get(part);
    let field = |name: &str| part.and_then(|p| p.get(name));
    let content = field("content").or_else(|| choice.get("text")).and_then(Value::as_str);
    let refusal = field("refusal").and_then(Value::as_str);
    let calls = field("tool_calls").and_then(Value::as_array).into_iter().flatten();
    let functions = calls.filter_map(|call| call.get("function")).chain(field("function_call"));
    let function_texts = functions.flat_map(|f| [f.get("name"), f.get("arguments")]).flatten();
    let mut texts: Vec<&str> = content.into_iter().chain(refusal).collect();
    texts.extend(function_texts.filter_map(Value::as_str));
    texts
}

/// What the model wrote, piece by piece, in a buffered answer sent in `coding`
/// that is a generation: a chat completion's or completion's choices, a
/// response's output (its text, refusals, function calls and reasoning
/// summaries), or an embeddings list (nothing written). `None` for any other
/// body (an error, a file, a body that is not JSON), which used no tokens.
pub fn generated_texts(coding: Coding, body: &[u8], limit: usize) -> Option<Vec<String>> {
    let body = decoded(coding, body, limit)?;
    let body: Value = serde_json::from_slice(&body).ok()?;
    let texts: Vec<&str> = match body.get("object").and_then(Value::as_str) {
        Some("response") => response_texts(&body),
        Some("list") if is_embeddings(&body) => Vec::new(),
        _ => {
            let choices = body.get("choices").and_then(Value::as_array)?;
            choices.iter().flat_map(|choice| choice_texts(choice, "message")).collect()
        }
    };
    Some(texts.into_iter().map(str::to_owned).collect())
}

/// The text of a response object's output items.
fn response_texts(response: &Value) -> Vec<&str> {
    let items = response.get("output").and_then(Value::as_array).into_iter().flatten();
    let mut texts = Vec::new();
    for item in items {
        let parts = ["content", "summary"].into_iter().filter_map(|list| item.get(list)?.as_array()).flatten();
        for part in parts {
            texts.extend(["text", "refusal"].into_iter().filter_map(|field| part.get(field)?.as_str()));
        }
        texts.extend(["name", "arguments"].into_iter().filter_map(|field| item.get(field)?.as_str()));
    }
    texts
}

/// Whether a list holds embeddings: at least one, and nothing else.
fn is_embeddings(list: &Value) -> bool {
    let data = list.get("data").and_then(Value::as_array).filter(|data| !data.is_empty());
    data.is_some_and(|data| data.iter().all(|item| item.get("object").and_then(Value::as_str) == Some("embedding")))
}

/// `body` decoded from `coding`, at most `limit` bytes of it; `None` if it
/// cannot be.
fn decoded(coding: Coding, body: &[u8], limit: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
    match coding {
        Coding::Identity => Some(std::borrow::Cow::Borrowed(body)),
        _ => decode(coding, body, limit).ok().map(std::borrow::Cow::Owned),
    }
}

/// Counts in either shape (see [`from_json`]); `None` for any other.
fn usage_of_counts(usage: &Value) -> Option<Usage> {
    let count = |name: &str| usage.get(name).and_then(Value::as_u64);
    let (prompt, completion) = match count("prompt_tokens") {
        Some(prompt) => (prompt, count("completion_tokens")),
        None => (count("input_tokens")?, count("output_tokens")),
    };
    Some(Usage { prompt_tokens: prompt, completion_tokens: completion.unwrap_or(0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed(coding: Coding, body: &[u8]) -> Vec<u8> {
        let level = flate2::Compression::default();
        match coding {
            Coding::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
                encoder.write_all(body).unwrap();
                encoder.finish().unwrap()
            }
            Coding::Deflate => {
                let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
                encoder.write_all(body).unwrap();
                encoder.finish().unwrap()
            }
            Coding::Identity | Coding::Unreadable => body.to_vec(),
        }
    }

    fn headers(codings: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for coding in codings {
            headers.append(header::CONTENT_ENCODING, coding.parse().unwrap());
        }
        headers
    }

    #[test]
    fn what_a_generation_wrote_is_read_from_its_buffered_body() {
        let check = |body: &str, expected: Option<&[&str]>| {
            let expected = expected.map(|texts| texts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
            for coding in [Coding::Identity, Coding::Gzip, Coding::Deflate] {
                let coded = compressed(coding, body.as_bytes());
                assert_eq!(generated_texts(coding, &coded, 1 << 20), expected, "{coding:?} {body}");
            }
        };
        let chat = r#"{"object":"chat.completion","choices":[{"message":{"content":"Hi","refusal":null}},
            {"message":{"content":null,"function_call":{"name":"f","arguments":"{}"}}}]}"#;
        check(chat, Some(&["Hi", "f", "{}"]));
        check(r#"{"choices":[{"text":"once"}]}"#, Some(&["once"]));
        check(r#"{"choices":[{"message":{"refusal":"No."}}]}"#, Some(&["No."]));
        let response =
            r#"{"object":"response","output":[{"type":"message","content":[{"type":"refusal","refusal":"No."}]}]}"#;
        check(response, Some(&["No."]));
        check(r#"{"object":"list","data":[{"object":"embedding","embedding":[1]}]}"#, Some(&[]));
        // Not generations: an error, a list of something else, a file, not JSON.
        check(r#"{"error":{"code":"429","message":"Slow down"}}"#, None);
        check(r#"{"object":"list","data":[{"object":"file"}]}"#, None);
        check(r#"{"object":"list","data":[]}"#, None);
        check(r#"{"object":"file","id":"file-1"}"#, None);
        check("not json", None);
    }

    #[test]
    fn codings_are_read_from_content_encoding() {
        let check =
            |codings: &[&str], expected: Coding| assert_eq!(Coding::of(&headers(codings)), expected, "{codings:?}");
        check(&[], Coding::Identity);
        check(&["identity"], Coding::Identity);
        check(&["gzip"], Coding::Gzip);
        check(&["GZip "], Coding::Gzip);
        check(&["x-gzip"], Coding::Gzip);
        check(&["deflate"], Coding::Deflate);
        check(&["br"], Coding::Unreadable);
        check(&["zstd"], Coding::Unreadable);
        // Two codings applied in turn, in one field or two: not read.
        check(&["gzip, br"], Coding::Unreadable);
        check(&["gzip", "gzip"], Coding::Unreadable);
    }

    #[test]
    fn buffered_bodies_are_read_through_their_coding_within_a_limit() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let usage = Some(Usage { prompt_tokens: 5, completion_tokens: 2 });
        for coding in [Coding::Identity, Coding::Gzip, Coding::Deflate] {
            assert_eq!(from_body(coding, &compressed(coding, body), 1 << 20), Ok(usage), "{coding:?}");
            // Decoded past the limit (a decompression bomb, say): not read.
            let limit = if coding == Coding::Identity { 1 << 20 } else { body.len() - 1 };
            let want = if coding == Coding::Identity { Ok(usage) } else { Err(Unreadable) };
            assert_eq!(from_body(coding, &compressed(coding, body), limit), want, "{coding:?}");
        }
        assert_eq!(from_body(Coding::Gzip, &compressed(Coding::Gzip, b"{}"), 100), Ok(None));
        assert_eq!(from_body(Coding::Gzip, body, 1 << 20), Err(Unreadable), "not gzip at all");
        assert_eq!(from_body(Coding::Deflate, &compressed(Coding::Gzip, body), 1 << 20), Err(Unreadable));
        assert_eq!(from_body(Coding::Unreadable, body, 1 << 20), Err(Unreadable));
        // A compressed stream that breaks off is given up, and so is one in a
        // coding not read; the prompt alone is charged.
        let mut t = StreamTracker::with_coding("gpt-4o", Coding::Gzip);
        t.feed(b"data: not gzip at all\n\n");
        assert!(t.unreadable());
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 0 });
        let mut t = StreamTracker::with_coding("gpt-4o", Coding::Unreadable);
        t.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n");
        assert!(t.unreadable());
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 0 });
    }

    #[test]
    fn usage_chunks_win_and_text_is_counted_otherwise() {
        let mut t = StreamTracker::new("gpt-4o");
        t.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"The\"}}]}\n\nda");
        t.feed(b"ta: {\"choices\":[{\"delta\":{\"content\":\" quick brown\"}}]}\n\n");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 3 });
        t.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\ndata: [DO");
        assert!(!t.done(), "`[DONE]` is not complete yet");
        t.feed(b"NE]\n\n");
        assert!(t.done(), "the stream's last event has come");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 9, completion_tokens: 4 });
    }

    #[test]
    fn buffered_usage_is_read_in_either_shape_and_never_guessed() {
        let check = |body: &str, expected: Result<Option<(u64, u64)>, Unreadable>| {
            let expected = expected.map(|u| u.map(|(p, c)| Usage { prompt_tokens: p, completion_tokens: c }));
            assert_eq!(from_json(body.as_bytes()), expected, "{body}");
        };
        // Chat completions, completions, embeddings (no completion).
        check(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#, Ok(Some((5, 2))));
        check(r#"{"object":"list","usage":{"prompt_tokens":8,"total_tokens":8}}"#, Ok(Some((8, 0))));
        // The Responses API, as Azure answers it.
        let response = r#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message",
            "content":[{"type":"output_text","text":"Hi","annotations":[]}]}],"usage":{"input_tokens":11,
            "input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":
            {"reasoning_tokens":0},"total_tokens":14}}"#;
        check(response, Ok(Some((11, 3))));
        // No usage to read: an error body, a null usage, a body that is not JSON.
        check(r#"{"error":{"code":"429","message":"slow down"}}"#, Ok(None));
        check(r#"{"usage":null}"#, Ok(None));
        check("not json", Ok(None));
        check("", Ok(None));
        // A usage of another shape is not read as zero.
        check(r#"{"usage":{"total_tokens":14}}"#, Err(Unreadable));
        check(r#"{"usage":{"prompt_tokens":"5","completion_tokens":2}}"#, Err(Unreadable));
        check(r#"{"usage":{"input_tokens":-1}}"#, Err(Unreadable));
        check(r#"{"usage":[5,2]}"#, Err(Unreadable));
    }

    /// The tracker as first written: every event parsed as a generic value and
    /// its text counted at once. The tracker must charge what it charged.
    fn reference(model: &str, stream: &[u8], prompt: u64) -> Usage {
        let (mut usage, mut completion) = (None, 0u64);
        for line in stream.split(|b| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = std::str::from_utf8(data).unwrap_or("").trim();
            let Ok(value) = serde_json::from_str::<Value>(data) else { continue };
            usage = usage_of(&value).or(usage);
            let mut texts: Vec<&str> = Vec::new();
            for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
                let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str);
                texts.extend(text);
                texts.extend(choice.pointer("/delta/refusal").and_then(Value::as_str));
                let mut functions: Vec<&Value> = Vec::new();
                if let Some(Value::Array(calls)) = choice.pointer("/delta/tool_calls") {
                    functions.extend(calls.iter().filter_map(|call| call.get("function")));
                }
                functions.extend(choice.pointer("/delta/function_call"));
                for function in functions {
                    texts.extend(function.get("name").and_then(Value::as_str));
                    texts.extend(function.get("arguments").and_then(Value::as_str));
                }
            }
            // The Responses API: text deltas, and the usage of the finished response.
            let kind = value.get("type").and_then(Value::as_str).unwrap_or_default();
            let item = value.get("item").filter(|i| i.get("type").and_then(Value::as_str) == Some("function_call"));
            if kind == "response.output_item.added" {
                texts.extend(item.and_then(|i| i.get("name")).and_then(Value::as_str));
            }
            if matches!(
                kind,
                "response.output_text.delta"
                    | "response.refusal.delta"
                    | "response.function_call_arguments.delta"
                    | "response.reasoning_summary_text.delta"
                    | "response.reasoning_text.delta"
            ) {
                texts.extend(value.get("delta").and_then(Value::as_str));
            }
            if matches!(kind, "response.completed" | "response.incomplete" | "response.failed") {
                usage = value.pointer("/response/usage").and_then(usage_of_counts).or(usage);
            }
            completion += texts.iter().filter(|t| !t.is_empty()).map(|t| tokenizer::count(model, t)).sum::<u64>();
        }
        usage.unwrap_or(Usage { prompt_tokens: prompt, completion_tokens: completion })
    }

    /// Feeds `events` as one SSE stream split at every byte, and in one piece,
    /// and checks the charge against the reference and the expected figures.
    fn check(events: &[&str], expected: (u64, u64)) {
        let stream: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        let stream = stream.as_bytes();
        let want = Usage { prompt_tokens: expected.0, completion_tokens: expected.1 };
        assert_eq!(reference("gpt-4o", stream, 7), want, "reference on {events:?}");
        for split in 0..=stream.len() {
            let mut t = StreamTracker::new("gpt-4o");
            t.feed(&stream[..split]);
            t.feed(&stream[split..]);
            assert_eq!(t.usage(7), want, "{events:?} split at {split}");
        }
        // The same stream compressed by a backend that was not asked to.
        for coding in [Coding::Gzip, Coding::Deflate] {
            let coded = compressed(coding, stream);
            for split in 0..=coded.len() {
                let mut t = StreamTracker::with_coding("gpt-4o", coding);
                t.feed(&coded[..split]);
                t.feed(&coded[split..]);
                assert_eq!(t.usage(7), want, "{coding:?} {events:?} split at {split}");
                assert!(!t.unreadable());
            }
        }
    }

    #[test]
    fn the_tracker_charges_what_a_generic_reading_charges() {
        check(
            &[r#"{"choices":[{"delta":{"content":"The"}}]}"#, r#"{"choices":[{"delta":{"content":" quick brown"}}]}"#],
            (7, 3),
        );
        // A null content is no text, even beside a `text` field.
        check(&[r#"{"choices":[{"delta":{"content":null},"text":"ignored words"}]}"#], (7, 0));
        // Legacy completions stream `text`; a null delta falls back to it.
        check(&[r#"{"choices":[{"text":"Hello there"}]}"#, r#"{"choices":[{"delta":null,"text":" you"}]}"#], (7, 3));
        // Events of an odd shape are read generically, not dropped.
        check(&[r#"{"choices":{"not":"a list"},"usage":{"prompt_tokens":3,"completion_tokens":2}}"#], (3, 2));
        check(&[r#"{"choices":[{"delta":{"content":5}}]}"#, r#"{"choices":[{"delta":{"content":"Hi"}}]}"#], (7, 1));
        // A null usage, a usage without prompt tokens and a broken event change nothing.
        check(
            &[
                r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
                r#"{"usage":{"completion_tokens":9}}"#,
                "{broken",
            ],
            (7, 1),
        );
        // The last usage chunk wins over the text.
        check(
            &[
                r#"{"choices":[{"delta":{"content":"Hi"}}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
                "[DONE]",
            ],
            (9, 4),
        );
        // Tool calls, the older function call and refusals are text the model wrote.
        let count = |texts: &[&str]| texts.iter().map(|t| tokenizer::count("gpt-4o", t)).sum::<u64>();
        check(
            &[
                r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":" \"Oslo\"}"}}]}}]}"#,
                r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            ],
            (7, count(&["get_weather", "{\"city\":", " \"Oslo\"}"])),
        );
        check(
            &[
                r#"{"choices":[{"delta":{"function_call":{"name":"lookup","arguments":"{}"}}}]}"#,
                r#"{"choices":[{"delta":{"refusal":"I can't help with that."}}]}"#,
                r#"{"choices":[{"delta":{"tool_calls":null,"content":"ok"}}]}"#,
            ],
            (7, count(&["lookup", "{}", "I can't help with that.", "ok"])),
        );
        check(
            &[r#"{"choices":[{"delta":{"content":"caf\u00e9 \"quoted\""}}]}"#],
            (7, tokenizer::count("gpt-4o", "café \"quoted\"")),
        );
    }

    /// A Responses API stream as Azure sends it (`event:` lines included), with
    /// `deltas` for text and `last` as its final event, if it has one.
    fn responses_stream(deltas: &[(&str, &str)], last: Option<&str>) -> Vec<String> {
        let mut events = vec![
            r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[],"usage":null}}"#.to_owned(),
            r#"{"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"type":"message","role":"assistant","content":[]}}"#.to_owned(),
        ];
        for (kind, delta) in deltas {
            let delta = serde_json::to_string(delta).unwrap();
            events.push(format!(r#"{{"type":"{kind}","sequence_number":2,"output_index":0,"delta":{delta}}}"#));
        }
        events.extend(last.map(str::to_owned));
        events
    }

    fn as_refs(events: &[String]) -> Vec<&str> {
        events.iter().map(String::as_str).collect()
    }

    #[test]
    fn responses_streams_are_charged_their_usage_or_their_text() {
        let text = [("response.output_text.delta", "The"), ("response.output_text.delta", " quick brown")];
        let completed = r#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}}"#;
        check(&as_refs(&responses_stream(&text, Some(completed))), (12, 3));
        // Cut off before its last event (the client left): the prompt and the text so far.
        check(&as_refs(&responses_stream(&text, None)), (7, 3));
        // Refusals, tool call arguments and reasoning summaries are text the model wrote;
        // audio is not text, and other events' fields are not either.
        let more = [
            ("response.refusal.delta", "I cannot"),
            ("response.function_call_arguments.delta", "{\"city\":"),
            ("response.reasoning_summary_text.delta", "Thinking"),
            ("response.audio.delta", "UklGRiQAAABXQVZF"),
            ("response.output_text.done", "ignored words"),
        ];
        let expected = ["I cannot", "{\"city\":", "Thinking"].iter().map(|t| tokenizer::count("gpt-4o", t)).sum();
        check(&as_refs(&responses_stream(&more, None)), (7, expected));
        // A function call's name is written when its item opens (and not again when it is done).
        let mut call = responses_stream(&[("response.function_call_arguments.delta", "{}")], None);
        let item = r#"{"type":"function_call","id":"fc_1","call_id":"call_1","name":"get_weather","arguments":"","status":"in_progress"}"#;
        call.insert(
            2,
            format!(r#"{{"type":"response.output_item.added","sequence_number":2,"output_index":1,"item":{item}}}"#),
        );
        call.push(format!(
            r#"{{"type":"response.output_item.done","sequence_number":4,"output_index":1,"item":{item}}}"#
        ));
        let expected = tokenizer::count("gpt-4o", "get_weather") + tokenizer::count("gpt-4o", "{}");
        check(&as_refs(&call), (7, expected));
        // A response cut short, or failed, still reports what it used.
        let incomplete = completed.replace("response.completed", "response.incomplete");
        check(&as_refs(&responses_stream(&text, Some(&incomplete))), (12, 3));
        let failed = r#"{"type":"response.failed","response":{"status":"failed","usage":null}}"#;
        check(&as_refs(&responses_stream(&text, Some(failed))), (7, 3));
    }

    #[test]
    fn a_responses_stream_ends_at_its_finished_response() {
        let events = responses_stream(&[("response.output_text.delta", "Hi")], None);
        let mut t = StreamTracker::new("gpt-4o");
        for event in &events {
            t.feed(format!("event: x\ndata: {event}\n\n").as_bytes());
        }
        assert!(!t.done(), "text deltas do not end a stream");
        t.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":");
        assert!(!t.done(), "the last event is not complete yet");
        t.feed(b"{\"input_tokens\":4,\"output_tokens\":1,\"total_tokens\":5}}}\n\n");
        assert!(t.done(), "the finished response is the stream's last event");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 4, completion_tokens: 1 });
    }
}
