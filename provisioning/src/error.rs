//! Errors of flashing, each naming the file or device concerned.

use std::path::PathBuf;

/// Why a flash did not happen or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The target must not be overwritten.
    #[error("refusing to flash {path}: {reason}")]
    UnsafeTarget {
        /// The target given.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The image is not a usable Sovereign disk image.
    #[error("image {path}: {reason}")]
    BadImage {
        /// The image given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The image and the state partition do not fit on the target.
    #[error("{device} holds {device_size} bytes but the image needs {needed} bytes ({image_size} image + {state_size} state partition + GPT backup)")]
    TooSmall {
        /// The target.
        device: PathBuf,
        /// Its size.
        device_size: u64,
        /// The image's size.
        image_size: u64,
        /// The state partition's size.
        state_size: u64,
        /// Everything needed.
        needed: u64,
    },
    /// A key file could not be read or written.
    #[error("node identity: {0}")]
    NodeKey(#[from] sovereign_signing::KeyError),
    /// The node identity file is not an enrolled identity, or is damaged.
    #[error("node identity: {0}")]
    Identity(#[from] sovereign_identity::IdentityError),
    /// The identity's node name cannot name the node (the host name is taken from it).
    #[error("node identity: {0}")]
    NodeName(String),
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last line of what it printed.
        stderr: String,
    },
    /// What was read back differs from what was written.
    #[error(
        "read-back verification of {device} failed: {what} wrote {written} but read back {read}"
    )]
    VerifyMismatch {
        /// The target.
        device: PathBuf,
        /// Which region.
        what: &'static str,
        /// BLAKE3 of what was written.
        written: String,
        /// BLAKE3 of what was read back.
        read: String,
    },
}
