//! Audit records: what happened, where, and the signature binding each one
//! to the tree head after it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sovereign_signing::{PublicKey, SigningKey};

use crate::merkle::{leaf_hash, Hash};

/// Longest event accepted, as compact JSON (service, kind and details).
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

/// Deepest nesting of arrays and objects accepted in an event's details.
pub const MAX_DETAILS_DEPTH: usize = 16;

/// Longest `service` or `kind` name.
const MAX_NAME: usize = 32;

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

    /// Why this event may not be recorded, if it may not: `service` and `kind`
    /// are short names of `[a-z0-9-]`, the details nest at most
    /// [`MAX_DETAILS_DEPTH`] deep and the whole is at most [`MAX_EVENT_BYTES`].
    pub fn check(&self) -> Result<(), String> {
        for (field, name) in [("service", &self.service), ("kind", &self.kind)] {
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(format!(
                    "{field} {:?} is not a name of at most {MAX_NAME} characters a-z, 0-9, -",
                    name.chars().take(MAX_NAME + 1).collect::<String>()
                ));
            }
        }
        if depth(&self.details) > MAX_DETAILS_DEPTH {
            return Err(format!(
                "details nest too deep (more than {MAX_DETAILS_DEPTH} levels)"
            ));
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |b| b.len());
        if size > MAX_EVENT_BYTES {
            return Err(format!(
                "event of {size} bytes is over the limit of {MAX_EVENT_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// Nesting depth of a JSON value (a scalar is 0), without recursion.
fn depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, level)) = stack.pop() {
        deepest = deepest.max(level);
        match value {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|v| (v, level + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|v| (v, level + 1))),
            _ => {}
        }
    }
    deepest
}

/// Who sent an event, as the kernel reports it for the daemon's socket
/// (`SO_PEERCRED`): a client cannot choose these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The sending process's user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its process id.
    pub pid: i32,
    /// The user's name, where the daemon could resolve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
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
    /// Who sent it over the daemon's socket (absent when the log's owner
    /// recorded it in-process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

impl RecordBody {
    /// The bytes stored for this body and hashed as its leaf. A verifier
    /// hashes the stored bytes as they are, never a re-serialisation.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A stored record: the body, the tree head after it, and the node's signature.
///
/// The line on disk is `{"record":BODY,"root":"HEX","sig":"BASE64"}`; the
/// leaf hash covers BODY's exact bytes (see [`RawRecord`]).
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

/// The stored line of a record whose body serialised to `body` (position
/// `seq`), sealed with the tree head after it (no newline).
pub fn seal_line(seq: u64, body: &[u8], root: &Hash, key: &SigningKey) -> Vec<u8> {
    let sig = key.sign(&signed_bytes(seq + 1, &leaf_hash(body), root));
    let mut line = b"{\"record\":".to_vec();
    line.extend_from_slice(body);
    line.extend_from_slice(
        format!(
            ",\"root\":\"{}\",\"sig\":\"{}\"}}",
            hex(root),
            B64.encode(sig)
        )
        .as_bytes(),
    );
    line
}

/// A stored line as the verifier reads it: the body's exact bytes, unparsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecord<'a> {
    /// The body exactly as stored: what the leaf hash covers.
    #[serde(borrow)]
    pub record: &'a serde_json::value::RawValue,
    /// Tree head (hex) over records 0..=seq.
    pub root: String,
    /// ed25519 signature (base64).
    pub sig: String,
}

impl RawRecord<'_> {
    /// The leaf hash of the stored body bytes.
    pub fn leaf(&self) -> Hash {
        leaf_hash(self.record.get().as_bytes())
    }

    /// Whether the signature verifies for record `seq`, its leaf and the tree head.
    pub fn signature_ok(&self, seq: u64, leaf: &Hash, root: &Hash, key: &PublicKey) -> bool {
        let Some(sig) = B64
            .decode(&self.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
        else {
            return false;
        };
        self.root == hex(root) && key.verify(&signed_bytes(seq + 1, leaf, root), &sig)
    }
}
