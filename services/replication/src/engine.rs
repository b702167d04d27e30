//! The replication engine: one task per node that offers what its spool holds,
//! pulls what peers offer into the spool, hands complete items to the store's
//! import, and keeps [`Status`] current. It speaks [`Message`]s through two
//! channels, so any transport that carries bytes between named nodes works.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::arrival::Progress;
use crate::error::{describe, ReplicationError};
use crate::import::{import_item, ImportKeys, Verdict};
use crate::item::{ItemMeta, Kind};
use crate::protocol::{Message, MAX_CHUNK};
use crate::spool::Spool;
use crate::status::{Refusal, Status, TransferStatus};

/// How a node replicates.
pub struct Config {
    /// This node's name on the ring.
    pub node: String,
    /// The model store (written only through its import).
    pub store: PathBuf,
    /// The spool directory, on the state partition.
    pub spool: PathBuf,
    /// The most bytes the spool may hold.
    pub spool_capacity: u64,
    /// The node's age identity, for encrypted bundles.
    pub identity: Option<age::x25519::Identity>,
    /// The operator's trust file, installed by the first import into a
    /// store that has none (as a stick import does): a node that never saw
    /// a stick verifies what it receives against its image's trust.
    pub trust: Option<PathBuf>,
    /// The cluster CA: revocation lists are checked against it and replicated.
    pub cluster_ca: Option<sovereign_identity::ClusterCa>,
    /// The audit log every outcome goes to.
    pub audit: Option<Arc<sovereign_audit::Auditor>>,
    /// Bytes per fetch (at most 1 MiB).
    pub chunk: u32,
    /// Fetches in flight per transfer.
    pub window: usize,
    /// Without progress for this long, a transfer asks again from its spool length.
    pub stall: Duration,
    /// How often the outbox and the trust file are looked at and offers repeated.
    pub tick: Duration,
    /// A bundle is imported while it arrives; without a new byte for this
    /// long that import gives up (releasing the store) and the bundle is
    /// imported once complete instead.
    pub import_idle: Duration,
}

impl Config {
    /// Defaults: 1 MiB chunks, 8 in flight (8 MiB per transfer), stall after
    /// 3 s, tick 1 s, an import following a transfer gives up after 10 s idle.
    pub fn new(node: &str, store: &Path, spool: &Path, spool_capacity: u64) -> Self {
        Self {
            node: node.to_owned(),
            store: store.to_owned(),
            spool: spool.to_owned(),
            spool_capacity,
            identity: None,
            trust: None,
            cluster_ca: None,
            audit: None,
            chunk: MAX_CHUNK,
            window: 8,
            stall: Duration::from_secs(3),
            tick: Duration::from_secs(1),
            import_idle: Duration::from_secs(10),
        }
    }
}

/// A message from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// The sending node.
    pub from: String,
    /// The encoded [`Message`].
    pub payload: Bytes,
}

/// A message for a peer.
#[derive(Debug)]
pub struct Outgoing {
    /// The receiving node.
    pub to: String,
    /// The encoded [`Message`].
    pub payload: Bytes,
}

/// The other ring members and the models each advertises as live
/// (`(name, version)`), from the ring's membership.
pub type Peers = BTreeMap<String, Vec<(String, String)>>;

struct Transfer {
    meta: ItemMeta,
    source: String,
    received: u64,
    requested: u64,
    in_flight: usize,
    progress: Instant,
    /// When this transfer (or its resumption) began.
    started: Instant,
    /// The import verifying the bundle as it arrives, while it runs.
    following: Option<Arc<Progress>>,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        // An import still following a dropped transfer stops (and frees the store).
        if let Some(progress) = &self.following {
            progress.give_up();
        }
    }
}

/// How an import read its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// From the complete spool item.
    Spooled,
    /// From the partial item, as the transfer wrote it.
    Following,
}

/// An import's outcome, for the engine.
type Finished = (ItemMeta, String, Verdict, Reading);

/// What the node knows about one item it holds, per peer.
#[derive(Default)]
struct Offers {
    last: BTreeMap<String, Instant>,
    /// Peers that hold it, sent it, or refused it: not offered again.
    settled: BTreeMap<String, String>,
}

