//! Replication errors, each naming the item, file or peer concerned.

use std::path::PathBuf;

/// Errors of the spool, the wire messages and the engine.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// An I/O error on a spool path.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A message or item description from a peer is malformed.
    #[error("malformed replication message: {0}")]
    Malformed(String),
    /// A chunk does not fit where the spool expects it.
    #[error("chunk for {key} at offset {offset} does not follow the {have} bytes received")]
    OutOfOrder {
        /// The item.
        key: String,
        /// The chunk's offset.
        offset: u64,
        /// Bytes already in the spool.
        have: u64,
    },
    /// A bundle in the outbox could not be read.
    #[error("outbox entry {path}: {reason}")]
    Outbox {
        /// The outbox directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl ReplicationError {
    /// An I/O error with its path.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// An error and its sources on one line.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}
