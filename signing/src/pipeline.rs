//! The streaming verifier: read, hash and write overlap on three threads.
//!
//! A reader thread fills fixed-size buffers from the payload (decrypting if
//! needed), the calling thread hashes each file's bytes (BLAKE3, parallel
//! within large buffers) and a writer thread writes them to a [`Sink`]. A small
//! pool of buffers circulates between them, so memory stays constant whatever
//! the bundle's size, and the slowest stage (usually the disk) sets the pace.

use std::io::{self, Read};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::error::BundleError;
use crate::manifest::FileEntry;

/// Size of one buffer.
pub(crate) const BLOCK: usize = 4 << 20;
/// Buffers in circulation.
const POOL: usize = 6;
/// Below this many bytes, hashing on one thread is faster than splitting.
const PARALLEL_HASH_MIN: usize = 512 * 1024;

/// Where verified bytes go, file by file.
pub(crate) trait Sink: Send {
    /// Starts file `index`.
    fn begin(&mut self, index: usize, entry: &FileEntry) -> Result<(), BundleError>;
    /// Appends bytes to the current file.
    fn write(&mut self, data: &[u8]) -> Result<(), BundleError>;
    /// Completes the current file durably.
    fn end(&mut self) -> Result<(), BundleError>;
}

/// A sink that keeps nothing (verification only).
pub(crate) struct Discard;

impl Sink for Discard {
    fn begin(&mut self, _: usize, _: &FileEntry) -> Result<(), BundleError> {
        Ok(())
    }
    fn write(&mut self, _: &[u8]) -> Result<(), BundleError> {
        Ok(())
    }
    fn end(&mut self) -> Result<(), BundleError> {
        Ok(())
    }
}

enum Op {
    Begin(usize),
    Write(Range<usize>),
    End,
}

struct Batch {
    buffer: Vec<u8>,
    ops: Vec<Op>,
}

/// Hashes `data` into `hasher`, in parallel when it is large enough to pay.
pub(crate) fn hash_into(hasher: &mut blake3::Hasher, data: &[u8]) {
    if data.len() >= PARALLEL_HASH_MIN {
        hasher.update_rayon(data);
    } else {
        hasher.update(data);
    }
}

/// Streams `source` through per-file hash checks into `sink`.
/// `source` must yield exactly the files' bytes in order; errors from it are
/// mapped with `source_error`.
pub(crate) fn stream_files(
    source: &mut (dyn Read + Send),
    files: &[FileEntry],
    sink: &mut dyn Sink,
    source_error: &(dyn Fn(io::Error) -> BundleError + Sync),
) -> Result<(), BundleError> {
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(POOL);
    for _ in 0..POOL {
        let _ = free_tx.send(vec![0u8; BLOCK]);
    }
    let (full_tx, full_rx) = sync_channel::<io::Result<(Vec<u8>, usize)>>(POOL);
    let (batch_tx, batch_rx) = sync_channel::<Batch>(POOL);
    std::thread::scope(|scope| {
        scope.spawn(move || read_loop(source, free_rx, full_tx));
        let writer = scope.spawn(move || write_loop(sink, files, batch_rx, free_tx));
        let hashed = hash_loop(files, full_rx, &batch_tx, source_error);
        drop(batch_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(BundleError::Malformed("writer thread panicked".into())));
        match hashed {
            Err(Stop::Failed(error)) => Err(error),
            Err(Stop::WriterGone) | Ok(()) => written,
        }
    })
}

