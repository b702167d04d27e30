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
#[command(name = "sovereign", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands, grouped by noun.
#[derive(Subcommand)]
enum Command {
    /// Generate signing keys and age identities.
    #[command(subcommand)]
    Key(commands::key::KeyCommand),
    /// Write and sign trust files (accepted signers, threshold, sequence).
    #[command(subcommand)]
    Trust(commands::trust::TrustCommand),
    /// Create, sign, verify and inspect model bundles.
    #[command(subcommand)]
    Bundle(commands::bundle::BundleCommand),
    /// Verify and import bundles into a model store (a file or a stick's directory).
    Import(commands::import::ImportArgs),
    /// Answer a prompt with a model from the store, streaming the text.
    Generate(commands::generate::GenerateArgs),
    /// A model's perplexity on a text file, computed like llama.cpp's llama-perplexity.
    Perplexity(commands::perplexity::PerplexityArgs),
    /// Serve the OpenAI-compatible API (chat, completions, models, health, metrics).
    Serve(sovereign_api::ServeArgs),
    /// Export, verify and show the compliance audit log.
    #[command(subcommand)]
    Audit(commands::audit::AuditCommand),
    /// List installed models; `models remove` and `models history`.
    Models(commands::models::ModelsArgs),
    /// Build a node image from a spec, or verify one against its signed manifest.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Write a node image to a disk (or a file), verify it, add the node's state partition.
    Flash(commands::flash::FlashArgs),
    /// The cluster CA: make it, list enrolled nodes and their age recipients, revoke a node.
    #[command(subcommand)]
    Cluster(commands::cluster::ClusterCommand),
    /// Enroll a node in the cluster (its key and CA-issued certificate); run a node.
    #[command(subcommand)]
    Node(commands::node::NodeCommand),
    /// The ring as a node sees it: members, the plan, each member's layers.
    #[command(subcommand)]
    Ring(commands::ring::RingCommand),
}

/// Whether `error` is a write to a closed pipe.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOVEREIGN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Key(command) => commands::key::run(command),
        Command::Trust(command) => commands::trust::run(command),
        Command::Bundle(command) => commands::bundle::run(command),
        Command::Import(args) => commands::import::run(args),
        Command::Audit(command) => commands::audit::run(command),
        Command::Generate(args) => commands::generate::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Models(args) => commands::models::run(args),
        Command::Image(command) => commands::image::run(command),
        Command::Flash(args) => commands::flash::run(args),
        Command::Cluster(command) => commands::cluster::run(command),
        Command::Node(command) => commands::node::run(command),
        Command::Ring(command) => commands::ring::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`sovereign audit show | head`): nothing to report.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
