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
