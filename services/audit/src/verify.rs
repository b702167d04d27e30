//! Offline verification: every record's position, hash and signature, every
//! checkpoint, and consistency with a checkpoint the auditor already holds.

use std::fs;
use std::path::Path;

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sovereign_identity::{ClusterCa, PeerInfo, RevocationList};
use sovereign_signing::PublicKey;

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::keychange;
use crate::log::{read_checkpoints, NODE, PUBLIC, RECORDS};
use crate::merkle::{root, Frontier, Hash};
use crate::record::{RawRecord, RecordBody};

/// Checks records in order and returns their leaf hashes; names the first bad one.
pub fn verify_records<'a>(
    lines: impl Iterator<Item = &'a str>,
    key: &PublicKey,
) -> Result<Vec<Hash>, AuditError> {
    Ok(verify_chain(lines, key)?.leaves)
}

/// What [`verify_chain`] found: the leaves, and the keys in force.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Every record's leaf hash.
    pub leaves: Vec<Hash>,
    /// `(size, key)`: from a tree of `size` records on, `key` signs (the
    /// first entry is `(0, initial key)`).
    pub keys: Vec<(u64, PublicKey)>,
    /// The certificate of the last key change, if the log was enrolled.
    pub certificate: Option<String>,
    /// The key that signs records and checkpoints now.
    pub current_key: PublicKey,
}

impl Chain {
    /// The key that signs a checkpoint of `size` records.
    pub fn key_at(&self, size: u64) -> PublicKey {
        self.keys
            .iter()
            .rev()
            .find(|(from, _)| *from <= size)
            .map_or(self.current_key, |(_, k)| *k)
    }
}

/// Checks records in order, starting with `key` and following key-change
/// records; names the first bad one.
pub fn verify_chain<'a>(
    lines: impl Iterator<Item = &'a str>,
    key: &PublicKey,
) -> Result<Chain, AuditError> {
    let mut frontier = Frontier::default();
    let mut leaves = Vec::new();
    let mut keys = vec![(0, *key)];
    let mut certificate = None;
    let mut key = *key;
    for (index, line) in lines.enumerate() {
        let seq = index as u64;
        let bad = |reason: String| AuditError::BadRecord { seq, reason };
        let leaf = check_line(line, seq, &mut frontier, &key).map_err(bad)?;
        leaves.push(leaf);
        let change = match line.contains(keychange::KIND) {
            true => keychange::parse(&record_body(line).map_err(bad)?, &key).map_err(bad)?,
            false => None,
        };
        if let Some(change) = change {
            key = change.new_key;
            keys.push((seq + 1, key));
            certificate = Some(change.certificate);
        }
    }
    Ok(Chain {
        leaves,
        keys,
        certificate,
        current_key: key,
    })
}

