//! What a chat completion says when its request asks for more than prose:
//! JSON (`response_format`), or a call of one of its functions (`tools` and
//! `tool_choice`, or the older `functions` and `function_call`).
//!
//! The answer is an instance of the schema given (the JSON schema, or the
//! function's `parameters`), spelled in exactly the completion tokens the model
//! drew wherever the schema leaves room for it (a free string to fill), so
//! that `usage`, the tokens streamed and a client's own count all agree. A
//! schema whose smallest instance is longer than the draw gets that instance,
//! and `usage` counts it; one cut short by `max_tokens` is cut there, as the
//! service cuts it, and is then no longer valid JSON.

use crate::model::{Completion, FinishReason};
use serde_json::{json, Map, Value};
use tokenizer as tokens;

/// What a chat request asks its answer to be.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Shape {
    #[default]
    Prose,
    /// JSON: an instance of `schema` (`json_schema`), or an object (`json_object`).
    Json { schema: Value },
    /// A call of the function `name`, its arguments an instance of `parameters`.
    Call { name: String, parameters: Value, how: Called },
}

/// How a call came to be made, which decides how the choice finishes and how
/// the call is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Called {
    /// Chosen by the model (`auto` or `required`): finishes with `tool_calls`.
    Chosen,
    /// Named by `tool_choice`: the service finishes such a choice with `stop`.
    Named,
    /// The older `functions` API: a `function_call`, finishing with `function_call`.
    Function,
}

/// The schema of a `json_object` answer: an object holding the reply.
fn any_object() -> Value {
    json!({ "type": "object", "properties": { "answer": { "type": "string" } }, "required": ["answer"] })
}

/// Reads a chat request's `response_format`, `tools` and `tool_choice` (or
/// `functions` and `function_call`); the error names the field.
pub fn read(obj: &Map<String, Value>) -> Result<Shape, String> {
    let dialect = if obj.contains_key("functions") { Dialect::Functions } else { Dialect::Tools };
    called(obj, dialect, response_format(obj)?)
}

/// Reads a Responses API request's `text.format`, `tools` and `tool_choice`.
pub fn read_responses(obj: &Map<String, Value>) -> Result<Shape, String> {
    called(obj, Dialect::Responses, text_format(obj)?)
}

/// The call the request's functions and choice make, or else `format`.
fn called(obj: &Map<String, Value>, dialect: Dialect, format: Shape) -> Result<Shape, String> {
    let functions = declared(obj, dialect)?;
    match chosen(obj, dialect, &functions)? {
        Some((function, how)) => {
            let parameters = function.get("parameters").cloned().unwrap_or_else(|| json!({ "type": "object" }));
            Ok(Shape::Call { name: name_of(function).to_owned(), parameters, how })
        }
        None => Ok(format),
    }
}

/// The three ways a request declares functions and chooses among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    /// Chat's `tools` (`{"type": "function", "function": {...}}`) and `tool_choice`.
    Tools,
    /// Chat's older `functions` and `function_call`.
    Functions,
    /// The Responses API's `tools` (the function's fields at the top) and `tool_choice`.
    Responses,
}

impl Dialect {
    fn field(self) -> &'static str {
        if self == Dialect::Functions {
            "functions"
        } else {
            "tools"
        }
    }

    fn choice_field(self) -> &'static str {
        if self == Dialect::Functions {
            "function_call"
        } else {
            "tool_choice"
        }
    }

    /// An item's function, if it is one.
    fn function(self, item: &Value) -> Option<&Value> {
        let is_function = || item.get("type").and_then(Value::as_str) == Some("function");
        match self {
            Dialect::Tools => is_function().then(|| item.get("function")).flatten(),
            Dialect::Functions => Some(item),
            Dialect::Responses => is_function().then_some(item),
        }
    }

    /// Where item `i`'s function is, in the service's words.
    fn at(self, i: usize) -> String {
        match self {
            Dialect::Tools => format!("tools[{i}].function"),
            Dialect::Functions => format!("functions[{i}]"),
            Dialect::Responses => format!("tools[{i}]"),
        }
    }

    fn example(self) -> &'static str {
        match self {
            Dialect::Tools => "a function tool: {\"type\": \"function\", \"function\": {\"name\": ...}}",
            Dialect::Functions => "a function: {\"name\": ...}",
            Dialect::Responses => {
                "a function tool, {\"type\": \"function\", \"name\": ...} (the mock runs no built-in tools)"
            }
        }
    }

    /// The function a choice names.
    fn named(self, choice: &Value) -> Option<&str> {
        let name = match self {
            Dialect::Tools => choice.get("function").and_then(|f| f.get("name")),
            Dialect::Functions | Dialect::Responses => choice.get("name"),
        };
        name.and_then(Value::as_str)
    }

    fn modes(self) -> &'static str {
        if self == Dialect::Functions {
            "\"none\", \"auto\""
        } else {
            "\"none\", \"auto\", \"required\""
        }
    }
}

