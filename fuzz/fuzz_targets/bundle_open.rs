//! A bundle as the fuzzer writes it, signed by the harness, through every
//! step of an import: the input is the bundle's byte stream; when its first
//! signature slot is empty the harness signs the manifest bytes there with
//! the trusted key, so inputs pass the signature check and reach payload
//! streaming; the stream is cut into parts of the manifest's `part_size`
//! (multi-part reading); an encrypted payload is decrypted with the
//! harness's age identity (the segment reader) and every verified bundle is
//! unpacked into an empty staging directory. Must never panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sovereign_signing::{SigningKey, Trust, UnverifiedBundle};

/// Magic, manifest length, slot count, then 16 slots of key + signature.
const SLOTS: usize = 16;
const SLOT: usize = 96;
const HEADER: usize = 16 + SLOTS * SLOT;

/// A test identity of the fuzz harness only (`make-seeds` encrypts to its
/// recipient, `age1q3az3nl6fjj446rwuz6xws8lxnqmwhd5he59xtw6f8xtgz4jtu6stzrf8r`).
const AGE_IDENTITY: &str = "AGE-SECRET-KEY-1XJYQLM9TSEQS5RU6SL4425M09L0GGL9P3L6PJUS5XRC47VHTT3GSWAVT72";

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_seed(&[7; 32]))
}

fn trust() -> &'static Trust {
    static TRUST: OnceLock<Trust> = OnceLock::new();
    TRUST.get_or_init(|| Trust::new(1, 1, vec![key().public_key()]).expect("valid trust"))
}

fn identity() -> &'static age::x25519::Identity {
    static IDENTITY: OnceLock<age::x25519::Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| age::x25519::Identity::from_str(AGE_IDENTITY).expect("identity"))
}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sovereign-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        dir
    })
}

/// Signs the manifest in the first slot when that slot is empty.
fn sign(bytes: &mut [u8]) {
    if bytes.len() < HEADER || bytes[16..16 + SLOT].iter().any(|&b| b != 0) {
        return;
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let Some(manifest) = bytes.get(HEADER..HEADER.saturating_add(len)) else {
        return;
    };
    let signature = key().sign(manifest);
    bytes[16..48].copy_from_slice(&key().public_key().to_bytes());
    bytes[48..16 + SLOT].copy_from_slice(&signature);
}

/// The manifest's part size, when it parses as one the cut can honour.
fn part_size(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let manifest = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let size = usize::try_from(value.get("part_size")?.as_u64()?).ok()?;
    (size > 0 && bytes.len().div_ceil(size) <= 999).then_some(size)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    sign(&mut bytes);
    let dir = dir();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_dir_all(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
    }
    let first = dir.join("fuzz-1.0.0.sovb");
    let chunks: Vec<&[u8]> = match part_size(&bytes) {
        Some(size) if size < bytes.len() => bytes.chunks(size).collect(),
        _ => vec![&bytes[..]],
    };
    for (index, chunk) in chunks.iter().enumerate() {
        let path = if index == 0 {
            first.clone()
        } else {
            dir.join(format!("fuzz-1.0.0.sovb.{index:03}"))
        };
        if std::fs::write(&path, chunk).is_err() {
            return;
        }
    }
    // Streamed into staging, decrypting when the payload is encrypted.
    if let Ok(verified) = UnverifiedBundle::open(&first).and_then(|b| b.verify(trust())) {
        let _ = verified.manifest().id();
        let staging = dir.join("staging");
        if std::fs::create_dir(&staging).is_ok() {
            let _ = verified.unpack(&staging, Some(identity()));
        }
    }
    // Without the identity: the ciphertext hash alone.
    if let Ok(verified) = UnverifiedBundle::open(&first).and_then(|b| b.verify(trust())) {
        let _ = verified.check_payload(None);
    }
    // The manifest parser on its own, for inputs that are not whole bundles.
    let _ = sovereign_signing::Manifest::parse(data);
});
