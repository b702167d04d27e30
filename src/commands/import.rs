//! `sovereign import`: the same verified import a node runs when a stick is plugged in.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use sovereign_store::{ImportOptions, Outcome, Store};

use super::{format_bytes, STORE_WAIT};

/// Import arguments.
#[derive(Args)]
pub struct ImportArgs {
    /// The model store directory.
    #[arg(long)]
    store: PathBuf,
    /// The trust file (installed if the store has none; the store keeps newer ones).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// age identity for encrypted bundles.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Accept a version older than the newest imported (recorded in the history).
    #[arg(long)]
    allow_downgrade: bool,
    /// Record every outcome in this audit log directory (fail closed: if it
    /// cannot record, nothing is imported). After a directory import the newest
    /// checkpoint and a consistency proof are left in it, as on a stick.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The node name recorded in a new audit log.
    #[arg(long, default_value = "dev")]
    node: String,
    /// The cluster CA certificate: revocation lists (`*.crl`) on the stick are
    /// checked against it and the store keeps the newest.
    #[arg(long)]
    cluster_ca: Option<PathBuf>,
    /// A bundle, or a directory of bundles as on a mounted USB stick.
    path: PathBuf,
}

/// Runs an import; fails if any bundle was rejected.
pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let identity = args
        .identity
        .as_deref()
        .map(sovereign_signing::read_age_identity)
        .transpose()?;
    let log = args
        .audit_log
        .as_deref()
        .map(|dir| sovereign_audit::AuditLog::open(dir, &args.node).map(Arc::new))
        .transpose()?;
    let auditor = log.clone().map(sovereign_audit::Auditor::Local);
    let cluster_ca = args
        .cluster_ca
        .as_deref()
        .map(sovereign_identity::ClusterCa::load)
        .transpose()?;
    // A running node's replication may be importing into it (while a
    // bundle arrives from a peer): wait for it as a stick import does.
    let store = Store::open_waiting(&args.store, STORE_WAIT)?;
    let outbox = store.outbox();
    let options = ImportOptions {
        trust: args.trust.as_deref(),
        identity: identity.as_ref(),
        allow_downgrade: args.allow_downgrade,
        audit: auditor
            .as_ref()
            .map(|a| a as &dyn sovereign_store::ImportAudit),
        cluster_ca: cluster_ca.as_ref(),
        outbox: outbox.as_deref(),
        arrival: None,
    };
    let report = store.import_path(&args.path, &options)?;
    if let Some(log) = &log {
        if args.path.is_dir() {
            let folder = sovereign_audit::write_courier(log, &args.path)?;
            println!(
                "left the audit checkpoint and consistency proof in {}",
                folder.display()
            );
        }
    }
    let mut rejected = 0;
    for entry in &report {
        let file = entry.file.display();
        match &entry.outcome {
            Outcome::Imported(imported) => println!(
                "imported {} ({} files, {}) in {:.2} s{}",
                imported.id,
                imported.files,
                format_bytes(imported.bytes),
                imported.seconds,
                if imported.downgrade {
                    " (downgrade)"
                } else {
                    ""
                }
            ),
            Outcome::AlreadyPresent(id) => println!("{id} is already installed"),
            Outcome::TrustInstalled(sequence) => {
                println!("installed trust file sequence {sequence} from {file}")
            }
            Outcome::RevocationsInstalled(sequence) => {
                println!("installed revocation list {sequence} from {file}")
            }
            Outcome::Skipped(reason) => println!("skipped {file}: {reason}"),
            Outcome::Rejected(reason) => {
                rejected += 1;
                eprintln!("error: {file}: {reason}");
            }
        }
    }
    anyhow::ensure!(
        rejected == 0,
        "{rejected} file(s) rejected; the store holds only what verified"
    );
    Ok(())
}
