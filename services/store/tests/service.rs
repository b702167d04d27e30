//! The `sovereign-import` service binary and store recovery, driven through
//! the library that the CLI also uses.

use std::fs;
use std::path::Path;
use std::process::Command;

use sovereign_signing::{create_bundle, sign_bundle, BundleSpec, SigningKey, Trust, TrustFile};
use sovereign_store::{live_model, live_models, Store};

fn setup(dir: &Path) -> SigningKey {
    let key = SigningKey::from_seed(&[3; 32]);
    let trust = TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap());
    fs::write(dir.join("node.trust"), trust.to_text()).unwrap();
    key
}

fn bundle(
    dir: &Path,
    key: &SigningKey,
    name: &str,
    version: &str,
    content: &[u8],
) -> std::path::PathBuf {
    let model = dir.join(format!("{name}-{version}-src"));
    fs::create_dir_all(&model).unwrap();
    fs::write(model.join("weights.bin"), content).unwrap();
    let out = dir.join("stick").join(format!("{name}-{version}.sovb"));
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let spec = BundleSpec {
        name: name.into(),
        version: version.parse().unwrap(),
        inputs: vec![model],
        recipients: Vec::new(),
        part_size: sovereign_signing::DEFAULT_PART_SIZE,
        segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &out).unwrap();
    sign_bundle(&out, key).unwrap();
    out
}

#[test]
fn the_service_imports_a_mounted_stick() {
    let tmp = tempfile::tempdir().unwrap();
    let key = setup(tmp.path());
    bundle(tmp.path(), &key, "alpha", "1.0.0", b"alpha weights");
    bundle(tmp.path(), &key, "beta", "0.3.0", b"beta weights");
    let output = Command::new(env!("CARGO_BIN_EXE_sovereign-import"))
        .arg("--store")
        .arg(tmp.path().join("store"))
        .arg("--trust")
        .arg(tmp.path().join("node.trust"))
        .arg(tmp.path().join("stick"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let models = live_models(&tmp.path().join("store")).unwrap();
    let names: Vec<_> = models
        .iter()
        .map(|m| format!("{}@{}", m.name, m.version))
        .collect();
    assert_eq!(names, ["alpha@1.0.0", "beta@0.3.0"]);
    assert_eq!(
        fs::read(models[1].dir.join("weights.bin")).unwrap(),
        b"beta weights"
    );
}

#[test]
fn the_service_fails_on_a_rejected_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let key = setup(tmp.path());
    let path = bundle(tmp.path(), &key, "alpha", "1.0.0", b"alpha weights");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sovereign-import"))
        .arg("--store")
        .arg(tmp.path().join("store"))
        .arg("--trust")
        .arg(tmp.path().join("node.trust"))
        .arg(tmp.path().join("stick"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("hash mismatch")),
        "{stderr}"
    );
    assert!(live_models(&tmp.path().join("store")).unwrap().is_empty());
}

#[test]
fn a_lost_index_is_rebuilt_from_the_live_models_and_newest_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let key = setup(tmp.path());
    let store_dir = tmp.path().join("store");
    let options = sovereign_store::ImportOptions {
        trust: Some(&tmp.path().join("node.trust")),
        ..Default::default()
    };
    {
        let store = Store::open(&store_dir).unwrap();
        for version in ["1.0.0", "1.2.0", "1.10.0"] {
            let path = bundle(tmp.path(), &key, "alpha", version, version.as_bytes());
            store.import_bundle(&path, &options).unwrap();
        }
        assert!(
            Store::open(&store_dir).is_err(),
            "a second writer must be refused"
        );
    }
    fs::remove_dir_all(store_dir.join("index")).unwrap();
    let store = Store::open(&store_dir).unwrap();
    let versions: Vec<_> = store
        .installed()
        .unwrap()
        .iter()
        .map(|r| r.version.to_string())
        .collect();
    assert_eq!(versions, ["1.0.0", "1.2.0", "1.10.0"]);
    let live = live_model(&store_dir, "alpha").unwrap();
    assert_eq!(
        live.version.to_string(),
        "1.10.0",
        "semver order, not string order"
    );
    assert_eq!(fs::read(live.dir.join("weights.bin")).unwrap(), b"1.10.0");
    assert!(live_model(&store_dir, "../alpha").is_err());
    assert!(live_model(&store_dir, "gamma").is_err());
}

/// Issue 14 item 7: a second stick's import waits for the store (up to
/// `--wait-secs`) instead of being dropped, and a FIFO posing as a bundle
/// part is refused without blocking while the store lock is held.
#[test]
fn r14_a_second_import_waits_for_the_store_and_a_fifo_part_never_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let key = setup(tmp.path());
    let model = tmp.path().join("src");
    fs::create_dir_all(&model).unwrap();
    fs::write(model.join("weights.bin"), vec![7u8; 200_000]).unwrap();
    let stick = tmp.path().join("stick");
    fs::create_dir_all(&stick).unwrap();
    let out = stick.join("alpha-1.0.0.sovb");
    let spec = BundleSpec {
        name: "alpha".into(),
        version: "1.0.0".parse().unwrap(),
        inputs: vec![model],
        recipients: Vec::new(),
        part_size: 64 * 1024,
        segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &out).unwrap();
    sign_bundle(&out, &key).unwrap();
    // The second part swapped for a FIFO (nobody will ever write to it).
    let part = stick.join("alpha-1.0.0.sovb.001");
    let kept = fs::read(&part).unwrap();
    fs::remove_file(&part).unwrap();
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &part,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();

    let busy = Store::open(&tmp.path().join("store")).unwrap();
    let import = |wait: &str| {
        Command::new(env!("CARGO_BIN_EXE_sovereign-import"))
            .arg("--store")
            .arg(tmp.path().join("store"))
            .arg("--trust")
            .arg(tmp.path().join("node.trust"))
            .args(["--wait-secs", wait])
            .arg(&stick)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = import("0").wait_with_output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    let mut waiting = import("120");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(waiting.try_wait().unwrap().is_none(), "it did not wait");
    drop(busy);
    // It gets the store, and the FIFO part is refused instead of waited on.
    let output = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert!(live_models(&tmp.path().join("store")).unwrap().is_empty());
    fs::remove_file(&part).unwrap();
    fs::write(&part, kept).unwrap();
    let output = import("0").wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(live_models(&tmp.path().join("store")).unwrap().len(), 1);
}
