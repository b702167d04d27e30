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

#[test]
fn flash_prints_the_verified_image_and_the_node_it_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = dir.path().join("node.key");
    let generated = sovereign(&["key", "generate", "--out", key.to_str().expect("utf8")]);
    assert!(generated.status.success());
    let public = String::from_utf8_lossy(&generated.stdout)
        .trim()
        .to_string();
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
    assert!(stdout.contains(&format!("holds node {public}")), "{stdout}");
    assert!(stdout.contains("16 MiB"), "{stdout}");
}

#[test]
fn flash_refusals_are_one_error_line_and_leave_the_device_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = dir.path().join("node.key");
    assert!(
        sovereign(&["key", "generate", "--out", key.to_str().expect("utf8")])
            .status
            .success()
    );
    let key = key.to_str().expect("utf8");
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

    assert_eq!(fs::read(small).expect("small"), vec![3u8; 20 << 20]);
}
