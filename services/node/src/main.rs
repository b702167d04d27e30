/*! `sovereign-node`: a node's ring service and API in one process (same arguments as `sovereign node run`). */

use std::process::ExitCode;

use clap::Parser;

/// The node service.
#[derive(Parser)]
#[command(name = "sovereign-node", version)]
struct Cli {
    #[command(flatten)]
    args: sovereign_node::NodeArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOVEREIGN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match sovereign_node::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
