//! The courier step for a whole ring: one stick visit carries every reachable
//! member's signed checkpoint and consistency proof. The node service on the
//! stick's node gathers them over the ring (each member's own audit log makes
//! its package) and hands them over a Unix socket: one JSON request line, one
//! JSON reply. Every package is checked against the cluster CA by the node
//! before it is handed over, and by the auditor again from the stick.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::courier::{previous_checkpoint, write_package, CourierPackage};
use crate::error::AuditError;

/// Most courier folders read from a stick, and packages taken in one reply.
pub const MAX_RING_NODES: usize = 64;
/// Largest request or reply on the courier socket.
pub const MAX_RING_COURIER_BYTES: u64 = 4 << 20;
/// How long a client waits for the node's reply (members that do not answer
/// are given up on by the node well before).
const REPLY_WAIT: Duration = Duration::from_secs(60);

/// What the stick carries from its last visit: each node's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RingCourierRequest {
    /// The checkpoint note on the stick, by node name.
    pub previous: BTreeMap<String, String>,
    /// Nodes whose folder this visit already wrote (not asked again: each
    /// ask signs and stores a checkpoint in that node's log).
    #[serde(default)]
    pub written: Vec<String>,
}

/// What the node gathered: a checked package per member that answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RingCourierReply {
    /// One package per member that answered (the node's own included).
    pub packages: Vec<CourierPackage>,
    /// The members that did not, with the reason.
    pub missing: BTreeMap<String, String>,
}

/// What one ring courier step left on the stick.
#[derive(Debug, Default)]
pub struct RingCourierOutcome {
    /// Folders written: node, folder, proof's old and new sizes.
    pub written: Vec<(String, PathBuf, u64, u64)>,
    /// Members not reached, with the reason (their folders are left as they were).
    pub missing: BTreeMap<String, String>,
}

impl RingCourierOutcome {
    /// One line per node, for the operator: what was left and what was not.
    pub fn lines(&self) -> Vec<String> {
        let written = self.written.iter().map(|(node, dir, old, new)| {
            format!(
                "{node}: left the checkpoint at size {new} and the proof from size {old} in {}",
                dir.display()
            )
        });
        let missing = self
            .missing
            .iter()
            .map(|(node, reason)| format!("{node}: not carried: {reason}"));
        written.chain(missing).collect()
    }
}

/// The checkpoints a stick carries, by node (its courier folders).
pub fn stick_checkpoints(stick: &Path) -> BTreeMap<String, String> {
    let Ok(entries) = std::fs::read_dir(stick.join("sovereign-audit")) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .take(MAX_RING_NODES)
        .filter_map(|node| {
            let note = previous_checkpoint(stick, &node)?;
            Some((node, note))
        })
        .collect()
}

/// Asks the node service listening on `socket` to gather the ring's packages.
pub fn ask_ring(
    socket: &Path,
    request: &RingCourierRequest,
) -> Result<RingCourierReply, AuditError> {
    let closed = |e: std::io::Error| {
        AuditError::Closed(format!("ring courier socket {}: {e}", socket.display()))
    };
    let mut stream = UnixStream::connect(socket).map_err(closed)?;
    stream.set_read_timeout(Some(REPLY_WAIT)).map_err(closed)?;
    stream.set_write_timeout(Some(REPLY_WAIT)).map_err(closed)?;
    let mut line = serde_json::to_vec(request).map_err(|e| AuditError::Format(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(closed)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_RING_COURIER_BYTES))
        .read_line(&mut reply)
        .map_err(closed)?;
    if !reply.ends_with('\n') {
        return Err(AuditError::Closed(
            "the ring courier reply was cut short or too long".into(),
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| AuditError::Closed(format!("a bad ring courier reply: {e}")))
}

/// Gathers every reachable member's package through the node at `socket`
/// and writes each into its folder on `stick` (`written`: a node whose
/// folder this visit already wrote, by its own audit daemon: not asked again).
pub fn write_ring_courier(
    socket: &Path,
    stick: &Path,
    written: Option<&str>,
) -> Result<RingCourierOutcome, AuditError> {
    let request = RingCourierRequest {
        previous: stick_checkpoints(stick),
        written: written.into_iter().map(str::to_owned).collect(),
    };
    let reply = ask_ring(socket, &request)?;
    let mut outcome = RingCourierOutcome {
        missing: reply.missing,
        ..RingCourierOutcome::default()
    };
    for package in reply.packages.iter().take(MAX_RING_NODES) {
        let dir = write_package(package, stick)?;
        outcome.written.push((
            package.node.clone(),
            dir,
            package.proof.old_size,
            package.proof.new_size,
        ));
    }
    Ok(outcome)
}
