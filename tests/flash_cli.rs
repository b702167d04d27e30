//! `sovereign flash` through the binary: the success summary, and one-line
//! `error:` refusals with exit status 1 that leave the target untouched.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn sovereign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .args(args)
        .output()
        .expect("run sovereign")
}

fn make_image(dir: &Path) -> String {
    let image = dir.join("node.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(24 << 20))
        .expect("image");
    let status = Command::new("sgdisk")
        .args([
            "-n1:2048:+8M",
            "-t1:ef00",
            "-c1:esp",
            "-n2:0:+8M",
            "-c2:root",
        ])
        .arg(&image)
        .output()
        .expect("sgdisk");
    assert!(status.status.success());
    image.to_string_lossy().into_owned()
}

fn one_error_line(output: &Output, needle: &str) {
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{stderr}");
}

/// A cluster under `dir` and an enrolled node `node-a`; returns the identity file.
fn enroll(dir: &Path) -> std::path::PathBuf {
    let cluster = dir.join("cluster");
    let identity = dir.join("node-a.identity");
    for args in [
        vec![
            "cluster",
            "init",
            "--name",
            "test",
            "--out",
            cluster.to_str().expect("utf8"),
        ],
        vec![
            "node",
            "enroll",
            "--cluster",
            cluster.to_str().expect("utf8"),
            "--name",
            "node-a",
            "--out",
            identity.to_str().expect("utf8"),
        ],
    ] {
        let out = sovereign(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    identity
}

#[test]
fn flash_prints_the_verified_image_and_the_node_it_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = enroll(dir.path());
    let disk = dir.path().join("disk");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk");
    let disk = disk.to_str().expect("utf8");
    let out = sovereign(&[
        "flash",
        "--image",
        &image,
        "--device",
        disk,
        "--node",
        key.to_str().expect("utf8"),
        "--state-mib",
        "16",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified by read-back"), "{stdout}");
    assert!(stdout.contains("holds node node-a (ed25519:"), "{stdout}");
    assert!(stdout.contains("16 MiB"), "{stdout}");
}

#[test]
fn flash_refusals_are_one_error_line_and_leave_the_device_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let identity = enroll(dir.path());
    let key = identity.to_str().expect("utf8");
    let small = dir.path().join("small");
    fs::write(&small, vec![3u8; 20 << 20]).expect("small disk");
    let small = small.to_str().expect("utf8");

    let out = sovereign(&["flash", "--image", &image, "--device", small, "--node", key]);
    one_error_line(&out, "but the image needs");

    let missing = dir.path().join("missing.key");
    let out = sovereign(&[
        "flash",
        "--image",
        &image,
        "--device",
        small,
        "--node",
        missing.to_str().expect("utf8"),
    ]);
    one_error_line(&out, "missing.key");

    let out = sovereign(&[
        "flash",
        "--image",
        &image,
        "--device",
        "/nonexistent-disk",
        "--node",
        key,
    ]);
    one_error_line(&out, "/nonexistent-disk");

    // A bare key (how nodes were flashed before enrollment) points to enrollment.
    let bare = dir.path().join("node.key");
    assert!(
        sovereign(&["key", "generate", "--out", bare.to_str().expect("utf8")])
            .status
            .success()
    );
    let out = sovereign(&[
        "flash",
        "--image",
        &image,
        "--device",
        small,
        "--node",
        bare.to_str().expect("utf8"),
    ]);
    one_error_line(&out, "enroll the node with `sovereign node enroll");
    // A tampered identity file.
    let text = fs::read_to_string(&identity).expect("identity");
    let blocks = pem::parse_many(&text).expect("pem");
    let mut cert = blocks[1].contents().to_vec();
    let last = cert.len() - 1;
    cert[last] ^= 1;
    let tampered = dir.path().join("tampered.identity");
    fs::write(
        &tampered,
        pem::encode_many(&[
            blocks[0].clone(),
            pem::Pem::new("CERTIFICATE", cert),
            blocks[2].clone(),
        ]),
    )
    .expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tampered, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let out = sovereign(&[
        "flash",
        "--image",
        &image,
        "--device",
        small,
        "--node",
        tampered.to_str().expect("utf8"),
    ]);
    one_error_line(&out, "does not verify against the CA of cluster test");

    assert_eq!(fs::read(small).expect("small"), vec![3u8; 20 << 20]);
}
