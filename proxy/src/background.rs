//! Responses the Responses API makes in the background (`"background": true`).
//! Their creation answers at once, queued, with no usage; the tokens are used
//! later, and the client learns of them by retrieving the response
//! (`GET .../responses/{id}`). Retrievals are otherwise free: a stored response
//! or chat completion read again used nothing more. So the proxy remembers the
//! background responses created through it and charges each one's usage to the
//! first answer that shows it finished, once.
//!
//! Each replica remembers its own: a background response retrieved only
//! through another replica, or never retrieved, is not charged.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

/// The most background responses remembered at once; past it the oldest is
/// forgotten (and, if it finishes, never charged), so memory stays bounded.
const MAX_PENDING: usize = 100_000;

#[derive(Default)]
pub struct Background {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    ids: BTreeSet<String>,
    /// In the order they were created, for forgetting the oldest.
    order: VecDeque<String>,
}

impl Background {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a background response created through this replica.
    pub fn remember(&self, id: &str) {
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
    /// true once per response.
    pub fn take(&self, id: &str) -> bool {
        let mut pending = self.lock();
        if !pending.ids.remove(id) {
            return false;
        }
        pending.order.retain(|other| other != id);
        true
    }

    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_taken_once_and_the_oldest_forgotten_past_the_bound() {
        let background = Background::default();
        assert!(!background.take("resp_1"), "never remembered");
        background.remember("resp_1");
        background.remember("resp_1");
        assert_eq!(background.len(), 1);
        assert!(background.take("resp_1"));
        assert!(!background.take("resp_1"), "taken once");
        for i in 0..=MAX_PENDING {
            background.remember(&format!("resp_{i}"));
        }
        assert_eq!(background.len(), MAX_PENDING);
        assert!(!background.take("resp_0"), "the oldest was forgotten");
        assert!(background.take(&format!("resp_{MAX_PENDING}")));
    }
}
