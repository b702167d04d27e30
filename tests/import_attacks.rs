//! Every attack of DESIGN.md's bundle section, through the real CLI: each is
//! refused with one clear `error:` line, a non-zero exit, and the store unchanged.

mod support;

use std::fs;

use support::{flip, Lab};

/// A lab with a store that already holds `demo@1.0.0`, signed by `alice`.
fn lab_with_store() -> Lab {
    let lab = Lab::new();
    lab.trust("node.trust", &["alice"], 1, 1);
    lab.model("m1", 200_000, 1);
    lab.bundle("demo-1.0.0.sovb", "demo", "1.0.0", "m1", &["alice"], &[]);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-1.0.0.sovb",
    ])
    .ok();
    lab
}

/// Imports `bundle` and checks the refusal and the unchanged store.
fn check_refused(lab: &Lab, bundle: &str, fragment: &str) {
    let before = lab.snapshot("store");
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        bundle,
    ])
    .refused(fragment);
    assert_eq!(
        lab.snapshot("store"),
        before,
        "store changed after a refused import"
    );
}

/// Writes a bundle by hand from raw manifest bytes and payload, signed by `key`
/// over the manifest: what a malicious (or buggy) signer could produce.
fn forge(lab: &Lab, out: &str, manifest: &serde_json::Value, payload: &[u8], key: &str) {
    let manifest = serde_json::to_vec(manifest).unwrap();
    let key = sovereign_signing::read_signing_key(&lab.path(key)).unwrap();
    let mut bytes = b"SOVBNDL\x01".to_vec();
    bytes.extend((manifest.len() as u32).to_le_bytes());
    bytes.extend(16u32.to_le_bytes());
    bytes.extend(key.public_key().to_bytes());
    bytes.extend(key.sign(&manifest));
    bytes.resize(16 + 16 * 96, 0);
    bytes.extend(&manifest);
    bytes.extend(payload);
    fs::write(lab.path(out), bytes).unwrap();
}

fn manifest_json(files: serde_json::Value, payload_size: u64) -> serde_json::Value {
    serde_json::json!({
        "format": "sovereign-bundle/1",
        "name": "demo",
        "version": "2.0.0",
        "created": "2026-01-01T00:00:00Z",
        "part_size": 4_294_901_760u64,
        "payload": {"size": payload_size, "encryption": {"kind": "none"}},
        "files": files,
    })
}

fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[test]
fn a_flipped_payload_byte_is_refused() {
    let lab = lab_with_store();
    lab.model("m2", 200_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &["alice"], &[]);
    flip(&lab.path("demo-2.0.0.sovb"), -100_000);
    check_refused(
        &lab,
        "demo-2.0.0.sovb",
        "does not match the signed manifest",
    );
}

#[test]
fn a_flipped_manifest_byte_breaks_the_signature() {
    let lab = lab_with_store();
    lab.model("m2", 200_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &["alice"], &[]);
    // Inside the manifest's `created` timestamp: still valid JSON, different bytes.
    let bytes = fs::read(lab.path("demo-2.0.0.sovb")).unwrap();
    let at = bytes.windows(8).position(|w| w == b"\"created").unwrap() + 14;
    flip(&lab.path("demo-2.0.0.sovb"), at as i64);
    check_refused(&lab, "demo-2.0.0.sovb", "does not match this manifest");
}

#[test]
fn a_flipped_signature_or_magic_byte_is_refused() {
    let lab = lab_with_store();
    lab.model("m2", 200_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &["alice"], &[]);
    fs::copy(lab.path("demo-2.0.0.sovb"), lab.path("magic-2.0.0.sovb")).unwrap();
    flip(&lab.path("demo-2.0.0.sovb"), 16 + 40);
    check_refused(&lab, "demo-2.0.0.sovb", "does not match this manifest");
    flip(&lab.path("magic-2.0.0.sovb"), 0);
    check_refused(&lab, "magic-2.0.0.sovb", "not a Sovereign bundle");
}