fn response_format(obj: &Map<String, Value>) -> Result<Shape, String> {
    let format = match obj.get("response_format") {
        None | Some(Value::Null) => return Ok(Shape::Prose),
        Some(Value::Object(format)) => format,
        Some(_) => return Err("`response_format` must be an object, such as {\"type\": \"json_object\"}".into()),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Shape::Prose),
        Some("json_object") if mentions_json(obj, "messages") => Ok(Shape::Json { schema: any_object() }),
        // The service's own message.
        Some("json_object") => {
            Err("'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
                .into())
        }
        Some("json_schema") => {
            let spec = format.get("json_schema").and_then(Value::as_object);
            let spec = spec.ok_or("`response_format.json_schema` is required: {\"name\": ..., \"schema\": {...}}")?;
            check_name(spec.get("name"), "response_format.json_schema.name")?;
            match spec.get("schema") {
                None => Ok(Shape::Json { schema: json!({}) }),
                Some(schema @ Value::Object(_)) => Ok(Shape::Json { schema: schema.clone() }),
                Some(_) => Err("`response_format.json_schema.schema` must be a JSON schema (an object)".into()),
            }
        }
        _ => Err("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"".into()),
    }
}

/// A Responses API request's `text.format`, the same formats with the schema's
/// fields at the top.
fn text_format(obj: &Map<String, Value>) -> Result<Shape, String> {
    let format = match obj.get("text").and_then(|t| t.get("format")) {
        None | Some(Value::Null) => return Ok(Shape::Prose),
        Some(Value::Object(format)) => format,
        Some(_) => return Err("`text.format` must be an object, such as {\"type\": \"json_object\"}".into()),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Shape::Prose),
        Some("json_object") if mentions_json(obj, "input") => Ok(Shape::Json { schema: any_object() }),
        Some("json_object") => {
            Err("'input' must contain the word 'json' in some form, to use 'text.format' of type 'json_object'.".into())
        }
        Some("json_schema") => {
            check_name(format.get("name"), "text.format.name")?;
            match format.get("schema") {
                Some(schema @ Value::Object(_)) => Ok(Shape::Json { schema: schema.clone() }),
                _ => Err("`text.format.schema` is required: a JSON schema (an object)".into()),
            }
        }
        _ => Err("`text.format.type` must be \"text\", \"json_object\" or \"json_schema\"".into()),
    }
}

/// Whether the text of a request's `field` (its messages or input items, or a
/// Responses API request's input as a string, or its instructions) says
/// "json", which `json_object` requires.
fn mentions_json(obj: &Map<String, Value>, field: &str) -> bool {
    let said = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    if said(obj.get(field)) || said(obj.get("instructions")) {
        return true;
    }
    let messages = obj.get(field).and_then(Value::as_array).into_iter().flatten();
    let contents = messages.filter_map(|m| m.get("content"));
    let texts = contents.flat_map(|content| match content {
        Value::String(text) => vec![text.as_str()],
        Value::Array(parts) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect(),
        _ => Vec::new(),
    });
    texts.into_iter().any(|text| text.to_ascii_lowercase().contains("json"))
}

fn name_of(function: &Value) -> &str {
    function.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// The functions a request declares, each checked.
fn declared(obj: &Map<String, Value>, dialect: Dialect) -> Result<Vec<&Value>, String> {
    let field = dialect.field();
    let items = match obj.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(format!("`{field}` must be an array")),
    };
    let mut functions = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = dialect.function(item).ok_or_else(|| format!("`{field}[{i}]` must be {}", dialect.example()))?;
        let at = dialect.at(i);
        check_name(f.get("name"), &format!("{at}.name"))?;
        match f.get("parameters") {
            None | Some(Value::Object(_)) => {}
            Some(_) => return Err(format!("`{at}.parameters` must be a JSON schema (an object)")),
        }
        functions.push(f);
    }
    Ok(functions)
}

