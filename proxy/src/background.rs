//! Responses the Responses API makes in the background (`"background": true`).
//! Their creation answers at once, queued, with no usage; the tokens are used
//! later, and the client learns of them by retrieving the response
//! (`GET .../responses/{id}`, or cancelling it). Retrievals are otherwise free:
//! a stored response or chat completion read again used nothing more. So the
//! proxy remembers the background responses created through it and charges
//! each one's usage to the first answer that shows it finished, once.
//!
//! A replica remembers its own. With `[counters]`, the fleet remembers them
//! too, in the counter store: one key per response, which the read that charges
//! it deletes (`DEL` answers 1 to one replica only), so a response created
//! through one replica and read through another is charged once. While the
//! store cannot be reached a replica goes by its own memory.

use crate::counters::{CountersConfig, StoreState};
use redis::aio::ConnectionManager;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most background responses remembered at once; past it the oldest is
/// forgotten (and, if it finishes, never charged), so memory stays bounded.
const MAX_PENDING: usize = 100_000;

/// How long the store remembers a pending response: as long as Azure OpenAI
/// keeps a stored response (30 days).
const STORE_TTL_S: u64 = 30 * 24 * 3600;

/// How long one exchange with the store may take before it counts as an
/// error and the replica goes by its own memory.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the replica goes by its own memory after the store failed.
const STORE_PAUSE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Background {
    pending: Mutex<Pending>,
    store: Option<Store>,
}

#[derive(Default)]
struct Pending {
    ids: BTreeSet<String>,
    /// In the order they were created, for forgetting the oldest.
    order: VecDeque<String>,
}

/// The fleet's pending responses in the counter store.
struct Store {
    client: redis::Client,
    prefix: String,
    /// Made on first use; dropped after an error, so the next use reconnects.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// After an error the store is left alone until then, so that reads do not
    /// each wait out a store that is away.
    retry_at: Mutex<Option<Instant>>,
}

impl Background {
    /// Remembers in the counter store as well, when there is one.
    pub fn new(counters: Option<&CountersConfig>) -> Result<Background, String> {
        let Some(counters) = counters else { return Ok(Background::default()) };
        let client = redis::Client::open(counters.url()?).map_err(|e| format!("`counters.store`: {e}"))?;
        let prefix = format!("{}:background:", counters.key_prefix);
        let store = Store { client, prefix, connection: Default::default(), retry_at: Default::default() };
        Ok(Background { pending: Default::default(), store: Some(store) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a background response created through this replica, here and in
    /// the store (before its creation is answered, so that no read can come
    /// first).
    pub async fn remember(&self, state: &StoreState, id: &str) {
        self.remember_here(id);
        let Some(store) = &self.store else { return };
        let key = format!("{}{id}", store.prefix);
        let set = redis::cmd("SET").arg(&key).arg(1).arg("EX").arg(STORE_TTL_S).clone();
        let _: Option<()> = store.exchange(state, set).await;
    }

    fn remember_here(&self, id: &str) {
        let mut pending = self.lock();
        if !pending.ids.insert(id.to_owned()) {
            return;
        }
        pending.order.push_back(id.to_owned());
        while pending.ids.len() > MAX_PENDING {
            let Some(oldest) = pending.order.pop_front() else { break };
            pending.ids.remove(&oldest);
        }
    }

    /// Whether `id` was a pending background response, which it no longer is:
    /// true once per response, in the fleet when the store answers.
    pub async fn take(&self, state: &StoreState, id: &str) -> bool {
        let here = self.take_here(id);
        let Some(store) = &self.store else { return here };
        let del = redis::cmd("DEL").arg(format!("{}{id}", store.prefix)).clone();
        match store.exchange::<u64>(state, del).await {
            Some(deleted) => deleted == 1,
            None => here,
        }
    }

    fn take_here(&self, id: &str) -> bool {
        let mut pending = self.lock();
        if !pending.ids.remove(id) {
            return false;
        }
        pending.order.retain(|other| other != id);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().ids.len()
    }
}

impl Store {
    /// Runs `command`; `None` (counted as a store error, and logged) if the
    /// store does not answer in time or answers an error, and without trying
    /// for [`STORE_PAUSE`] after that.
    async fn exchange<V: redis::FromRedisValue>(&self, state: &StoreState, command: redis::Cmd) -> Option<V> {
        let retry_at = *self.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        if retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let run = async {
            let mut connection = self.connection().await?;
            command.query_async::<V>(&mut connection).await
        };
        let error = match tokio::time::timeout(STORE_TIMEOUT, run).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        state.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "counters: background responses: the store cannot be reached; going by this replica's own");
        *self.connection.lock().await = None;
        *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + STORE_PAUSE);
        None
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut connection = self.connection.lock().await;
        if let Some(connection) = &*connection {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(STORE_TIMEOUT / 2))
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_number_of_retries(1);
        let fresh = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        *connection = Some(fresh.clone());
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_taken_once_and_the_oldest_forgotten_past_the_bound() {
        let background = Background::default();
        assert!(!background.take_here("resp_1"), "never remembered");
        background.remember_here("resp_1");
        background.remember_here("resp_1");
        assert_eq!(background.len(), 1);
        assert!(background.take_here("resp_1"));
        assert!(!background.take_here("resp_1"), "taken once");
        for i in 0..=MAX_PENDING {
            background.remember_here(&format!("resp_{i}"));
        }
        assert_eq!(background.len(), MAX_PENDING);
        assert!(!background.take_here("resp_0"), "the oldest was forgotten");
        assert!(background.take_here(&format!("resp_{MAX_PENDING}")));
    }
}
