//! Counter changes, as replicas that share counters through a lagging store
//! exchange them: the limit book journals its own and applies the others'.

use crate::time::Nanos;
use serde::{Deserialize, Serialize};

/// A change one gateway made to one of its counters, for replicas that share
/// counters through a store with synchronisation lag: each applies the others'
/// changes with [`crate::LimitBook::handle_delta`] when they arrive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterDelta {
    /// The counter family; replicas built from one policy number them alike.
    pub class: usize,
    pub key: String,
    /// When the change was made.
    pub at: Nanos,
    pub change: Change,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Calls or tokens counted at `at` (a sliding log's entry, a bucket's take, a
    /// window's or calendar period's count).
    Count(u64),
    /// Bytes counted in the fixed window of `at`.
    Bytes(u64),
    /// Part of a reservation stamped at `stamped` given back.
    Uncount { amount: u64, stamped: Nanos },
}
