/*!
Sovereign's compliance audit log: append-only records in an RFC 6962 Merkle
tree, each record signed together with the tree head after it, checkpoints as
C2SP signed notes, and offline verification that names the first bad record.

- [`AuditLog`] writes a log directory (group commit: concurrent writers share
  one fsync; a failed write closes the log so nothing is reported durable that
  is not).
- [`AuditClient`] sends events to the `sovereign-audit` daemon over its unix
  socket; on a node that socket is the only way in.
- [`Auditor`] is either of the two, for code that records.
- [`Export`] and [`verify`] are the auditor's side; [`write_courier`] and
  [`verify_courier`] carry checkpoints and proofs on USB sticks;
  [`write_ring_courier`] carries every ring member's, gathered by the node.
*/
#![deny(missing_docs)]

mod checkpoint;
mod client;
mod courier;
mod error;
mod firewall;
pub mod keychange;
mod log;
pub mod merkle;
mod policy;
mod record;
mod ring_courier;
mod verify;

pub use checkpoint::Checkpoint;
pub use client::{serve, AuditClient, Auditor};
pub use courier::{
    courier_dir, courier_package, previous_checkpoint, verify_courier, verify_courier_with_ca,
    verify_package, verify_package_with_ca, write_courier, write_package, CourierPackage,
    CourierProof,
};
pub use error::AuditError;
pub use firewall::drop_counters_event;
pub use log::AuditLog;
pub use policy::{Gate, Policy, Rule};
pub use record::{
    Event, Peer, RawRecord, RecordBody, StoredRecord, MAX_DETAILS_DEPTH, MAX_EVENT_BYTES,
};
pub use ring_courier::{
    ask_ring, stick_checkpoints, write_ring_courier, RingCourierOutcome, RingCourierReply,
    RingCourierRequest, MAX_RING_COURIER_BYTES, MAX_RING_NODES,
};
pub use verify::{verify, verify_chain, verify_records, verify_with_ca, Chain, Export, Verified};
