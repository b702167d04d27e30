//! What a node tells the ring about itself, and how its ring runs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Identity;

/// The ring's TCP and UDP port on ring interfaces when none is given (the
/// image's default `ring_port`).
pub const DEFAULT_PORT: u16 = 7420;

/// What a node offers the ring, carried in its announcements and in the
/// membership view of every member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// The memory the node gives to weights and KV cache, in MiB.
    pub memory_budget_mb: u64,
    /// The models the node holds: (name, version).
    pub models: Vec<(String, String)>,
    /// The kernel instruction set the node runs (`avx2`, `avx512`, `scalar`...).
    pub isa: String,
    /// Requests that entered the ring here still run on the version in force
    /// while the ring waits to move to a newer one (it moves once no member
    /// is draining).
    pub draining: bool,
}

/// How a node joins the ring. Build it with [`RingConfig::new`] and change
/// the public fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RingConfig {
    /// The node's enrolled identity and the revocations its peers are checked against.
    pub identity: Identity,
    /// Ring interfaces by name; a name ending in `*` matches every interface
    /// with that prefix (`thunderbolt*`), also those that appear later.
    pub interfaces: Vec<String>,
    /// The TCP port peer links listen on (0: any free port; it is announced).
    pub port: u16,
    /// The UDP port announcements go to: the same on every node.
    pub discovery_port: u16,
    /// How often a node announces itself and sends a heartbeat on each link.
    pub heartbeat: Duration,
    /// A link that carried nothing for this long is dead (its peer hangs).
    pub dead_after: Duration,
    /// What this node offers (changed later with `Ring::set_advert`).
    pub advert: Advert,
}

impl RingConfig {
    /// A configuration with the defaults: port [`DEFAULT_PORT`] for links and
    /// discovery, a heartbeat every 500 ms, a link dead after 2.5 s of silence.
    pub fn new(identity: Identity, interfaces: Vec<String>) -> Self {
        RingConfig {
            identity,
            interfaces,
            port: DEFAULT_PORT,
            discovery_port: DEFAULT_PORT,
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_millis(2500),
            advert: Advert::default(),
        }
    }

    /// Whether `name` is one of the ring interfaces.
    pub fn is_ring_interface(&self, name: &str) -> bool {
        matches_interface(&self.interfaces, name)
    }
}

/// Whether `name` matches one of `patterns` (exact, or a prefix ending in `*`).
pub(crate) fn matches_interface(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns_match_exact_names_and_prefixes() {
        let patterns = vec!["thunderbolt*".to_string(), "eth9".to_string()];
        assert!(matches_interface(&patterns, "thunderbolt0"));
        assert!(matches_interface(&patterns, "eth9"));
        assert!(!matches_interface(&patterns, "eth90"));
        assert!(!matches_interface(&patterns, "enp0s3"));
    }
}