#[test]
fn truncation_and_missing_or_extra_parts_are_refused() {
    let lab = lab_with_store();
    lab.model("m2", 300_000, 2);
    lab.bundle(
        "demo-2.0.0.sovb",
        "demo",
        "2.0.0",
        "m2",
        &["alice"],
        &["--part-size", "65536"],
    );
    let last = lab.path("demo-2.0.0.sovb.004");
    let bytes = fs::read(&last).unwrap();
    fs::write(&last, &bytes[..bytes.len() - 1]).unwrap();
    check_refused(&lab, "demo-2.0.0.sovb", "truncated");
    fs::write(&last, &bytes).unwrap();
    fs::rename(lab.path("demo-2.0.0.sovb.002"), lab.path("hidden")).unwrap();
    check_refused(&lab, "demo-2.0.0.sovb", "part 3");
    fs::rename(lab.path("hidden"), lab.path("demo-2.0.0.sovb.002")).unwrap();
    fs::write(lab.path("demo-2.0.0.sovb.005"), b"extra").unwrap();
    check_refused(&lab, "demo-2.0.0.sovb", "unexpected extra part");
    fs::remove_file(lab.path("demo-2.0.0.sovb.005")).unwrap();
    let mut long = bytes.clone();
    long.push(0);
    fs::write(&last, &long).unwrap();
    check_refused(&lab, "demo-2.0.0.sovb", "trailing data");
    fs::write(&last, &bytes).unwrap();
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-2.0.0.sovb",
    ])
    .ok();
}

#[test]
fn missing_extra_and_duplicated_files_are_refused() {
    let lab = lab_with_store();
    let (a, b) = (b"first file".as_slice(), b"second".as_slice());
    let entry = |path: &str, data: &[u8]| serde_json::json!({"path": path, "size": data.len(), "blake3": hash(data)});
    // Missing: the manifest lists b, the payload lacks it.
    let files = serde_json::json!([entry("a", a), entry("b", b)]);
    forge(
        &lab,
        "missing-2.0.0.sovb",
        &manifest_json(files, (a.len() + b.len()) as u64),
        a,
        "alice",
    );
    check_refused(&lab, "missing-2.0.0.sovb", "truncated");
    // Extra: payload bytes that no file accounts for.
    let files = serde_json::json!([entry("a", a)]);
    forge(
        &lab,
        "extra-2.0.0.sovb",
        &manifest_json(files, a.len() as u64),
        &[a, b].concat(),
        "alice",
    );
    check_refused(&lab, "extra-2.0.0.sovb", "trailing data");
    // Duplicated path.
    let files = serde_json::json!([entry("a", a), entry("a", a)]);
    forge(
        &lab,
        "dup-2.0.0.sovb",
        &manifest_json(files, 2 * a.len() as u64),
        &[a, a].concat(),
        "alice",
    );
    check_refused(&lab, "dup-2.0.0.sovb", "listed twice");
}

#[test]
fn paths_that_escape_the_store_are_refused() {
    let lab = lab_with_store();
    let data = b"owned".as_slice();
    for (i, path) in [
        "../../etc/cron.d/x",
        "/etc/passwd",
        "models/../../x",
        "a/./b",
    ]
    .iter()
    .enumerate()
    {
        let files = serde_json::json!([{"path": path, "size": data.len(), "blake3": hash(data)}]);
        let name = format!("escape{i}-2.0.0.sovb");
        forge(
            &lab,
            &name,
            &manifest_json(files, data.len() as u64),
            data,
            "alice",
        );
        let fragment = if path.starts_with('/') {
            "is absolute"
        } else {
            "escapes the store"
        };
        check_refused(&lab, &name, fragment);
    }
    // A bundle on the stick that is a symlink is not followed.
    std::os::unix::fs::symlink(lab.path("demo-1.0.0.sovb"), lab.path("link-1.0.0.sovb")).unwrap();
    check_refused(&lab, "link-1.0.0.sovb", "symlink");
    assert!(!lab.path("etc").exists() && !lab.dir.path().parent().unwrap().join("x").exists());
}

