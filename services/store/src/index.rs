//! The store index: installed versions, the highest version ever imported per
//! name (rollback protection) and the import history.
//!
//! sled lives behind this one module so that changing the embedded database
//! stays cheap. The model directories are the truth for what is live; the index
//! is reconciled with them when the store opens.

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::StoreError;

/// One installed model version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionRecord {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: semver::Version,
    /// BLAKE3 of the exact signed manifest bytes.
    pub manifest_blake3: String,
    /// Total bytes of the model's files.
    pub bytes: u64,
    /// Number of files.
    pub files: usize,
    /// When it was imported (RFC 3339, advisory: nodes have no NTP).
    pub imported_at: String,
}

/// One import attempt or store change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryRecord {
    /// When (RFC 3339, advisory).
    pub time: String,
    /// What was attempted: `import`, `remove`, `trust`.
    pub action: String,
    /// The bundle file or model reference.
    pub subject: String,
    /// `ok`, `rejected`, `skipped`, `already-present`.
    pub outcome: String,
    /// Details or the reason for a refusal.
    pub detail: String,
}

pub(crate) struct Index {
    db: sled::Db,
    versions: sled::Tree,
    high_water: sled::Tree,
    history: sled::Tree,
}

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Index(e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Index(format!("corrupt record: {e}")))
}

fn version_key(name: &str, version: &semver::Version) -> Vec<u8> {
    format!("{name}\0{version}").into_bytes()
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| StoreError::Index(format!("{}: {e}", path.display())))?;
        let tree = |name: &str| db.open_tree(name).map_err(db_error);
        Ok(Self {
            versions: tree("versions")?,
            high_water: tree("high_water")?,
            history: tree("history")?,
            db,
        })
    }

    pub fn version(
        &self,
        name: &str,
        version: &semver::Version,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.versions
            .get(version_key(name, version))
            .map_err(db_error)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn versions(&self) -> Result<Vec<VersionRecord>, StoreError> {
        self.versions
            .iter()
            .values()
            .map(|v| decode(&v.map_err(db_error)?))
            .collect()
    }

    pub fn put_version(&self, record: &VersionRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(db_error)?;
        self.versions
            .insert(version_key(&record.name, &record.version), value)
            .map_err(db_error)?;
        self.raise_high_water(&record.name, &record.version)
    }

    pub fn remove_version(&self, name: &str, version: &semver::Version) -> Result<(), StoreError> {
        self.versions
            .remove(version_key(name, version))
            .map_err(db_error)?;
        Ok(())
    }

    pub fn high_water(&self, name: &str) -> Result<Option<semver::Version>, StoreError> {
        self.high_water
            .get(name)
            .map_err(db_error)?
            .map(|v| decode(&v))
            .transpose()
    }

    fn raise_high_water(&self, name: &str, version: &semver::Version) -> Result<(), StoreError> {
        if self.high_water(name)?.is_some_and(|high| high >= *version) {
            return Ok(());
        }
        let value = serde_json::to_vec(version).map_err(db_error)?;
        self.high_water.insert(name, value).map_err(db_error)?;
        Ok(())
    }

    pub fn append_history(&self, record: &HistoryRecord) -> Result<(), StoreError> {
        let id = self.db.generate_id().map_err(db_error)?;
        let value = serde_json::to_vec(record).map_err(db_error)?;
        self.history
            .insert(id.to_be_bytes(), value)
            .map_err(db_error)?;
        Ok(())
    }

    pub fn history(&self) -> Result<Vec<HistoryRecord>, StoreError> {
        self.history
            .iter()
            .values()
            .map(|v| decode(&v.map_err(db_error)?))
            .collect()
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(db_error).map(|_| ())
    }
}
