//! Scenario (issue 11): three flashed node images booted as VMs (TCG, one
//! vCPU each) and cabled in a closed ring of point-to-point links. With no
//! address configured they find each other; a stick plugged into one node
//! puts the model live on all three, each verifying it; every node answers
//! with exactly the tokens one node gives; a cable pulled mid-answer changes
//! nothing for the client; a node powered off mid-answer costs a replay, not
//! the answer, and the ring re-forms when it comes back. Nothing leaves a
//! node toward a sink host the test cables to it, though the same attempts
//! reach the sink once the firewall is flushed; a revoked node cabled into
//! the ring is refused and audited by its neighbours; and a node powered off
//! hard mid-import, with audit appends in flight, comes back with a whole
//! model and an audit log that verifies and extends what it had certified.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sovereign_vm_tests::{Boot, Link, Machine, MachineConfig, Sink, SinkCounts};

mod support;
use support::{courier_folders, operator_kit, run, stick, wait_for_couriers, Kit, API_KEY, NODES};

const PROMPT: &str = "The capital of France is";

/// Prints a progress line: seconds since `$started`, then the message.
macro_rules! progress {
    ($started:expr, $($arg:tt)*) => {
        eprintln!("[{:7.1} s] {}", $started.elapsed().as_secs_f64(), format!($($arg)*))
    };
}
const WAIT: Duration = Duration::from_secs(60);

/// The guests' CPU model. Under TCG the engine's portable kernels on
/// `qemu64` decode 2.6 times faster than its AVX2 kernels on `-cpu max`
/// (TCG emulates AVX2 instruction by instruction; BENCHMARKS.md).
const GUEST_CPU: &str = "qemu64";

/// One node of the booted ring and how the LAN stand-in reaches its API.
struct Node {
    name: &'static str,
    machine: Machine,
    port: u16,
}

/// The host side of the office LAN: `sovereign ring status` and curl,
/// trusting only the cluster CA.
struct Lan<'a> {
    kit: &'a Kit,
    key_file: PathBuf,
}

impl Lan<'_> {
    /// The node's `/health` as `sovereign ring status --json` shows it.
    fn status(&self, node: &Node) -> Option<Value> {
        let output = Command::new(&self.kit.sovereign)
            .args(["ring", "status", "--json", "--api"])
            .arg(format!("https://127.0.0.1:{}", node.port))
            .arg("--cacert")
            .arg(self.kit.path("cluster/ca.pem"))
            .arg("--key-file")
            .arg(&self.key_file)
            .output()
            .ok()?;
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Waits until `check` holds for the node's status; returns that status.
    fn wait_for(&self, node: &mut Node, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.status(node);
            if let Some(status) = status.as_ref().filter(|s| check(s)) {
                return status.clone();
            }
            if Instant::now() > deadline {
                let journal = node
                    .machine
                    .succeed(
                        "journalctl -b -u sovereign-api.service --no-pager -o cat | tail -30",
                        WAIT,
                    )
                    .unwrap_or_default();
                panic!("{}: never {what}: {status:?}\n{journal}", node.name);
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// curl against the node's API with the operator's key.
    fn curl(&self, node: &Node) -> Command {
        let mut curl = Command::new("curl");
        curl.args(["--silent", "--show-error", "--no-buffer", "--cacert"])
            .arg(self.kit.path("cluster/ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {API_KEY}")])
            .args(["-H", "Content-Type: application/json"])
            .arg(format!("https://127.0.0.1:{}/v1/completions", node.port));
        curl
    }

    /// A greedy streamed completion of [`PROMPT`], read as it arrives.
    fn stream(&self, node: &Node, max_tokens: u32) -> Stream {
        let body = serde_json::json!({
            "model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "stream": true,
        });
        let mut child = self
            .curl(node)
            .args(["--max-time", "1200", "-d", &body.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, pieces) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    break;
                }
                let piece = serde_json::from_str::<Value>(data)
                    .map(|v| match v["choices"][0]["text"].as_str() {
                        Some(text) => Ok(text.to_owned()),
                        None => Err(data.to_owned()),
                    })
                    .unwrap_or_else(|_| Err(data.to_owned()));
                if tx.send(piece).is_err() {
                    break;
                }
            }
        });
        Stream {
            child,
            pieces,
            text: String::new(),
        }
    }
}

