//! Create, sign, verify and unpack bundles through the public API.

use std::fs;
use std::path::Path;

use sovereign_signing::*;

fn signer(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32])
}

fn trust(keys: &[&SigningKey], threshold: usize) -> Trust {
    Trust::new(1, threshold, keys.iter().map(|k| k.public_key()).collect()).unwrap()
}

fn model_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("model");
    fs::create_dir_all(dir.join("sub")).unwrap();
    let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    fs::write(dir.join("weights.bin"), &big).unwrap();
    fs::write(dir.join("sub/config.json"), b"{\"layers\": 2}").unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    dir
}

fn spec(inputs: Vec<std::path::PathBuf>, part_size: u64) -> BundleSpec {
    BundleSpec {
        name: "demo".into(),
        version: "1.2.3".parse().unwrap(),
        inputs,
        recipients: Vec::new(),
        part_size,
        segment_size: DEFAULT_SEGMENT_SIZE,
    }
}

#[test]
fn split_bundle_round_trips_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = tmp.path().join("demo-1.2.3.sovb");
    let manifest = create_bundle(&spec(vec![model.clone()], 256 * 1024), &out).unwrap();
    assert_eq!(manifest.files.len(), 3);
    assert!(
        tmp.path().join("demo-1.2.3.sovb.004").exists(),
        "1.2 MB in 256 KiB parts"
    );
    let (a, b) = (signer(1), signer(2));
    assert_eq!(sign_bundle(&out, &a).unwrap(), SignOutcome::Signed(0));
    assert_eq!(sign_bundle(&out, &a).unwrap(), SignOutcome::AlreadySigned);
    assert_eq!(sign_bundle(&out, &b).unwrap(), SignOutcome::Signed(1));

    let bundle = UnverifiedBundle::open(&out).unwrap();
    assert_eq!(bundle.part_count(), 5);
    let verified = bundle.verify(&trust(&[&a, &b], 2)).unwrap();
    let dest = tmp.path().join("unpacked");
    fs::create_dir(&dest).unwrap();
    let payload = verified.unpack(&dest, None).unwrap();
    assert!(payload.content_checked());
    for rel in ["weights.bin", "sub/config.json", "empty"] {
        assert_eq!(
            fs::read(dest.join(rel)).unwrap(),
            fs::read(model.join(rel)).unwrap(),
            "{rel}"
        );
    }
}

#[test]
fn threshold_counts_distinct_trusted_signers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = tmp.path().join("demo-1.2.3.sovb");
    create_bundle(&spec(vec![model], DEFAULT_PART_SIZE), &out).unwrap();
    let (a, b, stranger) = (signer(1), signer(2), signer(9));
    sign_bundle(&out, &a).unwrap();
    sign_bundle(&out, &stranger).unwrap();
    let err = UnverifiedBundle::open(&out)
        .unwrap()
        .verify(&trust(&[&a, &b], 2))
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("1 valid signature(s) from trusted signers, 2 needed"),
        "{message}"
    );
    assert!(
        message.contains(&stranger.public_key().to_string()),
        "{message}"
    );
}

#[test]
fn encrypted_bundle_needs_the_right_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = tmp.path().join("demo-1.2.3.sovb");
    let identity = age::x25519::Identity::generate();
    let mut spec = spec(vec![model.clone()], DEFAULT_PART_SIZE);
    spec.recipients = vec![identity.to_public()];
    // Several segments (and a short last one), so parallel decryption is exercised.
    spec.segment_size = 256 * 1024;
    let manifest = create_bundle(&spec, &out).unwrap();
    assert!(matches!(
        manifest.payload.encryption,
        Encryption::Age { .. }
    ));
    let raw = fs::read(&out).unwrap();
    let plain = fs::read(model.join("sub/config.json")).unwrap();
    assert!(
        !raw.windows(plain.len()).any(|w| w == plain),
        "plaintext leaked into the bundle"
    );
    let a = signer(1);
    sign_bundle(&out, &a).unwrap();
    let policy = trust(&[&a], 1);

    let checked = UnverifiedBundle::open(&out)
        .unwrap()
        .verify(&policy)
        .unwrap()
        .check_payload(None)
        .unwrap();
    assert!(!checked.content_checked());

    let wrong = age::x25519::Identity::generate();
    let dest = tmp.path().join("wrong");
    fs::create_dir(&dest).unwrap();
    let err = UnverifiedBundle::open(&out)
        .unwrap()
        .verify(&policy)
        .unwrap()
        .unpack(&dest, Some(&wrong))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a recipient"), "{err}");

    let dest = tmp.path().join("right");
    fs::create_dir(&dest).unwrap();
    let payload = UnverifiedBundle::open(&out)
        .unwrap()
        .verify(&policy)
        .unwrap()
        .unpack(&dest, Some(&identity))
        .unwrap();
    assert!(payload.content_checked());
    assert_eq!(
        fs::read(dest.join("weights.bin")).unwrap(),
        fs::read(model.join("weights.bin")).unwrap()
    );
}

#[test]
fn refuses_to_overwrite_an_existing_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = tmp.path().join("demo-1.2.3.sovb");
    create_bundle(&spec(vec![model.clone()], DEFAULT_PART_SIZE), &out).unwrap();
    let err = create_bundle(&spec(vec![model], DEFAULT_PART_SIZE), &out)
        .err()
        .unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

/// Issue 14 item 9: with an age identity, the signed ciphertext hash is
/// checked before any byte reaches the decryptor, so a tampered segment is
/// refused as a hash mismatch (not by the decryptor) and nothing is written.
#[test]
fn r14_ciphertext_hash_is_checked_before_decryption() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = tmp.path().join("demo-1.2.3.sovb");
    let identity = age::x25519::Identity::generate();
    let mut spec = spec(vec![model], DEFAULT_PART_SIZE);
    spec.recipients = vec![identity.to_public()];
    spec.segment_size = 256 * 1024;
    create_bundle(&spec, &out).unwrap();
    let a = signer(1);
    sign_bundle(&out, &a).unwrap();
    // Flip one byte of the last segment's ciphertext.
    let mut raw = fs::read(&out).unwrap();
    let at = raw.len() - 100;
    raw[at] ^= 0x40;
    fs::write(&out, &raw).unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = UnverifiedBundle::open(&out)
        .unwrap()
        .verify(&trust(&[&a], 1))
        .unwrap()
        .unpack(&dest, Some(&identity))
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::PayloadHashMismatch), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
}
