//! Opening, verifying and unpacking bundles: signatures first, then every byte.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::arriving::{Arrival, ArrivingReader};
use crate::error::BundleError;
use crate::format::Header;
use crate::keys::PublicKey;
use crate::manifest::{Encryption, FileEntry, Manifest};
use crate::parts::{open_no_follow, open_parts, PartsReader};
use crate::pipeline::{hash_into, stream_files, Discard, Sink};
use crate::segments::SegmentReader;
use crate::trust::Trust;

/// A bundle whose structure was checked but whose signatures were not.
pub struct UnverifiedBundle {
    path: PathBuf,
    header: Header,
    manifest: Manifest,
    parts: Parts,
}

/// Where the payload is read from.
enum Parts {
    /// Every part opened and its size checked.
    Complete(Vec<File>),
    /// Still being written: read as it arrives, sizes checked at the end.
    Arriving(ArrivingReader),
}

impl UnverifiedBundle {
    /// Opens the bundle at `path` (its first part): reads the header and the
    /// manifest, validates both and checks every part's size. Reads no payload.
    pub fn open(path: &Path) -> Result<Self, BundleError> {
        let mut first = open_no_follow(path)?;
        let header = Header::read(&mut first)?;
        let manifest = Manifest::parse(&header.manifest_bytes)?;
        let total = total_len(&header, &manifest)?;
        let parts = open_parts(path, total, manifest.part_size)?;
        Ok(Self {
            path: path.to_owned(),
            header,
            manifest,
            parts: Parts::Complete(parts),
        })
    }

    /// Opens a bundle whose files are still being written (a transfer into
    /// a spool), as far as `arrival` says they have arrived: waits for the
    /// header and the manifest and checks them as [`UnverifiedBundle::open`]
    /// does. Unpacking then verifies each byte as it lands; the parts' exact
    /// sizes are checked once `arrival` says the transfer is complete.
    pub fn open_arriving(path: &Path, arrival: Arc<dyn Arrival>) -> Result<Self, BundleError> {
        let mut reader = ArrivingReader::new(path, arrival);
        // A transfer given up before the header arrived is not a bad bundle.
        let header = Header::read(&mut reader).map_err(|e| match reader.take_error() {
            Some(failed) => BundleError::io(path, failed),
            None => e,
        })?;
        let manifest = Manifest::parse(&header.manifest_bytes)?;
        let total = total_len(&header, &manifest)?;
        reader.set_layout(total, manifest.part_size)?;
        Ok(Self {
            path: path.to_owned(),
            header,
            manifest,
            parts: Parts::Arriving(reader),
        })
    }

    /// The manifest (not yet trusted).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The exact signed manifest bytes.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.header.manifest_bytes
    }

    /// Keys that have a signature slot filled (not yet checked).
    pub fn signers(&self) -> Vec<PublicKey> {
        self.header
            .signatures
            .iter()
            .map(|(_, key, _)| *key)
            .collect()
    }

    /// The number of part files.
    pub fn part_count(&self) -> usize {
        let total = self.header.len() + self.manifest.payload.size;
        match &self.parts {
            Parts::Complete(parts) => parts.len(),
            Parts::Arriving(_) => total.div_ceil(self.manifest.part_size.max(1)).max(1) as usize,
        }
    }

    /// Checks the signatures against `trust`: at least `trust.threshold` distinct
    /// trusted signers must have signed these exact manifest bytes, and no
    /// signature by a trusted key may fail.
    pub fn verify(self, trust: &Trust) -> Result<VerifiedBundle, BundleError> {
        let count = trust
            .count_signatures(
                &self.header.manifest_bytes,
                self.header
                    .signatures
                    .iter()
                    .map(|(_, key, sig)| (key, sig)),
            )
            .map_err(BundleError::BadSignature)?;
        if count.valid < trust.threshold {
            let unknown = if count.unknown.is_empty() {
                String::new()
            } else {
                let keys: Vec<String> = count.unknown.iter().map(ToString::to_string).collect();
                format!(" (not trusted: {})", keys.join(", "))
            };
            return Err(BundleError::TooFewSignatures {
                found: count.valid,
                needed: trust.threshold,
                unknown,
            });
        }
        Ok(VerifiedBundle { bundle: self })
    }
}

