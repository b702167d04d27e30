//! Audit records: what happened, where, and the signature binding each one
//! to the tree head after it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sovereign_signing::{PublicKey, SigningKey};

use crate::merkle::{leaf_hash, Hash};

/// One event to record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The service that acted: `import`, `api`, `inference`, `ring`, `node`, `cli`.
    pub service: String,
    /// What happened: `import`, `model-loaded`, `api-request`, `usb-device`,
    /// `config-change`, `key-change`, `boot`, `egress-drops`, ...
    pub kind: String,
    /// Structured details (never prompt text unless configured).
    pub details: serde_json::Value,
}

impl Event {
    /// An event with details.
    pub fn new(service: &str, kind: &str, details: serde_json::Value) -> Self {
        Self {
            service: service.into(),
            kind: kind.into(),
            details,
        }
    }
}

/// The leaf content of a record: the part the Merkle tree hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordBody {
    /// Position in the log, from 0.
    pub seq: u64,
    /// Hardware-clock time, RFC 3339 (advisory: nodes have no NTP; order comes from `seq`).
    pub time: String,
    /// The node's name.
    pub node: String,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

impl RecordBody {
    /// The exact bytes hashed as the leaf.
    pub fn leaf_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A stored record: the body, the tree head after it, and the node's signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRecord {
    /// The leaf content.
    pub record: RecordBody,
    /// Tree head (hex) over records 0..=seq.
    pub root: String,
    /// ed25519 signature (base64) over [`signed_bytes`].
    pub sig: String,
}

/// What a record's signature covers: domain, size, leaf hash, tree head.
pub fn signed_bytes(size: u64, leaf: &Hash, root: &Hash) -> Vec<u8> {
    let mut bytes = b"sovereign-audit/1 record\n".to_vec();
    bytes.extend(size.to_be_bytes());
    bytes.extend(leaf);
    bytes.extend(root);
    bytes
}

/// Hex of a hash.
pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl StoredRecord {
    /// Seals `record` given the tree head after it.
    pub fn seal(record: RecordBody, root: &Hash, key: &SigningKey) -> Self {
        let leaf = leaf_hash(&record.leaf_bytes());
        let sig = key.sign(&signed_bytes(record.seq + 1, &leaf, root));
        Self {
            record,
            root: hex(root),
            sig: B64.encode(sig),
        }
    }

    /// Whether the signature verifies for the recomputed leaf and tree head.
    pub fn signature_ok(&self, leaf: &Hash, root: &Hash, key: &PublicKey) -> bool {
        let Some(sig) = B64
            .decode(&self.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
        else {
            return false;
        };
        self.root == hex(root) && key.verify(&signed_bytes(self.record.seq + 1, leaf, root), &sig)
    }

    /// The JSON line stored in the log (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
