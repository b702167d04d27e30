//! Age encryption in independent segments, so decryption runs on every core.
//!
//! An encrypted payload is the plaintext stream cut into segments of
//! `segment_size` bytes, each encrypted as its own age file to the same
//! recipients, concatenated. The manifest lists every segment's ciphertext
//! length, so a reader can hand whole segments to parallel workers and still
//! emit the plaintext in order, in bounded memory. Each segment is ordinary
//! age (X25519 recipients, STREAM with 64 KiB authenticated chunks); this
//! module only batches the age crate's own encryptor and decryptor.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use rayon::prelude::*;

use crate::error::BundleError;

/// Default plaintext bytes per segment.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;
/// Segments decrypted (or encrypted) at once: bounds memory to about
/// `2 * BATCH * segment_size`.
const BATCH: usize = 4;

/// Encrypts everything written to it, segment by segment, into `inner`.
pub(crate) struct SegmentWriter<'r, W: Write> {
    inner: W,
    recipients: &'r [age::x25519::Recipient],
    segment_size: usize,
    pending: Vec<Vec<u8>>,
    current: Vec<u8>,
    lengths: Vec<u64>,
}

impl<'r, W: Write> SegmentWriter<'r, W> {
    pub fn new(inner: W, recipients: &'r [age::x25519::Recipient], segment_size: u64) -> Self {
        let segment_size = usize::try_from(segment_size).unwrap_or(usize::MAX);
        Self {
            inner,
            recipients,
            segment_size,
            pending: Vec::new(),
            current: Vec::with_capacity(segment_size.min(DEFAULT_SEGMENT_SIZE as usize)),
            lengths: Vec::new(),
        }
    }

    fn flush_batch(&mut self) -> io::Result<()> {
        let recipients = self.recipients;
        let encrypted: Vec<io::Result<Vec<u8>>> = self
            .pending
            .par_iter()
            .map(|plain| encrypt_one(recipients, plain))
            .collect();
        self.pending.clear();
        for segment in encrypted {
            let segment = segment?;
            self.inner.write_all(&segment)?;
            self.lengths.push(segment.len() as u64);
        }
        Ok(())
    }

    /// Encrypts what is left; returns the ciphertext length of every segment.
    pub fn finish(mut self) -> io::Result<Vec<u64>> {
        if !self.current.is_empty() || (self.lengths.is_empty() && self.pending.is_empty()) {
            let last = std::mem::take(&mut self.current);
            self.pending.push(last);
        }
        self.flush_batch()?;
        Ok(self.lengths)
    }
}

fn encrypt_one(recipients: &[age::x25519::Recipient], plain: &[u8]) -> io::Result<Vec<u8>> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(plain.len() + plain.len() / 4096 + 1024);
    let mut stream = encryptor.wrap_output(&mut out)?;
    stream.write_all(plain)?;
    stream.finish()?;
    Ok(out)
}

impl<W: Write> Write for SegmentWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.segment_size - self.current.len();
        let take = room.min(buf.len());
        self.current.extend_from_slice(&buf[..take]);
        if self.current.len() == self.segment_size {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(self.segment_size));
            self.pending.push(full);
            if self.pending.len() == BATCH {
                self.flush_batch()?;
            }
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the plaintext of a segmented payload from its ciphertext.
pub(crate) struct SegmentReader<'a, R: Read> {
    inner: R,
    identity: &'a age::x25519::Identity,
    lengths: std::slice::Iter<'a, u64>,
    ready: VecDeque<Vec<u8>>,
    position: usize,
    /// Buffers kept for reuse: fresh 16 MiB allocations would cost a page
    /// fault per 4 KiB, more than the decryption itself.
    spare_ciphertext: Vec<Vec<u8>>,
    spare_plaintext: Vec<Vec<u8>>,
}

impl<'a, R: Read> SegmentReader<'a, R> {
    /// Starts reading; decrypts the first batch at once so that a wrong
    /// identity is reported as such before anything is streamed.
    pub fn new(
        inner: R,
        lengths: &'a [u64],
        identity: &'a age::x25519::Identity,
    ) -> Result<Self, BundleError> {
        let mut reader = Self {
            inner,
            identity,
            lengths: lengths.iter(),
            ready: VecDeque::new(),
            position: 0,
            spare_ciphertext: Vec::new(),
            spare_plaintext: Vec::new(),
        };
        reader.next_batch().map_err(|e| match e {
            SegmentError::WrongIdentity => BundleError::Decrypt(
                "the age identity is not a recipient of this bundle (wrong --identity)".into(),
            ),
            SegmentError::Io(e) => BundleError::Decrypt(format!(
                "encrypted payload failed authentication (tampered or corrupt): {e}"
            )),
        })?;
        Ok(reader)
    }

    fn next_batch(&mut self) -> Result<(), SegmentError> {
        let mut batch = Vec::with_capacity(BATCH);
        for &length in self.lengths.by_ref().take(BATCH) {
            let length = usize::try_from(length)
                .map_err(|_| SegmentError::Io(io::Error::other("segment too large")))?;
            let mut ciphertext = self.spare_ciphertext.pop().unwrap_or_default();
            ciphertext.resize(length, 0);
            self.inner
                .read_exact(&mut ciphertext)
                .map_err(SegmentError::Io)?;
            let plaintext = self.spare_plaintext.pop().unwrap_or_default();
            batch.push((ciphertext, plaintext));
        }
        let identity = self.identity;
        // One scoped thread per segment: rayon's idle spinning would steal
        // the cores that hashing and writing need.
        let results: Vec<Result<(), SegmentError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = batch
                .iter_mut()
                .map(|(ciphertext, plaintext)| {
                    scope.spawn(move || decrypt_one(identity, ciphertext, plaintext))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(SegmentError::Io(io::Error::other(
                            "decryption thread panicked",
                        )))
                    })
                })
                .collect()
        });
        for ((ciphertext, plaintext), result) in batch.into_iter().zip(results) {
            result?;
            self.spare_ciphertext.push(ciphertext);
            self.ready.push_back(plaintext);
        }
        Ok(())
    }
}

enum SegmentError {
    WrongIdentity,
    Io(io::Error),
}

fn decrypt_one(
    identity: &age::x25519::Identity,
    ciphertext: &[u8],
    plaintext: &mut Vec<u8>,
) -> Result<(), SegmentError> {
    let decryptor = age::Decryptor::new(ciphertext)
        .map_err(|e| SegmentError::Io(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => SegmentError::WrongIdentity,
            other => SegmentError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                other.to_string(),
            )),
        })?;
    plaintext.clear();
    reader.read_to_end(plaintext).map_err(SegmentError::Io)?;
    Ok(())
}

impl<R: Read> Read for SegmentReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(front) = self.ready.front() {
                if self.position < front.len() {
                    let n = (front.len() - self.position).min(buf.len());
                    buf[..n].copy_from_slice(&front[self.position..self.position + n]);
                    self.position += n;
                    return Ok(n);
                }
                if let Some(done) = self.ready.pop_front() {
                    self.spare_plaintext.push(done);
                }
                self.position = 0;
                continue;
            }
            if self.lengths.len() == 0 {
                return Ok(0);
            }
            self.next_batch().map_err(|e| match e {
                SegmentError::WrongIdentity => io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a segment is encrypted to other recipients",
                ),
                SegmentError::Io(e) => e,
            })?;
        }
    }
}
