//! The cluster CA through the CLI: init, enroll, list, revoke, renew; the
//! node certificate checked by openssl (a real peer tool) and by `sovereign
//! node verify`, which refuses a foreign, expired, not yet valid, forged or
//! revoked certificate with one `error:` line each.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::Lab;

fn mode(lab: &Lab, rel: &str) -> u32 {
    fs::metadata(lab.path(rel)).unwrap().permissions().mode() & 0o777
}

fn rfc3339(offset_days: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::days(offset_days))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn a_cluster_enrolls_verifies_revokes_and_renews_its_nodes() {
    let lab = Lab::new();
    lab.run(&[
        "cluster",
        "init",
        "--name",
        "acme",
        "--lan-name",
        "ai.acme.lan",
        "--out",
        "acme",
    ])
    .ok();
    assert_eq!(mode(&lab, "acme/ca.key"), 0o600);
    lab.run(&["cluster", "init", "--name", "acme", "--out", "acme"])
        .refused("already holds a cluster");

    let enroll = |name: &str, extra: &[&str]| {
        let out = format!("{name}.identity");
        let mut args = vec![
            "node",
            "enroll",
            "--cluster",
            "acme",
            "--name",
            name,
            "--out",
        ];
        args.push(&out);
        args.extend_from_slice(extra);
        lab.run(&args)
    };
    let out = enroll("node-a", &["--lan-ip", "192.0.2.10"]).ok();
    assert!(out.stdout.contains("serial 1"), "{}", out.stdout);
    assert!(out.stdout.contains("ai.acme.lan"), "{}", out.stdout);
    assert_eq!(mode(&lab, "node-a.identity"), 0o600);
    enroll("node-b", &[]).ok();
    fs::remove_file(lab.path("node-a.identity")).unwrap();
    enroll("node-a", &[]).refused("already enrolled");
    assert!(!lab.path("node-a.identity").exists());
    enroll("Node_A", &[]).refused("not a valid name");
    enroll("node-c", &["--lan-name", "bad name"]).refused("not a valid DNS name");
    enroll("node-c", &["--days", "1"]).ok();
    lab.run(&[
        "node",
        "enroll",
        "--cluster",
        "nowhere",
        "--name",
        "x",
        "--out",
        "x.identity",
    ])
    .refused("not a cluster directory");

    // openssl, a real peer tool, accepts the certificate and the SANs.
    let openssl = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(lab.path("acme/ca.pem"))
        .arg(lab.path("node-b.identity"))
        .output()
        .expect("openssl runs");
    assert!(
        openssl.status.success() && String::from_utf8_lossy(&openssl.stdout).contains("OK"),
        "{}{}",
        String::from_utf8_lossy(&openssl.stdout),
        String::from_utf8_lossy(&openssl.stderr)
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(lab.path("node-b.identity"))
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("DNS:node-b") && text.contains("DNS:ai.acme.lan"),
        "{text}"
    );
    assert!(text.contains("ED25519"), "{text}");

    let ok = lab
        .run(&["node", "verify", "--ca", "acme/ca.pem", "node-b.identity"])
        .ok();
    assert!(
        ok.stdout.contains("node node-b (serial 2)"),
        "{}",
        ok.stdout
    );

    // Another cluster's node.
    lab.run(&["cluster", "init", "--name", "other", "--out", "other"])
        .ok();
    lab.run(&[
        "node",
        "enroll",
        "--cluster",
        "other",
        "--name",
        "node-m",
        "--out",
        "m.identity",
    ])
    .ok();
    lab.run(&["node", "verify", "--ca", "acme/ca.pem", "m.identity"])
        .refused("is not issued by the CA of cluster acme");
    // Expired, and not yet valid.
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "acme/ca.pem",
        "--at",
        &rfc3339(3),
        "node-c.identity",
    ])
    .refused("certificate of node-c expired");
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "acme/ca.pem",
        "--at",
        "2000-01-01T00:00:00Z",
        "node-b.identity",
    ])
    .refused("certificate of node-b is not valid before");
    // A forged signature: the certificate with its last signature byte changed.
    let text = fs::read_to_string(lab.path("node-b.identity")).unwrap();
    let blocks = pem::parse_many(&text).unwrap();
    let mut der = blocks[1].contents().to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x40;
    fs::write(
        lab.path("forged.pem"),
        pem::encode(&pem::Pem::new("CERTIFICATE", der)),
    )
    .unwrap();
    lab.run(&["node", "verify", "--ca", "acme/ca.pem", "forged.pem"])
        .refused("does not verify against the CA of cluster acme");

    // Revocation.
    let recipients = lab
        .run(&["cluster", "recipients", "--cluster", "acme"])
        .ok();
    assert_eq!(
        recipients
            .stdout
            .lines()
            .filter(|l| l.starts_with("age1"))
            .count(),
        3
    );
    let out = lab
        .run(&["cluster", "revoke", "--cluster", "acme", "node-b"])
        .ok();
    assert!(out.stdout.contains("revocation list 1"), "{}", out.stdout);
    fs::copy(lab.path("acme/revoked.crl"), lab.path("revoked-1.crl")).unwrap();
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "acme/ca.pem",
        "--revocations",
        "acme/revoked.crl",
        "node-b.identity",
    ])
    .refused("certificate of node-b (serial 2) is revoked");
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "other/ca.pem",
        "--revocations",
        "acme/revoked.crl",
        "m.identity",
    ])
    .refused("revocation list is not signed by the CA of cluster other");
    lab.run(&["cluster", "revoke", "--cluster", "acme", "node-b"])
        .refused("no certificate in force for node node-b");
    let crl = Command::new("openssl")
        .args(["crl", "-noout", "-CAfile"])
        .arg(lab.path("acme/ca.pem"))
        .arg("-in")
        .arg(lab.path("acme/revoked.crl"))
        .output()
        .expect("openssl runs");
    assert!(
        String::from_utf8_lossy(&crl.stderr).contains("verify OK"),
        "{}",
        String::from_utf8_lossy(&crl.stderr)
    );
    let recipients = lab
        .run(&["cluster", "recipients", "--cluster", "acme"])
        .ok();
    assert_eq!(recipients.stdout.lines().count(), 2);

    // Renewal re-issues node-c and revokes its old certificate.
    fs::rename(lab.path("node-c.identity"), lab.path("node-c.old")).unwrap();
    let out = enroll("node-c", &["--renew"]).ok();
    assert!(out.stdout.contains("serial 4"), "{}", out.stdout);
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "acme/ca.pem",
        "--revocations",
        "acme/revoked.crl",
        "node-c.old",
    ])
    .refused("is revoked by revocation list 2");
    lab.run(&[
        "node",
        "verify",
        "--ca",
        "acme/ca.pem",
        "--revocations",
        "acme/revoked.crl",
        "node-c.identity",
    ])
    .ok();
    let nodes = lab.run(&["cluster", "nodes", "--cluster", "acme"]).ok();
    assert_eq!(
        nodes.stdout.matches("revoked").count(),
        2,
        "{}",
        nodes.stdout
    );

    // Revocation lists travel by stick: the store keeps the newest, audited,
    // and refuses an older one.
    fs::create_dir(lab.path("stick")).unwrap();
    fs::copy(lab.path("acme/revoked.crl"), lab.path("stick/revoked.crl")).unwrap();
    let import = |stick: &str| {
        lab.run(&[
            "import",
            "--store",
            "store",
            "--cluster-ca",
            "acme/ca.pem",
            "--audit-log",
            "audit",
            stick,
        ])
    };
    let out = import("stick").ok();
    assert!(
        out.stdout.contains("installed revocation list 2"),
        "{}",
        out.stdout
    );
    let out = import("stick").ok();
    assert!(out.stdout.contains("already installed"), "{}", out.stdout);
    fs::create_dir(lab.path("old-stick")).unwrap();
    fs::copy(lab.path("revoked-1.crl"), lab.path("old-stick/revoked.crl")).unwrap();
    import("old-stick").refused("revocation list 1 is older than revocation list 2");
    fs::create_dir(lab.path("foreign-stick")).unwrap();
    lab.run(&["cluster", "revoke", "--cluster", "other", "node-m"])
        .ok();
    fs::copy(
        lab.path("other/revoked.crl"),
        lab.path("foreign-stick/other.crl"),
    )
    .unwrap();
    import("foreign-stick").refused("revocation list is not signed by the CA of cluster acme");
    let shown = lab.run(&["audit", "show", "--log", "audit"]).ok();
    assert!(
        shown.stdout.contains("revocations-installed"),
        "{}",
        shown.stdout
    );
}
