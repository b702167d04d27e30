//! The API over real HTTP on 127.0.0.1 with the real demo model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sovereign_api::{ApiKeys, AppState, Limits};
use sovereign_inference::Engine;

fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
            let out = std::process::Command::new(script)
                .output()
                .expect("run scripts/fetch-model");
            assert!(out.status.success(), "fetch-model failed");
            let path: PathBuf = String::from_utf8(out.stdout).unwrap().trim().into();
            Arc::new(Engine::load(&path).expect("load the demo model"))
        })
        .clone()
}

/// Starts a server on an ephemeral loopback port; returns its address.
fn start(keys: Option<ApiKeys>, limits: Limits) -> SocketAddr {
    let state = AppState::new("smollm2".into(), engine(), keys, limits, None);
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
    rx.recv().unwrap()
}

/// One HTTP/1.1 request; returns status and body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(head(method, path, key, body).as_bytes())
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, dechunk(&body))
}

fn head(method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> String {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Removes chunked transfer framing if present.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

fn chat_body(stream: bool, max_tokens: usize) -> String {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = request(addr, "GET", "/metrics", None, None);
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn chat_streaming_and_not_agree_and_malformed_requests_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys"),
        format!("{}\n", ApiKeys::line_for("alice", "sk-test-1")),
    )
    .unwrap();
    let keys = ApiKeys::load(&dir.path().join("keys")).unwrap();
    let addr = start(Some(keys), Limits::default());
    let key = Some("sk-test-1");

    let (status, body) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&chat_body(false, 20)),
    );
    assert_eq!(status, 401, "{body}");
    let (status, _) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some("sk-wrong"),
        Some(&chat_body(false, 20)),
    );
    assert_eq!(status, 401);

    let (status, body) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        key,
        Some(&chat_body(false, 20)),
    );
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

    let (status, body) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        key,
        Some(&chat_body(true, 20)),
    );
    assert_eq!(status, 200);
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        streamed, content,
        "streamed and non-streamed greedy answers differ"
    );
    let last: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert!(last["choices"][0]["finish_reason"].is_string());

    let completion = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}).to_string();
    let (status, body) = request(addr, "POST", "/v1/completions", key, Some(&completion));
    assert_eq!(status, 200, "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );

    for (path, payload, expected) in [
        ("/v1/chat/completions", "{not json", 400),
        ("/v1/chat/completions", r#"{"model": "smollm2"}"#, 422),
        (
            "/v1/chat/completions",
            r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}"#,
            404,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "smollm2", "messages": []}"#,
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#,
            400,
        ),
    ] {
        let (status, body) = request(addr, "POST", path, key, Some(payload));
        let status = if status == 422 { 422 } else { status };
        assert!(
            status == expected || (expected == 422 && status == 400),
            "{payload}: {status} {body}"
        );
        let error: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert!(error["error"]["message"].is_string(), "{body}");
    }
    let long = "word ".repeat(9000);
    let big = json!({"model": "smollm2", "prompt": long, "max_tokens": 5}).to_string();
    let (status, body) = request(addr, "POST", "/v1/completions", key, Some(&big));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context"), "{body}");

    let (status, body) = request(addr, "GET", "/v1/models", key, None);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"],
        "smollm2"
    );
    let (status, body) = request(addr, "GET", "/health", None, None);
    assert_eq!((status, body.contains("ok")), (200, true));
    // Without a key only the status; with one, what the node serves.
    assert!(!body.contains("smollm2"), "{body}");
    let (_, body) = request(addr, "GET", "/health", key, None);
    assert!(body.contains("\"model\":\"smollm2\""), "{body}");
    assert!(metric(addr, "sovereign_api_completion_tokens_total") > 0.0);
    // The demo model's 210 Q4_1 matrices and Q8_0 head run on the SIMD kernels.
    assert_eq!(
        metric(addr, "sovereign_model_matrices{path=\"Q4_1 kernel\"}"),
        210.0
    );
    assert_eq!(
        metric(addr, "sovereign_model_matrices{path=\"Q8_0 kernel\"}"),
        1.0
    );
    let (_, text) = request(addr, "GET", "/metrics", None, None);
    assert!(
        text.contains(
            "sovereign_api_requests_total{route=\"/v1/chat/completions\",status=\"401\"} 2"
        ),
        "{text}"
    );
    assert!(
        text.contains("sovereign_api_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[test]
fn a_full_queue_gets_429_a_full_kv_budget_503_and_a_disconnect_cancels() {
    let limits = Limits {
        max_concurrency: 1,
        queue: 0,
        ..Limits::default()
    };
    let addr = start(None, limits);
    // Hold the only slot with a long streaming request, read its first event, then hang up.
    let mut stream = TcpStream::connect(addr).unwrap();
    let counting = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2000, "temperature": 0, "stream": true});
    stream
        .write_all(head("POST", "/v1/completions", None, Some(&counting.to_string())).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let (status, body) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&chat_body(false, 5)),
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("queue is full"), "{body}");
    drop(reader);
    drop(stream);
    let started = Instant::now();
    while metric(addr, "sovereign_api_cancelled_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "generation was not cancelled after the disconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(addr, "sovereign_api_completion_tokens_total") < 2000.0);
    // The slot is free again.
    let (status, _) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&chat_body(false, 5)),
    );
    assert_eq!(status, 200);

    let tiny = Limits {
        kv_budget_bytes: 1024,
        ..Limits::default()
    };
    let addr = start(None, tiny);
    let (status, body) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&chat_body(false, 5)),
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("KV-cache"), "{body}");
}

#[test]
fn the_api_serves_https_with_the_node_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=node-a",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    std::fs::write(
        dir.path().join("keys"),
        format!("{}\n", ApiKeys::line_for("lan", "sk-lan")),
    )
    .unwrap();
    let keys = ApiKeys::load(&dir.path().join("keys")).unwrap();
    let state = AppState::new(
        "smollm2".into(),
        engine(),
        Some(keys),
        Limits::default(),
        None,
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, k) = (cert.clone(), key.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(tcp.local_addr().unwrap()).unwrap();
            let listener = sovereign_api::TlsListener::new(tcp, &c, &k).unwrap();
            sovereign_api::serve_tls(listener, state, std::future::pending())
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&cert)
            .args(args)
            .output()
            .expect("run curl (apt-get install curl)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, body) = curl(&[&format!("https://127.0.0.1:{}/health", addr.port())]);
    assert!(ok && body.contains("\"ok\""), "{body}");
    let (ok, body) = curl(&[
        "-H",
        "Authorization: Bearer sk-lan",
        "-H",
        "Content-Type: application/json",
        "-d",
        &chat_body(false, 12),
        &format!("https://127.0.0.1:{}/v1/chat/completions", addr.port()),
    ]);
    assert!(ok && body.contains("Paris"), "{body}");
    // Plain HTTP on the TLS port gets no answer.
    let (ok, body) = curl(&[&format!("http://127.0.0.1:{}/health", addr.port())]);
    assert!(
        !ok || !body.contains("\"ok\""),
        "plain HTTP was answered: {body}"
    );
    // A bad key file is refused clearly.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err = runtime.block_on(async {
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        sovereign_api::TlsListener::new(tcp, &cert, &cert)
            .err()
            .unwrap()
    });
    assert!(err.contains("cert.pem"), "{err}");
}
