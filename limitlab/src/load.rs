//! `limitlab load`: a scenario's traffic against a live gateway, reported in
//! the simulator's schema.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A scenario file (see `scenarios/`).
    pub scenario: PathBuf,
    /// The gateway's root URL (limitlab's proxy, APIM, or Azure OpenAI itself).
    #[arg(long, required_unless_present = "local", conflicts_with = "local")]
    pub target: Option<String>,
    /// Starts the scenario's backends (mocks) and gateway (proxies) on loopback ports, plays the traffic
    /// through them, then stops them.
    #[arg(long)]
    pub local: bool,
    /// The subscription key of callers the scenario does not give keys of their own (sent as `api-key`).
    #[arg(long)]
    pub key: Option<String>,
    /// Where to write `report.json` and `report.html` (default `reports/<scenario name>-live/`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Writes one JSON line per call, as `simulate --decisions` does.
    #[arg(long)]
    pub decisions: Option<PathBuf>,
    /// Overrides the scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stops after this many first calls (SDK retries of those still go); the report is then partial.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// How callers' IPs reach the gateway: `source` (an address of its own in 127.0.0.0/8, loopback
    /// targets only), `forwarded-for` (`X-Forwarded-For`, for a gateway that trusts this host), or `auto`
    /// (source on loopback, none elsewhere).
    #[arg(long, default_value = "auto", value_parser = ["auto", "source", "forwarded-for"])]
    pub caller_ip: String,
    /// The deployment in each call's path (default: the scenario's first backend's model).
    #[arg(long)]
    pub deployment: Option<String>,
    /// The `api-version` of each call.
    #[arg(long, default_value = "2024-10-21")]
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
    let outputs = crate::simulate::Outputs { dir: &dir, scenario: &scenario, scenario_path: &args.scenario, decisions };
    crate::simulate::write_outputs(outputs, &outcome.report, &outcome.decisions)
}
