//! The store's installed trust file: adopted once, then replaced only by a
//! newer file signed by the current threshold. An older one is never accepted.

use std::fs;
use std::io::Write;
use std::path::Path;

use sovereign_signing::{TrustError, TrustFile};

use crate::error::StoreError;
use crate::layout;

/// Largest trust file read (a few hundred signers with their signatures).
pub(crate) const MAX_TRUST_BYTES: u64 = 64 * 1024;

/// Reads a trust file (from a stick or the store): no symlink followed, no
/// blocking on a FIFO, a regular file of at most [`MAX_TRUST_BYTES`].
pub(crate) fn read(path: &Path) -> Result<TrustFile, StoreError> {
    let text = sovereign_signing::stick::read_bounded_text(path, MAX_TRUST_BYTES)
        .map_err(|e| StoreError::io(path, e))?;
    TrustFile::parse(&text).map_err(|e| match e {
        TrustError::Malformed(reason) => StoreError::Trust(TrustError::Malformed(format!(
            "{}: {reason}",
            path.display()
        ))),
        other => StoreError::Trust(other),
    })
}

/// The trust file installed in the store at `root`, if any (read only, no lock).
pub fn installed_trust(root: &Path) -> Result<Option<TrustFile>, StoreError> {
    installed(root)
}

/// The installed trust file, if any.
pub(crate) fn installed(root: &Path) -> Result<Option<TrustFile>, StoreError> {
    let path = layout::trust(root);
    if path.exists() {
        read(&path).map(Some)
    } else {
        Ok(None)
    }
}

/// What [`offer`] did with a trust file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offered {
    /// It became the installed trust file.
    Installed(u64),
    /// It is the installed one, or older than it (the installed one stays).
    Kept(u64),
}

/// Offers `offered` as the store's trust. `bootstrap` marks the operator's own
/// trust file (`--trust`): it is installed when none is, and an older one is
/// ignored in favour of the installed one; a trust file from a stick must be a
/// signed successor, and `record` must succeed (the audit log holds the
/// rotation) before it is renamed into place.
pub(crate) fn offer(
    root: &Path,
    offered: &TrustFile,
    bootstrap: bool,
    record: &dyn Fn(u64) -> Result<(), StoreError>,
) -> Result<Offered, StoreError> {
    let sequence = offered.trust().sequence;
    match installed(root)? {
        None if bootstrap => install(root, offered).map(|()| Offered::Installed(sequence)),
        None => Err(StoreError::NoTrust),
        Some(current) if current.to_text() == offered.to_text() => Ok(Offered::Kept(sequence)),
        Some(current) if bootstrap && sequence <= current.trust().sequence => {
            if sequence == current.trust().sequence && current.trust() != offered.trust() {
                return Err(StoreError::Trust(TrustError::Malformed(format!(
                    "sequence {sequence} differs from the installed trust file with the same sequence"
                ))));
            }
            Ok(Offered::Kept(current.trust().sequence))
        }
        Some(current) => {
            current.accepts_successor(offered)?;
            record(sequence)?;
            install(root, offered).map(|()| Offered::Installed(sequence))
        }
    }
}

fn install(root: &Path, trust: &TrustFile) -> Result<(), StoreError> {
    let path = layout::trust(root);
    let temp = root.join("trust.new");
    let mut file = fs::File::create(&temp).map_err(|e| StoreError::io(&temp, e))?;
    file.write_all(trust.to_text().as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| StoreError::io(&temp, e))?;
    fs::rename(&temp, &path).map_err(|e| StoreError::io(&path, e))?;
    layout::sync_dir(root)
}