/// A function's or schema's name, as the service bounds it: 1 to 64 letters,
/// digits, underscores and dashes.
fn check_name(name: Option<&Value>, field: &str) -> Result<(), String> {
    let valid =
        |n: &str| (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match name.and_then(Value::as_str) {
        Some(n) if valid(n) => Ok(()),
        _ => Err(format!("`{field}` is required: 1 to 64 letters, digits, underscores or dashes")),
    }
}

/// The function the answer calls, if any, by `tool_choice` (`function_call`):
/// `none` calls none; a function named calls it; `required` calls the first;
/// `auto` (the default when there are functions) calls the first unless the
/// conversation's last message is a function's result, which it answers in
/// words. So a client's loop of calls and results comes to an end.
fn chosen<'a>(
    obj: &Map<String, Value>,
    dialect: Dialect,
    functions: &[&'a Value],
) -> Result<Option<(&'a Value, Called)>, String> {
    let field = dialect.choice_field();
    let choice = obj.get(field).filter(|v| !v.is_null());
    let how = if dialect == Dialect::Functions { Called::Function } else { Called::Chosen };
    if functions.is_empty() {
        return match choice {
            None => Ok(None),
            Some(_) => Err(format!("`{field}` is only allowed when functions are given (`{}`)", dialect.field())),
        };
    }
    let mode = match choice {
        None => "auto",
        Some(Value::String(mode)) => mode.as_str(),
        Some(named) => {
            let name = dialect.named(named).ok_or_else(|| format!("`{field}` names no function"))?;
            let function = functions.iter().find(|f| name_of(f) == name);
            let function =
                function.ok_or_else(|| format!("`{field}` names the function \"{name}\", which is not declared"))?;
            return Ok(Some((function, if how == Called::Function { how } else { Called::Named })));
        }
    };
    match mode {
        "none" => Ok(None),
        "auto" if answered_last(obj) => Ok(None),
        "auto" => Ok(Some((functions[0], how))),
        "required" if dialect != Dialect::Functions => Ok(Some((functions[0], how))),
        _ => Err(format!("`{field}` must be {}, or name a function", dialect.modes())),
    }
}

/// Whether the conversation ends with a function's result: a chat message of
/// role `tool` (or `function`), or a Responses API `function_call_output` item.
fn answered_last(obj: &Map<String, Value>) -> bool {
    let last = |field: &str| obj.get(field).and_then(Value::as_array).and_then(|items| items.last());
    let role = last("messages").and_then(|m| m.get("role")).and_then(Value::as_str);
    let kind = last("input").and_then(|i| i.get("type")).and_then(Value::as_str);
    matches!(role, Some("tool" | "function")) || kind == Some("function_call_output")
}

/// What one choice of a chat completion says, spelled.
#[derive(Clone, Debug, PartialEq)]
pub enum Said {
    Prose,
    Json { text: String, pieces: Vec<String> },
    Call { id: String, name: String, arguments: String, pieces: Vec<String>, how: Called },
}

/// Spells the answer `shape` asks for in the completion's tokens, and sets the
/// completion's length (and how it finishes) to what was spelled (see the
/// module's text). A call is named after `response_id`.
pub fn say(shape: &Shape, model: &str, c: &mut Completion, max_tokens: Option<u64>, response_id: &str) -> Said {
    match shape {
        Shape::Prose => Said::Prose,
        Shape::Json { schema } => {
            let text = spell(model, schema, c, max_tokens, 0);
            Said::Json { pieces: tokens::pieces(model, &text), text }
        }
        Shape::Call { name, parameters, how } => {
            // The function's name is written too, and counted with its arguments.
            let named = tokens::count(model, name);
            let arguments = spell(model, parameters, c, max_tokens, named);
            let suffix = response_id.trim_start_matches("chatcmpl-").trim_start_matches("resp_");
            Said::Call {
                id: format!("call_{suffix}"),
                name: name.clone(),
                pieces: tokens::pieces(model, &arguments),
                arguments,
                how: *how,
            }
        }
    }
}

impl Said {
    /// The `i`-th streamed piece of the content or the arguments.
    pub fn piece(&self, i: u64) -> Option<&str> {
        match self {
            Said::Prose => Some(tokens::completion_word(i)),
            Said::Json { pieces, .. } | Said::Call { pieces, .. } => pieces.get(i as usize).map(String::as_str),
        }
    }

    /// How a choice that says this finishes.
    pub fn finish_reason(&self, reason: FinishReason) -> &'static str {
        match (reason, self) {
            (FinishReason::Length, _) => "length",
            (FinishReason::Stop, Said::Call { how: Called::Chosen, .. }) => "tool_calls",
            (FinishReason::Stop, Said::Call { how: Called::Function, .. }) => "function_call",
            (FinishReason::Stop, _) => "stop",
        }
    }

    /// A buffered answer's message, with `completion_tokens` of prose.
    pub fn message(&self, completion_tokens: u64) -> Value {
        match self {
            Said::Prose => {
                json!({ "role": "assistant", "content": tokens::completion_text(completion_tokens), "refusal": null })
            }
            Said::Json { text, .. } => json!({ "role": "assistant", "content": text, "refusal": null }),
            Said::Call { name, arguments, how: Called::Function, .. } => {
                json!({ "role": "assistant", "content": null, "refusal": null, "function_call": { "name": name, "arguments": arguments } })
            }
            Said::Call { id, name, arguments, .. } => json!({
                "role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{ "id": id, "type": "function", "function": { "name": name, "arguments": arguments } }],
            }),
        }
    }

    /// A stream's first delta of a choice.
    pub fn opening_delta(&self) -> Value {
        match self {
            Said::Prose | Said::Json { .. } => json!({ "role": "assistant", "content": "" }),
            Said::Call { .. } => self.call_delta("", true),
        }
    }

    /// A stream's delta carrying `piece`.
    pub fn piece_delta(&self, piece: &str) -> Value {
        match self {
            Said::Prose | Said::Json { .. } => json!({ "content": piece }),
            Said::Call { .. } => self.call_delta(piece, false),
        }
    }

    /// A message (or delta) with the call: whole (`opening`: id, name and the
    /// arguments given), or a later piece of its arguments.
    fn call_delta(&self, arguments: &str, opening: bool) -> Value {
        let Said::Call { id, name, how, .. } = self else { return Value::Null };
        let function = match opening {
            true => json!({ "name": name, "arguments": arguments }),
            false => json!({ "arguments": arguments }),
        };
        let mut delta = match (how, opening) {
            (Called::Function, _) => json!({ "function_call": function }),
            (_, true) => json!({ "tool_calls": [{ "index": 0, "id": id, "type": "function", "function": function }] }),
            (_, false) => json!({ "tool_calls": [{ "index": 0, "function": function }] }),
        };
        if opening {
            delta["role"] = json!("assistant");
            delta["content"] = Value::Null;
            delta["refusal"] = Value::Null;
        }
        delta
    }
}

