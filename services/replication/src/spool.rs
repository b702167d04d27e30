//! The spool: items as received (still encrypted if they were), on the state
//! partition, bounded by a capacity.
//!
//! ```text
//! SPOOL/partial/KEY/meta.json + files/...   being received; chunks appended
//!                  synced                   the bytes known durable, and the boot
//!                                           they were written in
//! SPOOL/items/KEY/meta.json + files/...     complete: imported here, offered on
//! ```
//!
//! A transfer resumes from the files' lengths. Chunks are not fsynced one by
//! one: every [`SYNC_EVERY`] bytes the files are fsynced and `synced` records
//! how far, on a background thread in order (the receiving task goes on);
//! at each file's end the receiving task waits for it. In the boot that wrote them the
//! files' lengths are exact (the page cache holds what was written); after a
//! reboot the tail past `synced` may not have reached the disk, so it is cut
//! off and fetched again (at most [`SYNC_EVERY`] bytes).
//!
//! A complete item stays until every peer holds that version (or refused it),
//! so the spool costs up to one bundle's size per version in flight on each node.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::error::ReplicationError;
use crate::item::ItemMeta;

const META: &str = "meta.json";
const FILES: &str = "files";
const SYNCED: &str = "synced";

/// How many received bytes may wait in the page cache before an fsync.
pub const SYNC_EVERY: u64 = 64 << 20;

