//! APIM policy XML → gateway-core's policy and routing values.
//!
//! Limits become `Limit`s through the core's own serde types, so every value is
//! checked by the same rules as native TOML; an error points at the element or
//! attribute it concerns.

use crate::expr::{self, ExprError};
use gateway_core::routing::{Retry, Routing, Switch};
use gateway_core::{Limit, Policy};
use roxmltree::{Document, Node};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// Unmodelled elements are errors, not warnings.
    pub strict: bool,
    /// APIM named values, for `{{name}}` in attribute values.
    pub named_values: BTreeMap<String, String>,
}

/// A message at a line and column (1-based) of the XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl Diagnostic {
    /// `FILE:LINE:COLUMN: message`, then the offending line of `text`: the one
    /// form every limitlab error takes.
    pub fn render(&self, path: &str, text: &str) -> String {
        let source = text.lines().nth((self.line as usize).saturating_sub(1)).unwrap_or("").trim_end();
        format!("{path}:{self}\n    {}", source.trim_start())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// The attributes whose policy expressions limitlab reads (in the subset `expr`
/// parses); an expression anywhere else is an error, never read as text.
const EXPRESSION_ATTRIBUTES: [&str; 3] = ["counter-key", "increment-condition", "condition"];

/// The error for an `@...` value that is not a single `@(...)` expression: a
/// statement block `@{ ... }`, or an expression with text around it.
fn unsupported_expression(value: &str) -> String {
    let form = match value.trim_start().starts_with("@{") {
        true => "a statement block `@{ ... }` is not supported",
        false => "only a whole `@( ... )` expression is supported",
    };
    format!("in `{value}`: {form}; {}", expr::KEY_FORMS)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetHeader {
    /// `inbound` (on the request to the backend) or `outbound` (on the response).
    pub section: String,
    pub name: String,
    pub exists_action: ExistsAction,
    pub values: Vec<String>,
}

/// `set-header exists-action`: what to do when the header is already there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExistsAction {
    /// Replace the header's values with the policy's (APIM's default).
    #[default]
    Override,
    /// Leave a header that is there as it is; set it when it is not.
    Skip,
    /// Add the policy's values to the header's.
    Append,
    /// Remove the header.
    Delete,
}

impl ExistsAction {
    pub const ALL: [ExistsAction; 4] =
        [ExistsAction::Override, ExistsAction::Skip, ExistsAction::Append, ExistsAction::Delete];

    /// The attribute value, as APIM spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExistsAction::Override => "override",
            ExistsAction::Skip => "skip",
            ExistsAction::Append => "append",
            ExistsAction::Delete => "delete",
        }
    }

    pub fn from_name(name: &str) -> Option<ExistsAction> {
        ExistsAction::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl fmt::Display for ExistsAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMetric {
    pub element: String,
    pub namespace: Option<String>,
    pub dimensions: Vec<String>,
}

/// What a `<policies>` document says, in the core's terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyDocument {
    pub policy: Policy,
    /// `set-backend-service backend-id`.
    pub backend_id: Option<String>,
    /// `set-backend-service base-url`.
    pub base_url: Option<String>,
    pub retry: Option<Retry>,
    /// `forward-request timeout`, seconds.
    pub timeout: Option<u64>,
    pub set_headers: Vec<SetHeader>,
    /// Statuses of `return-response` elements (they end the request when reached).
    pub return_statuses: Vec<u16>,
    /// `authentication-managed-identity resource`: mapped to the backends' credentials.
    pub managed_identity: Option<String>,
    pub token_metrics: Vec<TokenMetric>,
    pub warnings: Vec<Diagnostic>,
}

impl PolicyDocument {
    /// Puts the document's backend choice, retry and timeout into a routing whose
    /// backends and pools come from the configuration.
    pub fn apply_to(&self, routing: &mut Routing) -> Result<(), String> {
        if let Some(url) = &self.base_url {
            if !routing.backends.iter().any(|b| b.id == "base-url") {
                routing.backends.push(gateway_core::routing::Backend {
                    id: "base-url".into(),
                    url: url.clone(),
                    credential: None,
                    circuit_breaker: None,
                });
            }
            routing.set_backend = "base-url".into();
        }
        if let Some(id) = &self.backend_id {
            routing.set_backend = id.clone();
        }
        if self.retry.is_some() {
            routing.retry = self.retry.clone();
        }
        if let Some(t) = self.timeout {
            routing.timeout = t;
        }
        routing.validate()
    }
}

