/*!
`sovereign-import`: the one-shot import service a node runs when a USB stick
is mounted. Same library code and arguments as `sovereign import`.
*/

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sovereign_store::{ImportOptions, Outcome, Store};

/// Import every verified bundle from a mounted stick into the model store.
#[derive(Parser)]
#[command(name = "sovereign-import", version)]
struct Args {
    /// The model store directory.
    #[arg(long)]
    store: PathBuf,
    /// The node's trust file (installed if the store has none).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// age identity for encrypted bundles.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// The audit daemon's socket; every outcome is recorded there (fail closed).
    #[arg(long)]
    audit_socket: Option<PathBuf>,
    /// The cluster CA certificate that signs revocation lists (`*.crl` on the stick).
    #[arg(long)]
    cluster_ca: Option<PathBuf>,
    /// Seconds to wait for the store while another import holds it (a
    /// second stick plugged in meanwhile); 0 fails at once.
    #[arg(long, default_value_t = 0)]
    wait_secs: u64,
    /// The mounted stick (or one bundle file).
    path: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let identity = args
        .identity
        .as_deref()
        .map(sovereign_signing::read_age_identity)
        .transpose()?;
    let auditor = args
        .audit_socket
        .as_deref()
        .map(|socket| {
            sovereign_audit::AuditClient::connect(socket).map(sovereign_audit::Auditor::Remote)
        })
        .transpose()?;
    let cluster_ca = args
        .cluster_ca
        .as_deref()
        .map(sovereign_identity::ClusterCa::load)
        .transpose()?;
    let store = Store::open_waiting(&args.store, std::time::Duration::from_secs(args.wait_secs))?;
    let outbox = store.outbox();
    let options = ImportOptions {
        trust: args.trust.as_deref(),
        identity: identity.as_ref(),
        cluster_ca: cluster_ca.as_ref(),
        audit: auditor
            .as_ref()
            .map(|a| a as &dyn sovereign_store::ImportAudit),
        outbox: outbox.as_deref(),
        ..ImportOptions::default()
    };
    let mut ok = true;
    for entry in store.import_path(&args.path, &options)? {
        match entry.outcome {
            Outcome::Rejected(reason) => {
                ok = false;
                eprintln!("error: {}: {reason}", entry.file.display());
            }
            other => tracing::info!(file = %entry.file.display(), outcome = ?other, "import"),
        }
    }
    Ok(ok)
}
