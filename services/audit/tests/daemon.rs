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

/// Starts the daemon on `log` with an enrolled identity and no `--node`;
/// returns it once its socket answers.
fn enrolled_daemon(
    log: &std::path::Path,
    socket: &std::path::Path,
    identity: &std::path::Path,
) -> std::process::Child {
    let daemon = Command::new(env!("CARGO_BIN_EXE_sovereign-audit"))
        .arg("--log")
        .arg(log)
        .arg("--socket")
        .arg(socket)
        .arg("--identity")
        .arg(identity)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while AuditClient::connect(socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

/// `sovereign-auditctl courier STICK` without `--node`, as the stick unit runs it.
fn courier(socket: &std::path::Path, stick: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sovereign-auditctl"))
        .arg("--socket")
        .arg(socket)
        .arg("courier")
        .arg(stick)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn issue_14_12_two_nodes_named_by_their_identities_keep_apart_courier_folders_on_one_stick() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster =
        sovereign_provisioning::cluster::Cluster::init(&tmp.path().join("acme"), "acme", None)
            .unwrap();
    let stick = tmp.path().join("stick");
    let mut daemons = Vec::new();
    for name in ["node-a", "node-b"] {
        let identity = tmp.path().join(format!("{name}.identity"));
        let request = sovereign_provisioning::cluster::EnrollRequest {
            name: name.into(),
            days: 30,
            ..Default::default()
        };
        cluster.enroll(&request, &identity).unwrap();
        let socket = tmp.path().join(format!("{name}.sock"));
        let daemon = enrolled_daemon(&tmp.path().join(name), &socket, &identity);
        // The host running this test is neither node: the courier finds the
        // daemon's own name (its identity's) and that folder's checkpoint.
        let first = courier(&socket, &stick);
        assert!(
            first.contains(&format!("sovereign-audit/{name}")) && first.contains("from size 0"),
            "{first}"
        );
        daemons.push((name, socket, daemon));
    }
    for (name, socket, mut daemon) in daemons {
        let folder = stick.join("sovereign-audit").join(name);
        let before = std::fs::read_to_string(folder.join("checkpoint")).unwrap();
        let again = courier(&socket, &stick);
        assert!(
            !again.contains("from size 0"),
            "{name}'s second visit extends its own first checkpoint: {again}"
        );
        assert_eq!(
            std::fs::read_to_string(folder.join("previous-checkpoint")).unwrap(),
            before
        );
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    let mut folders: Vec<String> = std::fs::read_dir(stick.join("sovereign-audit"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(folders, ["node-a", "node-b"]);
}