#[test]
fn unknown_and_revoked_signers_are_refused() {
    let lab = lab_with_store();
    lab.model("m2", 100_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &["mallory"], &[]);
    check_refused(&lab, "demo-2.0.0.sovb", "not trusted");

    // Rotate trust to bob only (signed by alice, the current threshold), from a stick.
    fs::create_dir(lab.path("stick")).unwrap();
    lab.trust("stick/rotate.trust", &["bob"], 1, 2);
    lab.run(&["trust", "sign", "--key", "alice", "stick/rotate.trust"])
        .ok();
    let out = lab
        .run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "stick",
        ])
        .ok();
    assert!(
        out.stdout.contains("installed trust file sequence 2"),
        "{}",
        out.stdout
    );
    // Alice is revoked now.
    lab.model("m3", 100_000, 3);
    lab.bundle("demo-3.0.0.sovb", "demo", "3.0.0", "m3", &["alice"], &[]);
    check_refused(&lab, "demo-3.0.0.sovb", "not trusted");
    lab.bundle("demo-4.0.0.sovb", "demo", "4.0.0", "m3", &["bob"], &[]);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-4.0.0.sovb",
    ])
    .ok();
}

#[test]
fn an_older_or_unsigned_trust_file_is_never_accepted() {
    let lab = lab_with_store();
    fs::create_dir(lab.path("stick")).unwrap();
    // Unsigned rotation.
    lab.trust("stick/a.trust", &["mallory"], 1, 5);
    let before = lab.snapshot("store");
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "stick",
    ])
    .refused("0 valid signature(s)");
    assert_eq!(lab.snapshot("store"), before);
    // Signed by alice but not newer than the installed sequence 1.
    fs::remove_file(lab.path("stick/a.trust")).unwrap();
    lab.trust("stick/b.trust", &["mallory"], 1, 1);
    lab.run(&["trust", "sign", "--key", "alice", "stick/b.trust"])
        .ok();
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "stick",
    ])
    .refused("not newer");
    assert_eq!(lab.snapshot("store"), before);
}

#[test]
fn too_few_signatures_are_refused() {
    let lab = Lab::new();
    lab.trust("node.trust", &["alice", "bob", "carol"], 2, 1);
    lab.model("m1", 100_000, 1);
    lab.bundle("demo-1.0.0.sovb", "demo", "1.0.0", "m1", &["alice"], &[]);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-1.0.0.sovb",
    ])
    .refused("1 valid signature(s) from trusted signers, 2 needed");
    // Only the operator's own trust file was adopted; no model, no leftovers.
    let after = lab.snapshot("store");
    assert_eq!(after.keys().collect::<Vec<_>>(), ["trust"], "{after:?}");
    lab.run(&["bundle", "sign", "--key", "carol", "demo-1.0.0.sovb"])
        .ok();
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-1.0.0.sovb",
    ])
    .ok();
}

#[test]
fn a_signature_moved_from_another_manifest_is_refused() {
    let lab = lab_with_store();
    lab.model("m2", 100_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &[], &[]);
    let signed = fs::read(lab.path("demo-1.0.0.sovb")).unwrap();
    let mut target = fs::read(lab.path("demo-2.0.0.sovb")).unwrap();
    target[16..16 + 96].copy_from_slice(&signed[16..16 + 96]);
    fs::write(lab.path("demo-2.0.0.sovb"), target).unwrap();
    check_refused(&lab, "demo-2.0.0.sovb", "does not match this manifest");
}

#[test]
fn rollback_is_refused_unless_allowed_and_the_mark_survives_removal() {
    let lab = lab_with_store();
    lab.model("m2", 100_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "m2", &["alice"], &[]);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-2.0.0.sovb",
    ])
    .ok();
    lab.model("m0", 100_000, 3);
    lab.bundle("demo-0.9.0.sovb", "demo", "0.9.0", "m0", &["alice"], &[]);
    check_refused(&lab, "demo-0.9.0.sovb", "rollback refused");
    lab.run(&["models", "remove", "--store", "store", "demo@2.0.0"])
        .ok();
    check_refused(&lab, "demo-0.9.0.sovb", "older than demo@2.0.0");
    let out = lab
        .run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "--allow-downgrade",
            "demo-0.9.0.sovb",
        ])
        .ok();
    assert!(out.stdout.contains("(downgrade)"), "{}", out.stdout);
    let history = lab.run(&["models", "history", "--store", "store"]).ok();
    assert!(
        history
            .stdout
            .contains("demo@0.9.0 imported: downgrade allowed"),
        "{}",
        history.stdout
    );
}

