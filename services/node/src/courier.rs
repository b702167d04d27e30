//! The auditor's courier across the ring: every member answers a courier ask
//! on the ring's control channel with a package from its own audit log, and
//! the node a stick is plugged into gathers the ring's packages for the stick
//! unit on a Unix socket (`sovereign_audit::write_ring_courier` is the
//! client). A member's package is handed over only if it is its own: named
//! after it, signed by the key of a certificate the cluster CA issued to it
//! (not revoked), its proof linking the stick's previous checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sovereign_audit::{
    verify_package_with_ca, Auditor, CourierPackage, RingCourierReply, RingCourierRequest,
    MAX_RING_COURIER_BYTES, MAX_RING_NODES,
};
use sovereign_identity::{ClusterCa, RevocationList, Revocations};
use sovereign_ring::{Channel, Ring};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};

/// How long the members asked are waited for.
const MEMBER_WAIT: Duration = Duration::from_secs(10);
/// How long a socket client may take to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// Members' courier asks answered at once (each asks this node's audit log).
const ANSWERING: usize = 4;

/// Control-channel messages of the courier (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Control {
    /// A stick's courier step on member `from` asks for this member's package.
    CourierAsk {
        /// The asker's number for this step.
        id: u64,
        /// This member's checkpoint on the stick, if it carries one.
        previous: Option<String>,
    },
    /// The answer: a package, or why there is none.
    CourierPackage {
        /// The ask's number.
        id: u64,
        /// The package from the member's own audit log.
        package: Result<CourierPackage, String>,
    },
}

type Answer = (String, Result<CourierPackage, String>);

/// The node's side of the ring courier.
pub struct Courier {
    ring: Arc<Ring>,
    auditor: Option<Arc<Auditor>>,
    ca: ClusterCa,
    revocations: Revocations,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Answer>>>,
    answering: Arc<Semaphore>,
}

