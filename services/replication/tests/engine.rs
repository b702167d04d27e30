//! The replication engine between nodes in one process, wired by channels in
//! place of the ring (whose own tests cover the links): real spools, real
//! stores, the real import, real audit logs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sovereign_replication::{
    run, Config, Incoming, ItemMeta, Kind, Message, Outgoing, Peers, Spool, Status, Verdict,
};
use sovereign_signing::{create_bundle, sign_bundle, BundleSpec, SigningKey, Trust, TrustFile};
use sovereign_store::{live_models, ImportOptions, Store};
use tokio::sync::{mpsc, watch};

struct Keys {
    key: SigningKey,
    trust: PathBuf,
}

fn keys(dir: &Path) -> Keys {
    let key = SigningKey::from_seed(&[7; 32]);
    let trust = TrustFile::new(Trust::new(1, 1, vec![key.public_key()]).unwrap());
    let path = dir.join("node.trust");
    fs::write(&path, trust.to_text()).unwrap();
    Keys { key, trust: path }
}

/// A signed bundle of `size` pseudo-random bytes in `dir/out/`.
fn bundle(dir: &Path, keys: &Keys, name: &str, version: &str, size: usize) -> PathBuf {
    let model = dir.join(format!("src-{name}-{version}"));
    fs::create_dir_all(&model).unwrap();
    let mut content = Vec::with_capacity(size);
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ size as u64;
    while content.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        content.extend_from_slice(&x.to_le_bytes());
    }
    content.truncate(size);
    fs::write(model.join("weights.bin"), &content).unwrap();
    let out_dir = dir.join(format!("out-{name}-{version}"));
    fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{name}-{version}.sovb"));
    let spec = BundleSpec {
        name: name.into(),
        version: version.parse().unwrap(),
        inputs: vec![model],
        recipients: Vec::new(),
        part_size: sovereign_signing::DEFAULT_PART_SIZE,
        segment_size: sovereign_signing::DEFAULT_SEGMENT_SIZE,
    };
    create_bundle(&spec, &out).unwrap();
    sign_bundle(&out, &keys.key).unwrap();
    out
}

/// The store exists with the operator's trust before the node runs (waiting
/// for a stopped engine's import, which lets go of the store as it stops).
fn install_trust(store: &Path, keys: &Keys) {
    let empty = store.with_extension("empty");
    fs::create_dir_all(&empty).unwrap();
    let options = ImportOptions {
        trust: Some(&keys.trust),
        ..ImportOptions::default()
    };
    Store::open_waiting(store, Duration::from_secs(60))
        .unwrap()
        .import_path(&empty, &options)
        .unwrap();
}

/// Imports as `sovereign import --store` does: waiting for the store while
/// the node's engine imports something it received.
fn import_into(store: &Path, bundle: &Path, keys: &Keys, allow_downgrade: bool) {
    let store = Store::open_waiting(store, Duration::from_secs(60)).unwrap();
    let outbox = store.outbox();
    let options = ImportOptions {
        trust: Some(&keys.trust),
        allow_downgrade,
        outbox: outbox.as_deref(),
        ..ImportOptions::default()
    };
    store.import_bundle(bundle, &options).unwrap();
}

struct Node {
    name: String,
    dir: PathBuf,
    store: PathBuf,
    audit: Arc<sovereign_audit::AuditLog>,
    status: watch::Receiver<Status>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    fn audit_text(&self) -> String {
        let mut text = String::new();
        for entry in fs::read_dir(self.audit.dir()).unwrap() {
            if let Ok(t) = fs::read_to_string(entry.unwrap().path()) {
                text.push_str(&t);
            }
        }
        text
    }

    fn live(&self) -> Vec<String> {
        live_models(&self.store)
            .unwrap()
            .into_iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect()
    }

