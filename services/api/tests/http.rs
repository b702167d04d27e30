//! The API over real HTTP on 127.0.0.1 with the real demo model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sovereign_api::{ApiKeys, AppState, Limits, LocalBackend};
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
    let state = AppState::new(
        "smollm2".into(),
        LocalBackend::new(engine(), &limits),
        keys,
        limits,
        None,
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

/// A metric's value; `/metrics` needs a key where keys are configured (the
/// first test's key; a keyless server ignores it).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = request(addr, "GET", "/metrics", Some("sk-test-1"), None);
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
    let (_, text) = request(addr, "GET", "/metrics", key, None);
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
    let (_, answer, _) = exchange(
        addr,
        &head(
            "POST",
            "/v1/chat/completions",
            None,
            Some(&chat_body(false, 5)),
        ),
    );
    assert_eq!(header(&answer, "retry-after"), Some("1"), "{answer}");
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
    let (_, answer, _) = exchange(
        addr,
        &head(
            "POST",
            "/v1/chat/completions",
            None,
            Some(&chat_body(false, 5)),
        ),
    );
    assert!(header(&answer, "retry-after").is_some(), "{answer}");
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
        LocalBackend::new(engine(), &Limits::default()),
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

/// One raw HTTP/1.1 exchange; returns status, lower-cased head and body.
fn exchange(addr: SocketAddr, raw: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_lowercase(), dechunk(body))
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let (status, text) = request(addr, "POST", path, None, Some(&body.to_string()));
    assert_eq!(status, 200, "{body}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

fn error_param(addr: SocketAddr, path: &str, body: &Value) -> String {
    let (status, text) = request(addr, "POST", path, None, Some(&body.to_string()));
    assert_eq!(status, 400, "{body}: {text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    error["error"]["param"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[test]
fn every_error_path_speaks_json_and_requests_are_identified() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys"),
        format!("{}\n", ApiKeys::line_for("alice", "sk-test-2")),
    )
    .unwrap();
    let keys = ApiKeys::load(&dir.path().join("keys")).unwrap();
    let addr = start(Some(keys), Limits::default());
    let base = "Host: x\r\nConnection: close\r\n";
    for (raw, status) in [
        (format!("GET /v1/nothing HTTP/1.1\r\n{base}\r\n"), 404),
        (format!("GET /v1/chat/completions HTTP/1.1\r\n{base}\r\n"), 405),
        (
            format!("POST /v1/chat/completions HTTP/1.1\r\n{base}Authorization: Bearer sk-test-2\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}"),
            415,
        ),
    ] {
        let (got, _, body) = exchange(addr, &raw);
        assert_eq!(got, status, "{raw}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert!(error["error"]["message"].is_string(), "{body}");
    }
    // Bearer in any case; x-request-id echoed, or made when absent.
    let (status, head, body) = exchange(
        addr,
        &format!("GET /v1/models/smollm2 HTTP/1.1\r\n{base}Authorization: bEaReR sk-test-2\r\nX-Request-Id: trace-42\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["id"],
        "smollm2"
    );
    assert_eq!(header(&head, "x-request-id"), Some("trace-42"));
    let (status, head, _) = exchange(
        addr,
        &format!("GET /v1/models/gpt-4 HTTP/1.1\r\n{base}Authorization: Bearer sk-test-2\r\n\r\n"),
    );
    assert_eq!(status, 404);
    assert!(
        header(&head, "x-request-id").is_some_and(|id| id.len() > 8),
        "{head}"
    );
}

#[test]
fn openai_fields_are_honoured_or_refused_by_name() {
    let addr = start(None, Limits::default());
    let chat = "/v1/chat/completions";
    let ask = |extra: Value| {
        let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0, "max_tokens": 12});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (field, value) in [
        ("n", json!(3)),
        ("functions", json!([{"name": "f"}])),
        ("top_logprobs", json!(3)),
        ("logit_bias", json!({"999999": 5})),
        ("presence_penalty", json!(3.0)),
        ("tool_choice", json!("required")),
    ] {
        assert_eq!(
            error_param(addr, chat, &ask(json!({ field: value }))),
            field
        );
    }
    let image = json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    assert_eq!(
        error_param(addr, chat, &image),
        "messages[0].content[0].type"
    );

    // The seed is reported; the same seed gives the same text at temperature 1.
    let sampled = ask(json!({"temperature": 1.0, "seed": 7}));
    let (s1, h1, b1) = exchange(addr, &head("POST", chat, None, Some(&sampled.to_string())));
    let (_, _, b2) = exchange(addr, &head("POST", chat, None, Some(&sampled.to_string())));
    assert_eq!((s1, header(&h1, "x-sovereign-seed")), (200, Some("7")));
    let text = |b: &str| {
        serde_json::from_str::<Value>(b).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(text(&b1), text(&b2));
    let unseeded = ask(json!({"temperature": 1.0}));
    let seeds: std::collections::BTreeSet<String> = (0..2)
        .map(|_| {
            let (_, h, _) = exchange(addr, &head("POST", chat, None, Some(&unseeded.to_string())));
            header(&h, "x-sovereign-seed").unwrap().to_owned()
        })
        .collect();
    assert_eq!(seeds.len(), 2, "unseeded requests drew the same seed");

    // Content parts, null content, tool messages; no max_tokens: up to the context.
    let parts = json!({"model": "smollm2", "temperature": 0, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}, {"type": "text", "text": "Answer in one sentence."}]},
    ]});
    let reply = post(addr, chat, &parts);
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{reply}"
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    let tool_history = json!({"model": "smollm2", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    ]});
    post(addr, chat, &tool_history);

    // logprobs, logit_bias, penalties.
    let reply = post(
        addr,
        chat,
        &ask(json!({"logprobs": true, "top_logprobs": 2})),
    );
    let tokens = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        tokens.len() as u64,
        reply["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(tokens
        .iter()
        .all(|t| t["top_logprobs"].as_array().unwrap().len() == 2
            && t["logprob"].as_f64().unwrap() <= 0.0));
    let joined: String = tokens
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        joined,
        reply["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // A prompt given as token ids.
    let ids_reply = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": engine().tokenize("The capital of France is").unwrap(), "max_tokens": 3, "temperature": 0}),
    );
    assert!(
        ids_reply["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{ids_reply}"
    );
    let counting = json!({"model": "smollm2", "prompt": "1, 1, 1, 1, 1, 1, 1, 1,", "max_tokens": 8, "temperature": 0, "logprobs": 1});
    let plain = post(addr, "/v1/completions", &counting);
    let mut penalised = counting.clone();
    penalised["frequency_penalty"] = json!(2.0);
    penalised["presence_penalty"] = json!(2.0);
    let penalised = post(addr, "/v1/completions", &penalised);
    assert_ne!(
        plain["choices"][0]["text"], penalised["choices"][0]["text"],
        "penalties changed nothing"
    );
    let lp = &plain["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8, "{lp}");
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        plain["choices"][0]["text"].as_str().unwrap()
    );
    let ids = engine()
        .tokenize(plain["choices"][0]["text"].as_str().unwrap())
        .unwrap();
    let mut banned = counting.clone();
    banned["logit_bias"] = json!({ ids[0].to_string(): -100 });
    let banned = post(addr, "/v1/completions", &banned);
    let banned_ids = engine()
        .tokenize(banned["choices"][0]["text"].as_str().unwrap())
        .unwrap();
    assert!(
        !banned_ids.is_empty() && banned_ids[0] != ids[0],
        "{banned}"
    );

    // A list of prompts gives one choice each.
    let two = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": ["The capital of France is", "The capital of Italy is"], "max_tokens": 4, "temperature": 0}),
    );
    let choices = two["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{two}");
    assert!(
        choices[0]["text"].as_str().unwrap().contains("Paris")
            && choices[1]["text"].as_str().unwrap().contains("Rome"),
        "{two}"
    );

    // Usage in streams.
    let streamed = ask(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (_, body) = request(addr, "POST", chat, None, Some(&streamed.to_string()));
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let usage: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert!(
        usage["choices"].as_array().unwrap().is_empty()
            && usage["usage"]["completion_tokens"].as_u64() > Some(0),
        "{usage}"
    );

    // Structured output and tool calls always parse.
    let object = post(
        addr,
        chat,
        &ask(json!({"max_tokens": 40, "response_format": {"type": "json_object"}})),
    );
    let content = object["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).is_ok_and(|v| v.is_object()),
        "{content}"
    );
    let schema = json!({"type": "object", "properties": {"capital": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]}, "population_millions": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["capital", "population_millions"], "additionalProperties": false});
    let typed = post(
        addr,
        chat,
        &ask(
            json!({"max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": true}}}),
        ),
    );
    let value: Value =
        serde_json::from_str(typed["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(
        ["Paris", "Rome", "Berlin"].contains(&value["capital"].as_str().unwrap())
            && value["population_millions"].as_u64().unwrap() < 100,
        "{value}"
    );
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}});
    let called = post(
        addr,
        chat,
        &json!({"model": "smollm2", "temperature": 0, "max_tokens": 40, "messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [tool], "tool_choice": "required"}),
    );
    let choice = &called["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{called}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
}

#[test]
fn embeddings_are_unit_vectors_that_tell_texts_apart() {
    let addr = start(None, Limits::default());
    let texts = [
        "The cat sat on the mat.",
        "A cat was sitting on a rug.",
        "Quarterly tax filing deadlines",
    ];
    let reply = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "smollm2", "input": texts}),
    );
    let vectors: Vec<Vec<f64>> = reply["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), engine().config().hidden);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!(vectors.iter().all(|v| (dot(v, v) - 1.0).abs() < 1e-3));
    assert!(
        dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]),
        "similar texts are not closer"
    );
    let encoded = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "smollm2", "input": texts[0], "encoding_format": "base64"}),
    );
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    assert!((dot(&decoded, &vectors[0]) - 1.0).abs() < 1e-4);
    assert_eq!(
        encoded["usage"]["prompt_tokens"].as_u64(),
        Some(engine().tokenize(texts[0]).unwrap().len() as u64)
    );
    assert_eq!(
        error_param(
            addr,
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": "x", "dimensions": 8})
        ),
        "dimensions"
    );
}