/// A bundle whose manifest carries enough trusted signatures. Only
/// [`UnverifiedBundle::verify`] makes one.
pub struct VerifiedBundle {
    bundle: UnverifiedBundle,
}

impl VerifiedBundle {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    /// The exact signed manifest bytes.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.bundle.header.manifest_bytes
    }

    /// Streams the payload into the empty directory `dir`, hashing every byte;
    /// every file is flushed to disk. On error `dir` holds garbage that the
    /// caller must discard. An encrypted payload needs `identity`.
    pub fn unpack(
        self,
        dir: &Path,
        identity: Option<&age::x25519::Identity>,
    ) -> Result<VerifiedPayload, BundleError> {
        let files = self.bundle.manifest.files.clone();
        let mut sink = DirSink::new(dir, &files);
        self.stream(identity, &mut sink, true)
    }

    /// Streams and hashes the whole payload without keeping it. Without an
    /// identity, an encrypted payload is checked against its ciphertext hash only.
    pub fn check_payload(
        self,
        identity: Option<&age::x25519::Identity>,
    ) -> Result<VerifiedPayload, BundleError> {
        self.stream(identity, &mut Discard, false)
    }

    fn stream(
        self,
        identity: Option<&age::x25519::Identity>,
        sink: &mut dyn Sink,
        need_content: bool,
    ) -> Result<VerifiedPayload, BundleError> {
        let VerifiedBundle { bundle } = self;
        let offset = bundle.header.len();
        let total = offset + bundle.manifest.payload.size;
        let part_size = bundle.manifest.part_size;
        let path = bundle.path.clone();
        let io_error = |e: io::Error| BundleError::io(&path, e);
        let decrypting = matches!(
            (&bundle.manifest.payload.encryption, identity),
            (Encryption::Age { .. }, Some(_))
        );
        let (mut reader, mut settle): (Box<dyn Read + Send>, Settle) = match bundle.parts {
            Parts::Complete(parts) => {
                // A second reading of the parts, for decryption after the ciphertext hash.
                let again = if decrypting {
                    parts
                        .iter()
                        .map(File::try_clone)
                        .collect::<io::Result<Vec<_>>>()
                        .map_err(io_error)?
                } else {
                    Vec::new()
                };
                let reader = PartsReader::new(parts, offset).map_err(io_error)?;
                (Box::new(reader), Settle::Ready(again))
            }
            Parts::Arriving(reader) => {
                let arrival = Arc::clone(reader.arrival());
                (Box::new(reader), Settle::Arriving(arrival))
            }
        };
        let settled = |settle: &mut Settle| -> Result<Vec<File>, BundleError> {
            match std::mem::replace(settle, Settle::Ready(Vec::new())) {
                Settle::Ready(files) => Ok(files),
                Settle::Arriving(arrival) => {
                    arrival.wait_complete().map_err(io_error)?;
                    open_parts(&path, total, part_size)
                }
            }
        };
        let files = &bundle.manifest.files;
        let content_checked = match (&bundle.manifest.payload.encryption, identity) {
            (Encryption::None, _) => {
                stream_files(&mut *reader, files, sink, &io_error)?;
                settled(&mut settle)?;
                true
            }
            (Encryption::Age { blake3, .. }, None) => {
                if need_content {
                    return Err(BundleError::Decrypt(
                        "bundle is encrypted: an age identity is needed (--identity)".into(),
                    ));
                }
                let mut hashing = HashingReader::new(&mut *reader);
                io::copy(&mut hashing, &mut io::sink()).map_err(io_error)?;
                settled(&mut settle)?;
                check_payload_hash(hashing.finish(), blake3)?;
                false
            }
            (
                Encryption::Age {
                    segments, blake3, ..
                },
                Some(identity),
            ) => {
                // The signed ciphertext hash first (as TUF checks a target's
                // hash before parsing it): no byte reaches the decryptor
                // before the whole ciphertext matched the signature.
                let mut hashing = HashingReader::new(&mut *reader);
                io::copy(&mut hashing, &mut io::sink()).map_err(io_error)?;
                let again = settled(&mut settle)?;
                check_payload_hash(hashing.finish(), blake3)?;
                // Then decrypt, hashing again: a medium that answers a second
                // read with other bytes is refused at the end (age
                // authenticates every segment and every plaintext byte is
                // hashed against the manifest meanwhile).
                let mut reader = PartsReader::new(again, offset).map_err(io_error)?;
                let mut hashing = HashingReader::new(&mut reader);
                let mut plaintext = SegmentReader::new(&mut hashing, segments, identity)?;
                let corrupt = |e: io::Error| {
                    BundleError::Decrypt(format!(
                        "encrypted payload failed authentication (tampered or corrupt): {e}"
                    ))
                };
                stream_files(&mut plaintext, files, sink, &corrupt)?;
                drop(plaintext);
                io::copy(&mut hashing, &mut io::sink()).map_err(io_error)?;
                check_payload_hash(hashing.finish(), blake3)?;
                true
            }
        };
        Ok(VerifiedPayload {
            manifest: bundle.manifest,
            manifest_bytes: bundle.header.manifest_bytes,
            content_checked,
        })
    }
}