    /// Imports as `sovereign import --store` does on a node that replicates.
    fn import(&self, bundle: &Path, keys: &Keys, allow_downgrade: bool) {
        import_into(&self.store, bundle, keys, allow_downgrade);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

/// Which messages pass, and a log of the fetches that did.
struct Wire {
    /// Chunks from this offset on are lost, as if the cable were pulled
    /// there: the transfer stalls at a known byte however fast it runs.
    cut: AtomicU64,
    fetches: Mutex<Vec<(String, u64)>>,
    chunk_bytes: Mutex<u64>,
}

impl Wire {
    fn new() -> Self {
        Self {
            cut: AtomicU64::new(u64::MAX),
            fetches: Mutex::default(),
            chunk_bytes: Mutex::default(),
        }
    }

    /// The offsets `node` asked for, in order.
    fn asked_by(&self, node: &str) -> Vec<u64> {
        let fetches = self.fetches.lock().unwrap();
        fetches
            .iter()
            .filter(|(from, _)| from == node)
            .map(|(_, offset)| *offset)
            .collect()
    }
}

/// The nodes' inbound senders, by name, and the wire between all of them.
struct Ring {
    inboxes: Arc<Mutex<BTreeMap<String, mpsc::Sender<Incoming>>>>,
    wire: Arc<Wire>,
    peers: watch::Sender<Peers>,
}

impl Ring {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            // A failing test prints the engines' story (captured otherwise).
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sovereign_replication=info".into()),
            )
            .with_test_writer()
            .try_init();
        Self {
            inboxes: Arc::default(),
            wire: Arc::new(Wire::new()),
            peers: watch::Sender::new(Peers::new()),
        }
    }

    /// Starts a node's engine on `dir` (store `dir/store`, spool `dir/spool`).
    fn start(&self, keys: &Keys, name: &str, dir: &Path, capacity: u64, window: usize) -> Node {
        self.start_with(keys, name, dir, capacity, window, |_| {})
    }

