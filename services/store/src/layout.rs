//! Paths inside a store directory.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::StoreError;

pub(crate) fn models(root: &Path) -> PathBuf {
    root.join("models")
}

pub(crate) fn staging(root: &Path) -> PathBuf {
    root.join("staging")
}

pub(crate) fn index(root: &Path) -> PathBuf {
    root.join("index")
}

pub(crate) fn trust(root: &Path) -> PathBuf {
    root.join("trust")
}

pub(crate) fn revocations(root: &Path) -> PathBuf {
    root.join("revoked.crl")
}

pub(crate) fn lock(root: &Path) -> PathBuf {
    root.join("lock")
}

pub(crate) fn version_dir(root: &Path, name: &str, version: &semver::Version) -> PathBuf {
    models(root).join(name).join(version.to_string())
}

/// The signed manifest inside a version directory.
pub(crate) const MANIFEST: &str = "manifest.json";
/// The model's files inside a version directory.
pub(crate) const FILES: &str = "files";

/// fsyncs a directory so renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// The current time as RFC 3339 (advisory: nodes have no NTP).
pub(crate) fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
