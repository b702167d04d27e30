//! A ring of enrolled nodes started the documented way (`sovereign node
//! run`) in network namespaces cabled like Thunderbolt (veth pairs, IPv6
//! link-local only), and what tests ask of it: `sovereign ring status`, the
//! official `openai` client in a node's namespace, metrics, logs.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sovereign_vm_tests::netns::{NsProcess, RingNet};

use super::{python_with_openai, Lab};

pub const KEY: &str = "sk-ring-test";
pub const WAIT: Duration = Duration::from_secs(120);
pub const PROMPT: &str = "Write a long story about a lighthouse keeper and a storm.";

/// A cluster CA, enrolled nodes with the demo model in their stores, and the
/// namespaces they run in.
pub struct Cluster {
    pub lab: Lab,
    pub net: RingNet,
    pub names: Vec<String>,
    running: Vec<Option<NsProcess>>,
}

impl Cluster {
    /// `names.len()` enrolled nodes of cluster `acme` cabled by `net`, each
    /// store holding the demo model (`foreign` nodes are enrolled in a second,
    /// foreign cluster).
    pub fn new(net: RingNet, names: &[&str], foreign: &[&str]) -> Cluster {
        Self::with_model_on(net, names, foreign, names)
    }

    /// As [`Cluster::new`], but only the stores of `holders` hold the demo
    /// model; every other store is an empty directory (the nodes run with
    /// `--trust node.trust`, as on the image).
    pub fn with_model_on(
        net: RingNet,
        names: &[&str],
        foreign: &[&str],
        holders: &[&str],
    ) -> Cluster {
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
            if holders.contains(name) {
                #[rustfmt::skip]
                lab.run(&["import", "--store", &store, "--trust", "node.trust", "smollm2-1.0.0.sovb"]).ok();
            } else {
                // As on a node image: an empty store; the node installs its
                // `--trust` with the first model it receives.
                std::fs::create_dir(lab.path(&store)).unwrap();
            }
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
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// As [`Cluster::start`], with `extra` arguments for `sovereign node run`.
    pub fn start_with(&mut self, i: usize, extra: &[&str]) {
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
            .args(["--heartbeat-ms", "300", "--audit-log", &format!("audit-{name}"), "--trust", "node.trust"])
            .args(extra)
            .env("SOVEREIGN_LOG", "info")
            .current_dir(self.lab.dir.path())
            .stdout(Stdio::null())
            .stderr(log);
        self.running[i] = Some(node.spawn(&mut command).unwrap());
    }

    /// `sovereign serve` (the whole model in one process, the batched
    /// engine: no ring) on node `i`'s store and API address, ready to
    /// answer; it stops when the returned process is dropped.
    pub fn serve_alone(&self, i: usize) -> NsProcess {
        let name = &self.names[i];
        let mut command = self.net.node(i).command(env!("CARGO_BIN_EXE_sovereign"));
        #[rustfmt::skip]
        command
            .args(["serve", "--store", &format!("store-{name}"), "--listen", "127.0.0.1:8080", "--keys", "keys"])
            .current_dir(self.lab.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let serving = self.net.node(i).spawn(&mut command).unwrap();
        let started = Instant::now();
        while self.http_status(i, "/v1/models") != 200 {
            assert!(started.elapsed() < WAIT, "sovereign serve never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
        serving
    }

    /// The audit records of `node` of `service`/`kind`, as JSON.
    pub fn audited(&self, node: &str, service: &str, kind: &str) -> Vec<Value> {
        let shown = self
            .lab
            .run(&["audit", "show", "--log", &format!("audit-{node}"), "--json"])
            .ok()
            .stdout;
        shown
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["service"] == service && r["kind"] == kind)
            .collect()
    }

    /// Kills node `i` (SIGKILL: its power cut).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.running[i].take() {
            node.kill().unwrap();
        }
    }

    /// `sovereign ring status --json`, run in node `i`'s namespace.
    pub fn status(&self, i: usize) -> Option<Value> {
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
    pub fn order(&self, i: usize) -> Vec<String> {
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
    pub fn wait_for_order(&self, i: usize, order: &[&str]) -> Value {
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
    pub fn stream(&self, i: usize, max_tokens: u32, seed: u64, temperature: f32) -> Stream {
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
    pub fn ask(&self, i: usize, max_tokens: u32, seed: u64, temperature: f32) -> String {
        let mut stream = self.stream(i, max_tokens, seed, temperature);
        stream.finish(self)
    }

    /// A Prometheus counter from node `i`'s `/metrics`.
    pub fn metric(&self, i: usize, name: &str) -> u64 {
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

    /// The HTTP status node `i`'s API gives `GET path` with the key (0 when
    /// nothing answers).
    pub fn http_status(&self, i: usize, path: &str) -> u16 {
        let out = self
            .net
            .node(i)
            .command("python3")
            .args(["-c", "import sys, urllib.request as u, urllib.error as e\ntry:\n    print(u.urlopen(u.Request('http://127.0.0.1:8080' + sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})).status)\nexcept e.HTTPError as err:\n    print(err.code)\nexcept OSError:\n    print(0)", path, KEY])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no HTTP status from node {}: {out:?}", self.names[i]))
    }

    /// Node `i`'s API's answer to `POST path` with the key and `body` (JSON):
    /// the status and the body, as JSON when it is.
    pub fn post(&self, i: usize, path: &str, body: &Value) -> (u16, Value) {
        let out = self.post_command(i, path, body).output().unwrap();
        answer_of(&self.names[i], &out)
    }

    /// [`Cluster::post`] running in the background: [`answer`] waits for it.
    pub fn post_in_background(&self, i: usize, path: &str, body: &Value) -> Child {
        self.post_command(i, path, body)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn post_command(&self, i: usize, path: &str, body: &Value) -> Command {
        let script = "import sys, urllib.request as u, urllib.error as e\n\
            r = u.Request('http://127.0.0.1:8080' + sys.argv[1], data=sys.argv[3].encode(), \
            headers={'Authorization': 'Bearer ' + sys.argv[2], 'Content-Type': 'application/json'})\n\
            try:\n    res = u.urlopen(r, timeout=600)\nexcept e.HTTPError as err:\n    res = err\n\
            print(res.status)\nprint(res.read().decode())";
        let mut command = self.net.node(i).command("python3");
        command.args(["-c", script, path, KEY, &body.to_string()]);
        command
    }

    /// The tail of every node's log.
    pub fn logs(&self) -> String {
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
pub struct Stream {
    child: std::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
    text: String,
}

impl Stream {
    /// Reads `n` more pieces.
    pub fn pieces(&mut self, n: usize, cluster: &Cluster) {
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
    pub fn finish(&mut self, cluster: &Cluster) -> String {
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

/// The status and body of a [`Cluster::post_in_background`] once it is done.
pub fn answer(child: Child) -> (u16, Value) {
    let out = child.wait_with_output().unwrap();
    answer_of("a node", &out)
}

fn answer_of(node: &str, out: &Output) -> (u16, Value) {
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, body) = text
        .split_once('\n')
        .unwrap_or_else(|| panic!("no answer from {node}: {out:?}"));
    let status = status.trim().parse().unwrap();
    let body = serde_json::from_str(body.trim()).unwrap_or(Value::String(body.into()));
    (status, body)
}
