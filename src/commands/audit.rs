//! `sovereign audit`: export, verify and show a node's audit log.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use clap::Subcommand;
use sovereign_audit::{
    verify, verify_courier, verify_courier_with_ca, verify_with_ca, Export, StoredRecord,
};
use sovereign_identity::{ClusterCa, RevocationList};

/// Reads a checkpoint the auditor holds.
fn read_held(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    path.map(|p| std::fs::read_to_string(p).with_context(|| p.display().to_string()))
        .transpose()
}

/// Audit commands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Write a self-contained file: records, checkpoints, the node's public key.
    Export {
        /// The log directory.
        #[arg(long)]
        log: PathBuf,
        /// The export file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check every record, signature and checkpoint; name the first bad record.
    /// Also accepts a stick's courier folder (sovereign-audit/NODE).
    Verify {
        /// A checkpoint the auditor already holds: the log must extend it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The node's public key (`ed25519:...` or a .pub file); without it (or
        /// --cluster-ca) the export's own key is used, which proves integrity but not origin.
        #[arg(long, conflicts_with = "cluster_ca")]
        key: Option<String>,
        /// The cluster CA certificate: the log's node certificate must be issued
        /// by it and its key must sign the log (all an auditor needs).
        #[arg(long)]
        cluster_ca: Option<PathBuf>,
        /// A revocation list of the cluster (with --cluster-ca): a revoked node's log is refused.
        #[arg(long, requires = "cluster_ca")]
        revocations: Option<PathBuf>,
        /// An export file, a log directory, or a courier folder.
        path: PathBuf,
    },
    /// Leave every ring member's newest checkpoint and the consistency proof
    /// from the one the stick carries, gathered over the ring by the node
    /// serving `--ring` (its `--courier-socket`), in the stick's folders.
    Courier {
        /// The node's courier socket.
        #[arg(long)]
        ring: PathBuf,
        /// The stick (its mounted directory).
        stick: PathBuf,
    },
    /// Print the records, or JSON Lines for SIEM tools.
    Show {
        /// The log directory or an export file.
        #[arg(long)]
        log: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// `text` with control and bidirectional-override characters escaped
/// (`\u{1b}`), so a record cannot move the cursor or fake a line.
fn printable(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if unsafe_char(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Runs an audit command.
pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Export { log, out } => {
            let export = Export::from_dir(&log)?;
            export.write(&out)?;
            println!(
                "exported {} records and {} checkpoints of node {} to {}",
                export.records.len(),
                export.checkpoints.len(),
                export.node,
                out.display()
            );
        }
        AuditCommand::Verify {
            checkpoint,
            key: _,
            cluster_ca: Some(ca),
            revocations,
            path,
        } => {
            let ca = ClusterCa::load(&ca)?;
            let list = match revocations {
                Some(p) => RevocationList::load(&p, &ca)?,
                None => RevocationList::empty(&ca),
            };
            let now = SystemTime::now();
            if path.join("consistency-proof.json").exists() {
                let (checkpoint, peer) = verify_courier_with_ca(&path, &ca, &list, now)?;
                println!(
                    "ok: courier checkpoint at size {} of node {} (serial {}, cluster {}) extends the previous one on this stick",
                    checkpoint.size, peer.name, peer.serial, ca.name()
                );
                return Ok(());
            }
            let held = read_held(checkpoint.as_deref())?;
            let export = Export::load(&path)?;
            let (verified, peer) = verify_with_ca(&export, &ca, &list, now, held.as_deref())?;
            println!(
                "ok: {} records and {} checkpoints of node {} verify (newest checkpoint covers {}); signed by node {} (serial {}) of cluster {}{}",
                verified.records,
                verified.checkpoints,
                export.node,
                verified.checkpointed,
                peer.name,
                peer.serial,
                ca.name(),
                if held.is_some() { "; extends the held checkpoint" } else { "" },
            );
        }
        AuditCommand::Verify {
            checkpoint,
            key,
            cluster_ca: None,
            revocations: _,
            path,
        } => {
            let key = key
                .as_deref()
                .map(sovereign_signing::read_public_key)
                .transpose()?;
            if path.join("consistency-proof.json").exists() {
                let key = key.context("a courier folder needs --key")?;
                let checkpoint = verify_courier(&path, &key)?;
                println!(
                    "ok: courier checkpoint at size {} extends the previous one on this stick",
                    checkpoint.size
                );
                return Ok(());
            }
            let held = read_held(checkpoint.as_deref())?;
            let export = Export::load(&path)?;
            let verified = verify(&export, key.as_ref(), held.as_deref())?;
            println!(
                "ok: {} records and {} checkpoints of node {} verify (newest checkpoint covers {}){}{}",
                verified.records,
                verified.checkpoints,
                export.node,
                verified.checkpointed,
                if held.is_some() { "; extends the held checkpoint" } else { "" },
                if key.is_none() { "; key not pinned (use --key or --cluster-ca)" } else { "" }
            );
        }
        AuditCommand::Courier { ring, stick } => {
            anyhow::ensure!(stick.is_dir(), "{} is not a directory", stick.display());
            let outcome = sovereign_audit::write_ring_courier(&ring, &stick, None)?;
            anyhow::ensure!(
                !outcome.written.is_empty(),
                "no member's checkpoint reached the stick: {}",
                outcome.lines().join("; ")
            );
            for line in outcome.lines() {
                println!("{line}");
            }
        }
        AuditCommand::Show { log, json } => {
            let export = Export::load(&log)?;
            // A closed pipe (`| head`) is an error here, not a panic; main exits quietly.
            let mut out = std::io::stdout().lock();
            for line in &export.records {
                let stored: StoredRecord = serde_json::from_str(line)
                    .with_context(|| "a record is not valid; run `sovereign audit verify`")?;
                let r = &stored.record;
                if json {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                } else {
                    // An export may come from anywhere: no field reaches the
                    // terminal with its control characters.
                    writeln!(
                        out,
                        "{:>6} {} {} {} {}",
                        r.seq,
                        printable(&r.time),
                        printable(&r.event.service),
                        printable(&r.event.kind),
                        printable(&r.event.details.to_string())
                    )?;
                }
            }
        }
    }
    Ok(())
}
