//! Cache hints: the one interface through which a driver that knows what comes
//! next (the next arrival, the next event's request) asks for its memory early,
//! so handling it does not wait on a cache miss.
//!
//! Apart from the decision API on purpose: a hint takes `&self`, changes no
//! state, and no decision depends on whether, when or how often it is given.
//! Each comes in two halves, best given an event or so apart: the first asks for
//! memory found from what the driver holds alone, the second reads what the first
//! brought and asks for what it points to.

use crate::key::RequestInfo;
use crate::lifecycle::Lifecycle;
use crate::limit_book::RequestId;

/// Hints about one [`Lifecycle`]'s coming work: see [`Lifecycle::hints`].
#[derive(Clone, Copy)]
pub struct Hints<'a> {
    lifecycle: &'a Lifecycle,
}

impl Lifecycle {
    /// The cache hints for this lifecycle's coming work.
    pub fn hints(&self) -> Hints<'_> {
        Hints { lifecycle: self }
    }
}

impl Hints<'_> {
    /// `req` will arrive soon (first half): asks for the index entries where the
    /// lookups of its limits' keys start.
    pub fn lookup(self, req: &RequestInfo) {
        self.lifecycle.limits().hint_lookup(req);
    }

    /// `req` will arrive soon (second half, after [`Hints::lookup`]): asks for
    /// the counters its limits' keys name.
    pub fn counters(self, req: &RequestInfo) {
        self.lifecycle.limits().hint_counters(req);
    }

    /// Request `id` will be handled soon, its response say (first half): asks
    /// for its records, the lifecycle's and the limit book's. An unknown id is
    /// ignored.
    pub fn request(self, id: RequestId) {
        if let Some(flight) = self.lifecycle.flight_slot(id) {
            cache_hint::prefetch(flight);
        }
        self.lifecycle.limits().hint_request(id);
    }

    /// Request `id` will be handled soon (second half, after
    /// [`Hints::request`]): asks for the counter rows it pinned.
    pub fn request_counters(self, id: RequestId) {
        self.lifecycle.limits().hint_request_counters(id);
    }
}
