//! mock-aoai: an Azure OpenAI stand-in. The behaviour model (`model`) is sans-IO
//! and shared with the simulator; `server` serves it over HTTP with axum.

pub mod config;
pub mod dist;
pub mod logprobs;
pub mod model;
pub mod server;
pub mod shape;
pub mod stored;
pub mod wire;

pub use config::{DeploymentConfig, Faults, MockConfig};
pub use dist::{round_to_u64, Dist};
pub use model::{DeploymentModel, ModelRequest, ModelResponse, Operation};
