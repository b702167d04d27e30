//! `sovereign trust`: write and sign trust files.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use sovereign_signing::{read_public_key, read_signing_key, Trust, TrustFile};

/// Trust commands.
#[derive(Subcommand)]
pub enum TrustCommand {
    /// Write a trust file: the accepted signers and how many must sign.
    Init {
        /// An accepted signer: `ed25519:...` or a `.pub` file. Repeat for several.
        #[arg(long = "signer", required = true, num_args = 1..)]
        signers: Vec<String>,
        /// Signatures required (m of n).
        #[arg(long)]
        threshold: usize,
        /// Sequence number; a rotation uses a higher one than the installed file.
        #[arg(long, default_value_t = 1)]
        sequence: u64,
        /// Where to write the trust file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a trust file (a rotation needs the current threshold of current signers).
    Sign {
        /// The signing key.
        #[arg(long)]
        key: PathBuf,
        /// The trust file, signed in place.
        file: PathBuf,
    },
}

/// Runs a trust command.
pub fn run(command: TrustCommand) -> anyhow::Result<()> {
    match command {
        TrustCommand::Init {
            signers,
            threshold,
            sequence,
            out,
        } => {
            let keys = signers
                .iter()
                .map(|s| read_public_key(s))
                .collect::<Result<Vec<_>, _>>()?;
            let file = TrustFile::new(Trust::new(sequence, threshold, keys)?);
            super::write_new(&out, file.to_text().as_bytes())?;
            println!(
                "wrote {} (sequence {sequence}, {threshold} of {} signers)",
                out.display(),
                signers.len()
            );
        }
        TrustCommand::Sign { key, file } => {
            let key = read_signing_key(&key)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut trust = TrustFile::parse(&text)?;
            trust.sign(&key);
            super::replace_file(&file, trust.to_text().as_bytes())?;
            println!("signed {} as {}", file.display(), key.public_key());
        }
    }
    Ok(())
}
