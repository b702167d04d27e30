//! The outbox: a copy of each bundle as imported, left for the node's ring
//! replication to pass on (the store itself never sends anything).

use std::fs;
use std::path::Path;

/// The outbox directory's name inside a store.
pub const OUTBOX: &str = "outbox";

/// Copies the bundle file at `source` and its continuation parts into
/// `outbox/ID/` (written beside, fsynced, renamed). The import already
/// succeeded, so a failure only means this node will not relay the bundle:
/// it is logged, not returned.
pub(crate) fn keep(source: &Path, outbox: &Path, id: &str) {
    if let Err(e) = copy(source, outbox, id) {
        tracing::warn!(bundle = %source.display(), error = %e, "could not keep the bundle for replication");
    }
}

fn copy(source: &Path, outbox: &Path, id: &str) -> std::io::Result<()> {
    let name = source
        .file_name()
        .ok_or_else(|| std::io::Error::other("bundle path has no file name"))?;
    let temp = outbox.join(format!(".{id}.tmp"));
    let done = outbox.join(id);
    if done.exists() {
        return Ok(());
    }
    if temp.exists() {
        fs::remove_dir_all(&temp)?;
    }
    fs::create_dir_all(&temp)?;
    let mut files = vec![(source.to_owned(), name.to_owned())];
    for index in 1..=999u32 {
        let mut part_name = name.to_owned();
        part_name.push(format!(".{index:03}"));
        let part = source.with_file_name(&part_name);
        if fs::symlink_metadata(&part).is_err() {
            break;
        }
        files.push((part, part_name));
    }
    for (from, to) in files {
        let target = temp.join(to);
        fs::copy(&from, &target)?;
        fs::File::open(&target)?.sync_all()?;
    }
    fs::File::open(&temp)?.sync_all()?;
    fs::rename(&temp, &done)?;
    fs::File::open(outbox)?.sync_all()
}
