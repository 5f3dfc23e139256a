//! `limitlab check`: the scenario's promises against perturbed runs.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `Ok(true)`: every promise held; `Ok(false)`: one broke (exit 1).
pub fn run(path: &Path, cases: u32, seed: u64, out: Option<PathBuf>, allow_large: bool) -> Result<bool> {
    let scenario = crate::paths::load_scenario(path, crate::paths::Rates::CheckScaled, allow_large)?;
    anyhow::ensure!(!scenario.expect.is_empty(), "{}: no [[expect]] promises to check", path.display());
    let base = path.parent().unwrap_or(Path::new("."));
    // Checked now: a broken promise found after minutes must be written (exit 1),
    // never lost to an unwritable directory (exit 2).
    let dir = out.unwrap_or_else(|| Path::new("reports").join(format!("{}-check", scenario.name)));
    crate::paths::writable_dir(&dir)?;
    let b = &scenario.check;
    say!(
        "checking {}: {} promises, {cases} cases (seed {seed}), rate x {:?}, tokens x {:?}, burstiness x {:?}, \
         faults shifted {:?} s",
        path.display(),
        scenario.expect.len(),
        b.rate_scale,
        b.token_scale,
        b.burstiness,
        b.fault_shift_s
    );
    for e in &scenario.expect {
        say!("  promise: {}", e.describe());
    }
    let Some(failure) = simulator::check::check(&scenario, base, cases, seed).map_err(anyhow::Error::msg)? else {
        say!("ok: every promise held in every case");
        return Ok(true);
    };
    let file = dir.join("failing-case.toml");
    let header = format!(
        "# Written by `limitlab check {}`: the smallest case found that breaks\n# \"{}\" (measured {}).\n",
        path.display(),
        failure.promise,
        failure.measured
    );
    std::fs::write(&file, header + &failure.scenario).with_context(|| format!("cannot write {}", file.display()))?;
    let c = failure.case;
    say!("FAILED: {} (measured {})", failure.promise, failure.measured);
    say!(
        "  smallest case: rate x {}, tokens x {}, burstiness x {}, faults shifted {} s, seed {}",
        c.rate_scale,
        c.token_scale,
        c.burstiness,
        c.fault_shift_s,
        c.seed
    );
    say!("  reproduce: limitlab simulate {}", file.display());
    Ok(false)
}
