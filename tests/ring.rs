//! The ring end to end: enrolled nodes started the documented way
//! (`sovereign node run`) in network namespaces cabled like Thunderbolt
//! (veth pairs, IPv6 link-local only), the real demo model, the official
//! `openai` client in each node's namespace. Needs root, `ip` and python3.
//! No test asserts a time: waits are bounded only so that a broken ring fails.

mod support;

use std::io::{BufRead, BufReader, Lines};
use std::process::{ChildStdout, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sovereign_vm_tests::netns::{NsProcess, RingNet};
use support::{python_with_openai, Lab};

const KEY: &str = "sk-ring-test";
const WAIT: Duration = Duration::from_secs(120);
const PROMPT: &str = "Write a long story about a lighthouse keeper and a storm.";

/// A cluster CA, enrolled nodes with the demo model in their stores, and the
/// namespaces they run in.
struct Cluster {
    lab: Lab,
    net: RingNet,
    names: Vec<String>,
    running: Vec<Option<NsProcess>>,
}

impl Cluster {
    /// `names.len()` enrolled nodes of cluster `acme` cabled by `net`, each
    /// store holding the demo model (`other` nodes are enrolled in a second,
    /// foreign cluster).
    fn new(net: RingNet, names: &[&str], foreign: &[&str]) -> Cluster {
        let lab = Lab::new();
        lab.import_demo_model();
        lab.run(&["cluster", "init", "--name", "acme", "--out", "acme"])
            .ok();
        lab.run(&["cluster", "init", "--name", "other", "--out", "other"])
            .ok();
        for name in names {
            let cluster = if foreign.contains(name) {
                "other"
            } else {
                "acme"
            };
            let identity = format!("{name}.identity");
            #[rustfmt::skip]
            lab.run(&["node", "enroll", "--cluster", cluster, "--name", name, "--out", &identity]).ok();
            let store = format!("store-{name}");
            #[rustfmt::skip]
            lab.run(&["import", "--store", &store, "--trust", "node.trust", "smollm2-1.0.0.sovb"]).ok();
        }
        std::fs::write(
            lab.path("keys"),
            format!(
                "operator blake3:{}\n",
                blake3::hash(KEY.as_bytes()).to_hex()
            ),
        )
        .unwrap();
        std::fs::write(lab.path("key"), KEY).unwrap();
        Cluster {
            running: names.iter().map(|_| None).collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
            lab,
            net,
        }
    }

    /// Starts node `i` the documented way, logging to `node-NAME.log`.
    fn start(&mut self, i: usize) {
        let name = &self.names[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.path(&format!("node-{name}.log")))
            .unwrap();
        let node = self.net.node(i);
        let mut command = node.command(env!("CARGO_BIN_EXE_sovereign"));
        #[rustfmt::skip]
        command
            .args(["node", "run", "--identity", &format!("{name}.identity"), "--store", &format!("store-{name}")])
            .args(["--ring-interface", "thunderbolt*", "--api-listen", "127.0.0.1:8080", "--keys", "keys"])
            .args(["--heartbeat-ms", "300", "--audit-log", &format!("audit-{name}")])
            .env("SOVEREIGN_LOG", "info")
            .current_dir(self.lab.dir.path())
            .stdout(Stdio::null())
            .stderr(log);
        self.running[i] = Some(node.spawn(&mut command).unwrap());
    }

    /// Kills node `i` (SIGKILL: its power cut).
    fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.running[i].take() {
            node.kill().unwrap();
        }
    }

    /// `sovereign ring status --json`, run in node `i`'s namespace.
    fn status(&self, i: usize) -> Option<Value> {
        let out = self
            .net
            .node(i)
            .command(env!("CARGO_BIN_EXE_sovereign"))
            .args(["ring", "status", "--json", "--key-file", "key"])
            .current_dir(self.lab.dir.path())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The ring order node `i` serves on (empty when it does not serve).
    fn order(&self, i: usize) -> Vec<String> {
        self.status(i)
            .and_then(|s| {
                s["ring"]["order"].as_array().map(|o| {
                    o.iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Waits until node `i` serves on exactly the nodes `order`.
    fn wait_for_order(&self, i: usize, order: &[&str]) -> Value {
        let started = Instant::now();
        loop {
            if self.order(i) == order {
                return self.status(i).unwrap();
            }
            assert!(
                started.elapsed() < WAIT,
                "node {} never served on {order:?}: status {:?}\n{}",
                self.names[i],
                self.status(i),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts the official client in node `i`'s namespace, streaming.
    fn stream(&self, i: usize, max_tokens: u32, seed: u64, temperature: f32) -> Stream {
        let mut child = self
            .net
            .node(i)
            .command(python_with_openai())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ring_client.py"))
            .args(["http://127.0.0.1:8080/v1", KEY, PROMPT])
            .args([
                max_tokens.to_string(),
                seed.to_string(),
                temperature.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Stream {
            child,
            lines,
            text: String::new(),
        }
    }

    /// The whole answer from node `i`.
    fn ask(&self, i: usize, max_tokens: u32, seed: u64, temperature: f32) -> String {
        let mut stream = self.stream(i, max_tokens, seed, temperature);
        stream.finish(self)
    }

    /// A Prometheus counter from node `i`'s `/metrics`.
    fn metric(&self, i: usize, name: &str) -> u64 {
        let out = self
            .net
            .node(i)
            .command("python3")
            .args(["-c", "import sys, urllib.request as u; r = u.Request('http://127.0.0.1:8080/metrics', headers={'Authorization': 'Bearer ' + sys.argv[1]}); print(u.urlopen(r).read().decode())", KEY])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("node {} has no metric {name}", self.names[i]))
    }

    fn logs(&self) -> String {
        self.names
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.lab.path(&format!("node-{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- node {n} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A streamed answer being read.
struct Stream {
    child: std::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
    text: String,
}

impl Stream {
    /// Reads `n` more pieces.
    fn pieces(&mut self, n: usize, cluster: &Cluster) {
        for _ in 0..n {
            let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("client said {line:?}\n{}", cluster.logs()));
            let piece = value["piece"]
                .as_str()
                .unwrap_or_else(|| panic!("the answer ended after {:?}", self.text));
            self.text.push_str(piece);
        }
    }

    /// Reads to the end; the whole text.
    fn finish(&mut self, cluster: &Cluster) -> String {
        for line in self.lines.by_ref() {
            let value: Value = serde_json::from_str(&line.unwrap()).unwrap();
            match value["piece"].as_str() {
                Some(piece) => self.text.push_str(piece),
                None => break,
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the client failed\n{}", cluster.logs());
        self.text.clone()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn three_nodes_answer_like_one_and_carry_on_through_a_lost_node_and_a_cut_cable() {
    let mut ring = Cluster::new(
        RingNet::ring(3).unwrap(),
        &["node-a", "node-b", "node-c"],
        &[],
    );
    // One node alone serves every layer: the reference answers.
    ring.start(0);
    ring.wait_for_order(0, &["node-a"]);
    let greedy = ring.ask(0, 64, 1, 0.0);
    let seeded = ring.ask(0, 32, 7, 0.9);
    assert!(greedy.len() > 100, "a long answer: {greedy:?}");
    assert_ne!(greedy, seeded);

    // The others join with nothing configured; every node's API answers
    // exactly like the single node, on a plan of three stages.
    ring.start(1);
    ring.start(2);
    let status = ring.wait_for_order(0, &["node-a", "node-b", "node-c"]);
    let layers: Vec<Value> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["layers"].clone())
        .collect();
    assert_eq!(
        layers,
        [
            serde_json::json!([0, 10]),
            serde_json::json!([10, 20]),
            serde_json::json!([20, 30])
        ],
        "equal budgets split the 30 layers evenly: {status}"
    );
    for i in 0..3 {
        ring.wait_for_order(i, &["node-a", "node-b", "node-c"]);
        assert_eq!(ring.ask(i, 64, 1, 0.0), greedy, "greedy from node {i}");
    }
    assert_eq!(ring.ask(2, 32, 7, 0.9), seeded, "seeded from node-c");

    // The middle node dies mid-stream: the entry replays on the new plan and
    // the client gets the single node's tokens.
    let replays = ring.metric(0, "sovereign_ring_replays_total");
    let mut stream = ring.stream(0, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.kill(1);
    assert_eq!(stream.finish(&ring), greedy, "through a killed middle node");
    assert!(
        ring.metric(0, "sovereign_ring_replays_total") > replays,
        "the stream was replayed on the new plan"
    );
    ring.wait_for_order(0, &["node-a", "node-c"]);

    // It comes back, and the three-stage plan with it.
    ring.start(1);
    ring.wait_for_order(0, &["node-a", "node-b", "node-c"]);
    assert_eq!(ring.ask(1, 64, 1, 0.0), greedy, "after the return");

    // A cut cable in the closed ring: traffic goes the other way round.
    let mut stream = ring.stream(0, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.net.cable_down(0).unwrap();
    assert_eq!(stream.finish(&ring), greedy, "through a cut cable");
    assert_eq!(
        ring.order(0),
        ["node-a", "node-b", "node-c"],
        "node-b is still reached through node-c"
    );

    // The middle node's remaining cable goes down mid-stream too: it is
    // unreachable, and the two others finish the answer.
    let mut stream = ring.stream(2, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.net.cable_down(1).unwrap();
    assert_eq!(stream.finish(&ring), greedy, "node-b cut off");
    ring.wait_for_order(2, &["node-a", "node-c"]);
}

#[test]
fn a_foreign_node_and_a_revoked_node_are_refused() {
    // node-a in the middle of a chain: one cable to a node of another
    // cluster, one to a node of its own cluster whose certificate is revoked.
    let mut ring = Cluster::new(
        RingNet::chain(3).unwrap(),
        &["node-x", "node-a", "node-r"],
        &["node-x"],
    );
    #[rustfmt::skip]
    ring.lab.run(&["cluster", "revoke", "--cluster", "acme", "node-r"]).ok();
    std::fs::create_dir(ring.lab.path("stick")).unwrap();
    std::fs::copy(
        ring.lab.path("acme/revoked.crl"),
        ring.lab.path("stick/revoked.crl"),
    )
    .unwrap();
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--cluster-ca", "acme/ca.pem", "stick"]).ok();
    for i in 0..3 {
        ring.start(i);
    }
    for (i, name) in ["node-x", "node-a", "node-r"].iter().enumerate() {
        ring.wait_for_order(i, &[name]);
    }
    // Long enough for many announcements and connection attempts.
    std::thread::sleep(Duration::from_secs(5));
    for (i, name) in ["node-x", "node-a", "node-r"].iter().enumerate() {
        let status = ring.status(i).unwrap();
        let members: Vec<&str> = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert_eq!(
            members,
            [*name],
            "{name} stays alone: {status}\n{}",
            ring.logs()
        );
    }
    assert!(
        ring.metric(1, "sovereign_ring_connections_refused_total")
            + ring.metric(1, "sovereign_ring_announcements_refused_total")
            > 0,
        "node-a counted the refusals"
    );
    let answer = ring.ask(1, 16, 1, 0.0);
    assert!(!answer.is_empty(), "node-a still serves alone");
}