impl Courier {
    /// Answers members' courier asks with `auditor`'s packages and routes
    /// their answers to this node's gatherings.
    pub fn start(
        ring: Arc<Ring>,
        auditor: Option<Arc<Auditor>>,
        ca: ClusterCa,
        revocations: Revocations,
    ) -> Arc<Self> {
        let mut inbox = ring.subscribe(Channel::Control);
        let courier = Arc::new(Self {
            ring,
            auditor,
            ca,
            revocations,
            next: AtomicU64::new(1),
            waiting: Mutex::default(),
            answering: Arc::new(Semaphore::new(ANSWERING)),
        });
        let receiver = Arc::clone(&courier);
        tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                receiver.receive(message.from, &message.payload);
            }
        });
        courier
    }

    /// Never waits: the control channel is kept drained (a full receiver
    /// would hold up the link delivering to it); asks are answered by tasks
    /// of their own, at most [`ANSWERING`] at once.
    fn receive(self: &Arc<Self>, from: String, payload: &[u8]) {
        if payload.len() as u64 > MAX_RING_COURIER_BYTES {
            tracing::warn!(peer = %from, bytes = payload.len(), "control message too large: dropped");
            return;
        }
        match serde_json::from_slice::<Control>(payload) {
            Ok(Control::CourierAsk { id, previous }) => {
                let Ok(permit) = Arc::clone(&self.answering).try_acquire_owned() else {
                    tracing::warn!(peer = %from, "courier asks come faster than they are answered: one dropped");
                    return;
                };
                let courier = Arc::clone(self);
                tokio::spawn(async move {
                    let package = courier.own_package(previous).await;
                    drop(permit);
                    if let Err(reason) = &package {
                        tracing::warn!(peer = %from, %reason, "no courier package for a member");
                    }
                    let answer = Control::CourierPackage { id, package };
                    let bytes = serde_json::to_vec(&answer).expect("a courier answer serializes");
                    if let Err(e) = courier
                        .ring
                        .send(&from, Channel::Control, bytes.into())
                        .await
                    {
                        tracing::warn!(peer = %from, "cannot answer a courier ask: {e}");
                    }
                });
            }
            Ok(Control::CourierPackage { id, package }) => {
                let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(gathering) = waiting.get(&id) {
                    let _ = gathering.send((from, package));
                }
            }
            Err(e) => tracing::warn!(peer = %from, "malformed control message: {e}"),
        }
    }

    /// This node's package, its checkpoint on the stick being `previous`.
    async fn own_package(&self, previous: Option<String>) -> Result<CourierPackage, String> {
        let Some(auditor) = self.auditor.clone() else {
            return Err("this node keeps no audit log".into());
        };
        tokio::task::spawn_blocking(move || {
            auditor
                .courier(previous.as_deref())
                .map_err(|e| format!("its audit log: {e}"))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the courier task failed: {e}")))
    }

    /// Every member's checked package (this node's included) but those the
    /// request says are written already, and why the others, and the nodes
    /// the stick carries that are not members now, have none.
    pub async fn gather(&self, request: &RingCourierRequest) -> RingCourierReply {
        let members: Vec<String> = self
            .ring
            .membership()
            .borrow()
            .members
            .keys()
            .filter(|member| !request.written.contains(member))
            .take(MAX_RING_NODES)
            .cloned()
            .collect();
        let me = self.ring.name().to_owned();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut answers_rx) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let mut answers = BTreeMap::new();
        let mut asked = BTreeSet::new();
        for member in &members {
            let previous = request.previous.get(member).cloned();
            if *member == me {
                answers.insert(me.clone(), self.own_package(previous).await);
                continue;
            }
            let ask = Control::CourierAsk { id, previous };
            let bytes = serde_json::to_vec(&ask).expect("a courier ask serializes");
            match self.ring.send(member, Channel::Control, bytes.into()).await {
                Ok(()) => {
                    asked.insert(member.clone());
                }
                Err(e) => {
                    answers.insert(member.clone(), Err(format!("cannot reach it: {e}")));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + MEMBER_WAIT;
        while asked.iter().any(|m| !answers.contains_key(m)) {
            match tokio::time::timeout_at(deadline, answers_rx.recv()).await {
                Ok(Some((from, package))) if asked.contains(&from) => {
                    answers.entry(from).or_insert(package);
                }
                Ok(Some((from, _))) => {
                    tracing::warn!(peer = %from, "a courier answer nobody asked for: ignored")
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let revocations = self.revocations.current();
        let now = SystemTime::now();
        let mut reply = RingCourierReply::default();
        for member in members {
            let checked = match answers.remove(&member) {
                Some(Ok(package)) => self
                    .check(&member, &package, &revocations, now)
                    .map(|()| package),
                Some(Err(reason)) => Err(reason),
                None => Err(format!("no answer within {} s", MEMBER_WAIT.as_secs())),
            };
            match checked {
                Ok(package) => reply.packages.push(package),
                Err(reason) => {
                    tracing::warn!(%member, %reason, "no courier package from a member");
                    reply.missing.insert(member, reason);
                }
            }
        }
        // Nodes the stick carries that are not in the ring now keep their folders.
        for node in request.previous.keys().take(MAX_RING_NODES) {
            if !reply.packages.iter().any(|p| p.node == *node)
                && !reply.missing.contains_key(node)
                && !request.written.contains(node)
            {
                reply
                    .missing
                    .insert(node.clone(), "not a member of the ring now".into());
            }
        }
        reply
    }

    /// A member's package is its own and verifies against the cluster CA.
    fn check(
        &self,
        member: &str,
        package: &CourierPackage,
        revocations: &RevocationList,
        now: SystemTime,
    ) -> Result<(), String> {
        if package.node != member {
            return Err(format!(
                "it answered with a package of {:?}: refused",
                package.node
            ));
        }
        let (_, peer) = verify_package_with_ca(package, &self.ca, revocations, now)
            .map_err(|e| format!("its package does not verify: {e}"))?;
        if peer.name != member {
            return Err(format!(
                "its package is signed by the key of {}: refused",
                peer.name
            ));
        }
        Ok(())
    }

    /// Serves the stick unit's requests on the Unix socket `path` (owner
    /// only), one at a time. A socket left by an earlier run is replaced;
    /// any other file there is an error.
    pub fn serve(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a socket",
                    path.display()
                )));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let courier = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => courier.answer(stream).await,
                    Err(e) => {
                        tracing::warn!("courier socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// One request line in, one reply line out.
    async fn answer(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_RING_COURIER_BYTES));
        let read = tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line)).await;
        let request = match read {
            Ok(Ok(_)) if line.ends_with('\n') => serde_json::from_str::<RingCourierRequest>(&line),
            _ => {
                tracing::warn!("courier socket: no complete request line");
                return;
            }
        };
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!("courier socket: a bad request: {e}");
                return;
            }
        };
        let reply = self.gather(&request).await;
        tracing::info!(
            packages = reply.packages.len(),
            missing = reply.missing.len(),
            "ring courier step"
        );
        let mut bytes = serde_json::to_vec(&reply).expect("a courier reply serializes");
        bytes.push(b'\n');
        if let Err(e) = write.write_all(&bytes).await {
            tracing::warn!("courier socket: cannot reply: {e}");
        }
    }
}
