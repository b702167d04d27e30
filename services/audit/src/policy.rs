//! Who may record what over the daemon's socket, and how much.
//!
//! The daemon stamps every record with the sender's credentials as the kernel
//! reports them (`SO_PEERCRED`), allows each user only its own service name
//! and event kinds, charges each user's records against a byte budget that
//! refills at a fixed rate, and stops taking records over the socket while the
//! log's filesystem has less than a floor of free space, so a flood can
//! neither forge another service's records nor starve the model store.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Instant;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Uid, User};

use crate::record::{Event, Peer};

/// What one user may record: `USER=SERVICE:KIND,KIND`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The user's id.
    pub uid: u32,
    /// A service name its events carry (a user may have a rule per service).
    pub service: String,
    /// The event kinds it may record.
    pub kinds: Vec<String>,
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not USER=SERVICE:KIND[,KIND...]");
        let (user, rest) = text.split_once('=').ok_or_else(bad)?;
        let (service, kinds) = rest.split_once(':').ok_or_else(bad)?;
        let kinds: Vec<String> = kinds.split(',').map(str::to_owned).collect();
        if user.is_empty() || service.is_empty() || kinds.iter().any(String::is_empty) {
            return Err(bad());
        }
        let uid = match user.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => User::from_name(user)
                .map_err(|e| format!("looking up user {user:?}: {e}"))?
                .ok_or_else(|| format!("no user {user:?}"))?
                .uid
                .as_raw(),
        };
        Ok(Self {
            uid,
            service: service.to_owned(),
            kinds,
        })
    }
}

/// The limits on socket clients.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Per-user rules; empty means only the daemon's own user may record, anything.
    pub rules: Vec<Rule>,
    /// Bytes of events a user may send in a burst.
    pub burst_bytes: u64,
    /// Bytes per second a user's budget refills.
    pub bytes_per_sec: u64,
    /// Free bytes the log's filesystem keeps; below it socket events are refused.
    pub min_free_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            burst_bytes: 1 << 20,
            bytes_per_sec: 64 << 10,
            min_free_bytes: 256 << 20,
        }
    }
}

/// A user's byte budget.
struct Bucket {
    bytes: f64,
    at: Instant,
}

/// The policy applied to one daemon's clients.
pub struct Gate {
    policy: Policy,
    dir: PathBuf,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

/// Courier requests are charged this much against the sender's budget (a checkpoint line).
pub(crate) const COURIER_COST: u64 = 512;

impl Gate {
    /// A gate for the log in `dir`.
    pub fn new(policy: Policy, dir: &Path) -> Self {
        Self {
            policy,
            dir: dir.to_owned(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The sender of `socket`, from the kernel.
    pub fn peer(socket: &impl AsFd) -> std::io::Result<Peer> {
        let cred = getsockopt(socket, PeerCredentials)?;
        let user = User::from_uid(Uid::from_raw(cred.uid()))
            .ok()
            .flatten()
            .map(|u| u.name);
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            user,
        })
    }

    /// The rules of `peer` (none when the policy is empty and `peer` is the
    /// daemon's own user), or why it may make no request at all.
    fn known(&self, peer: &Peer) -> Result<Vec<&Rule>, String> {
        if self.policy.rules.is_empty() {
            return if peer.uid == Uid::effective().as_raw() {
                Ok(Vec::new())
            } else {
                Err(format!("user {} may not record here", peer.uid))
            };
        }
        let rules: Vec<&Rule> = self
            .policy
            .rules
            .iter()
            .filter(|r| r.uid == peer.uid)
            .collect();
        if rules.is_empty() {
            return Err(format!("user {} may not record here", peer.uid));
        }
        Ok(rules)
    }

    /// Admits `event` from `peer`, or says why not.
    pub fn admit(&self, peer: &Peer, event: &Event) -> Result<(), String> {
        let rules = self.known(peer)?;
        if !rules.is_empty() {
            let services: Vec<&str> = rules.iter().map(|r| r.service.as_str()).collect();
            let Some(rule) = rules.iter().find(|r| r.service == event.service) else {
                return Err(format!(
                    "user {} records as {}, not {:?}",
                    peer.uid,
                    services
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(" or "),
                    event.service
                ));
            };
            if !rule.kinds.contains(&event.kind) {
                return Err(format!(
                    "{:?} may not record {:?} events",
                    rule.service, event.kind
                ));
            }
        }
        let size = serde_json::to_vec(event).map_or(u64::MAX, |b| b.len() as u64);
        self.charge(peer, size)
    }

    /// Admits a request for the import records (the store's rollback
    /// anchor) from `peer`: the import service's user (or, on a dev host,
    /// the daemon's own).
    pub fn admit_anchor(&self, peer: &Peer) -> Result<(), String> {
        let rules = self.known(peer)?;
        if !rules.is_empty() && !rules.iter().any(|r| r.service == "import") {
            return Err(format!("user {} may not read the import records", peer.uid));
        }
        self.charge(peer, COURIER_COST)
    }

    /// Admits a courier request from `peer`, or says why not.
    pub fn admit_courier(&self, peer: &Peer) -> Result<(), String> {
        self.known(peer)?;
        self.charge(peer, COURIER_COST)
    }

    /// Takes `bytes` from `peer`'s budget and checks the free space floor.
    fn charge(&self, peer: &Peer, bytes: u64) -> Result<(), String> {
        let stat = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| format!("checking free space of {}: {e}", self.dir.display()))?;
        let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        if free < self.policy.min_free_bytes {
            return Err(format!(
                "the audit log's filesystem has {} MiB free, under its floor of {} MiB",
                free >> 20,
                self.policy.min_free_bytes >> 20
            ));
        }
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| "quota poisoned".to_owned())?;
        let now = Instant::now();
        let burst = self.policy.burst_bytes as f64;
        let bucket = buckets.entry(peer.uid).or_insert(Bucket {
            bytes: burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.policy.bytes_per_sec as f64;
        bucket.bytes = (bucket.bytes + refill).min(burst);
        bucket.at = now;
        if bucket.bytes < bytes as f64 {
            return Err(format!(
                "user {} is over its quota of {} bytes per second",
                peer.uid, self.policy.bytes_per_sec
            ));
        }
        bucket.bytes -= bytes as f64;
        Ok(())
    }
}