/// An instance of `schema` in the completion's tokens less `overhead` (see the
/// module's text), setting the completion's length to what it spells.
fn spell(model: &str, schema: &Value, c: &mut Completion, max_tokens: Option<u64>, overhead: u64) -> String {
    let drawn = c.completion_tokens.saturating_sub(overhead);
    // A reply the model was to cut short is filled past the cut, so that it is
    // cut inside its text, as the service cuts it.
    let (target, cap) = match (c.finish_reason, max_tokens) {
        (FinishReason::Length, _) => (drawn + 2, drawn),
        (FinishReason::Stop, Some(max)) => (drawn, max.saturating_sub(overhead)),
        (FinishReason::Stop, None) => (drawn, u64::MAX),
    };
    let text = Instance::of(schema).filled_to(model, target);
    let (text, reason) = match tokens::count(model, &text) > cap {
        true => (tokens::truncate(model, &text, cap), FinishReason::Length),
        // Whole: a schema with no room to fill may end before the cut.
        false => (text, FinishReason::Stop),
    };
    c.finish_reason = reason;
    c.completion_tokens = tokens::count(model, &text) + overhead;
    text
}

/// Deepest a schema is followed (through `$ref`s too): deeper, a value is null.
const MAX_DEPTH: usize = 32;

/// Most items an array is given (its `minItems`, else one).
const MAX_ITEMS: u64 = 64;

/// Most values one instance has: past it a value is null, so that a schema
/// whose arrays or recursion would multiply (64 items of 64 items of ...)
/// cannot make the mock build an answer without end.
const MAX_VALUES: usize = 10_000;

/// Most characters the strings of an instance are given for their
/// `minLength`; past it they are shorter than asked.
const MAX_TEXT: u64 = 100_000;

/// An instance of a schema, and where its free string is (a JSON pointer), if
/// it has one: the first string (depth first) with no format, pattern, length
/// bound, enum or constant.
struct Instance {
    value: Value,
    fill: Option<String>,
}

impl Instance {
    fn of(schema: &Value) -> Instance {
        let mut builder = Builder { root: schema, fill: None, values: 0, text: 0 };
        let value = builder.instance(schema, &mut Vec::new(), 0);
        Instance { value, fill: builder.fill }
    }

    /// The instance as compact JSON, its free string holding `words` words.
    fn with_words(&self, words: u64) -> String {
        let mut value = self.value.clone();
        if let Some(slot) = self.fill.as_deref().and_then(|p| value.pointer_mut(p)) {
            *slot = Value::String(tokens::completion_text(words));
        }
        value.to_string()
    }

