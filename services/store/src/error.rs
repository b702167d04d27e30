//! Store errors, each naming what was refused and why.

use std::path::PathBuf;

use sovereign_signing::{BundleError, TrustError};

/// Errors from opening, importing into, reading or changing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on a path of the store.
    #[error("{path}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The index database failed.
    #[error("store index: {0}")]
    Index(String),
    /// Another process holds the store.
    #[error("store {0} is in use by another import")]
    Busy(PathBuf),
    /// The bundle did not verify.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A trust file was refused.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A revocation list was refused (not the cluster CA's, or older than the kept one).
    #[error("{0}")]
    Revocation(String),
    /// No trust policy is installed and none was given.
    #[error("no trust file is installed in the store; give --trust")]
    NoTrust,
    /// An older version than the newest ever imported, without `--allow-downgrade`.
    #[error("{name}@{offered} is older than {name}@{newest}, already imported (rollback refused; use --allow-downgrade)")]
    Rollback {
        /// Model name.
        name: String,
        /// Offered version.
        offered: semver::Version,
        /// Highest version imported so far.
        newest: semver::Version,
    },
    /// An older version than the audit log's import records (the rollback
    /// anchor) hold, while the store's index is behind them: it was deleted
    /// or replaced by an older one.
    #[error("the audit log records {name}@{anchored} imported, but the store's index has {}: the index was deleted or rolled back (import refused; use --allow-downgrade)", .indexed.as_ref().map_or_else(|| format!("no version of {name}"), |v| format!("{name}@{v} as its newest")))]
    AnchorMismatch {
        /// Model name.
        name: String,
        /// Highest version the audit log records as imported.
        anchored: semver::Version,
        /// Highest version the index holds.
        indexed: Option<semver::Version>,
    },
    /// The same version is installed with different content.
    #[error("{0} is already installed with different content")]
    Conflict(String),
    /// Not enough free space.
    #[error("not enough space in the store: {needed} bytes needed, {available} available")]
    NoSpace {
        /// Bytes the import needs.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// The disk filled up while writing.
    #[error("the store's disk is full (nothing was imported)")]
    DiskFull,
    /// No such model or version.
    #[error("{0} is not in the store")]
    NotFound(String),
    /// A `NAME@VERSION` reference is malformed.
    #[error("{0:?} is not NAME@VERSION")]
    BadReference(String),
    /// The audit log could not record the import, so it was not committed.
    #[error("audit log cannot record, import refused: {0}")]
    Audit(String),
}

impl StoreError {
    /// An I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether this error came from a full disk.
    pub(crate) fn from_bundle(error: BundleError) -> Self {
        match &error {
            BundleError::Io { source, .. } if is_enospc(source) => Self::DiskFull,
            _ => Self::Bundle(error),
        }
    }
}

/// Whether an I/O error means the disk is full.
pub(crate) fn is_enospc(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || error.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// The error and its sources on one line, `outer: inner: innermost`.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