/// How far a partial item is durable, and in which boot that was written.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SyncMark {
    bytes: u64,
    boot: Option<String>,
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`), if readable.
fn boot_id() -> Option<String> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
    })
    .clone()
}

/// A spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    capacity: u64,
    /// The background fsyncs, started at the first one (`None`: no thread
    /// could start, so they run on the caller's).
    syncer: OnceLock<Option<Mutex<mpsc::Sender<SyncJob>>>>,
}

/// Work for the background fsync thread.
enum SyncJob {
    /// Make `file` durable, then record in `dir`'s mark that `bytes` are.
    Sync {
        file: PathBuf,
        dir: PathBuf,
        bytes: u64,
    },
    /// Answer once every earlier job is done.
    Barrier(mpsc::Sender<()>),
}

/// Runs fsync jobs in order until the spool is dropped.
fn run_syncs(jobs: mpsc::Receiver<SyncJob>) {
    for job in jobs {
        match job {
            SyncJob::Sync { file, dir, bytes } => {
                let durable = File::open(&file)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| ReplicationError::io(&file, e))
                    .and_then(|()| sync_dir(file.parent().unwrap_or(&dir)));
                // A transfer that finished or was dropped meanwhile has no mark to move.
                let result = durable.and_then(|()| match read_mark(&dir) {
                    Some(mark) if mark.bytes >= bytes => Ok(()),
                    Some(_) => mark_synced(&dir, bytes),
                    None => Ok(()),
                });
                if let Err(e) = result {
                    tracing::warn!(file = %file.display(), error = %e, "spool fsync failed: those bytes are fetched again after a reboot");
                }
            }
            SyncJob::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::io(path, e)
}

fn sync_dir(dir: &Path) -> Result<(), ReplicationError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The durable mark of the partial item in `dir`, if it has a readable one.
fn read_mark(dir: &Path) -> Option<SyncMark> {
    fs::read(dir.join(SYNCED))
        .ok()
        .and_then(|b| serde_json::from_slice::<SyncMark>(&b).ok())
}

/// Records that the first `bytes` of the partial item in `dir` are durable.
fn mark_synced(dir: &Path, bytes: u64) -> Result<(), ReplicationError> {
    let mark = serde_json::to_vec(&SyncMark {
        bytes,
        boot: boot_id(),
    })
    .expect("sync mark serializes");
    // A name of its own per write: a mark written at a restart never meets
    // one the fsync thread writes for an earlier transfer of the same item.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (path, next) = (dir.join(SYNCED), dir.join(format!("synced.{n}.next")));
    write_synced(&next, &mark)?;
    fs::rename(&next, &path).map_err(io(&path))?;
    sync_dir(dir)
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
            syncer: OnceLock::new(),
        })
    }

    fn queue_sync(&self, job: SyncJob) {
        let syncer = self.syncer.get_or_init(|| {
            let (jobs, receiver) = mpsc::channel();
            let started = std::thread::Builder::new()
                .name("spool-fsync".into())
                .spawn(move || run_syncs(receiver));
            match started {
                Ok(_) => Some(Mutex::new(jobs)),
                Err(e) => {
                    tracing::warn!(error = %e, "no fsync thread: the receiving task syncs");
                    None
                }
            }
        });
        match syncer {
            Some(jobs) => {
                let _ = jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
            }
            None => {
                let (jobs, receiver) = mpsc::channel();
                let _ = jobs.send(job);
                drop(jobs);
                run_syncs(receiver);
            }
        }
    }

    /// Waits until every fsync queued so far is done.
    pub(crate) fn wait_synced(&self) {
        if self.syncer.get().is_none() {
            return;
        }
        let (done, wait) = mpsc::channel();
        self.queue_sync(SyncJob::Barrier(done));
        let _ = wait.recv();
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

    /// The directory a partial item's files are received into.
    pub(crate) fn partial_files(&self, meta: &ItemMeta) -> PathBuf {
        self.partial_dir(&meta.key()).join(FILES)
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
            mark_synced(&dir, 0)?;
            sync_dir(&self.dir.join("partial"))?;
        }
        self.received(meta)
    }

    /// Bytes of a partial item already in the spool: where its transfer
    /// resumes. After a reboot, bytes past the last fsync are cut off first.
    pub fn received(&self, meta: &ItemMeta) -> Result<u64, ReplicationError> {
        let dir = self.partial_dir(&meta.key());
        let received = self.written(meta);
        match read_mark(&dir) {
            Some(mark) if received > mark.bytes && mark.boot != boot_id() => {
                self.truncate(meta, mark.bytes)?;
                tracing::info!(item = %meta.id(), kept = mark.bytes, dropped = received - mark.bytes, "bytes not known durable before a reboot are fetched again");
                mark_synced(&dir, mark.bytes)?;
                Ok(mark.bytes)
            }
            _ => Ok(received),
        }
    }

    /// Bytes of a partial item's files as they stand (no reboot check: in
    /// the boot that wrote them they are exact).
    fn written(&self, meta: &ItemMeta) -> u64 {
        let files = self.partial_dir(&meta.key()).join(FILES);
        let mut written = 0;
        for file in &meta.files {
            let len = fs::metadata(files.join(&file.name))
                .map(|m| m.len())
                .unwrap_or(0);
            written += len.min(file.size);
            if len < file.size {
                break;
            }
        }
        written
    }

    /// Cuts a partial item's files back to its first `bytes`.
    fn truncate(&self, meta: &ItemMeta, bytes: u64) -> Result<(), ReplicationError> {
        let files = self.partial_dir(&meta.key()).join(FILES);
        let mut start = 0;
        for file in &meta.files {
            let keep = bytes.saturating_sub(start).min(file.size);
            let path = files.join(&file.name);
            match fs::metadata(&path) {
                Ok(m) if m.len() > keep => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(keep).and_then(|_| f.sync_all()))
                    .map_err(io(&path))?,
                _ => {}
            }
            start += file.size;
        }
        Ok(())
    }

    /// Appends `data` at byte `offset` of the partial item (which must be
    /// exactly the bytes received so far); fsyncs when it ends a file, and
    /// queues an fsync when it crosses a multiple of [`SYNC_EVERY`]. Returns
    /// the bytes received after it.
    pub fn append(
        &self,
        meta: &ItemMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, ReplicationError> {
        // A transfer appends only after `begin`, which made any cut after a
        // reboot: the files' lengths are where it stands (no mark read per chunk).
        let have = self.written(meta);
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
            out.set_len(0).map_err(io(&path))?;
        }
        out.write_all(data).map_err(io(&path))?;
        let now = have + data.len() as u64;
        let file_done = within + data.len() as u64 == file.size;
        let dir = self.partial_dir(&meta.key());
        if file_done || now / SYNC_EVERY != have / SYNC_EVERY {
            // Earlier files were synced when they ended; this one's data and
            // its directory entry, then the mark, on the one thread that
            // writes marks. A file's end waits for it.
            self.queue_sync(SyncJob::Sync {
                file: path,
                dir,
                bytes: now,
            });
            if file_done {
                self.wait_synced();
            }
        }
        Ok(now)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ItemMeta {
        ItemMeta::for_tests(&[3 << 20, 1 << 20])
    }

    /// Pretends the machine rebooted since the mark was written.
    fn reboot(spool: &Spool, meta: &ItemMeta) {
        let path = spool.partial_dir(&meta.key()).join(SYNCED);
        let mut mark: SyncMark = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        mark.boot = Some("an earlier boot".into());
        fs::write(&path, serde_json::to_vec(&mark).unwrap()).unwrap();
    }

    fn len(spool: &Spool, meta: &ItemMeta, file: usize) -> u64 {
        let path = spool
            .partial_dir(&meta.key())
            .join(FILES)
            .join(&meta.files[file].name);
        fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn unsynced_bytes_count_in_the_same_boot_and_are_fetched_again_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let meta = meta();
        let mib = vec![7u8; 1 << 20];
        assert_eq!(spool.begin(&meta).unwrap(), 0);
        spool.append(&meta, 0, &mib).unwrap();
        spool.append(&meta, 1 << 20, &mib).unwrap();
        // Same boot: what was written is there (the page cache holds it).
        assert_eq!(spool.received(&meta).unwrap(), 2 << 20);
        // After a reboot nothing was known durable yet: back to byte 0.
        reboot(&spool, &meta);
        assert_eq!(spool.received(&meta).unwrap(), 0);
        assert_eq!(len(&spool, &meta, 0), 0);
        // A file's end is synced: after a reboot only the next file's tail goes.
        for at in 0..3u64 {
            spool.append(&meta, at << 20, &mib).unwrap();
        }
        spool.append(&meta, 3 << 20, &mib[..1000]).unwrap();
        assert_eq!(spool.received(&meta).unwrap(), (3 << 20) + 1000);
        reboot(&spool, &meta);
        assert_eq!(spool.received(&meta).unwrap(), 3 << 20);
        assert_eq!((len(&spool, &meta, 0), len(&spool, &meta, 1)), (3 << 20, 0));
        // The transfer resumes from there and completes.
        spool.append(&meta, 3 << 20, &mib).unwrap();
        assert!(spool.finish(&meta).is_ok());
    }

    #[test]
    fn crossing_a_sync_interval_makes_the_bytes_before_it_durable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut meta = meta();
        meta.files[0].size = SYNC_EVERY + (1 << 20);
        let chunk = vec![1u8; 8 << 20];
        spool.begin(&meta).unwrap();
        let mut at = 0;
        while at + chunk.len() as u64 <= SYNC_EVERY + (1 << 19) {
            at = spool.append(&meta, at, &chunk).unwrap();
        }
        let tail = vec![1u8; 1 << 19];
        at = spool.append(&meta, at, &tail).unwrap();
        assert_eq!(at, SYNC_EVERY + (1 << 19));
        // The fsync runs beside the receiving task: the mark moves once it is done.
        spool.wait_synced();
        reboot(&spool, &meta);
        // Synced up to the crossing; the half MiB after it is fetched again.
        assert_eq!(spool.received(&meta).unwrap(), SYNC_EVERY);
    }
}
