//! `sovereign node run`: the ring, replication, this node's stage and the API
//! in one process. A node whose store holds no model yet runs the ring and
//! replication (it relays and receives) and answers 503 on its API until a
//! verified model is live in its store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use sovereign_identity::Revocations;
use sovereign_replication::Status as Replication;
use sovereign_ring::{Advert, Channel, Identity, Membership, Ring, RingConfig};
use tokio::sync::watch;

use crate::advert::Adverts;
use crate::core::{Core, Links};
use crate::courier::Courier;
use crate::drain::{Drain, DRAIN_LIMIT};
use crate::plan::{self, Candidate, Isa, Plan};
use crate::{RingBackend, RingView};

/// How to run a node (the arguments of `sovereign node run` and `sovereign-node`).
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// The enrolled node identity file (`sovereign node enroll`).
    #[arg(long)]
    pub identity: PathBuf,
    /// The model store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// A ring interface (repeatable; `thunderbolt*` matches every one).
    #[arg(long = "ring-interface", required = true)]
    pub ring_interfaces: Vec<String>,
    /// The API's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// Serve the API over HTTPS with the identity's CA-issued certificate
    /// (clients trust the cluster CA once), as the node image does.
    #[arg(long, conflicts_with = "tls_cert")]
    pub api_tls: bool,
    /// Serve the API over HTTPS with this PEM certificate chain instead (the
    /// one `sovereign flash` writes, or an operator's override).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The API keys file (`NAME blake3:<hex>` per line); required off loopback.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Memory this node gives to weights and KV cache, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub memory_budget_mb: u64,
    /// Heartbeat interval on ring links, in ms (a peer silent for five is lost).
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// The ring's TCP/UDP port.
    #[arg(long, default_value_t = 7420)]
    pub ring_port: u16,
    /// The model to serve (default: the only one in the store; with none
    /// yet, the first that becomes live).
    #[arg(long)]
    pub model: Option<String>,
    /// Where bundles being received or passed on are kept (default: STORE.spool,
    /// beside the store on the state partition).
    #[arg(long)]
    pub spool: Option<PathBuf>,
    /// The operator's trust file (the image's `/etc/sovereign/node.trust`),
    /// installed by the first model received over the ring into a store that
    /// has none: a node that never saw a stick verifies against it.
    #[arg(long)]
    pub trust: Option<PathBuf>,
    /// The most the spool may hold, in MiB (a bundle per version in flight).
    #[arg(long, default_value_t = 20480)]
    pub spool_capacity_mb: u64,
    /// Generations this node's API runs at once (pipelined through the ring).
    #[arg(long, default_value_t = 4)]
    pub max_concurrency: usize,
    /// Record plan changes and requests in this audit log directory.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Record through the audit daemon's socket instead.
    #[arg(long, conflicts_with = "audit_log")]
    pub audit_socket: Option<PathBuf>,
    /// Serve the stick's courier step for the whole ring on this Unix socket
    /// (`sovereign audit courier --ring`, the image's stick unit): every
    /// reachable member's checkpoint and proof, gathered over the ring.
    #[arg(long)]
    pub courier_socket: Option<PathBuf>,
}

