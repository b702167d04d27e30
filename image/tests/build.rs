//! The image build for real (root, mmdebstrap from the host's apt sources):
//! two builds of the same inputs, each from scratch, give the same image
//! bytes, and so does a third from scratch that installs the first one's
//! lock; the manifest verifies and names every package; a lock whose version
//! the mirror no longer has is refused before anything is installed; the
//! production root has no login path and no package manager; the test profile
//! differs from it by exactly the test agent.

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
    for name in ["sovereign-audit", "sovereign-import", "sovereign-node"] {
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
        cluster_ca: None,
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
fn builds_from_scratch_and_from_the_lock_are_byte_identical_and_a_stale_lock_is_refused() {
    let f = fixture();
    let (a, b) = (f.root.join("a"), f.root.join("b"));
    // The CLI's cache, so that the VM scenario's build after this one starts warm.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"))
        .join("sovereign/image-base");
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

    // From scratch again, installing exactly the first build's lock: the same image.
    let locked_out = f.root.join("locked");
    let locked = build(&request(&f, &locked_out, None, Some(&first.lock)), &mut log)
        .expect("build from the lock, from scratch");
    assert_eq!(
        fs::read_to_string(&locked.lock).expect("lock"),
        fs::read_to_string(&first.lock).expect("lock"),
        "the lock installs exactly its versions"
    );
    assert_eq!(
        locked.sha256, first.sha256,
        "the locked build gives the same bytes"
    );

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
        "ctrl-alt-del.target",
        "getty@.service",
        "serial-getty@.service",
        "console-getty.service",
        "debug-shell.service",
    ] {
        let line = format!(" /etc/systemd/system/{masked} -> /dev/null");
        assert!(listing.contains(&line), "{masked} is not masked");
    }
    for present in [
        "/usr/bin/sovereign-node",
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

    // Issue 14 (11): no USB network driver is in the image; every module the
    // node preloads (for sticks and Thunderbolt cables, before module loading
    // is locked) is.
    let modules: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with("/usr/lib/modules/") && p.ends_with(".ko"))
        .collect();
    assert!(
        !modules
            .iter()
            .any(|p| p.contains("/kernel/drivers/net/usb/")),
        "USB network drivers are pruned"
    );
    for module in sovereign_image::PRELOAD_MODULES {
        let file = format!("/{}.ko", module.replace('-', "_"));
        assert!(
            modules.iter().any(|p| p.replace('-', "_").ends_with(&file)),
            "{module} is not in the image"
        );
    }
    assert!(
        has("/etc/systemd/system/multi-user.target.wants/sovereign-lock-modules.service"),
        "module loading is locked after boot"
    );

    // Issue 14 (12, 13): the node takes its name from its identity, and the
    // built root carries exactly the rendered hardening files.
    assert!(!has("/etc/hostname"), "no fixed host name");
    assert!(
        has("/etc/systemd/system/sysinit.target.wants/sovereign-hostname.service"),
        "the node names itself at boot"
    );
    let blake3_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(path))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_else(|| panic!("{path} is not a file in the root"))
            .to_owned()
    };
    for (path, text) in [
        ("/etc/fstab", sovereign_image::fstab()),
        (
            "/usr/lib/systemd/system.conf.d/90-sovereign.conf",
            sovereign_image::SYSTEM_CONF.to_owned(),
        ),
        (
            "/etc/systemd/network/20-sovereign-lan.network",
            sovereign_image::lan_network(&f.spec),
        ),
        (
            "/usr/lib/systemd/system/sovereign-stick@.service",
            sovereign_image::stick_unit(),
        ),
        (
            "/usr/lib/systemd/system/sovereign-hostname.service",
            sovereign_image::hostname_unit(),
        ),
        (
            "/usr/lib/udev/rules.d/89-sovereign-usb-authorize.rules",
            sovereign_image::usb_authorize_rule(),
        ),
        (
            "/usr/lib/modules-load.d/sovereign.conf",
            sovereign_image::modules_load(),
        ),
    ] {
        assert_eq!(
            blake3_of(path),
            blake3::hash(text.as_bytes()).to_hex().to_string(),
            "{path}"
        );
    }

    // The test profile differs from production by exactly what the VM tests need.
    let mut test_spec = f.spec.clone();
    test_spec.profile = sovereign_image::Profile::Test;
    let t = f.root.join("t");
    let test_build = build(
        &BuildRequest {
            spec: &test_spec,
            ..request(&f, &t, Some(&cache), None)
        },
        &mut log,
    )
    .expect("test profile build");
    assert!(test_build.base_cached, "both profiles share one base");
    let parse = |text: &str| -> std::collections::BTreeMap<String, String> {
        text.lines()
            .map(|l| {
                (
                    l.split_whitespace().nth(4).unwrap_or("").to_owned(),
                    l.to_owned(),
                )
            })
            .collect()
    };
    let production = parse(&listing);
    let test = parse(&fs::read_to_string(&test_build.listing).expect("test listing"));
    let only = |a: &std::collections::BTreeMap<String, String>,
                b: &std::collections::BTreeMap<String, String>| {
        a.keys()
            .filter(|k| !b.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
    };
    let changed: Vec<String> = production
        .iter()
        .filter(|(k, v)| test.get(*k).is_some_and(|t| t != *v))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        only(&test, &production),
        [
            "/etc/systemd/network/05-sovereign-test-sink.network",
            "/etc/systemd/network/10-sovereign-test-thunderbolt0.link",
            "/etc/systemd/network/10-sovereign-test-thunderbolt1.link",
            "/etc/systemd/system/multi-user.target.wants/sovereign-test-agent.service",
            "/usr/bin/dpkg",
            "/usr/bin/dpkg-deb",
            "/usr/bin/dpkg-divert",
            "/usr/bin/dpkg-maintscript-helper",
            "/usr/bin/dpkg-query",
            "/usr/bin/dpkg-realpath",
            "/usr/bin/dpkg-split",
            "/usr/bin/dpkg-statoverride",
            "/usr/bin/dpkg-trigger",
            "/usr/lib/systemd/system/sovereign-test-agent.service",
            "/usr/local/sbin/sovereign-test-agent",
            "/usr/sbin/dpkg-preconfigure",
            "/usr/sbin/dpkg-reconfigure",
        ],
        "only in the test profile: the console agent, its NIC names, package tools"
    );
    assert_eq!(
        only(&production, &test),
        Vec::<String>::new(),
        "nothing only in production"
    );
    assert_eq!(
        changed,
        ["/usr/lib/os-release"],
        "os-release names the profile"
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
