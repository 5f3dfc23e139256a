#![doc = include_str!("../README.md")]

pub mod counters;
pub mod gateway;
pub mod hint;
pub mod key;
pub mod lifecycle;
pub mod limiter;
pub mod policy;
pub mod routing;
mod slot_index;
pub mod status;
mod store;
pub mod time;

pub use gateway::{
    Admitted, Change, Completed, CoreError, CounterDelta, Gateway, RejectReason, Rejection, RequestDecision, RequestId,
    ResponseInfo,
};
pub use key::{KeyExpr, RequestInfo, Subscription};
pub use lifecycle::{
    AttemptRecord, AttemptResult, Delivery, FinalReason, Finished, GeneratedResponse, OutcomeRecord, Pipeline, Step,
    Usage,
};
pub use policy::{Algorithm, ByteSize, Limit, Policy, Quota, RateLimit, TokenLimit};
pub use status::StatusPredicate;
pub use time::{CalendarPeriod, EpochSeconds, Nanos};