/// Errors starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A bad argument, identity, store or model.
    #[error("{0}")]
    Setup(String),
    /// The API could not start.
    #[error(transparent)]
    Api(#[from] sovereign_api::ServeError),
    /// The ring could not start.
    #[error("ring: {0}")]
    Ring(#[from] sovereign_ring::RingError),
    /// Listening or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn setup(e: impl std::fmt::Display) -> NodeError {
    NodeError::Setup(e.to_string())
}

/// The model this node serves, as it is in its store.
#[derive(Clone)]
struct Model {
    name: String,
    version: semver::Version,
    path: PathBuf,
    footprint: sovereign_inference::Footprint,
}

/// The model this node serves, if its store holds it yet.
fn find_model(args: &NodeArgs) -> Result<Option<Model>, NodeError> {
    let model = match &args.model {
        Some(name) => match sovereign_store::live_model(&args.store, name) {
            Ok(model) => model,
            Err(sovereign_store::StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(setup(e)),
        },
        None => {
            let mut all = sovereign_store::live_models(&args.store).map_err(setup)?;
            match all.len() {
                0 => return Ok(None),
                1 => all.remove(0),
                n => {
                    return Err(NodeError::Setup(format!(
                        "the store holds {n} models; choose one with --model"
                    )))
                }
            }
        }
    };
    model_of(model).map(Some)
}

fn model_of(model: sovereign_store::LiveModel) -> Result<Model, NodeError> {
    let path = sovereign_inference::Engine::locate(&model.dir, &model.files).map_err(setup)?;
    Ok(Model {
        footprint: sovereign_inference::Footprint::of(&path).map_err(setup)?,
        name: model.name,
        version: model.version,
        path,
    })
}

/// Version `version` of `name` if it is live in `store`.
fn model_version(
    store: &std::path::Path,
    name: &str,
    version: &semver::Version,
) -> Result<Model, NodeError> {
    let live = sovereign_store::live_versions(store)
        .map_err(setup)?
        .into_iter()
        .find(|m| m.name == name && m.version == *version)
        .ok_or_else(|| NodeError::Setup(format!("this node does not hold {name}@{version}")))?;
    model_of(live)
}

/// Hands frames to the ring's sender task (callers are blocking threads).
struct RingLinks(tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>);

impl Links for RingLinks {
    fn send(&self, to: &str, payload: Vec<u8>) -> Result<(), String> {
        self.0
            .send((to.to_owned(), payload))
            .map_err(|_| "the ring has stopped".to_owned())
    }
}

/// What the planner last saw, for `/health`.
#[derive(Default)]
struct Seen {
    members: BTreeMap<String, Value>,
    plan: Option<Plan>,
    problem: Option<String>,
    /// A switch to a newer version waiting for answers in flight.
    switch: Option<Value>,
    /// This node's requests in flight and held.
    drain: Option<Arc<Drain>>,
}

/// Each member as `/health` shows it (its layers are added from the plan).
fn members_json(view: &Membership) -> BTreeMap<String, Value> {
    view.members
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                json!({
                    "memory_budget_mb": m.advert.memory_budget_mb,
                    "models": m.advert.models.iter().map(|(n, v)| format!("{n}@{v}")).collect::<Vec<_>>(),
                    "isa": m.advert.isa,
                    "neighbours": m.neighbours,
                }),
            )
        })
        .collect()
}

/// The candidates of a membership view for `model`.
fn candidates(view: &Membership, model: &str) -> Vec<Candidate> {
    view.members
        .iter()
        .map(|(name, member)| Candidate {
            name: name.clone(),
            memory_budget: member.advert.memory_budget_mb << 20,
            versions: member
                .advert
                .models
                .iter()
                .filter(|(n, _)| n == model)
                .filter_map(|(_, v)| semver::Version::parse(v).ok())
                .collect(),
            isa: Isa::parse(&member.advert.isa).unwrap_or(Isa::Scalar),
        })
        .collect()
}

/// Re-plans whenever the membership changes; records plans, joins and
/// leaves in the audit log. When the ring moves to a newer version that this
/// node holds too, the node takes it (layers and tokenizer), between
/// requests: new requests wait, the answers in flight finish on the version
/// they started on, and the ring switches once no member is draining.
struct Planner {
    membership: watch::Receiver<Membership>,
    core: Arc<Core>,
    model: Model,
    store: PathBuf,
    backend: Arc<RingBackend>,
    view: Arc<Mutex<Seen>>,
    state: Arc<sovereign_api::AppState>,
    drain: Arc<Drain>,
}

/// How long a switch of version waits before anything else, so that every
/// member has seen it coming and said whether it drains answers first.
const SWITCH_SETTLE: Duration = Duration::from_secs(2);

/// A newer version the ring is to move to, and since when it waits.
struct Pending {
    version: semver::Version,
    since: tokio::time::Instant,
}

