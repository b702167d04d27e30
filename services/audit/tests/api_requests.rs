//! The API (`sovereign-api`) and the real audit daemon (this package's
//! `sovereign-audit`): requests are recorded before anything is generated, refused
//! while the daemon is down, served again once it restarts, and `/health`
//! says which (issue 14 item 3).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sovereign_api::{AppState, Limits, LocalBackend};
use sovereign_audit::{AuditClient, Auditor};
use sovereign_inference::Engine;

fn start_daemon(binary: &Path, dir: &Path, socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(binary)
        .arg("--log")
        .arg(dir.join("log"))
        .arg("--socket")
        .arg(socket)
        .args(["--node", "node-api"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while AuditClient::connect(socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn engine() -> Arc<Engine> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = Command::new(script)
        .output()
        .expect("run scripts/fetch-model");
    assert!(out.status.success(), "fetch-model failed");
    let path: PathBuf = String::from_utf8(out.stdout).unwrap().trim().into();
    Arc::new(Engine::load(&path).expect("load the demo model"))
}

/// One HTTP/1.1 exchange: status and body (chunked framing left in; the
/// checks only look for words).
fn exchange(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body = body.unwrap_or("");
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn chat(stream: bool) -> String {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 4,
        "stream": stream,
    })
    .to_string()
}

#[test]
fn r14_requests_are_recorded_first_refused_while_the_daemon_is_down_and_served_after_it_restarts() {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_sovereign-audit"));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("audit.sock");
    let mut daemon = start_daemon(&binary, dir.path(), &socket);
    let auditor = Auditor::Remote(AuditClient::connect(&socket).unwrap());
    let limits = Limits::default();
    let state = AppState::new(
        "smollm2".into(),
        LocalBackend::new(engine(), &limits),
        None,
        limits,
        Some(auditor),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            sovereign_api::serve(listener, state, std::future::pending())
                .await
                .unwrap();
        });
    });
    let addr: SocketAddr = rx.recv().unwrap();
    let records = || std::fs::read_to_string(dir.path().join("log/records.jsonl")).unwrap();

    let (status, body) = exchange(addr, "POST", "/v1/chat/completions", Some(&chat(false)));
    assert_eq!(status, 200, "{body}");
    let (status, body) = exchange(addr, "GET", "/health", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["audit"], "ok");
    let text = records();
    let accepted = text
        .find("\"phase\":\"accepted\"")
        .expect("accepted record");
    let completed = text
        .find("\"phase\":\"completed\"")
        .expect("completed record");
    assert!(accepted < completed, "{text}");

    // The daemon dies: nothing is generated, streamed or not, and /health says so.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    for stream in [false, true] {
        let (status, body) = exchange(addr, "POST", "/v1/chat/completions", Some(&chat(stream)));
        assert_eq!(status, 503, "stream {stream}: {body}");
        assert!(body.contains("audit_unavailable"), "{body}");
        assert!(!body.contains("data:"), "{body}");
    }
    let (status, body) = exchange(addr, "GET", "/health", None);
    assert_eq!(status, 503, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (health["status"].as_str(), health["audit"].as_str()),
        (Some("unavailable"), Some("unavailable"))
    );

    // It restarts on the same log: the API reconnects by itself.
    let mut daemon = start_daemon(&binary, dir.path(), &socket);
    let (status, body) = exchange(addr, "GET", "/health", None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = exchange(addr, "POST", "/v1/chat/completions", Some(&chat(true)));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[DONE]"), "{body}");
    assert_eq!(records().matches("\"phase\":\"accepted\"").count(), 2);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
