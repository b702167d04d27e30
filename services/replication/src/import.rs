//! Importing a complete spool item with the store's own import: the node's
//! installed trust file, signatures first, every byte hashed, atomic rename,
//! rollback refused, every outcome audited exactly as for a stick.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sovereign_signing::{Arrival, BundleError, UnverifiedBundle};
use sovereign_store::{ImportAudit, ImportOptions, Outcome, Store, StoreError};

use crate::error::describe;
use crate::item::{ItemMeta, Kind};

/// What the node's own import made of an item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is live in the store (imported now, or already).
    Live,
    /// Signatures and every ciphertext byte verified, but this node has no
    /// identity that opens it: it relays the bundle without importing it.
    Unopened(String),
    /// Refused (tampered, truncated, rollback, untrusted...): dropped.
    Refused(String),
    /// The import could not run (store busy too long, audit log down): dropped
    /// without blaming the item; a later offer fetches it again.
    Failed(String),
}

/// How long an import waits for another import holding the store.
const BUSY_WAIT: Duration = Duration::from_secs(120);

fn open_store(store: &Path) -> Result<Store, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match Store::open(store) {
            Err(StoreError::Busy(_)) if started.elapsed() < BUSY_WAIT => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// What an import of a received item checks and opens it with.
#[derive(Clone, Default)]
pub struct ImportKeys {
    /// The node's age identity, for encrypted bundles.
    pub identity: Option<age::x25519::Identity>,
    /// The operator's trust file, installed if the store has none.
    pub trust: Option<PathBuf>,
    /// The cluster CA revocation lists are checked against.
    pub cluster_ca: Option<sovereign_identity::ClusterCa>,
}

/// Imports the item whose files are in `files` into the store at `store`
/// (blocking: it reads every byte). With `arrival` the files are still being
/// received: a bundle is verified and unpacked as its bytes land, and the
/// verdict comes once the last one did (or at the first refusal).
pub fn import_item(
    store: &Path,
    files: &Path,
    meta: &ItemMeta,
    keys: &ImportKeys,
    audit: Option<&dyn ImportAudit>,
    arrival: Option<Arc<dyn Arrival>>,
) -> Verdict {
    let opened = match open_store(store) {
        Ok(opened) => opened,
        Err(e) => return Verdict::Failed(describe(&e)),
    };
    let options = ImportOptions {
        identity: keys.identity.as_ref(),
        trust: keys.trust.as_deref(),
        audit,
        cluster_ca: keys.cluster_ca.as_ref(),
        arrival: arrival.clone(),
        ..ImportOptions::default()
    };
    match meta.kind {
        Kind::Bundle => {
            let bundle = files.join(&meta.files[0].name);
            match opened.import_bundle(&bundle, &options) {
                Ok(_) => Verdict::Live,
                // Reading this node's own spool or writing its store failed
                // (or a transfer followed was given up): not the item's fault.
                Err(
                    e @ (StoreError::Audit(_)
                    | StoreError::Busy(_)
                    | StoreError::Io { .. }
                    | StoreError::Bundle(BundleError::Io { .. })),
                ) => Verdict::Failed(describe(&e)),
                Err(StoreError::Bundle(BundleError::Decrypt(reason))) => {
                    match check_ciphertext(store, &bundle, arrival) {
                        Ok(()) => Verdict::Unopened(reason),
                        Err(refused) => Verdict::Refused(refused),
                    }
                }
                Err(e) => Verdict::Refused(describe(&e)),
            }
        }
        Kind::Trust | Kind::Revocations => match opened.import_path(files, &options) {
            Err(e) => Verdict::Failed(describe(&e)),
            Ok(report) => match report.into_iter().next().map(|entry| entry.outcome) {
                Some(Outcome::Skipped(reason)) if reason.starts_with("no cluster CA") => {
                    Verdict::Failed(reason)
                }
                Some(
                    Outcome::TrustInstalled(_)
                    | Outcome::RevocationsInstalled(_)
                    | Outcome::Skipped(_),
                ) => Verdict::Live,
                Some(Outcome::Rejected(reason)) => Verdict::Refused(reason),
                other => Verdict::Failed(format!("unexpected trust import outcome {other:?}")),
            },
        },
    }
}

/// Signatures against the node's trust, then every stored (encrypted) byte
/// against the signed ciphertext hash: what a node that cannot decrypt checks
/// before relaying.
fn check_ciphertext(
    store: &Path,
    bundle: &Path,
    arrival: Option<Arc<dyn Arrival>>,
) -> Result<(), String> {
    let trust = sovereign_store::installed_trust(store)
        .map_err(|e| describe(&e))?
        .ok_or("no trust file is installed")?;
    match arrival {
        Some(arrival) => UnverifiedBundle::open_arriving(bundle, arrival),
        None => UnverifiedBundle::open(bundle),
    }
    .and_then(|b| b.verify(trust.trust()))
    .and_then(|b| b.check_payload(None))
    .map(|_| ())
    .map_err(|e| describe(&e))
}
