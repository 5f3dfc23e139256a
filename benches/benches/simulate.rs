//! Simulated requests per second of wall time, on one core, and peak memory, for
//! `benches/throughput.toml` (1,000 requests/s through the seed policy).
//!
//! `cargo bench -p limitlab-benches --bench simulate [-- DURATION [SCENARIO]]` (default
//! 1h; the figure is for 24h). Another scenario file, given second, is run
//! instead of the bench's own, for comparisons (its `duration = "1h"` line is the
//! one replaced).

use std::path::{Path, PathBuf};
use std::time::Instant;

// The allocator `limitlab` ships with, so the figures are those of `limitlab simulate`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let duration = args.first().cloned().unwrap_or_else(|| "1h".to_owned());
    let path = match args.get(1) {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("throughput.toml"),
    };
    let text = std::fs::read_to_string(&path).expect("the bench scenario");
    let text = text.replacen("duration = \"1h\"", &format!("duration = \"{duration}\""), 1);
    let scenario = simulator::Scenario::from_toml(&path.display().to_string(), &text).expect("valid");
    let started = Instant::now();
    let outcome = simulator::run(&scenario, path.parent().expect("a folder"), None, false).expect("runs");
    let wall = started.elapsed().as_secs_f64();
    let requests: u64 = outcome.report.clients.iter().map(|c| c.requests).sum();
    let attempts: u64 = outcome.report.backends.iter().map(|b| b.attempts).sum();
    println!(
        "simulate {duration}: {requests} client calls ({attempts} backend attempts) in {wall:.2} s of wall time: \
         {:.0} simulated requests/s; peak memory {:.1} MiB",
        requests as f64 / wall,
        peak_rss_mib()
    );
}
