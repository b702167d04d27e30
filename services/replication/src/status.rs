//! What `sovereign ring status` shows of replication on one node.

use serde::{Deserialize, Serialize};

/// Replication on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Bytes in the spool.
    pub spool_bytes: u64,
    /// Its capacity.
    pub spool_capacity: u64,
    /// Complete items held in the spool for peers (`NAME@VERSION`).
    pub spooled: Vec<String>,
    /// Transfers being received.
    pub transfers: Vec<TransferStatus>,
    /// Items refused, by this node or by a peer.
    pub refusals: Vec<Refusal>,
    /// Items this node relays but could not open (no identity for them).
    pub relayed_unopened: Vec<String>,
}

/// One incoming transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// `NAME@VERSION`.
    pub item: String,
    /// The peer it comes from.
    pub from: String,
    /// Bytes in the spool.
    pub received: u64,
    /// Bytes in all.
    pub total: u64,
}

/// An item a node would not take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// `NAME@VERSION`.
    pub item: String,
    /// The node that refused it.
    pub node: String,
    /// Why, in one line (for example `no room: ...`).
    pub reason: String,
}
