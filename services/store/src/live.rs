//! Read-only access to live models, for the inference engine: the filesystem
//! only, no index, no lock, so readers never block an import.

use std::fs;
use std::path::{Path, PathBuf};

use sovereign_signing::Manifest;

use crate::error::StoreError;
use crate::layout;

/// A live model version: where its files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveModel {
    /// Model name.
    pub name: String,
    /// Version (the newest installed).
    pub version: semver::Version,
    /// Root of the model's files.
    pub dir: PathBuf,
    /// The files, relative to `dir`, in manifest order.
    pub files: Vec<PathBuf>,
}

/// The newest live version of `name` in the store at `store`.
pub fn live_model(store: &Path, name: &str) -> Result<LiveModel, StoreError> {
    let dir = layout::models(store).join(name);
    if sovereign_signing::validate_name(name).is_err() {
        return Err(StoreError::NotFound(name.to_owned()));
    }
    let newest = versions_in(&dir)?
        .into_iter()
        .max()
        .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
    load(store, name, newest)
}

/// The newest live version of every model in the store, by name.
pub fn live_models(store: &Path) -> Result<Vec<LiveModel>, StoreError> {
    let root = layout::models(store);
    let mut names = read_names(&root)?;
    names.sort();
    let mut models = Vec::new();
    for name in names {
        if let Some(newest) = versions_in(&root.join(&name))?.into_iter().max() {
            models.push(load(store, &name, newest)?);
        }
    }
    Ok(models)
}

/// Every live version of every model in the store, by name then version
/// (older versions stay live until removed).
pub fn live_versions(store: &Path) -> Result<Vec<LiveModel>, StoreError> {
    let root = layout::models(store);
    let mut names = read_names(&root)?;
    names.sort();
    let mut models = Vec::new();
    for name in names {
        let mut versions = versions_in(&root.join(&name))?;
        versions.sort();
        for version in versions {
            models.push(load(store, &name, version)?);
        }
    }
    Ok(models)
}

fn load(store: &Path, name: &str, version: semver::Version) -> Result<LiveModel, StoreError> {
    let dir = layout::version_dir(store, name, &version);
    let manifest_path = dir.join(layout::MANIFEST);
    let bytes = fs::read(&manifest_path).map_err(|e| StoreError::io(&manifest_path, e))?;
    let manifest = Manifest::parse(&bytes)?;
    Ok(LiveModel {
        name: name.to_owned(),
        version,
        dir: dir.join(layout::FILES),
        files: manifest
            .files
            .iter()
            .map(|f| PathBuf::from(&f.path))
            .collect(),
    })
}

fn read_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(|err| StoreError::io(dir, err))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io(dir, e)),
    }
}

/// Versions of one model that are complete (have their manifest).
pub(crate) fn versions_in(dir: &Path) -> Result<Vec<semver::Version>, StoreError> {
    Ok(read_names(dir)?
        .into_iter()
        .filter_map(|n| n.parse::<semver::Version>().ok())
        .filter(|v| dir.join(v.to_string()).join(layout::MANIFEST).is_file())
        .collect())
}
