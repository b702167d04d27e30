//! Signed checkpoints in the C2SP signed-note format:
//!
//! ```text
//! sovereign-audit/NODE
//! <tree size>
//! <base64 tree head>
//!
//! — NODE <base64(key hash[0..4] || ed25519 signature)>
//! ```

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use sovereign_signing::{PublicKey, SigningKey};

use crate::error::AuditError;
use crate::merkle::Hash;

/// A tree head signed by a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The node's name (the note's key name).
    pub node: String,
    /// Records covered.
    pub size: u64,
    /// Tree head over them.
    pub root: Hash,
    /// The note's text, signature included.
    pub note: String,
}

fn origin(node: &str) -> String {
    format!("sovereign-audit/{node}")
}

/// The 4-byte key hash of a signed note's signature line (C2SP: SHA-256 of
/// name, newline, the ed25519 type byte and the key).
fn key_hash(node: &str, key: &PublicKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update(b"\n\x01");
    h.update(key.to_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

impl Checkpoint {
    /// Signs a checkpoint.
    pub fn sign(node: &str, size: u64, root: &Hash, key: &SigningKey) -> Self {
        let body = format!("{}\n{size}\n{}\n", origin(node), B64.encode(root));
        let mut sig = key_hash(node, &key.public_key()).to_vec();
        sig.extend(key.sign(body.as_bytes()));
        let note = format!("{body}\n\u{2014} {node} {}\n", B64.encode(sig));
        Self {
            node: node.into(),
            size,
            root: *root,
            note,
        }
    }

    /// Parses a note and checks its signature with `key`.
    pub fn verify(note: &str, key: &PublicKey) -> Result<Self, AuditError> {
        let bad = |why: &str| AuditError::Checkpoint(why.to_owned());
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line after the body"))?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        let node = lines
            .next()
            .and_then(|l| l.strip_prefix("sovereign-audit/"))
            .ok_or_else(|| bad("origin line is not sovereign-audit/NODE"))?
            .to_owned();
        let size: u64 = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| bad("tree size is not a number"))?;
        let root: Hash = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("tree head is not 32 bytes of base64"))?;
        if lines.next().is_some() {
            return Err(bad("unexpected lines in the body"));
        }
        let expected = key_hash(&node, key);
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix(&format!("\u{2014} {node} ")) else {
                continue;
            };
            let Some(sig) = B64.decode(rest).ok().filter(|s| s.len() == 68) else {
                continue;
            };
            if sig[..4] == expected {
                let signature: [u8; 64] = sig[4..]
                    .try_into()
                    .map_err(|_| bad("bad signature length"))?;
                if key.verify(body.as_bytes(), &signature) {
                    return Ok(Self {
                        node,
                        size,
                        root,
                        note: note.to_owned(),
                    });
                }
                return Err(AuditError::Checkpoint(format!(
                    "checkpoint at size {size} has a signature that does not verify with {key}"
                )));
            }
        }
        Err(AuditError::Checkpoint(format!(
            "checkpoint at size {size} is not signed by {key}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_reject_other_keys_and_edits() {
        let key = SigningKey::from_seed(&[5; 32]);
        let other = SigningKey::from_seed(&[6; 32]);
        let cp = Checkpoint::sign("node-a", 42, &[7; 32], &key);
        assert_eq!(Checkpoint::verify(&cp.note, &key.public_key()).unwrap(), cp);
        assert!(Checkpoint::verify(&cp.note, &other.public_key()).is_err());
        let edited = cp.note.replacen("\n42\n", "\n43\n", 1);
        assert!(Checkpoint::verify(&edited, &key.public_key()).is_err());
    }
}
