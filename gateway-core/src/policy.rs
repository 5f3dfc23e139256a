//! The policy model: plain serde types that TOML scenarios and configs embed.
//!
//! Every type validates itself while it is deserialized, so a bad value is reported
//! by the TOML reader with the file's line, column and the field's name.

use crate::key::KeyExpr;
use crate::status::StatusPredicate;
use crate::time::{CalendarPeriod, EpochSeconds};
use diagnostics::line_column;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An ordered pipeline of limits; the first rejection ends the request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub limits: Vec<Limit>,
}

impl Policy {
    /// The request headers the policy's keys read (lowercase, each once), so a
    /// driver can hand the core only those instead of copying every header.
    pub fn headers_read(&self) -> Vec<String> {
        let mut names = Vec::new();
        for limit in &self.limits {
            limit.counter_key().headers_read(&mut names);
        }
        names
    }

    /// Reads a policy from TOML text. Errors name the line, column and field;
    /// an error that concerns a whole limit points at that limit's table.
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        Policy::parse(text).map_err(|e| match e {
            PolicyError::Toml(e) => e.to_string(),
            PolicyError::Limit { line, column, message } => format!("line {line}, column {column}: {message}"),
        })
    }

    /// `from_toml` for a file: an error is one located line, `FILE:LINE:COLUMN:
    /// message`, then the offending source line.
    pub fn from_toml_file(path: &str, text: &str) -> Result<Policy, String> {
        Policy::parse(text).map_err(|e| match e {
            PolicyError::Toml(e) => diagnostics::describe_toml_error(path, text, &e),
            PolicyError::Limit { line, column, message } => {
                let source = text.lines().nth(line - 1).unwrap_or("").trim_end();
                format!("{path}:{line}:{column}: {message}\n    {source}")
            }
        })
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[serde(default)]
            limits: Vec<toml::Spanned<RawLimit>>,
        }
        let doc: Doc = toml::from_str(text).map_err(PolicyError::Toml)?;
        let mut limits = Vec::with_capacity(doc.limits.len());
        for (index, spanned) in doc.limits.into_iter().enumerate() {
            let span = spanned.span();
            let limit = Limit::try_from(spanned.into_inner()).map_err(|e| {
                let (line, column) = line_column(text, span.start);
                PolicyError::Limit { line, column, message: format!("limits[{index}]: {e}") }
            })?;
            limits.push(limit);
        }
        Ok(Policy { limits })
    }
}

enum PolicyError {
    Toml(toml::de::Error),
    Limit { line: usize, column: usize, message: String },
}

/// One limiting policy, tagged in TOML by `type` with APIM's element name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLimit", into = "RawLimit")]
pub enum Limit {
    /// `rate-limit`: keyed by the subscription.
    RateLimit(RateLimit),
    RateLimitByKey(RateLimit),
    /// `quota`: keyed by the subscription.
    Quota(Quota),
    QuotaByKey(Quota),
    AzureOpenAiTokenLimit(TokenLimit),
    LlmTokenLimit(TokenLimit),
}

impl Limit {
    /// APIM's element name.
    pub fn element(&self) -> &'static str {
        match self {
            Limit::RateLimit(_) => "rate-limit",
            Limit::RateLimitByKey(_) => "rate-limit-by-key",
            Limit::Quota(_) => "quota",
            Limit::QuotaByKey(_) => "quota-by-key",
            Limit::AzureOpenAiTokenLimit(_) => "azure-openai-token-limit",
            Limit::LlmTokenLimit(_) => "llm-token-limit",
        }
    }

    /// What the limit counts by; rate limits and quotas without a `counter-key`
    /// count by subscription, as APIM's `rate-limit` and `quota` do.
    pub fn counter_key(&self) -> KeyExpr {
        match self {
            Limit::RateLimit(r) | Limit::RateLimitByKey(r) => r.counter_key.clone().unwrap_or(KeyExpr::SubscriptionId),
            Limit::Quota(q) | Limit::QuotaByKey(q) => q.counter_key.clone().unwrap_or(KeyExpr::SubscriptionId),
            Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => t.counter_key.clone(),
        }
    }
}