/// A streamed answer in flight.
struct Stream {
    child: Child,
    pieces: mpsc::Receiver<Result<String, String>>,
    text: String,
}

impl Stream {
    /// Waits for the first streamed piece (the answer is under way).
    fn wait_for_first_piece(&mut self) {
        let piece = self
            .pieces
            .recv_timeout(Duration::from_secs(900))
            .expect("a first piece");
        self.text.push_str(&piece.unwrap_or_else(|e| panic!("{e}")));
    }

    /// Asserts the answer is still streaming (what an event "mid-answer"
    /// needs), keeping the pieces that arrived so far.
    fn assert_in_flight(&mut self, event: &str) {
        loop {
            match self.pieces.try_recv() {
                Ok(piece) => self.text.push_str(&piece.unwrap_or_else(|e| panic!("{e}"))),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    panic!("the answer {:?} ended before {event}", self.text)
                }
            }
        }
    }

    /// The whole answer, or the error event or cut stream that ended it
    /// (with every node's service log).
    fn finish(mut self, nodes: &mut [Node]) -> String {
        let mut failure = None;
        for piece in self.pieces.iter() {
            match piece {
                Ok(text) => self.text.push_str(&text),
                Err(event) => failure = Some(format!("error event: {event}")),
            }
        }
        let status = self.child.wait().expect("curl");
        if !status.success() {
            failure = Some(format!("curl: {status}"));
        }
        if let Some(failure) = failure {
            panic!("{failure} after {:?}\n{}", self.text, service_logs(nodes));
        }
        self.text
    }
}

/// The last lines of every running node's service log.
fn service_logs(nodes: &mut [Node]) -> String {
    let mut logs = String::new();
    for node in nodes {
        if !node.machine.is_running() {
            continue;
        }
        let journal = node
            .machine
            .succeed(
                "journalctl -b -u sovereign-api.service --no-pager -o short-monotonic | tail -40",
                WAIT,
            )
            .unwrap_or_default();
        logs.push_str(&format!("--- {}\n{journal}\n", node.name));
    }
    logs
}

/// The ring order a node's status shows (empty while it does not serve).
fn order(status: &Value) -> Vec<String> {
    status["ring"]["order"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// Powers the node on.
fn boot(node: &mut Node) {
    node.machine.start().expect("start");
}

/// Waits until the machine's console agent answers and its node service runs.
fn wait_ready(machine: &mut Machine) {
    machine
        .wait_for_console("sovereign-test-agent: ready", Duration::from_secs(900))
        .expect("agent");
    machine
        .wait_for_unit("sovereign-api.service", Duration::from_secs(600))
        .expect("the node service runs");
}

/// Writes `bytes` to `path` in the guest through the console agent (in
/// base64 lines short enough for the console's line discipline).
pub fn put_file(node: &mut Machine, path: &str, bytes: &[u8]) {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    node.succeed(&format!(": > {path}.b64"), Duration::from_secs(60))
        .expect("agent");
    for chunk in encoded.as_bytes().chunks(2048) {
        let chunk = std::str::from_utf8(chunk).expect("base64 is ASCII");
        node.succeed(
            &format!("printf '%s' '{chunk}' >> {path}.b64"),
            Duration::from_secs(60),
        )
        .expect("agent");
    }
    node.succeed(
        &format!("base64 -d {path}.b64 > {path} && rm {path}.b64"),
        Duration::from_secs(60),
    )
    .expect("agent");
}

/// Plugs the courier stick into the node until its stick unit has left
/// the node's checkpoint, copies the stick's folders into `out` and returns
/// what the auditor's `sovereign audit verify` (cluster CA alone) says of
/// the node's folder.
fn courier_visit(kit: &Kit, node: &mut Node, courier: &Path, out: &Path) -> String {
    let plugged = node.machine.attach_stick(courier).expect("plug");
    wait_for_couriers(&mut node.machine, 1, Duration::from_secs(300));
    node.machine.detach_stick(&plugged).expect("unplug");
    kit.verify_audit(&courier_folders(courier, out).join(node.name))
}

/// The demo model file the kit's bundles carry (fetched once per machine).
fn demo_model() -> PathBuf {
    let path = run(&mut Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/fetch-model"
    )));
    PathBuf::from(path.trim())
}