struct Reader<'a, 'input> {
    doc: &'a Document<'input>,
    options: &'a ReadOptions,
    out: PolicyDocument,
    /// The section being read.
    current: String,
    /// Errors of elements read so far; reading goes on to the next element.
    errors: Vec<Diagnostic>,
}

/// APIM accepts C# in attribute values as written (`"`, `&&` and `<` unescaped),
/// which strict XML does not. Inside each `@(...)` these characters are swapped
/// for private-use stand-ins (one character each, so every line and column stays
/// where the user wrote it) and swapped back when the expression is read.
const STAND_INS: [(char, char); 3] = [('"', '\u{E000}'), ('&', '\u{E001}'), ('<', '\u{E002}')];

fn protect_expressions(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = chars.clone();
    let mut i = 0;
    while i + 2 < chars.len() {
        let opens = (chars[i] == '"' || chars[i] == '>') && chars[i + 1] == '@' && chars[i + 2] == '(';
        if !opens {
            i += 1;
            continue;
        }
        let (mut j, mut depth, mut in_string) = (i + 3, 1, false);
        while j < chars.len() && depth > 0 {
            match chars[j] {
                '"' => in_string = !in_string,
                '(' if !in_string => depth += 1,
                ')' if !in_string => depth -= 1,
                _ => {}
            }
            j += 1;
        }
        if depth == 0 {
            for k in i + 3..j {
                if chars[k] == '&' && is_entity(&chars[k + 1..]) {
                    continue;
                }
                if let Some(&(_, stand_in)) = STAND_INS.iter().find(|(c, _)| *c == chars[k]) {
                    out[k] = stand_in;
                }
            }
        }
        i = j.max(i + 1);
    }
    out.into_iter().collect()
}

/// Whether the text after an `&` is an entity reference (`quot;`, `#34;`), which
/// is already valid XML and stays as it is.
fn is_entity(rest: &[char]) -> bool {
    let name = rest.iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '#').count();
    name > 0 && rest.get(name) == Some(&';')
}

fn restore(value: &str) -> String {
    value.chars().map(|c| STAND_INS.iter().find(|(_, s)| *s == c).map_or(c, |(o, _)| *o)).collect()
}

/// Reads a policy document; on errors, the first in the file.
pub fn read(text: &str, options: &ReadOptions) -> Result<PolicyDocument, Diagnostic> {
    read_all(text, options).map_err(|errors| errors.into_iter().next().expect("an error"))
}

/// Reads a policy document; on errors, every element's error, in file order (a
/// document that is not well-formed XML has just the one).
pub fn read_all(text: &str, options: &ReadOptions) -> Result<PolicyDocument, Vec<Diagnostic>> {
    read_document(text, options).map_err(|e| vec![e]).and_then(|(doc, mut errors)| match errors.is_empty() {
        true => Ok(doc),
        false => {
            errors.sort_by_key(|d| (d.line, d.column));
            Err(errors)
        }
    })
}

fn read_document(text: &str, options: &ReadOptions) -> Result<(PolicyDocument, Vec<Diagnostic>), Diagnostic> {
    let protected = protect_expressions(text);
    let doc = Document::parse(&protected).map_err(|e| {
        let pos = e.pos();
        Diagnostic { line: pos.row, column: pos.col, message: format!("malformed XML: {e}") }
    })?;
    let root = doc.root_element();
    let mut reader =
        Reader { doc: &doc, options, out: PolicyDocument::default(), current: String::new(), errors: Vec::new() };
    if root.tag_name().name() != "policies" {
        return Err(reader.at(root, format!("the root element is <{}>, not <policies>", root.tag_name().name())));
    }
    for section in root.children().filter(Node::is_element) {
        match section.tag_name().name() {
            "inbound" | "backend" | "outbound" | "on-error" => reader.section(section)?,
            other => {
                return Err(reader.at(
                    section,
                    format!("<{other}> is not a policy section; use <inbound>, <backend>, <outbound> or <on-error>"),
                ))
            }
        }
    }
    Ok((reader.out, reader.errors))
}

const LIMITS: [&str; 6] =
    ["rate-limit", "rate-limit-by-key", "quota", "quota-by-key", "azure-openai-token-limit", "llm-token-limit"];

impl Reader<'_, '_> {
    fn at(&self, node: Node<'_, '_>, message: String) -> Diagnostic {
        let pos = self.doc.text_pos_at(node.range().start);
        Diagnostic { line: pos.row, column: pos.col, message }
    }

