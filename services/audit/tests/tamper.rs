//! Any edit, deletion, insertion, reordering or truncation before the last
//! checkpoint is detected and the first bad record named; a rewritten history
//! is caught against an older checkpoint; crashes lose nothing acknowledged.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use sovereign_audit::{verify, verify_courier, write_courier, AuditLog, Event, Export};
use sovereign_signing::PublicKey;

fn event(i: u64) -> Event {
    Event::new(
        "test",
        "api-request",
        serde_json::json!({ "i": i, "model": "demo" }),
    )
}

/// A log with 20 checkpointed records and 3 more after the checkpoint.
fn sample(dir: &Path) -> (Export, PublicKey) {
    let log = AuditLog::open(dir, "node-a").unwrap();
    for i in 0..20 {
        assert_eq!(log.record(event(i)).unwrap(), i);
    }
    log.checkpoint().unwrap();
    for i in 20..23 {
        log.record(event(i)).unwrap();
    }
    let key = log.public_key();
    drop(log); // writes a shutdown checkpoint at 23
    (Export::from_dir(dir).unwrap(), key)
}

fn check(export: &Export, key: &PublicKey, fragment: &str) {
    let err = verify(export, Some(key), None)
        .expect_err("tampering went unnoticed")
        .to_string();
    assert!(err.contains(fragment), "expected {fragment:?} in {err:?}");
}

#[test]
fn an_intact_log_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (export, key) = sample(tmp.path());
    let verified = verify(&export, Some(&key), None).unwrap();
    assert_eq!(
        (
            verified.records,
            verified.checkpoints,
            verified.checkpointed
        ),
        (23, 2, 23)
    );
    let out = tmp.path().join("export.json");
    export.write(&out).unwrap();
    verify(&Export::load(&out).unwrap(), Some(&key), None).unwrap();
}

#[test]
fn every_single_change_names_the_first_bad_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (export, key) = sample(tmp.path());
    let mut edited = Export {
        records: export.records.clone(),
        ..Export::load(tmp.path()).unwrap()
    };
    edited.records[7] = edited.records[7].replace("\"i\":7", "\"i\":70");
    assert_ne!(edited.records[7], export.records[7]);
    check(&edited, &key, "record 7: content");

    let mut deleted = Export::load(tmp.path()).unwrap();
    deleted.records.remove(7);
    check(&deleted, &key, "record 7: holds sequence number 8");

    let mut inserted = Export::load(tmp.path()).unwrap();
    let copy = inserted.records[3].clone();
    inserted.records.insert(7, copy);
    check(&inserted, &key, "record 7: holds sequence number 3");

    let mut reordered = Export::load(tmp.path()).unwrap();
    reordered.records.swap(7, 8);
    check(&reordered, &key, "record 7: holds sequence number 8");

    let mut truncated = Export::load(tmp.path()).unwrap();
    truncated.records.truncate(15);
    check(
        &truncated,
        &key,
        "log is truncated: a checkpoint covers 20 records, the log holds 15",
    );

    let mut garbled = Export::load(tmp.path()).unwrap();
    garbled.records[0] = "{not json".into();
    check(&garbled, &key, "record 0: not a valid record");
}

#[test]
fn a_wrong_key_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let (export, _) = sample(tmp.path());
    let other = sovereign_signing::SigningKey::from_seed(&[9; 32]).public_key();
    let err = verify(&export, Some(&other), None).unwrap_err().to_string();
    assert!(err.contains("not by the expected"), "{err}");
    // A log re-signed with another key but claiming the node's key fails on record 0.
    let mut swapped = Export::load(tmp.path()).unwrap();
    swapped.public_key = other.to_string();
    let err = verify(&swapped, None, None).unwrap_err().to_string();
    assert!(err.contains("record 0"), "{err}");
}

