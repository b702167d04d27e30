//! `sovereign ring status`: what a node's API says of the ring.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

/// Ring commands.
#[derive(Subcommand)]
pub enum RingCommand {
    /// Ask a node's API for the ring: members, the plan in force, each
    /// member's layers, budget and models (needs an operator API key when
    /// the node has keys).
    Status {
        /// The node's API (`https://node-a:8443`, or `http://127.0.0.1:8080` on a dev host).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// A file holding the API key (default: the SOVEREIGN_API_KEY variable).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The cluster CA certificate, to check an https:// API.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Print the node's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a ring command.
pub fn run(command: RingCommand) -> anyhow::Result<()> {
    match command {
        RingCommand::Status {
            api,
            key_file,
            cacert,
            json,
        } => {
            let key = match key_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned(),
                None => std::env::var("SOVEREIGN_API_KEY").unwrap_or_default(),
            };
            let health = sovereign_node::status::fetch_blocking(&api, &key, cacert.as_deref())?;
            if health.get("ring").is_none() {
                anyhow::bail!(
                    "{api} shows no ring: it is not a ring node, or the key is not an operator key"
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&health)?);
            } else {
                print!("{}", sovereign_node::status::render(&health));
            }
        }
    }
    Ok(())
}
