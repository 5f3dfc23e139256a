//! `limitlab simulate`: run a scenario, print the summary, write the report.

use anyhow::Result;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn run(
    scenario_path: &Path,
    seed: Option<u64>,
    out: Option<PathBuf>,
    decisions: Option<PathBuf>,
    allow_large: bool,
) -> Result<()> {
    let scenario = crate::paths::load_scenario(scenario_path, crate::paths::Rates::AsWritten, allow_large)?;
    let base = scenario_path.parent().unwrap_or(Path::new("."));
    let dir = out.unwrap_or_else(|| Path::new("reports").join(&scenario.name));
    crate::paths::writable_dir(&dir)?;
    let decisions = match decisions {
        Some(path) => Some((crate::paths::created_file(&path)?, path)),
        None => None,
    };
    let bar = progress_bar();
    let mut progress = |done: f64| {
        if let Some(bar) = &bar {
            bar.set_position((done * 1000.0) as u64);
        }
    };
    let outcome = simulator::run_with_progress(&scenario, base, seed, decisions.is_some(), &mut progress)
        .map_err(anyhow::Error::msg)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // The verdict comes right after the summary's first line (the scenario's).
    let summary = outcome.report.summary();
    let (head, tables) = summary.split_once('\n').unwrap_or((&summary, ""));
    say_raw!("{head}\n");
    for line in simulator::verdict::verdict(&outcome.report, &scenario, &scenario_path.display().to_string()) {
        say!("verdict: {line}");
    }
    say_raw!("{tables}");
    write_outputs(
        Outputs { dir: &dir, scenario: &scenario, scenario_path, decisions },
        &outcome.report,
        &outcome.decisions,
    )
}

/// Where a run's results go: the report folder, and the decision log's file if
/// one was asked for (created before the run).
pub struct Outputs<'a> {
    pub dir: &'a Path,
    pub scenario: &'a simulator::Scenario,
    pub scenario_path: &'a Path,
    pub decisions: Option<(std::fs::File, PathBuf)>,
}

/// Writes a run's report files and decision log, and says where they went.
pub fn write_outputs(out: Outputs<'_>, report: &simulator::Report, decisions: &[gateway_core::Decision]) -> Result<()> {
    simulator::output::write_report(out.dir, out.scenario, &out.scenario_path.display().to_string(), report)
        .map_err(anyhow::Error::msg)?;
    say!("report: {} (report.json, report.html, plots as SVG and PNG)", out.dir.display());
    if let Some((file, path)) = out.decisions {
        let mut file = std::io::BufWriter::new(file);
        for d in decisions {
            serde_json::to_writer(&mut file, d)?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
        say!("decisions: {} ({} lines)", path.display(), decisions.len());
    }
    Ok(())
}

/// A progress bar on a terminal, in thousandths of the simulated duration; none
/// when stderr is not a terminal (CI logs, pipes).
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(1000);
    let style = indicatif::ProgressStyle::with_template("simulating {bar:40} {percent:>3}% (about {eta} left)")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
