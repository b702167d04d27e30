//! Reading a bundle while its files are still being written: a replication
//! transfer appends them in order, and the import verifies and unpacks each
//! byte as it lands instead of after the last one.
//!
//! The reader never reads past what [`Arrival`] says has arrived, so it sees
//! only bytes already written. What it cannot check before the end (the
//! parts' exact sizes, no extra part) is checked by
//! [`crate::parts::open_parts`] once the transfer says it is complete.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::BundleError;
use crate::format::{part_name, MAX_PARTS};
use crate::parts::open_no_follow;

/// How far the files of a bundle being received have arrived; implemented by
/// whoever writes them (the replication spool).
///
/// Files are numbered as the bundle's parts: 0 is the bundle file itself, 1
/// its `.001` part, and so on. Each is written from its start, in order.
pub trait Arrival: Send + Sync {
    /// Blocks until file `index` holds more than `have` bytes, or can grow
    /// no further (complete, or not part of the transfer); returns its length
    /// then. An error when the transfer was given up.
    fn wait_file(&self, index: usize, have: u64) -> io::Result<u64>;

    /// Blocks until every file arrived in full; an error when the transfer was
    /// given up.
    fn wait_complete(&self) -> io::Result<()>;
}

/// The bundle's parts read as one stream, as far as they have arrived.
pub(crate) struct ArrivingReader {
    dir: PathBuf,
    name: String,
    arrival: Arc<dyn Arrival>,
    /// Bytes per part, once the manifest said (until then, one part).
    part_size: u64,
    /// Where the stream ends, once the manifest said.
    end: u64,
    position: u64,
    open: Option<(usize, File)>,
    /// The last error the arrival or a part gave, kept for callers that
    /// report a short read in their own words (the header's reader).
    failed: Option<io::Error>,
}

impl ArrivingReader {
    /// A reader from the start of the bundle file at `first`.
    pub fn new(first: &Path, arrival: Arc<dyn Arrival>) -> Self {
        Self {
            dir: first.parent().unwrap_or(Path::new(".")).to_owned(),
            name: first
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            arrival,
            part_size: u64::MAX,
            end: u64::MAX,
            position: 0,
            open: None,
            failed: None,
        }
    }

    /// The error that ended the last read, if one did: a transfer given up
    /// or a part that cannot be read, rather than a short bundle.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.failed.take()
    }

    /// Sets the layout the manifest declares: `total` bytes (header and
    /// payload) in parts of `part_size`. The header must have been read.
    pub fn set_layout(&mut self, total: u64, part_size: u64) -> Result<(), BundleError> {
        let part_size = part_size.max(1);
        let count = total.div_ceil(part_size).max(1);
        if count > MAX_PARTS {
            return Err(BundleError::Malformed(format!(
                "manifest implies {count} parts, at most {MAX_PARTS}"
            )));
        }
        self.part_size = part_size;
        self.end = total;
        Ok(())
    }

    /// The arrival this reader follows.
    pub fn arrival(&self) -> &Arc<dyn Arrival> {
        &self.arrival
    }

    fn file(&mut self, index: usize) -> io::Result<&File> {
        let file = match self.open.take() {
            Some((open, file)) if open == index => file,
            _ => {
                let path = self.dir.join(part_name(&self.name, index as u64));
                open_no_follow(&path).map_err(|e| match e {
                    BundleError::Io { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                })?
            }
        };
        Ok(&self.open.insert((index, file)).1)
    }
}

impl Read for ArrivingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_arrived(buf).inspect_err(|e| {
            self.failed = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

impl ArrivingReader {
    fn read_arrived(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.position >= self.end {
            return Ok(0);
        }
        let index = (self.position / self.part_size) as usize;
        let within = self.position % self.part_size;
        let part_end = self.part_size.min(self.end - index as u64 * self.part_size);
        let length = self.arrival.wait_file(index, within)?;
        if length <= within {
            // The part ends here: the stream is short (the caller says so).
            return Ok(0);
        }
        let wanted = (length.min(part_end) - within).min(buf.len() as u64) as usize;
        if wanted == 0 {
            return Ok(0);
        }
        let read = self.file(index)?.read_at(&mut buf[..wanted], within)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("part {} is shorter than its arrival says", index + 1),
            ));
        }
        self.position += read as u64;
        Ok(read)
    }
}
