//! The Responses API's stored responses: what `GET .../responses/{id}` reads,
//! what `previous_response_id` continues, and where a background response
//! (`"background": true`) is found when it is done.
//!
//! A response is stored unless its request says `"store": false`. It is in
//! progress until the latency model says its last token is out, and then
//! completed (or incomplete), as a retrieval shows it. The store keeps the
//! newest [`MAX_STORED`] responses; older ones are forgotten, as if they had
//! expired (the service keeps them 30 days).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// The most responses kept at once, so that a long load test's memory stays bounded.
pub const MAX_STORED: usize = 10_000;

/// How a Responses API request asks to be kept: the response it continues,
/// whether it is stored, and whether it runs in the background.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keeping {
    pub previous: Option<String>,
    pub store: bool,
    pub background: bool,
}

impl Default for Keeping {
    fn default() -> Keeping {
        Keeping { previous: None, store: true, background: false }
    }
}

/// Reads a Responses API request's `previous_response_id`, `store` and
/// `background`; the error names the field.
pub fn read(obj: &Map<String, Value>, stream: bool) -> Result<Keeping, String> {
    let flag = |field: &str, default: bool| match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("`{field}` must be a boolean")),
    };
    let previous = match obj.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(_) => return Err("`previous_response_id` must be the id of a stored response".into()),
    };
    let keeping = Keeping { previous, store: flag("store", true)?, background: flag("background", false)? };
    match keeping {
        Keeping { background: true, store: false, .. } => {
            Err("`background` needs `store`: a background response is read back from the store".into())
        }
        Keeping { background: true, .. } if stream => {
            Err("the mock does not stream background responses: set `stream` to false, then retrieve the response"
                .into())
        }
        keeping => Ok(keeping),
    }
}

/// One stored response.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The response as it is once done.
    pub body: Value,
    /// Its input and output tokens: what a response that continues it carries over.
    pub tokens: u64,
    pub done_at: Instant,
    pub background: bool,
    pub cancelled: bool,
}

impl Stored {
    /// The response as a retrieval at `now` shows it: in progress (queued at
    /// first, in the background) until done, with no output and no usage yet.
    pub fn view(&self, now: Instant) -> Value {
        let status = match (self.cancelled, now >= self.done_at) {
            (true, _) => "cancelled",
            (false, true) => return self.body.clone(),
            (false, false) => "in_progress",
        };
        self.pending(status)
    }

    /// The response with `status`, before any output.
    pub fn pending(&self, status: &str) -> Value {
        let mut body = self.body.clone();
        body["status"] = json!(status);
        body["output"] = json!([]);
        body["usage"] = Value::Null;
        body["incomplete_details"] = Value::Null;
        body
    }
}

/// The stored responses, by id, and the order they came in.
#[derive(Default)]
pub struct Store {
    responses: BTreeMap<String, Stored>,
    order: VecDeque<String>,
}

impl Store {
    pub fn insert(&mut self, id: String, stored: Stored) {
        if self.responses.insert(id.clone(), stored).is_none() {
            self.order.push_back(id);
        }
        while self.responses.len() > MAX_STORED {
            let Some(oldest) = self.order.pop_front() else { break };
            self.responses.remove(&oldest);
        }
    }

    pub fn get(&self, id: &str) -> Option<&Stored> {
        self.responses.get(id)
    }

    /// Deletes a response; whether there was one.
    pub fn remove(&mut self, id: &str) -> bool {
        let removed = self.responses.remove(id).is_some();
        if removed {
            self.order.retain(|kept| kept != id);
        }
        removed
    }

    /// Cancels a background response still running at `now` (one already done
    /// stays as it is); the error is the service's, for a response not made in
    /// the background. `None` if there is no such response.
    pub fn cancel(&mut self, id: &str, now: Instant) -> Option<Result<Value, String>> {
        let stored = self.responses.get_mut(id)?;
        if !stored.background {
            return Some(Err("Only responses created with background=true can be cancelled.".into()));
        }
        if now < stored.done_at {
            stored.cancelled = true;
        }
        Some(Ok(stored.view(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stored(done_at: Instant, background: bool) -> Stored {
        let body = json!({ "id": "resp_1", "status": "completed", "output": [1], "usage": { "output_tokens": 3 } });
        Stored { body, tokens: 10, done_at, background, cancelled: false }
    }

    #[test]
    fn a_response_is_in_progress_until_done_and_a_cancelled_one_stays_cancelled() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let running = stored(later, true);
        assert_eq!(
            (running.view(now)["status"].clone(), running.view(now)["usage"].clone()),
            (json!("in_progress"), Value::Null)
        );
        assert_eq!(running.view(later)["status"], "completed");
        let mut store = Store::default();
        store.insert("resp_1".into(), running);
        assert_eq!(store.cancel("resp_1", now).unwrap().unwrap()["status"], "cancelled");
        assert_eq!(store.get("resp_1").unwrap().view(later)["status"], "cancelled");
        store.insert("resp_2".into(), stored(now, false));
        assert!(store.cancel("resp_2", now).unwrap().is_err(), "only background responses are cancelled");
        assert!(store.cancel("resp_3", now).is_none());
    }

    #[test]
    fn the_store_forgets_the_oldest_past_its_bound() {
        let mut store = Store::default();
        for i in 0..=MAX_STORED {
            store.insert(format!("resp_{i}"), stored(Instant::now(), false));
        }
        assert!(store.get("resp_0").is_none() && store.get("resp_1").is_some());
        assert!(store.remove("resp_1") && !store.remove("resp_1"));
        assert_eq!(store.responses.len(), store.order.len());
    }

    #[test]
    fn requests_say_how_they_are_kept() {
        let read = |body: Value, stream: bool| read(body.as_object().unwrap(), stream);
        assert_eq!(read(json!({}), false), Ok(Keeping::default()));
        let chained = Keeping { previous: Some("resp_9".into()), store: false, background: false };
        assert_eq!(read(json!({ "previous_response_id": "resp_9", "store": false }), false), Ok(chained));
        for (body, stream, error) in [
            (json!({ "background": true, "store": false }), false, "`background` needs `store`"),
            (json!({ "background": true }), true, "the mock does not stream background responses"),
            (json!({ "store": "yes" }), false, "`store` must be a boolean"),
            (json!({ "previous_response_id": 7 }), false, "`previous_response_id` must be"),
        ] {
            assert!(read(body.clone(), stream).is_err_and(|e| e.starts_with(error)), "{body}");
        }
    }
}