/// What is left to check about the parts once the payload was read.
enum Settle {
    /// Nothing: the parts were checked when opened (kept for a second reading).
    Ready(Vec<File>),
    /// Wait for the transfer to complete, then check every part's size.
    Arriving(Arc<dyn Arrival>),
}

/// The header and payload's length, checking the header fits in the first part.
fn total_len(header: &Header, manifest: &Manifest) -> Result<u64, BundleError> {
    if header.len() > manifest.part_size {
        return Err(BundleError::Malformed(format!(
            "header ({} bytes) does not fit in a part of {} bytes",
            header.len(),
            manifest.part_size
        )));
    }
    header
        .len()
        .checked_add(manifest.payload.size)
        .ok_or_else(|| BundleError::Malformed("payload size overflows".into()))
}

fn check_payload_hash(actual: blake3::Hash, expected: &str) -> Result<(), BundleError> {
    if actual.to_hex().as_str() == expected {
        Ok(())
    } else {
        Err(BundleError::PayloadHashMismatch)
    }
}

/// Proof that a bundle's signatures and bytes verified. Only
/// [`VerifiedBundle::unpack`] and [`VerifiedBundle::check_payload`] make one.
#[derive(Debug)]
pub struct VerifiedPayload {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    content_checked: bool,
}

impl VerifiedPayload {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The exact signed manifest bytes.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// Whether every file's content was hashed (false only for an encrypted
    /// payload checked without an identity).
    pub fn content_checked(&self) -> bool {
        self.content_checked
    }
}

/// Hashes everything read through it.
struct HashingReader<'a> {
    inner: &'a mut (dyn Read + Send),
    hasher: blake3::Hasher,
}

impl<'a> HashingReader<'a> {
    fn new(inner: &'a mut (dyn Read + Send)) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
        }
    }

    fn finish(self) -> blake3::Hash {
        self.hasher.finalize()
    }
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        hash_into(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
}

/// Writes the files under a directory, creating parent directories; every
/// file is new (never follows or replaces anything) and synced when complete.
struct DirSink<'a> {
    root: &'a Path,
    files: &'a [FileEntry],
    current: Option<(PathBuf, File)>,
}

impl<'a> DirSink<'a> {
    fn new(root: &'a Path, files: &'a [FileEntry]) -> Self {
        Self {
            root,
            files,
            current: None,
        }
    }
}

impl Sink for DirSink<'_> {
    fn begin(&mut self, index: usize, entry: &FileEntry) -> Result<(), BundleError> {
        debug_assert_eq!(self.files[index].path, entry.path);
        let path = self.root.join(&entry.path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| BundleError::io(&path, e))?;
        if entry.size > 0 {
            // Reserve the space now so a full disk fails before any copying.
            match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, entry.size) {
                Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
                Err(e) => return Err(BundleError::io(&path, e.into())),
            }
        }
        self.current = Some((path, file));
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), BundleError> {
        let (path, file) = self
            .current
            .as_mut()
            .ok_or_else(|| BundleError::Malformed("write outside a file".into()))?;
        file.write_all(data)
            .map_err(|e| BundleError::io(path.clone(), e))
    }

    fn end(&mut self) -> Result<(), BundleError> {
        let (path, file) = self
            .current
            .take()
            .ok_or_else(|| BundleError::Malformed("end outside a file".into()))?;
        file.sync_all().map_err(|e| BundleError::io(path, e))
    }
}
