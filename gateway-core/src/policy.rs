//! The policy model: plain serde types that TOML scenarios and configs embed.
//!
//! Every type validates itself while it is deserialized, so a bad value is reported
//! by the TOML reader with the file's line, column and the field's name.

use crate::key::KeyExpr;
use crate::status::StatusPredicate;
use crate::time::{CalendarPeriod, EpochSeconds};
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
    /// Reads a policy from TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum RawLimit {
    RateLimit(RateLimit),
    RateLimitByKey(RateLimit),
    Quota(Quota),
    QuotaByKey(Quota),
    AzureOpenaiTokenLimit(TokenLimit),
    LlmTokenLimit(TokenLimit),
}

impl TryFrom<RawLimit> for Limit {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Limit, String> {
        let limit = match raw {
            RawLimit::RateLimit(r) => Limit::RateLimit(r),
            RawLimit::RateLimitByKey(r) => Limit::RateLimitByKey(r),
            RawLimit::Quota(q) => Limit::Quota(q),
            RawLimit::QuotaByKey(q) => Limit::QuotaByKey(q),
            RawLimit::AzureOpenaiTokenLimit(t) => Limit::AzureOpenAiTokenLimit(t),
            RawLimit::LlmTokenLimit(t) => Limit::LlmTokenLimit(t),
        };
        let element = limit.element();
        let has_key = match &limit {
            Limit::RateLimit(r) | Limit::RateLimitByKey(r) => r.counter_key.is_some(),
            Limit::Quota(q) | Limit::QuotaByKey(q) => q.counter_key.is_some(),
            Limit::AzureOpenAiTokenLimit(_) | Limit::LlmTokenLimit(_) => true,
        };
        let by_key = element.ends_with("-by-key") || element.ends_with("token-limit");
        match (by_key, has_key) {
            (true, false) => Err(format!("{element}: `counter_key` is required")),
            (false, true) => Err(format!(
                "{element}: `counter_key` is not allowed, `{element}` counts per subscription; use `{element}-by-key`"
            )),
            _ => Ok(limit),
        }
    }
}

impl From<Limit> for RawLimit {
    fn from(limit: Limit) -> RawLimit {
        match limit {
            Limit::RateLimit(r) => RawLimit::RateLimit(r),
            Limit::RateLimitByKey(r) => RawLimit::RateLimitByKey(r),
            Limit::Quota(q) => RawLimit::Quota(q),
            Limit::QuotaByKey(q) => RawLimit::QuotaByKey(q),
            Limit::AzureOpenAiTokenLimit(t) => RawLimit::AzureOpenaiTokenLimit(t),
            Limit::LlmTokenLimit(t) => RawLimit::LlmTokenLimit(t),
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
        if self.0 % 1024 == 0 {
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

impl TryFrom<TokenLimitFields> for TokenLimit {
    type Error = String;
    fn try_from(f: TokenLimitFields) -> Result<TokenLimit, String> {
        if f.tokens_per_minute.is_none() && f.token_quota.is_none() {
            return Err("a token limit needs `tokens_per_minute`, `token_quota` or both".into());
        }
        if f.tokens_per_minute == Some(0) {
            return Err("`tokens_per_minute` must be at least 1".into());
        }
        match (f.token_quota, f.token_quota_period) {
            (Some(0), _) => Err("`token_quota` must be at least 1".into()),
            (Some(_), None) => Err("`token_quota` needs `token_quota_period` (Hourly, Daily, Weekly, Monthly or Yearly)".into()),
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
