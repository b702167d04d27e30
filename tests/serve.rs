//! `sovereign serve` answers the official OpenAI Python client, streaming and not.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::{python_venv, python_with_openai, Lab};

/// Kills the server when the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sovereign serve` on loopback with a key; returns it and its address.
fn serve_with_key(lab: &Lab, key: &str) -> (Server, String) {
    std::fs::write(
        lab.path("keys"),
        "tester blake3:".to_owned() + &blake3::hash(key.as_bytes()).to_hex() + "\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .args([
            "serve",
            "--store",
            "store",
            "--listen",
            "127.0.0.1:0",
            "--keys",
            "keys",
        ])
        .current_dir(lab.dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let address = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split("on http://").nth(1).map(|a| a.trim().to_owned()))
        .expect("the server exited before listening");
    (server, address)
}

#[test]
fn langchain_litellm_and_the_openai_sdk_use_structured_output_tools_and_streams() {
    let lab = Lab::new();
    lab.import_demo_model();
    let (_server, address) = serve_with_key(&lab, "sk-clients");
    let python = python_venv(
        "clients-venv",
        "langchain_openai, litellm",
        &[
            "openai==3.57.0",
            "langchain-openai==1.7.4",
            "litellm==1.110.2",
        ],
    );
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/real_clients.py"
        ))
        .args([&format!("http://{address}/v1"), "sk-clients", "smollm2"])
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the clients failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("real clients ok"));
}