impl Planner {
    async fn run(mut self) {
        let mut known: Vec<String> = Vec::new();
        let mut pending: Option<Pending> = None;
        let mut draining = self.drain.subscribe();
        let me = self.core.name().to_owned();
        loop {
            let members = self.membership.borrow_and_update().clone();
            let names: Vec<String> = members.members.keys().cloned().collect();
            for joined in names.iter().filter(|n| !known.contains(n)) {
                self.record("ring-join", json!({ "node": joined }));
            }
            for left in known.iter().filter(|n| !names.contains(n)) {
                self.record("ring-leave", json!({ "node": left }));
            }
            known = names;
            let candidates = candidates(&members, &self.model.name);
            let chosen = plan::choose_version(&candidates);
            let wanted = chosen.clone().filter(|v| *v != self.model.version);
            if pending.as_ref().map(|p| &p.version) != wanted.as_ref() {
                pending = wanted.map(|version| Pending {
                    version,
                    since: tokio::time::Instant::now(),
                });
            }
            let mut target = chosen;
            let mut expired = false;
            if let Some(p) = &pending {
                let holds = candidates
                    .iter()
                    .any(|c| c.name == me && c.versions.contains(&p.version));
                expired = p.since.elapsed() >= DRAIN_LIMIT;
                self.drain.hold(holds && !expired);
            }
            // Who still runs answers on the version in force.
            let mut waiting_for: Vec<String> = members
                .members
                .iter()
                .filter(|(name, m)| m.advert.draining && **name != me)
                .map(|(name, _)| name.clone())
                .collect();
            if self.drain.draining() {
                waiting_for.push(me.clone());
            }
            if let Some(p) = &pending {
                // Every member sees the switch coming and says whether it drains first.
                let settled = p.since.elapsed() >= SWITCH_SETTLE;
                if expired || (settled && waiting_for.is_empty()) {
                    if !waiting_for.is_empty() {
                        tracing::warn!(version = %p.version, ?waiting_for, "ring: switching before every answer in flight finished (drain limit): they are replayed on the new version");
                    }
                    if self.switch(&p.version) {
                        pending = None;
                    }
                } else {
                    // The plan stays on the version in force meanwhile.
                    target = Some(self.model.version.clone());
                }
            }
            self.replan(
                &members,
                &candidates,
                target,
                pending.as_ref(),
                &waiting_for,
            );
            // Held requests go in once the new plan is in force.
            if pending.is_none() {
                self.drain.hold(false);
            }
            // Wake when the switch has settled, and at the drain limit.
            let deadline = pending.as_ref().and_then(|p| {
                [p.since + SWITCH_SETTLE, p.since + DRAIN_LIMIT]
                    .into_iter()
                    .find(|at| *at > tokio::time::Instant::now())
            });
            tokio::select! {
                changed = self.membership.changed() => if changed.is_err() { return },
                _ = draining.changed() => {}
                () = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            // Let a burst of changes (a node and its cables) settle into one plan.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes `version` if this node holds it (`false`: it stays as it is).
    fn switch(&mut self, version: &semver::Version) -> bool {
        match tokio::task::block_in_place(|| switch(&self.store, &self.model, version, &self.core))
        {
            Ok((next, front)) => {
                tracing::info!(version = %version, "ring: serving a newer version");
                let id = format!("{}@{version}", self.model.name);
                self.record("model-loaded", json!({ "model": id }));
                self.backend.replace_front(front);
                self.model = next;
                true
            }
            Err(e) => {
                tracing::debug!("ring: staying on {}: {e}", self.model.version);
                false
            }
        }
    }

    /// Puts the plan for `target` in force, shows it and records changes.
    fn replan(
        &self,
        members: &Membership,
        candidates: &[Candidate],
        target: Option<semver::Version>,
        pending: Option<&Pending>,
        waiting_for: &[String],
    ) {
        let model = &self.model;
        let outcome = match target {
            Some(version) if version == model.version => {
                plan::compute(&version, &model.footprint, candidates).map_err(|e| e.to_string())
            }
            Some(version) => Err(format!(
                "the ring serves {}@{version}; this node holds {}",
                model.name, model.version
            )),
            None => Err(format!("no member holds {}", model.name)),
        };
        let previous = self.core.active().map(|a| a.plan);
        {
            let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
            v.members = members_json(members);
            v.plan = outcome.as_ref().ok().cloned();
            v.problem = outcome.as_ref().err().cloned();
            v.switch = pending.map(|p| {
                json!({
                    "to": p.version.to_string(),
                    "waiting_for": waiting_for,
                    "seconds": p.since.elapsed().as_secs(),
                })
            });
            v.drain = Some(Arc::clone(&self.drain));
        }
        match outcome {
            Ok(plan) => {
                if previous.as_ref() != Some(&plan) {
                    tracing::info!(stages = ?plan.stages, left_out = ?plan.left_out, "ring: new plan");
                    let stages: Vec<Value> = plan
                        .stages
                        .iter()
                        .map(
                            |s| json!({ "node": s.node, "layers": [s.layers.start, s.layers.end] }),
                        )
                        .collect();
                    let kind = if previous.is_some() {
                        "ring-replan"
                    } else {
                        "ring-plan"
                    };
                    self.record(
                        kind,
                        json!({ "model": format!("{}@{}", model.name, plan.version), "isa": plan.isa.name(), "stages": stages, "left_out": plan.left_out }),
                    );
                }
                self.core.set_plan(Some(plan), model.path.clone());
            }
            Err(problem) => {
                if previous.is_some() {
                    tracing::warn!("ring: no plan: {problem}");
                    self.record("ring-replan", json!({ "problem": problem }));
                }
                self.core.set_plan(None, model.path.clone());
            }
        }
    }

    fn record(&self, kind: &str, details: Value) {
        record(&self.state.audit, kind, details);
    }
}

/// Version `version` of the served model from `store`, if it is live here and
/// has the architecture the core runs.
fn switch(
    store: &std::path::Path,
    model: &Model,
    version: &semver::Version,
    core: &Core,
) -> Result<(Model, sovereign_inference::Front), NodeError> {
    let next = model_version(store, &model.name, version)?;
    let front = sovereign_inference::Front::load(&next.path).map_err(setup)?;
    if front.config() != core.config() {
        return Err(NodeError::Setup(format!(
            "{}@{version} has another architecture: restart the node to serve it",
            model.name
        )));
    }
    Ok((next, front))
}

fn record(audit: &Option<sovereign_audit::Auditor>, kind: &str, details: Value) {
    if let Some(audit) = audit {
        if let Err(e) = audit.record(sovereign_audit::Event::new("node", kind, details)) {
            tracing::error!("audit: recording {kind}: {e}");
        }
    }
}

/// How often one kind of ring refusal is written to the audit log: a rogue
/// host that keeps knocking cannot fill the log (the ring's metrics count
/// every refusal).
const REFUSAL_AUDIT_PERIOD: Duration = Duration::from_secs(60);

/// Records what the ring refuses (rogue announcements, connections, frames)
/// in the audit log: at most one record per kind and cable per
/// [`REFUSAL_AUDIT_PERIOD`], saying how many were left out since the last one.
async fn audit_refusals(
    mut refusals: tokio::sync::broadcast::Receiver<sovereign_ring::Refused>,
    audit: Arc<sovereign_audit::Auditor>,
) {
    let mut last: HashMap<(&'static str, String), (tokio::time::Instant, u64)> = HashMap::new();
    loop {
        let refusal = match refusals.recv().await {
            Ok(refusal) => refusal,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let now = tokio::time::Instant::now();
        let key = (refusal.kind, refusal.iface.clone());
        let unrecorded = match last.get_mut(&key) {
            Some((at, left_out)) if now.duration_since(*at) < REFUSAL_AUDIT_PERIOD => {
                *left_out += 1;
                continue;
            }
            Some((_, left_out)) => std::mem::take(left_out),
            None => 0,
        };
        last.insert(key, (now, 0));
        let details = json!({
            "what": refusal.kind,
            "iface": refusal.iface,
            "reason": refusal.reason,
            "unrecorded_before": unrecorded,
        });
        let event = sovereign_audit::Event::new("node", "ring-refused", details);
        if let Err(e) = tokio::task::block_in_place(|| audit.record(event)) {
            tracing::error!("audit: recording a ring refusal: {e}");
        }
    }
}

/// The ring as the API shows it.
struct Shown {
    seen: Arc<Mutex<Seen>>,
    core: Arc<Core>,
    ring: Arc<Ring>,
    replication: watch::Receiver<Replication>,
}

impl RingView for Shown {
    fn health(&self, detailed: bool) -> Map<String, Value> {
        let mut out = health(&self.seen, &self.core, detailed);
        if detailed {
            out.insert("replication".into(), json!(*self.replication.borrow()));
        }
        out
    }

    fn metrics(&self) -> String {
        let c = self.ring.counters();
        let links = self.ring.links();
        let counter = |name: &str, help: &str, value: u64| {
            sovereign_api::single_metric(name, "counter", help, value)
        };
        let mut out = [
            counter(
                "sovereign_ring_announcements_refused_total",
                "Ring announcements refused (malformed, rate-limited, bad certificate or signature, replayed).",
                c.announcements_refused,
            ),
            counter(
                "sovereign_ring_connections_refused_total",
                "Ring connections refused before a link came up (TLS refused: no, foreign, revoked or expired certificate; bad hello).",
                c.connections_refused,
            ),
            counter(
                "sovereign_ring_links_refused_total",
                "Ring links closed because the peer broke the protocol.",
                c.links_refused,
            ),
            counter(
                "sovereign_ring_messages_dropped_total",
                "Ring messages dropped (no route, no subscriber, too many hops).",
                c.messages_dropped,
            ),
        ]
        .concat();
        out.push_str("# HELP sovereign_ring_link_sent_bytes_total Bytes sent on a ring link.\n# TYPE sovereign_ring_link_sent_bytes_total counter\n");
        for link in &links {
            out.push_str(&format!(
                "sovereign_ring_link_sent_bytes_total{{iface=\"{}\",peer=\"{}\"}} {}\n",
                link.iface, link.peer, link.bytes_sent
            ));
        }
        out
    }
}

/// `/health`'s ring fields.
fn health(view: &Mutex<Seen>, core: &Core, detailed: bool) -> Map<String, Value> {
    let mut out = Map::new();
    if !detailed {
        return out;
    }
    let v = view.lock().unwrap_or_else(|e| e.into_inner());
    let ranges: BTreeMap<&str, [usize; 2]> = v
        .plan
        .iter()
        .flat_map(|p| p.stages.iter())
        .map(|s| (s.node.as_str(), [s.layers.start, s.layers.end]))
        .collect();
    let members: Vec<Value> = v
        .members
        .iter()
        .map(|(name, m)| {
            let mut m = m.clone();
            m["name"] = json!(name);
            m["layers"] = ranges.get(name.as_str()).map_or(Value::Null, |r| json!(r));
            if let Some(reason) = v.plan.as_ref().and_then(|p| p.left_out.get(name)) {
                m["left_out"] = json!(reason);
            }
            m
        })
        .collect();
    out.insert("node".into(), json!(core.name()));
    out.insert("members".into(), json!(members));
    out.insert(
        "ring".into(),
        json!({
            "serving": v.plan.is_some(),
            "order": v.plan.as_ref().map(|p| p.stages.iter().map(|s| s.node.clone()).collect::<Vec<_>>()),
            "version": v.plan.as_ref().map(|p| p.version.to_string()),
            "isa": v.plan.as_ref().map(|p| p.isa.name()),
            "problem": v.problem,
            "switch": v.switch.clone().map(|mut switch| {
                // Requests here waiting for it, counted now.
                switch["held"] = json!(v.drain.as_ref().map_or(0, |d| d.held()));
                switch
            }),
        }),
    );
    out
}

/// Runs the node until Ctrl-C or SIGTERM.
pub fn run(args: &NodeArgs) -> Result<(), NodeError> {
    let node = sovereign_identity::NodeIdentity::load(&args.identity).map_err(setup)?;
    let keys = sovereign_api::load_keys(args.keys.as_deref(), args.api_listen)?;
    if args.heartbeat_ms == 0 {
        return Err(NodeError::Setup("--heartbeat-ms must be at least 1".into()));
    }
    let revocations = Revocations::new(
        sovereign_store::installed_revocations(&args.store, node.ca()).map_err(setup)?,
    );
    let found = find_model(args)?;
    let name = node.name().to_owned();
    let audit = match &args.audit_log {
        // A log of its own signs with the enrolled key, as the daemon's does.
        Some(dir) => Some(sovereign_audit::Auditor::Local(Arc::new(
            sovereign_audit::AuditLog::open_enrolled(dir, &name, &node).map_err(setup)?,
        ))),
        None => sovereign_api::open_audit(None, args.audit_socket.as_deref(), &name)?,
    };
    let replication_audit = share_audit(&audit, args.audit_socket.as_deref())?;
    let refusal_audit = share_audit(&audit, args.audit_socket.as_deref())?;
    let courier_audit = share_audit(&audit, args.audit_socket.as_deref())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(sovereign_api::pem_server_config(cert, key).map_err(NodeError::Setup)?)
        }
        _ => args
            .api_tls
            .then(|| sovereign_identity::tls::lan_server_config(&node)),
    };
    let ca = node.ca().clone();
    let age = node.age_identity().cloned();
    let runtime = tokio::runtime::Runtime::new()?;
    let served = runtime.block_on(async {
        let stop = sovereign_api::Shutdown::on_signal()?;
        let heartbeat = Duration::from_millis(args.heartbeat_ms);
        let mut config = RingConfig::new(
            Identity::new(Arc::new(node), revocations.clone()),
            args.ring_interfaces.clone(),
        );
        config.port = args.ring_port;
        config.discovery_port = args.ring_port;
        config.heartbeat = heartbeat;
        config.dead_after = heartbeat * 5;
        config.advert = Advert {
            memory_budget_mb: args.memory_budget_mb,
            models: sovereign_replication::held_models(&args.store),
            isa: Isa::detect().name().into(),
            draining: false,
        };
        let advert = config.advert.clone();
        let ring = Arc::new(Ring::start(config).await?);
        let adverts = Adverts::new(Arc::clone(&ring), advert);
        if let Some(audit) = refusal_audit {
            tokio::spawn(audit_refusals(ring.refusals(), audit));
        }
        let courier = Courier::start(
            Arc::clone(&ring),
            courier_audit,
            ca.clone(),
            revocations.clone(),
        );
        if let Some(path) = &args.courier_socket {
            courier
                .serve(path)
                .map_err(|e| NodeError::Setup(format!("courier socket {}: {e}", path.display())))?;
        }
        tokio::spawn(watch_revocations(
            args.store.clone(),
            ca.clone(),
            revocations,
        ));
        let spool = args
            .spool
            .clone()
            .unwrap_or_else(|| crate::replicate::default_spool(&args.store));
        let mut replicate = sovereign_replication::Config::new(
            &name,
            &args.store,
            &spool,
            args.spool_capacity_mb << 20,
        );
        replicate.identity = age;
        replicate.trust = args.trust.clone();
        replicate.cluster_ca = Some(ca);
        replicate.audit = replication_audit;
        let replication =
            crate::replicate::start(Arc::clone(&ring), replicate, Arc::clone(&adverts));
        let model = match found {
            Some(model) => model,
            None => {
                let waited = wait_for_model(
                    args,
                    &ring,
                    &replication,
                    keys.clone(),
                    tls.clone(),
                    stop.clone(),
                );
                match waited.await? {
                    Some(model) => model,
                    None => return Ok(()),
                }
            }
        };
        let front = sovereign_inference::Front::load(&model.path).map_err(setup)?;
        if let Some(audit) = &audit {
            let details =
                json!({ "model": format!("{}@{}", model.name, model.version), "service": "node" });
            audit
                .record(sovereign_audit::Event::new("api", "model-loaded", details))
                .map_err(setup)?;
        }
        let (tx, mut outbox) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let core = Core::start(
            name.clone(),
            front.config().clone(),
            Box::new(RingLinks(tx)),
        );
        let sender = Arc::clone(&ring);
        tokio::spawn(async move {
            while let Some((to, payload)) = outbox.recv().await {
                if let Err(e) = sender.send(&to, Channel::Inference, payload.into()).await {
                    tracing::warn!(to, "ring: sending an inference frame: {e}");
                }
            }
        });
        let mut inbox = ring.subscribe(Channel::Inference);
        let receiver = Arc::clone(&core);
        tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                let _ = receiver.deliver(&message.from, &message.payload);
            }
        });
        let mut events = ring.link_events();
        let watcher = Arc::clone(&core);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(sovereign_ring::LinkEvent::Down {
                        iface,
                        peer,
                        reason,
                    }) => {
                        watcher.fail_pending(&format!(
                            "the link to {peer} on {iface} went down: {reason}"
                        ));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let view = Arc::new(Mutex::new(Seen::default()));
        let shown = Arc::new(Shown {
            seen: Arc::clone(&view),
            core: Arc::clone(&core),
            ring: Arc::clone(&ring),
            replication,
        });
        let drain = Drain::new();
        let mut draining = drain.subscribe();
        tokio::spawn(async move {
            while draining.changed().await.is_ok() {
                let now = *draining.borrow_and_update();
                adverts.update(|advert| advert.draining = now);
            }
        });
        let backend = Arc::new(RingBackend::new(
            Arc::clone(&core),
            front,
            shown,
            Arc::clone(&drain),
        ));
        let limits = sovereign_api::Limits {
            max_concurrency: args.max_concurrency.max(1),
            kv_budget_bytes: plan::KV_POSITIONS
                * model.footprint.kv_bytes_per_position
                * model.footprint.layers as u64,
            ..sovereign_api::Limits::default()
        };
        let state = sovereign_api::AppState::new(
            model.name.clone(),
            Arc::clone(&backend) as Arc<dyn sovereign_api::Backend>,
            keys,
            limits,
            audit,
        );
        eprintln!(
            "node {name}: {}@{} on the ring (port {}, interfaces {})",
            model.name,
            model.version,
            ring.port(),
            args.ring_interfaces.join(",")
        );
        let planner = Planner {
            membership: ring.membership(),
            core: Arc::clone(&core),
            model,
            store: args.store.clone(),
            backend,
            view: Arc::clone(&view),
            state: Arc::clone(&state),
            drain,
        };
        tokio::spawn(planner.run());
        sovereign_api::serve_until(args.api_listen, tls, state, stop).await?;
        Ok(())
    });
    // Stage threads and blocking loads are not waited for: a stop is prompt.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// A second handle on the node's audit log for replication's records.
fn share_audit(
    audit: &Option<sovereign_audit::Auditor>,
    socket: Option<&std::path::Path>,
) -> Result<Option<Arc<sovereign_audit::Auditor>>, NodeError> {
    Ok(match (audit, socket) {
        (Some(sovereign_audit::Auditor::Local(log)), _) => {
            Some(Arc::new(sovereign_audit::Auditor::Local(Arc::clone(log))))
        }
        (Some(sovereign_audit::Auditor::Remote(_)), Some(socket)) => {
            Some(Arc::new(sovereign_audit::Auditor::Remote(
                sovereign_audit::AuditClient::connect(socket).map_err(setup)?,
            )))
        }
        _ => None,
    })
}

/// Serves 503 on the API while the store holds no model, until one is live
/// (replicated or imported); `None` when stopped by Ctrl-C or SIGTERM first.
async fn wait_for_model(
    args: &NodeArgs,
    ring: &Arc<Ring>,
    replication: &watch::Receiver<Replication>,
    keys: Option<sovereign_api::ApiKeys>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    stop: sovereign_api::Shutdown,
) -> Result<Option<Model>, NodeError> {
    let name = ring.name().to_owned();
    eprintln!(
        "node {name}: the store holds no model yet; waiting for one (port {}, interfaces {})",
        ring.port(),
        args.ring_interfaces.join(",")
    );
    let health: sovereign_api::HealthFields = {
        let (name, membership, replication) =
            (name.clone(), ring.membership(), replication.clone());
        Arc::new(move |_| waiting_health(&name, &membership.borrow(), &replication.borrow()))
    };
    let reason = format!(
        "node {name} holds no model yet: it is waiting for one to be replicated over the ring or imported"
    );
    let (close, closed) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(sovereign_api::serve_unavailable(
        args.api_listen,
        tls,
        keys,
        health,
        reason,
        async move {
            let _ = closed.await;
        },
    ));
    let stopped = stop.requested();
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let found = loop {
        tokio::select! {
            _ = &mut stopped => break None,
            served = &mut server => {
                served.map_err(setup)??;
                return Err(NodeError::Setup("the API stopped".into()));
            }
            _ = tick.tick() => {
                if let Some(model) = find_model(args)? {
                    break Some(model);
                }
            }
        }
    };
    let _ = close.send(());
    server.await.map_err(setup)??;
    Ok(found)
}

/// `/health` of a node without a model: members, no plan, replication.
fn waiting_health(name: &str, view: &Membership, replication: &Replication) -> Map<String, Value> {
    let members: Vec<Value> = members_json(view)
        .into_iter()
        .map(|(member, mut m)| {
            m["name"] = json!(member);
            m["layers"] = Value::Null;
            m
        })
        .collect();
    let mut out = Map::new();
    out.insert("node".into(), json!(name));
    out.insert("model".into(), Value::Null);
    out.insert("members".into(), json!(members));
    out.insert(
        "ring".into(),
        json!({
            "serving": false,
            "order": null,
            "version": null,
            "isa": null,
            "problem": "this node holds no model yet",
        }),
    );
    out.insert("replication".into(), json!(replication));
    out
}

/// Puts a revocation list newly installed in the store (from a stick, or
/// replicated) in force for the ring's links within seconds.
async fn watch_revocations(
    store: PathBuf,
    ca: sovereign_identity::ClusterCa,
    revocations: Revocations,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        match sovereign_store::installed_revocations(&store, &ca) {
            Ok(list) => match revocations.update(list) {
                Ok(true) => tracing::info!(
                    sequence = revocations.current().sequence(),
                    "ring: a newer revocation list is in force"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!("ring: revocation list refused: {e}"),
            },
            Err(e) => tracing::warn!("ring: reading the store's revocation list: {e}"),
        }
    }
}
