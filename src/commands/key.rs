//! `sovereign key`: make signing keys and age identities.

use std::path::PathBuf;

use clap::Subcommand;

/// Key commands.
#[derive(Subcommand)]
pub enum KeyCommand {
    /// Generate an ed25519 signing key (or with --age an age identity):
    /// PATH holds the secret (mode 0600), PATH.pub the public half.
    Generate {
        /// Generate an age X25519 identity instead of a signing key.
        #[arg(long)]
        age: bool,
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a key command.
pub fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Generate { age: true, out } => {
            let recipient = sovereign_signing::generate_age_identity(&out)?;
            println!("{recipient}");
        }
        KeyCommand::Generate { age: false, out } => {
            let public = sovereign_signing::generate_signing_key(&out)?;
            println!("{public}");
        }
    }
    Ok(())
}
