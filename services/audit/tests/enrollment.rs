//! A log begun with a raw node key is handed to the enrolled, CA-certified
//! key by one key-change record: the old part still verifies with the raw
//! key, the whole log with only the cluster CA (export and courier folder),
//! and a forged hand-over, a foreign CA or a revoked node are refused.

use std::path::Path;
use std::time::SystemTime;

use sovereign_audit::{
    verify, verify_courier_with_ca, verify_with_ca, write_courier, AuditError, AuditLog, Event,
    Export,
};
use sovereign_identity::{IdentityError, NodeIdentity, RevocationList};
use sovereign_provisioning::cluster::{Cluster, EnrollRequest, REVOCATION_FILE};

fn event(i: u64) -> Event {
    Event::new("test", "api-request", serde_json::json!({ "i": i }))
}

fn enroll(cluster: &mut Cluster, dir: &Path, name: &str) -> NodeIdentity {
    let out = dir.join(format!("{name}.identity"));
    let request = EnrollRequest {
        name: name.into(),
        days: 30,
        ..EnrollRequest::default()
    };
    cluster.enroll(&request, &out).expect("enroll");
    NodeIdentity::load(&out).expect("identity")
}

#[test]
fn enrollment_hands_the_log_to_the_certified_key_and_the_ca_alone_verifies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let mut cluster = Cluster::init(&tmp.path().join("acme"), "acme", None).unwrap();
    let identity = enroll(&mut cluster, tmp.path(), "node-a");

    // Before enrollment: a raw key, as every log written so far.
    let log = AuditLog::open(&dir, "node-a").unwrap();
    let raw = log.public_key();
    for i in 0..3 {
        log.record(event(i)).unwrap();
    }
    drop(log);
    let old = Export::from_dir(&dir).unwrap();
    assert!(old.certificate.is_none());
    verify(&old, Some(&raw), None).unwrap();
    let err = verify_with_ca(
        &old,
        cluster.ca(),
        &RevocationList::empty(cluster.ca()),
        SystemTime::now(),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("carries no node certificate"),
        "{err}"
    );

    // Enrollment: the first record after it links the raw key to the new one.
    let log = AuditLog::open_enrolled(&dir, "node-a", &identity).unwrap();
    assert_eq!(
        log.public_key().to_bytes(),
        identity.signing_key().verifying_key().to_bytes()
    );
    for i in 3..6 {
        log.record(event(i)).unwrap();
    }
    drop(log);
    let export = Export::from_dir(&dir).unwrap();
    assert_eq!(export.records.len(), 3 + 1 + 3);
    assert!(
        export.records[3].contains("\"key-change\""),
        "{}",
        export.records[3]
    );
    assert_eq!(
        export.certificate.as_deref(),
        Some(identity.certificate_pem().as_str())
    );
    let verified = verify(&export, Some(&raw), None).unwrap();
    assert_eq!(verified.key_changes, 1);
    let empty = RevocationList::empty(cluster.ca());
    let (verified, peer) =
        verify_with_ca(&export, cluster.ca(), &empty, SystemTime::now(), None).unwrap();
    assert_eq!(peer.name, "node-a");
    assert_eq!(verified.records, 7);

    // Nobody else writes a key change into the log.
    let log = AuditLog::open(&dir, "node-a").unwrap();
    let forged = Event::new("node", "key-change", serde_json::json!({}));
    assert!(log.record(forged).is_err());
    drop(log);

    // Reopening, with or without the identity, signs on with the enrolled key.
    let log = AuditLog::open_enrolled(&dir, "node-a", &identity).unwrap();
    log.record(event(6)).unwrap();
    drop(log);
    let log = AuditLog::open(&dir, "node-a").unwrap();
    log.record(event(7)).unwrap();
    let stick = tmp.path().join("stick");
    std::fs::create_dir_all(&stick).unwrap();
    let folder = write_courier(&log, &stick).unwrap();
    drop(log);
    let again = Export::from_dir(&dir).unwrap();
    assert_eq!(
        again
            .records
            .iter()
            .filter(|r| r.contains("\"key-change\""))
            .count(),
        1
    );
    verify_with_ca(&again, cluster.ca(), &empty, SystemTime::now(), None).unwrap();
    let (checkpoint, peer) =
        verify_courier_with_ca(&folder, cluster.ca(), &empty, SystemTime::now()).unwrap();
    assert_eq!(peer.name, "node-a");
    assert_eq!(checkpoint.size, 9);

    // Another cluster's CA, and a revoked node, are refused.
    let other = Cluster::init(&tmp.path().join("other"), "other", None).unwrap();
    let err = verify_with_ca(
        &again,
        other.ca(),
        &RevocationList::empty(other.ca()),
        SystemTime::now(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, AuditError::Identity(IdentityError::ForeignCa { .. })),
        "{err}"
    );
    cluster.revoke("node-a").unwrap();
    let list =
        RevocationList::load(&tmp.path().join("acme").join(REVOCATION_FILE), cluster.ca()).unwrap();
    let err = verify_with_ca(&again, cluster.ca(), &list, SystemTime::now(), None).unwrap_err();
    assert!(err.to_string().contains("is revoked"), "{err}");
    let err = verify_courier_with_ca(&folder, cluster.ca(), &list, SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("is revoked"), "{err}");
}

#[test]
fn a_forged_hand_over_is_refused_and_a_renewal_hands_over_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let mut cluster = Cluster::init(&tmp.path().join("acme"), "acme", None).unwrap();
    let identity = enroll(&mut cluster, tmp.path(), "node-a");
    let mallory = enroll(&mut cluster, tmp.path(), "node-m");
    let log = AuditLog::open(&dir, "node-a").unwrap();
    log.record(event(0)).unwrap();
    drop(log);
    drop(AuditLog::open_enrolled(&dir, "node-a", &identity).unwrap());
    let export = Export::from_dir(&dir).unwrap();

    // The key-change record naming another enrolled key than the one that
    // signed the link: its content no longer matches its signature.
    let mut forged = Export::from_dir(&dir).unwrap();
    let theirs =
        sovereign_signing::PublicKey::from_bytes(&mallory.signing_key().verifying_key().to_bytes())
            .unwrap()
            .to_string();
    let ours = sovereign_signing::PublicKey::from_bytes(
        &identity.signing_key().verifying_key().to_bytes(),
    )
    .unwrap()
    .to_string();
    forged.records[1] = forged.records[1].replace(&ours, &theirs);
    let err = verify(&forged, None, None).unwrap_err().to_string();
    assert!(err.starts_with("record 1:"), "{err}");

    // A renewed identity (another key) is a second hand-over, signed by the
    // key in force that the log directory holds.
    drop(AuditLog::open_enrolled(&dir, "node-a", &mallory).unwrap());
    let export_after = Export::from_dir(&dir).unwrap();
    assert_eq!(
        export_after
            .records
            .iter()
            .filter(|r| r.contains("\"key-change\""))
            .count(),
        2
    );
    assert!(export.records.len() < export_after.records.len());
}
