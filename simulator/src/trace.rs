//! Trace files: one request per line, JSONL.

use base64::Engine;
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
    pub completion_tokens: Option<u64>,
    pub stream: Option<bool>,
}

/// Reads a JSONL trace; an error names the file, line, column and field.
pub fn load(path: &Path) -> Result<Vec<TraceLine>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read the trace: {e}", path.display()))?;
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let mut line: TraceLine = serde_json::from_str(raw).map_err(|e| {
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            let hint = gateway_core::policy::suggestion(&message).map(|n| format!("; did you mean `{n}`?"));
            format!("{}:{}:{}: {message}{}", path.display(), i + 1, e.column(), hint.unwrap_or_default())
        })?;
        line.line = i as u64;
        lines.push(line);
    }
    lines.sort_by_key(|l| (l.t_ms, l.line));
    Ok(lines)
}

/// An unsigned JWT whose subject is `sub`, as `Authorization: Bearer` carries it.
pub fn jwt_for(sub: &str) -> String {
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("Bearer {}.{}.c2ln", enc(r#"{"alg":"none"}"#), enc(&format!(r#"{{"sub":"{sub}"}}"#)))
}
