//! Trace files: one request per line, JSONL.

use base64::Engine;
use mock_aoai::wire::MAX_CHOICES;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceLine {
    /// The 0-based line number in the file (set by the reader).
    #[serde(skip)]
    pub line: u64,
    /// Offset from the scenario's start.
    pub t_ms: u64,
    pub ip: Option<String>,
    pub subscription: Option<String>,
    pub product: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub prompt_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    /// Completions the request asked for (the API's `n`, 1 to 128).
    pub n: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub stream: Option<bool>,
}

/// Reads a trace, JSONL or (by the `.csv` extension) CSV; an error names the file,
/// line, column and field.
pub fn load(path: &Path) -> Result<Vec<TraceLine>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read the trace: {e}", path.display()))?;
    let mut lines = match path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        true => load_csv(path, &text)?,
        false => load_jsonl(path, &text)?,
    };
    lines.sort_by_key(|l| (l.t_ms, l.line));
    Ok(lines)
}

/// CSV with a header row naming the JSONL fields (`t_ms`, `ip`, `subscription`,
/// `product`, `prompt_tokens`, `max_tokens`, `n`, `completion_tokens`, `stream`), and
/// `header:NAME` columns for request headers. Empty cells are absent values.
fn load_csv(path: &Path, text: &str) -> Result<Vec<TraceLine>, String> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
    let names: Vec<String> =
        reader.headers().map_err(|e| format!("{}:1: {e}", path.display()))?.iter().map(str::to_owned).collect();
    const FIELDS: [&str; 9] =
        ["t_ms", "ip", "subscription", "product", "prompt_tokens", "max_tokens", "n", "completion_tokens", "stream"];
    if let Some(bad) = names.iter().find(|n| !FIELDS.contains(&n.as_str()) && !n.starts_with("header:")) {
        let message = format!("unknown field `{bad}`, expected one of {}", FIELDS.map(|f| format!("`{f}`")).join(", "));
        let hint = diagnostics::suggestion(&message).map(|n| format!("; did you mean `{n}`?"));
        return Err(format!("{}:1: {message}{}", path.display(), hint.unwrap_or_default()));
    }
    if !names.iter().any(|n| n == "t_ms") {
        return Err(format!("{}:1: no `t_ms` column: every request needs its time", path.display()));
    }
    let mut lines = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| format!("{}: {e}", path.display()))?;
        let line_no = record.position().map_or(0, |p| p.line());
        let mut line = TraceLine { line: line_no.saturating_sub(1), ..TraceLine::default() };
        for (name, value) in names.iter().zip(record.iter()) {
            csv_field(&mut line, name, value).map_err(|e| format!("{}:{line_no}: `{name}`: {e}", path.display()))?;
        }
        lines.push(line);
    }
    Ok(lines)
}

fn csv_field(line: &mut TraceLine, name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return match name {
            "t_ms" => Err("is required".into()),
            _ => Ok(()),
        };
    }
    let number = || value.parse::<u64>().map_err(|_| format!("`{value}` is not a whole number"));
    match name {
        "t_ms" => line.t_ms = number()?,
        "ip" => line.ip = Some(value.to_owned()),
        "subscription" => line.subscription = Some(value.to_owned()),
        "product" => line.product = Some(value.to_owned()),
        "prompt_tokens" => line.prompt_tokens = Some(number()?),
        "max_tokens" => line.max_tokens = Some(number()?),
        "n" => line.n = Some(number()?),
        "completion_tokens" => line.completion_tokens = Some(number()?),
        "stream" => line.stream = Some(value.parse().map_err(|_| format!("`{value}` is not true or false"))?),
        header => {
            let header = header.strip_prefix("header:").expect("checked against the header row");
            line.headers.insert(header.to_owned(), value.to_owned());
        }
    }
    Ok(())
}

fn load_jsonl(path: &Path, text: &str) -> Result<Vec<TraceLine>, String> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let mut line: TraceLine = serde_json::from_str(raw).map_err(|e| {
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            let hint = diagnostics::suggestion(&message).map(|n| format!("; did you mean `{n}`?"));
            format!("{}:{}:{}: {message}{}", path.display(), i + 1, e.column(), hint.unwrap_or_default())
        })?;
        line.line = i as u64;
        lines.push(line);
    }
    Ok(lines)
}

/// An unsigned JWT whose subject is `sub`, as `Authorization: Bearer` carries it.
pub fn jwt_for(sub: &str) -> String {
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("Bearer {}.{}.c2ln", enc(r#"{"alg":"none"}"#), enc(&format!(r#"{{"sub":"{sub}"}}"#)))
}

/// Checks a loaded trace against the scenario that plays it: an empty trace, an
/// address that is not one, `max_tokens = 0` or an `n` outside 1 to 128 is an
/// error naming the line;
/// lines at or after the scenario's end (never played) are a warning.
pub fn check(path: &Path, lines: &[TraceLine], end_ms: u64) -> Result<Vec<String>, String> {
    let shown = path.display();
    if lines.is_empty() {
        return Err(format!("{shown}: the trace has no requests"));
    }
    for l in lines {
        let at = l.line + 1;
        if let Some(ip) = l.ip.as_deref().filter(|ip| ip.parse::<std::net::IpAddr>().is_err()) {
            return Err(format!("{shown}:{at}: `ip`: `{ip}` is not an IP address"));
        }
        if l.max_tokens == Some(0) {
            return Err(format!("{shown}:{at}: `max_tokens`: 0 asks for no completion at all (Azure answers 400)"));
        }
        if let Some(n) = l.n.filter(|n| !(1..=MAX_CHOICES).contains(n)) {
            return Err(format!("{shown}:{at}: `n`: must be from 1 to {MAX_CHOICES}, not {n} (Azure answers 400)"));
        }
    }
    let late: Vec<&TraceLine> = lines.iter().filter(|l| l.t_ms >= end_ms).collect();
    let Some(first) = late.iter().min_by_key(|l| l.line) else { return Ok(Vec::new()) };
    Ok(vec![format!(
        "{shown}:{}: {} of {} lines come at or after the scenario's end ({end_ms} ms) and are never played \
         (first: t_ms {})",
        first.line + 1,
        late.len(),
        lines.len(),
        first.t_ms
    )])
}
