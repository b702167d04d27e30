//! Audit errors.

use std::path::PathBuf;

/// Errors writing, reading or verifying an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An I/O error on a file of the log.
    #[error("{path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record failed verification; `seq` is the first bad one.
    #[error("record {seq}: {reason}")]
    BadRecord {
        /// Position of the first bad record.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint is malformed or its signature does not verify.
    #[error("{0}")]
    Checkpoint(String),
    /// The log does not contain what a checkpoint covers, or forks from it.
    #[error("{0}")]
    Inconsistent(String),
    /// A key could not be read or written.
    #[error(transparent)]
    Key(#[from] sovereign_signing::KeyError),
    /// The log's writer has stopped (fail closed).
    #[error("the audit log is not accepting records: {0}")]
    Closed(String),
    /// An event was refused (malformed, too large, not allowed for its sender,
    /// over its sender's quota); the log stays open.
    #[error("event refused: {0}")]
    Refused(String),
    /// A file is not an audit export or log.
    #[error("{0}")]
    Format(String),
    /// A node certificate or identity was refused.
    #[error(transparent)]
    Identity(#[from] sovereign_identity::IdentityError),
}

impl AuditError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
