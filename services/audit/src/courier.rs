//! The stick as the auditor's courier: after an import the node leaves its
//! newest signed checkpoint and a consistency proof from the checkpoint it
//! left on that stick last time, so history cannot be rewritten between visits.
//!
//! ```text
//! STICK/sovereign-audit/NODE/checkpoint            newest checkpoint note
//! STICK/sovereign-audit/NODE/previous-checkpoint   the one written here before (if any)
//! STICK/sovereign-audit/NODE/consistency-proof.json {old_size, new_size, proof: [hex]}
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sovereign_signing::PublicKey;

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::log::{write_synced, AuditLog};
use crate::merkle::{verify_consistency, Hash};
use crate::record::hex;

/// A consistency proof as written to the stick.
#[derive(Debug, Serialize, Deserialize)]
pub struct CourierProof {
    /// Size of the previous checkpoint.
    pub old_size: u64,
    /// Size of the new checkpoint.
    pub new_size: u64,
    /// The proof's hashes, hex.
    pub proof: Vec<String>,
}

/// Writes the courier folder for `log` under `stick`; returns the folder.
pub fn write_courier(log: &AuditLog, stick: &Path) -> Result<PathBuf, AuditError> {
    let dir = stick.join("sovereign-audit").join(log.node());
    fs::create_dir_all(&dir).map_err(|e| AuditError::io(&dir, e))?;
    let previous = match fs::read_to_string(dir.join("checkpoint")) {
        Ok(note) => Checkpoint::verify(&note, &log.public_key()).ok(),
        Err(_) => None,
    };
    let checkpoint = log.checkpoint()?;
    let old_size = previous.as_ref().map_or(0, |p| p.size);
    let proof = log.consistency_proof(old_size, checkpoint.size)?;
    if let Some(previous) = &previous {
        write_synced(&dir.join("previous-checkpoint"), previous.note.as_bytes())?;
    }
    let proof = CourierProof {
        old_size,
        new_size: checkpoint.size,
        proof: proof.iter().map(hex).collect(),
    };
    let text =
        serde_json::to_string_pretty(&proof).map_err(|e| AuditError::Format(e.to_string()))?;
    write_synced(&dir.join("consistency-proof.json"), text.as_bytes())?;
    write_synced(&dir.join("checkpoint"), checkpoint.note.as_bytes())?;
    Ok(dir)
}

/// Checks a courier folder: both checkpoints signed by `key` and the proof
/// linking them. Returns the new checkpoint.
pub fn verify_courier(dir: &Path, key: &PublicKey) -> Result<Checkpoint, AuditError> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name)).map_err(|e| AuditError::io(dir.join(name), e))
    };
    let new = Checkpoint::verify(&read("checkpoint")?, key)?;
    let proof: CourierProof = serde_json::from_str(&read("consistency-proof.json")?)
        .map_err(|e| AuditError::Format(format!("consistency-proof.json: {e}")))?;
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
    let old = Checkpoint::verify(&read("previous-checkpoint")?, key)?;
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
