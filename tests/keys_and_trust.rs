//! Key files and trust files through the CLI.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use support::Lab;

#[test]
fn secret_keys_are_private_and_never_overwritten() {
    let lab = Lab::new();
    let out = lab.run(&["key", "generate", "--out", "signer"]).ok();
    assert!(out.stdout.starts_with("ed25519:"), "{}", out.stdout);
    assert_eq!(
        fs::metadata(lab.path("signer"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::read_to_string(lab.path("signer.pub")).unwrap().trim(),
        out.stdout.trim()
    );
    lab.run(&["key", "generate", "--out", "signer"])
        .refused("already exists");

    let age = lab
        .run(&["key", "generate", "--age", "--out", "node.age"])
        .ok();
    assert!(age.stdout.starts_with("age1"), "{}", age.stdout);
    assert!(fs::read_to_string(lab.path("node.age"))
        .unwrap()
        .contains("AGE-SECRET-KEY-1"));

    lab.model("m", 1000, 1);
    lab.run(&[
        "bundle",
        "create",
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--out",
        "m-1.0.0.sovb",
        "m",
    ])
    .ok();
    fs::set_permissions(lab.path("signer"), fs::Permissions::from_mode(0o644)).unwrap();
    lab.run(&["bundle", "sign", "--key", "signer", "m-1.0.0.sovb"])
        .refused("accessible by other users (mode 0644)");
}

#[test]
fn trust_init_checks_its_arguments() {
    let lab = Lab::new();
    let a = lab.key("a");
    lab.run(&[
        "trust",
        "init",
        "--signer",
        &a,
        "--threshold",
        "2",
        "--out",
        "t",
    ])
    .refused("threshold 2");
    lab.run(&[
        "trust",
        "init",
        "--signer",
        &a,
        "--signer",
        &a,
        "--threshold",
        "1",
        "--out",
        "t",
    ])
    .refused("listed twice");
    lab.run(&[
        "trust",
        "init",
        "--signer",
        "ed25519:nope",
        "--threshold",
        "1",
        "--out",
        "t",
    ])
    .refused("ed25519:nope");
    assert!(!lab.path("t").exists());
    lab.run(&[
        "trust",
        "init",
        "--signer",
        &a,
        "--threshold",
        "1",
        "--out",
        "t",
    ])
    .ok();
    lab.run(&[
        "trust",
        "init",
        "--signer",
        &a,
        "--threshold",
        "1",
        "--out",
        "t",
    ])
    .refused("t");
}

#[test]
fn bundle_verify_and_inspect_report_what_they_checked() {
    let lab = Lab::new();
    lab.trust("t", &["a"], 1, 1);
    lab.run(&["key", "generate", "--age", "--out", "id"]).ok();
    lab.model("m", 70_000, 1);
    lab.bundle(
        "m-1.0.0.sovb",
        "m",
        "1.0.0",
        "m",
        &["a"],
        &["--encrypt-to", "id.pub"],
    );
    let plain = lab
        .run(&["bundle", "verify", "--trust", "t", "m-1.0.0.sovb"])
        .ok();
    assert!(
        plain.stdout.contains("content not decrypted"),
        "{}",
        plain.stdout
    );
    let full = lab
        .run(&[
            "bundle",
            "verify",
            "--trust",
            "t",
            "--identity",
            "id",
            "m-1.0.0.sovb",
        ])
        .ok();
    assert!(
        full.stdout.contains("every file verified"),
        "{}",
        full.stdout
    );
    let shown = lab.run(&["bundle", "inspect", "m-1.0.0.sovb"]).ok();
    assert!(
        shown.stdout.contains("age-encrypted") && shown.stdout.contains("model.gguf"),
        "{}",
        shown.stdout
    );
    let json = lab
        .run(&["bundle", "inspect", "--json", "m-1.0.0.sovb"])
        .ok();
    let manifest: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(manifest["name"], "m");
    lab.run(&["bundle", "verify", "--trust", "t", "nosuch.sovb"])
        .refused("nosuch.sovb");
    lab.run(&[
        "bundle",
        "create",
        "--name",
        "Bad Name",
        "--version",
        "1.0.0",
        "--out",
        "x.sovb",
        "m",
    ])
    .refused("model name");
    lab.run(&[
        "bundle",
        "create",
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--out",
        "x.zip",
        "m",
    ])
    .refused(".sovb");
}
