//! Errors of the image builder, one enum per operation family.

use std::path::PathBuf;

use crate::spec::SpecError;

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The build was started without root.
    #[error("building an image needs root (mmdebstrap, file ownership in the root tree)")]
    NotRoot,
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An external tool is not installed.
    #[error("{tool} is not installed (Debian package {package}; scripts/setup installs it)")]
    MissingTool {
        /// The command.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// The apt sources of the build host cannot be used.
    #[error("apt sources: {0}")]
    Sources(String),
    /// The lock file is malformed or disagrees with what was installed.
    #[error("lock {path}: {reason}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The mirror no longer offers versions the lock file pins.
    #[error(
        "the mirror no longer has {} locked package version(s): {} (build without --lock to resolve anew, then review the new lock)",
        .missing.len(), .missing.join(", ")
    )]
    LockedVersionsGone {
        /// `package=version` for each version the mirror lacks.
        missing: Vec<String>,
    },
    /// A Sovereign service binary to install is missing.
    #[error("{path}: not found (build the services first: cargo build --release --workspace)")]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A trust file named by the spec is missing or unreadable.
    #[error("{field}: {path}: {reason}")]
    Trust {
        /// The spec field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A step's tool or data did something unexpected (the message says what).
    #[error("{0}")]
    Unexpected(String),
    /// The build key cannot be used.
    #[error("build key: {0}")]
    Key(#[from] sovereign_signing::KeyError),
}

impl BuildError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Errors checking an image against its build manifest.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{what}: {source}")]
    Io {
        /// What was being read, with the path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest or its signature file is malformed.
    #[error("manifest {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The signature does not verify.
    #[error("manifest {path}: the signature does not verify against {key}")]
    BadSignature {
        /// The manifest.
        path: PathBuf,
        /// The build key it was checked against.
        key: String,
    },
    /// The manifest was signed by another key than the expected one.
    #[error("manifest {path}: signed by {found}, not by the expected build key {expected}")]
    WrongKey {
        /// The manifest.
        path: PathBuf,
        /// The key that signed it.
        found: String,
        /// The key the caller expected.
        expected: String,
    },
    /// The image differs from what the manifest describes.
    #[error("{image}: {reason}")]
    Mismatch {
        /// The image.
        image: PathBuf,
        /// What differs.
        reason: String,
    },
}
