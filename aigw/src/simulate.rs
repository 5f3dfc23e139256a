//! `aigw simulate`: run a scenario, print the summary, write the report.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn run(scenario_path: &Path, seed: Option<u64>, out: Option<PathBuf>, decisions: Option<PathBuf>) -> Result<()> {
    let scenario = simulator::Scenario::load(scenario_path).map_err(anyhow::Error::msg)?;
    let base = scenario_path.parent().unwrap_or(Path::new("."));
    let outcome = simulator::run(&scenario, base, seed, decisions.is_some()).map_err(anyhow::Error::msg)?;
    print!("{}", outcome.report.summary());
    let dir = out.unwrap_or_else(|| Path::new("reports").join(&scenario.name));
    simulator::output::write_report(&dir, &scenario, &outcome.report).map_err(anyhow::Error::msg)?;
    println!("report: {} (report.json, report.html, plots as SVG and PNG)", dir.display());
    if let Some(path) = decisions {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        for d in &outcome.decisions {
            serde_json::to_writer(&mut file, d)?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
        println!("decisions: {} ({} lines)", path.display(), outcome.decisions.len());
    }
    Ok(())
}
