//! Issue 14, items 1 and 2: silent, slow and numerous connections do not take
//! the API offline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sovereign_api::{AppState, ConnLimits, Limits, LocalBackend};
use sovereign_inference::Engine;

fn state() -> Arc<AppState> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script).output().unwrap();
    assert!(out.status.success(), "fetch-model failed");
    let path: PathBuf = String::from_utf8(out.stdout).unwrap().trim().into();
    let engine = Arc::new(Engine::load(&path).unwrap());
    let backend = LocalBackend::new(engine, &Limits::default());
    AppState::new("smollm2".into(), backend, None, Limits::default(), None)
}

/// Starts a server (TLS when `tls` names cert and key) in its own runtime.
fn start(limits: ConnLimits, tls: Option<(PathBuf, PathBuf)>) -> SocketAddr {
    let state = state();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(tcp.local_addr().unwrap()).unwrap();
            let never = std::future::pending();
            match tls {
                Some((cert, key)) => {
                    let listener = sovereign_api::TlsListener::new(tcp, &cert, &key).unwrap();
                    sovereign_api::serve_tls_with(listener, state, limits, never).await
                }
                None => sovereign_api::serve_with(tcp, state, limits, never).await,
            }
            .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// Whether the server still holds `stream` open (no EOF, no reset).
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open =
        matches!((&*stream).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// A new connection that has sent `request` (reads time out after 60 s).
fn send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(request).unwrap();
    stream
}

fn health(addr: SocketAddr) -> String {
    let mut stream = send(
        addr,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn r14_silent_tls_clients_do_not_hold_up_the_handshake_of_others() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=node-a"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(made.status.success());
    let addr = start(ConnLimits::default(), Some((cert.clone(), key)));
    let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(&cert)
        .arg(format!("https://127.0.0.1:{}/health", addr.port()))
        .output()
        .expect("run curl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\""));
    // Served while the silent handshakes are still pending, not after they timed out.
    assert!(
        silent.iter().all(still_open),
        "health waited for the silent clients"
    );
}

#[test]
fn r14_an_unfinished_request_head_is_closed_and_one_client_cannot_take_every_connection() {
    let limits = ConnLimits {
        per_client: 4,
        header: Duration::from_secs(1),
        ..ConnLimits::default()
    };
    let addr = start(limits, None);
    // A request whose blank line never comes is closed, not held forever.
    let mut slow = send(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n");
    let mut rest = Vec::new();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_ok(),
        "the unfinished request was held open: {read:?}"
    );
    // Over its per-client cap a client's next connection is closed at once.
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "a connection over the cap was kept"
    );
    drop(held);
    let mut answered = String::new();
    for _ in 0..100 {
        answered = health(addr);
        if answered.contains("\"ok\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answered.contains("\"ok\""), "{answered}");
}

/// Whether the server closes `stream` within 10 s.
fn closed_soon(stream: &TcpStream) -> bool {
    (0..200).any(|_| {
        let closed = !still_open(stream);
        if !closed {
            std::thread::sleep(Duration::from_millis(50));
        }
        closed
    })
}

/// A keep-alive connection that has had one `/health` answered.
fn answered_keep_alive(addr: SocketAddr) -> TcpStream {
    let mut stream = send(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("\"ok\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn r14_when_full_a_silent_or_idle_connection_gives_its_place_to_a_client_that_talks() {
    let limits = ConnLimits {
        max: 4,
        ..ConnLimits::default()
    };
    let addr = start(limits, None);
    // Four connections that never send a byte fill the table...
    let silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(silent.iter().all(still_open));
    // ...yet a client that talks is answered: the oldest silent one made room.
    let answered = health(addr);
    assert!(answered.contains("\"ok\""), "{answered}");
    assert!(
        !still_open(&silent[0]),
        "the oldest silent client kept its place"
    );
    assert!(silent[1..].iter().all(still_open));

    // A keep-alive client idling after its answer gives its place as well,
    // the one idle longest first...
    let addr = start(
        ConnLimits {
            max: 2,
            ..ConnLimits::default()
        },
        None,
    );
    let idling = [answered_keep_alive(addr), answered_keep_alive(addr)];
    let answered = health(addr);
    assert!(answered.contains("\"ok\""), "{answered}");
    assert!(
        closed_soon(&idling[0]),
        "the longest idle keep-alive client kept its place"
    );
    assert!(still_open(&idling[1]));

    // ...but a connection in the middle of a request never goes: with the
    // table full of them, a newcomer is refused instead.
    let addr = start(
        ConnLimits {
            max: 2,
            ..ConnLimits::default()
        },
        None,
    );
    let unfinished_body = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\
        Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    let busy = [send(addr, unfinished_body), send(addr, unfinished_body)];
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "a connection over the cap was kept"
    );
    assert!(
        busy.iter().all(still_open),
        "a client in the middle of a request lost its place"
    );
}