    fn at_offset(&self, offset: usize, message: String) -> Diagnostic {
        let pos = self.doc.text_pos_at(offset);
        Diagnostic { line: pos.row, column: pos.col, message }
    }

    fn section(&mut self, section: Node<'_, '_>) -> Result<(), Diagnostic> {
        self.current = section.tag_name().name().to_owned();
        for node in section.children().filter(Node::is_element) {
            if let Err(error) = self.element(node) {
                self.errors.push(error);
            }
        }
        Ok(())
    }

    fn element(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        let name = node.tag_name().name();
        match name {
            "base" => Ok(()),
            n if LIMITS.contains(&n) => self.limit(node),
            "set-backend-service" => self.set_backend(node),
            "retry" => self.retry(node),
            "forward-request" => self.forward_request(node),
            "set-header" => self.set_header(node),
            "return-response" => self.return_response(node),
            "authentication-managed-identity" => {
                self.check_attributes(node, &["resource", "client-id", "output-token-variable-name", "ignore-error"])?;
                self.out.managed_identity = node.attribute("resource").map(str::to_owned);
                Ok(())
            }
            "azure-openai-emit-token-metric" | "llm-emit-token-metric" => self.token_metric(node),
            other => self.unmodelled(node, other),
        }
    }

    fn unmodelled(&mut self, node: Node<'_, '_>, name: &str) -> Result<(), Diagnostic> {
        // A near miss of a limit is a typo, not another policy: read as a warning,
        // it would drop the limit without a word.
        if let Some(limit) = LIMITS.iter().find(|limit| diagnostics::edit_distance(name, limit) <= 2) {
            return Err(self.at(node, format!("unknown element <{name}>; did you mean <{limit}>?")));
        }
        let message = format!("<{name}> is not modelled by limitlab; the rest of the policy still runs without it");
        let diagnostic = self.at(node, message);
        if self.options.strict {
            return Err(Diagnostic { message: format!("{} (--strict)", diagnostic.message), ..diagnostic });
        }
        self.out.warnings.push(diagnostic);
        Ok(())
    }