#[test]
fn absurd_sizes_are_refused_before_reading() {
    let lab = lab_with_store();
    let data = b"tiny".as_slice();
    let files =
        serde_json::json!([{"path": "m", "size": 5_000_000_000_000u64, "blake3": hash(data)}]);
    forge(
        &lab,
        "huge-2.0.0.sovb",
        &manifest_json(files, 5_000_000_000_000),
        data,
        "alice",
    );
    check_refused(&lab, "huge-2.0.0.sovb", "parts");
    // A header claiming a 3 GB manifest.
    let mut bytes = b"SOVBNDL\x01".to_vec();
    bytes.extend(3_000_000_000u32.to_le_bytes());
    bytes.extend(16u32.to_le_bytes());
    bytes.resize(4096, 0);
    fs::write(lab.path("header-2.0.0.sovb"), bytes).unwrap();
    check_refused(
        &lab,
        "header-2.0.0.sovb",
        "header claims a manifest of 3000000000 bytes",
    );
}

#[test]
fn the_wrong_age_identity_is_refused() {
    let lab = lab_with_store();
    lab.run(&["key", "generate", "--age", "--out", "node.age"])
        .ok();
    lab.run(&["key", "generate", "--age", "--out", "other.age"])
        .ok();
    lab.model("m2", 150_000, 2);
    lab.bundle(
        "demo-2.0.0.sovb",
        "demo",
        "2.0.0",
        "m2",
        &["alice"],
        &["--encrypt-to", "node.age.pub"],
    );
    let before = lab.snapshot("store");
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "--identity",
        "other.age",
        "demo-2.0.0.sovb",
    ])
    .refused("not a recipient");
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-2.0.0.sovb",
    ])
    .refused("age identity is needed");
    assert_eq!(lab.snapshot("store"), before);
    // A flipped ciphertext byte is refused even with the right identity: the
    // signed ciphertext hash is checked before any byte reaches the decryptor.
    fs::copy(lab.path("demo-2.0.0.sovb"), lab.path("bad-2.0.0.sovb")).unwrap();
    flip(&lab.path("bad-2.0.0.sovb"), -5000);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "--identity",
        "node.age",
        "bad-2.0.0.sovb",
    ])
    .refused("does not match the signed manifest");
    assert_eq!(lab.snapshot("store"), before);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "--identity",
        "node.age",
        "demo-2.0.0.sovb",
    ])
    .ok();
    let live = fs::read(lab.path("store/models/demo/2.0.0/files/model.gguf")).unwrap();
    assert_eq!(live, fs::read(lab.path("m2/model.gguf")).unwrap());
}

#[test]
fn a_stick_with_good_bad_and_foreign_files_imports_only_the_good() {
    let lab = lab_with_store();
    fs::create_dir(lab.path("stick")).unwrap();
    lab.model("m2", 100_000, 2);
    lab.bundle(
        "stick/demo-2.0.0.sovb",
        "demo",
        "2.0.0",
        "m2",
        &["alice"],
        &[],
    );
    lab.model("m3", 100_000, 3);
    lab.bundle(
        "stick/other-1.0.0.sovb",
        "other",
        "1.0.0",
        "m3",
        &["mallory"],
        &[],
    );
    fs::write(lab.path("stick/._demo-2.0.0.sovb"), b"\x00\x05\x16\x07").unwrap();
    fs::write(lab.path("stick/notes.txt"), b"hello").unwrap();
    let out = lab
        .run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "stick",
        ])
        .refused("other-1.0.0.sovb");
    assert!(out.stdout.contains("imported demo@2.0.0"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("skipped stick/._demo-2.0.0.sovb: macOS metadata"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("skipped stick/notes.txt: not a bundle"),
        "{}",
        out.stdout
    );
    let models = lab.run(&["models", "--store", "store"]).ok();
    assert!(
        models.stdout.contains("demo@2.0.0") && !models.stdout.contains("other@"),
        "{}",
        models.stdout
    );
}
