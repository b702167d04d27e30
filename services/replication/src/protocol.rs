//! The replication messages on the ring's replication channel (postcard).
//! **API Boundary: the replication wire protocol.**
//!
//! The holder offers; the receiver pulls byte ranges by offset, so it alone
//! decides where a transfer resumes (from its spool's length) and how much is
//! in flight.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ReplicationError;
use crate::item::ItemMeta;

/// Largest chunk a receiver may ask for.
pub const MAX_CHUNK: u32 = 1 << 20;

/// One replication message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "I hold this complete item."
    Offer(ItemMeta),
    /// "Send `len` bytes of item `key` from `offset`."
    Fetch {
        /// The item's key.
        key: String,
        /// Byte offset across the item's files.
        offset: u64,
        /// At most [`MAX_CHUNK`].
        len: u32,
    },
    /// The bytes asked for (fewer at the end of one of the item's files).
    Chunk {
        /// The item's key.
        key: String,
        /// Byte offset across the item's files.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// "I will not take this item", and why (no room, rollback, refused on import...).
    Refuse {
        /// The item's key.
        key: String,
        /// One line.
        reason: String,
    },
    /// "I already hold this item" (live, installed, or spooled): stop offering.
    Have {
        /// The item's key.
        key: String,
    },
    /// "I no longer hold this item."
    Gone {
        /// The item's key.
        key: String,
    },
}

impl Message {
    /// Encodes for the wire.
    pub fn encode(&self) -> Bytes {
        Bytes::from(postcard::to_stdvec(self).expect("replication messages serialize"))
    }

    /// Decodes a message from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplicationError> {
        postcard::from_bytes(bytes).map_err(|e| ReplicationError::Malformed(e.to_string()))
    }
}
