//! `limitlab load`: a scenario's traffic played in wall-clock time against a
//! live gateway (limitlab's proxy, APIM, Azure OpenAI itself), and the report
//! of what came back in the simulator's schema; `limitlab compare` sets two
//! reports side by side.
//!
//! The calls are the simulation's: the same streams draw the same arrivals,
//! callers, prompts and completion lengths (`simulator::traffic`). The run is
//! open loop: each call leaves at its scheduled instant whatever the target is
//! doing, and its latency counts from that instant, so a slow target shows its
//! queueing.

pub mod compare;
mod local;
mod run;
mod send;
mod wire;

pub use run::{run, CallerIp, Options, Outcome, Where};
