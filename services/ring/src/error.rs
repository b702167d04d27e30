//! Errors of the ring transport, each naming the peer or the resource.

use crate::wire::MAX_PAYLOAD;

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A socket could not be opened or bound.
    #[error("ring: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The member is not reachable (not in the membership view).
    #[error("ring: no route to {0}")]
    NoRoute(String),
    /// The link a message was queued on closed.
    #[error("ring: the link to {0} closed")]
    LinkClosed(String),
    /// A payload larger than the ring carries.
    #[error("ring: a payload of {0} bytes is over the maximum of {MAX_PAYLOAD}")]
    TooLarge(usize),
}
