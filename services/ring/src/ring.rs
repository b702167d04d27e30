//! The ring service: ties kernel link state, discovery, authenticated links
//! and the link-state topology together, and offers the transport API.
//!
//! One control task owns the topology and decides (links up and down,
//! dialing, reports, adverts); link reader tasks deliver and relay data
//! directly, looking routes up in the shared state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::sync::CancellationToken;

use crate::auth::{peer_of, Identity};
use crate::config::{Advert, RingConfig};
use crate::discovery::{Discovered, Discovery, Refusal};
use crate::error::RingError;
use crate::link::{self, LinkHandle, LinkOwner};
use crate::netlink::{self, IfaceState};
use crate::ratelimit::LogLimit;
use crate::topology::{Membership, Report, Topology};
use crate::wire::{Channel, Data, Frame, MAX_PAYLOAD};

/// Messages a subscriber may have waiting before the link delivering to it waits.
const SUBSCRIBER_QUEUE: usize = 1024;
/// Handshakes in progress at once; more connections are dropped.
const MAX_HANDSHAKES: usize = 32;
/// Relays a message may take (longer paths mean a routing loop).
const MAX_HOPS: u8 = 32;

/// A message for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The member that sent it.
    pub from: String,
    /// The channel it came on.
    pub channel: Channel,
    /// What it carries.
    pub payload: Bytes,
}

/// A link to a neighbour came up or went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// An authenticated link is up.
    Up {
        /// The ring interface (cable).
        iface: String,
        /// The neighbour.
        peer: String,
    },
    /// A link went down.
    Down {
        /// The ring interface (cable).
        iface: String,
        /// The neighbour.
        peer: String,
        /// Why (carrier lost, peer hangs, closed, refused frame).
        reason: String,
    },
}

/// Something the ring refused (a rogue announcement, connection or frame),
/// as often as it is logged: at most 5 a second per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What was refused: `announcement`, `tls`, `hello`, `frame`, `dial`,
    /// `iface` or `busy`.
    pub kind: &'static str,
    /// The ring interface (cable) it came on; `-` when not on one.
    pub iface: String,
    /// The log line: who, on which cable, and why.
    pub reason: String,
}

/// The traffic of one link, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStats {
    /// The ring interface (cable).
    pub iface: String,
    /// The neighbour.
    pub peer: String,
    /// Bytes sent, frame headers included.
    pub bytes_sent: u64,
    /// Bytes received, frame headers included.
    pub bytes_received: u64,
    /// Frames sent (heartbeats included).
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// When the link came up.
    pub since: SystemTime,
}

/// What the ring refused and dropped since it started, for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// Announcements dropped: malformed, rate-limited, bad certificate or
    /// signature, other protocol version, replayed or duplicate.
    pub announcements_refused: u64,
    /// Connections refused before a link came up: not on a ring
    /// interface, too many handshakes, TLS refused (no, foreign, revoked
    /// or expired certificate), bad hello or other protocol version.
    pub connections_refused: u64,
    /// Links closed because the peer broke the protocol (a frame over the
    /// maximum, one that does not decode).
    pub links_refused: u64,
    /// Messages dropped: no subscriber, no route when relaying, too many hops.
    pub messages_dropped: u64,
    /// Log lines about refusals left out by the log rate limit.
    pub logs_suppressed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    announcements_refused: AtomicU64,
    connections_refused: AtomicU64,
    links_refused: AtomicU64,
    messages_dropped: AtomicU64,
}

/// What the control task is told.
enum Control {
    Iface(IfaceState),
    Discovered(u32, Discovered),
    DialDone(u32, String),
    LinkUp(LinkHandle),
    LinkClosed(u64, String),
    Report(u64, Report),
    Advert(Advert),
    Refresh,
}

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<u64, LinkHandle>,
    next_hop: BTreeMap<String, String>,
    ifaces: HashMap<u32, IfaceState>,
}

struct Shared {
    name: String,
    identity: Identity,
    interfaces: Vec<String>,
    heartbeat: Duration,
    dead_after: Duration,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    discovery: Discovery,
    state: Mutex<State>,
    subscribers: Mutex<HashMap<Channel, Vec<mpsc::Sender<Message>>>>,
    membership: watch::Sender<Membership>,
    events: broadcast::Sender<LinkEvent>,
    refusals: broadcast::Sender<Refused>,
    control: mpsc::UnboundedSender<Control>,
    counters: Counters,
    logs: LogLimit,
    next_link: AtomicU64,
    shutdown: CancellationToken,
}

