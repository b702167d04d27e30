//! The daemon end to end: events over its socket, a checkpoint on SIGTERM,
//! and the courier a stick carries between visits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sovereign_audit::{
    previous_checkpoint, verify, verify_courier, write_package, AuditClient, Event, Export,
};

#[test]
fn the_daemon_records_over_its_socket_and_checkpoints_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("audit.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_sovereign-audit"))
        .arg("--log")
        .arg(tmp.path().join("log"))
        .arg("--socket")
        .arg(&socket)
        .args(["--node", "node-b"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let client = loop {
        if let Ok(client) = AuditClient::connect(&socket) {
            break client;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A stick's first visit: a checkpoint, nothing to extend.
    let stick = tmp.path().join("stick");
    let key = sovereign_signing::read_public_key(tmp.path().join("log/node.pub").to_str().unwrap())
        .unwrap();
    let first = client
        .courier(previous_checkpoint(&stick, "node-b").as_deref())
        .unwrap();
    assert_eq!((first.node.as_str(), first.proof.old_size), ("node-b", 0));
    let folder = write_package(&first, &stick).unwrap();
    assert_eq!(
        verify_courier(&folder, &key).unwrap().size,
        first.proof.new_size
    );
    let mut seqs = Vec::new();
    for i in 0..3 {
        let event = Event::new("api", "api-request", serde_json::json!({ "tokens": i }));
        seqs.push(client.record(&event).unwrap());
    }
    assert_eq!(seqs, [1, 2, 3], "record 0 is the daemon's start");
    // The second visit proves the log only grew since the first.
    let second = client
        .courier(previous_checkpoint(&stick, "node-b").as_deref())
        .unwrap();
    assert_eq!(second.proof.old_size, first.proof.new_size);
    assert!(second.proof.new_size > second.proof.old_size);
    write_package(&second, &stick).unwrap();
    assert_eq!(
        verify_courier(&folder, &key).unwrap().size,
        second.proof.new_size
    );
    let bad = sovereign_audit::CourierPackage {
        node: "../x".into(),
        ..second.clone()
    };
    assert!(
        write_package(&bad, &stick).is_err(),
        "a node name cannot leave the folder"
    );
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(daemon.wait().unwrap().success());
    let export = Export::from_dir(&tmp.path().join("log")).unwrap();
    let verified = verify(&export, None, None).unwrap();
    assert_eq!(
        (verified.records, verified.checkpointed),
        (5, 5),
        "start, 3 events, stop, all checkpointed"
    );
    assert!(export.records[4].contains("daemon-stop"));
}
