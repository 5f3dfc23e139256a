//! `limitlab compare A B`: two reports side by side; exit 0 within tolerance,
//! 1 beyond it, 2 on bad input.

use anyhow::Result;
use std::path::Path;

pub fn run(a: &Path, b: &Path, relative: f64, calls: u64, latency: f64) -> Result<bool> {
    if !(relative.is_finite() && (0.0..=1.0).contains(&relative)) {
        anyhow::bail!("--tolerance must be a share from 0 to 1, got {relative}");
    }
    if latency.is_nan() || latency < 0.0 {
        anyhow::bail!("--latency-tolerance must be a share of 0 or more (`inf`: not judged), got {latency}");
    }
    let tolerances = load::compare::Tolerances { relative, calls, latency };
    let comparison = load::compare::compare(a, b, tolerances).map_err(anyhow::Error::msg)?;
    say_raw!("{}", comparison.table());
    let within = comparison.within_tolerance();
    match within {
        true => say!("within tolerance: every figure agrees"),
        false => say!("beyond tolerance: {} figures differ by more than allowed", comparison.beyond()),
    }
    Ok(within)
}
