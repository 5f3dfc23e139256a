//! Scenario files: traffic, the gateway's policy and routing, and the backends.

use apim_policy::PolicySource;
use gateway_core::routing::Routing;
use gateway_core::time::{parse_rfc3339, HumanDuration};
use gateway_core::{Nanos, Policy};
use mock_aoai::wire::MAX_CHOICES;
use mock_aoai::{DeploymentConfig, Dist};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339; calendar-aligned quotas depend on it.
    pub start: String,
    pub duration: HumanDuration,
    #[serde(default)]
    pub seed: u64,
    pub gateway: GatewayConfig,
    pub backends: Vec<DeploymentConfig>,
    pub clients: Vec<Client>,
    /// Promises `limitlab check` tests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect: Vec<Expect>,
    /// How far `limitlab check` may perturb the scenario.
    #[serde(default)]
    pub check: CheckBounds,
    /// Elements of a policy file that limitlab does not model, with their lines.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Inline native TOML, or a policy file: `policy = "../policies/seed-ip-limits.xml"`.
    #[serde(default)]
    pub policy: PolicySource,
    /// APIM named values for `{{name}}` in a policy file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub named_values: BTreeMap<String, String>,
    pub routing: Routing,
    /// Gateway replicas; requests are spread over them round-robin.
    #[serde(default = "one")]
    pub replicas: usize,
    #[serde(default)]
    pub counters: CounterSharing,
    /// With `counters = "shared"`: how late each replica hears of the others'
    /// counting (a store synchronised asynchronously). Absent: one exact counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_lag: Option<HumanDuration>,
}

impl GatewayConfig {
    /// Each replica keeps its own counters (local, or shared with lag).
    pub fn replicas_count_alone(&self) -> bool {
        self.counters == CounterSharing::Local || self.sync_lag.is_some()
    }
}

fn one() -> usize {
    1
}

/// How replicas count: alone (in-memory gateways) or in one shared store (exact,
/// or with `sync_lag`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterSharing {
    Local,
    #[default]
    Shared,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub name: String,
    /// Distinct callers; each has its own identity.
    #[serde(default = "one")]
    pub callers: usize,
    #[serde(default)]
    pub identity: Identity,
    /// One address for all callers (an office behind NAT); else one per caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub arrival: Arrival,
    #[serde(default = "default_prompt")]
    pub prompt_tokens: Dist,
    #[serde(default = "default_completion")]
    pub completion_tokens: Dist,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Completions each call asks for (the API's `n`, 1 to 128), each as long as
    /// the completion length drawn; absent, the request names none (one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// Share of requests sent with `"stream": true`.
    #[serde(default)]
    pub stream_share: f64,
    #[serde(default)]
    pub retries: SdkRetries,
}

fn default_prompt() -> Dist {
    Dist::Fixed(200.0)
}

fn default_completion() -> Dist {
    Dist::Fixed(100.0)
}

/// What identifies a caller to the gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Identity {
    /// `10.<client>.<caller>` style addresses.
    #[default]
    Ip,
    /// A subscription key per caller, used under this product.
    Subscription { product: String },
    /// A header with a value per caller.
    Header { name: String },
    /// A JWT in `Authorization: Bearer` whose subject is per caller.
    Jwt,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Evenly spaced, `rate_per_s` over all callers.
    Constant { rate_per_s: f64 },
    /// Poisson arrivals at `rate_per_s` over all callers.
    Poisson { rate_per_s: f64 },
    /// Poisson at `rate_per_s` during `on`, silent during `off`, repeating.
    Bursts { rate_per_s: f64, on: HumanDuration, off: HumanDuration },
    /// Poisson arrivals whose rate goes linearly from `from_per_s` at the start to
    /// `to_per_s` at the end.
    Ramp { from_per_s: f64, to_per_s: f64 },
    /// Poisson arrivals following a daily curve (UTC): `peak_per_s` at `peak_hour`,
    /// `trough_per_s` twelve hours away, a cosine in between.
    Daily { peak_per_s: f64, trough_per_s: f64, peak_hour: f64 },
    /// A JSONL or CSV trace (by extension), relative to the scenario file.
    Trace { path: PathBuf },
}

