//! `sovereign flash`: write a node image to a disk with read-back verification
//! and the state partition holding the node identity.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sovereign_provisioning::{flash, BarProgress, FlashOptions, NodeFile, DEFAULT_STATE_SIZE};

/// Arguments of `sovereign flash`.
#[derive(Args)]
pub struct FlashArgs {
    /// The disk image built by `sovereign image build` (OUT/node.img).
    #[arg(long)]
    image: PathBuf,
    /// The node's disk (whole disk, e.g. /dev/sdb), or a regular file standing in for one.
    /// Refused when mounted, in use, or the running system's disk.
    #[arg(long)]
    device: PathBuf,
    /// The node identity file made by `sovereign node enroll` (key, CA-issued
    /// certificate, CA certificate, age identity). A bare key is refused.
    #[arg(long)]
    node: PathBuf,
    /// Size of the state partition in MiB; the node grows it to the whole disk on first boot.
    #[arg(long, default_value_t = DEFAULT_STATE_SIZE >> 20, value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    state_mib: u64,
    /// The node's age identity (`sovereign key generate --age`); default: the identity file's.
    #[arg(long)]
    age_identity: Option<PathBuf>,
    /// The node's API keys file (`NAME blake3:<hex>` lines), for its API service.
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// The LAN API's TLS certificate (PEM), overriding the node certificate from the identity.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Runs `sovereign flash`.
pub fn run(args: FlashArgs) -> anyhow::Result<()> {
    let mut node_files = Vec::new();
    for (name, path) in [
        ("node.age", &args.age_identity),
        ("api-keys", &args.api_keys),
        ("cert.pem", &args.tls_cert),
        ("key.pem", &args.tls_key),
    ] {
        if let Some(path) = path {
            let contents =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            node_files.push(NodeFile {
                name: name.into(),
                contents,
            });
        }
    }
    if let Some(path) = &args.age_identity {
        sovereign_signing::read_age_identity(path)?;
    }
    let options = FlashOptions {
        image: args.image,
        device: args.device,
        identity: args.node,
        state_size: args.state_mib << 20,
        node_files,
    };
    let report = flash(&options, &BarProgress::new())?;
    println!(
        "flashed {} ({} bytes, blake3 {}) verified by read-back",
        report.device.display(),
        report.image_size,
        report.image_blake3
    );
    println!(
        "state partition {} ({}, {} MiB at offset {}) holds node {} ({})",
        report.state_partition.number,
        report.state_partition.unique_guid,
        report.state_partition.len() >> 20,
        report.state_partition.offset(),
        report.node_name,
        report.node_public_key
    );
    println!(
        "node age recipient {} (encrypt bundles to it with --encrypt-to)",
        report.age_recipient
    );
    Ok(())
}
