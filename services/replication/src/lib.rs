/*!
Replication: a bundle, trust file or revocation list imported on one node
spreads over the ring, and every node re-verifies and imports it itself.

```text
 node A (imported from a stick)            node B
 STORE/outbox/NAME@VER ──adopt──▶ spool ──Offer──▶  space? rollback? ──Fetch(offset)──▶
                                        ◀──Chunk── each chunk appended (fsynced every 64 MiB)
                                                   into B's spool (resumes from its length)
                                                   meanwhile the store's own import reads
                                                   the spool as it fills (B's trust,
                                                   signatures first, every byte) and
                                                   commits once the last byte verified
```

The engine ([`run`]) speaks [`Message`]s over any transport that carries
bytes between named nodes (the ring's `Channel::Replication`); it writes only
its spool. The store is written by `sovereign_store`'s import alone, exactly
as for a stick, so a peer is never trusted: a modified, truncated or rolled-back
bundle is refused and audited by the receiver.

**Architecture Invariant:** this crate never writes the model store; it hands
spool files to `Store::import_bundle` / `Store::import_path`: complete ones, or
a bundle still being received together with its progress
(`sovereign_signing::Arrival`), which the import never reads beyond.
**Architecture Invariant:** memory is bounded: one chunk per request, a fixed
window of requests in flight per transfer.
*/
#![deny(missing_docs)]

mod arrival;
mod engine;
mod error;
mod import;
mod item;
mod protocol;
mod spool;
mod status;

pub use engine::{run, Config, Incoming, Outgoing, Peers};
pub use error::ReplicationError;
pub use import::{import_item, ImportKeys, Verdict};
pub use item::{FileMeta, ItemMeta, Kind};
pub use protocol::Message;
pub use spool::Spool;
pub use status::{Refusal, Status, TransferStatus};

/// Every live version of every model in the store, as `(name, version)`:
/// what a node puts in its ring advert so the plan only uses nodes holding a
/// verified copy of the version it serves (older versions stay live, so the
/// plan in force keeps its nodes while a newer one spreads).
pub fn held_models(store: &std::path::Path) -> Vec<(String, String)> {
    sovereign_store::live_versions(store)
        .map(|models| {
            models
                .into_iter()
                .map(|m| (m.name, m.version.to_string()))
                .collect()
        })
        .unwrap_or_default()
}
