//! Error types, one per operation family, each naming what was wrong.

use std::path::PathBuf;

/// Errors reading, writing or parsing keys and age identities.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The output file already exists; keys are never overwritten.
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    /// A secret key file is readable by other users.
    #[error("{path} is accessible by other users (mode {mode:04o}); run chmod 600 on it")]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The text is not a key of the expected kind.
    #[error("{what}: {reason}")]
    Malformed {
        /// Where the text came from.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Errors parsing a trust file or accepting a newer one.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The trust file is not well formed.
    #[error("trust file: {0}")]
    Malformed(String),
    /// A rotation offered a trust file that is not newer than the installed one.
    #[error("trust file sequence {offered} is not newer than the installed sequence {installed}")]
    NotNewer {
        /// Sequence of the offered file.
        offered: u64,
        /// Sequence of the installed file.
        installed: u64,
    },
    /// A signature on the trust file does not verify.
    #[error("trust file signature by {0} does not verify")]
    BadSignature(String),
    /// Too few signatures by the current signers.
    #[error("trust file sequence {sequence} has {found} valid signature(s) from the current signers, {needed} needed")]
    TooFewSignatures {
        /// Sequence of the offered file.
        sequence: u64,
        /// Signatures that verified.
        found: usize,
        /// The current threshold.
        needed: usize,
    },
}

/// Errors creating, signing, verifying or unpacking a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An I/O error on a named file.
    #[error("{path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bundle's structure is invalid (header, manifest, parts).
    #[error("{0}")]
    Malformed(String),
    /// The bundle is shorter than its manifest says.
    #[error("bundle is truncated: {0}")]
    Truncated(String),
    /// A file's content does not match the manifest's hash.
    #[error("content of {path} does not match the signed manifest (hash mismatch)")]
    HashMismatch {
        /// The file within the bundle.
        path: String,
    },
    /// The encrypted payload does not match the manifest's hash.
    #[error("encrypted payload does not match the signed manifest (hash mismatch)")]
    PayloadHashMismatch,
    /// A signature by a trusted key does not verify over this manifest.
    #[error("signature by {0} does not match this manifest")]
    BadSignature(String),
    /// Not enough valid signatures from trusted signers.
    #[error("{found} valid signature(s) from trusted signers, {needed} needed{unknown}")]
    TooFewSignatures {
        /// Valid signatures by distinct trusted signers.
        found: usize,
        /// The trust threshold.
        needed: usize,
        /// A note naming untrusted signers, if any.
        unknown: String,
    },
    /// The payload is encrypted and no identity was given, or the identity does not match.
    #[error("{0}")]
    Decrypt(String),
    /// Signing failed: all signature slots are used.
    #[error("all {0} signature slots are used")]
    SlotsFull(usize),
    /// Bad input to bundle creation.
    #[error("{0}")]
    Input(String),
}

impl BundleError {
    /// An I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
