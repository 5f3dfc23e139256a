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

/// A scenario, its warnings shown (a trace's unplayed lines, an unmodelled
/// policy element), and its size checked: `rate_scale` is the largest factor a
/// run puts on its rates.
pub fn load_scenario(path: &Path, rate_scale: f64, allow_large: bool) -> Result<simulator::Scenario> {
    let scenario = simulator::Scenario::load(path).map_err(anyhow::Error::msg)?;
    for warning in &scenario.warnings {
        eprintln!("{warning} (warning)");
    }
    let allow = if allow_large { simulator::scenario::AllowLarge::Yes } else { simulator::scenario::AllowLarge::No };
    scenario.check_size(rate_scale, allow).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(scenario)
}