/// Every field any limit has, flat, so the TOML reader sees each field directly and
/// reports a bad value at its own line and column; `TryFrom` then checks which
/// fields belong to the element named by `type`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    #[serde(rename = "type")]
    element: Element,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    renewal_period: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counter_key: Option<KeyExpr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    increment_condition: Option<StatusPredicate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    increment_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    algorithm: Option<Algorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bandwidth: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_period_start: Option<EpochSeconds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_quota_period: Option<CalendarPeriod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    estimate_prompt_tokens: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reserve: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reserve_default_max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_calls_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_calls_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total_calls_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_tokens_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_tokens_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens_consumed_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens_consumed_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_quota_tokens_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining_quota_tokens_variable_name: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Element {
    #[default]
    RateLimit,
    RateLimitByKey,
    Quota,
    QuotaByKey,
    AzureOpenaiTokenLimit,
    LlmTokenLimit,
}

const RATE_FIELDS: &[&str] = &[
    "calls",
    "renewal_period",
    "counter_key",
    "increment_condition",
    "increment_count",
    "algorithm",
    "retry_after_header_name",
    "retry_after_variable_name",
    "remaining_calls_header_name",
    "remaining_calls_variable_name",
    "total_calls_header_name",
];
const QUOTA_FIELDS: &[&str] = &[
    "calls",
    "bandwidth",
    "renewal_period",
    "first_period_start",
    "counter_key",
    "increment_condition",
    "increment_count",
];
const TOKEN_FIELDS: &[&str] = &[
    "counter_key",
    "tokens_per_minute",
    "token_quota",
    "token_quota_period",
    "estimate_prompt_tokens",
    "reserve",
    "reserve_default_max_tokens",
    "algorithm",
    "retry_after_header_name",
    "retry_after_variable_name",
    "remaining_tokens_header_name",
    "remaining_tokens_variable_name",
    "tokens_consumed_header_name",
    "tokens_consumed_variable_name",
    "remaining_quota_tokens_header_name",
    "remaining_quota_tokens_variable_name",
];

impl RawLimit {
    /// The names of the fields that are set, to check them against an element.
    fn set_fields(&self) -> Vec<&'static str> {
        let value = serde_json::to_value(self).expect("a RawLimit always serializes");
        let set: Vec<String> = value.as_object().expect("a struct").keys().cloned().collect();
        let all = [RATE_FIELDS, QUOTA_FIELDS, TOKEN_FIELDS].concat();
        all.into_iter().filter(|f| set.iter().any(|s| s == f)).collect()
    }

    fn take<T>(field: Option<T>, name: &str) -> Result<T, String> {
        field.ok_or_else(|| format!("`{name}` is required"))
    }
}

impl TryFrom<RawLimit> for Limit {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Limit, String> {
        let element = raw.element;
        let name = element_name(element);
        let allowed = match element {
            Element::RateLimit | Element::RateLimitByKey => RATE_FIELDS,
            Element::Quota | Element::QuotaByKey => QUOTA_FIELDS,
            Element::AzureOpenaiTokenLimit | Element::LlmTokenLimit => TOKEN_FIELDS,
        };
        if let Some(field) = raw.set_fields().into_iter().find(|f| !allowed.contains(f)) {
            return Err(format!("{name}: `{field}` is not a field of {name}; its fields are {}", allowed.join(", ")));
        }
        let by_key = !matches!(element, Element::RateLimit | Element::Quota);
        match (by_key, raw.counter_key.is_some()) {
            (true, false) => return Err(format!("{name}: `counter_key` is required")),
            (false, true) => {
                return Err(format!(
                    "{name}: `counter_key` is not allowed, `{name}` counts per subscription; use `{name}-by-key`"
                ))
            }
            _ => {}
        }
        let prefix = |e: String| format!("{name}: {e}");
        Ok(match element {
            Element::RateLimit => Limit::RateLimit(rate_from(raw).map_err(prefix)?),
            Element::RateLimitByKey => Limit::RateLimitByKey(rate_from(raw).map_err(prefix)?),
            Element::Quota => Limit::Quota(quota_from(raw).map_err(prefix)?),
            Element::QuotaByKey => Limit::QuotaByKey(quota_from(raw).map_err(prefix)?),
            Element::AzureOpenaiTokenLimit => Limit::AzureOpenAiTokenLimit(tokens_from(raw).map_err(prefix)?),
            Element::LlmTokenLimit => Limit::LlmTokenLimit(tokens_from(raw).map_err(prefix)?),
        })
    }
}

