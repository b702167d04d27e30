//! Creating and signing bundles.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::BundleError;
use crate::format::{fixed_header, Header, MANIFEST_OFFSET, SLOTS_OFFSET, SLOT_LEN};
use crate::keys::SigningKey;
use crate::manifest::{
    Encryption, FileEntry, Manifest, Payload, FORMAT, MAX_FILES, MAX_MANIFEST_LEN,
};
use crate::parts::{open_no_follow, PartsWriter};
use crate::pipeline::{hash_into, BLOCK};
use crate::segments::SegmentWriter;

/// Default part size: the most a FAT32 file can hold, rounded down to 64 KiB.
pub const DEFAULT_PART_SIZE: u64 = (u32::MAX as u64) & !0xffff;

/// What to put in a new bundle.
pub struct BundleSpec {
    /// Model name.
    pub name: String,
    /// Release version.
    pub version: semver::Version,
    /// Files and directories to include: a file by its name, a directory by its contents.
    pub inputs: Vec<PathBuf>,
    /// Encrypt the payload to these age recipients (none: plain).
    pub recipients: Vec<age::x25519::Recipient>,
    /// Split into parts of this size.
    pub part_size: u64,
    /// Plaintext bytes per encrypted segment (see [`DEFAULT_SEGMENT_SIZE`](crate::DEFAULT_SEGMENT_SIZE)).
    pub segment_size: u64,
}

/// Creates the bundle `out` (and `out.001`... when split). Nothing appears
/// under the final names unless the whole bundle was written.
pub fn create_bundle(spec: &BundleSpec, out: &Path) -> Result<Manifest, BundleError> {
    if out.extension().is_none_or(|e| e != crate::BUNDLE_EXTENSION) {
        return Err(BundleError::Input(format!(
            "{} must end in .sovb",
            out.display()
        )));
    }
    let sources = collect_inputs(&spec.inputs)?;
    let files: Vec<FileEntry> = sources
        .iter()
        .map(|(path, _, size)| FileEntry {
            path: path.clone(),
            size: *size,
            blake3: "0".repeat(64),
        })
        .collect();
    let content_size: u64 = files.iter().map(|f| f.size).sum();
    let mut manifest = Manifest {
        format: FORMAT.into(),
        name: spec.name.clone(),
        version: spec.version.clone(),
        created: creation_time(),
        part_size: spec.part_size,
        payload: Payload {
            size: content_size,
            encryption: Encryption::None,
        },
        files,
    };
    // Names, paths and sizes are checked before anything is written.
    manifest.validate()?;
    let encrypted = !spec.recipients.is_empty();
    if encrypted {
        // The widest possible numbers: the real sizes are filled in once known
        // and the manifest padded to the space reserved here.
        manifest.payload = Payload {
            size: u64::MAX,
            encryption: Encryption::Age {
                blake3: "0".repeat(64),
                segment_size: spec.segment_size,
                segments: vec![
                    u64::MAX;
                    content_size.div_ceil(spec.segment_size.max(1)).max(1) as usize
                ],
            },
        };
    }
    let reserved = manifest.to_bytes().len();
    if reserved > MAX_MANIFEST_LEN {
        return Err(BundleError::Input("too many files for one manifest".into()));
    }
    if MANIFEST_OFFSET + reserved as u64 > spec.part_size {
        return Err(BundleError::Input(
            "the part size is smaller than the header".into(),
        ));
    }

    let mut writer = PartsWriter::create(out, spec.part_size)?;
    let mut header = fixed_header(reserved);
    header.resize(header.len() + reserved, b'\n');
    writer
        .write_all(&header)
        .map_err(|e| BundleError::io(out, e))?;

    if encrypted {
        let mut counting = CountingHasher::new(&mut writer);
        let mut segments = SegmentWriter::new(&mut counting, &spec.recipients, spec.segment_size);
        copy_files(&sources, &mut manifest.files, &mut segments, out)?;
        let lengths = segments.finish().map_err(|e| BundleError::io(out, e))?;
        let (size, hash) = counting.finish();
        manifest.payload = Payload {
            size,
            encryption: Encryption::Age {
                blake3: hash.to_hex().to_string(),
                segment_size: spec.segment_size,
                segments: lengths,
            },
        };
    } else {
        copy_files(&sources, &mut manifest.files, &mut writer, out)?;
    }
    manifest.validate()?;
    let mut bytes = manifest.to_bytes();
    if bytes.len() > reserved {
        return Err(BundleError::Input(
            "manifest outgrew its reserved space".into(),
        ));
    }
    bytes.resize(reserved, b'\n');
    writer.write_header_at(MANIFEST_OFFSET, &bytes)?;
    writer.finish()?;
    Ok(manifest)
}

