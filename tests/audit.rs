//! The audit log through the CLI: imports are recorded, the export verifies,
//! a tampered copy names its first bad record, and the stick carries the courier.

mod support;

use std::fs;

use support::Lab;

#[test]
fn imports_are_audited_exported_and_verified() {
    let lab = Lab::new();
    lab.trust("node.trust", &["alice"], 1, 1);
    fs::create_dir(lab.path("stick")).unwrap();
    lab.model("m1", 50_000, 1);
    lab.bundle(
        "stick/demo-1.0.0.sovb",
        "demo",
        "1.0.0",
        "m1",
        &["alice"],
        &[],
    );
    lab.bundle(
        "stick/evil-1.0.0.sovb",
        "evil",
        "1.0.0",
        "m1",
        &["mallory"],
        &[],
    );
    let out = lab
        .run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "--audit-log",
            "audit",
            "--node",
            "node-a",
            "stick",
        ])
        .refused("evil-1.0.0.sovb");
    assert!(
        out.stdout.contains("left the audit checkpoint"),
        "{}",
        out.stdout
    );

    let shown = lab.run(&["audit", "show", "--log", "audit", "--json"]).ok();
    let records: Vec<serde_json::Value> = shown
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcome = |model: &str| {
        records
            .iter()
            .find(|r| r["details"]["model"] == model)
            .map(|r| r["details"]["outcome"].as_str().unwrap().to_owned())
    };
    assert_eq!(outcome("demo@1.0.0").as_deref(), Some("imported"));
    assert_eq!(outcome("evil@1.0.0").as_deref(), Some("rejected"));
    let rejected = records
        .iter()
        .find(|r| r["details"]["model"] == "evil@1.0.0")
        .unwrap();
    assert!(rejected["details"]["reason"]
        .as_str()
        .unwrap()
        .contains("not trusted"));
    assert!(records
        .iter()
        .all(|r| r["node"] == "node-a" && r["service"] == "import"));

    lab.run(&["audit", "export", "--log", "audit", "--out", "export.json"])
        .ok();
    let ok = lab
        .run(&["audit", "verify", "--key", "audit/node.pub", "export.json"])
        .ok();
    assert!(ok.stdout.starts_with("ok: "), "{}", ok.stdout);
    lab.run(&[
        "audit",
        "verify",
        "--key",
        "audit/node.pub",
        "stick/sovereign-audit/node-a",
    ])
    .ok();

    // Edit the first record's outcome in a copy of the export.
    let text = fs::read_to_string(lab.path("export.json")).unwrap();
    let tampered = text.replacen("rejected", "imported", 1);
    assert_ne!(tampered, text);
    fs::write(lab.path("tampered.json"), tampered).unwrap();
    lab.run(&[
        "audit",
        "verify",
        "--key",
        "audit/node.pub",
        "tampered.json",
    ])
    .refused("record ");
    lab.run(&["audit", "verify", "--key", "alice.pub", "export.json"])
        .refused("not by the expected");
}

/// An export whose records carry `service`, padded to `count` records.
fn crafted_export(lab: &Lab, service: &str, count: usize) -> String {
    let record = serde_json::json!({
        "record": {"seq": 0, "time": "t", "node": "n", "service": service, "kind": "boot", "details": {"pad": "x".repeat(200)}},
        "root": "00",
        "sig": "AA==",
    })
    .to_string();
    let export = serde_json::json!({
        "format": "sovereign-audit-export/1",
        "node": "n",
        "public_key": "ed25519:x",
        "certificate": null,
        "records": vec![record; count],
        "checkpoints": [],
    });
    fs::write(lab.path("crafted.json"), export.to_string()).unwrap();
    "crafted.json".into()
}

#[test]
fn r14_audit_show_escapes_control_characters() {
    let lab = Lab::new();
    let file = crafted_export(&lab, "api\u{1b}[2K\rforged line\u{202e}", 1);
    let shown = lab.run(&["audit", "show", "--log", &file]).ok();
    assert!(
        !shown.stdout.contains(['\u{1b}', '\r', '\u{202e}']),
        "{:?}",
        shown.stdout
    );
    assert!(shown
        .stdout
        .contains("api\\u{1b}[2K\\u{d}forged line\\u{202e}"));
}

#[test]
fn r14_audit_show_exits_quietly_when_its_pipe_closes() {
    let lab = Lab::new();
    let file = crafted_export(&lab, "api", 5000);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .current_dir(lab.path(""))
        .args(["audit", "show", "--log", &file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe while more than a pipe's worth is left.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
