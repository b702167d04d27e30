//! The audit daemon's socket protocol end to end (issue 14 item 4): the
//! input is what a client writes on the socket (request lines: events and
//! courier requests); the daemon's own `serve` answers; every record it
//! acknowledged (`{"seq": N}`) must then verify from the log's files, as
//! `sovereign audit verify` reads them. Acknowledged but unverifiable, or a
//! panic, is a finding.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use sovereign_audit::{serve, verify, verify_records, AuditLog, Export, Gate, Policy};

/// Records a log takes before the harness starts a fresh one (keeps each
/// verification short).
const ROTATE_AFTER: usize = 64;

struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    log: Arc<AuditLog>,
    acked: usize,
}

impl Daemon {
    fn start(generation: u64) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sovereign-fuzz-audit-{}-{generation}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let log = Arc::new(AuditLog::open(&dir.join("log"), "fuzz").expect("log"));
        let socket = dir.join("audit.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        // No per-user rules: this process's user may record anything; no quota
        // or free-space floor gets in the fuzzer's way.
        let gate = Arc::new(Gate::new(
            Policy {
                rules: Vec::new(),
                burst_bytes: u64::MAX / 4,
                bytes_per_sec: u64::MAX / 4,
                min_free_bytes: 0,
            },
            &dir.join("log"),
        ));
        let served = Arc::clone(&log);
        // The thread of a retired log stays blocked in accept; one per 64 records.
        std::thread::spawn(move || serve(listener, served, gate));
        Self {
            dir,
            socket,
            log,
            acked: 0,
        }
    }

    /// Every record of the log verifies, as an auditor reads the files.
    fn check(&self) {
        let records =
            std::fs::read_to_string(self.dir.join("log/records.jsonl")).expect("records");
        if let Err(e) = verify_records(records.lines(), &self.log.public_key()) {
            panic!("an acknowledged record does not verify: {e}\n{records}");
        }
    }

    fn retire(self) {
        self.log.checkpoint().expect("checkpoint");
        let export = Export::from_dir(&self.dir.join("log")).expect("export");
        if let Err(e) = verify(&export, Some(&self.log.public_key()), None) {
            panic!("the log does not verify: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn daemon() -> &'static Mutex<(u64, Option<Daemon>)> {
    static DAEMON: OnceLock<Mutex<(u64, Option<Daemon>)>> = OnceLock::new();
    DAEMON.get_or_init(|| Mutex::new((0, None)))
}

fuzz_target!(|data: &[u8]| {
    let mut guard = daemon().lock().unwrap_or_else(|e| e.into_inner());
    let (generation, current) = &mut *guard;
    if current.as_ref().is_some_and(|d| d.acked >= ROTATE_AFTER) {
        if let Some(old) = current.take() {
            old.retire();
        }
    }
    let daemon = current.get_or_insert_with(|| {
        *generation += 1;
        Daemon::start(*generation)
    });
    let Ok(mut stream) = UnixStream::connect(&daemon.socket) else {
        panic!("the daemon stopped accepting");
    };
    let mut request = data.to_vec();
    request.push(b'\n');
    // The daemon may close early (a line too long); then it has answered.
    let _ = stream.write_all(&request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut replies = String::new();
    let _ = stream.take(1 << 24).read_to_string(&mut replies);
    let acked = replies
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .is_some_and(|v| v.get("seq").is_some())
        })
        .count();
    if acked > 0 {
        daemon.acked += acked;
        daemon.check();
    }
});