/// `(bundle path, source path, size)` for every input file, in bundle order.
fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<(String, PathBuf, u64)>, BundleError> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs::symlink_metadata(input).map_err(|e| BundleError::io(input, e))?;
        if meta.is_dir() {
            walk(input, String::new(), &mut out)?;
        } else if meta.is_file() {
            let name = input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    BundleError::Input(format!("{} has no file name", input.display()))
                })?;
            out.push((name, input.clone(), meta.len()));
        } else {
            return Err(BundleError::Input(format!(
                "{} is not a regular file or directory",
                input.display()
            )));
        }
        if out.len() > MAX_FILES {
            return Err(BundleError::Input(format!("more than {MAX_FILES} files")));
        }
    }
    if out.is_empty() {
        return Err(BundleError::Input("no files to bundle".into()));
    }
    Ok(out)
}

fn walk(
    dir: &Path,
    prefix: String,
    out: &mut Vec<(String, PathBuf, u64)>,
) -> Result<(), BundleError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| BundleError::io(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| BundleError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(|e| BundleError::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, rel, out)?;
        } else if meta.is_file() {
            out.push((rel, path, meta.len()));
        } else {
            return Err(BundleError::Input(format!(
                "{} is a symlink or special file; bundles hold regular files only",
                path.display()
            )));
        }
    }
    Ok(())
}

fn copy_files(
    sources: &[(String, PathBuf, u64)],
    entries: &mut [FileEntry],
    out: &mut dyn Write,
    out_path: &Path,
) -> Result<(), BundleError> {
    let mut buffer = vec![0u8; BLOCK];
    for ((_, source, size), entry) in sources.iter().zip(entries.iter_mut()) {
        let mut file = open_no_follow(source)?;
        let mut hasher = blake3::Hasher::new();
        let mut copied: u64 = 0;
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| BundleError::io(source, e))?;
            if n == 0 {
                break;
            }
            hash_into(&mut hasher, &buffer[..n]);
            out.write_all(&buffer[..n])
                .map_err(|e| BundleError::io(out_path, e))?;
            copied += n as u64;
        }
        if copied != *size {
            return Err(BundleError::Input(format!(
                "{} changed size while being bundled",
                source.display()
            )));
        }
        entry.blake3 = hasher.finalize().to_hex().to_string();
    }
    Ok(())
}

fn creation_time() -> String {
    let now = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or_else(time::OffsetDateTime::now_utc)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Counts and hashes the bytes written through it.
struct CountingHasher<W> {
    inner: W,
    hasher: blake3::Hasher,
    count: u64,
}

impl<W: Write> CountingHasher<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            count: 0,
        }
    }

    fn finish(self) -> (u64, blake3::Hash) {
        (self.count, self.hasher.finalize())
    }
}

impl<W: Write> Write for CountingHasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        hash_into(&mut self.hasher, &buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`sign_bundle`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum SignOutcome {
    /// A signature was added in this slot.
    Signed(usize),
    /// The key had already signed this bundle.
    AlreadySigned,
}

/// Adds `key`'s signature over the manifest to a free slot of the bundle, in place.
pub fn sign_bundle(path: &Path, key: &SigningKey) -> Result<SignOutcome, BundleError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| BundleError::io(path, e))?;
    let header = Header::read(&mut file)?;
    Manifest::parse(&header.manifest_bytes)?;
    let public = key.public_key();
    if header.signatures.iter().any(|(_, k, _)| *k == public) {
        return Ok(SignOutcome::AlreadySigned);
    }
    let slot = header
        .free_slot
        .ok_or(BundleError::SlotsFull(crate::format::SLOT_COUNT))?;
    let mut entry = Vec::with_capacity(SLOT_LEN);
    entry.extend_from_slice(&public.to_bytes());
    entry.extend_from_slice(&key.sign(&header.manifest_bytes));
    write_at(&file, SLOTS_OFFSET + (slot * SLOT_LEN) as u64, &entry)
        .and_then(|_| file.sync_all())
        .map_err(|e| BundleError::io(path, e))?;
    Ok(SignOutcome::Signed(slot))
}

fn write_at(file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}