/// The body of a stored line.
fn record_body(line: &str) -> Result<RecordBody, String> {
    let stored: RawRecord =
        serde_json::from_str(line).map_err(|e| format!("not a valid record ({e})"))?;
    serde_json::from_str(stored.record.get()).map_err(|e| format!("not a valid record ({e})"))
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
    /// The key the log started with (`ed25519:...`); key-change records
    /// hand it on to the enrolled key.
    pub public_key: String,
    /// The certificate (PEM) of the key that signs the log now, issued by
    /// the cluster CA; absent for a log that was never enrolled.
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
        let public_key = read(PUBLIC)?.trim().to_owned();
        let records: Vec<String> = records[..complete].lines().map(str::to_owned).collect();
        let initial: PublicKey = public_key
            .parse()
            .map_err(|e: sovereign_signing::KeyError| AuditError::Format(e.to_string()))?;
        let certificate = verify_chain(records.iter().map(String::as_str), &initial)?.certificate;
        Ok(Self {
            format: EXPORT_FORMAT.into(),
            node: read(NODE)?.trim().to_owned(),
            public_key,
            certificate,
            records,
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
    /// The key that signs the log now (the enrolled key after a key change).
    pub key: PublicKey,
    /// Key changes in the log (enrollment, renewals).
    pub key_changes: usize,
    /// The certificate of the current key (PEM), when the log was enrolled.
    pub certificate: Option<String>,
}

/// Verifies an export: records (following key changes), then every
/// checkpoint against them, then the auditor's own `held` checkpoint if
/// given. `key` pins one of the node's keys (its raw key from before
/// enrollment, or a later one); without it the export's own key is used,
/// which proves integrity, not origin (see [`verify_with_ca`]).
pub fn verify(
    export: &Export,
    key: Option<&PublicKey>,
    held: Option<&str>,
) -> Result<Verified, AuditError> {
    let embedded: PublicKey = export
        .public_key
        .parse()
        .map_err(|e: sovereign_signing::KeyError| AuditError::Format(e.to_string()))?;
    let chain = verify_chain(export.records.iter().map(String::as_str), &embedded)?;
    if let Some(pinned) = key {
        if !chain.keys.iter().any(|(_, k)| k == pinned) {
            return Err(AuditError::Checkpoint(format!(
                "the export is signed by {embedded}, not by the expected {pinned}"
            )));
        }
    }
    if let (Some(carried), Some(logged)) = (&export.certificate, &chain.certificate) {
        if carried != logged {
            return Err(AuditError::Format(
                "the export's certificate is not the one its last key change records".into(),
            ));
        }
    }
    let mut checkpointed = 0;
    for note in &export.checkpoints {
        let checkpoint = verify_checkpoint(note, &chain)?;
        check_against(&checkpoint, &chain.leaves)?;
        checkpointed = checkpointed.max(checkpoint.size);
    }
    if let Some(note) = held {
        let checkpoint = verify_checkpoint(note, &chain)?;
        check_against(&checkpoint, &chain.leaves)?;
    }
    Ok(Verified {
        records: chain.leaves.len() as u64,
        checkpoints: export.checkpoints.len(),
        checkpointed,
        key: chain.current_key,
        key_changes: chain.keys.len() - 1,
        certificate: chain.certificate,
    })
}

/// A checkpoint signed by one of the log's keys.
fn verify_checkpoint(note: &str, chain: &Chain) -> Result<Checkpoint, AuditError> {
    let mut first_error = None;
    for (_, key) in chain.keys.iter().rev() {
        match Checkpoint::verify(note, key) {
            Ok(checkpoint) => return Ok(checkpoint),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| AuditError::Checkpoint("no key to check".into())))
}

/// [`verify`], then the log's origin: the certificate of the key that signs
/// it now must be issued by `ca`, valid at `now` and not revoked. An
/// auditor needs only the cluster's CA certificate.
pub fn verify_with_ca(
    export: &Export,
    ca: &ClusterCa,
    revocations: &RevocationList,
    now: SystemTime,
    held: Option<&str>,
) -> Result<(Verified, PeerInfo), AuditError> {
    let verified = verify(export, None, held)?;
    let peer = certified_key(verified.certificate.as_deref(), ca, revocations, now)?;
    if peer.public_key.to_bytes() != verified.key.to_bytes() {
        return Err(AuditError::Format(format!(
            "the certificate of {} certifies another key than {} that signs the log",
            peer.name, verified.key
        )));
    }
    Ok((verified, peer))
}

/// Checks a node certificate (PEM) against the CA.
pub(crate) fn certified_key(
    certificate: Option<&str>,
    ca: &ClusterCa,
    revocations: &RevocationList,
    now: SystemTime,
) -> Result<PeerInfo, AuditError> {
    let pem = certificate.ok_or_else(|| {
        AuditError::Format(
            "the log carries no node certificate (it was never signed by an enrolled key): verify it with --key".into(),
        )
    })?;
    let der = sovereign_identity::first_certificate("the log's node certificate", pem)?;
    Ok(ca.verify_peer(&der, revocations, now)?)
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
