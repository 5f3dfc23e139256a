//! `aigw`: one thin CLI over the aigw crates.

mod decide;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "aigw", version, about = "Predict and enforce Azure API Management limits in front of Azure OpenAI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a JSONL file of requests through a policy and prints each decision.
    Decide {
        /// A policy in aigw's TOML form (`[[limits]]` tables).
        policy: PathBuf,
        /// One JSON object per line: `t_ms`, `ip`, optional `subscription`, `product`,
        /// `headers`, `status`, `total_tokens`, `latency_ms`, `prompt_tokens`, `bytes`.
        requests: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Decide { policy, requests } => decide::run(&policy, &requests),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
