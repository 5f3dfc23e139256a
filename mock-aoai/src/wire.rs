//! Azure OpenAI's wire formats: request fields the mock reads, response bodies,
//! stream chunks and error bodies.

use crate::logprobs::{self, MAX_TOP_CHAT, MAX_TOP_COMPLETIONS};
use crate::model::{Completion, FinishReason, Operation, Throttle};
use crate::shape::{self, Said, Shape};
use crate::stored::{self, Keeping};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use tokenizer as tokens;

/// The request fields that matter to the model, read from the JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedRequest {
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub best_of: Option<u64>,
    /// Choices the answer has: `n` (1 to 128), times the prompts of a legacy
    /// completion.
    pub choices: u64,
    /// Completions generated and billed: `choices`, or `best_of` for each prompt
    /// of a legacy completion that asks for more candidates than it returns.
    pub generated: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// Embeddings: the inputs, and whether vectors go back as base64.
    pub inputs: Vec<String>,
    pub base64: bool,
    /// Embeddings: the length asked for (`dimensions`), shorter than the model's.
    pub dimensions: Option<u64>,
    /// Chat: prose, JSON, or a call of a function.
    pub shape: Shape,
    /// Chat and legacy completions: log probabilities asked for, with this
    /// many alternatives at each place.
    pub logprobs: Option<u64>,
    /// The Responses API: the response continued, stored, or in the background.
    pub keeping: Keeping,
}

/// Reads and checks a request body; the error names the field.
pub fn parse_request(operation: Operation, model: &str, body: &[u8]) -> Result<ParsedRequest, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Some(obj) = value.as_object() else { return Err("the body must be a JSON object".into()) };
    // A legacy completion answers `n` choices for each of its prompts.
    let (prompt_tokens, inputs, prompts) = match operation {
        Operation::ChatCompletions => (chat_prompt(model, &value)?, Vec::new(), 1),
        Operation::Completions => {
            let prompts = texts(model, obj, "prompt")?;
            (prompts.iter().map(|p| p.tokens).sum(), Vec::new(), prompts.len() as u64)
        }
        Operation::Embeddings => {
            let inputs = texts(model, obj, "input")?;
            (inputs.iter().map(|p| p.tokens).sum(), inputs.into_iter().map(|p| p.text).collect(), 1)
        }
        Operation::Responses => (responses_prompt(model, &value)?, Vec::new(), 1),
    };
    let max_tokens = match operation {
        Operation::Responses => uint(obj, "max_output_tokens")?,
        _ => match uint(obj, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => uint(obj, "max_tokens")?,
        },
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("`stream` must be a boolean".into()),
    };
    let include_usage = obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool);
    let base64 = match obj.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(format!("`encoding_format` must be \"float\" or \"base64\", not \"{other}\"")),
    };
    let n = choices(operation, obj)?;
    let best_of = best_of(operation, obj, n, stream)?;
    Ok(ParsedRequest {
        prompt_tokens,
        max_tokens,
        best_of,
        choices: n.saturating_mul(prompts),
        generated: best_of.unwrap_or(n).max(n).saturating_mul(prompts),
        stream,
        include_usage: include_usage.unwrap_or(false),
        inputs,
        base64,
        dimensions: match operation {
            Operation::Embeddings => uint(obj, "dimensions")?,
            _ => None,
        },
        shape: match operation {
            Operation::ChatCompletions => shape::read(obj)?,
            Operation::Responses => shape::read_responses(obj)?,
            _ => Shape::Prose,
        },
        logprobs: asked_logprobs(operation, obj)?,
        keeping: match operation {
            Operation::Responses => stored::read(obj, stream)?,
            _ => Keeping::default(),
        },
    })
}

