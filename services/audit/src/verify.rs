//! Offline verification: every record's position, hash and signature, every
//! checkpoint, and consistency with a checkpoint the auditor already holds.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sovereign_signing::PublicKey;

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::log::{read_checkpoints, NODE, PUBLIC, RECORDS};
use crate::merkle::{root, Frontier, Hash};
use crate::record::{RawRecord, RecordBody};

/// Checks records in order and returns their leaf hashes; names the first bad one.
pub fn verify_records<'a>(
    lines: impl Iterator<Item = &'a str>,
    key: &PublicKey,
) -> Result<Vec<Hash>, AuditError> {
    let mut frontier = Frontier::default();
    let mut leaves = Vec::new();
    for (index, line) in lines.enumerate() {
        let seq = index as u64;
        let leaf = check_line(line, seq, &mut frontier, key)
            .map_err(|reason| AuditError::BadRecord { seq, reason })?;
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// Checks one stored line as record `seq` of the tree `frontier` holds so far:
/// its body is a record at that position, and its signature covers the
/// body's exact bytes and the tree head after it. Pushes the leaf on success.
pub(crate) fn check_line(
    line: &str,
    seq: u64,
    frontier: &mut Frontier,
    key: &PublicKey,
) -> Result<Hash, String> {
    let stored: RawRecord =
        serde_json::from_str(line).map_err(|e| format!("not a valid record ({e})"))?;
    let body: RecordBody = serde_json::from_str(stored.record.get())
        .map_err(|e| format!("not a valid record ({e})"))?;
    if body.seq != seq {
        return Err(format!(
            "holds sequence number {} (records deleted, inserted or reordered)",
            body.seq
        ));
    }
    let leaf = stored.leaf();
    let mut next = frontier.clone();
    next.push(leaf);
    if !stored.signature_ok(seq, &leaf, &next.root(), key) {
        return Err("content, tree head or signature does not match (edited or forged)".into());
    }
    *frontier = next;
    Ok(leaf)
}

/// A self-contained export of a node's audit log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Always `sovereign-audit-export/1`.
    pub format: String,
    /// The node's name.
    pub node: String,
    /// The node's public key (`ed25519:...`).
    pub public_key: String,
    /// The node's certificate, once enrollment exists.
    pub certificate: Option<String>,
    /// The stored record lines, exactly.
    pub records: Vec<String>,
    /// The checkpoint notes, oldest first.
    pub checkpoints: Vec<String>,
}

const EXPORT_FORMAT: &str = "sovereign-audit-export/1";

impl Export {
    /// Reads a log directory into an export.
    pub fn from_dir(dir: &Path) -> Result<Self, AuditError> {
        let read = |name: &str| {
            fs::read_to_string(dir.join(name)).map_err(|e| AuditError::io(dir.join(name), e))
        };
        let records = read(RECORDS)?;
        let complete = records.rfind('\n').map_or(0, |i| i + 1);
        Ok(Self {
            format: EXPORT_FORMAT.into(),
            node: read(NODE)?.trim().to_owned(),
            public_key: read(PUBLIC)?.trim().to_owned(),
            certificate: None,
            records: records[..complete].lines().map(str::to_owned).collect(),
            checkpoints: read_checkpoints(dir)?,
        })
    }

    /// Reads an export file, or a log directory.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let text = fs::read_to_string(path).map_err(|e| AuditError::io(path, e))?;
        let export: Export = serde_json::from_str(&text).map_err(|e| {
            AuditError::Format(format!("{} is not an audit export: {e}", path.display()))
        })?;
        if export.format != EXPORT_FORMAT {
            return Err(AuditError::Format(format!(
                "unknown export format {:?}",
                export.format
            )));
        }
        Ok(export)
    }

    /// Writes the export as JSON.
    pub fn write(&self, out: &Path) -> Result<(), AuditError> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| AuditError::Format(e.to_string()))?;
        crate::log::write_synced(out, text.as_bytes())
    }
}

/// What [`verify`] established.
#[derive(Debug)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The newest checkpoint's size (records after it are signed but not yet checkpointed).
    pub checkpointed: u64,
    /// The key everything was checked against.
    pub key: PublicKey,
}

/// Verifies an export: records, then every checkpoint against them, then the
/// auditor's own `held` checkpoint if given. `key` pins the node's key; without
/// it the export's own key is used (which proves integrity, not origin).
pub fn verify(
    export: &Export,
    key: Option<&PublicKey>,
    held: Option<&str>,
) -> Result<Verified, AuditError> {
    let embedded: PublicKey = export
        .public_key
        .parse()
        .map_err(|e: sovereign_signing::KeyError| AuditError::Format(e.to_string()))?;
    if let Some(pinned) = key {
        if *pinned != embedded {
            return Err(AuditError::Checkpoint(format!(
                "the export is signed by {embedded}, not by the expected {pinned}"
            )));
        }
    }
    let key = key.copied().unwrap_or(embedded);
    let leaves = verify_records(export.records.iter().map(String::as_str), &key)?;
    let mut checkpointed = 0;
    for note in &export.checkpoints {
        let checkpoint = Checkpoint::verify(note, &key)?;
        check_against(&checkpoint, &leaves)?;
        checkpointed = checkpointed.max(checkpoint.size);
    }
    if let Some(note) = held {
        let checkpoint = Checkpoint::verify(note, &key)?;
        check_against(&checkpoint, &leaves)?;
    }
    Ok(Verified {
        records: leaves.len() as u64,
        checkpoints: export.checkpoints.len(),
        checkpointed,
        key,
    })
}

fn check_against(checkpoint: &Checkpoint, leaves: &[Hash]) -> Result<(), AuditError> {
    let size = checkpoint.size;
    if size > leaves.len() as u64 {
        return Err(AuditError::Inconsistent(format!(
            "log is truncated: a checkpoint covers {size} records, the log holds {}",
            leaves.len()
        )));
    }
    if root(&leaves[..size as usize]) != checkpoint.root {
        return Err(AuditError::Inconsistent(format!(
            "log forks from the checkpoint at size {size}: its history was rewritten"
        )));
    }
    Ok(())
}