/// The client SDK's own retries, by default like the `openai` SDKs: 2 retries,
/// honour `retry-after-ms` then `retry-after` up to 60 s, else exponential backoff
/// from 0.5 s with jitter, capped at 8 s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdkRetries {
    #[serde(default = "two")]
    pub max_retries: u32,
}

fn two() -> u32 {
    2
}

impl Default for SdkRetries {
    fn default() -> SdkRetries {
        SdkRetries { max_retries: 2 }
    }
}

impl GatewayConfig {
    /// The policy, read from its file when the scenario named one.
    pub fn policy(&self) -> &Policy {
        match &self.policy {
            PolicySource::Inline(p) => p,
            PolicySource::File(_) => unreachable!("policy files are read when the scenario is loaded"),
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Scenario::from_toml(&path.display().to_string(), &text)
    }

    pub fn from_toml(path: &str, text: &str) -> Result<Scenario, String> {
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|e| diagnostics::describe_toml_error(path, text, &e))?;
        let base = Path::new(path).parent().unwrap_or(Path::new("."));
        let gateway = &mut scenario.gateway;
        let (policy, warnings) = gateway.policy.resolve(base, &gateway.named_values, &mut gateway.routing)?;
        gateway.policy = PolicySource::Inline(policy);
        scenario.warnings = warnings;
        scenario.validate().map_err(|e| format!("{path}: {e}"))?;
        scenario.check_traces(base)?;
        Ok(scenario)
    }

    /// Reads each trace now, so that a bad one is an error before any run.
    fn check_traces(&mut self, base: &Path) -> Result<(), String> {
        let end_ms = self.duration.0 .0 / 1_000_000;
        for c in &self.clients {
            let Arrival::Trace { path } = &c.arrival else { continue };
            let path = base.join(path);
            let lines = crate::trace::load(&path)?;
            self.warnings.extend(crate::trace::check(&path, &lines, end_ms)?);
        }
        Ok(())
    }

    /// The calls the clients are expected to make (SDK retries aside; a trace
    /// counts as nothing here, its lines being already in memory).
    pub fn expected_requests(&self) -> f64 {
        let secs = self.duration.0.as_secs_f64();
        let rate = |c: &Client| match &c.arrival {
            Arrival::Constant { rate_per_s } | Arrival::Poisson { rate_per_s } | Arrival::Bursts { rate_per_s, .. } => {
                *rate_per_s
            }
            Arrival::Ramp { from_per_s, to_per_s } => (from_per_s + to_per_s) / 2.0,
            Arrival::Daily { peak_per_s, trough_per_s, .. } => (peak_per_s + trough_per_s) / 2.0,
            Arrival::Trace { .. } => 0.0,
        };
        self.clients.iter().map(|c| rate(c) * secs).sum()
    }

    /// Refuses a run expected to make more than [`REQUEST_BOUND`] calls, with
    /// its rates multiplied by `rate_scale` (`check` perturbs them), unless
    /// `allow_large`: its time and the memory of its calls in flight grow with it.
    pub fn check_size(&self, rate_scale: f64, allow_large: AllowLarge) -> Result<(), String> {
        let expected = self.expected_requests() * rate_scale;
        if expected <= REQUEST_BOUND || allow_large == AllowLarge::Yes {
            return Ok(());
        }
        Err(format!(
            "the scenario would make about {expected:.3e} calls{}, more than the {REQUEST_BOUND:.0e} a run makes \
             without --allow-large (time, and memory for every call in flight, grow with it); shorten it or lower \
             its rates, or pass --allow-large",
            if rate_scale == 1.0 { String::new() } else { format!(" with rates x {rate_scale}") }
        ))
    }

