//! The spool: items as received (still encrypted if they were), on the state
//! partition, bounded by a capacity.
//!
//! ```text
//! SPOOL/partial/KEY/meta.json + files/...   being received; each chunk appended
//!                                           and fsynced, so the files' lengths
//!                                           are where a transfer resumes
//! SPOOL/items/KEY/meta.json + files/...     complete: imported here, offered on
//! ```
//!
//! A complete item stays until every peer holds that version (or refused it),
//! so the spool costs up to one bundle's size per version in flight on each node.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::ReplicationError;
use crate::item::ItemMeta;

const META: &str = "meta.json";
const FILES: &str = "files";

/// A spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    capacity: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::io(path, e)
}

fn sync_dir(dir: &Path) -> Result<(), ReplicationError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ReplicationError> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(io(path))
}

impl Spool {
    /// Opens (creating) the spool at `dir`, holding at most `capacity` bytes.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, ReplicationError> {
        for sub in ["items", "partial"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io(&path))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            capacity,
        })
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn item_dir(&self, key: &str) -> PathBuf {
        self.dir.join("items").join(key)
    }

    fn partial_dir(&self, key: &str) -> PathBuf {
        self.dir.join("partial").join(key)
    }

    /// The directory holding a complete item's files.
    pub fn files(&self, meta: &ItemMeta) -> PathBuf {
        self.item_dir(&meta.key()).join(FILES)
    }

    fn list(&self, sub: &str) -> Result<Vec<ItemMeta>, ReplicationError> {
        let dir = self.dir.join(sub);
        let mut items = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path().join(META);
            let Ok(bytes) = fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<ItemMeta>(&bytes) {
                Ok(meta) if meta.validate().is_ok() => items.push(meta),
                _ => tracing::warn!(path = %path.display(), "unreadable spool entry ignored"),
            }
        }
        items.sort_by_key(|m| m.key());
        Ok(items)
    }

    /// Every complete item.
    pub fn complete(&self) -> Result<Vec<ItemMeta>, ReplicationError> {
        self.list("items")
    }

    /// Every item being received (after a restart: the transfers to resume).
    pub fn partial(&self) -> Result<Vec<ItemMeta>, ReplicationError> {
        self.list("partial")
    }

    /// Whether the complete item is here.
    pub fn has(&self, meta: &ItemMeta) -> bool {
        self.item_dir(&meta.key()).join(META).is_file()
    }

    /// Bytes held, complete and partial.
    pub fn used(&self) -> Result<u64, ReplicationError> {
        let mut used = 0;
        for meta in self.complete()? {
            used += meta.total();
        }
        for meta in self.partial()? {
            used += self.received(&meta)?;
        }
        Ok(used)
    }

    /// Starts (or finds) the partial item and returns the bytes already received.
    pub fn begin(&self, meta: &ItemMeta) -> Result<u64, ReplicationError> {
        let dir = self.partial_dir(&meta.key());
        let files = dir.join(FILES);
        if !dir.join(META).is_file() {
            fs::create_dir_all(&files).map_err(io(&files))?;
            let bytes = serde_json::to_vec(meta).expect("item metadata serializes");
            write_synced(&dir.join(META), &bytes)?;
            sync_dir(&dir)?;
            sync_dir(&self.dir.join("partial"))?;
        }
        self.received(meta)
    }

    /// Bytes of a partial item already in the spool: where its transfer resumes.
    pub fn received(&self, meta: &ItemMeta) -> Result<u64, ReplicationError> {
        let files = self.partial_dir(&meta.key()).join(FILES);
        let mut received = 0;
        for file in &meta.files {
            let len = fs::metadata(files.join(&file.name))
                .map(|m| m.len())
                .unwrap_or(0);
            received += len.min(file.size);
            if len < file.size {
                break;
            }
        }
        Ok(received)
    }

    /// Appends `data` at byte `offset` of the partial item (which must be
    /// exactly the bytes received so far) and fsyncs it. Returns the bytes
    /// received after it.
    pub fn append(
        &self,
        meta: &ItemMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, ReplicationError> {
        let have = self.received(meta)?;
        let out_of_order = || ReplicationError::OutOfOrder {
            key: meta.key(),
            offset,
            have,
        };
        if offset != have {
            return Err(out_of_order());
        }
        let (index, within) = meta.locate(offset).ok_or_else(out_of_order)?;
        let file = &meta.files[index];
        if data.is_empty() || within + data.len() as u64 > file.size {
            return Err(ReplicationError::Malformed(format!(
                "chunk of {} bytes at {offset} runs past {}",
                data.len(),
                file.name
            )));
        }
        let path = self.partial_dir(&meta.key()).join(FILES).join(&file.name);
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if within == 0 {
            // A new file: make its directory entry durable with the data.
            out.set_len(0).map_err(io(&path))?;
        }
        out.write_all(data)
            .and_then(|_| out.sync_data())
            .map_err(io(&path))?;
        if within == 0 {
            sync_dir(path.parent().unwrap_or(&self.dir))?;
        }
        Ok(have + data.len() as u64)
    }

    /// Moves a fully received item to the complete items (one rename).
    pub fn finish(&self, meta: &ItemMeta) -> Result<PathBuf, ReplicationError> {
        if self.received(meta)? != meta.total() {
            return Err(ReplicationError::Malformed(format!(
                "{} is not complete",
                meta.id()
            )));
        }
        let from = self.partial_dir(&meta.key());
        let to = self.item_dir(&meta.key());
        if to.exists() {
            fs::remove_dir_all(&to).map_err(io(&to))?;
        }
        fs::rename(&from, &to).map_err(io(&to))?;
        sync_dir(&self.dir.join("items"))?;
        sync_dir(&self.dir.join("partial"))?;
        Ok(to.join(FILES))
    }

    /// Reads up to `len` bytes at `offset` of a complete item, never across
    /// one of its files' ends.
    pub fn read(
        &self,
        meta: &ItemMeta,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, ReplicationError> {
        let (index, within) = meta.locate(offset).ok_or_else(|| {
            ReplicationError::Malformed(format!("offset {offset} is past the end of {}", meta.id()))
        })?;
        let file = &meta.files[index];
        let len = (len as u64).min(file.size - within) as usize;
        let path = self.files(meta).join(&file.name);
        let mut input = File::open(&path).map_err(io(&path))?;
        input.seek(SeekFrom::Start(within)).map_err(io(&path))?;
        let mut data = vec![0; len];
        input.read_exact(&mut data).map_err(io(&path))?;
        Ok(data)
    }

    /// Removes an item, complete or partial.
    pub fn remove(&self, meta: &ItemMeta) -> Result<(), ReplicationError> {
        for dir in [self.item_dir(&meta.key()), self.partial_dir(&meta.key())] {
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
        Ok(())
    }

    /// Takes a bundle the store's import left in its outbox (`dir`, holding
    /// the bundle file and its parts) as a complete item; `dir` is removed.
    pub fn adopt_bundle(&self, dir: &Path) -> Result<ItemMeta, ReplicationError> {
        let first = fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| sovereign_signing::is_bundle_file_name(n))
            .ok_or_else(|| ReplicationError::Outbox {
                path: dir.to_owned(),
                reason: "no bundle file".into(),
            })?;
        let meta = ItemMeta::from_bundle(dir, &first)?;
        let item = self.item_dir(&meta.key());
        if item.exists() {
            fs::remove_dir_all(dir).map_err(io(dir))?;
            return Ok(meta);
        }
        let staging = self.partial_dir(&format!("{}.adopt", meta.key()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        fs::create_dir_all(&staging).map_err(io(&staging))?;
        let files = staging.join(FILES);
        if fs::rename(dir, &files).is_err() {
            // Another filesystem: copy, then drop the outbox entry.
            fs::create_dir_all(&files).map_err(io(&files))?;
            for file in &meta.files {
                let target = files.join(&file.name);
                fs::copy(dir.join(&file.name), &target).map_err(io(&target))?;
                File::open(&target)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&target))?;
            }
            fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        sync_dir(&files)?;
        let bytes = serde_json::to_vec(&meta).expect("item metadata serializes");
        write_synced(&staging.join(META), &bytes)?;
        fs::rename(&staging, &item).map_err(io(&item))?;
        sync_dir(&self.dir.join("items"))?;
        Ok(meta)
    }

    /// Stores a trust file's or revocation list's text as a complete item.
    pub fn add_text(
        &self,
        kind: crate::item::Kind,
        text: &str,
        sequence: u64,
    ) -> Result<ItemMeta, ReplicationError> {
        let meta = ItemMeta::from_text(kind, text, sequence);
        if self.has(&meta) {
            return Ok(meta);
        }
        self.begin(&meta)?;
        let files = self.partial_dir(&meta.key()).join(FILES);
        write_synced(&files.join(&meta.files[0].name), text.as_bytes())?;
        self.finish(&meta)?;
        Ok(meta)
    }
}