/// The alternatives a request asks to see at each place, if it asks for log
/// probabilities: chat's `logprobs` (a boolean) and `top_logprobs`, a legacy
/// completion's `logprobs` (the count).
fn asked_logprobs(operation: Operation, obj: &Map<String, Value>) -> Result<Option<u64>, String> {
    match operation {
        Operation::ChatCompletions => {
            let asked = match obj.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(asked)) => *asked,
                Some(_) => return Err("`logprobs` must be a boolean".into()),
            };
            match (asked, uint(obj, "top_logprobs")?) {
                (_, Some(top)) if top > MAX_TOP_CHAT => {
                    Err(format!("`top_logprobs` must be from 0 to {MAX_TOP_CHAT}, not {top}"))
                }
                (false, Some(_)) => Err("`top_logprobs` needs `logprobs` set to true".into()),
                (true, top) => Ok(Some(top.unwrap_or(0))),
                (false, None) => Ok(None),
            }
        }
        Operation::Completions => match uint(obj, "logprobs")? {
            Some(top) if top > MAX_TOP_COMPLETIONS => {
                Err(format!("`logprobs` must be from 0 to {MAX_TOP_COMPLETIONS}, not {top}"))
            }
            top => Ok(top),
        },
        _ => Ok(None),
    }
}

/// Most completions one request may ask for, as the API's spec bounds `n`
/// (scenarios and traces are checked against it too).
pub const MAX_CHOICES: u64 = 128;

/// How many completions a chat or (legacy) completions request asks for: its `n`.
/// Embeddings and the Responses API answer one.
fn choices(operation: Operation, obj: &Map<String, Value>) -> Result<u64, String> {
    if !matches!(operation, Operation::ChatCompletions | Operation::Completions) {
        return Ok(1);
    }
    match uint(obj, "n")? {
        None => Ok(1),
        Some(n @ 1..=MAX_CHOICES) => Ok(n),
        Some(n) => Err(format!("`n` must be from 1 to {MAX_CHOICES}, not {n}")),
    }
}

/// Most candidates a legacy completion may have generated (`best_of`).
const MAX_BEST_OF: u64 = 20;

/// A legacy completion's `best_of`: that many candidates generated (and billed)
/// for each prompt, of which the best `n` are returned; so never fewer than
/// `n`, and never streamed. Other operations do not take it.
fn best_of(operation: Operation, obj: &Map<String, Value>, n: u64, stream: bool) -> Result<Option<u64>, String> {
    if operation != Operation::Completions {
        return Ok(None);
    }
    match uint(obj, "best_of")? {
        Some(b) if !(1..=MAX_BEST_OF).contains(&b) => {
            Err(format!("`best_of` must be from 1 to {MAX_BEST_OF}, not {b}"))
        }
        Some(b) if b < n => Err(format!("`best_of` ({b}) must be at least `n` ({n})")),
        Some(b) if b > 1 && stream => Err("`best_of` above 1 cannot be streamed: set `stream` to false".into()),
        best_of => Ok(best_of),
    }
}

fn chat_prompt(model: &str, body: &Value) -> Result<u64, String> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err("`messages` is required: an array of chat messages".into());
    };
    if messages.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(format!("`messages[{i}].role` is required: \"system\", \"user\", \"assistant\" or \"tool\""));
        }
    }
    Ok(tokens::count_chat_request(model, body))
}

/// A Responses API request's prompt: `input`, a string or a non-empty list
/// of items (messages, with a role), after `instructions`.
fn responses_prompt(model: &str, body: &Value) -> Result<u64, String> {
    match body.get("input") {
        Some(Value::String(_)) => {}
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let kind = item.get("type").and_then(Value::as_str);
                let role = item.get("role").and_then(Value::as_str);
                match (kind, role) {
                    (None | Some("message"), Some(_)) | (Some("function_call" | "function_call_output"), _) => {}
                    _ => return Err(format!(
                        "`input[{i}]` must be a message with a `role` (\"system\", \"developer\", \"user\" or \"assistant\"), \
                         a `function_call` or a `function_call_output`: the mock serves these items"
                    )),
                }
            }
        }
        _ => return Err("`input` is required: a string or a non-empty array of input items".into()),
    }
    match body.get("instructions") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return Err("`instructions` must be a string".into()),
    }
    Ok(tokens::count_responses(model, body))
}

