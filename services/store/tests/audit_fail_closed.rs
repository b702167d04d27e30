//! If the audit log cannot record, nothing is imported.

use std::fs;
use std::os::unix::net::UnixListener;

use sovereign_audit::{AuditClient, Auditor};
use sovereign_signing::{create_bundle, sign_bundle, BundleSpec, SigningKey, Trust, TrustFile};
use sovereign_store::{live_models, ImportOptions, Store, StoreError};

#[test]
fn an_audit_daemon_that_went_away_blocks_the_import() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_seed(&[4; 32]);
    fs::write(
        tmp.path().join("node.trust"),
        TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap()).to_text(),
    )
    .unwrap();
    fs::create_dir(tmp.path().join("model")).unwrap();
    fs::write(tmp.path().join("model/w.bin"), b"weights").unwrap();
    let bundle = tmp.path().join("demo-1.0.0.sovb");
    let spec = BundleSpec {
        name: "demo".into(),
        version: "1.0.0".parse().unwrap(),
        inputs: vec![tmp.path().join("model")],
        recipients: Vec::new(),
        part_size: sovereign_signing::DEFAULT_PART_SIZE,
        segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &bundle).unwrap();
    sign_bundle(&bundle, &key).unwrap();

    // A daemon socket whose daemon accepted and then died.
    let socket = tmp.path().join("audit.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let auditor = Auditor::Remote(AuditClient::connect(&socket).unwrap());
    drop(listener.accept().unwrap());
    drop(listener);

    let store = Store::open(&tmp.path().join("store")).unwrap();
    let options = ImportOptions {
        trust: Some(&tmp.path().join("node.trust")),
        audit: Some(&auditor),
        ..Default::default()
    };
    let err = store.import_bundle(&bundle, &options).unwrap_err();
    assert!(matches!(err, StoreError::Audit(_)), "{err}");
    assert!(
        err.to_string()
            .contains("audit log cannot record, import refused"),
        "{err}"
    );
    assert!(live_models(&tmp.path().join("store")).unwrap().is_empty());
    assert_eq!(
        fs::read_dir(tmp.path().join("store/staging"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn the_import_service_records_through_the_audit_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_seed(&[4; 32]);
    fs::write(
        tmp.path().join("node.trust"),
        TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap()).to_text(),
    )
    .unwrap();
    fs::create_dir_all(tmp.path().join("model")).unwrap();
    fs::create_dir_all(tmp.path().join("stick")).unwrap();
    fs::write(tmp.path().join("model/w.bin"), b"weights").unwrap();
    let bundle = tmp.path().join("stick/demo-1.0.0.sovb");
    let spec = BundleSpec {
        name: "demo".into(),
        version: "1.0.0".parse().unwrap(),
        inputs: vec![tmp.path().join("model")],
        recipients: Vec::new(),
        part_size: sovereign_signing::DEFAULT_PART_SIZE,
        segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &bundle).unwrap();
    sign_bundle(&bundle, &key).unwrap();

    // The daemon's own serving code, on a socket of this test.
    let log = std::sync::Arc::new(
        sovereign_audit::AuditLog::open(&tmp.path().join("audit"), "node-c").unwrap(),
    );
    let socket = tmp.path().join("audit.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    {
        let log = log.clone();
        let gate = std::sync::Arc::new(sovereign_audit::Gate::new(
            sovereign_audit::Policy::default(),
            &tmp.path().join("audit"),
        ));
        std::thread::spawn(move || sovereign_audit::serve(listener, log, gate));
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sovereign-import"))
        .arg("--store")
        .arg(tmp.path().join("store"))
        .arg("--trust")
        .arg(tmp.path().join("node.trust"))
        .arg("--audit-socket")
        .arg(&socket)
        .arg(tmp.path().join("stick"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(live_models(&tmp.path().join("store")).unwrap().len(), 1);
    let records = fs::read_to_string(tmp.path().join("audit/records.jsonl")).unwrap();
    assert!(
        records.contains("demo@1.0.0") && records.contains("\"imported\""),
        "{records}"
    );

    // With the socket gone, the service refuses to start importing.
    fs::remove_file(&socket).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sovereign-import"))
        .arg("--store")
        .arg(tmp.path().join("store2"))
        .arg("--audit-socket")
        .arg(&socket)
        .arg(tmp.path().join("stick"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: "));
    assert!(!tmp.path().join("store2/models/demo").exists());
}

/// Issue 14 item 8: a trust rotation from a stick is recorded first and
/// renamed into place only then; when the audit log cannot record it, the
/// installed trust stays as it was and the import fails closed.
#[test]
fn r14_a_trust_rotation_the_audit_log_cannot_record_is_not_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_seed(&[4; 32]);
    let first = TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap());
    fs::write(tmp.path().join("node.trust"), first.to_text()).unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    store
        .import_path(
            &empty,
            &ImportOptions {
                trust: Some(&tmp.path().join("node.trust")),
                ..Default::default()
            },
        )
        .unwrap();

    let stick = tmp.path().join("stick");
    fs::create_dir(&stick).unwrap();
    let mut next = TrustFile::new(Trust::new(2, 1, vec![key.public_key()]).unwrap());
    next.sign(&key);
    fs::write(stick.join("next.trust"), next.to_text()).unwrap();

    let socket = tmp.path().join("audit.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let auditor = Auditor::Remote(AuditClient::connect(&socket).unwrap());
    drop(listener.accept().unwrap());
    drop(listener);
    let options = ImportOptions {
        audit: Some(&auditor),
        ..Default::default()
    };
    let err = store.import_path(&stick, &options).unwrap_err();
    assert!(matches!(err, StoreError::Audit(_)), "{err}");
    let installed = sovereign_store::installed_trust(&store_dir)
        .unwrap()
        .unwrap();
    assert_eq!(installed.trust().sequence, 1);
}

/// Issue 14 item 10: rollback protection is anchored in the signed audit
/// log's import records. With the sled index deleted (and the newest
/// version removed, so nothing live tells), an older version is refused
/// with one line naming the problem, instead of silently imported again.
#[test]
fn r14_a_deleted_index_does_not_reopen_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_seed(&[4; 32]);
    fs::write(
        tmp.path().join("node.trust"),
        TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap()).to_text(),
    )
    .unwrap();
    let make = |version: &str| {
        let src = tmp.path().join(format!("model-{version}"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("w.bin"), version.as_bytes()).unwrap();
        let bundle = tmp.path().join(format!("demo-{version}.sovb"));
        let spec = BundleSpec {
            name: "demo".into(),
            version: version.parse().unwrap(),
            inputs: vec![src],
            recipients: Vec::new(),
            part_size: sovereign_signing::DEFAULT_PART_SIZE,
            segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
        };
        create_bundle(&spec, &bundle).unwrap();
        sign_bundle(&bundle, &key).unwrap();
        bundle
    };
    let (old, new) = (make("1.0.0"), make("2.0.0"));

    // The daemon's own serving code on a socket of this test.
    let log = std::sync::Arc::new(
        sovereign_audit::AuditLog::open(&tmp.path().join("audit"), "node-r").unwrap(),
    );
    let socket = tmp.path().join("audit.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let gate = std::sync::Arc::new(sovereign_audit::Gate::new(
        sovereign_audit::Policy::default(),
        &tmp.path().join("audit"),
    ));
    std::thread::spawn(move || sovereign_audit::serve(listener, log, gate));
    let auditor = Auditor::Remote(AuditClient::connect(&socket).unwrap());
    let options = ImportOptions {
        trust: Some(&tmp.path().join("node.trust")),
        audit: Some(&auditor),
        ..Default::default()
    };
    let root = tmp.path().join("store");
    {
        let store = Store::open(&root).unwrap();
        store.import_bundle(&new, &options).unwrap();
        store.remove("demo@2.0.0").unwrap();
    }
    fs::remove_dir_all(root.join("index")).unwrap();
    let store = Store::open(&root).unwrap();
    let err = store.import_bundle(&old, &options).unwrap_err();
    assert!(matches!(err, StoreError::AnchorMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("audit log records demo@2.0.0 imported")
            && message.contains("no version of demo")
            && !message.contains('\n'),
        "{message}"
    );
    assert!(live_models(&root).unwrap().is_empty());
    // The newer version itself is still accepted.
    store.import_bundle(&new, &options).unwrap();
}
