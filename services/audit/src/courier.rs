//! The stick as the auditor's courier: after an import the node leaves its
//! newest signed checkpoint and a consistency proof from the checkpoint it
//! left on that stick last time, so history cannot be rewritten between visits.
//!
//! ```text
//! STICK/sovereign-audit/NODE/checkpoint            newest checkpoint note
//! STICK/sovereign-audit/NODE/previous-checkpoint   the one written here before (if any)
//! STICK/sovereign-audit/NODE/consistency-proof.json {old_size, new_size, proof: [hex]}
//! STICK/sovereign-audit/NODE/certificate.pem      the node certificate (once enrolled)
//! ```
//!
//! With the certificate, an auditor who holds only the cluster CA checks a
//! courier folder ([`verify_courier_with_ca`]).
//!
//! Every file of a courier folder is read as from a stick
//! (`sovereign_signing::stick`): no symlink followed, no FIFO waited on, no
//! more than its format's bound; the folders written are checked to be real
//! directories, and files are created anew (never through a planted link).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sovereign_identity::{ClusterCa, PeerInfo, RevocationList};
use sovereign_signing::PublicKey;

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::log::{write_synced, AuditLog};
use crate::merkle::{verify_consistency, Hash};
use crate::record::hex;
use crate::verify::certified_key;

/// A consistency proof as written to the stick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CourierProof {
    /// Size of the previous checkpoint.
    pub old_size: u64,
    /// Size of the new checkpoint.
    pub new_size: u64,
    /// The proof's hashes, hex.
    pub proof: Vec<String>,
}

/// What the node leaves on a stick: made by the log's owner (in-process, or
/// the audit daemon over its socket), written by whoever may write the stick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CourierPackage {
    /// The node's name (the folder under `sovereign-audit/`).
    pub node: String,
    /// The newest checkpoint note.
    pub checkpoint: String,
    /// The previous checkpoint found on the stick, if it verified.
    pub previous: Option<String>,
    /// The proof from `previous` to `checkpoint`.
    pub proof: CourierProof,
    /// The CA-issued certificate (PEM) of the key that signed `checkpoint`.
    #[serde(default)]
    pub certificate: Option<String>,
}

/// Largest checkpoint note read from a stick (a note and a few signatures).
const MAX_CHECKPOINT_BYTES: u64 = 16 * 1024;
/// Largest consistency proof read (64 hashes in JSON need under 5 KiB).
const MAX_PROOF_BYTES: u64 = 64 * 1024;
/// Largest node certificate read.
const MAX_CERTIFICATE_BYTES: u64 = 16 * 1024;

/// The text of courier file `name` in `dir`, bounded by its format.
fn read_courier_file(dir: &Path, name: &str) -> Result<String, AuditError> {
    let max = match name {
        "consistency-proof.json" => MAX_PROOF_BYTES,
        "certificate.pem" => MAX_CERTIFICATE_BYTES,
        _ => MAX_CHECKPOINT_BYTES,
    };
    let path = dir.join(name);
    sovereign_signing::stick::read_bounded_text(&path, max).map_err(|e| AuditError::io(&path, e))
}

/// The courier folder of `node` on `stick`.
pub fn courier_dir(stick: &Path, node: &str) -> PathBuf {
    stick.join("sovereign-audit").join(node)
}

/// The checkpoint a stick carries from the last visit, if any.
pub fn previous_checkpoint(stick: &Path, node: &str) -> Option<String> {
    read_courier_file(&courier_dir(stick, node), "checkpoint").ok()
}

/// A fresh checkpoint of `log` and the proof from `previous` (the stick's
/// last checkpoint; ignored unless signed by this log's key).
pub fn courier_package(
    log: &AuditLog,
    previous: Option<&str>,
) -> Result<CourierPackage, AuditError> {
    let previous = previous.and_then(|note| Checkpoint::verify(note, &log.public_key()).ok());
    let checkpoint = log.checkpoint()?;
    let old_size = previous.as_ref().map_or(0, |p| p.size);
    let proof = log.consistency_proof(old_size, checkpoint.size)?;
    Ok(CourierPackage {
        node: log.node().to_owned(),
        checkpoint: checkpoint.note,
        previous: previous.map(|p| p.note),
        proof: CourierProof {
            old_size,
            new_size: checkpoint.size,
            proof: proof.iter().map(hex).collect(),
        },
        certificate: log.certificate().map(str::to_owned),
    })
}