/// A running ring node. Dropping it leaves the ring: every task and link stops.
pub struct Ring {
    shared: Arc<Shared>,
    port: u16,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ring {
    /// Starts the ring on this host: listens for links on `config.port`,
    /// watches the ring interfaces through netlink, announces itself on
    /// each and links up with every certified peer it hears. Must be called
    /// inside a tokio runtime.
    pub async fn start(config: RingConfig) -> Result<Ring, RingError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| RingError::Io { what, source }
        };
        let listener =
            listen(config.port).map_err(io(&format!("listening on port {}", config.port)))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the link port"))?
            .port();
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let identity = config.identity.clone();
        let name = identity.name().to_string();
        let discovery = Discovery::bind(
            identity.clone(),
            config.discovery_port,
            port,
            incarnation,
            config.advert.clone(),
        )
        .map_err(io(&format!(
            "binding discovery port {}",
            config.discovery_port
        )))?;
        let (iface_tx, iface_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let own = Report {
            origin: name.clone(),
            incarnation,
            seq: 0,
            advert: config.advert.clone(),
            neighbours: BTreeSet::new(),
        };
        let mut topology = Topology::new(own);
        let members = topology.view().members;
        let (membership, _) = watch::channel(Membership { epoch: 1, members });
        let shared = Arc::new(Shared {
            name,
            acceptor: TlsAcceptor::from(identity.server_config()),
            connector: TlsConnector::from(identity.client_config()),
            identity,
            interfaces: config.interfaces.clone(),
            heartbeat: config.heartbeat,
            dead_after: config.dead_after,
            discovery,
            state: Mutex::new(State::default()),
            subscribers: Mutex::new(HashMap::new()),
            membership,
            events: broadcast::channel(256).0,
            refusals: broadcast::channel(64).0,
            control: control_tx,
            counters: Counters::default(),
            logs: LogLimit::new(),
            next_link: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        });
        tracing::info!(node = %shared.name, port, interfaces = ?config.interfaces, "ring: started");
        let cancel = shared.shutdown.clone();
        spawn_until(&cancel, async move {
            if let Err(e) = netlink::watch(iface_tx).await {
                tracing::error!(error = %e, "ring: link monitoring stopped");
            }
        });
        spawn_until(&cancel, forward_ifaces(shared.clone(), iface_rx));
        spawn_until(&cancel, control(shared.clone(), control_rx, topology));
        spawn_until(&cancel, accept(shared.clone(), listener));
        spawn_until(&cancel, receive_announcements(shared.clone()));
        spawn_until(&cancel, announce(shared.clone()));
        Ok(Ring { shared, port })
    }

    /// This node's name (its certificate's subject).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The TCP port links are accepted on (the one announced).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The membership view; it changes when members join or leave, their
    /// adverts or their links change.
    pub fn membership(&self) -> watch::Receiver<Membership> {
        self.shared.membership.subscribe()
    }

    /// Changes what this node offers; every member sees it shortly.
    pub fn set_advert(&self, advert: Advert) {
        let _ = self.shared.control.send(Control::Advert(advert));
    }

    /// Sends `payload` to member `to` on `channel`: over the link to it, or
    /// relayed by members when it is not a neighbour (to itself: delivered
    /// locally). `Ok` means handed to the first link, in order after earlier
    /// messages to the same member; it waits while that link's queue is full.
    pub async fn send(&self, to: &str, channel: Channel, payload: Bytes) -> Result<(), RingError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RingError::TooLarge(payload.len()));
        }
        let data = Data {
            from: self.shared.name.clone(),
            to: to.to_string(),
            channel,
            hops_left: MAX_HOPS,
            payload,
        };
        self.shared.route(data).await
    }

    /// A new receiver of the messages for this node on `channel` (each
    /// receiver gets every message). Keep it drained: a full receiver makes
    /// the link delivering to it wait.
    pub fn subscribe(&self, channel: Channel) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        lock(&self.shared.subscribers)
            .entry(channel)
            .or_default()
            .push(tx);
        rx
    }

    /// Link up/down events from now on.
    pub fn link_events(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// What the ring refuses from now on (rate-limited like its log lines).
    pub fn refusals(&self) -> broadcast::Receiver<Refused> {
        self.shared.refusals.subscribe()
    }

    /// Every link now up, with its traffic counters.
    pub fn links(&self) -> Vec<LinkStats> {
        lock(&self.shared.state)
            .links
            .values()
            .map(|l| LinkStats {
                iface: l.iface.clone(),
                peer: l.peer.clone(),
                bytes_sent: l.counters.bytes_sent.load(Ordering::Relaxed),
                bytes_received: l.counters.bytes_received.load(Ordering::Relaxed),
                frames_sent: l.counters.frames_sent.load(Ordering::Relaxed),
                frames_received: l.counters.frames_received.load(Ordering::Relaxed),
                since: l.since,
            })
            .collect()
    }

    /// What was refused and dropped since the start.
    pub fn counters(&self) -> RingCounters {
        let c = &self.shared.counters;
        RingCounters {
            announcements_refused: c.announcements_refused.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            links_refused: c.links_refused.load(Ordering::Relaxed),
            messages_dropped: c.messages_dropped.load(Ordering::Relaxed),
            logs_suppressed: self.shared.logs.suppressed(),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

fn spawn_until(
    cancel: &CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = task => {}
        }
    });
}