struct Engine {
    config: Config,
    spool: Spool,
    out: mpsc::Sender<Outgoing>,
    peers: Peers,
    transfers: BTreeMap<String, Transfer>,
    holders: BTreeMap<String, BTreeSet<String>>,
    offers: BTreeMap<String, Offers>,
    refused: BTreeMap<String, Refusal>,
    unopened: BTreeSet<String>,
    importing: BTreeSet<String>,
    done: mpsc::Sender<Finished>,
    serving: BTreeMap<String, ItemMeta>,
    trust_digest: Option<String>,
    crl_digest: Option<String>,
}

/// How often an item is offered again to a peer that has not taken it.
const REOFFER: Duration = Duration::from_secs(2);

/// Runs replication until `shutdown` completes. `inbound` carries messages
/// from peers, `outbound` takes messages for them, `peers` follows the ring's
/// membership, `status` is kept current for `sovereign ring status`.
pub async fn run(
    config: Config,
    mut inbound: mpsc::Receiver<Incoming>,
    outbound: mpsc::Sender<Outgoing>,
    mut peers: watch::Receiver<Peers>,
    status: watch::Sender<Status>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicationError> {
    let spool = Spool::open(&config.spool, config.spool_capacity)?;
    let outbox = config.store.join(sovereign_store::OUTBOX);
    std::fs::create_dir_all(&outbox).map_err(|e| ReplicationError::io(&outbox, e))?;
    let (done, mut finished) = mpsc::channel(16);
    let mut engine = Engine {
        peers: peers.borrow_and_update().clone(),
        config,
        spool,
        out: outbound,
        transfers: BTreeMap::new(),
        holders: BTreeMap::new(),
        offers: BTreeMap::new(),
        refused: BTreeMap::new(),
        unopened: BTreeSet::new(),
        importing: BTreeSet::new(),
        done,
        serving: BTreeMap::new(),
        trust_digest: None,
        crl_digest: None,
    };
    engine.resume_partials()?;
    let mut tick = tokio::time::interval(engine.config.tick);
    let mut outbox_poll = tokio::time::interval(OUTBOX_POLL);
    let mut published = Instant::now();
    status.send_replace(engine.status());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            message = inbound.recv() => match message {
                Some(message) => engine.receive(message).await,
                None => return Ok(()),
            },
            Some((meta, from, verdict, reading)) = finished.recv() => {
                engine.imported(meta, from, verdict, reading).await
            }
            changed = peers.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                engine.peers = peers.borrow_and_update().clone();
                engine.offer_all().await;
            }
            _ = tick.tick() => engine.tick().await,
            _ = outbox_poll.tick() => {
                // A bundle imported here is offered at once, not at the next tick.
                if engine.adopt_outbox().unwrap_or(0) > 0 {
                    engine.offer_all().await;
                }
            }
        }
        if published.elapsed() >= STATUS_EVERY {
            status.send_replace(engine.status());
            published = Instant::now();
        }
    }
}

/// How often the store's outbox is looked at for bundles imported here.
const OUTBOX_POLL: Duration = Duration::from_millis(100);

/// How often [`Status`] is refreshed at most (it reads the spool directory).
const STATUS_EVERY: Duration = Duration::from_millis(250);

impl Engine {
    async fn send(&self, to: &str, message: &Message) {
        let outgoing = Outgoing {
            to: to.to_owned(),
            payload: message.encode(),
        };
        if self.out.send(outgoing).await.is_err() {
            tracing::debug!(peer = to, "replication transport closed");
        }
    }

    fn audit(&self, kind: &str, details: serde_json::Value) {
        if let Some(audit) = &self.config.audit {
            let event = sovereign_audit::Event::new("replication", kind, details);
            if let Err(e) = audit.record(event) {
                tracing::error!(error = %e, "audit log cannot record a replication event");
            }
        }
    }

    /// After a restart: partial items wait for a holder's offer to resume.
    fn resume_partials(&mut self) -> Result<(), ReplicationError> {
        for meta in self.spool.partial()? {
            tracing::info!(item = %meta.id(), received = self.spool.received(&meta)?, "partial transfer will resume");
        }
        Ok(())
    }

    async fn tick(&mut self) {
        if let Err(e) = self.adopt_outbox() {
            tracing::warn!(error = %describe(&e), "outbox");
        }
        self.adopt_trust();
        self.adopt_revocations();
        self.check_stalls().await;
        self.evict();
        self.offer_all().await;
    }

