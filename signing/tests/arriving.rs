//! Verifying a bundle while its parts are still being written: the reader
//! never reads past what has arrived, unpacks exactly what a complete bundle
//! gives, and refuses short, long or altered parts as the complete path does.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sovereign_signing::*;

/// A copy of a bundle's parts being written piece by piece into another
/// directory, with the arrival the reader follows.
struct Copier {
    sizes: Vec<u64>,
    state: Mutex<(u64, Option<bool>)>,
    changed: Condvar,
}

impl Arrival for Copier {
    fn wait_file(&self, index: usize, have: u64) -> io::Result<u64> {
        let Some(&size) = self.sizes.get(index) else {
            return Ok(0);
        };
        let start: u64 = self.sizes[..index].iter().sum();
        let mut state = self.state.lock().unwrap();
        loop {
            let length = state.0.saturating_sub(start).min(size);
            match state.1 {
                _ if length > have || length == size => return Ok(length),
                Some(true) => return Ok(length),
                Some(false) => return Err(io::Error::other("given up")),
                None => state = self.changed.wait(state).unwrap(),
            }
        }
    }

    fn wait_complete(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        loop {
            match state.1 {
                Some(true) => return Ok(()),
                Some(false) => return Err(io::Error::other("given up")),
                None => state = self.changed.wait(state).unwrap(),
            }
        }
    }
}

/// The part files of the bundle at `first`, in order.
fn parts(first: &Path) -> Vec<PathBuf> {
    let mut parts = vec![first.to_owned()];
    for index in 1.. {
        let part = PathBuf::from(format!("{}.{index:03}", first.display()));
        if !part.exists() {
            break;
        }
        parts.push(part);
    }
    parts
}

/// Starts copying `sources` into `dir` in 10,000-byte pieces (changing each
/// through `alter` first), `stop_at` bytes in all at most; then ends the
/// transfer as `complete` says.
fn copy_slowly(
    sources: Vec<PathBuf>,
    dir: PathBuf,
    alter: impl Fn(usize, &mut Vec<u8>) + Send + 'static,
    stop_at: u64,
    complete: bool,
) -> Arc<Copier> {
    let contents: Vec<Vec<u8>> = sources
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut bytes = fs::read(p).unwrap();
            alter(i, &mut bytes);
            bytes
        })
        .collect();
    let copier = Arc::new(Copier {
        sizes: contents.iter().map(|c| c.len() as u64).collect(),
        state: Mutex::new((0, None)),
        changed: Condvar::new(),
    });
    let shared = copier.clone();
    std::thread::spawn(move || {
        let mut written = 0u64;
        'files: for (source, bytes) in sources.iter().zip(&contents) {
            let mut out = fs::File::create(dir.join(source.file_name().unwrap())).unwrap();
            for piece in bytes.chunks(10_000) {
                if written >= stop_at {
                    break 'files;
                }
                out.write_all(piece).unwrap();
                written += piece.len() as u64;
                shared.state.lock().unwrap().0 = written;
                shared.changed.notify_all();
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        shared.state.lock().unwrap().1 = Some(complete);
        shared.changed.notify_all();
    });
    copier
}

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    bundle: PathBuf,
    received: PathBuf,
    trust: Trust,
}

/// A signed bundle of a 1.2 MB model in 256 KiB parts, and an empty
/// directory to receive it in.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    fs::create_dir_all(&model).unwrap();
    let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    fs::write(model.join("weights.bin"), &big).unwrap();
    fs::write(model.join("config.json"), b"{\"layers\": 2}").unwrap();
    let bundle = tmp.path().join("out/demo-1.2.3.sovb");
    fs::create_dir_all(bundle.parent().unwrap()).unwrap();
    let spec = BundleSpec {
        name: "demo".into(),
        version: "1.2.3".parse().unwrap(),
        inputs: vec![model.clone()],
        recipients: Vec::new(),
        part_size: 256 * 1024,
        segment_size: DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &bundle).unwrap();
    let key = SigningKey::from_seed(&[3; 32]);
    sign_bundle(&bundle, &key).unwrap();
    let received = tmp.path().join("received");
    fs::create_dir_all(&received).unwrap();
    Fixture {
        model,
        bundle,
        received,
        trust: Trust::new(1, 1, vec![key.public_key()]).unwrap(),
        _tmp: tmp,
    }
}

/// Opens, verifies and unpacks the arriving copy; the unpacked directory.
fn unpack_arriving(f: &Fixture, copier: Arc<Copier>) -> Result<PathBuf, BundleError> {
    let first = f.received.join(f.bundle.file_name().unwrap());
    let dest = f.received.with_file_name("unpacked");
    fs::create_dir_all(&dest).unwrap();
    UnverifiedBundle::open_arriving(&first, copier)?
        .verify(&f.trust)?
        .unpack(&dest, None)?;
    Ok(dest)
}

#[test]
fn a_split_bundle_unpacks_while_its_parts_arrive() {
    let f = fixture();
    let sources = parts(&f.bundle);
    assert_eq!(sources.len(), 5, "1.2 MB in 256 KiB parts");
    let copier = copy_slowly(sources, f.received.clone(), |_, _| {}, u64::MAX, true);
    let dest = unpack_arriving(&f, copier).unwrap();
    for rel in ["weights.bin", "config.json"] {
        assert_eq!(
            fs::read(dest.join(rel)).unwrap(),
            fs::read(f.model.join(rel)).unwrap()
        );
    }
}

#[test]
fn a_flipped_byte_in_a_later_part_is_refused() {
    let f = fixture();
    let flip = |index: usize, bytes: &mut Vec<u8>| {
        if index == 3 {
            bytes[1000] ^= 1;
        }
    };
    let copier = copy_slowly(parts(&f.bundle), f.received.clone(), flip, u64::MAX, true);
    let error = unpack_arriving(&f, copier).expect_err("refused");
    assert!(matches!(error, BundleError::HashMismatch { .. }), "{error}");
}

#[test]
fn a_transfer_that_ends_short_is_truncated_and_one_given_up_is_an_io_error() {
    // Before the header is in and in the middle of the payload.
    for stop_at in [0, 600_000] {
        for complete in [true, false] {
            let f = fixture();
            let sources = parts(&f.bundle);
            let copier = copy_slowly(sources, f.received.clone(), |_, _| {}, stop_at, complete);
            let error = unpack_arriving(&f, copier).expect_err("refused");
            if complete {
                assert!(matches!(error, BundleError::Truncated(_)), "{error}");
            } else {
                assert!(matches!(error, BundleError::Io { .. }), "{error}");
            }
        }
    }
}

#[test]
fn trailing_bytes_after_the_last_part_are_refused_once_complete() {
    let f = fixture();
    let sources = parts(&f.bundle);
    let last = sources.len() - 1;
    let grow = move |index: usize, bytes: &mut Vec<u8>| {
        if index == last {
            bytes.extend_from_slice(b"trailing");
        }
    };
    let copier = copy_slowly(sources, f.received.clone(), grow, u64::MAX, true);
    let error = unpack_arriving(&f, copier).expect_err("refused");
    assert!(matches!(error, BundleError::Malformed(_)), "{error}");
}
