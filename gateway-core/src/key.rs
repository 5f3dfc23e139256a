//! Counter keys: what a limit counts by, computed from the request.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The facts about a client request that keys and limits read.
///
/// The driver fills it from the wire; the core never parses HTTP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The client IP as APIM's `context.Request.IpAddress` gives it.
    pub ip: String,
    pub subscription: Option<Subscription>,
    /// The product the subscription was used under (`context.Product.Name`).
    pub product: Option<String>,
    /// Request headers in arrival order; names compare case-insensitively.
    pub headers: Vec<(String, String)>,
    /// The driver's estimate of the prompt's tokens, for `estimate_prompt_tokens`.
    pub prompt_tokens_estimate: Option<u64>,
    /// The request's `max_tokens` (or `max_completion_tokens`), for reserve mode;
    /// `Some(0)` for a request that generates nothing (embeddings).
    pub max_tokens: Option<u64>,
    /// How many completions the request asks for (`n`, or the legacy completions
    /// API's `best_of` when larger, for each of its prompts). Each may run to
    /// `max_tokens`, so reserve mode sets aside the allowance once for each;
    /// absent means one.
    pub choices: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub key: String,
    pub name: String,
}

impl RequestInfo {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An expression computing a counter key, one of the forms real APIM policies use.
///
/// In TOML: `"ip"`, `"subscription_id"`, `"subscription_key"`, `"product"`,
/// `{ header = { name = "x-team", default = "none" } }`, `{ jwt = { claim = "sub" } }`,
/// `{ const = "global" }`, `{ concat = ["ip", { const = ":" }, "product"] }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyExpr {
    /// `context.Request.IpAddress`.
    Ip,
    /// `context.Subscription.Id`; empty when the request has no subscription.
    SubscriptionId,
    /// `context.Subscription.Key`.
    SubscriptionKey,
    /// `context.Subscription.Name`.
    SubscriptionName,
    /// `context.Product.Name`.
    #[serde(alias = "product_name")]
    Product,
    /// `context.Request.Headers.GetValueOrDefault(name, default)`.
    Header {
        name: String,
        #[serde(default)]
        default: String,
    },
    /// A claim of the JWT in a `Bearer` header, read without verifying the signature
    /// (`AsJwt()?.Subject` or `?.Claims.GetValueOrDefault(claim, default)`).
    Jwt {
        #[serde(default = "default_claim")]
        claim: String,
        #[serde(default = "default_jwt_header")]
        header: String,
        #[serde(default)]
        default: String,
    },
    Const(String),
    Concat(Vec<KeyExpr>),
}

fn default_claim() -> String {
    "sub".to_owned()
}

fn default_jwt_header() -> String {
    "Authorization".to_owned()
}

impl KeyExpr {
    /// The key's value for `req` where it lies in `req`, when the expression is
    /// one field or a constant (most keys are); `None` when it has to be built
    /// (a concatenation, a JWT claim), for which [`KeyExpr::write`] builds it.
    pub fn as_str<'r>(&'r self, req: &'r RequestInfo) -> Option<&'r str> {
        let subscription = || req.subscription.as_ref();
        match self {
            KeyExpr::Ip => Some(&req.ip),
            KeyExpr::SubscriptionId => Some(subscription().map_or("", |s| &s.id)),
            KeyExpr::SubscriptionKey => Some(subscription().map_or("", |s| &s.key)),
            KeyExpr::SubscriptionName => Some(subscription().map_or("", |s| &s.name)),
            KeyExpr::Product => Some(req.product.as_deref().unwrap_or("")),
            KeyExpr::Header { name, default } => Some(req.header(name).unwrap_or(default)),
            KeyExpr::Const(text) => Some(text),
            KeyExpr::Jwt { .. } | KeyExpr::Concat(_) => None,
        }
    }

