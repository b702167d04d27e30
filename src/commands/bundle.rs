//! `sovereign bundle`: create, sign, verify and inspect signed model bundles.

use std::path::PathBuf;

use clap::Subcommand;
use sovereign_signing::{
    create_bundle, read_age_identity, read_age_recipient, read_signing_key, sign_bundle,
    BundleSpec, Encryption, SignOutcome, UnverifiedBundle, DEFAULT_PART_SIZE, DEFAULT_SEGMENT_SIZE,
};

use super::format_bytes;

/// Bundle commands.
#[derive(Subcommand)]
pub enum BundleCommand {
    /// Pack model files into a bundle (NAME-VERSION.sovb, split into parts if large).
    Create {
        /// Model name.
        #[arg(long)]
        name: String,
        /// Version (semver).
        #[arg(long)]
        version: semver::Version,
        /// The bundle file to write (must end in .sovb).
        #[arg(long)]
        out: PathBuf,
        /// Encrypt the payload to this age recipient (`age1...` or a .pub file); repeatable.
        #[arg(long = "encrypt-to")]
        encrypt_to: Vec<String>,
        /// Part size in bytes (default: the FAT32 limit, about 4 GiB).
        #[arg(long, default_value_t = DEFAULT_PART_SIZE)]
        part_size: u64,
        /// Model files or directories.
        #[arg(required = true)]
        model_paths: Vec<PathBuf>,
    },
    /// Add a signature to a bundle, in place.
    Sign {
        /// The ed25519 signing key.
        #[arg(long)]
        key: PathBuf,
        /// The bundle.
        file: PathBuf,
    },
    /// Check a bundle's signatures against a trust file and hash every byte.
    Verify {
        /// The trust file.
        #[arg(long)]
        trust: PathBuf,
        /// age identity, to check the content of an encrypted bundle too.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The bundle.
        file: PathBuf,
    },
    /// Show a bundle's manifest and signers (nothing is verified).
    Inspect {
        /// Print the manifest JSON.
        #[arg(long)]
        json: bool,
        /// The bundle.
        file: PathBuf,
    },
}

/// Runs a bundle command.
pub fn run(command: BundleCommand) -> anyhow::Result<()> {
    match command {
        BundleCommand::Create {
            name,
            version,
            out,
            encrypt_to,
            part_size,
            model_paths,
        } => {
            let recipients = encrypt_to
                .iter()
                .map(|r| read_age_recipient(r))
                .collect::<Result<Vec<_>, _>>()?;
            let spec = BundleSpec {
                name,
                version,
                inputs: model_paths,
                recipients,
                part_size,
                segment_size: DEFAULT_SEGMENT_SIZE,
            };
            let manifest = create_bundle(&spec, &out)?;
            println!(
                "created {} ({}, {} files, {}{})",
                out.display(),
                manifest.id(),
                manifest.files.len(),
                format_bytes(manifest.content_size()),
                if matches!(manifest.payload.encryption, Encryption::Age { .. }) {
                    ", age-encrypted"
                } else {
                    ""
                }
            );
        }
        BundleCommand::Sign { key, file } => {
            let key = read_signing_key(&key)?;
            match sign_bundle(&file, &key)? {
                SignOutcome::Signed(slot) => {
                    println!(
                        "signed {} as {} (slot {slot})",
                        file.display(),
                        key.public_key()
                    )
                }
                SignOutcome::AlreadySigned => {
                    println!(
                        "{} is already signed by {}",
                        file.display(),
                        key.public_key()
                    )
                }
            }
        }
        BundleCommand::Verify {
            trust,
            identity,
            file,
        } => {
            let trust = sovereign_signing::TrustFile::parse(
                &std::fs::read_to_string(&trust)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", trust.display()))?,
            )?;
            let identity = identity.as_deref().map(read_age_identity).transpose()?;
            let bundle = UnverifiedBundle::open(&file)?;
            let verified = bundle.verify(trust.trust())?;
            let payload = verified.check_payload(identity.as_ref())?;
            let what = if payload.content_checked() {
                "signatures and every file verified"
            } else {
                "signatures and encrypted payload verified (content not decrypted: no --identity)"
            };
            println!("ok: {} {what}", payload.manifest().id());
        }
        BundleCommand::Inspect { json, file } => {
            let bundle = UnverifiedBundle::open(&file)?;
            if json {
                println!(
                    "{}",
                    String::from_utf8_lossy(bundle.manifest_bytes()).trim_end()
                );
                return Ok(());
            }
            let manifest = bundle.manifest();
            println!("name:      {}", manifest.name);
            println!("version:   {}", manifest.version);
            println!("created:   {}", manifest.created);
            println!(
                "payload:   {} in {} part(s){}",
                format_bytes(manifest.payload.size),
                bundle.part_count(),
                match manifest.payload.encryption {
                    Encryption::None => "",
                    Encryption::Age { .. } => ", age-encrypted",
                }
            );
            for signer in bundle.signers() {
                println!("signed by: {signer} (not verified)");
            }
            for entry in &manifest.files {
                println!(
                    "file:      {} {} blake3:{}",
                    entry.path,
                    format_bytes(entry.size),
                    entry.blake3
                );
            }
        }
    }
    Ok(())
}
