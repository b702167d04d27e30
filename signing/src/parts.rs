//! Reading and writing a byte stream split across numbered part files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::BundleError;
use crate::format::{part_name, MAX_PARTS};

/// Opens a bundle part for reading: no symlink followed, no blocking on a
/// FIFO, a regular file only ([`crate::stick::open_regular`]).
pub(crate) fn open_no_follow(path: &Path) -> Result<File, BundleError> {
    crate::stick::open_regular(path).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidInput {
            BundleError::Malformed(format!("{} {e}", path.display()))
        } else {
            BundleError::io(path, e)
        }
    })
}

/// The part files of a bundle whose first part is `first`, checked against the
/// expected total length and part size. Every part is opened up front so a
/// missing, short, long or extra part is reported before any byte is used.
pub(crate) fn open_parts(
    first: &Path,
    total: u64,
    part_size: u64,
) -> Result<Vec<File>, BundleError> {
    let count = total.div_ceil(part_size).max(1);
    if count > MAX_PARTS {
        return Err(BundleError::Malformed(format!(
            "manifest implies {count} parts, at most {MAX_PARTS}"
        )));
    }
    let dir = first.parent().unwrap_or(Path::new("."));
    let name = first
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut files = Vec::new();
    let mut found: u64 = 0;
    for index in 0..count {
        let path = dir.join(part_name(&name, index));
        let file = match open_no_follow(&path) {
            Ok(file) => file,
            Err(BundleError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::Truncated(format!(
                    "part {} ({}) is missing; the bundle has {count} parts",
                    index + 1,
                    path.display()
                )))
            }
            Err(e) => return Err(e),
        };
        let len = file
            .metadata()
            .map_err(|e| BundleError::io(&path, e))?
            .len();
        let expected = if index + 1 == count {
            total - part_size * index
        } else {
            part_size
        };
        if len != expected {
            let what = if len < expected { "short" } else { "too long" };
            return Err(if len < expected {
                BundleError::Truncated(format!(
                    "part {} is {what}: {len} bytes, expected {expected}",
                    index + 1
                ))
            } else {
                BundleError::Malformed(format!(
                    "part {} is {what}: {len} bytes, expected {expected} (trailing data)",
                    index + 1
                ))
            });
        }
        found += len;
        files.push(file);
    }
    let extra = dir.join(part_name(&name, count));
    if extra.symlink_metadata().is_ok() {
        return Err(BundleError::Malformed(format!(
            "unexpected extra part {} (the manifest says {count} part(s), {found} bytes)",
            extra.display()
        )));
    }
    Ok(files)
}

/// Reads the concatenation of part files as one stream.
pub(crate) struct PartsReader {
    files: std::vec::IntoIter<File>,
    current: Option<File>,
}

impl PartsReader {
    /// A reader over `files`, starting `offset` bytes into the first (and
    /// at the start of the others, so the same files may be read again).
    pub fn new(mut files: Vec<File>, offset: u64) -> io::Result<Self> {
        for (index, file) in files.iter_mut().enumerate() {
            file.seek(SeekFrom::Start(if index == 0 { offset } else { 0 }))?;
        }
        let mut files = files.into_iter();
        let current = files.next();
        Ok(Self { files, current })
    }
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(file) = self.current.as_mut() {
            let n = file.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.current = self.files.next();
        }
        Ok(0)
    }
}

/// Writes a stream into part files of at most `part_size` bytes, under
/// temporary names; [`PartsWriter::finish`] renames them into place.
pub(crate) struct PartsWriter {
    dir: PathBuf,
    name: String,
    part_size: u64,
    written_in_part: u64,
    parts: Vec<(PathBuf, File)>,
}

impl PartsWriter {
    /// Starts writing the bundle `out`; refuses if it or any of its parts exists.
    pub fn create(out: &Path, part_size: u64) -> Result<Self, BundleError> {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| BundleError::Input(format!("{} is not a file name", out.display())))?;
        for index in 0..MAX_PARTS {
            let path = dir.join(part_name(&name, index));
            if path.symlink_metadata().is_ok() {
                return Err(BundleError::Input(format!(
                    "{} already exists",
                    path.display()
                )));
            }
        }
        let mut writer = Self {
            dir,
            name,
            part_size,
            written_in_part: 0,
            parts: Vec::new(),
        };
        writer.next_part()?;
        Ok(writer)
    }

    fn temp_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!(
            ".{}.partial-{}",
            part_name(&self.name, index),
            std::process::id()
        ))
    }

    fn next_part(&mut self) -> Result<(), BundleError> {
        let path = self.temp_path(self.parts.len() as u64);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| BundleError::io(&path, e))?;
        self.parts.push((path, file));
        self.written_in_part = 0;
        Ok(())
    }

    /// Overwrites bytes at `offset` of the first part (the header).
    pub fn write_header_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), BundleError> {
        let (path, file) = &mut self.parts[0];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(bytes))
            .and_then(|_| file.seek(SeekFrom::End(0)).map(|_| ()))
            .map_err(|e| BundleError::io(path.clone(), e))
    }

    /// Flushes every part and renames them to their final names.
    pub fn finish(mut self) -> Result<u64, BundleError> {
        let count = self.parts.len() as u64;
        for (path, file) in &self.parts {
            file.sync_all().map_err(|e| BundleError::io(path, e))?;
        }
        for (index, (path, _)) in std::mem::take(&mut self.parts).into_iter().enumerate() {
            let target = self.dir.join(part_name(&self.name, index as u64));
            fs::rename(&path, &target).map_err(|e| BundleError::io(&target, e))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BundleError::io(&self.dir, e))?;
        Ok(count)
    }
}

impl Write for PartsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written_in_part == self.part_size {
            if self.parts.len() as u64 >= MAX_PARTS {
                return Err(io::Error::other(format!("more than {MAX_PARTS} parts")));
            }
            self.next_part().map_err(io::Error::other)?;
        }
        let room = (self.part_size - self.written_in_part).min(buf.len() as u64) as usize;
        let (_, file) = self
            .parts
            .last_mut()
            .ok_or_else(|| io::Error::other("no part"))?;
        let n = file.write(&buf[..room])?;
        self.written_in_part += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PartsWriter {
    fn drop(&mut self) {
        for (path, _) in &self.parts {
            let _ = fs::remove_file(path);
        }
    }
}
