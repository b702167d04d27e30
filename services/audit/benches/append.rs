//! Appends per second with fsync: the audit log against the plain limit of
//! this disk (a loop of write + fdatasync of the same record size), for one
//! writer and for several concurrent writers (group commit).
//!
//! `cargo bench -p sovereign-audit --bench append [-- N]` (N appends per case, default 2000)

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use sovereign_audit::{AuditLog, Event};

fn event(i: u64) -> Event {
    Event::new(
        "api",
        "api-request",
        serde_json::json!({ "model": "smollm2", "prompt_tokens": 31, "completion_tokens": i % 200, "client": "192.0.2.10" }),
    )
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("temp dir");

    // The size of one stored record, for the plain loop.
    let probe = AuditLog::open(&dir.path().join("probe"), "bench").expect("log");
    probe.record(event(0)).expect("record");
    drop(probe);
    let record_len = std::fs::read(dir.path().join("probe/records.jsonl"))
        .expect("read")
        .len();

    let line = vec![b'x'; record_len];
    let mut plain = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("plain"))
        .expect("plain file");
    let start = Instant::now();
    for _ in 0..n {
        plain.write_all(&line).expect("write");
        plain.sync_data().expect("fsync");
    }
    let plain_rate = n as f64 / start.elapsed().as_secs_f64();

    let log = AuditLog::open(&dir.path().join("single"), "bench").expect("log");
    let start = Instant::now();
    for i in 0..n {
        log.record(event(i)).expect("record");
    }
    let single_rate = n as f64 / start.elapsed().as_secs_f64();
    drop(log);

    println!(
        "record size {record_len} bytes, {n} appends per case, each fsynced before it returns"
    );
    println!("{:<34} {:>12} {:>10}", "case", "appends/s", "vs plain");
    println!(
        "{:<34} {:>12.0} {:>9.2}x",
        "plain write+fdatasync loop", plain_rate, 1.0
    );
    println!(
        "{:<34} {:>12.0} {:>9.2}x",
        "audit log, 1 writer",
        single_rate,
        single_rate / plain_rate
    );
    for writers in [4u64, 16] {
        let log = Arc::new(
            AuditLog::open(&dir.path().join(format!("group{writers}")), "bench").expect("log"),
        );
        let start = Instant::now();
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..n / writers {
                        log.record(event(w * n + i)).expect("record");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer");
        }
        let rate = (n / writers * writers) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{:<34} {:>12.0} {:>9.2}x",
            format!("audit log, {writers} writers (group commit)"),
            rate,
            rate / plain_rate
        );
    }
}