/// The deployment a Responses API or v1 API request names: its `model`.
pub fn body_deployment(body: &[u8]) -> Result<String, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    match value.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model.clone()),
        _ => Err("`model` is required: the name of the deployment".into()),
    }
}

/// One prompt or embeddings input, and its tokens as the service counts them.
struct Text {
    text: String,
    tokens: u64,
}

/// A prompt or embeddings input in any of the forms the service takes: a
/// string, a non-empty array of strings, an array of tokens, or an array of
/// token arrays (as LangChain's embeddings send them). Tokens count as they
/// are; their text is what the tokens spell in the model's vocabulary.
fn texts(model: &str, obj: &Map<String, Value>, field: &str) -> Result<Vec<Text>, String> {
    let required = || format!("`{field}` is required: a string, a non-empty array of strings, or tokens");
    let items = match obj.get(field) {
        Some(Value::String(s)) => return Ok(vec![Text { text: s.clone(), tokens: tokens::count(model, s) }]),
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(required()),
    };
    if items.iter().all(Value::is_number) {
        return Ok(vec![spelled(model, items, field)?]);
    }
    // Strings, or token arrays: the kind of the first item is the kind of all.
    let strings = items[0].is_string();
    let item = |(i, v): (usize, &Value)| match v {
        Value::String(s) if strings => Ok(Text { text: s.clone(), tokens: tokens::count(model, s) }),
        Value::Array(tokens) if !strings && !tokens.is_empty() => spelled(model, tokens, &format!("{field}[{i}]")),
        _ if strings => Err(format!("`{field}[{i}]` must be a string, as `{field}[0]` is")),
        _ => Err(format!("`{field}[{i}]` must be a non-empty array of tokens, as `{field}[0]` is")),
    };
    items.iter().enumerate().map(item).collect()
}

/// The text of a token array, which must hold token ids of the model's vocabulary.
fn spelled(model: &str, items: &[Value], field: &str) -> Result<Text, String> {
    let mut ids = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        let id = v.as_u64().and_then(|id| u32::try_from(id).ok());
        let id = id.ok_or_else(|| format!("`{field}[{i}]` must be a token: a whole number, 0 or more"))?;
        ids.push(id);
    }
    let text =
        tokens::decode(model, &ids).map_err(|id| format!("`{field}`: {id} is not a token of {model}'s vocabulary"))?;
    Ok(Text { text, tokens: ids.len() as u64 })
}

fn uint(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("`{field}` must be a whole number, 0 or more")),
    }
}

/// A model as the v1 API lists it: a deployment's name, as requests name it.
pub fn model_entry(name: &str, created: u64) -> Value {
    json!({ "id": name, "object": "model", "created": created, "owned_by": "limitlab-mock" })
}

/// Azure's error body.
pub fn error_body(code: &str, message: &str) -> String {
    json!({ "error": { "code": code, "message": message } }).to_string()
}

/// The Responses API's error body for a request it cannot serve, naming the
/// parameter at fault (if one is) and the error's code (if it has one).
pub fn invalid_request_body(message: &str, param: Option<&str>, code: Option<&str>) -> String {
    json!({ "error": { "message": message, "type": "invalid_request_error", "param": param, "code": code } })
        .to_string()
}

/// Azure's 429 message, with the operation and the limit that was hit.
pub fn throttle_body(operation: Operation, api_version: &str, throttle: &Throttle) -> String {
    let secs = throttle.retry_after.retry_after_secs();
    let message = match throttle.limit {
        crate::model::LimitKind::Utilization => format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have exceeded the \
             provisioned throughput capacity of this deployment. Please retry after {secs} seconds.",
            operation.azure_name()
        ),
        limit => format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have exceeded {} rate limit \
             of your current OpenAI S0 pricing tier. Please retry after {secs} seconds. Please go here: \
             https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            operation.azure_name(),
            if limit == crate::model::LimitKind::Tokens { "token" } else { "call" }
        ),
    };
    error_body("429", &message)
}

