//! Key changes inside a log. A log starts with a raw node key; enrollment
//! (and each renewal) appends one `node`/`key-change` record, signed by the
//! key in force, that names the new key, carries its CA-issued certificate
//! and a signature by the new key over both keys. Records after it are
//! signed by the new key, so one log verifies across the change, and an
//! auditor holding only the cluster CA trusts the history through the
//! certificate of the last key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sovereign_signing::{PublicKey, SigningKey};

use crate::record::{Event, RecordBody};

/// The service of a key-change record.
pub const SERVICE: &str = "node";
/// The kind of a key-change record.
pub const KIND: &str = "key-change";

/// What the new key signs: both keys, so the link cannot be replayed.
fn link_bytes(old: &PublicKey, new: &PublicKey) -> Vec<u8> {
    let mut bytes = b"sovereign-audit/1 key-change\n".to_vec();
    bytes.extend(old.to_bytes());
    bytes.extend(new.to_bytes());
    bytes
}

/// The record that hands the log from `old` to `new` (certified by `certificate`, PEM).
pub fn event(old: &PublicKey, new: &SigningKey, certificate: &str, serial: u64) -> Event {
    let link = new.sign(&link_bytes(old, &new.public_key()));
    Event::new(
        SERVICE,
        KIND,
        serde_json::json!({
            "old_key": old.to_string(),
            "new_key": new.public_key().to_string(),
            "serial": serial,
            "certificate": certificate,
            "link": B64.encode(link),
        }),
    )
}

/// A verified key change.
#[derive(Clone, Debug)]
pub struct KeyChange {
    /// The key that signs the records after it.
    pub new_key: PublicKey,
    /// Its certificate (PEM).
    pub certificate: String,
}

/// If `record` is a key change, checks it against the key in force and
/// returns it; other records give `Ok(None)`.
pub fn parse(record: &RecordBody, current: &PublicKey) -> Result<Option<KeyChange>, String> {
    if record.event.service != SERVICE || record.event.kind != KIND {
        return Ok(None);
    }
    let details = &record.event.details;
    let text = |field: &str| {
        details[field]
            .as_str()
            .ok_or_else(|| format!("key change without {field}"))
    };
    let old: PublicKey = text("old_key")?
        .parse()
        .map_err(|e| format!("key change: old key: {e}"))?;
    let new: PublicKey = text("new_key")?
        .parse()
        .map_err(|e| format!("key change: new key: {e}"))?;
    if old != *current {
        return Err(format!(
            "key change names {old} as the old key, but the log is signed by {current}"
        ));
    }
    let link: [u8; 64] = B64
        .decode(text("link")?)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or("key change: link is not a signature")?;
    if !new.verify(&link_bytes(&old, &new), &link) {
        return Err("key change: the new key's link signature does not verify".into());
    }
    Ok(Some(KeyChange {
        new_key: new,
        certificate: text("certificate")?.to_owned(),
    }))
}