    fn check_attributes(&self, node: Node<'_, '_>, allowed: &[&str]) -> Result<(), Diagnostic> {
        for attr in node.attributes() {
            if !allowed.contains(&attr.name()) {
                return Err(self.at_offset(
                    attr.range().start,
                    format!(
                        "unknown attribute `{}` on <{}>; its attributes are {}",
                        attr.name(),
                        node.tag_name().name(),
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An attribute's value with `{{named values}}` resolved, and where it starts.
    fn value(&self, node: Node<'_, '_>, name: &str) -> Result<Option<(String, usize)>, Diagnostic> {
        let Some(attr) = node.attribute_node(name) else { return Ok(None) };
        let start = attr.range_value().start;
        if attr.value().trim_start().starts_with('@') && !EXPRESSION_ATTRIBUTES.contains(&name) {
            let message = format!(
                "`{name}`: a policy expression is not supported here (limitlab reads expressions only in {})",
                EXPRESSION_ATTRIBUTES.join(", ")
            );
            return Err(self.at_offset(start, message));
        }
        let mut value = restore(attr.value());
        while let Some(open) = value.find("{{") {
            let Some(close) = value[open..].find("}}").map(|c| open + c) else { break };
            let key = value[open + 2..close].trim().to_owned();
            let Some(named) = self.options.named_values.get(&key) else {
                return Err(
                    self.at_offset(start, format!("named value `{{{{{key}}}}}` is not defined in the configuration"))
                );
            };
            value.replace_range(open..close + 2, named);
        }
        Ok(Some((value, start)))
    }

    /// An expression error at its character in the document (`start` is where the
    /// attribute value begins, `inner` where the expression begins in the value).
    fn expr_error(&self, start: usize, inner: usize, e: ExprError, text: &str) -> Diagnostic {
        let chars = text.get(..inner + e.offset).map_or(0, |p| p.chars().count());
        let rest = &self.doc.input_text()[start..];
        let offset = start + rest.char_indices().nth(chars).map_or(rest.len(), |(i, _)| i);
        self.at_offset(offset, format!("in `{text}`: {}", e.message))
    }

    fn limit(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        let element = node.tag_name().name();
        let mut table = toml::Table::new();
        table.insert("type".into(), element.into());
        for attr in node.attributes() {
            let (value, start) = self.value(node, attr.name())?.expect("the attribute exists");
            let field = attr.name().replace('-', "_");
            let converted = self
                .limit_field(&field, &value, start)
                .map_err(|d| Diagnostic { message: format!("<{element}> `{}`: {}", attr.name(), d.message), ..d })?;
            table.insert(field, converted);
        }
        let limit: Limit = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let message = e.message().replace('_', "-");
            self.at(node, format!("<{element}>: {message}"))
        })?;
        self.out.policy.limits.push(limit);
        Ok(())
    }

    /// One attribute as the TOML value the core's `RawLimit` expects.
    fn limit_field(&self, field: &str, value: &str, start: usize) -> Result<toml::Value, Diagnostic> {
        let here = |message: String| self.at_offset(start, message);
        let number = || value.trim().parse::<i64>().map_err(|_| here(format!("`{value}` is not a whole number")));
        match field {
            "calls" | "renewal_period" | "increment_count" | "tokens_per_minute" | "token_quota" => {
                Ok(toml::Value::Integer(number()?))
            }
            // APIM's bandwidth is in kilobytes.
            "bandwidth" => Ok(toml::Value::String(format!("{} KB", number()?))),
            "estimate_prompt_tokens" => match value.trim() {
                "true" | "True" => Ok(toml::Value::Boolean(true)),
                "false" | "False" => Ok(toml::Value::Boolean(false)),
                _ => Err(here(format!("`{value}` is not true or false"))),
            },
            "counter_key" => {
                let key = match expr::unwrap_expression(value) {
                    Some((inner, offset)) => {
                        expr::parse_key(inner).map_err(|e| self.expr_error(start, offset, e, value))?
                    }
                    None if value.trim_start().starts_with('@') => {
                        return Err(here(unsupported_expression(value)));
                    }
                    None => gateway_core::KeyExpr::Const(value.to_owned()),
                };
                toml::Value::try_from(key).map_err(|e| here(e.to_string()))
            }
            "increment_condition" => {
                let p = self.condition(value, start)?;
                Ok(toml::Value::String(p.to_string()))
            }
            _ => Ok(toml::Value::String(value.to_owned())),
        }
    }

    fn set_backend(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        self.check_attributes(node, &["backend-id", "base-url", "sf-resolve-condition", "sf-service-instance-name"])?;
        if let Some((id, _)) = self.value(node, "backend-id")? {
            self.out.backend_id = Some(id);
        }
        if let Some((url, _)) = self.value(node, "base-url")? {
            self.out.base_url = Some(url);
        }
        Ok(())
    }

    fn forward_request(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        let allowed = [
            "timeout",
            "timeout-ms",
            "buffer-request-body",
            "buffer-response",
            "follow-redirects",
            "fail-on-error-status-code",
            "continue-timeout",
            "http-version",
        ];
        self.check_attributes(node, &allowed)?;
        if let Some((t, start)) = self.value(node, "timeout")? {
            let secs = t
                .trim()
                .parse()
                .map_err(|_| self.at_offset(start, format!("`timeout`: `{t}` is not a whole number of seconds")))?;
            self.out.timeout = Some(secs);
        }
        Ok(())
    }

    fn retry(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        self.check_attributes(node, &["condition", "count", "interval", "max-interval", "delta", "first-fast-retry"])?;
        let (cond, start) =
            self.value(node, "condition")?.ok_or_else(|| self.at(node, "<retry> needs `condition`".into()))?;
        let condition = self.condition(&cond, start)?;
        let count = self.number(node, "count")?.ok_or_else(|| self.at(node, "<retry> needs `count`".into()))?;
        let interval =
            self.seconds(node, "interval")?.ok_or_else(|| self.at(node, "<retry> needs `interval`".into()))?;
        let (delta, max_interval) = (self.seconds(node, "delta")?, self.seconds(node, "max-interval")?);
        let first_fast_retry =
            self.value(node, "first-fast-retry")?.is_some_and(|(v, _)| v.trim().eq_ignore_ascii_case("true"));
        let mut switch = Vec::new();
        for child in node.children().filter(Node::is_element) {
            match child.tag_name().name() {
                "choose" => self.retry_choose(child, &mut switch)?,
                "forward-request" => self.forward_request(child)?,
                other => self.element_in_retry(child, other)?,
            }
        }
        let retry = Retry {
            condition,
            on_transport_failure: false,
            count: count as u32,
            interval,
            delta,
            max_interval,
            first_fast_retry,
            switch,
        };
        if !(1.0..=50.0).contains(&count) || count.fract() != 0.0 {
            return Err(self.at(node, format!("<retry> `count` must be a whole number 1 to 50, got {count}")));
        }
        self.out.retry = Some(retry);
        Ok(())
    }

    fn number(&self, node: Node<'_, '_>, name: &str) -> Result<Option<f64>, Diagnostic> {
        match self.value(node, name)? {
            None => Ok(None),
            Some((v, at)) => v.trim().parse::<f64>().map(Some).map_err(|_| {
                self.at_offset(at, format!("<{}> `{name}`: `{v}` is not a number", node.tag_name().name()))
            }),
        }
    }

    /// A number of seconds: finite, 0 or more (APIM's retry intervals).
    fn seconds(&self, node: Node<'_, '_>, name: &str) -> Result<Option<f64>, Diagnostic> {
        let Some(secs) = self.number(node, name)? else { return Ok(None) };
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Some(secs));
        }
        let (_, at) = self.value(node, name)?.expect("the attribute was just read");
        let element = node.tag_name().name();
        Err(self.at_offset(at, format!("<{element}> `{name}` must be a number of seconds, 0 or more, got {secs}")))
    }

    fn element_in_retry(&mut self, child: Node<'_, '_>, name: &str) -> Result<(), Diagnostic> {
        match name {
            "set-backend-service" => self.set_backend(child),
            other => self.unmodelled(child, other),
        }
    }

    fn condition(&self, text: &str, start: usize) -> Result<gateway_core::StatusPredicate, Diagnostic> {
        let (inner, offset) = expr::unwrap_expression(text)
            .ok_or_else(|| self.at_offset(start, "write the condition as @(context.Response.StatusCode ...)".into()))?;
        expr::parse_condition(inner).map_err(|e| self.expr_error(start, offset, e, text))
    }

    fn retry_choose(&mut self, choose: Node<'_, '_>, switch: &mut Vec<Switch>) -> Result<(), Diagnostic> {
        for when in choose.children().filter(Node::is_element) {
            if when.tag_name().name() == "otherwise" {
                continue;
            }
            if when.tag_name().name() != "when" {
                return Err(
                    self.at(when, format!("<{}> inside <choose>; use <when> and <otherwise>", when.tag_name().name()))
                );
            }
            let (cond, start) =
                self.value(when, "condition")?.ok_or_else(|| self.at(when, "<when> needs `condition`".into()))?;
            let predicate = self.condition(&cond, start)?;
            for inner in when.children().filter(Node::is_element) {
                match (inner.tag_name().name(), self.value(inner, "backend-id")?) {
                    ("set-backend-service", Some((backend, _))) => {
                        switch.push(Switch { when: predicate.clone(), on_transport_failure: false, backend })
                    }
                    (other, _) => self.unmodelled(inner, other)?,
                }
            }
        }
        Ok(())
    }

    fn set_header(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        self.check_attributes(node, &["name", "exists-action"])?;
        let name = self.value(node, "name")?.ok_or_else(|| self.at(node, "<set-header> needs `name`".into()))?.0;
        let exists_action = match self.value(node, "exists-action")? {
            None => ExistsAction::default(),
            Some((action, start)) => ExistsAction::from_name(&action).ok_or_else(|| {
                let valid = "`override`, `skip`, `append` or `delete`";
                self.at_offset(start, format!("<set-header> `exists-action`: `{action}` is not {valid}"))
            })?,
        };
        let values =
            node.children().filter(|c| c.has_tag_name("value")).map(|v| v.text().unwrap_or("").to_owned()).collect();
        self.out.set_headers.push(SetHeader { section: self.current.clone(), name, exists_action, values });
        Ok(())
    }

    fn return_response(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        let status = node.children().find(|c| c.has_tag_name("set-status"));
        let code = match status.and_then(|s| s.attribute("code")) {
            Some(code) => {
                code.parse().map_err(|_| self.at(node, format!("<set-status> `code`: `{code}` is not a status")))?
            }
            None => 200,
        };
        self.out.return_statuses.push(code);
        Ok(())
    }

    fn token_metric(&mut self, node: Node<'_, '_>) -> Result<(), Diagnostic> {
        self.check_attributes(node, &["namespace"])?;
        let dimensions = node
            .children()
            .filter(|c| c.has_tag_name("dimension"))
            .filter_map(|d| d.attribute("name").map(str::to_owned))
            .collect();
        self.out.token_metrics.push(TokenMetric {
            element: node.tag_name().name().to_owned(),
            namespace: node.attribute("namespace").map(str::to_owned),
            dimensions,
        });
        Ok(())
    }
}