#[test]
fn refused_requests_are_audited_as_counted_summaries() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys"),
        format!("{}\n", ApiKeys::line_for("alice", "sk-test-3")),
    )
    .unwrap();
    let keys = ApiKeys::load(&dir.path().join("keys")).unwrap();
    let log = dir.path().join("audit");
    let audit = sovereign_audit::Auditor::Local(Arc::new(
        sovereign_audit::AuditLog::open(&log, "test").unwrap(),
    ));
    let limits = Limits {
        refusal_summary_every: Duration::from_millis(300),
        ..Limits::default()
    };
    let state = AppState::new(
        "smollm2".into(),
        LocalBackend::new(engine(), &limits),
        Some(keys),
        limits,
        Some(audit),
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
    let addr = rx.recv().unwrap();
    for _ in 0..50 {
        let (status, _) = request(addr, "GET", "/v1/models", Some("sk-guess"), None);
        assert_eq!(status, 401);
    }
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "secret prompt text"}], "max_tokens": 2, "user": "bob"});
    let (status, _) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some("sk-test-3"),
        Some(&body.to_string()),
    );
    assert_eq!(status, 200);
    let read = || {
        std::fs::read_dir(&log)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .collect::<String>()
    };
    let started = Instant::now();
    while !read().contains("api-refused") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no refusal summary was recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = read();
    assert_eq!(text.matches("api-refused").count(), 1, "{text}");
    assert!(
        text.contains("\"count\":50") && text.contains("\"status\":401"),
        "{text}"
    );
    assert!(
        text.contains("\"user\":\"bob\"") && text.contains("\"request_id\":\"req-"),
        "{text}"
    );
    assert!(
        !text.contains("secret prompt"),
        "prompt text in the audit log"
    );
}