fn element_name(element: Element) -> &'static str {
    match element {
        Element::RateLimit => "rate-limit",
        Element::RateLimitByKey => "rate-limit-by-key",
        Element::Quota => "quota",
        Element::QuotaByKey => "quota-by-key",
        Element::AzureOpenaiTokenLimit => "azure-openai-token-limit",
        Element::LlmTokenLimit => "llm-token-limit",
    }
}

fn rate_from(r: RawLimit) -> Result<RateLimit, String> {
    RateLimit::try_from(RateLimitFields {
        calls: RawLimit::take(r.calls, "calls")?,
        renewal_period: RawLimit::take(r.renewal_period, "renewal_period")?,
        counter_key: r.counter_key,
        increment_condition: r.increment_condition,
        increment_count: r.increment_count.unwrap_or(1),
        algorithm: r.algorithm.unwrap_or_default(),
        retry_after_header_name: r.retry_after_header_name,
        retry_after_variable_name: r.retry_after_variable_name,
        remaining_calls_header_name: r.remaining_calls_header_name,
        remaining_calls_variable_name: r.remaining_calls_variable_name,
        total_calls_header_name: r.total_calls_header_name,
    })
}

fn quota_from(r: RawLimit) -> Result<Quota, String> {
    Quota::try_from(QuotaFields {
        calls: r.calls,
        bandwidth: r.bandwidth,
        renewal_period: RawLimit::take(r.renewal_period, "renewal_period")?,
        first_period_start: r.first_period_start.unwrap_or_default(),
        counter_key: r.counter_key,
        increment_condition: r.increment_condition,
        increment_count: r.increment_count.unwrap_or(1),
    })
}

fn tokens_from(r: RawLimit) -> Result<TokenLimit, String> {
    TokenLimit::try_from(TokenLimitFields {
        counter_key: RawLimit::take(r.counter_key, "counter_key")?,
        tokens_per_minute: r.tokens_per_minute,
        token_quota: r.token_quota,
        token_quota_period: r.token_quota_period,
        estimate_prompt_tokens: r.estimate_prompt_tokens.unwrap_or(false),
        reserve: r.reserve.unwrap_or(false),
        reserve_default_max_tokens: r.reserve_default_max_tokens.unwrap_or(DEFAULT_RESERVE_MAX_TOKENS),
        algorithm: r.algorithm.unwrap_or_default(),
        retry_after_header_name: r.retry_after_header_name,
        retry_after_variable_name: r.retry_after_variable_name,
        remaining_tokens_header_name: r.remaining_tokens_header_name,
        remaining_tokens_variable_name: r.remaining_tokens_variable_name,
        tokens_consumed_header_name: r.tokens_consumed_header_name,
        tokens_consumed_variable_name: r.tokens_consumed_variable_name,
        remaining_quota_tokens_header_name: r.remaining_quota_tokens_header_name,
        remaining_quota_tokens_variable_name: r.remaining_quota_tokens_variable_name,
    })
}

