//! Crash and full-disk safety of the import: kill -9 at any moment leaves the
//! previous state or the new one, and a full disk leaves nothing half-written.

mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use support::Lab;

/// Unmounts a test filesystem when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_refused_cleanly_and_leaves_nothing_behind() {
    assert!(
        is_root(),
        "this test mounts a small tmpfs and needs root (CI runs as root)"
    );
    let lab = Lab::new();
    lab.trust("node.trust", &["alice"], 1, 1);
    lab.model("big", 6_000_000, 1);
    lab.bundle("big-1.0.0.sovb", "big", "1.0.0", "big", &["alice"], &[]);
    lab.model("small", 200_000, 2);
    lab.bundle(
        "small-1.0.0.sovb",
        "small",
        "1.0.0",
        "small",
        &["alice"],
        &[],
    );
    fs::create_dir(lab.path("disk")).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(lab.path("disk"))
        .status()
        .expect("run mount");
    assert!(status.success(), "mounting a 4 MiB tmpfs failed");
    let _mount = Mount(lab.path("disk"));

    let before = lab.snapshot("disk/store");
    lab.run(&[
        "import",
        "--store",
        "disk/store",
        "--trust",
        "node.trust",
        "big-1.0.0.sovb",
    ])
    .refused("not enough space in the store");
    let after = lab.snapshot("disk/store");
    assert!(
        after.keys().all(|k| k == "trust"),
        "left behind: {after:?} (before {before:?})"
    );
    // The same small disk still takes a bundle that fits.
    lab.run(&[
        "import",
        "--store",
        "disk/store",
        "--trust",
        "node.trust",
        "small-1.0.0.sovb",
    ])
    .ok();
    let models = lab.run(&["models", "--store", "disk/store"]).ok();
    assert!(
        models.stdout.contains("small@1.0.0") && !models.stdout.contains("big@"),
        "{}",
        models.stdout
    );
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn kill_9_at_any_moment_leaves_the_old_or_the_new_model() {
    let lab = Lab::new();
    lab.trust("node.trust", &["alice"], 1, 1);
    lab.model("v1", 1_000_000, 1);
    lab.bundle("demo-1.0.0.sovb", "demo", "1.0.0", "v1", &["alice"], &[]);
    lab.run(&[
        "import",
        "--store",
        "store",
        "--trust",
        "node.trust",
        "demo-1.0.0.sovb",
    ])
    .ok();
    lab.model("v2", 48_000_000, 2);
    lab.bundle("demo-2.0.0.sovb", "demo", "2.0.0", "v2", &["alice"], &[]);
    let v1 = fs::read(lab.path("v1/model.gguf")).unwrap();
    let v2 = fs::read(lab.path("v2/model.gguf")).unwrap();

    let mut saw_new = false;
    for step in 0..12u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sovereign"))
            .args([
                "import",
                "--store",
                "store",
                "--trust",
                "node.trust",
                "demo-2.0.0.sovb",
            ])
            .current_dir(lab.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(step * 15));
        let _ = child.kill();
        let _ = child.wait();
        // Reopening recovers: staging is cleared, and each live version is whole.
        let listed = lab.run(&["models", "--store", "store"]).ok().stdout;
        assert!(
            listed.contains("demo@1.0.0"),
            "the old version vanished: {listed}"
        );
        let staging: Vec<_> = fs::read_dir(lab.path("store/staging")).unwrap().collect();
        assert!(staging.is_empty(), "staging not cleared after a crash");
        assert_eq!(
            fs::read(lab.path("store/models/demo/1.0.0/files/model.gguf")).unwrap(),
            v1
        );
        let new = lab.path("store/models/demo/2.0.0");
        if new.exists() {
            assert!(
                listed.contains("demo@2.0.0"),
                "live but not indexed: {listed}"
            );
            assert_eq!(
                fs::read(new.join("files/model.gguf")).unwrap(),
                v2,
                "a half-written model is live"
            );
            saw_new = true;
            break;
        }
        assert!(
            !listed.contains("demo@2.0.0"),
            "indexed but not live: {listed}"
        );
    }
    if !saw_new {
        lab.run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "demo-2.0.0.sovb",
        ])
        .ok();
    }
    let live = sovereign_store::live_model(&lab.path("store"), "demo").unwrap();
    assert_eq!(live.version.to_string(), "2.0.0");
    assert_eq!(fs::read(live.dir.join("model.gguf")).unwrap(), v2);
}

/// A store held by another import (a running node's replication, while a
/// bundle arrives) makes the store commands wait for it, not fail.
#[test]
fn store_commands_wait_for_the_import_holding_the_store() {
    let lab = Lab::new();
    let held = sovereign_store::Store::open(&lab.path("store")).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(held);
    });
    let listed = lab.run(&["models", "--store", "store"]).ok();
    assert!(
        listed.stdout.contains("no models installed"),
        "{}",
        listed.stdout
    );
    release.join().unwrap();
}