    pub fn start_nanos(&self) -> Nanos {
        parse_rfc3339(&self.start).expect("validated")
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let start = parse_rfc3339(&self.start).map_err(|e| format!("`start`: {e}"))?;
        if self.duration.0 == Nanos::ZERO {
            return Err("`duration`: 0s simulates nothing; give the traffic some time, e.g. \"10m\"".into());
        }
        if start.0.checked_add(self.duration.0 .0).is_none() {
            return Err(format!(
                "`start` plus `duration` ends after {}, the last instant the simulated clock can represent",
                gateway_core::time::LAST_INSTANT
            ));
        }
        self.gateway.routing.validate().map_err(|e| format!("`gateway.routing`: {e}"))?;
        for b in &self.gateway.routing.backends {
            if !self.backends.iter().any(|d| d.name == b.id) {
                let names: Vec<&str> = self.backends.iter().map(|d| d.name.as_str()).collect();
                return Err(format!(
                    "`gateway.routing` backend `{}` has no `[[backends]]` entry named so; backends: {}",
                    b.id,
                    names.join(", ")
                ));
            }
        }
        for (i, d) in self.backends.iter().enumerate() {
            d.validate().map_err(|e| format!("backends[{i}] (`{}`): {e}", d.name))?;
        }
        if self.gateway.replicas == 0 {
            return Err("`gateway.replicas` must be at least 1".into());
        }
        if self.gateway.sync_lag.is_some() && self.gateway.counters == CounterSharing::Local {
            return Err("`gateway.sync_lag` is the lag of a shared store: set `counters = \"shared\"` with it".into());
        }
        self.caller_address_bases()?;
        for (i, c) in self.clients.iter().enumerate() {
            if c.callers == 0 || !(0.0..=1.0).contains(&c.stream_share) {
                return Err(format!("clients[{i}] (`{}`): need `callers` >= 1 and `stream_share` 0 to 1", c.name));
            }
            if c.max_tokens == Some(0) {
                return Err(format!(
                    "clients[{i}] (`{}`): `max_tokens = 0` asks for no completion at all (Azure answers 400)",
                    c.name
                ));
            }
            if c.n.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
                let name = &c.name;
                return Err(format!(
                    "clients[{i}] (`{name}`): `n` must be from 1 to {MAX_CHOICES} (Azure answers 400)"
                ));
            }
            if let Some(ip) = c.ip.as_deref().filter(|ip| ip.parse::<std::net::IpAddr>().is_err()) {
                return Err(format!("clients[{i}] (`{}`): `ip`: `{ip}` is not an IP address", c.name));
            }
            let rates = match &c.arrival {
                Arrival::Constant { rate_per_s } | Arrival::Poisson { rate_per_s } => vec![*rate_per_s],
                Arrival::Bursts { rate_per_s, .. } => vec![*rate_per_s],
                Arrival::Ramp { from_per_s, to_per_s } => vec![from_per_s.max(*to_per_s)],
                Arrival::Daily { peak_per_s, trough_per_s, .. } if trough_per_s <= peak_per_s => vec![*peak_per_s],
                Arrival::Daily { .. } => vec![-1.0],
                Arrival::Trace { .. } => vec![],
            };
            if rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
                return Err(format!(
                    "clients[{i}] (`{}`): arrival rates must be above 0 (`rate_per_s`; the larger of a ramp's; \
                     a daily curve's `peak_per_s`, at least its `trough_per_s`)",
                    c.name
                ));
            }
        }
        Ok(())
    }
}

/// The most calls a run makes without `--allow-large`: about six minutes of
/// simulation on one core.
pub const REQUEST_BOUND: f64 = 5e8;

/// Whether a run may exceed [`REQUEST_BOUND`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowLarge {
    Yes,
    No,
}

/// Addresses in a block of the caller address plan: a /16.
const ADDRESS_BLOCK: usize = 1 << 16;

