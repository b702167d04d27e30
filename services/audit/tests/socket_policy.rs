//! Issue 14, item 5: over the daemon's socket a client records only its own
//! service's event kinds, every record names its sender as the kernel reports
//! it, and a flood runs into the sender's quota instead of filling the disk.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sovereign_audit::{AuditClient, Event, Export, StoredRecord};

struct Daemon {
    child: Child,
    client: AuditClient,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// `Daemon`'s drop kills and waits for the child.
#[allow(clippy::zombie_processes)]
fn daemon(dir: &Path, args: &[&str]) -> Daemon {
    let socket = dir.join("audit.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_sovereign-audit"))
        .arg("--log")
        .arg(dir.join("log"))
        .arg("--socket")
        .arg(&socket)
        .args(["--node", "node-p"])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok(client) = AuditClient::connect(&socket) {
            return Daemon { child, client };
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn me() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn event(service: &str, kind: &str) -> Event {
    Event::new(service, kind, serde_json::json!({ "n": 1 }))
}

#[test]
fn r14_a_client_records_only_its_own_kinds_stamped_with_its_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let rule = format!("{}=api:api-request,model-loaded", me());
    let d = daemon(tmp.path(), &["--allow", &rule, "--min-free-mb", "1"]);
    let seq = d.client.record(&event("api", "api-request")).unwrap();
    for (service, kind) in [
        ("import", "import"),
        ("api", "import"),
        ("import", "api-request"),
    ] {
        let err = d
            .client
            .record(&event(service, kind))
            .expect_err("a forged record was accepted")
            .to_string();
        assert!(err.contains("refused"), "{err}");
    }
    drop(d);
    let export = Export::from_dir(&tmp.path().join("log")).unwrap();
    let record: StoredRecord = serde_json::from_str(&export.records[seq as usize]).unwrap();
    let peer = record.record.peer.expect("the record names no sender");
    assert_eq!((peer.uid, peer.pid > 0), (me(), true));
    assert!(
        !export
            .records
            .iter()
            .any(|r| r.contains("\"service\":\"import\"")),
        "a refused event reached the log"
    );
}

#[test]
fn a_user_with_two_rules_records_both_services_kinds_and_nothing_else() {
    // The node service is one process: its API events and its ring events.
    let tmp = tempfile::tempdir().unwrap();
    let api = format!("{}=api:api-request", me());
    let node = format!("{}=node:ring-plan,ring-join", me());
    let d = daemon(
        tmp.path(),
        &["--allow", &api, "--allow", &node, "--min-free-mb", "1"],
    );
    d.client.record(&event("api", "api-request")).unwrap();
    d.client.record(&event("node", "ring-plan")).unwrap();
    for (service, kind) in [
        ("node", "api-request"),
        ("api", "ring-plan"),
        ("import", "import"),
    ] {
        let err = d
            .client
            .record(&event(service, kind))
            .expect_err("an event outside both rules was accepted")
            .to_string();
        assert!(err.contains("refused"), "{err}");
    }
}

#[test]
fn r14_a_user_without_a_rule_records_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(
        tmp.path(),
        &["--allow", "4242424=api:api-request", "--min-free-mb", "1"],
    );
    let err = d.client.record(&event("api", "api-request")).unwrap_err();
    assert!(err.to_string().contains("may not record"), "{err}");
}

#[test]
fn r14_a_flood_runs_into_the_senders_quota() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(
        tmp.path(),
        &[
            "--quota-burst-bytes",
            "65536",
            "--quota-bytes-per-sec",
            "1024",
            "--min-free-mb",
            "1",
        ],
    );
    let blob = "x".repeat(8 * 1024);
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..100 {
        let flood = Event::new("api", "api-request", serde_json::json!({ "blob": blob }));
        match d.client.record(&flood) {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert!(e.to_string().contains("quota"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(
        accepted <= 10,
        "{accepted} records of 8 KiB passed a 64 KiB burst"
    );
    assert!(refused >= 90, "only {refused} refused");
    let size = std::fs::metadata(tmp.path().join("log/records.jsonl"))
        .unwrap()
        .len();
    assert!(size < 128 * 1024, "the log grew to {size} bytes");
}

#[test]
fn r14_nothing_is_recorded_from_the_socket_below_the_free_space_floor() {
    let tmp = tempfile::tempdir().unwrap();
    // A floor above any test machine's free space.
    let d = daemon(tmp.path(), &["--min-free-mb", "1000000000"]);
    let err = d.client.record(&event("api", "api-request")).unwrap_err();
    assert!(err.to_string().contains("floor"), "{err}");
}
