//! `limitlab load`: a scenario's traffic against a live gateway, reported in
//! the simulator's schema.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Args {
    pub scenario: PathBuf,
    pub target: Option<String>,
    pub local: bool,
    pub key: Option<String>,
    pub out: Option<PathBuf>,
    pub decisions: Option<PathBuf>,
    pub seed: Option<u64>,
    pub max_requests: Option<u64>,
    pub caller_ip: String,
    pub deployment: Option<String>,
    pub api_version: String,
}

pub fn run(args: Args) -> Result<()> {
    let scenario = crate::paths::load_scenario(&args.scenario, crate::paths::Rates::AsWritten, false)?;
    let base = args.scenario.parent().unwrap_or(Path::new("."));
    let dir = args.out.clone().unwrap_or_else(|| Path::new("reports").join(format!("{}-live", scenario.name)));
    crate::paths::writable_dir(&dir)?;
    let decisions = match &args.decisions {
        Some(path) => Some((crate::paths::created_file(path)?, path.clone())),
        None => None,
    };
    if args.max_requests == Some(0) {
        anyhow::bail!("--max-requests 0 would send nothing");
    }
    let exe = std::env::current_exe().context("cannot find the limitlab binary to start the local gateway")?;
    let target = match (&args.target, args.local) {
        (Some(url), false) => load::Where::Url(url.clone()),
        _ => load::Where::Local { exe: &exe },
    };
    let caller_ip = match args.caller_ip.as_str() {
        "source" => load::CallerIp::Source,
        "forwarded-for" => load::CallerIp::ForwardedFor,
        _ => load::CallerIp::Auto,
    };
    eprintln!(
        "playing {} ({} s of traffic) in wall-clock time; Ctrl-C stops it and writes a partial report",
        args.scenario.display(),
        scenario.duration.0.as_secs_f64()
    );
    let outcome = load::run(load::Options {
        scenario: &scenario,
        base,
        seed: args.seed,
        target,
        key: args.key.clone(),
        max_requests: args.max_requests,
        caller_ip,
        deployment: args.deployment.clone(),
        api_version: args.api_version.clone(),
        keep_decisions: decisions.is_some(),
    })
    .map_err(anyhow::Error::msg)?;
    for note in &outcome.notes {
        say!("note: {note}");
    }
    say_raw!("{}", outcome.report.summary());
    simulator::output::write_report(&dir, &scenario, &args.scenario.display().to_string(), &outcome.report)
        .map_err(anyhow::Error::msg)?;
    say!("report: {} (report.json, report.html, plots as SVG and PNG)", dir.display());
    if let Some((file, path)) = decisions {
        let mut file = std::io::BufWriter::new(file);
        for d in &outcome.decisions {
            serde_json::to_writer(&mut file, d)?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
        say!("decisions: {} ({} lines)", path.display(), outcome.decisions.len());
    }
    Ok(())
}