    /// The instance in `target` tokens if its free string can make it so:
    /// words are added until the count is reached (a word is a token, but
    /// where it meets the quotes), else as close as the words come.
    fn filled_to(&self, model: &str, target: u64) -> String {
        let mut text = self.with_words(0);
        if self.fill.is_none() {
            return text;
        }
        let mut words = 0u64;
        for _ in 0..4 {
            let count = tokens::count(model, &text);
            // Done, or longer than the target with no words left to take out.
            if count == target || (count > target && words == 0) {
                break;
            }
            words = (words + target).saturating_sub(count);
            text = self.with_words(words);
        }
        text
    }
}

struct Builder<'a> {
    root: &'a Value,
    fill: Option<String>,
    /// Values made so far, bounded by [`MAX_VALUES`].
    values: usize,
    /// Characters of bounded strings made so far, bounded by [`MAX_TEXT`].
    text: u64,
}

impl Builder<'_> {
    fn instance(&mut self, schema: &Value, path: &mut Vec<String>, depth: usize) -> Value {
        let Some(s) = schema.as_object() else { return json!("The") };
        self.values += 1;
        if depth > MAX_DEPTH || self.values > MAX_VALUES {
            return Value::Null;
        }
        if let Some(reference) = s.get("$ref").and_then(Value::as_str) {
            let root = self.root;
            return match resolve(root, reference) {
                Some(target) => self.instance(target, path, depth + 1),
                None => Value::Null,
            };
        }
        if let Some(constant) = s.get("const") {
            return constant.clone();
        }
        if let Some(first) = s.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            return first.clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(options) = s.get(key).and_then(Value::as_array).filter(|o| !o.is_empty()) {
                return self.instance(pick(options, depth), path, depth + 1);
            }
        }
        match type_of(s) {
            "object" => self.object(s, path, depth),
            "array" => self.array(s, path, depth),
            "string" => self.string(s, path),
            "integer" => json!(bounded(s).round() as i64),
            "number" => json!(bounded(s)),
            "boolean" => json!(true),
            _ => Value::Null,
        }
    }

    fn object(&mut self, s: &Map<String, Value>, path: &mut Vec<String>, depth: usize) -> Value {
        let properties = s.get("properties").and_then(Value::as_object).into_iter().flatten();
        let mut object = Map::new();
        for (name, property) in properties {
            path.push(name.clone());
            object.insert(name.clone(), self.instance(property, path, depth + 1));
            path.pop();
        }
        Value::Object(object)
    }

    fn array(&mut self, s: &Map<String, Value>, path: &mut Vec<String>, depth: usize) -> Value {
        let count = s.get("minItems").and_then(Value::as_u64).unwrap_or(1).min(MAX_ITEMS);
        let count = s.get("maxItems").and_then(Value::as_u64).map_or(count, |max| count.min(max));
        let prefix = s.get("prefixItems").and_then(Value::as_array);
        let items = s.get("items").unwrap_or(&Value::Null);
        let mut array = Vec::new();
        for i in 0..count.max(prefix.map_or(0, |p| p.len() as u64)) {
            let item = prefix.and_then(|p| p.get(i as usize)).unwrap_or(items);
            path.push(i.to_string());
            array.push(self.instance(item, path, depth + 1));
            path.pop();
        }
        Value::Array(array)
    }

    fn string(&mut self, s: &Map<String, Value>, path: &[String]) -> Value {
        if let Some(example) = s.get("format").and_then(Value::as_str).map(formatted) {
            return json!(example);
        }
        let bounded = ["pattern", "maxLength", "minLength"].iter().any(|k| s.contains_key(*k));
        if !bounded && self.fill.is_none() {
            self.fill =
                Some(path.iter().map(|step| format!("/{}", step.replace('~', "~0").replace('/', "~1"))).collect());
            return json!("");
        }
        let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0);
        let length = min.min(MAX_TEXT.saturating_sub(self.text));
        self.text += length;
        json!(format!("The{}", "x".repeat(length.saturating_sub(3) as usize)))
    }
}

/// The first option, or near the depth limit the first that is not an object
/// or array (a recursive schema ends there).
fn pick(options: &[Value], depth: usize) -> &Value {
    let leaf = |o: &&Value| {
        !matches!(o.get("type").and_then(Value::as_str), Some("object" | "array")) && o.get("$ref").is_none()
    };
    match depth > MAX_DEPTH / 2 {
        true => options.iter().find(leaf).unwrap_or(&options[0]),
        false => &options[0],
    }
}

/// A schema's type: its `type` (the first that is not null, of several), or
/// what its keywords imply.
fn type_of(s: &Map<String, Value>) -> &str {
    match s.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(types)) => {
            let named = types.iter().filter_map(Value::as_str);
            named.clone().find(|t| *t != "null").or_else(|| named.clone().next()).unwrap_or("null")
        }
        _ if s.contains_key("properties") => "object",
        _ if s.contains_key("items") || s.contains_key("prefixItems") => "array",
        _ => "string",
    }
}

