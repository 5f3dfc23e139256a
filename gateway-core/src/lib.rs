#![doc = include_str!("../README.md")]

pub mod counters;
mod deadlines;
pub mod decision_log;
pub mod delta;
pub mod hints;
pub mod key;
pub mod lifecycle;
pub mod limit_book;
pub mod limiter;
pub mod policy;
pub mod reason;
pub mod routing;
mod slot_index;
pub mod status;
mod store;
pub mod time;

pub use decision_log::Decision;
pub use delta::{Change, CounterDelta};
pub use hints::Hints;
pub use key::{KeyExpr, RequestInfo, Subscription};
pub use lifecycle::{
    AttemptRecord, AttemptResult, Delivery, DeliveryEnd, Finished, GeneratedResponse, Lifecycle, OutcomeRecord, Step,
    Usage,
};
pub use limit_book::{Admitted, Completed, CoreError, LimitBook, Rejection, RequestDecision, RequestId, ResponseInfo};
pub use policy::{Algorithm, ByteSize, Limit, Policy, Quota, RateLimit, TokenLimit};
pub use reason::Reason;
pub use status::StatusPredicate;
pub use time::{CalendarPeriod, EpochSeconds, Nanos};
