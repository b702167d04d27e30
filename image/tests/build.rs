//! The image build for real (root, mmdebstrap from the host's apt sources):
//! two builds of the same inputs, each from scratch, give the same image
//! bytes; the manifest verifies and names every package; a lock whose version
//! the mirror no longer has is refused before anything is installed; the
//! production root has no login path and no package manager.

use std::fs;
use std::path::{Path, PathBuf};

use sovereign_image::{build, BuildError, BuildRequest, ImageSpec, Lock, Progress, DEFAULT_SPEC};
use sovereign_signing::SigningKey;

/// The service binaries cargo built beside this test (`cargo test --workspace`).
fn binaries() -> PathBuf {
    let dir = std::env::current_exe()
        .expect("test path")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for name in ["sovereign-audit", "sovereign-import", "sovereign-api"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: run `cargo build --workspace` first (cargo test --workspace builds it)",
            dir.join(name).display()
        );
    }
    dir
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spec: ImageSpec,
    key: SigningKey,
    binaries: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    fs::create_dir_all(root.join("trust")).expect("trust dir");
    let signer = sovereign_signing::generate_signing_key(&root.join("signer")).expect("signer");
    let trust = sovereign_signing::TrustFile::new(
        sovereign_signing::Trust::new(1, 1, vec![signer]).expect("trust"),
    );
    fs::write(root.join("trust/node.trust"), trust.to_text()).expect("trust file");
    Fixture {
        _dir: dir,
        spec: ImageSpec::parse(DEFAULT_SPEC).expect("default spec"),
        key: SigningKey::from_seed(&[7; 32]),
        binaries: binaries(),
        root,
    }
}

fn request<'a>(
    f: &'a Fixture,
    out: &'a Path,
    cache: Option<&'a Path>,
    lock: Option<&'a Path>,
) -> BuildRequest<'a> {
    BuildRequest {
        spec: &f.spec,
        spec_dir: &f.root,
        bundle_trust: None,
        lock,
        mirror: None,
        binaries: &f.binaries,
        out,
        cache,
        key: &f.key,
        version: "0.1.0-test",
        host_etc: Path::new("/etc"),
    }
}

fn log(event: Progress) {
    if let Progress::Done(name, took, detail) = event {
        eprintln!("{name}: {:.1} s, {detail}", took.as_secs_f64());
    }
}

#[test]
fn two_builds_from_scratch_are_byte_identical_and_a_stale_lock_is_refused() {
    let f = fixture();
    let (a, b) = (f.root.join("a"), f.root.join("b"));
    // The CLI's cache, so that the VM scenario's build after this one starts warm.
    let cache =
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/sovereign/image-base");
    let first = build(&request(&f, &a, Some(&cache), None), &mut log).expect("first build");
    let second = build(&request(&f, &b, None, None), &mut log).expect("second build, from scratch");
    assert!(!second.base_cached, "the second build made its own base");
    assert_eq!(first.sha256, second.sha256, "same inputs, same image");
    assert_eq!(
        fs::read(&first.image).expect("a"),
        fs::read(&second.image).expect("b"),
        "byte-identical images"
    );
    assert!(first.size < 500_000_000, "image is {} bytes", first.size);

    // The manifest verifies against the image and the build key.
    let (manifest, signer) =
        sovereign_image::verify(&first.manifest, &first.image, Some(&f.key.public_key()))
            .expect("verifies");
    assert_eq!(signer, f.key.public_key());
    assert_eq!(manifest.verity_root_hash, first.root_hash);
    assert!(manifest.cmdline.contains(&first.root_hash));
    assert!(manifest
        .packages
        .iter()
        .any(|p| p.name == "systemd" && p.sha256.len() == 64));
    let other = SigningKey::from_seed(&[8; 32]).public_key();
    let err = sovereign_image::verify(&first.manifest, &first.image, Some(&other)).unwrap_err();
    assert!(
        err.to_string().contains("not by the expected build key"),
        "{err}"
    );
    let mut flipped = fs::read(&first.image).expect("image");
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    let tampered = f.root.join("tampered.img");
    fs::write(&tampered, flipped).expect("write");
    let err = sovereign_image::verify(&first.manifest, &tampered, None).unwrap_err();
    assert!(err.to_string().contains("the manifest says"), "{err}");

    // The production root: no login path, no package manager, the services' users.
    let listing = fs::read_to_string(&first.listing).expect("listing");
    let has = |path: &str| {
        listing
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path))
    };
    for absent in [
        "/usr/bin/apt",
        "/usr/bin/dpkg",
        "/usr/sbin/sshd",
        "/usr/local/sbin/sovereign-test-agent",
    ] {
        assert!(!has(absent), "{absent} is in the production root");
    }
    for masked in [
        "getty@.service",
        "serial-getty@.service",
        "console-getty.service",
        "debug-shell.service",
    ] {
        let line = format!(" /etc/systemd/system/{masked} -> /dev/null");
        assert!(listing.contains(&line), "{masked} is not masked");
    }
    for present in [
        "/usr/bin/sovereign-api",
        "/etc/nftables.conf",
        "/etc/sovereign/node.trust",
        "/usr/lib/sysctl.d/90-sovereign.conf",
    ] {
        assert!(has(present), "{present} is missing");
    }
    assert!(
        !listing.lines().any(|l| l.contains("/boot/vmlinuz")),
        "the kernel lives in the UKI only"
    );

    // A lock pinning a version the mirror does not have is refused, naming it.
    let mut lock = Lock::read(&first.lock).expect("lock");
    let systemd = lock
        .packages
        .iter_mut()
        .find(|p| p.name == "systemd")
        .expect("systemd locked");
    systemd.version = "1.0-gone".into();
    let stale = f.root.join("stale.lock");
    fs::write(&stale, lock.render()).expect("stale lock");
    let out = f.root.join("c");
    let err = build(&request(&f, &out, Some(&cache), Some(&stale)), &mut log).unwrap_err();
    assert!(
        matches!(err, BuildError::LockedVersionsGone { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("systemd=1.0-gone"), "{err}");
    assert!(!out.join("node.img").exists(), "nothing is left behind");
}
