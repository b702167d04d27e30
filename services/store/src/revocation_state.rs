//! The cluster's revocation list as the node keeps it: a CA-signed list
//! from a stick (`*.crl`) is installed when newer than the one kept; an
//! older one is refused, never installed.

use std::fs;
use std::io::Write;
use std::path::Path;

use sovereign_identity::{ClusterCa, RevocationList};

use crate::error::StoreError;
use crate::layout;

/// The revocation list kept in the store (the empty list when none was imported).
pub fn installed_revocations(root: &Path, ca: &ClusterCa) -> Result<RevocationList, StoreError> {
    let path = layout::revocations(root);
    if !path.exists() {
        return Ok(RevocationList::empty(ca));
    }
    RevocationList::load(&path, ca).map_err(|e| StoreError::Revocation(e.to_string()))
}

/// Largest revocation list read from a stick (PEM; tens of thousands of serials).
pub(crate) const MAX_CRL_BYTES: u64 = 4 << 20;

/// Offers the list in `file`: `Ok(Some(sequence))` when it became the kept
/// list, `Ok(None)` when it is the kept one; refused when not signed by
/// `ca`, or older than the kept one. `record` must succeed (the audit log
/// holds the change) before the list is renamed into place. The file is
/// read as from a stick: no symlink, no FIFO, at most [`MAX_CRL_BYTES`].
pub(crate) fn offer(
    root: &Path,
    file: &Path,
    ca: &ClusterCa,
    record: &dyn Fn(u64) -> Result<(), StoreError>,
) -> Result<Option<u64>, StoreError> {
    let bytes = sovereign_signing::stick::read_bounded(file, MAX_CRL_BYTES)
        .map_err(|e| StoreError::io(file, e))?;
    let offered = RevocationList::parse("revocation list", &bytes, ca)
        .map_err(|e| StoreError::Revocation(e.to_string()))?;
    let current = installed_revocations(root, ca)?;
    if !offered
        .supersedes(&current)
        .map_err(|e| StoreError::Revocation(e.to_string()))?
    {
        return Ok(None);
    }
    record(offered.sequence())?;
    let path = layout::revocations(root);
    let temp = root.join("revoked.crl.new");
    let mut out = fs::File::create(&temp).map_err(|e| StoreError::io(&temp, e))?;
    out.write_all(offered.to_pem().unwrap_or_default().as_bytes())
        .and_then(|_| out.sync_all())
        .map_err(|e| StoreError::io(&temp, e))?;
    fs::rename(&temp, &path).map_err(|e| StoreError::io(&path, e))?;
    layout::sync_dir(root)?;
    Ok(Some(offered.sequence()))
}
