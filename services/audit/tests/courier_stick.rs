//! The courier folder on a hostile stick (issue 14 item 6): files are read
//! without following links, without blocking on a FIFO and never past their
//! format's bound; nothing is written through a planted link.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use sovereign_audit::{
    courier_dir, courier_package, previous_checkpoint, verify_courier, verify_package,
    write_courier, AuditLog, Event,
};

/// `previous_checkpoint` on another thread, so a read that blocks fails the
/// test instead of hanging it.
fn previous(stick: &Path) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    let stick = stick.to_owned();
    std::thread::spawn(move || tx.send(previous_checkpoint(&stick, "node-a")).unwrap());
    rx.recv_timeout(Duration::from_secs(60))
        .expect("reading the stick's checkpoint blocked")
}

#[test]
fn r14_courier_files_on_a_stick_are_not_followed_blocked_on_or_read_past_their_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&tmp.path().join("log"), "node-a").unwrap();
    log.record(Event::new("test", "event", serde_json::json!({ "n": 1 })))
        .unwrap();
    let stick = tmp.path().join("stick");
    let folder = courier_dir(&stick, "node-a");
    fs::create_dir_all(&folder).unwrap();
    let checkpoint = folder.join("checkpoint");

    // A genuine checkpoint is read back.
    write_courier(&log, &stick).unwrap();
    let genuine = fs::read_to_string(&checkpoint).unwrap();
    assert_eq!(previous(&stick).as_deref(), Some(genuine.as_str()));

    // A FIFO, a huge file and a link (even to a genuine checkpoint) are not read.
    fs::remove_file(&checkpoint).unwrap();
    nix::unistd::mkfifo(
        &checkpoint,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    assert_eq!(previous(&stick), None);
    fs::remove_file(&checkpoint).unwrap();
    fs::File::create(&checkpoint)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    assert_eq!(previous(&stick), None);
    fs::remove_file(&checkpoint).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    fs::write(&elsewhere, &genuine).unwrap();
    symlink(&elsewhere, &checkpoint).unwrap();
    assert_eq!(previous(&stick), None);
    fs::remove_file(&checkpoint).unwrap();

    // A link planted under the temporary name is replaced, not written through.
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"untouched").unwrap();
    symlink(&victim, folder.join("checkpoint.tmp")).unwrap();
    write_courier(&log, &stick).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"untouched");
    assert!(fs::symlink_metadata(&checkpoint).unwrap().is_file());
    verify_courier(&folder, &log.public_key()).unwrap();

    // The auditor's side refuses a FIFO proof instead of waiting on it.
    let proof = folder.join("consistency-proof.json");
    fs::remove_file(&proof).unwrap();
    nix::unistd::mkfifo(
        &proof,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let (dir, key) = (folder.clone(), log.public_key());
    std::thread::spawn(move || tx.send(verify_courier(&dir, &key).is_err()).unwrap());
    assert!(rx
        .recv_timeout(Duration::from_secs(60))
        .expect("verify blocked"));

    // A courier folder that is a link elsewhere is refused.
    let other_stick = tmp.path().join("other");
    fs::create_dir_all(&other_stick).unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    symlink(&outside, other_stick.join("sovereign-audit")).unwrap();
    assert!(write_courier(&log, &other_stick).is_err());
    assert!(!outside.join("node-a/checkpoint").exists());
}

#[test]
fn a_package_from_a_ring_member_verifies_only_with_its_own_key_and_an_unbroken_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let a = AuditLog::open(&tmp.path().join("a"), "node-a").unwrap();
    let b = AuditLog::open(&tmp.path().join("b"), "node-b").unwrap();
    let event = |n: u32| Event::new("test", "event", serde_json::json!({ "n": n }));
    for n in 0..3 {
        a.record(event(n)).unwrap();
        b.record(event(n)).unwrap();
    }
    let first = courier_package(&a, None).unwrap();
    for n in 3..9 {
        a.record(event(n)).unwrap();
    }
    let package = courier_package(&a, Some(&first.checkpoint)).unwrap();
    assert_eq!((package.proof.old_size, package.proof.new_size), (3, 9));
    verify_package(&package, &a.public_key()).unwrap();
    // Another member's key does not sign it.
    assert!(verify_package(&package, &b.public_key()).is_err());
    // A previous checkpoint of another log, or a proof with a hash changed,
    // does not link to the new checkpoint.
    let mut foreign = package.clone();
    foreign.previous = Some(courier_package(&b, None).unwrap().checkpoint);
    assert!(verify_package(&foreign, &a.public_key()).is_err());
    let mut bent = package.clone();
    let hash = &mut bent.proof.proof[0];
    let flipped = if hash.starts_with('0') { "1" } else { "0" };
    hash.replace_range(0..1, flipped);
    let error = verify_package(&bent, &a.public_key()).unwrap_err();
    assert!(
        error.to_string().contains("history was rewritten"),
        "{error}"
    );
    // A proof from an earlier checkpoint without that checkpoint is refused.
    let mut bare = package;
    bare.previous = None;
    assert!(verify_package(&bare, &a.public_key()).is_err());
}