/// The body of an injected 5xx.
pub fn fault_body(status: u16) -> String {
    match status {
        500 => error_body(
            "InternalServerError",
            "The server had an error while processing your request. Sorry about that!",
        ),
        502 => error_body("BadGateway", "Bad gateway."),
        504 => error_body("GatewayTimeout", "The operation was timeout."),
        _ => error_body(
            "ServiceUnavailable",
            "The service is temporarily unable to process your request. Please try again later.",
        ),
    }
}

fn filter_results() -> Value {
    let safe = json!({ "filtered": false, "severity": "safe" });
    json!({ "hate": safe, "self_harm": safe, "sexual": safe, "violence": safe })
}

fn prompt_filter_results() -> Value {
    json!([{ "prompt_index": 0, "content_filter_results": filter_results() }])
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens_total(),
        "total_tokens": c.prompt_tokens.saturating_add(c.completion_tokens_total()),
    })
}

/// Identity of one response: id, creation time and model.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn chat_response(meta: &Meta, c: &Completion, said: &Said, top: Option<u64>) -> Value {
    let logprobs = top.map_or(Value::Null, |top| {
        let pieces: Vec<&str> = (0..c.completion_tokens).map_while(|i| said.piece(i)).collect();
        let written = match said {
            Said::Call { .. } => None,
            _ => Some(pieces.as_slice()),
        };
        logprobs::chat(written, 0, top)
    });
    json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "system_fingerprint": "fp_limitlab_mock",
        "prompt_filter_results": prompt_filter_results(),
        "choices": (0..c.choices).map(|index| json!({
            "index": index, "finish_reason": said.finish_reason(c.finish_reason), "logprobs": logprobs,
            "message": said.message(c.completion_tokens),
            "content_filter_results": filter_results(),
        })).collect::<Vec<_>>(),
        "usage": usage(c),
    })
}

pub fn completions_response(meta: &Meta, c: &Completion, top: Option<u64>) -> Value {
    let logprobs = top.map_or(Value::Null, |top| {
        let words: Vec<&str> = (0..c.completion_tokens).map(tokens::completion_word).collect();
        logprobs::completions(&words, 0, top, 0)
    });
    json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "prompt_filter_results": prompt_filter_results(),
        "choices": (0..c.choices).map(|index| json!({
            "index": index, "finish_reason": finish(c.finish_reason), "logprobs": logprobs,
            "text": tokens::completion_text(c.completion_tokens),
            "content_filter_results": filter_results(),
        })).collect::<Vec<_>>(),
        "usage": usage(c),
    })
}

/// Whether a model gives embeddings of `dimensions` (of its `native` length):
/// the text-embedding-3 models shorten theirs to any length from 1 up; older
/// ones do not take the field. The error is the service's message.
pub fn check_dimensions(model: &str, native: usize, dimensions: Option<u64>) -> Result<(), String> {
    let Some(asked) = dimensions else { return Ok(()) };
    if !model.contains("text-embedding-3") {
        return Err(format!("`dimensions`: {model} does not support specifying dimensions"));
    }
    match asked {
        1.. if asked <= native as u64 => Ok(()),
        _ => Err(format!("`dimensions` must be from 1 to {native} for {model}, not {asked}")),
    }
}