/// Writes `package` into its folder under `stick`; returns the folder.
pub fn write_package(package: &CourierPackage, stick: &Path) -> Result<PathBuf, AuditError> {
    let valid = !package.node.is_empty()
        && package.node.len() <= 64
        && package
            .node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !package.node.starts_with('.');
    if !valid {
        return Err(AuditError::Format(format!(
            "courier: {:?} is not a node name",
            package.node
        )));
    }
    let dir = courier_dir(stick, &package.node);
    fs::create_dir_all(&dir).map_err(|e| AuditError::io(&dir, e))?;
    for folder in [stick.join("sovereign-audit"), dir.clone()] {
        let meta = fs::symlink_metadata(&folder).map_err(|e| AuditError::io(&folder, e))?;
        if !meta.is_dir() {
            return Err(AuditError::Format(format!(
                "courier: {} is not a directory (a symlink?)",
                folder.display()
            )));
        }
    }
    if let Some(previous) = &package.previous {
        write_synced(&dir.join("previous-checkpoint"), previous.as_bytes())?;
    }
    let text = serde_json::to_string_pretty(&package.proof)
        .map_err(|e| AuditError::Format(e.to_string()))?;
    write_synced(&dir.join("consistency-proof.json"), text.as_bytes())?;
    if let Some(certificate) = &package.certificate {
        write_synced(&dir.join("certificate.pem"), certificate.as_bytes())?;
    }
    write_synced(&dir.join("checkpoint"), package.checkpoint.as_bytes())?;
    Ok(dir)
}

/// Writes the courier folder for `log` under `stick`; returns the folder.
pub fn write_courier(log: &AuditLog, stick: &Path) -> Result<PathBuf, AuditError> {
    let previous = previous_checkpoint(stick, log.node());
    write_package(&courier_package(log, previous.as_deref())?, stick)
}

/// Checks a courier folder: both checkpoints signed by `key` and the proof
/// linking them. Returns the new checkpoint.
pub fn verify_courier(dir: &Path, key: &PublicKey) -> Result<Checkpoint, AuditError> {
    verify_package(&read_package(dir)?, key)
}

/// The courier folder `dir` as a package (the node named by the folder).
fn read_package(dir: &Path) -> Result<CourierPackage, AuditError> {
    let read = |name: &str| read_courier_file(dir, name);
    let checkpoint = read("checkpoint")?;
    let proof: CourierProof = serde_json::from_str(&read("consistency-proof.json")?)
        .map_err(|e| AuditError::Format(format!("consistency-proof.json: {e}")))?;
    let previous = if proof.old_size == 0 {
        None
    } else {
        Some(read("previous-checkpoint")?)
    };
    Ok(CourierPackage {
        node: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        checkpoint,
        previous,
        proof,
        certificate: read("certificate.pem").ok(),
    })
}

/// Checks a package: both checkpoints signed by `key` and the proof linking
/// them. Returns the new checkpoint.
pub fn verify_package(package: &CourierPackage, key: &PublicKey) -> Result<Checkpoint, AuditError> {
    let new = Checkpoint::verify(&package.checkpoint, key)?;
    let proof = &package.proof;
    let hashes = proof
        .proof
        .iter()
        .map(|h| parse_hex(h))
        .collect::<Option<Vec<Hash>>>()
        .ok_or_else(|| {
            AuditError::Format("consistency-proof.json: a hash is not 64 hex digits".into())
        })?;
    if proof.new_size != new.size {
        return Err(AuditError::Inconsistent(
            "the proof does not end at the checkpoint".into(),
        ));
    }
    if proof.old_size == 0 {
        return Ok(new);
    }
    let previous = package.previous.as_deref().ok_or_else(|| {
        AuditError::Format("a proof from an earlier checkpoint comes without it".into())
    })?;
    let old = Checkpoint::verify(previous, key)?;
    if old.size != proof.old_size
        || !verify_consistency(old.size, new.size, &old.root, &new.root, &hashes)
    {
        return Err(AuditError::Inconsistent(format!(
            "checkpoint at size {} is not an extension of the one at size {}: history was rewritten",
            new.size, old.size
        )));
    }
    Ok(new)
}

/// [`verify_courier`] with the key of the folder's node certificate, which
/// must be issued by `ca`, valid at `now` and not revoked.
pub fn verify_courier_with_ca(
    dir: &Path,
    ca: &ClusterCa,
    revocations: &RevocationList,
    now: SystemTime,
) -> Result<(Checkpoint, PeerInfo), AuditError> {
    verify_package_with_ca(&read_package(dir)?, ca, revocations, now)
}

/// [`verify_package`] with the key of the package's node certificate, which
/// must be issued by `ca`, valid at `now` and not revoked.
pub fn verify_package_with_ca(
    package: &CourierPackage,
    ca: &ClusterCa,
    revocations: &RevocationList,
    now: SystemTime,
) -> Result<(Checkpoint, PeerInfo), AuditError> {
    let peer = certified_key(package.certificate.as_deref(), ca, revocations, now)?;
    let key = PublicKey::from_bytes(&peer.public_key.to_bytes())?;
    Ok((verify_package(package, &key)?, peer))
}

fn parse_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
