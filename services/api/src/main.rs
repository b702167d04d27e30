/*! `sovereign-api`: the node's OpenAI-compatible API server (same arguments as `sovereign serve`). */

use std::process::ExitCode;

use clap::Parser;

/// The API server.
#[derive(Parser)]
#[command(name = "sovereign-api", version)]
struct Cli {
    #[command(flatten)]
    args: sovereign_api::ServeArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match sovereign_api::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