impl From<Limit> for RawLimit {
    fn from(limit: Limit) -> RawLimit {
        let element = match &limit {
            Limit::RateLimit(_) => Element::RateLimit,
            Limit::RateLimitByKey(_) => Element::RateLimitByKey,
            Limit::Quota(_) => Element::Quota,
            Limit::QuotaByKey(_) => Element::QuotaByKey,
            Limit::AzureOpenAiTokenLimit(_) => Element::AzureOpenaiTokenLimit,
            Limit::LlmTokenLimit(_) => Element::LlmTokenLimit,
        };
        match limit {
            Limit::RateLimit(RateLimit(f)) | Limit::RateLimitByKey(RateLimit(f)) => RawLimit {
                element,
                calls: Some(f.calls),
                renewal_period: Some(f.renewal_period),
                counter_key: f.counter_key,
                increment_condition: f.increment_condition,
                increment_count: Some(f.increment_count),
                algorithm: Some(f.algorithm),
                retry_after_header_name: f.retry_after_header_name,
                retry_after_variable_name: f.retry_after_variable_name,
                remaining_calls_header_name: f.remaining_calls_header_name,
                remaining_calls_variable_name: f.remaining_calls_variable_name,
                total_calls_header_name: f.total_calls_header_name,
                ..RawLimit::default()
            },
            Limit::Quota(Quota(f)) | Limit::QuotaByKey(Quota(f)) => RawLimit {
                element,
                calls: f.calls,
                bandwidth: f.bandwidth,
                renewal_period: Some(f.renewal_period),
                first_period_start: Some(f.first_period_start),
                counter_key: f.counter_key,
                increment_condition: f.increment_condition,
                increment_count: Some(f.increment_count),
                ..RawLimit::default()
            },
            Limit::AzureOpenAiTokenLimit(TokenLimit(f)) | Limit::LlmTokenLimit(TokenLimit(f)) => RawLimit {
                element,
                counter_key: Some(f.counter_key),
                tokens_per_minute: f.tokens_per_minute,
                token_quota: f.token_quota,
                token_quota_period: f.token_quota_period,
                estimate_prompt_tokens: Some(f.estimate_prompt_tokens),
                reserve: Some(f.reserve),
                reserve_default_max_tokens: Some(f.reserve_default_max_tokens),
                algorithm: Some(f.algorithm),
                retry_after_header_name: f.retry_after_header_name,
                retry_after_variable_name: f.retry_after_variable_name,
                remaining_tokens_header_name: f.remaining_tokens_header_name,
                remaining_tokens_variable_name: f.remaining_tokens_variable_name,
                tokens_consumed_header_name: f.tokens_consumed_header_name,
                tokens_consumed_variable_name: f.tokens_consumed_variable_name,
                remaining_quota_tokens_header_name: f.remaining_quota_tokens_header_name,
                remaining_quota_tokens_variable_name: f.remaining_quota_tokens_variable_name,
                ..RawLimit::default()
            },
        }
    }
}

/// How a rate limit counts: APIM's classic tiers use a sliding window, the v2
/// tiers a token bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    SlidingWindow,
    TokenBucket,
}

/// `rate-limit` and `rate-limit-by-key`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RateLimitFields", into = "RateLimitFields")]
pub struct RateLimit(pub RateLimitFields);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFields {
    pub calls: u64,
    /// Seconds, 1 to 300.
    pub renewal_period: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_key: Option<KeyExpr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increment_condition: Option<StatusPredicate>,
    #[serde(default = "one")]
    pub increment_count: u64,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_calls_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_calls_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_calls_header_name: Option<String>,
}

fn one() -> u64 {
    1
}

impl TryFrom<RateLimitFields> for RateLimit {
    type Error = String;
    fn try_from(f: RateLimitFields) -> Result<RateLimit, String> {
        if f.calls == 0 {
            return Err("`calls` must be at least 1".into());
        }
        if !(1..=300).contains(&f.renewal_period) {
            return Err(format!(
                "`renewal_period` must be 1 to 300 seconds for a rate limit (APIM's maximum), got {}; use a quota for longer periods",
                f.renewal_period
            ));
        }
        if f.increment_count == 0 {
            return Err("`increment_count` must be at least 1".into());
        }
        Ok(RateLimit(f))
    }
}

impl From<RateLimit> for RateLimitFields {
    fn from(r: RateLimit) -> Self {
        r.0
    }
}

impl std::ops::Deref for RateLimit {
    type Target = RateLimitFields;
    fn deref(&self) -> &RateLimitFields {
        &self.0
    }
}

/// A size in bytes, written with a unit: `"500 KB"`, `"10MB"`, `"1 GB"`.
/// As in APIM, a kilobyte is 1,024 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size such as \"500 KB\""))?;
        let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "B" => 1,
            "KB" | "KIB" => 1 << 10,
            "MB" | "MIB" => 1 << 20,
            "GB" | "GIB" => 1 << 30,
            "" => return Err(format!("`{text}` has no unit; write it with one, such as \"{n} KB\" (APIM's bandwidth attribute is in kilobytes)")),
            other => return Err(format!("`{other}` in `{text}` is not a unit; use B, KB, MB or GB")),
        };
        n.checked_mul(factor).map(ByteSize).ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1024) {
            write!(f, "{} KB", self.0 / 1024)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "`{n}` has no unit; write it with one, such as \"{n} KB\" (APIM's bandwidth attribute is in kilobytes)"
            ))),
        }
    }
}

