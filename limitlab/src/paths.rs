//! Output paths, checked before a run starts: a directory that cannot be made or
//! written, or a file that cannot be created, is an error before minutes of work,
//! not after them.

use anyhow::{Context, Result};
use std::path::Path;

/// Makes `dir` (and its parents) and checks that a file can be written in it.
pub fn writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output directory {}", dir.display()))?;
    let probe = dir.join(format!(".limitlab-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("cannot write in the output directory {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Creates `path` now, for writing once the run is over.
pub fn created_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

/// How a command runs a scenario's rates, for its size check.
pub enum Rates {
    /// As written (`simulate`, `sweep`).
    AsWritten,
    /// Up to the top of the scenario's `[check] rate_scale` (`check`).
    CheckScaled,
}

/// A scenario, its warnings shown (a trace's unplayed lines, an unmodelled
/// policy element), and its size checked at the largest rates the command runs.
pub fn load_scenario(path: &Path, rates: Rates, allow_large: bool) -> Result<simulator::Scenario> {
    let scenario = simulator::Scenario::load(path).map_err(anyhow::Error::msg)?;
    for warning in &scenario.warnings {
        eprintln!("{warning} (warning)");
    }
    let allow = if allow_large { simulator::scenario::AllowLarge::Yes } else { simulator::scenario::AllowLarge::No };
    let rate_scale = match rates {
        Rates::AsWritten => 1.0,
        Rates::CheckScaled => scenario.check.rate_scale[1].max(1.0),
    };
    scenario.check_size(rate_scale, allow).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(scenario)
}