/// The link listener: IPv6 only, on every interface (connections from
/// anything but a ring interface are refused when accepted).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

impl Shared {
    fn refused(
        &self,
        counter: &AtomicU64,
        kind: &'static str,
        iface: &str,
        message: std::fmt::Arguments<'_>,
    ) {
        counter.fetch_add(1, Ordering::Relaxed);
        if self.logs.allow(kind) {
            tracing::warn!("ring: {message}");
            let _ = self.refusals.send(Refused {
                kind,
                iface: iface.to_owned(),
                reason: message.to_string(),
            });
        }
    }

    /// The up ring interface with index `index`.
    fn ring_iface(&self, index: u32) -> Option<String> {
        let state = lock(&self.state);
        state
            .ifaces
            .get(&index)
            .filter(|i| i.up)
            .map(|i| i.name.clone())
    }

    /// Delivers `data` here, or passes it on towards its member.
    async fn route(&self, data: Data) -> Result<(), RingError> {
        if data.to == self.name {
            self.deliver(data).await;
            return Ok(());
        }
        let tx = {
            let state = lock(&self.state);
            state
                .next_hop
                .get(&data.to)
                .and_then(|hop| state.links.values().find(|l| &l.peer == hop))
                .map(|l| l.tx.clone())
        };
        let to = data.to.clone();
        let tx = tx.ok_or_else(|| RingError::NoRoute(to.clone()))?;
        tx.send(Frame::Data(data))
            .await
            .map_err(|_| RingError::LinkClosed(to))
    }

    async fn deliver(&self, data: Data) {
        let subscribers = lock(&self.subscribers)
            .get(&data.channel)
            .cloned()
            .unwrap_or_default();
        let message = Message {
            from: data.from,
            channel: data.channel,
            payload: data.payload,
        };
        let mut delivered = false;
        for tx in &subscribers {
            delivered |= tx.send(message.clone()).await.is_ok();
        }
        if !delivered {
            self.counters
                .messages_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(from = %message.from, channel = ?message.channel, "ring: no subscriber, message dropped");
            lock(&self.subscribers)
                .entry(message.channel)
                .or_default()
                .retain(|tx| !tx.is_closed());
        }
    }

    /// Sets a link up from an established TLS stream with a certified peer.
    async fn establish(
        self: &Arc<Self>,
        stream: TlsStream<TcpStream>,
        index: u32,
        iface: String,
        (peer, serial): (String, u64),
    ) {
        let framed =
            match link::handshake(stream, self.dead_after.max(Duration::from_secs(2))).await {
                Ok(framed) => framed,
                Err(e) => {
                    self.refused(
                        &self.counters.connections_refused,
                        "hello",
                        &iface,
                        format_args!("refused link with {peer} on {iface}: {e}"),
                    );
                    return;
                }
            };
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (handle, queue) = link::handle(
            id,
            iface,
            index,
            (peer, serial),
            self.shutdown.child_token(),
        );
        let _ = self.control.send(Control::LinkUp(handle.clone()));
        link::spawn(
            framed,
            handle,
            queue,
            self.clone(),
            self.heartbeat,
            self.dead_after,
        );
    }
}

impl LinkOwner for Shared {
    async fn frame(&self, link: &LinkHandle, frame: Frame) {
        match frame {
            Frame::Heartbeat => {}
            Frame::Report(report) => {
                let _ = self.control.send(Control::Report(link.id, report));
            }
            Frame::Data(mut data) => {
                if data.to != self.name {
                    if data.hops_left == 0 {
                        self.counters
                            .messages_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    data.hops_left -= 1;
                }
                if let Err(e) = self.route(data).await {
                    self.counters
                        .messages_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "ring: relayed message dropped");
                }
            }
        }
    }

    fn closed(&self, link: &LinkHandle, reason: String, protocol: bool) {
        if protocol {
            self.refused(
                &self.counters.links_refused,
                "frame",
                &link.iface,
                format_args!("closed link with {} on {}: {reason}", link.peer, link.iface),
            );
        }
        let _ = self.control.send(Control::LinkClosed(link.id, reason));
    }
}