/// Deterministic unit vectors: the same input gives the same embedding. A
/// shorter length asked for (`dimensions`) is the model's vector cut there and
/// scaled back to unit length, as the text-embedding-3 models shorten theirs.
pub fn embeddings_response(meta: &Meta, req: &ParsedRequest, native: usize, seed: u64) -> Value {
    let length = req.dimensions.map_or(native, |d| (d as usize).min(native));
    let data: Vec<Value> = req
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let vector = unit(embedding(input, native, seed).into_iter().take(length).collect());
            let embedding = match req.base64 {
                true => Value::String(base64_f32(&vector)),
                false => json!(vector),
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    json!({
        "object": "list", "model": meta.model, "data": data,
        "usage": { "prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens },
    })
}

/// The model's vector of an input before it is scaled to unit length.
fn embedding(input: &str, dimensions: usize, seed: u64) -> Vec<f32> {
    // FNV-1a of the input picks the stream: stable across runs and platforms.
    let hash = input.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ hash);
    (0..dimensions).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn unit(raw: Vec<f32>) -> Vec<f32> {
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    raw.into_iter().map(|x| x / norm).collect()
}

fn base64_f32(vector: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The stream chunks of a chat completion, in order, without the `data: ` framing.
/// `tokens_sent` limits the content chunks (a stream that breaks midway).
pub struct ChatStream<'a> {
    pub meta: &'a Meta,
    pub completion: &'a Completion,
    pub said: &'a Said,
    /// Log probabilities asked for, with this many alternatives.
    pub logprobs: Option<u64>,
}

impl ChatStream<'_> {
    /// Azure's first chunk: empty choices and the prompt filter results (Azure
    /// leaves its other fields empty; the spec asks for them, so they are filled).
    pub fn prelude(&self) -> Value {
        json!({
            "id": self.meta.id, "object": "chat.completion.chunk", "created": self.meta.created,
            "model": self.meta.model, "choices": [], "prompt_filter_results": prompt_filter_results(),
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({
            "id": self.meta.id, "object": "chat.completion.chunk", "created": self.meta.created,
            "model": self.meta.model, "system_fingerprint": "fp_limitlab_mock", "choices": [choice],
        })
    }

    /// The role chunk of choice `index`.
    pub fn role(&self, index: u64) -> Value {
        self.chunk(json!({ "index": index, "delta": self.said.opening_delta(), "finish_reason": null, "logprobs": null, "content_filter_results": {} }))
    }

    /// The chunk of piece `piece` (a token, or a character spanning tokens),
    /// the `i`-th, of choice `index`.
    pub fn token(&self, index: u64, i: u64, piece: &str) -> Value {
        let written = match self.said {
            Said::Call { .. } => None,
            _ => Some(&[piece][..]),
        };
        let logprobs = self.logprobs.map_or(Value::Null, |top| logprobs::chat(written, i, top));
        self.chunk(json!({ "index": index, "delta": self.said.piece_delta(piece), "finish_reason": null, "logprobs": logprobs, "content_filter_results": filter_results() }))
    }

    /// The last chunk of choice `index`.
    pub fn finish(&self, index: u64) -> Value {
        self.chunk(json!({ "index": index, "delta": {}, "finish_reason": self.said.finish_reason(self.completion.finish_reason), "logprobs": null, "content_filter_results": {} }))
    }

    pub fn usage(&self) -> Value {
        json!({
            "id": self.meta.id, "object": "chat.completion.chunk", "created": self.meta.created,
            "model": self.meta.model, "system_fingerprint": "fp_limitlab_mock", "choices": [], "usage": usage(self.completion),
        })
    }
}

/// Stream chunks of a (legacy) completion, of choice `index`; `logprobs` of its text, or null.
pub fn completions_chunk(
    meta: &Meta,
    index: u64,
    text: &str,
    finish_reason: Option<FinishReason>,
    logprobs: Value,
) -> Value {
    json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": [{ "index": index, "text": text, "finish_reason": finish_reason.map(finish), "logprobs": logprobs }],
    })
}

pub fn completions_usage_chunk(meta: &Meta, c: &Completion) -> Value {
    json!({ "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model, "choices": [], "usage": usage(c) })
}

/// A Responses API answer: the response object, and the events of its stream.
pub struct ResponseWire<'a> {
    pub meta: &'a Meta,
    pub completion: &'a Completion,
    pub said: &'a Said,
    pub keeping: &'a Keeping,
}

impl ResponseWire<'_> {
    /// A reply cut short by `max_output_tokens` is an incomplete response.
    fn status(&self) -> &'static str {
        match self.completion.finish_reason {
            FinishReason::Stop => "completed",
            FinishReason::Length => "incomplete",
        }
    }

    fn item_id(&self) -> String {
        let prefix = if matches!(self.said, Said::Call { .. }) { "fc" } else { "msg" };
        format!("{prefix}_{}", self.meta.id.trim_start_matches("resp_"))
    }

    fn object(&self, status: &str, output: Value, usage: Value) -> Value {
        let incomplete = match status {
            "incomplete" => json!({ "reason": "max_output_tokens" }),
            _ => Value::Null,
        };
        json!({
            "id": self.meta.id, "object": "response", "created_at": self.meta.created, "status": status,
            "error": null, "incomplete_details": incomplete, "instructions": null, "max_output_tokens": null,
            "model": self.meta.model, "output": output, "parallel_tool_calls": true,
            "previous_response_id": self.keeping.previous, "reasoning": { "effort": null, "summary": null },
            "store": self.keeping.store, "background": self.keeping.background,
            "temperature": 1.0, "text": { "format": { "type": "text" } }, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": null, "metadata": {},
        })
    }

    fn text_part(text: &str) -> Value {
        json!({ "type": "output_text", "text": text, "annotations": [] })
    }

    fn message(&self, status: &str, content: Vec<Value>) -> Value {
        json!({ "id": self.item_id(), "type": "message", "status": status, "role": "assistant", "content": content })
    }

    /// The output item: the message with its text, or the call with its
    /// arguments (`arguments`, so that a stream opens it empty).
    fn item(&self, status: &str, arguments: &str) -> Value {
        match self.said {
            Said::Call { id, name, .. } => json!({
                "id": self.item_id(), "type": "function_call", "status": status,
                "call_id": id, "name": name, "arguments": arguments,
            }),
            _ if arguments.is_empty() && status == "in_progress" => self.message(status, Vec::new()),
            _ => self.message(status, vec![Self::text_part(&self.text())]),
        }
    }

    /// The reply's text: prose of the completion's length, or the JSON spelled.
    fn text(&self) -> String {
        match self.said {
            Said::Json { text, .. } => text.clone(),
            _ => tokens::completion_text(self.completion.completion_tokens),
        }
    }

    fn arguments(&self) -> &str {
        match self.said {
            Said::Call { arguments, .. } => arguments,
            _ => "",
        }
    }

    fn usage(&self) -> Value {
        let c = self.completion;
        json!({
            "input_tokens": c.prompt_tokens, "input_tokens_details": { "cached_tokens": 0 },
            "output_tokens": c.completion_tokens_total(), "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": c.prompt_tokens.saturating_add(c.completion_tokens_total()),
        })
    }

    /// The whole response, as a buffered call gets it and a stream's last event carries it.
    pub fn response(&self) -> Value {
        let item = self.item(self.status(), self.arguments());
        self.object(self.status(), json!([item]), self.usage())
    }

    /// A background response's answer: queued, nothing written yet.
    pub fn queued(&self) -> Value {
        self.object("queued", json!([]), Value::Null)
    }

    /// A stream's first events, before any text: the response created and in
    /// progress, its message and the message's text part begun.
    pub fn prelude(&self) -> Vec<Value> {
        let started = self.object("in_progress", json!([]), Value::Null);
        let mut events = vec![
            json!({ "type": "response.created", "response": started }),
            json!({ "type": "response.in_progress", "response": started }),
            json!({ "type": "response.output_item.added", "output_index": 0, "item": self.item("in_progress", "") }),
        ];
        if !matches!(self.said, Said::Call { .. }) {
            events.push(json!({
                "type": "response.content_part.added", "item_id": self.item_id(), "output_index": 0,
                "content_index": 0, "part": Self::text_part(""),
            }));
        }
        events
    }

    /// The stream's event for a piece of the reply (a token, or a character
    /// spanning tokens).
    pub fn token(&self, piece: &str) -> Value {
        match self.said {
            Said::Call { .. } => json!({
                "type": "response.function_call_arguments.delta", "item_id": self.item_id(), "output_index": 0,
                "delta": piece,
            }),
            _ => json!({
                "type": "response.output_text.delta", "item_id": self.item_id(), "output_index": 0,
                "content_index": 0, "delta": piece, "logprobs": [],
            }),
        }
    }

    /// A stream's last events: the text, its part and its message done, then
    /// the response completed (or incomplete) with its usage.
    pub fn finish(&self) -> Vec<Value> {
        let last = json!({ "type": format!("response.{}", self.status()), "response": self.response() });
        if matches!(self.said, Said::Call { .. }) {
            let done = json!({
                "type": "response.function_call_arguments.done", "item_id": self.item_id(), "output_index": 0,
                "arguments": self.arguments(),
            });
            let item = json!({ "type": "response.output_item.done", "output_index": 0, "item": self.item(self.status(), self.arguments()) });
            return vec![done, item, last];
        }
        let text = self.text();
        let id = self.item_id();
        let head = json!({ "item_id": id, "output_index": 0, "content_index": 0 });
        let with = |kind: &str, extra: Value| {
            let mut event = head.clone();
            event["type"] = json!(kind);
            extra.as_object().into_iter().flatten().for_each(|(k, v)| event[k] = v.clone());
            event
        };
        vec![
            with("response.output_text.done", json!({ "text": text, "logprobs": [] })),
            with("response.content_part.done", json!({ "part": Self::text_part(&text) })),
            json!({ "type": "response.output_item.done", "output_index": 0, "item": self.message(self.status(), vec![Self::text_part(&text)]) }),
            last,
        ]
    }
}

