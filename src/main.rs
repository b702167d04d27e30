/*!
`sovereign`: the operator CLI. It parses arguments and prints; the logic lives
in the libraries. Exit codes: 0 success, 1 an operation failed (one `error:`
line on stderr), 2 bad usage.
*/

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Sovereign operator CLI.
#[derive(Parser)]
#[command(name = "sovereign", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands, grouped by noun.
#[derive(Subcommand)]
enum Command {
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOVEREIGN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