#[test]
fn a_rewritten_history_with_the_same_key_is_caught_by_an_older_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    let (_, key) = sample(&original);
    let held = AuditLog::open(&original, "node-a")
        .unwrap()
        .checkpoint()
        .unwrap()
        .note;

    // The attacker holds the node key and rebuilds the log from scratch.
    let forged = tmp.path().join("forged");
    fs::create_dir(&forged).unwrap();
    for name in ["node.key", "node.pub", "node"] {
        fs::copy(original.join(name), forged.join(name)).unwrap();
    }
    {
        let log = AuditLog::open(&forged, "node-a").unwrap();
        for i in 0..30 {
            log.record(if i == 5 {
                Event::new("test", "hidden", serde_json::json!({}))
            } else {
                event(i)
            })
            .unwrap();
        }
    }
    let export = Export::from_dir(&forged).unwrap();
    verify(&export, Some(&key), None).expect("internally consistent");
    let err = verify(&export, Some(&key), Some(&held))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("forks from the checkpoint at size 23"),
        "{err}"
    );
}

#[test]
fn the_stick_courier_proves_consistency_between_visits() {
    let tmp = tempfile::tempdir().unwrap();
    let stick = tmp.path().join("stick");
    let dir = tmp.path().join("log");
    let log = AuditLog::open(&dir, "node-a").unwrap();
    let key = log.public_key();
    for i in 0..5 {
        log.record(event(i)).unwrap();
    }
    let folder = write_courier(&log, &stick).unwrap();
    assert_eq!(verify_courier(&folder, &key).unwrap().size, 5);
    for i in 5..12 {
        log.record(event(i)).unwrap();
    }
    write_courier(&log, &stick).unwrap();
    assert_eq!(verify_courier(&folder, &key).unwrap().size, 12);
    drop(log);

    // History rewritten with the same key between visits: the next courier
    // write cannot produce a proof from the checkpoint on the stick.
    fs::remove_file(dir.join("records.jsonl")).unwrap();
    fs::remove_file(dir.join("checkpoints.jsonl")).unwrap();
    let log = AuditLog::open(&dir, "node-a").unwrap();
    for i in 0..15 {
        log.record(event(100 + i)).unwrap();
    }
    write_courier(&log, &stick).unwrap();
    let err = verify_courier(&folder, &key).unwrap_err().to_string();
    assert!(err.contains("history was rewritten"), "{err}");
}

#[test]
fn a_torn_last_record_is_cut_and_nothing_acknowledged_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let log = AuditLog::open(tmp.path(), "node-a").unwrap();
        for i in 0..4 {
            log.record(event(i)).unwrap();
        }
    }
    let path = tmp.path().join("records.jsonl");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"record\":{\"seq\":4,\"ti");
    fs::write(&path, bytes).unwrap();
    let log = AuditLog::open(tmp.path(), "node-a").unwrap();
    assert_eq!(log.record(event(4)).unwrap(), 4);
    drop(log);
    let export = Export::from_dir(tmp.path()).unwrap();
    assert_eq!(verify(&export, None, None).unwrap().records, 5);
}

#[test]
fn concurrent_writers_get_distinct_durable_sequence_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(AuditLog::open(tmp.path(), "node-a").unwrap());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| log.record(event(t * 1000 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..400).collect::<Vec<_>>());
    drop(log);
    assert_eq!(
        verify(&Export::from_dir(tmp.path()).unwrap(), None, None)
            .unwrap()
            .records,
        400
    );
}

/// Child mode for the kill -9 test: append records forever, printing each
/// sequence number only after `record` returned (i.e. it is durable).
#[test]
fn kill_9_while_appending_loses_no_acknowledged_record() {
    if let Ok(dir) = std::env::var("SOVEREIGN_AUDIT_CHILD_DIR") {
        let log = AuditLog::open(Path::new(&dir), "node-a").unwrap();
        let mut out = std::io::stdout();
        for i in 0.. {
            let seq = log.record(event(i)).unwrap();
            use std::io::Write;
            writeln!(out, "{seq}").unwrap();
            out.flush().unwrap();
        }
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_9_while_appending_loses_no_acknowledged_record",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SOVEREIGN_AUDIT_CHILD_DIR", tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300 + 100 * round));
        child.kill().unwrap();
        let output = child.wait_with_output().unwrap();
        let acknowledged: Vec<u64> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let log = AuditLog::open(tmp.path(), "node-a").expect("reopens after kill -9");
        drop(log);
        let export = Export::from_dir(tmp.path()).unwrap();
        let held = verify(&export, None, None).unwrap().records;
        let highest = acknowledged.iter().max().copied().unwrap_or(0);
        assert!(
            held > highest,
            "round {round}: acknowledged {highest} but the log holds {held}"
        );
    }
}