/// A Responses API stream event as it goes on the wire: its type as the SSE
/// event name, and its place in the stream as `sequence_number`.
pub fn responses_event(mut event: Value, sequence_number: u64) -> String {
    event["sequence_number"] = json!(sequence_number);
    let kind = event["type"].as_str().unwrap_or("message").to_owned();
    format!("event: {kind}\ndata: {event}\n\n")
}

/// The inference API versions Azure OpenAI documents (GA, then previews); the
/// mock answers others as Azure does, 404.
const API_VERSIONS: [&str; 24] = [
    "2022-12-01",
    "2023-05-15",
    "2024-02-01",
    "2024-06-01",
    "2024-10-21",
    "2023-03-15-preview",
    "2023-06-01-preview",
    "2023-07-01-preview",
    "2023-08-01-preview",
    "2023-09-01-preview",
    "2023-12-01-preview",
    "2024-02-15-preview",
    "2024-03-01-preview",
    "2024-04-01-preview",
    "2024-05-01-preview",
    "2024-07-01-preview",
    "2024-08-01-preview",
    "2024-09-01-preview",
    "2024-10-01-preview",
    "2024-12-01-preview",
    "2025-01-01-preview",
    "2025-02-01-preview",
    "2025-03-01-preview",
    "2025-04-01-preview",
];

