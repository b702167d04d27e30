//! `sovereign models`: list, remove and show the history of the model store.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sovereign_store::Store;

use super::{format_bytes, STORE_WAIT};

/// Models arguments: listing by default.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ModelsArgs {
    /// The model store directory.
    #[arg(long)]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<ModelsCommand>,
}

/// Model store changes and reports.
#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Remove one installed version (the newest-version mark stays: no rollback).
    Remove {
        /// The model store directory.
        #[arg(long)]
        store: PathBuf,
        /// NAME@VERSION.
        reference: String,
    },
    /// Show every import attempt and change, oldest first.
    History {
        /// The model store directory.
        #[arg(long)]
        store: PathBuf,
    },
}

/// Runs a models command.
pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    match (args.command, args.store) {
        (Some(ModelsCommand::Remove { store, reference }), _) => {
            let removed = Store::open_waiting(&store, STORE_WAIT)?.remove(&reference)?;
            println!("removed {}@{}", removed.name, removed.version);
        }
        (Some(ModelsCommand::History { store }), _) => {
            for record in Store::open_waiting(&store, STORE_WAIT)?.history()? {
                println!(
                    "{} {} {} {}{}",
                    record.time,
                    record.action,
                    record.subject,
                    record.outcome,
                    if record.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", record.detail)
                    }
                );
            }
        }
        (None, Some(store)) => {
            let store = Store::open_waiting(&store, STORE_WAIT)?;
            let installed = store.installed()?;
            if installed.is_empty() {
                println!("no models installed");
            }
            for (i, record) in installed.iter().enumerate() {
                let newest = installed
                    .get(i + 1)
                    .is_none_or(|next| next.name != record.name);
                println!(
                    "{}@{}  {}  {} files  imported {}{}",
                    record.name,
                    record.version,
                    format_bytes(record.bytes),
                    record.files,
                    record.imported_at,
                    if newest { "  (served)" } else { "" }
                );
            }
        }
        (None, None) => anyhow::bail!("--store is required"),
    }
    Ok(())
}
