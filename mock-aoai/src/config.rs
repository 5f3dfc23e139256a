//! The mock's configuration: deployments with their limits, latency, completion
//! lengths and fault schedules. Read from TOML; every value is checked while it is
//! read, so an error names the file, line, column and field.

use crate::dist::{Dist, LogNormal};
use gateway_core::time::HumanDuration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Seeds every deployment's RNG stream.
    #[serde(default)]
    pub seed: u64,
    /// Accepted `api-key` values (or `Authorization: Bearer` tokens); empty: no auth.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// The instant (milliseconds since the Unix epoch) fault schedules count
    /// from; default: when the mock starts. `limitlab load --local` sets it to
    /// the run's start, so that an outage comes when the scenario says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_unix_ms: Option<u64>,
    pub deployments: Vec<DeploymentConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub name: String,
    /// The model name reported in responses; it also picks the tokenizer.
    pub model: String,
    /// Tokens per minute.
    pub tpm: u64,
    /// Requests per minute; Azure's default is 6 per 1,000 TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Provisioned (PTU) deployment: 429 by utilisation instead of TPM/RPM quotas.
    #[serde(default)]
    pub provisioned: bool,
    /// The completion allowance counted for admission when a request has no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Completion lengths in tokens (then capped by `max_tokens`).
    #[serde(default = "default_completion_tokens")]
    pub completion_tokens: Dist,
    #[serde(default)]
    pub latency: Latency,
    #[serde(default)]
    pub faults: Faults,
    /// Embedding vector length; by default the model's (3,072 for
    /// text-embedding-3-large, 1,536 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_dimensions: Option<usize>,
}

fn default_max_tokens() -> u64 {
    4096
}

fn default_completion_tokens() -> Dist {
    Dist::LogNormal(LogNormal::new(150.0, 800.0).expect("a valid lognormal"))
}

impl DeploymentConfig {
    /// What serde cannot check; the mock's config and the simulator's scenarios
    /// both call it.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("`name` is empty".into());
        }
        if self.tpm == 0 || self.rpm == Some(0) {
            return Err("`tpm` and `rpm` must be at least 1".into());
        }
        self.faults.validate()
    }

    /// RPM as configured, or Azure's default ratio: 6 RPM per 1,000 TPM.
    pub fn rpm(&self) -> u64 {
        self.rpm.unwrap_or(self.tpm.saturating_mul(6) / 1000)
    }

    /// Requests allowed per 10-second window: `rpm / 6`, at least one.
    pub fn requests_per_10s(&self) -> u64 {
        (self.rpm() / 6).max(1)
    }

    pub fn embedding_dimensions(&self) -> usize {
        self.embedding_dimensions.unwrap_or(if self.model.contains("3-large") { 3072 } else { 1536 })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Time to first token, milliseconds.
    pub ttft_ms: Dist,
    /// Time per output token after the first, milliseconds.
    pub per_token_ms: Dist,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            ttft_ms: Dist::LogNormal(LogNormal::new(400.0, 2000.0).expect("a valid lognormal")),
            per_token_ms: Dist::Fixed(20.0),
        }
    }
}

impl Latency {
    pub fn zero() -> Latency {
        Latency { ttft_ms: Dist::Fixed(0.0), per_token_ms: Dist::Fixed(0.0) }
    }
}

/// A probability, 0 to 1, checked when read.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Probability(pub f64);

impl TryFrom<f64> for Probability {
    type Error = String;
    fn try_from(p: f64) -> Result<Probability, String> {
        match (0.0..=1.0).contains(&p) {
            true => Ok(Probability(p)),
            false => Err(format!("a probability is between 0 and 1, got {p}")),
        }
    }
}

impl From<Probability> for f64 {
    fn from(p: Probability) -> f64 {
        p.0
    }
}

/// Faults of one deployment. Schedules count from the model's start (simulated
/// time in the simulator, wall time since start in the server).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Probability of each 5xx status per admitted request: `{ "500" = 0.01, "503" = 0.02 }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_rates: BTreeMap<ErrorStatus, Probability>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outages: Vec<Outage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_spikes: Vec<LatencySpike>,
    /// Probability that a streamed response breaks midway.
    #[serde(default)]
    pub broken_stream: Probability,
    /// Probability that the connection is reset before a response.
    #[serde(default)]
    pub connection_reset: Probability,
}

impl Faults {
    /// What serde cannot check, for a config file and a run-time change alike.
    pub fn validate(&self) -> Result<(), String> {
        for (i, o) in self.outages.iter().enumerate() {
            if o.end <= o.start {
                let (end, start) = (o.end.0.as_secs_f64(), o.start.0.as_secs_f64());
                return Err(format!("`outages[{i}]`: it ends ({end} s) no later than it starts ({start} s)"));
            }
            if !(400..=599).contains(&o.status) {
                return Err(format!("`outages[{i}]`: `status` {} is not 400 to 599", o.status));
            }
        }
        let total: f64 = self.error_rates.values().map(|p| p.0).sum();
        if total > 1.0 {
            return Err(format!("`error_rates` add up to {total}, above 1"));
        }
        Ok(())
    }
}

/// A 5xx status the mock can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ErrorStatus(pub u16);

impl TryFrom<String> for ErrorStatus {
    type Error = String;
    fn try_from(s: String) -> Result<ErrorStatus, String> {
        match s.parse::<u16>() {
            Ok(code @ (500 | 502 | 503 | 504)) => Ok(ErrorStatus(code)),
            _ => Err(format!("`{s}` is not an injectable status; use \"500\", \"502\", \"503\" or \"504\"")),
        }
    }
}

impl From<ErrorStatus> for String {
    fn from(s: ErrorStatus) -> String {
        s.0.to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutageMode {
    /// Every request gets `status`.
    Fail,
    /// Every request hangs: no response until the client gives up.
    Hang,
    /// Every connection is refused, as when the deployment's process is down: a
    /// transport failure at once, with no response at all. (The mock server,
    /// which still listens, closes each connection without an answer.)
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub start: HumanDuration,
    pub end: HumanDuration,
    #[serde(default = "fail")]
    pub mode: OutageMode,
    #[serde(default = "unavailable")]
    pub status: u16,
}

fn fail() -> OutageMode {
    OutageMode::Fail
}

fn unavailable() -> u16 {
    503
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpike {
    pub start: HumanDuration,
    pub end: HumanDuration,
    /// Added to the time to first token of requests that arrive in the window.
    pub extra_ms: f64,
}

impl MockConfig {
    /// Reads a config; `path` is only used in error messages.
    pub fn from_toml(path: &str, text: &str) -> Result<MockConfig, String> {
        let config: MockConfig = toml::from_str(text).map_err(|e| diagnostics::describe_toml_error(path, text, &e))?;
        config.validate().map_err(|e| format!("{path}: {e}"))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.deployments.is_empty() {
            return Err("`deployments`: configure at least one deployment".into());
        }
        for (i, d) in self.deployments.iter().enumerate() {
            if self.deployments[..i].iter().any(|e| e.name == d.name) {
                return Err(format!("deployments[{i}]: the name `{}` is used twice", d.name));
            }
            d.validate().map_err(|e| format!("deployments[{i}] (`{}`): {e}", d.name))?;
        }
        Ok(())
    }

    /// The built-in example: two deployments, `gpt-4o` and `gpt-35-turbo`.
    pub fn example() -> MockConfig {
        MockConfig::from_toml("built-in example", EXAMPLE).expect("the built-in example is valid")
    }
}

pub const EXAMPLE: &str = include_str!("../../mocks/example.toml");