#[test]
fn the_openai_client_trusting_only_the_cluster_ca_reaches_an_enrolled_node() {
    let lab = Lab::new();
    lab.import_demo_model();
    std::fs::write(
        lab.path("keys"),
        "tester blake3:".to_owned() + &blake3::hash(b"sk-local-test").to_hex() + "\n",
    )
    .unwrap();
    lab.run(&["cluster", "init", "--name", "office", "--out", "cluster"])
        .ok();
    lab.run(&[
        "node",
        "enroll",
        "--cluster",
        "cluster",
        "--name",
        "node-a",
        "--lan-ip",
        "127.0.0.1",
        "--out",
        "node-a.identity",
    ])
    .ok();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .args(["serve", "--store", "store", "--listen", "127.0.0.1:0"])
        .args(["--keys", "keys", "--identity", "node-a.identity"])
        .current_dir(lab.dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(url) = line.split("on https://").nth(1) {
            break url.trim().to_owned();
        }
    };
    let port = address.rsplit(':').next().unwrap();
    // curl, trusting only the CA, reaches the node by its enrolled name.
    let health = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--tlsv1.3",
            "--cacert",
            "cluster/ca.pem",
        ])
        .args(["--resolve", &format!("node-a:{port}:127.0.0.1")])
        .arg(format!("https://node-a:{port}/health"))
        .current_dir(lab.dir.path())
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    // Another cluster's CA is not enough.
    lab.run(&["cluster", "init", "--name", "other", "--out", "other"])
        .ok();
    let foreign = Command::new("curl")
        .args(["--silent", "--cacert", "other/ca.pem"])
        .arg(format!("https://{address}/health"))
        .current_dir(lab.dir.path())
        .output()
        .unwrap();
    assert!(!foreign.status.success(), "a foreign CA was trusted");
    let output = Command::new(python_with_openai())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .args([&format!("https://{address}/v1"), "sk-local-test", "smollm2"])
        .arg(lab.path("cluster/ca.pem"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_openai_python_client_works_unchanged() {
    let lab = Lab::new();
    lab.import_demo_model();
    std::fs::write(
        lab.path("keys"),
        "tester blake3:".to_owned() + &blake3::hash(b"sk-local-test").to_hex() + "\n",
    )
    .unwrap();

    // Without keys, only loopback is allowed.
    lab.run(&["serve", "--store", "store", "--listen", "0.0.0.0:0"])
        .refused("only allowed on loopback");

    let mut child = Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .args([
            "serve",
            "--store",
            "store",
            "--listen",
            "127.0.0.1:0",
            "--keys",
            "keys",
            "--audit-log",
            "audit",
        ])
        .current_dir(lab.dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(url) = line.split("on http://").nth(1) {
            break url.trim().to_owned();
        }
    };
    let output = Command::new(python_with_openai())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .args([&format!("http://{address}/v1"), "sk-local-test", "smollm2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("openai client ok"));
    drop(server);

    let log = lab
        .run(&["audit", "show", "--log", "audit", "--json"])
        .ok()
        .stdout;
    assert!(
        log.contains("\"api-request\"") && log.contains("\"key\":\"tester\""),
        "{log}"
    );
    assert!(
        !log.contains("capital of France"),
        "prompt text leaked into the audit log"
    );
}

#[test]
fn serve_speaks_https_with_a_certificate_and_key() {
    let lab = Lab::new();
    lab.import_demo_model();
    std::fs::write(
        lab.path("keys"),
        "lan blake3:".to_owned() + &blake3::hash(b"sk-lan").to_hex() + "\n",
    )
    .unwrap();
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=node-a",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(lab.dir.path())
        .output()
        .expect("run openssl");
    assert!(made.status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sovereign"))
        .args([
            "serve",
            "--store",
            "store",
            "--listen",
            "127.0.0.1:0",
            "--keys",
            "keys",
        ])
        .args(["--tls-cert", "cert.pem", "--tls-key", "key.pem"])
        .current_dir(lab.dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let address = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split("on https://")
                .nth(1)
                .map(|a| a.trim().to_owned())
        })
        .expect("the server did not report an https address");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            "cert.pem",
            "-H",
            "Authorization: Bearer sk-lan",
        ])
        .arg(format!("https://{address}/v1/models"))
        .current_dir(lab.dir.path())
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("\"smollm2\""),
        "{body}"
    );
    let usage = lab.run(&["serve", "--store", "store", "--tls-cert", "cert.pem"]);
    assert_eq!(
        usage.code, 2,
        "--tls-cert without --tls-key must be a usage error"
    );
}

/// `POST` of a JSON `body` over plain HTTP/1.1; asserts 200 and returns the JSON answer.
fn post_json(address: &str, key: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{response}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The value of metric `name` on `/metrics` (which needs the API key).
fn metric(address: &str, key: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_exactly_its_tokens_alone() {
    let lab = Lab::new();
    lab.import_demo_model();
    let (_server, address) = serve_with_key(&lab, "sk-batch");
    let chat = |text: &str, max_tokens: u32, seed: Option<u64>| {
        let mut body = serde_json::json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        if let Some(seed) = seed {
            body["temperature"] = serde_json::json!(0.9);
            body["seed"] = serde_json::json!(seed);
        }
        body
    };
    let mut requests = [
        chat(
            "What is the capital of France? Answer in one sentence.",
            24,
            None,
        ),
        chat("Name three colours.", 16, Some(7)),
        chat("Write a haiku about the sea.", 30, Some(42)),
        chat("2+2=", 6, None),
    ];
    requests[0]["logprobs"] = serde_json::json!(true);
    requests[0]["top_logprobs"] = serde_json::json!(2);
    let answer = |response: &serde_json::Value| {
        (
            response["choices"][0].clone(),
            response["usage"]["completion_tokens"].clone(),
        )
    };
    let alone: Vec<_> = requests
        .iter()
        .map(|r| answer(&post_json(&address, "sk-batch", "/v1/chat/completions", r)))
        .collect();
    assert!(
        alone[0].0["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{:?}",
        alone[0]
    );

    let steps = metric(&address, "sk-batch", "sovereign_scheduler_steps_total");
    let stepped = metric(
        &address,
        "sk-batch",
        "sovereign_scheduler_stepped_sequences_total",
    );
    let together: Vec<_> = std::thread::scope(|s| {
        let running: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| post_json(&address, "sk-batch", "/v1/chat/completions", r)))
            .collect();
        running
            .into_iter()
            .map(|h| answer(&h.join().unwrap()))
            .collect()
    });
    for (i, (batched, single)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(batched, single, "request {i} differs when batched");
    }
    // The concurrent requests shared forward steps: more sequences were
    // stepped than steps were run.
    let steps = metric(&address, "sk-batch", "sovereign_scheduler_steps_total") - steps;
    let stepped = metric(
        &address,
        "sk-batch",
        "sovereign_scheduler_stepped_sequences_total",
    ) - stepped;
    assert!(stepped > steps, "{stepped} sequences in {steps} steps");
    assert!(
        metric(
            &address,
            "sk-batch",
            "sovereign_api_time_to_first_token_seconds_count"
        ) >= 8.0
    );
}