/// The node's firewall drop counter for outgoing packets.
fn egress_drops(machine: &mut Machine) -> u64 {
    let counter = machine
        .succeed("nft list counter inet sovereign egress-drops", WAIT)
        .expect("nft");
    regex::Regex::new(r"packets (\d+)")
        .expect("regex")
        .captures(&counter)
        .and_then(|c| c[1].parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {counter}"))
}

/// Waits until the machine's NIC of link `index` holds the sink network's
/// addresses (the test image configures it: 10.99.0.2, fd99::2); returns
/// the NIC's name.
fn sink_nic(machine: &mut Machine, index: usize) -> String {
    let mac = machine.link_mac(index);
    let found = machine
        .succeed(&format!("grep -l '{mac}' /sys/class/net/*/address"), WAIT)
        .expect("the sink NIC");
    let iface = found
        .trim()
        .strip_prefix("/sys/class/net/")
        .and_then(|p| p.strip_suffix("/address"))
        .unwrap_or_else(|| panic!("no NIC with {mac}: {found}"))
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = machine
            .succeed("cat /proc/net/if_inet6 /proc/net/fib_trie", WAIT)
            .unwrap_or_default();
        if status.contains("10.99.0.2") && status.contains("fd990000000000000000000000000002") {
            return iface;
        }
        assert!(
            Instant::now() < deadline,
            "{iface} never configured: {status}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What one node alone answers: the demo bundle imported into a host store
/// and `sovereign generate`, greedy, on the guests' CPU model (user-mode
/// QEMU, the same TCG), so it runs the kernels the ring runs.
fn one_node_answer(kit: &Kit, dir: &Path, max_tokens: u32) -> String {
    let store = dir.join("reference-store");
    kit.sov(
        dir,
        &[
            "import",
            "--store",
            store.to_str().expect("utf8"),
            "--trust",
            kit.path("node.trust").to_str().expect("utf8"),
            kit.path("good/smollm2-1.0.0.sovb").to_str().expect("utf8"),
        ],
    );
    let text = run(Command::new("qemu-x86_64")
        .args(["-cpu", GUEST_CPU])
        .arg(&kit.sovereign)
        .args([
            "generate",
            "--store",
            store.to_str().expect("utf8"),
            "--model",
            "smollm2",
            "--raw",
            "--prompt",
            PROMPT,
            "--max-tokens",
            &max_tokens.to_string(),
            "--temperature",
            "0",
        ]));
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

#[test]
fn three_cabled_nodes_form_a_ring_share_a_stick_answer_as_one_and_survive_a_pulled_cable_and_a_lost_node(
) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let kit = operator_kit();
    progress!(
        t0,
        "operator: cluster CA, node-a/b/c enrolled, image built and signed, model bundle signed"
    );
    const TOKENS: u32 = 8;
    let reference = one_node_answer(&kit, d, TOKENS);
    assert!(reference.contains("Paris"), "{reference:?}");
    progress!(t0, "one node alone answers {PROMPT:?} with {reference:?}");
    let key_file = d.join("api-key");
    std::fs::write(&key_file, API_KEY).expect("key file");
    let lan = Lan {
        kit: &kit,
        key_file,
    };

    // Three disks, each flashed with its node's enrolled identity; three
    // cables: a-b, b-c, c-a (thunderbolt0 to the next node, thunderbolt1 to
    // the previous one).
    let cables: Vec<Link> = (0..3).map(|_| Link::new().expect("link")).collect();
    // node-a's third NIC: a cable to the sink host of the egress scenario.
    let sink_cable = Link::new().expect("link");
    let mut nodes: Vec<Node> = NODES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let disk = d.join(format!("{name}.img"));
            kit.flash(name, &disk);
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let mut config = MachineConfig::new(name, Boot::Uefi { disk })
                .cpu_model(GUEST_CPU)
                .link(cables[i].ends().0)
                .link(cables[(i + 2) % 3].ends().1)
                .lan_forward(port, 8443);
            if i == 0 {
                config = config.link(sink_cable.ends().0);
            }
            Node {
                name,
                machine: Machine::new(config).expect("machine"),
                port,
            }
        })
        .collect();
    progress!(
        t0,
        "flashed three disks; powering on node-a, node-b, node-c cabled a-b, b-c, c-a"
    );

    // (a) Power on: each boots its verified root and starts the node
    // service; with nothing configured they find each other over the cables.
    let booted = Instant::now();
    nodes.iter_mut().for_each(boot);
    nodes.iter_mut().for_each(|n| wait_ready(&mut n.machine));
    progress!(
        t0,
        "three nodes booted their verified roots to a running node service in {:.1} s",
        booted.elapsed().as_secs_f64()
    );
    let names = |s: &Value| -> Vec<String> {
        let mut names: Vec<String> = s["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    for node in &mut nodes {
        lan.wait_for(node, "saw all three members", |s| names(s) == NODES);
    }
    progress!(
        t0,
        "the ring formed with nothing configured, {:.1} s after power-on",
        booted.elapsed().as_secs_f64()
    );

    // (f) Egress: node-a is cabled to a sink host that only this test
    // reaches. TCP, UDP, DNS, ICMP and ICMPv6 attempts from inside the node
    // all fail and the sink counts nothing; with the ruleset flushed the same
    // attempts reach it (so the sink would have seen them), then the ruleset
    // is loaded again.
    let sink = Sink::start(sink_cable.ends().1).expect("sink");
    let a = &mut nodes[0].machine;
    let iface = sink_nic(a, 2);
    put_file(a, "/run/egress.sh", include_bytes!("support/egress.sh"));
    let dropped = egress_drops(a);
    let attempts = Duration::from_secs(300);
    a.succeed("sh /run/egress.sh", attempts).expect("attempts");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sink.counts(),
        SinkCounts::default(),
        "egress through the firewall"
    );
    assert!(
        egress_drops(a) > dropped,
        "the firewall counted no dropped egress"
    );
    a.succeed("nft flush ruleset && sh /run/egress.sh", attempts)
        .expect("attempts without the firewall");
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = loop {
        let c = sink.counts();
        if [c.tcp, c.udp, c.dns, c.icmp, c.icmpv6]
            .iter()
            .all(|n| *n > 0)
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "anti-test: the sink saw only {c:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ruleset = a
        .succeed(
            "systemctl restart nftables.service && nft list ruleset",
            WAIT,
        )
        .expect("the ruleset loads again");
    assert!(ruleset.contains("egress-drops"), "{ruleset}");
    progress!(
        t0,
        "egress from node-a on {iface}: the sink counted nothing; with the ruleset flushed it counted {open:?}"
    );

    // (b) The stick goes into node-a only; the model goes live on all three,
    // each having verified it, and the 3-node plan forms. The stick also
    // carries the cluster's revocation list (node-d revoked), which the ring
    // passes on like the model.
    let model_stick = stick(
        d,
        "good.img",
        &[
            &kit.path("good/smollm2-1.0.0.sovb"),
            &kit.path("cluster/revoked.crl"),
        ],
    );
    let plugged = Instant::now();
    nodes[0]
        .machine
        .attach_stick(&model_stick)
        .expect("plug the stick");
    progress!(t0, "a stick with the signed model plugged into node-a");
    for node in &mut nodes {
        let status = lan.wait_for(node, "served the 3-node plan", |s| {
            s["ring"]["serving"] == true && order(s).len() == 3
        });
        let mut plan = order(&status);
        plan.sort();
        assert_eq!(plan, NODES, "{status}");
    }
    progress!(
        t0,
        "the model is live on all three and the 3-node plan serves, {:.1} s after the stick",
        plugged.elapsed().as_secs_f64()
    );
    for node in &mut nodes {
        let records = node
            .machine
            .succeed("cat /var/lib/sovereign/audit/records.jsonl", WAIT)
            .expect("audit log");
        assert!(
            records.contains("\"outcome\":\"imported\"") && records.contains("smollm2@1.0.0"),
            "{}: the import is not audited: {records}",
            node.name
        );
        if node.name != "node-a" {
            assert!(
                records.contains("\"replication\"") && records.contains("\"receive\""),
                "{}: the replicated bundle is not audited: {records}",
                node.name
            );
        }
    }
    progress!(t0, "every node verified the model itself and audited it");

    // (c) Any node's API answers exactly what one node alone answers.
    for i in 0..nodes.len() {
        let asked = Instant::now();
        let answer = lan.stream(&nodes[i], TOKENS).finish(&mut nodes);
        progress!(
            t0,
            "{} answered {answer:?} in {:.1} s",
            nodes[i].name,
            asked.elapsed().as_secs_f64()
        );
        assert_eq!(answer, reference, "{}", nodes[i].name);
    }

    // (d) A cable of the closed ring pulled mid-answer: nothing changes for
    // the client (the ring routes around it); then plugged back.
    let mut stream = lan.stream(&nodes[1], TOKENS);
    stream.wait_for_first_piece();
    nodes[0].machine.set_link(0, false).expect("pull a-b");
    stream.assert_in_flight("the cable was pulled");
    progress!(t0, "pulled the a-b cable while node-b answers");
    let answer = stream.finish(&mut nodes);
    progress!(t0, "node-b answered {answer:?} across the pulled cable");
    assert_eq!(answer, reference, "across a pulled cable");
    nodes[0].machine.set_link(0, true).expect("plug a-b back");

    // A middle node powered off hard mid-answer: the entry replays what
    // the lost stages held, the answer completes with the same tokens, and
    // the plan drops to the two live nodes.
    let mut stream = lan.stream(&nodes[0], TOKENS);
    stream.wait_for_first_piece();
    let lost = Instant::now();
    nodes[1].machine.crash().expect("power off node-b");
    stream.assert_in_flight("node-b was powered off");
    progress!(t0, "powered node-b off hard while node-a answers");
    let answer = stream.finish(&mut nodes);
    progress!(t0, "node-a answered {answer:?} across the lost node");
    assert_eq!(answer, reference, "across a lost node");
    let status = lan.wait_for(&mut nodes[0], "served a 2-node plan", |s| {
        s["ring"]["serving"] == true && order(s).len() == 2
    });
    assert!(!order(&status).contains(&"node-b".to_owned()), "{status}");
    progress!(
        t0,
        "the 2-node plan serves {:.1} s after node-b was lost",
        lost.elapsed().as_secs_f64()
    );
    let answer = lan.stream(&nodes[2], TOKENS).finish(&mut nodes);
    assert_eq!(answer, reference, "on the 2-node plan");

    // (g) node-d, enrolled in this cluster but revoked, cabled in node-b's
    // place: node-a and node-c refuse it and audit the refusal.
    let rogue_disk = d.join("node-d.img");
    kit.flash("node-d", &rogue_disk);
    let mut rogue = Machine::new(
        MachineConfig::new("node-d", Boot::Uefi { disk: rogue_disk })
            .cpu_model(GUEST_CPU)
            .link(cables[1].ends().0)
            .link(cables[0].ends().1),
    )
    .expect("machine");
    rogue.start().expect("start");
    wait_ready(&mut rogue);
    for node in [0, 2] {
        let deadline = Instant::now() + Duration::from_secs(600);
        let refused = loop {
            let refused = nodes[node]
                .machine
                .succeed(
                    "grep ring-refused /var/lib/sovereign/audit/records.jsonl | grep node-d; true",
                    WAIT,
                )
                .expect("audit log");
            if !refused.trim().is_empty() {
                break refused;
            }
            if Instant::now() > deadline {
                let name = nodes[node].name;
                panic!(
                    "{name}: no audited refusal of node-d\n{}",
                    service_logs(&mut nodes)
                );
            }
            std::thread::sleep(Duration::from_secs(3));
        };
        assert!(refused.contains("revoked"), "{refused}");
        let status = lan.status(&nodes[node]).expect("status");
        assert!(!names(&status).contains(&"node-d".to_owned()), "{status}");
    }
    rogue.crash().expect("power off node-d");
    drop(rogue);
    progress!(
        t0,
        "revoked node-d cabled in node-b's place: refused and audited by node-a and node-c"
    );

    // node-b powered on again: it rejoins and the 3-node plan returns.
    let back = Instant::now();
    boot(&mut nodes[1]);
    wait_ready(&mut nodes[1].machine);
    for node in &mut nodes {
        lan.wait_for(node, "served the 3-node plan again", |s| {
            s["ring"]["serving"] == true && order(s).len() == 3
        });
    }
    progress!(
        t0,
        "node-b powered on again: the 3-node plan serves {:.1} s later",
        back.elapsed().as_secs_f64()
    );
    let answer = lan.stream(&nodes[1], TOKENS).finish(&mut nodes);
    assert_eq!(answer, reference, "node-b after its return");

    // The auditor's courier: an empty stick plugged into node-c comes back
    // with its signed checkpoint, verified on the host with the cluster CA
    // alone, and with every other member's, gathered over the ring.
    let courier = stick(d, "courier.img", &[]);
    let verified = courier_visit(&kit, &mut nodes[2], &courier, &d.join("courier"));
    assert!(
        verified.contains("ok: courier checkpoint") && verified.contains("of node node-c"),
        "{verified}"
    );
    for member in ["node-a", "node-b"] {
        let carried = kit.verify_audit(&d.join("courier/sovereign-audit").join(member));
        assert!(
            carried.contains("ok: courier checkpoint")
                && carried.contains(&format!("of node {member}")),
            "{member}'s folder on the stick node-c saw: {carried}"
        );
    }
    progress!(
        t0,
        "node-c's audit courier (and node-a's and node-b's, over the ring) verified with the cluster CA alone: {}",
        verified.trim()
    );

    // (e) node-c powered off hard in the middle of importing 1.1.0 from a
    // stick, with audit appends in flight: the moment a model file in the
    // store's staging area passes 8 MiB, the kernel resets the machine without
    // syncing (sysrq b; QEMU exits, `-no-reboot`).
    let c = &mut nodes[2].machine;
    let counted = "grep -c drop-counters /var/lib/sovereign/audit/records.jsonl; true";
    let appended = |c: &mut Machine| -> u64 {
        let count = c.succeed(counted, WAIT).expect("audit log");
        count.trim().parse().unwrap_or(0)
    };
    let before = appended(c);
    c.succeed(
        "setsid sh -c 'while :; do sovereign-auditctl --socket /run/sovereign-audit/audit.sock \
         firewall-counters --nft /usr/sbin/nft; done' </dev/null >/dev/null 2>&1 &",
        WAIT,
    )
    .expect("audit appends");
    c.succeed(
        "setsid sh -c 'until find /var/lib/sovereign/store/staging -type f -size +8M | grep -q .; \
         do sleep 0.05; done; echo sovereign-test: power cut mid-import > /dev/ttyS0; \
         echo b > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1 &",
        WAIT,
    )
    .expect("power cut trigger");
    let deadline = Instant::now() + Duration::from_secs(300);
    while appended(c) < before + 2 {
        assert!(Instant::now() < deadline, "the audit appends never started");
        std::thread::sleep(Duration::from_secs(1));
    }
    let upgrade = stick(d, "upgrade.img", &[&kit.path("good/smollm2-1.1.0.sovb")]);
    c.attach_stick(&upgrade).expect("plug");
    c.wait_for_shutdown(Duration::from_secs(900))
        .expect("the power cut");
    assert!(
        c.console_text().contains("power cut mid-import"),
        "node-c went down, but not by the power cut mid-import"
    );
    progress!(
        t0,
        "node-c powered off hard mid-import with audit appends in flight"
    );
    boot(&mut nodes[2]);
    wait_ready(&mut nodes[2].machine);
    for node in &mut nodes {
        lan.wait_for(node, "served the 3-node plan after the power cut", |s| {
            s["ring"]["serving"] == true && order(s).len() == 3
        });
    }
    // The store holds whole models only: 1.0.0, and 1.1.0 at most if its
    // commit came first; every file is the model's exact bytes.
    let model_hash = run(Command::new("sha256sum").arg(demo_model()));
    let model_hash = model_hash.split_whitespace().next().expect("hash");
    let c = &mut nodes[2].machine;
    let held = c
        .succeed(
            "cd /var/lib/sovereign/store/models/smollm2 && for v in *; do \
             echo \"$v $(cat $v/files/* | sha256sum | cut -d' ' -f1)\"; done",
            WAIT,
        )
        .expect("store");
    let versions: Vec<(&str, &str)> = held.lines().filter_map(|l| l.split_once(' ')).collect();
    assert!(versions.iter().any(|(v, _)| *v == "1.0.0"), "{held}");
    for (version, hash) in &versions {
        assert_eq!(*hash, model_hash, "smollm2 {version} is not whole: {held}");
    }
    // The audit log verifies as a whole against the cluster CA, and extends
    // the checkpoint the courier stick carried away before the power cut.
    let verified = courier_visit(&kit, &mut nodes[2], &courier, &d.join("courier-after"));
    assert!(verified.contains("extends the previous one"), "{verified}");
    let archive = nodes[2]
        .machine
        .succeed(
            // Checkpoints before records: every checkpoint copied covers
            // records that are in the copy (the log only grows).
            "mkdir -p /run/audit-copy/audit && cd /var/lib/sovereign/audit && \
             cp node node.pub checkpoints.jsonl /run/audit-copy/audit/ && \
             cp records.jsonl /run/audit-copy/audit/ && \
             tar -C /run/audit-copy -czf - audit | base64 -w0",
            WAIT,
        )
        .expect("audit log");
    let log = d.join("node-c-audit.tar.gz");
    {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(archive.trim())
            .expect("base64");
        std::fs::write(&log, bytes).expect("archive");
    }
    run(Command::new("tar").arg("-C").arg(d).arg("-xzf").arg(&log));
    let whole = kit.verify_audit(&d.join("audit"));
    progress!(
        t0,
        "after the power cut node-c holds {} whole, its audit log verifies ({}) and extends its last courier checkpoint",
        versions.iter().map(|(v, _)| *v).collect::<Vec<_>>().join(" and "),
        whole.trim()
    );

    for node in &mut nodes {
        let status = node
            .machine
            .shutdown(Duration::from_secs(180))
            .expect("powers off");
        assert!(status.success(), "{}: {status}", node.name);
    }
    progress!(t0, "three nodes powered off cleanly");
}
