//! `limitlab`: one thin CLI over the limitlab crates.

/// `println!` that hands a failed write back to the caller instead of panicking
/// (a full disk behind `> file`): the command then exits 2 and says why.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(writeln!(std::io::stdout().lock(), $($arg)*), "writing to standard output")?
    }};
}

/// `print!` as [`say!`] is `println!`.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(write!(std::io::stdout().lock(), $($arg)*), "writing to standard output")?
    }};
}

mod check;
mod compare;
mod decide;
mod load;
mod mock;
mod paths;
mod policy;
mod proxy;
mod simulate;
mod sweep;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

// The proxy allocates a little per request; with mimalloc its user time per
// request is about 15% lower than with glibc's allocator (benches/proxy-bench.sh).
// It reserves its arena up front, so `limitlab simulate` peaks about 30 MiB higher,
// still the same for any simulated duration.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "limitlab",
    version,
    about = "Predict and enforce Azure API Management limits in front of Azure OpenAI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a JSONL file of requests through a policy and prints each decision.
    Decide {
        /// A policy: APIM policy XML, or limitlab's native TOML (`.toml`, `[[limits]]` tables).
        policy: PathBuf,
        /// One JSON object per line: `t_ms`, `ip`, optional `subscription`, `product`,
        /// `headers`, `status`, `total_tokens`, `latency_ms`, `prompt_tokens`, `max_tokens`,
        /// `n` (completions asked for), `bytes`.
        requests: PathBuf,
    },
    /// Replays a traffic scenario through the gateway core and mock backends, in simulated time.
    Simulate {
        /// A scenario file (see `scenarios/`).
        scenario: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Where to write `report.json` (default `reports/<scenario name>/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Writes one JSON line per request that reached the gateway.
        #[arg(long)]
        decisions: Option<PathBuf>,
        /// Runs a scenario of more than 500 million expected calls all the same.
        #[arg(long)]
        allow_large: bool,
    },
    /// Runs the gateway: the policy's limits, retry and failover in front of real backends.
    Proxy {
        /// A proxy config (see `examples/proxy.toml`).
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's `listen` address; port 0 picks a free one.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides the config's `admin` address (metrics, health).
        #[arg(long)]
        admin: Option<String>,
        /// Overrides a backend's URL: `--backend primary=http://127.0.0.1:8081`.
        #[arg(long = "backend", value_name = "NAME=URL")]
        backends: Vec<String>,
        /// Logs as JSON lines, one record per request.
        #[arg(long)]
        log_json: bool,
        /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
        #[arg(long, default_value_t = 30)]
        shutdown_grace_secs: u64,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Writes one JSON line per finished request, with the fields of `simulate
        /// --decisions` (`x-limitlab-request`, `x-limitlab-client` and
        /// `x-limitlab-attempt` headers name the scenario's request).
        #[arg(long)]
        decisions: Option<PathBuf>,
    },
    /// Plays a scenario's traffic in wall-clock time against a live gateway and reports what came back.
    Load(load::Args),
    /// Sets two runs' reports side by side (a simulation and a live run, or two live runs).
    Compare {
        /// A report folder (with `report.json`).
        a: PathBuf,
        /// Another report folder.
        b: PathBuf,
        /// Relative difference allowed for counts and tokens.
        #[arg(long, default_value_t = 0.01)]
        tolerance: f64,
        /// Calls two counts may differ by whatever their size (small counts).
        #[arg(long, default_value_t = 2)]
        tolerance_calls: u64,
        /// Relative difference allowed for latency percentiles (`inf`: not judged).
        #[arg(long, default_value_t = 0.25)]
        latency_tolerance: f64,
    },
    /// Reads APIM policy XML: `check` says what limitlab understood, `import` prints native TOML.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Runs a scenario over a grid of values and seeds, and recommends the cheapest point meeting the SLOs.
    Sweep {
        scenario: PathBuf,
        /// PATH=VALUES: `backends.primary.tpm=10000,20000` or `clients.chat.rate_per_s=1..10:1`.
        #[arg(long, required = true)]
        vary: Vec<String>,
        /// Seeds 1..=N per grid point.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
        /// FIGURE<=BOUND: `rejected_ratio<=0.01`, `client.chat.latency_ms_p99<=4000`, `backend.primary.throttled_ratio<=0.05`.
        #[arg(long)]
        slo: Vec<String>,
        /// Output folder (default `reports/<scenario>-sweep/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Threads (default: one per core); results do not depend on it.
        #[arg(long)]
        jobs: Option<usize>,
        /// A point passes when every SLO holds on at least this share of seeds.
        #[arg(long, default_value_t = 0.95)]
        pass_share: f64,
        /// Allows varying a client's demand (`clients.*`): the cheapest point is then
        /// the least traffic, not the smallest limit.
        #[arg(long)]
        allow_demand: bool,
        /// Runs points of more than 500 million expected calls all the same.
        #[arg(long)]
        allow_large: bool,
    },
    /// Tests the scenario's [[expect]] promises against perturbed runs; exit 1 with the smallest failing case.
    Check {
        scenario: PathBuf,
        /// Perturbed cases to run (at least 1: a check of no case checks nothing).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        cases: u32,
        /// Seeds the search, so a CI run is repeatable.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the failing case is written (default `reports/<scenario>-check/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Runs cases of more than 500 million expected calls all the same.
        #[arg(long)]
        allow_large: bool,
    },
    /// Serves a mock Azure OpenAI: real wire formats, Azure's TPM/RPM limits and 429s, faults.
    Mock {
        /// A mock config (see `mocks/`); without it, a built-in example.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on; port 0 picks a free one (the line printed on start says which).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Checks policy files (APIM XML, or native `.toml`): a summary of each, or FILE:LINE:COL errors (exit 2).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Elements limitlab does not model are errors, not warnings.
        #[arg(long)]
        strict: bool,
        /// An APIM named value for `{{NAME}}`: `--named-value backend-id=primary`.
        #[arg(long = "named-value", value_name = "NAME=VALUE")]
        named_values: Vec<String>,
    },
    /// Prints the native TOML equivalent of a policy file.
    Import {
        file: PathBuf,
        #[arg(long)]
        strict: bool,
        #[arg(long = "named-value", value_name = "NAME=VALUE")]
        named_values: Vec<String>,
    },
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<bool> {
    match command {
        PolicyCommand::Check { files, strict, named_values } => {
            policy::check(&files, &policy::options(strict, &named_values)?)
        }
        PolicyCommand::Import { file, strict, named_values } => {
            policy::import(&file, &policy::options(strict, &named_values)?)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy { command } => match policy_command(command) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(2),
            Err(e) => Err(e),
        },
        Command::Decide { policy, requests } => decide::run(&policy, &requests),
        Command::Simulate { scenario, seed, out, decisions, allow_large } => {
            simulate::run(&scenario, seed, out, decisions, allow_large)
        }
        Command::Proxy { config, listen, admin, backends, log_json, shutdown_grace_secs, threads, decisions } => {
            proxy::run(proxy::Options {
                threads,
                decisions: decisions.as_deref(),
                config: &config,
                listen,
                admin,
                backends,
                log_json,
                shutdown_grace: std::time::Duration::from_secs(shutdown_grace_secs),
            })
        }
        Command::Sweep { scenario, vary, seeds, slo, out, jobs, pass_share, allow_demand, allow_large } => {
            sweep::run(sweep::Args { scenario, vary, seeds, slo, out, jobs, pass_share, allow_demand, allow_large })
        }
        Command::Check { scenario, cases, seed, out, allow_large } => {
            match check::run(&scenario, cases, seed, out, allow_large) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Mock { config, listen } => mock::run(config.as_deref(), &listen),
        Command::Load(args) => load::run(args),
        Command::Compare { a, b, tolerance, tolerance_calls, latency_tolerance } => {
            match compare::run(&a, &b, tolerance, tolerance_calls, latency_tolerance) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Piped into `head`, a command stops quietly, as other Unix tools do when
        // SIGPIPE ends them, and with their status (128 + 13).
        Err(e) if is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether an error came from writing to a pipe whose reader has gone.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}