/// A number within the schema's bounds: 0 if they allow it, else the bound.
fn bounded(s: &Map<String, Value>) -> f64 {
    let get = |k: &str| s.get(k).and_then(Value::as_f64);
    let low = get("minimum").or(get("exclusiveMinimum").map(|m| m + 1.0));
    let high = get("maximum").or(get("exclusiveMaximum").map(|m| m - 1.0));
    match (low, high) {
        (Some(low), _) if low > 0.0 => low,
        (_, Some(high)) if high < 0.0 => high,
        _ => 0.0,
    }
}

/// A value of a string format that a validator checks.
fn formatted(format: &str) -> &'static str {
    match format {
        "date-time" => "2025-01-01T00:00:00Z",
        "date" => "2025-01-01",
        "time" => "00:00:00Z",
        "duration" => "P1D",
        "email" | "idn-email" => "mock@example.com",
        "hostname" | "idn-hostname" => "example.com",
        "ipv4" => "127.0.0.1",
        "ipv6" => "::1",
        "uuid" => "00000000-0000-4000-8000-000000000000",
        "uri" | "iri" | "url" => "https://example.com/",
        _ => "The",
    }
}

/// The schema a local `$ref` (`#/...`) points to.
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    root.pointer(reference.strip_prefix('#')?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::Nanos;

    fn request(body: Value) -> Map<String, Value> {
        let mut body = body.as_object().cloned().unwrap_or_default();
        body.entry("messages").or_insert(json!([{ "role": "user", "content": "Reply in JSON." }]));
        body
    }

    fn tool(name: &str) -> Value {
        json!({ "type": "function", "function": { "name": name, "parameters": { "type": "object", "properties": { "q": { "type": "string" } } } } })
    }

    /// What `read` makes of a request: the error's start, or the shape in short.
    fn check(body: Value, expected: &str) {
        check_with(read, request(body), expected);
    }

    fn check_with(reader: fn(&Map<String, Value>) -> Result<Shape, String>, body: Map<String, Value>, expected: &str) {
        let got = match reader(&body) {
            Err(e) => format!("error: {e}"),
            Ok(Shape::Prose) => "prose".into(),
            Ok(Shape::Json { schema }) => format!("json {schema}"),
            Ok(Shape::Call { name, how, .. }) => format!("call {name} {how:?}"),
        };
        assert!(got.starts_with(expected), "{body:?}\n  got: {got}\n  expected: {expected}");
    }

    #[test]
    fn responses_requests_take_flat_tools_and_text_format() {
        let weather = json!({ "type": "function", "name": "weather", "parameters": { "type": "object" } });
        let result = json!([{ "role": "user", "content": "Weather?" }, { "type": "function_call_output", "call_id": "c", "output": "sunny" }]);
        for (body, expected) in [
            (json!({ "input": "Hi" }), "prose"),
            (json!({ "input": "Hi", "text": { "format": { "type": "json_schema", "name": "p", "schema": { "type": "boolean" } } } }), "json {\"type\":\"boolean\"}"),
            (json!({ "input": "Reply in JSON", "text": { "format": { "type": "json_object" } } }), "json"),
            (json!({ "input": "Hi", "instructions": "Use json.", "text": { "format": { "type": "json_object" } } }), "json"),
            (json!({ "input": "Hi", "tools": [weather] }), "call weather Chosen"),
            (json!({ "input": "Hi", "tools": [weather], "tool_choice": { "type": "function", "name": "weather" } }), "call weather Named"),
            (json!({ "input": result, "tools": [weather] }), "prose"),
            (json!({ "input": "Hi", "text": { "format": { "type": "json_object" } } }), "error: 'input' must contain the word 'json'"),
            (json!({ "input": "Hi", "text": { "format": { "type": "json_schema", "name": "p" } } }), "error: `text.format.schema` is required"),
            (json!({ "input": "Hi", "tools": [{ "type": "web_search_preview" }] }), "error: `tools[0]` must be a function tool, {\"type\": \"function\", \"name\": ...} (the mock runs no built-in tools)"),
            (json!({ "input": "Hi", "tools": [{ "type": "function" }] }), "error: `tools[0].name` is required"),
        ] {
            check_with(read_responses, body.as_object().cloned().unwrap_or_default(), expected);
        }
    }

    #[test]
    fn requests_ask_for_prose_json_or_a_call() {
        let result = json!([{ "role": "user", "content": "Weather?" }, { "role": "tool", "tool_call_id": "c", "content": "sunny" }]);
        let named = json!({ "type": "function", "function": { "name": "b" } });
        for (body, expected) in [
            (json!({}), "prose"),
            (json!({ "response_format": { "type": "text" } }), "prose"),
            (json!({ "response_format": { "type": "json_object" } }), "json {\"properties\":{\"answer\""),
            (
                json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "p", "schema": { "type": "integer" } } } }),
                "json {\"type\":\"integer\"}",
            ),
            (json!({ "tools": [tool("a"), tool("b")] }), "call a Chosen"),
            (json!({ "tools": [tool("a")], "tool_choice": "auto", "messages": result }), "prose"),
            (json!({ "tools": [tool("a")], "tool_choice": "required", "messages": result }), "call a Chosen"),
            (json!({ "tools": [tool("a")], "tool_choice": "none" }), "prose"),
            (json!({ "tools": [tool("a"), tool("b")], "tool_choice": named }), "call b Named"),
            (
                json!({ "tools": [tool("a")], "tool_choice": "none", "response_format": { "type": "json_object" } }),
                "json",
            ),
            (json!({ "functions": [{ "name": "f" }] }), "call f Function"),
            (
                json!({ "functions": [{ "name": "f" }, { "name": "g" }], "function_call": { "name": "g" } }),
                "call g Function",
            ),
            (json!({ "functions": [{ "name": "f" }], "function_call": "none" }), "prose"),
        ] {
            check(body, expected);
        }
    }

    #[test]
    fn requests_the_service_refuses_name_the_field() {
        let schema = |spec: Value| json!({ "response_format": { "type": "json_schema", "json_schema": spec } });
        for (body, expected) in [
            (json!({ "response_format": "json" }), "error: `response_format` must be an object"),
            (json!({ "response_format": { "type": "xml" } }), "error: `response_format.type` must be"),
            (
                json!({ "response_format": { "type": "json_object" }, "messages": [{ "role": "user", "content": "Hi" }] }),
                "error: 'messages' must contain the word 'json'",
            ),
            (schema(json!({ "schema": {} })), "error: `response_format.json_schema.name` is required"),
            (schema(json!({ "name": "a b" })), "error: `response_format.json_schema.name` is required"),
            (schema(json!({ "name": "p", "schema": [] })), "error: `response_format.json_schema.schema` must be"),
            (json!({ "tools": {} }), "error: `tools` must be an array"),
            (json!({ "tools": [{ "type": "code_interpreter" }] }), "error: `tools[0]` must be a function tool"),
            (
                json!({ "tools": [{ "type": "function", "function": {} }] }),
                "error: `tools[0].function.name` is required",
            ),
            (
                json!({ "tools": [{ "type": "function", "function": { "name": "f", "parameters": 1 } }] }),
                "error: `tools[0].function.parameters` must be",
            ),
            (
                json!({ "tool_choice": "auto" }),
                "error: `tool_choice` is only allowed when functions are given (`tools`)",
            ),
            (
                json!({ "tools": [tool("a")], "tool_choice": "always" }),
                "error: `tool_choice` must be \"none\", \"auto\", \"required\"",
            ),
            (
                json!({ "tools": [tool("a")], "tool_choice": { "type": "function", "function": { "name": "z" } } }),
                "error: `tool_choice` names the function \"z\", which is not declared",
            ),
            (
                json!({ "functions": [{ "name": "f" }], "function_call": "required" }),
                "error: `function_call` must be \"none\", \"auto\", or name",
            ),
        ] {
            check(body, expected);
        }
    }

    fn completion(tokens: u64, finish_reason: FinishReason) -> Completion {
        Completion {
            prompt_tokens: 10,
            completion_tokens: tokens,
            choices: 1,
            generated: 1,
            finish_reason,
            time_to_first_token: Nanos(0),
            time_per_token: Nanos(0),
            break_after: None,
            remaining_requests: 0,
            remaining_tokens: 0,
        }
    }

    /// Spells `schema` in `drawn` tokens; returns the text, its tokens and how it finished.
    fn spelled(schema: Value, drawn: u64, max_tokens: Option<u64>) -> (String, u64, FinishReason) {
        let reason = if max_tokens == Some(drawn) { FinishReason::Length } else { FinishReason::Stop };
        let mut c = completion(drawn, reason);
        let text = spell("gpt-4o", &schema, &mut c, max_tokens, 0);
        assert_eq!(c.completion_tokens, tokens::count("gpt-4o", &text), "the completion counts what was spelled");
        (text, c.completion_tokens, c.finish_reason)
    }

    #[test]
    fn instances_follow_the_schema_and_fill_the_draw() {
        let person = json!({
            "type": "object", "additionalProperties": false, "required": ["name", "born", "tags", "pet", "kind", "age"],
            "properties": {
                "name": { "type": "string" }, "born": { "type": "string", "format": "date" },
                "tags": { "type": "array", "items": { "type": "string" }, "minItems": 2 },
                "pet": { "anyOf": [{ "$ref": "#/$defs/Pet" }, { "type": "null" }] },
                "kind": { "$ref": "#/$defs/Kind" }, "age": { "type": ["integer", "null"], "minimum": 18 },
            },
            "$defs": {
                "Pet": { "type": "object", "properties": { "legs": { "type": "number", "maximum": -1 } } },
                "Kind": { "type": "string", "enum": ["cat", "dog"] },
            },
        });
        let (text, tokens, reason) = spelled(person, 60, None);
        let value: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!((tokens, reason), (60, FinishReason::Stop), "{text}");
        assert!(value["name"].as_str().is_some_and(|s| s.starts_with("The quick brown")), "{text}");
        assert_eq!(value["tags"].as_array().map(Vec::len), Some(2), "{text}");
        assert_eq!((&value["born"], &value["kind"], &value["age"]), (&json!("2025-01-01"), &json!("cat"), &json!(18)));
        assert_eq!(value["pet"], json!({ "legs": -1.0 }));
    }

    #[test]
    fn a_schema_without_room_is_answered_whole_or_cut_at_max_tokens() {
        let numbers =
            json!({ "type": "object", "properties": { "a": { "type": "integer" }, "b": { "type": "boolean" } } });
        let whole = r#"{"a":0,"b":true}"#;
        let length = tokens::count("gpt-4o", whole);
        assert_eq!(
            spelled(numbers.clone(), 200, None),
            (whole.to_owned(), length, FinishReason::Stop),
            "shorter than the draw"
        );
        assert_eq!(
            spelled(numbers.clone(), 2, None),
            (whole.to_owned(), length, FinishReason::Stop),
            "longer than the draw"
        );
        let (cut, tokens, reason) = spelled(numbers.clone(), 2, Some(2));
        assert!(whole.starts_with(&cut) && cut.len() < whole.len(), "{cut}");
        assert_eq!((tokens, reason), (2, FinishReason::Length));
        let room = length + 5;
        assert_eq!(
            spelled(numbers, room, Some(room)),
            (whole.to_owned(), length, FinishReason::Stop),
            "ends before the cut"
        );
    }

    #[test]
    fn an_answer_cut_short_is_cut_inside_its_string() {
        let schema = json!({ "type": "object", "properties": { "answer": { "type": "string" } } });
        let (text, tokens, reason) = spelled(schema, 12, Some(12));
        assert!(text.starts_with(r#"{"answer":"The quick"#) && !text.ends_with('}'), "{text}");
        assert_eq!((tokens, reason), (12, FinishReason::Length));
    }

    #[test]
    fn schemas_that_multiply_are_bounded() {
        let mut nested = json!({ "type": "string", "minLength": 1_000_000_000u64 });
        for _ in 0..20 {
            nested = json!({ "type": "array", "items": nested, "minItems": 64 });
        }
        let (text, _, _) = spelled(nested, 16, None);
        assert!(serde_json::from_str::<Value>(&text).is_ok());
        let strings = text.matches("\"The").count();
        assert!(strings <= MAX_VALUES && text.len() < 250_000, "{strings} strings, {} bytes", text.len());
    }

    #[test]
    fn recursive_schemas_end() {
        let tree = json!({ "$ref": "#/$defs/Node", "$defs": { "Node": { "type": "object", "properties": {
            "children": { "type": "array", "items": { "$ref": "#/$defs/Node" } },
            "next": { "anyOf": [{ "$ref": "#/$defs/Node" }, { "type": "null" }] } } } } });
        let (text, _, reason) = spelled(tree, 16, None);
        assert!(serde_json::from_str::<Value>(&text).is_ok() && reason == FinishReason::Stop, "{text}");
    }

    #[test]
    fn a_call_counts_its_name_with_its_arguments() {
        let shape = read(&request(json!({ "tools": [tool("lookup_order")] }))).unwrap();
        let mut c = completion(20, FinishReason::Stop);
        let said = say(&shape, "gpt-4o", &mut c, None, "chatcmpl-1");
        let Said::Call { ref name, ref arguments, ref pieces, .. } = said else { panic!("{said:?}") };
        assert_eq!(tokens::count("gpt-4o", name) + tokens::count("gpt-4o", arguments), 20);
        assert_eq!((c.completion_tokens, pieces.concat()), (20, arguments.clone()));
        assert_eq!(said.finish_reason(c.finish_reason), "tool_calls");
        let message = said.message(c.completion_tokens);
        assert_eq!(message["tool_calls"][0]["function"]["name"], "lookup_order");
        assert_eq!(message["content"], Value::Null);
    }
}