async fn forward_ifaces(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<IfaceState>) {
    while let Some(state) = rx.recv().await {
        if crate::config::matches_interface(&shared.interfaces, &state.name) {
            let _ = shared.control.send(Control::Iface(state));
        }
    }
}

async fn announce(shared: Arc<Shared>) {
    let mut tick = crate::periodic::every(shared.heartbeat);
    let mut count = 0u64;
    loop {
        tick.tick().await;
        let up: Vec<u32> = lock(&shared.state)
            .ifaces
            .values()
            .filter(|i| i.up)
            .map(|i| i.index)
            .collect();
        for index in up {
            shared.discovery.announce(index).await;
        }
        count += 1;
        if count.is_multiple_of(8) {
            let _ = shared.control.send(Control::Refresh);
        }
    }
}

async fn receive_announcements(shared: Arc<Shared>) {
    loop {
        let (index, result) = match shared.discovery.receive().await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(error = %e, "ring: discovery socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(iface) = shared.ring_iface(index) else {
            continue;
        };
        match result {
            Ok(found) => {
                let _ = shared.control.send(Control::Discovered(index, found));
            }
            Err(Refusal::Own) => {}
            Err(e) => shared.refused(
                &shared.counters.announcements_refused,
                "announcement",
                &iface,
                format_args!("refused announcement on {iface}: {e}"),
            ),
        }
    }
}

async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "ring: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V6(from) = from else { continue };
        let Some(iface) = shared.ring_iface(from.scope_id()) else {
            shared.refused(
                &shared.counters.connections_refused,
                "iface",
                "-",
                format_args!("refused connection from {from}: not on a ring interface"),
            );
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared.refused(
                &shared.counters.connections_refused,
                "busy",
                &iface,
                format_args!("refused connection from {from} on {iface}: too many handshakes"),
            );
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let limit = shared.dead_after.max(Duration::from_secs(2));
            let tls = match tokio::time::timeout(limit, shared.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    return shared.refused(
                        &shared.counters.connections_refused,
                        "tls",
                        &iface,
                        format_args!("refused connection from {from} on {iface}: {e}"),
                    )
                }
                Err(_) => {
                    return shared.refused(
                        &shared.counters.connections_refused,
                        "tls",
                        &iface,
                        format_args!("refused connection from {from} on {iface}: no TLS handshake within {limit:?}"),
                    )
                }
            };
            let Some(peer) = peer_of(tls.get_ref().1) else {
                return;
            };
            shared
                .establish(
                    TlsStream::Server(tls),
                    from.scope_id(),
                    iface,
                    (peer.name, peer.serial),
                )
                .await;
        });
    }
}

async fn dial(shared: Arc<Shared>, index: u32, iface: String, found: Discovered) {
    let limit = shared.dead_after.max(Duration::from_secs(2));
    let attempt = async {
        let tcp = TcpStream::connect(found.addr)
            .await
            .map_err(|e| format!("connecting to {}: {e}", found.addr))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(found.peer.clone())
            .map_err(|e| format!("node name {} is not a DNS name: {e}", found.peer))?;
        let tls = shared
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", found.addr))?;
        match peer_of(tls.get_ref().1) {
            Some(peer) if peer.name == found.peer => Ok((tls, peer.serial)),
            _ => Err(format!(
                "{} did not present {}'s certificate",
                found.addr, found.peer
            )),
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok((tls, serial))) => {
            shared
                .establish(
                    TlsStream::Client(tls),
                    index,
                    iface,
                    (found.peer.clone(), serial),
                )
                .await
        }
        Ok(Err(e)) => shared.refused(
            &shared.counters.connections_refused,
            "dial",
            &iface,
            format_args!("no link with {} on {iface}: {e}", found.peer),
        ),
        Err(_) => shared.refused(
            &shared.counters.connections_refused,
            "dial",
            &iface,
            format_args!(
                "no link with {} on {iface}: no handshake within {limit:?}",
                found.peer
            ),
        ),
    }
    let _ = shared.control.send(Control::DialDone(index, found.peer));
}

