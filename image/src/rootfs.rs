//! The read-only root: the tree packed into erofs (lz4hc, every timestamp the
//! build's epoch, a UUID derived from the contents) and its dm-verity hash
//! tree, whose root hash the boot path enforces.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::BuildError;
use crate::tool;

/// The packed root and its verity data.
#[derive(Debug, Clone)]
pub struct VerifiedRoot {
    /// The erofs image.
    pub data: PathBuf,
    /// The dm-verity hash tree.
    pub hash: PathBuf,
    /// The dm-verity root hash (hex).
    pub root_hash: String,
}

/// A UUID (RFC 4122 text form, version 4 bits set) derived from `seed` and a purpose.
pub fn derived_uuid(purpose: &str, seed: &[u8]) -> String {
    let bytes = blake3::derive_key(&format!("sovereign-image {purpose}"), seed);
    uuid_text(&bytes[..16])
}

/// The RFC 4122 text of 16 bytes, marked as a random (version 4) UUID.
pub fn uuid_text(bytes: &[u8]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Packs `root` into `work/root.erofs` and computes its hash tree; `seed`
/// (the tree's listing) makes the filesystem UUID and the verity salt.
pub fn pack(root: &Path, seed: &[u8], work: &Path, epoch: u64) -> Result<VerifiedRoot, BuildError> {
    let data = work.join("root.erofs");
    let hash = work.join("root.verity");
    tool::run(
        Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(format!("-T{epoch}"))
            .arg(format!("-U{}", derived_uuid("erofs uuid", seed)))
            .arg("--quiet")
            .arg(&data)
            .arg(root),
        epoch,
    )?;
    let salt = blake3::derive_key("sovereign-image verity salt", seed);
    let salt: String = salt.iter().map(|x| format!("{x:02x}")).collect();
    let out = tool::run(
        Command::new("veritysetup")
            .arg("format")
            .args(["--data-block-size=4096", "--hash-block-size=4096"])
            .arg(format!("--salt={salt}"))
            .arg(format!("--uuid={}", derived_uuid("verity uuid", seed)))
            .arg(&data)
            .arg(&hash),
        epoch,
    )?;
    let text = String::from_utf8_lossy(&out);
    let root_hash = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            BuildError::Unexpected(format!("veritysetup printed no root hash: {text}"))
        })?;
    Ok(VerifiedRoot {
        data,
        hash,
        root_hash,
    })
}
