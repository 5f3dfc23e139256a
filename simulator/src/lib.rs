//! The simulator: seeded discrete-event replay of traffic scenarios through
//! `gateway-core` and `mock-aoai`'s deployment model.

pub mod check;
pub mod engine;
pub mod output;
pub mod plots;
mod queue;
pub mod report;
pub mod scenario;
pub mod sweep;
pub mod trace;
pub mod traffic;
pub mod verdict;

use std::path::Path;

pub use report::{Decision, Report};
pub use scenario::Scenario;

/// What one run produced.
pub struct Outcome {
    pub report: Report,
    pub decisions: Vec<Decision>,
}

/// Runs a scenario; `seed` overrides the scenario's. Paths in the scenario (traces)
/// are relative to `base`, the scenario file's folder.
pub fn run(scenario: &Scenario, base: &Path, seed: Option<u64>, keep_decisions: bool) -> Result<Outcome, String> {
    run_with_progress(scenario, base, seed, keep_decisions, &mut |_| {})
}

/// `run`, telling `progress` the share of simulated time done now and then.
pub fn run_with_progress(
    scenario: &Scenario,
    base: &Path,
    seed: Option<u64>,
    keep_decisions: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Outcome, String> {
    let seed = seed.unwrap_or(scenario.seed);
    let mut engine = engine::Engine::new(scenario, base, seed, keep_decisions)?;
    engine.run(progress);
    let report = engine.recorder.report(scenario, seed);
    let decisions = engine.recorder.decisions();
    Ok(Outcome { report, decisions })
}