    /// Takes what the store's import left in its outbox into the spool;
    /// returns how many bundles were taken.
    fn adopt_outbox(&mut self) -> Result<usize, ReplicationError> {
        let outbox = self.config.store.join(sovereign_store::OUTBOX);
        let entries = std::fs::read_dir(&outbox).map_err(|e| ReplicationError::io(&outbox, e))?;
        let mut adopted = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.spool.adopt_bundle(&entry.path()) {
                Ok(meta) => {
                    adopted += 1;
                    tracing::info!(item = %meta.id(), "imported here: offering to peers");
                    self.audit(
                        "offer",
                        serde_json::json!({"model": meta.id(), "bytes": meta.total()}),
                    );
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.path().display(), error = %describe(&e), "outbox entry not replicated");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(adopted)
    }

    /// A newer trust file installed here (from a stick) is offered too.
    fn adopt_trust(&mut self) {
        let Ok(Some(trust)) = sovereign_store::installed_trust(&self.config.store) else {
            return;
        };
        let text = trust.to_text();
        let digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        if self.trust_digest.as_deref() == Some(digest.as_str()) {
            return;
        }
        if self.keep_text(Kind::Trust, &text, trust.trust().sequence) {
            self.trust_digest = Some(digest);
        }
    }

    /// A newer revocation list installed here is offered too.
    fn adopt_revocations(&mut self) {
        let Some(ca) = &self.config.cluster_ca else {
            return;
        };
        let Ok(list) = sovereign_store::installed_revocations(&self.config.store, ca) else {
            return;
        };
        let Some(text) = list.to_pem() else {
            return;
        };
        let digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        if self.crl_digest.as_deref() == Some(digest.as_str()) {
            return;
        }
        if self.keep_text(Kind::Revocations, &text, list.sequence()) {
            self.crl_digest = Some(digest);
        }
    }

    /// Spools a small item, replacing older ones of its kind.
    fn keep_text(&mut self, kind: Kind, text: &str, sequence: u64) -> bool {
        let Ok(meta) = self.spool.add_text(kind, text, sequence) else {
            return false;
        };
        for old in self.spool.complete().unwrap_or_default() {
            if old.kind == kind && old.key() != meta.key() {
                let _ = self.spool.remove(&old);
            }
        }
        true
    }

    async fn offer_all(&mut self) {
        let items = self.spool.complete().unwrap_or_default();
        let now = Instant::now();
        let peers: Vec<(String, Vec<(String, String)>)> = self
            .peers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for meta in items {
            if self.importing.contains(&meta.key()) {
                continue;
            }
            for (peer, models) in &peers {
                if *peer == self.config.node || holds(models, &meta) {
                    continue;
                }
                let offers = self.offers.entry(meta.key()).or_default();
                if offers.settled.contains_key(peer)
                    || offers
                        .last
                        .get(peer)
                        .is_some_and(|t| now.duration_since(*t) < REOFFER)
                {
                    continue;
                }
                offers.last.insert(peer.clone(), now);
                self.send(peer, &Message::Offer(meta.clone())).await;
            }
        }
    }

    /// Drops complete bundles every current peer holds or refused.
    fn evict(&mut self) {
        if self.peers.keys().all(|p| *p == self.config.node) {
            return;
        }
        for meta in self.spool.complete().unwrap_or_default() {
            if meta.kind != Kind::Bundle || self.importing.contains(&meta.key()) {
                continue;
            }
            let offers = self.offers.get(&meta.key());
            let settled = self.peers.iter().all(|(peer, models)| {
                *peer == self.config.node
                    || holds(models, &meta)
                    || offers.is_some_and(|o| o.settled.contains_key(peer))
            });
            if settled && self.spool.remove(&meta).is_ok() {
                tracing::info!(item = %meta.id(), "every peer holds it: removed from the spool");
                self.offers.remove(&meta.key());
                self.unopened.remove(&meta.id());
            }
        }
    }

    async fn receive(&mut self, incoming: Incoming) {
        let message = match Message::decode(&incoming.payload) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(peer = %incoming.from, error = %e, "malformed replication message");
                return;
            }
        };
        let from = incoming.from;
        match message {
            Message::Offer(meta) => self.offered(from, meta).await,
            Message::Fetch { key, offset, len } => self.serve(from, key, offset, len).await,
            Message::Chunk { key, offset, data } => self.chunk(from, key, offset, data).await,
            Message::Refuse { key, reason } => {
                let id = self
                    .spool
                    .complete()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|m| m.key() == key)
                    .map(|m| m.id());
                if let Some(id) = id {
                    tracing::info!(peer = %from, item = %id, %reason, "peer refused");
                    self.refused.insert(
                        format!("{key}/{from}"),
                        Refusal {
                            item: id,
                            node: from.clone(),
                            reason: reason.clone(),
                        },
                    );
                    self.offers
                        .entry(key)
                        .or_default()
                        .settled
                        .insert(from, reason);
                }
            }
            Message::Have { key } => {
                self.offers
                    .entry(key)
                    .or_default()
                    .settled
                    .insert(from, "holds it".into());
            }
            Message::Gone { key } => {
                if let Some(holders) = self.holders.get_mut(&key) {
                    holders.remove(&from);
                }
            }
        }
    }

    /// A peer offers an item: refuse it, join its transfer, or start pulling.
    async fn offered(&mut self, from: String, meta: ItemMeta) {
        if let Err(e) = meta.validate() {
            tracing::warn!(peer = %from, error = %e, "malformed offer");
            return;
        }
        let key = meta.key();
        if let Some(refusal) = self.refused.get(&key) {
            let reason = refusal.reason.clone();
            self.send(&from, &Message::Refuse { key, reason }).await;
            return;
        }
        self.holders
            .entry(key.clone())
            .or_default()
            .insert(from.clone());
        if self.transfers.contains_key(&key) || self.importing.contains(&key) {
            return;
        }
        if self.spool.has(&meta) {
            self.send(&from, &Message::Have { key }).await;
            return;
        }
        if let Some((reason, rollback)) = self.declined(&meta) {
            if rollback {
                tracing::warn!(item = %meta.id(), peer = %from, %reason, "rollback refused");
                self.audit(
                    "refused",
                    serde_json::json!({"model": meta.id(), "from": from, "reason": reason}),
                );
                self.refuse_here(&meta, &from, &reason).await;
            } else {
                tracing::debug!(item = %meta.id(), %reason, "offer not needed");
                self.send(&from, &Message::Have { key }).await;
            }
            return;
        }
        if let Some(reason) = self.no_room(&meta) {
            tracing::warn!(item = %meta.id(), peer = %from, %reason, "no room");
            self.audit(
                "no-room",
                serde_json::json!({"model": meta.id(), "from": from, "reason": reason}),
            );
            self.refuse_here(&meta, &from, &reason).await;
            return;
        }
        let received = match self.spool.begin(&meta) {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(item = %meta.id(), error = %describe(&e), "cannot spool");
                return;
            }
        };
        if received > 0 {
            tracing::info!(item = %meta.id(), received, "resuming transfer");
        }
        self.audit(
            "receive",
            serde_json::json!({"model": meta.id(), "from": from, "resume_at": received}),
        );
        if received == meta.total() {
            // Received in full before a restart, not yet imported.
            tracing::info!(item = %meta.id(), "received in full before: importing");
            self.import_spooled(&meta, &from);
            return;
        }
        let following = (meta.kind == Kind::Bundle).then(|| {
            let progress = Arc::new(Progress::new(&meta, received, self.config.import_idle));
            let files = self.spool.partial_files(&meta);
            let arrival: Arc<dyn sovereign_signing::Arrival> = progress.clone();
            self.start_import(meta.clone(), from.clone(), files, Some(arrival));
            progress
        });
        let transfer = Transfer {
            meta,
            source: from,
            received,
            requested: received,
            in_flight: 0,
            progress: Instant::now(),
            started: Instant::now(),
            following,
        };
        self.transfers.insert(key.clone(), transfer);
        self.request(&key).await;
    }

    /// Offers this node does not take without a transfer: it already has them,
    /// or they would roll back what it has (`true`: refused and audited).
    fn declined(&self, meta: &ItemMeta) -> Option<(String, bool)> {
        match meta.kind {
            Kind::Bundle => {
                let live = sovereign_store::live_model(&self.config.store, &meta.name).ok()?;
                let offered: semver::Version = meta.version.parse().ok()?;
                (live.version >= offered).then(|| {
                    if live.version == offered {
                        (format!("{} is already live", meta.id()), false)
                    } else {
                        let reason = format!(
                            "{} is older than {}@{}, already live (rollback refused)",
                            meta.id(),
                            meta.name,
                            live.version
                        );
                        (reason, true)
                    }
                })
            }
            Kind::Trust => {
                let trust = sovereign_store::installed_trust(&self.config.store).ok()??;
                let offered: u64 = meta.version.parse().ok()?;
                (trust.trust().sequence >= offered).then(|| {
                    let installed = trust.trust().sequence;
                    (format!("trust sequence {installed} is installed"), false)
                })
            }
            Kind::Revocations => {
                let ca = self.config.cluster_ca.as_ref()?;
                let list = sovereign_store::installed_revocations(&self.config.store, ca).ok()?;
                let offered: u64 = meta.version.parse().ok()?;
                (list.sequence() >= offered).then(|| {
                    let installed = list.sequence();
                    (format!("revocation list {installed} is installed"), false)
                })
            }
        }
    }

    fn no_room(&self, meta: &ItemMeta) -> Option<String> {
        let used = self.spool.used().ok()?;
        let have = self.spool.received(meta).unwrap_or(0);
        let remaining = meta.total() - have;
        if used + remaining > self.spool.capacity() {
            return Some(format!(
                "no room: {} needs {} more bytes in the spool, {} of {} used",
                meta.id(),
                remaining,
                used,
                self.spool.capacity()
            ));
        }
        let free = |path: &Path| {
            rustix::fs::statvfs(path)
                .ok()
                .map(|s| (s.f_fsid, s.f_bavail.saturating_mul(s.f_frsize)))
        };
        let (spool_fs, spool_free) = free(self.spool.dir())?;
        let (store_fs, store_free) = free(&self.config.store)?;
        let margin = 1 << 20;
        let (needed, available) = if spool_fs == store_fs {
            (remaining + meta.content + margin, spool_free)
        } else if store_free < meta.content + margin {
            (meta.content + margin, store_free)
        } else {
            (remaining + margin, spool_free)
        };
        (needed > available).then(|| {
            format!(
                "no room: {} needs {needed} bytes on disk (spool and store), {available} available",
                meta.id()
            )
        })
    }

    async fn refuse_here(&mut self, meta: &ItemMeta, from: &str, reason: &str) {
        self.refused.insert(
            meta.key(),
            Refusal {
                item: meta.id(),
                node: self.config.node.clone(),
                reason: reason.to_owned(),
            },
        );
        let message = Message::Refuse {
            key: meta.key(),
            reason: reason.to_owned(),
        };
        self.send(from, &message).await;
    }

    /// Keeps the window of fetches full.
    async fn request(&mut self, key: &str) {
        let chunk = self.config.chunk.clamp(1, MAX_CHUNK) as u64;
        let window = self.config.window.max(1);
        let mut fetches = Vec::new();
        let Some(transfer) = self.transfers.get_mut(key) else {
            return;
        };
        let total = transfer.meta.total();
        while transfer.in_flight < window && transfer.requested < total {
            let (index, within) = transfer
                .meta
                .locate(transfer.requested)
                .expect("requested is below the total");
            let len = chunk.min(transfer.meta.files[index].size - within);
            fetches.push(Message::Fetch {
                key: key.to_owned(),
                offset: transfer.requested,
                len: len as u32,
            });
            transfer.requested += len;
            transfer.in_flight += 1;
        }
        let source = transfer.source.clone();
        for fetch in fetches {
            self.send(&source, &fetch).await;
        }
    }

    async fn serve(&mut self, to: String, key: String, offset: u64, len: u32) {
        let cached = self
            .serving
            .get(&key)
            .filter(|m| self.spool.has(m))
            .cloned();
        let meta = cached.or_else(|| {
            let found = self
                .spool
                .complete()
                .ok()?
                .into_iter()
                .find(|m| m.key() == key)?;
            self.serving.insert(key.clone(), found.clone());
            Some(found)
        });
        let Some(meta) = meta else {
            self.send(&to, &Message::Gone { key }).await;
            return;
        };
        match self.spool.read(&meta, offset, len.min(MAX_CHUNK)) {
            Ok(data) => self.send(&to, &Message::Chunk { key, offset, data }).await,
            Err(e) => {
                tracing::warn!(peer = %to, item = %meta.id(), error = %describe(&e), "cannot serve");
                self.send(&to, &Message::Gone { key }).await;
            }
        }
    }

    async fn chunk(&mut self, from: String, key: String, offset: u64, data: Vec<u8>) {
        let Some(transfer) = self.transfers.get_mut(&key) else {
            return;
        };
        if offset != transfer.received || from != transfer.source {
            // A reply to a fetch from before a stall: the window was re-issued.
            return;
        }
        let received = match self.spool.append(&transfer.meta, offset, &data) {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(peer = %from, error = %describe(&e), "chunk refused");
                // Its bytes may have landed before the error (a failed fsync):
                // go on from the spool's length, never ask for them again.
                match self.spool.received(&transfer.meta) {
                    Ok(received) if received > transfer.received => received,
                    _ => return,
                }
            }
        };
        if let Some(following) = &transfer.following {
            following.advance(received);
        }
        transfer.received = received;
        transfer.requested = transfer.requested.max(received);
        transfer.in_flight = transfer.in_flight.saturating_sub(1);
        transfer.progress = Instant::now();
        if transfer.received < transfer.meta.total() {
            self.request(&key).await;
            return;
        }
        let mut transfer = self.transfers.remove(&key).expect("transfer exists");
        let seconds = transfer.started.elapsed().as_secs_f64();
        tracing::info!(
            item = %transfer.meta.id(),
            bytes = transfer.meta.total(),
            seconds,
            mib_per_s = transfer.meta.total() as f64 / (1u64 << 20) as f64 / seconds.max(1e-9),
            "received in full: importing"
        );
        if let Some(following) = transfer.following.take() {
            // The import read along; it finishes with the last byte.
            following.complete();
            self.importing.insert(key);
            return;
        }
        self.import_spooled(&transfer.meta, &transfer.source);
    }

    /// Completes a fully received item in the spool and imports it from there.
    fn import_spooled(&mut self, meta: &ItemMeta, from: &str) {
        match self.spool.finish(meta) {
            Ok(files) => self.start_import(meta.clone(), from.to_owned(), files, None),
            Err(e) => tracing::warn!(error = %describe(&e), "cannot complete transfer"),
        }
    }

    /// Imports the item in `files` on a blocking thread; its verdict comes
    /// back through `done`. With `arrival` the files are still arriving.
    fn start_import(
        &mut self,
        meta: ItemMeta,
        from: String,
        files: PathBuf,
        arrival: Option<Arc<dyn sovereign_signing::Arrival>>,
    ) {
        let reading = match arrival {
            Some(_) => Reading::Following,
            None => {
                self.importing.insert(meta.key());
                Reading::Spooled
            }
        };
        let store = self.config.store.clone();
        let keys = ImportKeys {
            identity: self.config.identity.clone(),
            trust: self.config.trust.clone(),
            cluster_ca: self.config.cluster_ca.clone(),
        };
        let audit = self.config.audit.clone();
        let done = self.done.clone();
        tokio::task::spawn_blocking(move || {
            let audit = audit
                .as_deref()
                .map(|a| a as &dyn sovereign_store::ImportAudit);
            let verdict = import_item(&store, &files, &meta, &keys, audit, arrival);
            let _ = done.blocking_send((meta, from, verdict, reading));
        });
    }

    async fn imported(&mut self, meta: ItemMeta, from: String, verdict: Verdict, reading: Reading) {
        let key = meta.key();
        self.importing.remove(&key);
        if reading == Reading::Following {
            let receiving = self.transfers.get_mut(&key);
            match (&verdict, receiving) {
                // Gave up (a long stall, the store busy): the transfer goes on
                // and the complete item is imported from the spool.
                (Verdict::Failed(reason) | Verdict::Unopened(reason), Some(transfer)) => {
                    tracing::info!(item = %meta.id(), %reason, "import stopped following the transfer; it imports once complete");
                    transfer.following = None;
                    return;
                }
                (Verdict::Failed(reason), None) => {
                    tracing::info!(item = %meta.id(), %reason, "import while receiving failed; importing the complete item");
                    self.import_spooled(&meta, &from);
                    return;
                }
                // Already live here (a stick brought it meanwhile): stop fetching.
                (Verdict::Live, Some(_)) => {
                    self.transfers.remove(&key);
                    let _ = self.spool.remove(&meta);
                    tracing::info!(item = %meta.id(), "already live: transfer stopped");
                    self.send(&from, &Message::Have { key }).await;
                    return;
                }
                // Refused before the last byte (signatures, rollback): stop fetching.
                (Verdict::Refused(_), Some(_)) => {
                    self.transfers.remove(&key);
                }
                (Verdict::Live | Verdict::Unopened(_), None) => {
                    if let Err(e) = self.spool.finish(&meta) {
                        tracing::warn!(item = %meta.id(), error = %describe(&e), "cannot keep the item to pass on");
                    }
                }
                (Verdict::Refused(_), None) => {}
            }
        }
        match verdict {
            Verdict::Live => {
                tracing::info!(item = %meta.id(), peer = %from, "replicated and imported");
                // The sender holds it; nothing to offer back.
                self.offers
                    .entry(meta.key())
                    .or_default()
                    .settled
                    .insert(from, "sent it".into());
            }
            Verdict::Unopened(reason) => {
                tracing::warn!(item = %meta.id(), %reason, "cannot open; relaying anyway");
                self.audit(
                    "relay-unopened",
                    serde_json::json!({"model": meta.id(), "from": from, "reason": reason}),
                );
                self.unopened.insert(meta.id());
                self.offers
                    .entry(meta.key())
                    .or_default()
                    .settled
                    .insert(from, "sent it".into());
            }
            Verdict::Refused(reason) => {
                tracing::warn!(item = %meta.id(), peer = %from, %reason, "refused from a peer");
                self.audit(
                    "refused",
                    serde_json::json!({"model": meta.id(), "from": from, "reason": reason}),
                );
                let _ = self.spool.remove(&meta);
                self.refuse_here(&meta, &from, &reason).await;
            }
            Verdict::Failed(reason) => {
                tracing::warn!(item = %meta.id(), %reason, "import could not run");
                let _ = self.spool.remove(&meta);
            }
        }
    }

    /// A transfer without progress asks again from its spool length, from the
    /// same holder or another (a pulled cable, a rebooted peer).
    async fn check_stalls(&mut self) {
        let stall = self.config.stall;
        let mut again = Vec::new();
        for (key, transfer) in &mut self.transfers {
            if transfer.progress.elapsed() < stall {
                continue;
            }
            let holders = self.holders.get(key);
            let members: Vec<&String> = holders
                .into_iter()
                .flatten()
                .filter(|h| self.peers.contains_key(*h))
                .collect();
            if let Some(next) = members
                .iter()
                .skip_while(|h| ***h != transfer.source)
                .nth(1)
                .or(members.first())
            {
                transfer.source = (*next).clone();
            }
            tracing::info!(item = %transfer.meta.id(), from = %transfer.source, at = transfer.received, "transfer stalled: asking again");
            transfer.requested = transfer.received;
            transfer.in_flight = 0;
            transfer.progress = Instant::now();
            again.push(key.clone());
        }
        for key in again {
            self.request(&key).await;
        }
    }

    fn status(&self) -> Status {
        let complete = self.spool.complete().unwrap_or_default();
        Status {
            spool_bytes: self.spool.used().unwrap_or(0),
            spool_capacity: self.spool.capacity(),
            spooled: complete.iter().map(|m| m.id()).collect(),
            transfers: self
                .transfers
                .values()
                .map(|t| TransferStatus {
                    item: t.meta.id(),
                    from: t.source.clone(),
                    received: t.received,
                    total: t.meta.total(),
                })
                .collect(),
            refusals: self.refused.values().cloned().collect(),
            relayed_unopened: self.unopened.iter().cloned().collect(),
        }
    }
}

/// Whether a peer's advertised models include the item (trust files are never advertised).
fn holds(models: &[(String, String)], meta: &ItemMeta) -> bool {
    meta.kind == Kind::Bundle
        && models
            .iter()
            .any(|(n, v)| *n == meta.name && *v == meta.version)
}