/// `quota` and `quota-by-key`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "QuotaFields", into = "QuotaFields")]
pub struct Quota(pub QuotaFields);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<ByteSize>,
    /// Seconds; 0 means the quota never renews.
    pub renewal_period: u64,
    #[serde(default)]
    pub first_period_start: EpochSeconds,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_key: Option<KeyExpr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increment_condition: Option<StatusPredicate>,
    #[serde(default = "one")]
    pub increment_count: u64,
}

impl TryFrom<QuotaFields> for Quota {
    type Error = String;
    fn try_from(f: QuotaFields) -> Result<Quota, String> {
        if f.calls.is_none() && f.bandwidth.is_none() {
            return Err("a quota needs `calls`, `bandwidth` or both".into());
        }
        if f.calls == Some(0) {
            return Err("`calls` must be at least 1".into());
        }
        if f.bandwidth == Some(ByteSize(0)) {
            return Err("`bandwidth` must be more than 0".into());
        }
        if f.increment_count == 0 {
            return Err("`increment_count` must be at least 1".into());
        }
        Ok(Quota(f))
    }
}

impl From<Quota> for QuotaFields {
    fn from(q: Quota) -> Self {
        q.0
    }
}

impl std::ops::Deref for Quota {
    type Target = QuotaFields;
    fn deref(&self) -> &QuotaFields {
        &self.0
    }
}

/// `azure-openai-token-limit` and `llm-token-limit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TokenLimitFields", into = "TokenLimitFields")]
pub struct TokenLimit(pub TokenLimitFields);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLimitFields {
    pub counter_key: KeyExpr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_quota_period: Option<CalendarPeriod>,
    #[serde(default)]
    pub estimate_prompt_tokens: bool,
    /// limitlab option (off in APIM-compatible mode): reserve the prompt estimate plus
    /// `max_tokens` when admitting and settle with the real usage afterwards, so
    /// concurrent and streaming requests cannot overshoot `tokens_per_minute`.
    #[serde(default)]
    pub reserve: bool,
    /// The completion allowance reserved when a request gives no `max_tokens`.
    #[serde(default = "default_reserve_max_tokens")]
    pub reserve_default_max_tokens: u64,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_tokens_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_tokens_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_consumed_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_consumed_variable_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_quota_tokens_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_quota_tokens_variable_name: Option<String>,
}

/// What reserve mode sets aside for the completion when a request names no
/// `max_tokens` (configurable per limit as `reserve_default_max_tokens`).
pub const DEFAULT_RESERVE_MAX_TOKENS: u64 = 4096;

fn default_reserve_max_tokens() -> u64 {
    DEFAULT_RESERVE_MAX_TOKENS
}

impl TryFrom<TokenLimitFields> for TokenLimit {
    type Error = String;
    fn try_from(f: TokenLimitFields) -> Result<TokenLimit, String> {
        if f.tokens_per_minute.is_none() && f.token_quota.is_none() {
            return Err("a token limit needs `tokens_per_minute`, `token_quota` or both".into());
        }
        if f.tokens_per_minute == Some(0) {
            return Err("`tokens_per_minute` must be at least 1".into());
        }
        if f.reserve && f.tokens_per_minute.is_none() {
            return Err("`reserve` sets tokens aside within `tokens_per_minute`, which is not set".into());
        }
        match (f.token_quota, f.token_quota_period) {
            (Some(0), _) => Err("`token_quota` must be at least 1".into()),
            (Some(_), None) => {
                Err("`token_quota` needs `token_quota_period` (Hourly, Daily, Weekly, Monthly or Yearly)".into())
            }
            (None, Some(_)) => Err("`token_quota_period` is set but `token_quota` is not".into()),
            _ => Ok(TokenLimit(f)),
        }
    }
}

impl From<TokenLimit> for TokenLimitFields {
    fn from(t: TokenLimit) -> Self {
        t.0
    }
}

impl std::ops::Deref for TokenLimit {
    type Target = TokenLimitFields;
    fn deref(&self) -> &TokenLimitFields {
        &self.0
    }
}