    /// [`Ring::start`], with `tweak` applied to the engine's configuration.
    fn start_with(
        &self,
        keys: &Keys,
        name: &str,
        dir: &Path,
        capacity: u64,
        window: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> Node {
        let store = dir.join("store");
        install_trust(&store, keys);
        let audit = Arc::new(sovereign_audit::AuditLog::open(&dir.join("audit"), name).unwrap());
        let mut config = Config::new(name, &store, &dir.join("spool"), capacity);
        config.audit = Some(Arc::new(sovereign_audit::Auditor::Local(audit.clone())));
        config.chunk = 64 * 1024;
        config.window = window;
        config.stall = Duration::from_millis(300);
        config.tick = Duration::from_millis(100);
        tweak(&mut config);
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(64);
        self.inboxes.lock().unwrap().insert(name.to_owned(), in_tx);
        let inboxes = self.inboxes.clone();
        let wire = self.wire.clone();
        let from = name.to_owned();
        tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                match Message::decode(&out.payload).unwrap() {
                    Message::Fetch { offset, .. } => {
                        wire.fetches.lock().unwrap().push((from.clone(), offset))
                    }
                    Message::Chunk { offset, .. } if offset >= wire.cut.load(Ordering::SeqCst) => {
                        continue
                    }
                    Message::Chunk { data, .. } => {
                        *wire.chunk_bytes.lock().unwrap() += data.len() as u64
                    }
                    _ => {}
                }
                let inbox = inboxes.lock().unwrap().get(&out.to).cloned();
                if let Some(inbox) = inbox {
                    let _ = inbox
                        .send(Incoming {
                            from: from.clone(),
                            payload: out.payload,
                        })
                        .await;
                }
            }
        });
        let (status_tx, status) = watch::channel(Status::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let peers = self.peers.subscribe();
        let task = tokio::spawn(async move {
            run(config, in_rx, out_tx, peers, status_tx, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
        let node = Node {
            name: name.to_owned(),
            dir: dir.to_owned(),
            store,
            audit,
            status,
            stop: Some(stop_tx),
            task,
        };
        self.advertise(&[&node]);
        node
    }

    /// Publishes what each node holds, as the ring's adverts would.
    fn advertise(&self, nodes: &[&Node]) {
        self.peers.send_modify(|peers| {
            for node in nodes {
                let models = sovereign_replication::held_models(&node.store);
                peers.insert(node.name.clone(), models);
            }
        });
    }
}

/// Polls `check` (advertising `nodes` meanwhile) until it holds, for at most 60 s.
async fn until(ring: &Ring, nodes: &[&Node], what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..600 {
        if check() {
            return;
        }
        ring.advertise(nodes);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_imported_on_one_node_goes_live_on_the_others_and_leaves_the_spools() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 4);
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 4);
    let c = ring.start(&keys, "c", &tmp.path().join("c"), 1 << 30, 4);
    let path = bundle(tmp.path(), &keys, "alpha", "1.0.0", 700_000);
    a.import(&path, &keys, false);
    let nodes = [&a, &b, &c];
    until(&ring, &nodes, "alpha on b and c", || {
        b.live() == ["alpha@1.0.0"] && c.live() == ["alpha@1.0.0"]
    })
    .await;
    let source = fs::read(tmp.path().join("src-alpha-1.0.0/weights.bin")).unwrap();
    for node in [&b, &c] {
        let model = sovereign_store::live_model(&node.store, "alpha").unwrap();
        assert_eq!(fs::read(model.dir.join("weights.bin")).unwrap(), source);
        assert!(node.audit_text().contains("\"outcome\":\"imported\""));
    }
    // Once every node advertises it, no spool keeps it.
    until(&ring, &nodes, "empty spools", || {
        nodes.iter().all(|n| spools_only_trust(n))
    })
    .await;
    for node in [a, b, c] {
        node.stop().await;
    }
}

/// Leaves `bytes` as bundle `file` of `id` where `node` passes bundles on,
/// as the store's import does: written aside, then renamed into place.
fn pass_on(node: &Node, id: &str, file: &str, bytes: &[u8]) {
    let outbox = node.store.join(sovereign_store::OUTBOX);
    let aside = outbox.join(format!(".{id}.tmp"));
    fs::create_dir_all(&aside).unwrap();
    fs::write(aside.join(file), bytes).unwrap();
    fs::rename(&aside, outbox.join(id)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_from_a_peer_is_refused_and_audited_by_the_receiver() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 4);
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 4);
    let path = bundle(tmp.path(), &keys, "alpha", "1.0.0", 300_000);
    // A's copy to pass on is corrupted after its own import verified it.
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 1;
    pass_on(&a, "alpha@1.0.0", "alpha-1.0.0.sovb", &bytes);
    let nodes = [&a, &b];
    until(&ring, &nodes, "b's refusal", || {
        a.status.borrow().refusals.iter().any(|r| r.node == "b")
    })
    .await;
    let refusal = a.status.borrow().refusals[0].clone();
    assert!(refusal.reason.contains("weights.bin"), "{}", refusal.reason);
    assert!(b.live().is_empty());
    let audit = b.audit_text();
    assert!(audit.contains("\"outcome\":\"rejected\""), "{audit}");
    assert!(audit.contains("\"kind\":\"refused\""), "{audit}");
    assert!(audit.contains("\"from\":\"a\""), "{audit}");
    assert!(spools_only_trust(&b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_bundle_is_refused_from_its_header_before_the_rest_is_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 1);
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 1);
    // Signed by a key no node trusts, put where a passes bundles on.
    let stranger = Keys {
        key: SigningKey::from_seed(&[9; 32]),
        trust: keys.trust.clone(),
    };
    let path = bundle(tmp.path(), &stranger, "alpha", "1.0.0", 24 << 20);
    pass_on(
        &a,
        "alpha@1.0.0",
        "alpha-1.0.0.sovb",
        &fs::read(&path).unwrap(),
    );
    // Only the first MiB ever passes: the transfer cannot complete.
    ring.wire.cut.store(1 << 20, Ordering::SeqCst);
    let nodes = [&a, &b];
    until(&ring, &nodes, "b's refusal", || {
        a.status.borrow().refusals.iter().any(|r| r.node == "b")
    })
    .await;
    let refusal = a.status.borrow().refusals[0].clone();
    assert!(refusal.reason.contains("signature"), "{}", refusal.reason);
    assert!(b.audit_text().contains("\"kind\":\"refused\""));
    // Nothing of it stays on b, and b stopped asking for the rest.
    let spool = Spool::open(&b.dir.join("spool"), 1).unwrap();
    assert!(spool.partial().unwrap().is_empty());
    until(&ring, &nodes, "no transfer on b", || {
        b.status.borrow().transfers.is_empty()
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Waits until `node`'s transfer stalls at or past `cut` (it asks twice in a
/// row from one offset there: asking again after a stall) and returns where.
async fn stalled_past(ring: &Ring, nodes: &[&Node], node: &str, cut: u64) -> u64 {
    let mut at = None;
    until(ring, nodes, "a stalled transfer asking again", || {
        at = ring
            .wire
            .asked_by(node)
            .windows(2)
            .rev()
            .find(|w| w[0] == w[1] && w[0] >= cut)
            .map(|w| w[0]);
        at.is_some()
    })
    .await;
    at.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_resumes_after_a_pulled_cable_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 1);
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 1);
    let size = 24 << 20;
    let path = bundle(tmp.path(), &keys, "alpha", "1.0.0", size);
    // The cable is pulled once 4 MiB have passed.
    ring.wire.cut.store(4 << 20, Ordering::SeqCst);
    a.import(&path, &keys, false);
    let nodes = [&a, &b];
    let spool = Spool::open(&b.dir.join("spool"), 1).unwrap();
    let received = || {
        let meta = spool.partial().unwrap().first().cloned().unwrap();
        (spool.received(&meta).unwrap(), meta)
    };
    let at_cut = stalled_past(&ring, &nodes, "b", 4 << 20).await;
    let (spooled, meta) = received();
    assert_eq!(spooled, at_cut, "b asks again from its spool's length");
    // The cable is back (until 8 MiB): the transfer goes on from there.
    ring.wire.cut.store(8 << 20, Ordering::SeqCst);
    let at_reboot = stalled_past(&ring, &nodes, "b", 8 << 20).await;
    let asked = ring.wire.asked_by("b");
    assert!(
        asked.windows(2).all(|w| w[0] <= w[1]),
        "never asks from an earlier offset: {asked:?}"
    );
    assert!(asked.contains(&at_cut) && asked.iter().any(|o| *o > at_cut));
    // Reboot b mid-transfer: the new engine resumes from its spool.
    let b_dir = b.dir.clone();
    b.stop().await;
    assert_eq!(received().0, at_reboot);
    assert!(at_reboot < meta.total());
    let asked_before = ring.wire.asked_by("b").len();
    let b = ring.start(&keys, "b", &b_dir, 1 << 30, 1);
    ring.wire.cut.store(u64::MAX, Ordering::SeqCst);
    let nodes = [&a, &b];
    until(&ring, &nodes, "alpha on b", || b.live() == ["alpha@1.0.0"]).await;
    assert_eq!(
        ring.wire.asked_by("b")[asked_before],
        at_reboot,
        "resumed from the spool after a restart"
    );
    assert!(
        *ring.wire.chunk_bytes.lock().unwrap() < meta.total() + (2 << 20),
        "no restart from byte 0"
    );
    a.stop().await;
    b.stop().await;
}

/// Whether `node`'s spool holds no complete item but trust files.
fn spools_only_trust(node: &Node) -> bool {
    let spool = Spool::open(&node.dir.join("spool"), 1).unwrap();
    spool
        .complete()
        .unwrap()
        .iter()
        .all(|m| m.kind == Kind::Trust)
}

/// Bytes of `file` in any import's staging directory of `store`.
fn staged(store: &Path, file: &str) -> u64 {
    let Ok(entries) = fs::read_dir(store.join("staging")) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| fs::metadata(e.path().join("files").join(file)).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_verifies_while_it_receives_and_lets_go_of_its_store_when_the_cable_stays_pulled(
) {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 1);
    let idle = Duration::from_secs(3);
    let b = ring.start_with(&keys, "b", &tmp.path().join("b"), 1 << 30, 1, |config| {
        config.import_idle = idle;
    });
    let path = bundle(tmp.path(), &keys, "alpha", "1.0.0", 24 << 20);
    // The cable is pulled once 12 MiB have passed: the transfer cannot end.
    ring.wire.cut.store(12 << 20, Ordering::SeqCst);
    a.import(&path, &keys, false);
    let nodes = [&a, &b];
    // b's import has hashed and written model bytes before the last one
    // arrived: it reads the spool as it fills.
    until(
        &ring,
        &nodes,
        "model bytes staged during the transfer",
        || staged(&b.store, "weights.bin") >= 4 << 20,
    )
    .await;
    assert!(b.live().is_empty());
    assert!(spools_only_trust(&b));
    // Nothing arrives for `idle`: the import lets go of the store (a stick
    // could import now) and its staging is gone.
    until(&ring, &nodes, "b's store free again", || {
        Store::open(&b.store).is_ok()
    })
    .await;
    assert_eq!(staged(&b.store, "weights.bin"), 0);
    // The cable is back: the transfer ends and the complete item imports.
    ring.wire.cut.store(u64::MAX, Ordering::SeqCst);
    until(&ring, &nodes, "alpha on b", || b.live() == ["alpha@1.0.0"]).await;
    let model = sovereign_store::live_model(&b.store, "alpha").unwrap();
    assert_eq!(
        fs::read(model.dir.join("weights.bin")).unwrap(),
        fs::read(tmp.path().join("src-alpha-1.0.0/weights.bin")).unwrap()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_received_in_full_before_a_restart_imports_without_fetching_again() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 4);
    let path = bundle(tmp.path(), &keys, "alpha", "1.0.0", 3 << 20);
    a.import(&path, &keys, false);
    let a_spool = Spool::open(&a.dir.join("spool"), 1).unwrap();
    let mut meta = None;
    until(&ring, &[&a], "alpha in a's spool", || {
        meta = a_spool
            .complete()
            .unwrap()
            .into_iter()
            .find(|m| m.kind == Kind::Bundle);
        meta.is_some()
    })
    .await;
    let meta = meta.unwrap();
    // b got every byte, then stopped before its import finished.
    let b_spool = Spool::open(&tmp.path().join("b/spool"), 1 << 30).unwrap();
    assert_eq!(b_spool.begin(&meta).unwrap(), 0);
    let bytes = fs::read(&path).unwrap();
    let mut at = 0;
    for chunk in bytes.chunks(1 << 20) {
        at = b_spool.append(&meta, at, chunk).unwrap();
    }
    drop(b_spool);
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 4);
    let nodes = [&a, &b];
    until(&ring, &nodes, "alpha on b", || b.live() == ["alpha@1.0.0"]).await;
    assert!(ring.wire.asked_by("b").is_empty(), "nothing fetched again");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_version_and_a_bundle_without_room_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let ring = Ring::new();
    let b = ring.start(&keys, "b", &tmp.path().join("b"), 1 << 30, 4);
    let small = ring.start(&keys, "small", &tmp.path().join("small"), 100_000, 4);
    let v2 = bundle(tmp.path(), &keys, "alpha", "2.0.0", 200_000);
    b.import(&v2, &keys, false);
    // A holds 1.0.0 before its engine runs, so b's 2.0.0 cannot reach it first.
    let v1 = bundle(tmp.path(), &keys, "alpha", "1.0.0", 200_000);
    let a_store = tmp.path().join("a/store");
    install_trust(&a_store, &keys);
    fs::create_dir_all(a_store.join(sovereign_store::OUTBOX)).unwrap();
    import_into(&a_store, &v1, &keys, false);
    let a = ring.start(&keys, "a", &tmp.path().join("a"), 1 << 30, 4);
    let nodes = [&a, &b, &small];
    until(&ring, &nodes, "refusals of alpha@1.0.0", || {
        let refusals = &a.status.borrow().refusals;
        refusals.iter().any(|r| r.node == "b") && refusals.iter().any(|r| r.node == "small")
    })
    .await;
    let refusals = a.status.borrow().refusals.clone();
    let by = |node: &str| {
        refusals
            .iter()
            .find(|r| r.node == node)
            .unwrap()
            .reason
            .clone()
    };
    assert!(by("b").contains("rollback refused"), "{}", by("b"));
    assert!(by("small").starts_with("no room"), "{}", by("small"));
    assert_eq!(b.live(), ["alpha@2.0.0"]);
    assert!(small.live().is_empty() || small.live() == ["alpha@2.0.0"]);
    assert!(b.audit_text().contains("rollback refused"));
    assert!(small.audit_text().contains("\"kind\":\"no-room\""));
    // The small node says so itself, for `sovereign ring status`.
    until(&ring, &nodes, "small's own refusal", || {
        small
            .status
            .borrow()
            .refusals
            .iter()
            .any(|r| r.node == "small" && r.reason.starts_with("no room"))
    })
    .await;
    for node in [a, b, small] {
        node.stop().await;
    }
}