/// The control task: the only writer of the topology and the link table.
async fn control(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Control>,
    mut topology: Topology,
) {
    let mut dialing: HashSet<(u32, String)> = HashSet::new();
    let mut advert = topology.own().advert.clone();
    while let Some(message) = rx.recv().await {
        let mut changed = false;
        match message {
            Control::Iface(iface) => {
                let was_up = lock(&shared.state)
                    .ifaces
                    .get(&iface.index)
                    .is_some_and(|i| i.up);
                lock(&shared.state)
                    .ifaces
                    .insert(iface.index, iface.clone());
                if iface.up && !was_up {
                    tracing::info!(iface = %iface.name, "ring: interface up");
                    shared.discovery.join(iface.index);
                    shared.discovery.announce(iface.index).await;
                } else if !iface.up && was_up {
                    tracing::info!(iface = %iface.name, "ring: interface down (carrier lost)");
                    let gone: Vec<u64> = lock(&shared.state)
                        .links
                        .values()
                        .filter(|l| l.index == iface.index)
                        .map(|l| l.id)
                        .collect();
                    for id in gone {
                        changed |=
                            close_link(&shared, id, format!("carrier lost on {}", iface.name));
                    }
                }
            }
            Control::Discovered(index, found) => {
                let Some(iface) = shared.ring_iface(index) else {
                    continue;
                };
                let linked = lock(&shared.state)
                    .links
                    .values()
                    .any(|l| l.index == index && l.peer == found.peer);
                let key = (index, found.peer.clone());
                if !linked && shared.name < found.peer && !dialing.contains(&key) {
                    dialing.insert(key);
                    tokio::spawn(dial(shared.clone(), index, iface, found));
                }
            }
            Control::DialDone(index, peer) => {
                dialing.remove(&(index, peer));
            }
            Control::LinkUp(handle) => {
                let stale: Vec<u64> = lock(&shared.state)
                    .links
                    .values()
                    .filter(|l| l.index == handle.index && l.peer == handle.peer)
                    .map(|l| l.id)
                    .collect();
                for id in stale {
                    close_link(&shared, id, "replaced by a new link".into());
                }
                tracing::info!(peer = %handle.peer, iface = %handle.iface, "ring: link up");
                for report in topology.reports() {
                    let _ = handle.tx.try_send(Frame::Report(report.clone()));
                }
                let _ = shared.events.send(LinkEvent::Up {
                    iface: handle.iface.clone(),
                    peer: handle.peer.clone(),
                });
                lock(&shared.state).links.insert(handle.id, handle);
                changed = true;
            }
            Control::LinkClosed(id, reason) => {
                changed |= close_link(&shared, id, reason);
            }
            Control::Report(from, report) => {
                if topology.accept(report.clone()) {
                    flood(&shared, &report, Some(from));
                    publish(&shared, &mut topology);
                }
            }
            Control::Advert(new) => {
                shared.discovery.set_advert(new.clone());
                advert = new;
                changed = true;
            }
            Control::Refresh => {
                // A revocation list that arrived since a link came up closes it.
                let revoked: Vec<u64> = lock(&shared.state)
                    .links
                    .values()
                    .filter(|l| shared.identity.is_revoked(l.serial))
                    .map(|l| l.id)
                    .collect();
                for id in revoked {
                    close_link(&shared, id, "certificate revoked".into());
                }
                changed = true;
            }
        }
        if changed {
            let neighbours = lock(&shared.state)
                .links
                .values()
                .map(|l| l.peer.clone())
                .collect();
            let own = topology.update_own(advert.clone(), neighbours);
            flood(&shared, &own, None);
            publish(&shared, &mut topology);
        }
    }
}

/// Removes and closes link `id`; whether it was there.
fn close_link(shared: &Shared, id: u64, reason: String) -> bool {
    let Some(link) = lock(&shared.state).links.remove(&id) else {
        return false;
    };
    link.close.cancel();
    tracing::info!(peer = %link.peer, iface = %link.iface, %reason, "ring: link down");
    let _ = shared.events.send(LinkEvent::Down {
        iface: link.iface,
        peer: link.peer,
        reason,
    });
    true
}

/// Sends `report` on every link but `except`.
fn flood(shared: &Shared, report: &Report, except: Option<u64>) {
    let state = lock(&shared.state);
    for link in state.links.values().filter(|l| Some(l.id) != except) {
        if link.tx.try_send(Frame::Report(report.clone())).is_err() {
            tracing::debug!(peer = %link.peer, "ring: link queue full, report left for the next refresh");
        }
    }
}

/// Recomputes routes and publishes the membership when it changed.
fn publish(shared: &Shared, topology: &mut Topology) {
    let view = topology.view();
    lock(&shared.state).next_hop = view.next_hop;
    shared.membership.send_if_modified(|current| {
        if current.members == view.members {
            return false;
        }
        current.epoch += 1;
        current.members = view.members;
        tracing::info!(epoch = current.epoch, members = ?current.members.keys().collect::<Vec<_>>(), "ring: membership");
        true
    });
}