    /// The key's value for `req`: where it lies for a one-field key, else
    /// written in `scratch` (cleared first), so hot paths reuse one buffer.
    pub fn read<'r>(&'r self, req: &'r RequestInfo, scratch: &'r mut String) -> &'r str {
        if let Some(value) = self.as_str(req) {
            return value;
        }
        scratch.clear();
        self.write(req, scratch);
        scratch
    }

    /// Appends the key's value for `req` to `out`, so hot paths can reuse one buffer.
    pub fn write(&self, req: &RequestInfo, out: &mut String) {
        if let Some(value) = self.as_str(req) {
            return out.push_str(value);
        }
        match self {
            KeyExpr::Jwt { claim, header, default } => match req.header(header).and_then(|v| jwt_claim(v, claim)) {
                Some(value) => out.push_str(&value),
                None => out.push_str(default),
            },
            KeyExpr::Concat(parts) => parts.iter().for_each(|p| p.write(req, out)),
            _ => unreachable!("`as_str` reads every other form where it lies"),
        }
    }

    /// Adds the names of the headers this key reads to `names` (lowercase, each once).
    pub fn headers_read(&self, names: &mut Vec<String>) {
        let mut add = |name: &str| {
            let name = name.to_ascii_lowercase();
            if !names.contains(&name) {
                names.push(name);
            }
        };
        match self {
            KeyExpr::Header { name, .. } => add(name),
            KeyExpr::Jwt { header, .. } => add(header),
            KeyExpr::Concat(parts) => parts.iter().for_each(|p| p.headers_read(names)),
            KeyExpr::Ip
            | KeyExpr::SubscriptionId
            | KeyExpr::SubscriptionKey
            | KeyExpr::SubscriptionName
            | KeyExpr::Product
            | KeyExpr::Const(_) => {}
        }
    }

    pub fn eval(&self, req: &RequestInfo) -> String {
        let mut out = String::new();
        self.write(req, &mut out);
        out
    }
}

/// Reads one claim from a `Bearer` token's payload. Signatures are not checked:
/// APIM's `AsJwt()` does not check them either, and keys only need the value.
fn jwt_claim(header_value: &str, claim: &str) -> Option<String> {
    let token = header_value.strip_prefix("Bearer ").or_else(|| header_value.strip_prefix("bearer "))?;
    let payload = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match json.get(claim)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::KeyExpr;

    #[test]
    fn keys_name_the_headers_they_read_lowercase_and_once() {
        let check = |toml_key: &str, expected: &[&str]| {
            let expr: KeyExpr =
                toml::from_str::<toml::Table>(&format!("k = {toml_key}")).unwrap()["k"].clone().try_into().unwrap();
            let mut names = Vec::new();
            expr.headers_read(&mut names);
            assert_eq!(names, expected, "{toml_key}");
        };
        check(r#""ip""#, &[]);
        check(r#"{ const = "x" }"#, &[]);
        check(r#"{ header = { name = "X-Team" } }"#, &["x-team"]);
        check(r#"{ jwt = { claim = "sub" } }"#, &["authorization"]);
        check(
            r#"{ concat = [{ header = { name = "X-Team" } }, "ip", { header = { name = "x-team" } }, { jwt = { header = "X-Token" } }] }"#,
            &["x-team", "x-token"],
        );
    }

    /// A key read where it lies is the key `write` builds, and both are the
    /// field the expression names; only the expressions that have to be built
    /// say so. `read` gives the same key either way.
    #[test]
    fn a_borrowed_key_is_the_written_key() {
        let req = super::RequestInfo {
            ip: "10.1.2.3".into(),
            subscription: Some(super::Subscription { id: "sid".into(), key: "skey".into(), name: "sname".into() }),
            product: Some("gold".into()),
            headers: vec![("X-Team".into(), "blue".into())],
            ..Default::default()
        };
        let bare = super::RequestInfo { ip: "10.9.9.9".into(), ..Default::default() };
        // (key, its value for `req`, for `bare`, whether it is read where it lies)
        let check = |toml_key: &str, full: &str, empty: &str, borrowed: bool| {
            let expr: KeyExpr =
                toml::from_str::<toml::Table>(&format!("k = {toml_key}")).unwrap()["k"].clone().try_into().unwrap();
            for (req, expected) in [(&req, full), (&bare, empty)] {
                let mut written = String::from("prefix:");
                expr.write(req, &mut written);
                assert_eq!(written.strip_prefix("prefix:"), Some(expected), "{toml_key}");
                let read = expr.as_str(req);
                assert_eq!(read.is_some(), borrowed, "{toml_key}");
                assert!(read.is_none_or(|key| key == expected), "{toml_key}");
                let mut scratch = String::from("stale");
                assert_eq!(expr.read(req, &mut scratch), expected, "{toml_key}");
            }
        };
        check(r#""ip""#, "10.1.2.3", "10.9.9.9", true);
        check(r#""subscription_id""#, "sid", "", true);
        check(r#""subscription_key""#, "skey", "", true);
        check(r#""subscription_name""#, "sname", "", true);
        check(r#""product""#, "gold", "", true);
        check(r#"{ header = { name = "x-team", default = "none" } }"#, "blue", "none", true);
        check(r#"{ const = "global" }"#, "global", "global", true);
        check(r#"{ jwt = { claim = "sub", default = "anon" } }"#, "anon", "anon", false);
        check(r#"{ concat = ["ip", { const = ":" }, "product"] }"#, "10.1.2.3:gold", "10.9.9.9:", false);
    }
}