#[test]
fn a_spool_item_survives_a_restart_and_imports_with_the_stores_own_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys(tmp.path());
    let path = bundle(tmp.path(), &keys, "beta", "0.1.0", 100_000);
    let meta = ItemMeta::from_bundle(path.parent().unwrap(), "beta-0.1.0.sovb").unwrap();
    let bytes = fs::read(&path).unwrap();
    {
        let spool = Spool::open(&tmp.path().join("spool"), 1 << 30).unwrap();
        assert_eq!(spool.begin(&meta).unwrap(), 0);
        spool.append(&meta, 0, &bytes[..40_000]).unwrap();
        assert!(spool.append(&meta, 50_000, &bytes[50_000..60_000]).is_err());
    }
    let spool = Spool::open(&tmp.path().join("spool"), 1 << 30).unwrap();
    assert_eq!(spool.partial().unwrap(), std::slice::from_ref(&meta));
    assert_eq!(spool.begin(&meta).unwrap(), 40_000);
    spool.append(&meta, 40_000, &bytes[40_000..]).unwrap();
    let files = spool.finish(&meta).unwrap();
    let store = tmp.path().join("store");
    install_trust(&store, &keys);
    let verdict =
        sovereign_replication::import_item(&store, &files, &meta, &Default::default(), None, None);
    assert_eq!(verdict, Verdict::Live);
    assert_eq!(
        sovereign_store::live_model(&store, "beta")
            .unwrap()
            .version
            .to_string(),
        "0.1.0"
    );
    // A truncated copy is refused by the same import.
    let truncated = tmp.path().join("truncated");
    fs::create_dir_all(&truncated).unwrap();
    fs::write(
        truncated.join("beta-0.1.0.sovb"),
        &bytes[..bytes.len() - 10],
    )
    .unwrap();
    let mut meta2 = meta.clone();
    meta2.version = "0.2.0".into();
    match sovereign_replication::import_item(
        &store,
        &truncated,
        &meta2,
        &Default::default(),
        None,
        None,
    ) {
        Verdict::Refused(reason) => assert!(
            reason.contains("size") || reason.contains("short") || reason.contains("trunc"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
}
