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