impl Scenario {
    /// Where each client's caller addresses start in 10.0.0.0/8: every client
    /// takes whole /16 blocks, enough for its callers, in order. So caller k of a
    /// client of at most 65,536 callers is `10.{client}.{k / 256}.{k % 256}`, and
    /// no two callers of a scenario ever share an address; a scenario that needs
    /// more than the 16,777,216 addresses of 10.0.0.0/8 is refused.
    pub fn caller_address_bases(&self) -> Result<Vec<u32>, String> {
        let mut bases = Vec::with_capacity(self.clients.len());
        let mut next = 0usize;
        for c in &self.clients {
            bases.push(next as u32);
            next = next.saturating_add(c.callers.max(1).div_ceil(ADDRESS_BLOCK).saturating_mul(ADDRESS_BLOCK));
        }
        if next > 256 * ADDRESS_BLOCK {
            let blocks = next / ADDRESS_BLOCK;
            return Err(format!(
                "`clients`: the callers need {blocks} blocks of 65,536 addresses (each client takes whole blocks), \
                 but 10.0.0.0/8 has 256: with more, callers would share addresses and per-IP limits would merge \
                 them. Use fewer callers or clients, or `identity = \"subscription\"`"
            ));
        }
        Ok(bases)
    }
}

/// A promise: a report figure stays within bounds in every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Sugar for `figure = "client.NAME.rejected_ratio"`, `at_most = 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub never_rejected: Option<String>,
    /// A figure as `limitlab sweep` names them: `rejected_ratio`,
    /// `client.batch.rejected_ratio`, `client.chat.latency_ms_p99`,
    /// `backend.primary.throttled_ratio`, or `max_key_tokens_per_minute` (the
    /// most tokens any caller key, subscription or IP, used in a sliding minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_most: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<f64>,
}

impl Expect {
    pub(crate) fn figure(&self) -> String {
        match (&self.never_rejected, &self.figure) {
            (Some(client), _) => format!("client.{client}.rejected_ratio"),
            (None, Some(f)) => f.replace("latency_p99_ms", "latency_ms_p99"),
            (None, None) => String::new(),
        }
    }

    pub(crate) fn bounds(&self) -> (f64, f64) {
        match &self.never_rejected {
            Some(_) => (f64::NEG_INFINITY, 0.0),
            None => (self.at_least.unwrap_or(f64::NEG_INFINITY), self.at_most.unwrap_or(f64::INFINITY)),
        }
    }

    pub fn describe(&self) -> String {
        match (&self.never_rejected, self.at_least, self.at_most) {
            (Some(c), _, _) => format!("client `{c}` is never rejected"),
            (None, Some(l), Some(h)) => format!("{} within [{l}, {h}]", self.figure()),
            (None, Some(l), None) => format!("{} >= {l}", self.figure()),
            (None, None, Some(h)) => format!("{} <= {h}", self.figure()),
            (None, None, None) => self.figure(),
        }
    }
}

/// How far `limitlab check` may move the scenario: factors on every client's arrival
/// rates and token sizes, each a `[low, high]` range (`[1, 1]`: unchanged).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBounds {
    #[serde(default = "unit")]
    pub rate_scale: [f64; 2],
    #[serde(default = "unit")]
    pub token_scale: [f64; 2],
    /// Burstiness b >= 1: a client's arrivals come in bursts b times as dense,
    /// on for 1/b of each minute, at the same average rate (1: as written).
    #[serde(default = "unit")]
    pub burstiness: [f64; 2],
    /// Seconds added to every backend's outage and latency-spike windows.
    #[serde(default)]
    pub fault_shift_s: [i64; 2],
}

fn unit() -> [f64; 2] {
    [1.0, 1.0]
}

impl Default for CheckBounds {
    fn default() -> CheckBounds {
        CheckBounds { rate_scale: unit(), token_scale: unit(), burstiness: unit(), fault_shift_s: [0, 0] }
    }
}
