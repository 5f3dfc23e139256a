//! `[counters]`: replicas that share their counters through Redis (or Valkey).
//!
//! Lagged mode is the simulator's `counters = "shared"` with `sync_lag`: each
//! replica decides with its own counters, journals its changes (the core's
//! `poll_delta`), and every `sync_interval` ships them to one Redis stream per
//! product and applies the other replicas' changes from it (`handle_delta`).
//! Changes that cannot be shipped (Redis down) wait in a backlog and go when
//! Redis is back. The core's rules stay in the core: Redis only carries changes.

use gateway_core::time::HumanDuration;
use gateway_core::{CounterDelta, Nanos};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersConfig {
    /// `redis://HOST:PORT/DB`, or `rediss://` for TLS.
    pub store: String,
    pub mode: Mode,
    /// How often a lagged replica ships its changes and applies the others'; in
    /// exact mode, how often an idle replica catches up and how long it counts
    /// locally after the store failed before trying it again.
    #[serde(default = "default_interval")]
    pub sync_interval: HumanDuration,
    /// What a replica does while the store cannot be reached: decide on its own
    /// counters (`local`), or answer 503 (`reject`).
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The environment variable holding the store's password, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Prefix of the store's keys, so that fleets can share one Redis.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Nanos::from_secs(1))
}

fn default_prefix() -> String {
    "limitlab".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every counter-changing call made against the shared counters, in one
    /// order all replicas replay: the simulator's `counters = "shared"`.
    Exact,
    /// Local decisions, changes exchanged every `sync_interval`.
    Lagged,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    #[default]
    Local,
    Reject,
}

impl CountersConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.store.starts_with("redis://") || self.store.starts_with("rediss://")) {
            return Err(format!("`counters.store`: `{}` is not a redis:// or rediss:// URL", self.store));
        }
        if self.sync_interval.0 < Nanos::from_millis(10) {
            return Err("`counters.sync_interval` must be at least 10ms".into());
        }
        Ok(())
    }

    /// The store's URL with the password from its variable, if one is named.
    pub fn url(&self) -> Result<String, String> {
        let Some(var) = &self.password_env else { return Ok(self.store.clone()) };
        let password = std::env::var(var)
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("`counters.password_env`: environment variable `{var}` is not set or empty"))?;
        let (scheme, rest) = self.store.split_once("://").expect("validated");
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        Ok(format!("{scheme}://:{encoded}@{rest}"))
    }
}

/// What a lagged replica knows of its store, for `/metrics` and for refusals.
#[derive(Default)]
pub struct StoreState {
    /// Whether the last exchange with the store worked.
    pub reachable: AtomicBool,
    pub errors: AtomicU64,
    pub shipped: AtomicU64,
    pub applied: AtomicU64,
    /// Changes made here that wait to be shipped.
    pub backlog: AtomicU64,
    /// Changes dropped from a full backlog while the store was away.
    pub dropped: AtomicU64,
    /// Exact mode: calls made on local counters while the store was away.
    pub local_calls: AtomicU64,
    /// Exact mode: times this replica took a product's lock.
    pub acquisitions: AtomicU64,
    /// Round trips of sync exchanges, the lag observed on applied changes, and
    /// exact mode's waits for changes to be shipped.
    pub timings: Mutex<Timings>,
}

pub struct Timings {
    pub round_trip_s: hdrhistogram::Histogram<u64>,
    pub lag_s: hdrhistogram::Histogram<u64>,
    /// Exact mode: how long each answer waited for its request's changes to
    /// be in the store (microseconds, as the others).
    pub wait_s: hdrhistogram::Histogram<u64>,
}

impl Default for Timings {
    fn default() -> Timings {
        let histogram = || hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Timings { round_trip_s: histogram(), lag_s: histogram(), wait_s: histogram() }
    }
}

/// The most changes a product keeps for the store while it cannot be reached
/// (about 100 MB): beyond that the oldest are dropped, and counted.
pub const MAX_BACKLOG: usize = 1_000_000;

/// One product's stream of changes in the store, and where this replica has
/// read it up to.
pub struct Stream {
    pub key: String,
    pub last_id: String,
    /// Changes made here, not yet shipped.
    pub backlog: VecDeque<CounterDelta>,
}

/// One stream entry: a batch of changes one replica made, in order. The
/// replica's name is also the entry's field `r`, so a replica skips its own
/// entries without parsing them; the batch is the field `e`, as JSON.
#[derive(Serialize, Deserialize)]
pub struct Batch {
    pub replica: String,
    /// Exact mode: the replica's sequence number of the first change (the
    /// others follow on), so that a change shipped twice (its answer lost) is
    /// applied once. Lagged replicas ship none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    pub changes: Vec<CounterDelta>,
}

/// A [`Batch`] as written, borrowing its changes.
#[derive(Serialize)]
pub struct BatchOut<'a> {
    pub replica: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    pub changes: &'a [CounterDelta],
}

/// The most changes one stream entry carries (about 1.5 MB of JSON).
pub const BATCH_CHANGES: usize = 10_000;

/// Reads a stream entry's batch; `None` (with a warning) for one that limitlab
/// did not write. Entries of `own` replica are not parsed.
pub fn read_batch(stream: &str, own: &str, item: &redis::streams::StreamId) -> Option<Batch> {
    let replica: Option<String> = item.get("r");
    if replica.as_deref() == Some(own) {
        return None;
    }
    let text: Option<String> = item.get("e");
    let batch = text.as_deref().and_then(|t| serde_json::from_str::<Batch>(t).ok());
    if batch.is_none() {
        tracing::warn!(%stream, id = %item.id, "counters: a change the store holds is not one limitlab wrote; skipped");
    }
    batch
}

/// This process's name in the fleet: host, process id and start time.
pub(crate) fn replica_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{}-{:x}", hostname(), std::process::id(), nanos & 0xffff_ffff)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into())
}