pub fn is_known_api_version(version: &str) -> bool {
    API_VERSIONS.contains(&version)
}

/// Whether a dated version serves the Responses API, which came with
/// `2025-03-01-preview`.
pub fn serves_responses(version: &str) -> bool {
    matches!(version, "2025-03-01-preview" | "2025-04-01-preview")
}

/// Whether a model serves an operation, as Azure's deployments do: embedding
/// models only embeddings, instruct models only completions, chat models only
/// chat completions.
pub fn serves(model: &str, operation: Operation) -> bool {
    let embedding = model.starts_with("text-embedding");
    let completion = model.contains("instruct") || model.starts_with("davinci") || model.starts_with("babbage");
    match operation {
        Operation::Embeddings => embedding,
        Operation::Completions => completion,
        Operation::ChatCompletions | Operation::Responses => !embedding && !completion,
    }
}

/// Azure's message for an operation the deployment's model does not serve.
pub fn not_supported(operation: Operation, model: &str) -> String {
    let name = match operation {
        Operation::ChatCompletions => "chatCompletion",
        Operation::Completions => "completion",
        Operation::Embeddings => "embeddings",
        Operation::Responses => "responses",
    };
    format!(
        "The {name} operation does not work with the specified model, {model}. Please choose different model and \
         try again. You can learn more about which models can be used with each operation here: \
         https://go.microsoft.com/fwlink/?linkid=2197993."
    )
}
