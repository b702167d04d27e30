/*!
A Sovereign node: the ring's plan and distributed generation.

[`plan`] computes, alike on every node from the same membership view, which
nodes serve a model, in which order and which contiguous layers each holds.
[`Core`] is a node's inference state: the plan in force and the thread that
runs this node's layers ([`stage`]), fed by frames of the ring protocol
([`protocol`]). [`RingExecutor`] is the entry node's side: it runs forward
steps of its sequences through the stages, keeps each sequence's history and
replays it when the plan changes, so a lost node costs time, not tokens.
[`run`] is the node service (`sovereign node run`, `sovereign-node`): the
ring transport, replication (`replicate`: models, trust files and revocation
lists imported on one node spread to every member, each importing them
itself), the planner, this node's stage and the API in one process;
[`Courier`] gathers every member's audit checkpoint for a stick's courier step.
*/
#![deny(missing_docs)]

mod advert;
mod backend;
mod core;
mod courier;
mod drain;
mod executor;
pub mod plan;
pub mod protocol;
mod replicate;
mod service;
pub mod stage;
pub mod status;

pub use crate::core::{Active, Core, Counters, Links, StageState};
pub use backend::{RingBackend, RingView};
pub use courier::Courier;
pub use executor::RingExecutor;
pub use service::{run, NodeArgs, NodeError};
