//! The build manifest: what went in (spec, sources, lock, binaries, trust,
//! EFI stub), every package with version and `.deb` hash, the verity root
//! hash, the kernel command line and the image's sha256. Signed with the
//! build key as a detached signature over the exact bytes
//! (`<manifest>.sig`: `ed25519:<key> <base64 signature>`); `verify` checks an
//! image against it.

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sovereign_signing::{PublicKey, SigningKey};

use crate::error::{BuildError, VerifyError};
use crate::lock::Package;

/// The manifest's format tag.
pub const FORMAT: &str = "sovereign-image-manifest/1";

/// A build manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The image file.
    pub image: ImageFacts,
    /// `production` or `test`.
    pub profile: String,
    /// The spec as built (after command-line overrides).
    pub spec: serde_json::Value,
    /// The image version (`IMAGE_VERSION`).
    pub version: String,
    /// SOURCE_DATE_EPOCH of the build.
    pub source_date_epoch: u64,
    /// The kernel release.
    pub kernel: String,
    /// The kernel command line in the UKI (holds the verity root hash).
    pub cmdline: String,
    /// dm-verity root hash of the root filesystem.
    pub verity_root_hash: String,
    /// sha256 of the inputs, by name.
    pub inputs: Vec<Input>,
    /// The apt sources the packages came from.
    pub sources: Vec<String>,
    /// Every installed Debian package.
    pub packages: Vec<Package>,
}

/// Facts about the image file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageFacts {
    /// File name.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, hex.
    pub sha256: String,
}

/// One input file of the build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Input {
    /// What it is (`spec`, `lock`, `binary sovereign-api`, ...).
    pub name: String,
    /// sha256, hex.
    pub sha256: String,
}

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The signature file of a manifest.
pub fn signature_path(manifest: &Path) -> PathBuf {
    let mut name = manifest.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// The manifest's bytes and the text of its detached signature.
pub fn sign(manifest: &Manifest, key: &SigningKey) -> Result<(Vec<u8>, String), BuildError> {
    let mut bytes = serde_json::to_vec_pretty(manifest)
        .map_err(|e| BuildError::Unexpected(format!("serialising the manifest: {e}")))?;
    bytes.push(b'\n');
    let signature = key.sign(&bytes);
    Ok((
        bytes,
        format!("{} {}\n", key.public_key(), B64.encode(signature)),
    ))
}

/// Checks `image` against the signed manifest at `path`; with `expected`,
/// the signer must be that build key. Returns the manifest and its signer.
pub fn verify(
    path: &Path,
    image: &Path,
    expected: Option<&PublicKey>,
) -> Result<(Manifest, PublicKey), VerifyError> {
    let read = |p: &Path| {
        fs::read(p).map_err(|source| VerifyError::Io {
            what: format!("reading {}", p.display()),
            source,
        })
    };
    let bytes = read(path)?;
    let sig_path = signature_path(path);
    let sig_text = String::from_utf8(read(&sig_path)?).unwrap_or_default();
    let malformed = |reason: &str| VerifyError::Malformed {
        path: sig_path.clone(),
        reason: reason.to_owned(),
    };
    let (key_text, sig_b64) = sig_text
        .trim()
        .split_once(' ')
        .ok_or_else(|| malformed("expected `ed25519:<key> <base64 signature>`"))?;
    let signer: PublicKey = key_text
        .parse()
        .map_err(|_| malformed("the key is not an ed25519 public key"))?;
    let signature: [u8; 64] = B64
        .decode(sig_b64)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| malformed("the signature is not 64 bytes of base64"))?;
    if let Some(expected) = expected {
        if *expected != signer {
            return Err(VerifyError::WrongKey {
                path: path.to_owned(),
                found: signer.to_string(),
                expected: expected.to_string(),
            });
        }
    }
    if !signer.verify(&bytes, &signature) {
        return Err(VerifyError::BadSignature {
            path: path.to_owned(),
            key: signer.to_string(),
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| VerifyError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if manifest.format != FORMAT {
        return Err(VerifyError::Malformed {
            path: path.to_owned(),
            reason: format!("format {:?} is not {FORMAT}", manifest.format),
        });
    }
    let mismatch = |reason: String| VerifyError::Mismatch {
        image: image.to_owned(),
        reason,
    };
    let size = fs::metadata(image)
        .map_err(|source| VerifyError::Io {
            what: format!("reading {}", image.display()),
            source,
        })?
        .len();
    if size != manifest.image.size {
        return Err(mismatch(format!(
            "{size} bytes, the manifest says {}",
            manifest.image.size
        )));
    }
    let sha256 = sha256_file(image).map_err(|source| VerifyError::Io {
        what: format!("reading {}", image.display()),
        source,
    })?;
    if sha256 != manifest.image.sha256 {
        return Err(mismatch(format!(
            "sha256 {sha256}, the manifest says {}",
            manifest.image.sha256
        )));
    }
    Ok((manifest, signer))
}
