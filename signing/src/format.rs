//! The on-disk header: magic, manifest length, signature slots, manifest.
//!
//! ```text
//! offset 0     8 bytes   magic "SOVBNDL\x01"
//! offset 8     u32 LE    manifest length (at most 1 MiB)
//! offset 12    u32 LE    number of signature slots (16)
//! offset 16    16 x 96   signature slots: ed25519 public key (32) + signature (64); all zero = empty
//! offset 1552  manifest  JSON, exactly the signed bytes
//! then         payload   (continues into NAME.sovb.001, .002, ... when split)
//! ```

use std::io::Read;

use crate::error::BundleError;
use crate::keys::PublicKey;
use crate::manifest::MAX_MANIFEST_LEN;

/// The file name extension of a bundle's first part.
pub const BUNDLE_EXTENSION: &str = "sovb";
pub(crate) const MAGIC: [u8; 8] = *b"SOVBNDL\x01";
pub(crate) const SLOT_COUNT: usize = 16;
pub(crate) const SLOT_LEN: usize = 96;
pub(crate) const SLOTS_OFFSET: u64 = 16;
pub(crate) const MANIFEST_OFFSET: u64 = SLOTS_OFFSET + (SLOT_COUNT * SLOT_LEN) as u64;
/// The most parts a bundle may have (`.001` to `.999` after the first).
pub(crate) const MAX_PARTS: u64 = 1000;

/// A parsed header: the exact manifest bytes and the filled signature slots.
pub(crate) struct Header {
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<(usize, PublicKey, [u8; 64])>,
    pub free_slot: Option<usize>,
}

impl Header {
    /// Bytes before the payload.
    pub fn len(&self) -> u64 {
        MANIFEST_OFFSET + self.manifest_bytes.len() as u64
    }

    /// Reads and checks a header from the start of a bundle's first part.
    pub fn read(reader: &mut impl Read) -> Result<Self, BundleError> {
        let mut fixed = [0u8; MANIFEST_OFFSET as usize];
        read_exact(reader, &mut fixed, "header")?;
        if fixed[..8] != MAGIC {
            return Err(BundleError::Malformed(
                "not a Sovereign bundle (bad magic)".into(),
            ));
        }
        let manifest_len = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize;
        let slot_count = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
        if slot_count != SLOT_COUNT {
            return Err(BundleError::Malformed(format!(
                "header claims {slot_count} signature slots, expected {SLOT_COUNT}"
            )));
        }
        if manifest_len == 0 || manifest_len > MAX_MANIFEST_LEN {
            return Err(BundleError::Malformed(format!(
                "header claims a manifest of {manifest_len} bytes, at most {MAX_MANIFEST_LEN}"
            )));
        }
        let mut signatures = Vec::new();
        let mut free_slot = None;
        for (index, slot) in fixed[SLOTS_OFFSET as usize..]
            .chunks_exact(SLOT_LEN)
            .enumerate()
        {
            if slot.iter().all(|&b| b == 0) {
                free_slot.get_or_insert(index);
                continue;
            }
            let key: [u8; 32] = slot[..32].try_into().unwrap_or([0; 32]);
            let signature: [u8; 64] = slot[32..].try_into().unwrap_or([0; 64]);
            let key = PublicKey::from_bytes(&key).map_err(|_| {
                BundleError::Malformed(format!("signature slot {index} holds an invalid key"))
            })?;
            signatures.push((index, key, signature));
        }
        let mut manifest_bytes = vec![0u8; manifest_len];
        read_exact(reader, &mut manifest_bytes, "manifest")?;
        Ok(Self {
            manifest_bytes,
            signatures,
            free_slot,
        })
    }
}

/// The fixed part of a header for a manifest of `manifest_len` bytes, slots empty.
pub(crate) fn fixed_header(manifest_len: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(MANIFEST_OFFSET as usize);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&(manifest_len as u32).to_le_bytes());
    header.extend_from_slice(&(SLOT_COUNT as u32).to_le_bytes());
    header.resize(MANIFEST_OFFSET as usize, 0);
    header
}

fn read_exact(reader: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), BundleError> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BundleError::Truncated(format!("the {what} is cut short"))
        } else {
            BundleError::Malformed(format!("reading the {what}: {e}"))
        }
    })
}

/// Whether `name` names a bundle's first part (`*.sovb`, not a hidden `._*` file).
pub fn is_bundle_file_name(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .strip_suffix(BUNDLE_EXTENSION)
            .is_some_and(|stem| stem.ends_with('.') && stem.len() > 1)
}

/// Whether `name` names a continuation part (`*.sovb.NNN`).
pub fn is_part_file_name(name: &str) -> bool {
    !name.starts_with('.')
        && name.rsplit_once('.').is_some_and(|(stem, number)| {
            number.len() == 3
                && number.bytes().all(|b| b.is_ascii_digit())
                && is_bundle_file_name(stem)
        })
}

/// The file name of part `index` (0 is the bundle file itself).
pub(crate) fn part_name(bundle_name: &str, index: u64) -> String {
    if index == 0 {
        bundle_name.to_owned()
    } else {
        format!("{bundle_name}.{index:03}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified() {
        assert!(is_bundle_file_name("demo-1.0.0.sovb"));
        assert!(!is_bundle_file_name("._demo-1.0.0.sovb"));
        assert!(!is_bundle_file_name(".sovb"));
        assert!(!is_bundle_file_name("demo.sovb.001"));
        assert!(is_part_file_name("demo.sovb.001"));
        assert!(!is_part_file_name("demo.sovb.01"));
        assert!(!is_part_file_name("._demo.sovb.001"));
        assert_eq!(part_name("a.sovb", 0), "a.sovb");
        assert_eq!(part_name("a.sovb", 12), "a.sovb.012");
    }

    #[test]
    fn header_claims_are_bounded() {
        let mut header = fixed_header(MAX_MANIFEST_LEN + 1);
        assert!(Header::read(&mut header.as_slice()).is_err());
        header = fixed_header(10);
        header[12] = 17;
        assert!(Header::read(&mut header.as_slice()).is_err());
        header = fixed_header(10);
        let err = Header::read(&mut header.as_slice()).err().unwrap();
        assert!(matches!(err, BundleError::Truncated(_)), "{err}");
    }
}
