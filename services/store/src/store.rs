//! Opening a store: the lock, the index, and crash recovery.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::index::{HistoryRecord, Index, VersionRecord};
use crate::layout;
use crate::live::versions_in;

/// An open store, held exclusively by this process.
pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) index: Index,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, takes its lock, clears
    /// abandoned staging directories and reconciles the index with the live
    /// model directories (which are the truth after a crash).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_waiting(root, Duration::ZERO)
    }

    /// [`Store::open`], waiting up to `wait` for another holder (an import
    /// of another stick) to release the lock, instead of failing at once.
    pub fn open_waiting(root: &Path, wait: Duration) -> Result<Self, StoreError> {
        for dir in [root.to_owned(), layout::models(root), layout::staging(root)] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        let lock_path = layout::lock(root);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io(&lock_path, e))?;
        let deadline = Instant::now() + wait;
        while rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .is_err()
        {
            if Instant::now() >= deadline {
                return Err(StoreError::Busy(root.to_owned()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let index = Index::open(&layout::index(root))?;
        let store = Self {
            root: root.to_owned(),
            index,
            _lock: lock,
        };
        store.clear_staging()?;
        store.reconcile()?;
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `STORE/outbox` when it exists: a node that replicates over the ring
    /// makes it, and every import then leaves a copy of the bundle there.
    pub fn outbox(&self) -> Option<PathBuf> {
        let dir = self.root.join(crate::OUTBOX);
        dir.is_dir().then_some(dir)
    }

    fn clear_staging(&self) -> Result<(), StoreError> {
        let staging = layout::staging(&self.root);
        for entry in fs::read_dir(&staging).map_err(|e| StoreError::io(&staging, e))? {
            let path = entry.map_err(|e| StoreError::io(&staging, e))?.path();
            tracing::info!(path = %path.display(), "removing abandoned staging directory");
            fs::remove_dir_all(&path).map_err(|e| StoreError::io(&path, e))?;
        }
        Ok(())
    }

    fn reconcile(&self) -> Result<(), StoreError> {
        let models = layout::models(&self.root);
        let mut live = Vec::new();
        for entry in fs::read_dir(&models).map_err(|e| StoreError::io(&models, e))? {
            let name = entry
                .map_err(|e| StoreError::io(&models, e))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            for version in versions_in(&models.join(&name))? {
                live.push((name.clone(), version));
            }
        }
        for (name, version) in &live {
            if self.index.version(name, version)?.is_none() {
                tracing::warn!(%name, %version, "live model missing from the index; recovering");
                let record = self.record_from_disk(name, version)?;
                self.index.put_version(&record)?;
            }
        }
        for record in self.index.versions()? {
            if !live
                .iter()
                .any(|(n, v)| *n == record.name && *v == record.version)
            {
                tracing::warn!(name = %record.name, version = %record.version, "indexed model has no files; dropping");
                self.index.remove_version(&record.name, &record.version)?;
            }
        }
        self.index.flush()
    }

    fn record_from_disk(
        &self,
        name: &str,
        version: &semver::Version,
    ) -> Result<VersionRecord, StoreError> {
        let path = layout::version_dir(&self.root, name, version).join(layout::MANIFEST);
        let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
        let manifest = sovereign_signing::Manifest::parse(&bytes)?;
        Ok(VersionRecord {
            name: name.to_owned(),
            version: version.clone(),
            manifest_blake3: blake3::hash(&bytes).to_hex().to_string(),
            bytes: manifest.content_size(),
            files: manifest.files.len(),
            imported_at: layout::now(),
        })
    }

    /// Every installed version, by name then version.
    pub fn installed(&self) -> Result<Vec<VersionRecord>, StoreError> {
        let mut versions = self.index.versions()?;
        versions.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        Ok(versions)
    }

    /// The import and removal history, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryRecord>, StoreError> {
        self.index.history()
    }

    /// Removes `NAME@VERSION`: atomically out of the live tree, then from disk.
    /// The highest-version mark stays, so removing a version never re-opens a rollback.
    pub fn remove(&self, reference: &str) -> Result<VersionRecord, StoreError> {
        let (name, version) = reference
            .split_once('@')
            .and_then(|(n, v)| Some((n, v.parse::<semver::Version>().ok()?)))
            .ok_or_else(|| StoreError::BadReference(reference.to_owned()))?;
        let record = self
            .index
            .version(name, &version)?
            .ok_or_else(|| StoreError::NotFound(reference.to_owned()))?;
        let live = layout::version_dir(&self.root, name, &version);
        let doomed = layout::staging(&self.root).join(format!("removed-{name}-{version}"));
        fs::rename(&live, &doomed).map_err(|e| StoreError::io(&live, e))?;
        if let Some(parent) = live.parent() {
            layout::sync_dir(parent)?;
        }
        self.index.remove_version(name, &version)?;
        self.index.append_history(&HistoryRecord {
            time: layout::now(),
            action: "remove".into(),
            subject: reference.to_owned(),
            outcome: "ok".into(),
            detail: String::new(),
        })?;
        self.index.flush()?;
        fs::remove_dir_all(&doomed).map_err(|e| StoreError::io(&doomed, e))?;
        Ok(record)
    }
}
