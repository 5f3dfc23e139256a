//! `limitlab sweep`: a scenario over a grid of values and many seeds, against SLOs.

use anyhow::{Context, Result};
use simulator::sweep::{self, SweepOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Args {
    pub scenario: PathBuf,
    pub vary: Vec<String>,
    pub seeds: u64,
    pub slo: Vec<String>,
    pub out: Option<PathBuf>,
    pub jobs: Option<usize>,
    pub pass_share: f64,
    pub allow_demand: bool,
    pub allow_large: bool,
}

pub fn run(args: Args) -> Result<()> {
    let scenario = crate::paths::load_scenario(&args.scenario, crate::paths::Rates::AsWritten, args.allow_large)?;
    let base = args.scenario.parent().unwrap_or(Path::new("."));
    let (varies, slos) = checked_grid(&args, &scenario)?;
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = SweepOptions { varies, seeds: args.seeds, slos, jobs, pass_share: args.pass_share };
    let dir = args.out.clone().unwrap_or_else(|| Path::new("reports").join(format!("{}-sweep", scenario.name)));
    crate::paths::writable_dir(&dir)?;
    let bar = progress_bar();
    let progress = |done: usize, total: usize| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let started = Instant::now();
    let result = sweep::sweep(&scenario, base, &options, &progress).map_err(anyhow::Error::msg)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let wall = started.elapsed().as_secs_f64();
    let simulated: u64 = result.points.iter().map(|p| p.simulated_requests).sum();
    simulator::output::write_sweep(&dir, &result).map_err(anyhow::Error::msg).context("writing the sweep")?;
    print_table(&result)?;
    print_recommendation(&result)?;
    say!(
        "{} runs ({} points x {} seeds) in {wall:.1} s on {jobs} threads: {simulated} simulated requests, {:.0} per second",
        result.points.len() as u64 * result.seeds,
        result.points.len(),
        result.seeds,
        simulated as f64 / wall
    );
    say!("sweep: {} (sweep.json, sweep.csv, sweep.html, plots)", dir.display());
    Ok(())
}

/// The grid and the SLOs the arguments give, each checked against the
/// scenario before any run, so that a typo or a point too large fails first.
fn checked_grid(args: &Args, scenario: &simulator::Scenario) -> Result<(Vec<sweep::Vary>, Vec<sweep::Slo>)> {
    let varies =
        args.vary.iter().map(|v| sweep::parse_vary(v)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!varies.is_empty(), "give at least one --vary PATH=VALUES");
    anyhow::ensure!(args.seeds >= 1, "--seeds must be at least 1");
    anyhow::ensure!(args.jobs != Some(0), "--jobs must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.pass_share),
        "--pass-share is a share of seeds, 0 to 1; got {}",
        args.pass_share
    );
    let slos =
        args.slo.iter().map(|s| sweep::parse_slo(s)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    sweep::check_slos(scenario, &slos).map_err(anyhow::Error::msg)?;
    // A sweep sizes limits and capacity: over demand, "the cheapest passing point"
    // would be the least traffic, an answer to a question nobody asked.
    if let Some(v) = varies.iter().find(|v| v.path.starts_with("clients.")).filter(|_| !args.allow_demand) {
        anyhow::bail!(
            "`--vary {}` changes a client's demand, not a limit or a capacity: the point recommended would be the \
             one with the least traffic. Vary a limit (`gateway.policy...`) or a backend (`backends...`), or pass \
             --allow-demand to explore demand anyway",
            v.path
        );
    }
    // Every path is tried on the scenario first, so a typo fails before any run;
    // each value of a demand path is sized like a scenario of its own.
    let allow =
        if args.allow_large { simulator::scenario::AllowLarge::Yes } else { simulator::scenario::AllowLarge::No };
    for v in &varies {
        for value in &v.values {
            let point = sweep::apply(scenario, &v.path, *value).map_err(anyhow::Error::msg)?;
            point.check_size(1.0, allow).map_err(|e| anyhow::anyhow!("`{}` = {value}: {e}", v.path))?;
        }
    }
    Ok((varies, slos))
}

fn print_recommendation(result: &sweep::SweepResult) -> Result<()> {
    match (result.recommended, result.slos.is_empty()) {
        (Some(i), _) => {
            say!("recommended: {}", simulator::output::point_text(result, i));
            let bounds_refusals = result.slos.iter().any(|s| s.figure.ends_with("ratio") || s.figure.ends_with("ok"));
            if !bounds_refusals {
                say!(
                    "note: no SLO bounds rejections, so the smallest passing limit is the one that refuses the \
                     most; add one, e.g. --slo \"rejected_ratio<=0.05\""
                );
            }
        }
        (None, true) => say!(
            "no --slo given: the grid is listed and nothing is recommended (the smallest limit always \
             \"passes\" a sweep with no goal); give one, e.g. --slo \"client.NAME.latency_ms_p95<=3000\""
        ),
        (None, false) => say!("no point meets the SLOs on {:.0}% of seeds", result.pass_share * 100.0),
    }
    Ok(())
}

fn print_table(result: &sweep::SweepResult) -> Result<()> {
    let header: Vec<&str> = result.varies.iter().map(|v| v.path.as_str()).collect();
    let goals = !result.slos.is_empty();
    say!("{}  {:>10}{}", header.join("  "), "rejected", if goals { "    SLO pass" } else { "" });
    for p in &result.points {
        let values: Vec<String> =
            p.values.iter().zip(&header).map(|(v, h)| format!("{v:>width$}", width = h.len())).collect();
        let rejected = p.figures.get("rejected_ratio").map_or(f64::NAN, |f| f.mean) * 100.0;
        let verdict = match (goals, p.passes) {
            (false, _) => String::new(),
            (true, passes) => format!("  {:>9.0}%{}", p.slo_pass_rate * 100.0, if passes { "  pass" } else { "" }),
        };
        say!("{}  {rejected:>9.1}%{verdict}", values.join("  "));
    }
    Ok(())
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(1);
    let style = indicatif::ProgressStyle::with_template("sweeping {bar:40} {pos}/{len} runs (about {eta} left)")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