/// Issue 14 items 15 and 16: stop texts are bounded in number and length,
/// `top_k` is honoured, a body over the limit gets 413, and `/metrics`
/// needs a key when keys are configured.
#[test]
fn r14_stop_texts_top_k_body_size_and_metrics_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys"),
        format!("{}\n", ApiKeys::line_for("alice", "sk-test-3")),
    )
    .unwrap();
    let keys = ApiKeys::load(&dir.path().join("keys")).unwrap();
    let addr = start(Some(keys), Limits::default());
    let chat = "/v1/chat/completions";
    let send = |body: &str| {
        exchange(
            addr,
            &format!(
                "POST {chat} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer sk-test-3\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let ask = |extra: Value| {
        let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "seed": 3});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    let refused = |body: String| {
        let (status, _, text) = send(&body);
        let error: Value = serde_json::from_str(&text).unwrap();
        (
            status,
            error["error"]["param"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    assert_eq!(refused(ask(json!({ "stop": many }))), (400, "stop".into()));
    assert_eq!(
        refused(ask(json!({ "stop": ["x".repeat(4097)] }))),
        (400, "stop".into())
    );
    let (status, _, body) = send(&ask(json!({ "stop": ["zzz", "x".repeat(4000)] })));
    assert_eq!(status, 200, "{body}");

    // top_k 1 draws the likeliest token at any temperature: the greedy text.
    let text = |extra: Value| {
        let (status, _, body) = send(&ask(extra));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let greedy = text(json!({"temperature": 0}));
    assert_ne!(
        text(json!({"temperature": 2.0})),
        greedy,
        "seed 3 at temperature 2"
    );
    assert_eq!(text(json!({"temperature": 2.0, "top_k": 1})), greedy);
    assert_eq!(refused(ask(json!({ "top_k": -1 }))).0, 400);

    // A body over 2 MiB: 413 with a JSON error.
    let big = ask(json!({ "user": "u".repeat(3 << 20) }));
    let (status, _, body) = send(&big);
    assert_eq!(status, 413, "{}", &body[..body.len().min(200)]);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());

    // /metrics: 401 without a key, the counters with one.
    let metrics = |auth: &str| {
        exchange(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"),
        )
    };
    assert_eq!(metrics("").0, 401);
    assert_eq!(metrics("Authorization: Bearer sk-wrong\r\n").0, 401);
    let (status, _, body) = metrics("Authorization: Bearer sk-test-3\r\n");
    assert_eq!(status, 200);
    assert!(body.contains("sovereign_api_requests_total"), "{body}");
}
