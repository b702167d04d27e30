//! Opening, verifying and unpacking bundles: signatures first, then every byte.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    parts: Vec<File>,
}

impl UnverifiedBundle {
    /// Opens the bundle at `path` (its first part): reads the header and the
    /// manifest, validates both and checks every part's size. Reads no payload.
    pub fn open(path: &Path) -> Result<Self, BundleError> {
        let mut first = open_no_follow(path)?;
        let header = Header::read(&mut first)?;
        let manifest = Manifest::parse(&header.manifest_bytes)?;
        if header.len() > manifest.part_size {
            return Err(BundleError::Malformed(format!(
                "header ({} bytes) does not fit in a part of {} bytes",
                header.len(),
                manifest.part_size
            )));
        }
        let total = header
            .len()
            .checked_add(manifest.payload.size)
            .ok_or_else(|| BundleError::Malformed("payload size overflows".into()))?;
        let parts = open_parts(path, total, manifest.part_size)?;
        Ok(Self {
            path: path.to_owned(),
            header,
            manifest,
            parts,
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
        self.parts.len()
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
        let io_error = |e: io::Error| BundleError::io(&bundle.path, e);
        // A second reading of the parts, for decryption after the ciphertext hash.
        let again = match (&bundle.manifest.payload.encryption, identity) {
            (Encryption::Age { .. }, Some(_)) => Some(
                bundle
                    .parts
                    .iter()
                    .map(File::try_clone)
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(io_error)?,
            ),
            _ => None,
        };
        let mut reader = PartsReader::new(bundle.parts, offset).map_err(io_error)?;
        let files = &bundle.manifest.files;
        let content_checked = match (&bundle.manifest.payload.encryption, identity) {
            (Encryption::None, _) => {
                let path = bundle.path.clone();
                let io_error = move |e: io::Error| BundleError::io(&path, e);
                stream_files(&mut reader, files, sink, &io_error)?;
                true
            }
            (Encryption::Age { blake3, .. }, None) => {
                if need_content {
                    return Err(BundleError::Decrypt(
                        "bundle is encrypted: an age identity is needed (--identity)".into(),
                    ));
                }
                let mut hashing = HashingReader::new(&mut reader);
                io::copy(&mut hashing, &mut io::sink())
                    .map_err(|e| BundleError::io(&bundle.path, e))?;
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
                let mut hashing = HashingReader::new(&mut reader);
                io::copy(&mut hashing, &mut io::sink()).map_err(io_error)?;
                check_payload_hash(hashing.finish(), blake3)?;
                // Then decrypt, hashing again: a medium that answers a second
                // read with other bytes is refused at the end (age
                // authenticates every segment and every plaintext byte is
                // hashed against the manifest meanwhile).
                let mut reader =
                    PartsReader::new(again.unwrap_or_default(), offset).map_err(io_error)?;
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
    inner: &'a mut PartsReader,
    hasher: blake3::Hasher,
}

impl<'a> HashingReader<'a> {
    fn new(inner: &'a mut PartsReader) -> Self {
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