fn read_loop(
    source: &mut (dyn Read + Send),
    free: Receiver<Vec<u8>>,
    full: SyncSender<io::Result<(Vec<u8>, usize)>>,
) {
    while let Ok(mut buffer) = free.recv() {
        let mut filled = 0;
        let result = loop {
            if filled == buffer.len() {
                break Ok(());
            }
            match source.read(&mut buffer[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let done = filled < buffer.len() || result.is_err();
        let message = result.map(|()| (buffer, filled));
        if full.send(message).is_err() || done {
            return;
        }
    }
}

fn hash_loop(
    files: &[FileEntry],
    full: Receiver<io::Result<(Vec<u8>, usize)>>,
    batches: &SyncSender<Batch>,
    source_error: &(dyn Fn(io::Error) -> BundleError + Sync),
) -> Result<(), Stop> {
    let mut next_file = 0;
    let mut current: Option<(usize, u64, blake3::Hasher)> = None;
    let mut pending_ops = Vec::new();
    loop {
        let (buffer, len) = match full.recv() {
            Ok(Ok(filled)) => filled,
            Ok(Err(e)) => return Err(Stop::Failed(source_error(e))),
            Err(_) => break,
        };
        let mut ops = std::mem::take(&mut pending_ops);
        let mut pos = 0;
        while pos < len {
            let (_, remaining, hasher) = match current.as_mut() {
                Some(file) if file.1 > 0 => file,
                _ => {
                    finish_file(files, &mut current, &mut ops)?;
                    if next_file == files.len() {
                        return Err(Stop::Failed(BundleError::Malformed(
                            "payload holds more bytes than the manifest's files".into(),
                        )));
                    }
                    ops.push(Op::Begin(next_file));
                    current = Some((next_file, files[next_file].size, blake3::Hasher::new()));
                    next_file += 1;
                    continue;
                }
            };
            let take = (*remaining).min((len - pos) as u64) as usize;
            hash_into(hasher, &buffer[pos..pos + take]);
            ops.push(Op::Write(pos..pos + take));
            *remaining -= take as u64;
            pos += take;
        }
        batches
            .send(Batch { buffer, ops })
            .map_err(|_| Stop::WriterGone)?;
    }
    // End of payload: the current file and any empty ones after it complete here.
    let mut ops = Vec::new();
    loop {
        finish_file(files, &mut current, &mut ops)?;
        if next_file == files.len() {
            break;
        }
        let entry = &files[next_file];
        if entry.size > 0 {
            return Err(Stop::Failed(BundleError::Truncated(format!(
                "payload ends before {} ({} bytes missing or more)",
                entry.path, entry.size
            ))));
        }
        ops.push(Op::Begin(next_file));
        current = Some((next_file, 0, blake3::Hasher::new()));
        next_file += 1;
    }
    batches
        .send(Batch {
            buffer: Vec::new(),
            ops,
        })
        .map_err(|_| Stop::WriterGone)
}

/// Why hashing stopped early.
enum Stop {
    /// The writer failed; its own error explains why.
    WriterGone,
    /// The payload did not verify.
    Failed(BundleError),
}

impl From<BundleError> for Stop {
    fn from(error: BundleError) -> Self {
        Self::Failed(error)
    }
}

/// Checks the hash of the current file if it is complete and queues its end.
fn finish_file(
    files: &[FileEntry],
    current: &mut Option<(usize, u64, blake3::Hasher)>,
    ops: &mut Vec<Op>,
) -> Result<(), BundleError> {
    let Some((index, remaining, hasher)) = current.take() else {
        return Ok(());
    };
    let entry = &files[index];
    if remaining > 0 {
        return Err(BundleError::Truncated(format!(
            "payload ends {remaining} bytes into {}",
            entry.path
        )));
    }
    if hasher.finalize().to_hex().as_str() != entry.blake3 {
        return Err(BundleError::HashMismatch {
            path: entry.path.clone(),
        });
    }
    ops.push(Op::End);
    Ok(())
}

fn write_loop(
    sink: &mut dyn Sink,
    files: &[FileEntry],
    batches: Receiver<Batch>,
    free: SyncSender<Vec<u8>>,
) -> Result<(), BundleError> {
    while let Ok(Batch { buffer, ops }) = batches.recv() {
        for op in ops {
            match op {
                Op::Begin(index) => sink.begin(index, &files[index])?,
                Op::Write(range) => sink.write(&buffer[range])?,
                Op::End => sink.end()?,
            }
        }
        if !buffer.is_empty() {
            let _ = free.send(buffer);
        }
    }
    Ok(())
}
