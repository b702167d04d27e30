//! The courier files a stick carries (`sovereign-audit/NODE/`), read by the
//! node and by the auditor. A real log (fixed key) leaves its courier on a
//! stick; the fuzzer replaces the checkpoint the node reads on the second
//! visit, then any of the files the auditor reads. The node's second folder
//! must always verify (a hostile checkpoint on the stick is ignored, never
//! trusted); the auditor's check of the tampered folder must never panic,
//! and passes untouched folders.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sovereign_audit::{verify_courier, write_courier, AuditLog, Event};
use sovereign_signing::SigningKey;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Records before the first visit and between the visits (mod 16).
    before: u8,
    between: u8,
    /// The checkpoint the stick carries back to the node on its second visit.
    carried: Option<String>,
    /// What the auditor finds instead of the node's files.
    checkpoint: Option<String>,
    previous: Option<String>,
    proof: Option<String>,
    certificate: Option<String>,
}

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_seed(&[9; 32]))
}

fn base() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("sovereign-fuzz-courier-{}", std::process::id()))
    })
}

/// A fresh log signed by the fixed key.
fn fresh_log(dir: &Path) -> AuditLog {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("log dir");
    sovereign_signing::write_secret_file(&dir.join("node.key"), key().to_text().as_bytes())
        .expect("key");
    std::fs::write(dir.join("node.pub"), format!("{}\n", key().public_key())).expect("pub");
    AuditLog::open(dir, "fuzz").expect("log")
}

fn record(log: &AuditLog, count: u8) {
    for i in 0..count % 16 {
        log.record(Event::new("test", "fuzz", serde_json::json!({ "i": i })))
            .expect("record");
    }
}

fuzz_target!(|input: Input| {
    let base = base();
    let log = fresh_log(&base.join("log"));
    let stick = base.join("stick");
    let _ = std::fs::remove_dir_all(&stick);
    std::fs::create_dir_all(&stick).expect("stick");
    let public = key().public_key();

    record(&log, input.before);
    let folder = write_courier(&log, &stick).expect("first visit");
    if let Some(carried) = &input.carried {
        std::fs::write(folder.join("checkpoint"), carried).expect("hostile checkpoint");
    }
    record(&log, input.between);
    write_courier(&log, &stick).expect("second visit");
    if let Err(e) = verify_courier(&folder, &public) {
        panic!("the node's own courier does not verify: {e}");
    }

    let mut tampered = false;
    for (name, text) in [
        ("checkpoint", &input.checkpoint),
        ("previous-checkpoint", &input.previous),
        ("consistency-proof.json", &input.proof),
        ("certificate.pem", &input.certificate),
    ] {
        if let Some(text) = text {
            std::fs::write(folder.join(name), text).expect("tamper");
            tampered = true;
        }
    }
    let checked = verify_courier(&folder, &public);
    assert!(tampered || checked.is_ok(), "{checked:?}");
});
