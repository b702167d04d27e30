//! The ring transport on real kernel networking: nodes in network
//! namespaces cabled by veth pairs named like Thunderbolt interfaces,
//! identities from a real cluster CA, real rustls, real netlink. Needs root.
//! No test asserts a time: waits are bounded only so a broken ring fails.

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use sovereign_identity::{tls, NodeIdentity, Revocations};
use sovereign_provisioning::cluster::{Cluster, EnrollRequest};
use sovereign_ring::{
    wire, Channel, Identity, LinkEvent, Membership, Ring, RingConfig, RingCounters, GROUP,
};
use sovereign_vm_tests::netns::{enter_namespace, NetNode, RingNet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::runtime::Runtime;
use tokio_rustls::rustls::{
    self,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

const WAIT: Duration = Duration::from_secs(60);

/// A cluster CA in a temp dir, enrolling nodes.
struct Ca {
    dir: tempfile::TempDir,
    cluster: Cluster,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::init(&dir.path().join("ca"), name, None).unwrap();
        Ca { dir, cluster }
    }

    fn enroll(&mut self, name: &str, days: u64) -> NodeIdentity {
        let request = EnrollRequest {
            name: name.into(),
            days,
            ..EnrollRequest::default()
        };
        let out = self.dir.path().join(format!("{name}.node"));
        self.cluster.enroll(&request, &out).unwrap().identity
    }

    fn revocations(&self) -> Revocations {
        Revocations::new(self.cluster.revocation_list().unwrap())
    }
}

/// A tokio runtime whose threads all live in a node's namespace: sockets
/// opened by its tasks are that node's.
fn runtime_in(node: &NetNode) -> Runtime {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let path = node.path();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || enter_namespace(&path).expect("entering the namespace"))
        .build()
        .unwrap()
}

/// A ring node started the documented way, in its namespace.
struct Node {
    ring: Option<Ring>,
    runtime: Runtime,
}

impl Node {
    fn start(net_node: &NetNode, identity: Arc<NodeIdentity>, revocations: Revocations) -> Node {
        Node::start_with(net_node, identity, revocations, |_| {})
    }

    fn start_with(
        net_node: &NetNode,
        identity: Arc<NodeIdentity>,
        revocations: Revocations,
        tune: impl FnOnce(&mut RingConfig),
    ) -> Node {
        let runtime = runtime_in(net_node);
        let mut config = RingConfig::new(
            Identity::new(identity, revocations),
            vec!["thunderbolt*".into()],
        );
        config.heartbeat = Duration::from_millis(200);
        config.dead_after = Duration::from_secs(1);
        tune(&mut config);
        let ring = runtime
            .block_on(runtime.spawn(Ring::start(config)))
            .unwrap()
            .unwrap();
        Node {
            ring: Some(ring),
            runtime,
        }
    }

    fn ring(&self) -> &Ring {
        self.ring.as_ref().unwrap()
    }

    fn view(&self) -> Membership {
        self.ring().membership().borrow().clone()
    }

    fn send(&self, to: &str, text: &str) {
        self.runtime
            .block_on(
                self.ring()
                    .send(to, Channel::Control, Bytes::from(text.to_string())),
            )
            .unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ring.take();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn names(view: &Membership) -> Vec<&str> {
    view.members.keys().map(String::as_str).collect()
}

fn neighbours(view: &Membership, name: &str) -> Vec<String> {
    view.members
        .get(name)
        .map(|m| m.neighbours.iter().cloned().collect())
        .unwrap_or_default()
}

fn wait_members(node: &Node, expected: &[&str]) {
    wait_until(
        &format!("{} to see {expected:?}", node.ring().name()),
        || names(&node.view()) == expected,
    );
}

/// The link-local address of `iface` in `node`'s namespace.
fn link_local(node: &NetNode, iface: &str) -> Ipv6Addr {
    let out = node
        .run(
            "ip",
            &["-6", "-o", "addr", "show", "dev", iface, "scope", "link"],
        )
        .unwrap();
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .unwrap();
    addr.split('/').next().unwrap().parse().unwrap()
}

/// The index of `iface` in `node`'s namespace.
fn if_index(node: &NetNode, iface: &str) -> u32 {
    let out = node
        .run("ip", &["-o", "link", "show", "dev", iface])
        .unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn three_nodes_find_each_other_on_a_closed_ring_with_no_address_configured() {
    let net = RingNet::ring(3).unwrap();
    let mut ca = Ca::new("ring-test");
    let names_ = ["node-a", "node-b", "node-c"];
    let ids: Vec<_> = names_.iter().map(|n| Arc::new(ca.enroll(n, 30))).collect();
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(net.node(i), ids[i].clone(), ca.revocations()))
        .collect();
    for node in &nodes {
        wait_members(node, &names_);
    }
    let view = nodes[0].view();
    for name in names_ {
        let others: Vec<String> = names_
            .iter()
            .filter(|n| **n != name)
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            neighbours(&view, name),
            others,
            "every node of a 3-ring neighbours the two others"
        );
    }
    // Every node has one authenticated link per cable, each carrying frames.
    for node in &nodes {
        let links = node.ring().links();
        let ifaces: BTreeSet<_> = links.iter().map(|l| l.iface.as_str()).collect();
        assert_eq!(ifaces, BTreeSet::from(["thunderbolt0", "thunderbolt1"]));
        assert!(links.iter().all(|l| l.frames_received > 0));
    }

    // A pulled cable is noticed from the kernel's link state, and the ring
    // routes the other way.
    let mut events = nodes[0].ring().link_events();
    let mut inbox = nodes[1].ring().subscribe(Channel::Control);
    net.cable_down(0).unwrap(); // node-a thunderbolt0 <-> node-b thunderbolt1
    wait_until("node-a to drop its link to node-b", || {
        !neighbours(&nodes[0].view(), "node-a").contains(&"node-b".to_string())
    });
    let down = loop {
        match events.try_recv() {
            Ok(LinkEvent::Down {
                iface,
                peer,
                reason,
            }) => break (iface, peer, reason),
            Ok(_) => {}
            Err(e) => panic!("no link-down event: {e}"),
        }
    };
    assert_eq!(
        (down.0.as_str(), down.1.as_str()),
        ("thunderbolt0", "node-b")
    );
    assert!(
        down.2.contains("carrier lost"),
        "noticed through netlink, not a timeout: {}",
        down.2
    );
    assert_eq!(
        names(&nodes[0].view()),
        names_,
        "a cut cable in a closed ring loses no member"
    );
    nodes[0].send("node-b", "the long way round");
    wait_until("node-b to receive over node-c", || match inbox.try_recv() {
        Ok(m) => {
            assert_eq!(
                (m.from.as_str(), &m.payload[..]),
                ("node-a", &b"the long way round"[..])
            );
            true
        }
        Err(_) => false,
    });

    // The cable back: the direct link returns.
    net.cable_up(0).unwrap();
    wait_until("node-a and node-b to link up again", || {
        neighbours(&nodes[0].view(), "node-a").contains(&"node-b".to_string())
            && neighbours(&nodes[1].view(), "node-b").contains(&"node-a".to_string())
    });
}

#[test]
fn an_open_chain_relays_between_its_ends_and_a_cut_splits_it() {
    let net = RingNet::chain(3).unwrap();
    let mut ca = Ca::new("chain-test");
    let names_ = ["node-a", "node-b", "node-c"];
    let ids: Vec<_> = names_.iter().map(|n| Arc::new(ca.enroll(n, 30))).collect();
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(net.node(i), ids[i].clone(), ca.revocations()))
        .collect();
    for node in &nodes {
        wait_members(node, &names_);
    }
    let view = nodes[2].view();
    assert_eq!(neighbours(&view, "node-a"), ["node-b"]);
    assert_eq!(neighbours(&view, "node-c"), ["node-b"]);

    let mut inbox = nodes[2].ring().subscribe(Channel::Control);
    let relayed_before: u64 = nodes[1].ring().links().iter().map(|l| l.frames_sent).sum();
    nodes[0].send("node-c", "over the middle");
    wait_until("node-c to receive from node-a", || match inbox.try_recv() {
        Ok(m) => {
            assert_eq!(
                (m.from.as_str(), &m.payload[..]),
                ("node-a", &b"over the middle"[..])
            );
            true
        }
        Err(_) => false,
    });
    assert!(
        nodes[1]
            .ring()
            .links()
            .iter()
            .map(|l| l.frames_sent)
            .sum::<u64>()
            > relayed_before
    );

    // Adverts travel to every member.
    nodes[2].ring().set_advert(sovereign_ring::Advert {
        memory_budget_mb: 2048,
        models: vec![("smollm2".into(), "1.0.0".into())],
        isa: "avx2".into(),
        draining: false,
    });
    wait_until("node-a to see node-c's advert", || {
        nodes[0]
            .view()
            .members
            .get("node-c")
            .is_some_and(|m| m.advert.memory_budget_mb == 2048)
    });

    // Cutting the chain splits the membership.
    net.cable_down(1).unwrap();
    wait_members(&nodes[0], &["node-a", "node-b"]);
    wait_members(&nodes[2], &["node-c"]);
    let err = nodes[0]
        .runtime
        .block_on(
            nodes[0]
                .ring()
                .send("node-c", Channel::Control, Bytes::from_static(b"x")),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no route to node-c"), "{err}");
    net.cable_up(1).unwrap();
    wait_members(&nodes[2], &names_);
}

/// Sends `bytes` to node A's link port over TCP from the rogue's namespace.
async fn raw_tcp(to: SocketAddrV6, bytes: Vec<u8>) {
    if let Ok(mut tcp) = TcpStream::connect(to).await {
        let _ = tcp.write_all(&bytes).await;
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    }
}

/// Accepts any server certificate: the rogue wants node-a to judge its own
/// certificate, whatever it thinks of node-a's.
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A TLS client presenting `identity`'s certificate, then a hello of
/// `version` (unless `None`), then `after_hello` raw bytes; kept open
/// until node-a closes it or for `hold`.
async fn tls_client(
    to: SocketAddrV6,
    identity: Arc<NodeIdentity>,
    version: Option<u32>,
    after_hello: Vec<u8>,
    hold: Duration,
) {
    let key = identity.signing_key().to_pkcs8_der().unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.as_bytes().to_vec()));
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(vec![identity.certificate_der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let Ok(tcp) = TcpStream::connect(to).await else {
        return;
    };
    let name = ServerName::try_from("node-a").unwrap();
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return;
    };
    if let Some(version) = version {
        let hello = postcard::to_stdvec(&wire::Hello { version }).unwrap();
        let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
        frame.extend(hello);
        let _ = tls.write_all(&frame).await;
    }
    let _ = tls.write_all(&after_hello).await;
    let _ = tls.flush().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(hold, async {
        while let Ok(n) = tls.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn wait_counter(
    node: &Node,
    what: &str,
    before: &RingCounters,
    field: fn(&RingCounters) -> u64,
) -> RingCounters {
    wait_until(what, || field(&node.ring().counters()) > field(before));
    node.ring().counters()
}

#[test]
fn rogue_hosts_on_a_ring_link_are_refused_and_nothing_crashes() {
    // node-a in the first namespace; node-b and every rogue in the second,
    // on the other end of the one cable.
    let net = RingNet::chain(2).unwrap();
    let mut ca = Ca::new("rogue-test");
    let a_id = ca.enroll("node-a", 30);
    let b_id = Arc::new(ca.enroll("node-b", 30));
    let mallory = Arc::new(ca.enroll("mallory", 30));
    let revoked = Arc::new(ca.enroll("node-revoked", 30));
    let short = Arc::new(ca.enroll("node-short", 1));
    ca.cluster.revoke("node-revoked").unwrap();
    let mut foreign_ca = Ca::new("elsewhere");
    let foreign = Arc::new(foreign_ca.enroll("node-z", 30));

    // node-a's clock is three days ahead: node-short's one-day certificate
    // has expired for it.
    let a_id = Arc::new(a_id.with_clock_floor(SystemTime::now() + Duration::from_secs(3 * 86_400)));
    let a = Node::start(net.node(0), a_id, ca.revocations());
    let b = Node::start(net.node(1), b_id, ca.revocations());
    wait_members(&a, &["node-a", "node-b"]);
    let mut refusals = a.ring().refusals();
    let rogue = runtime_in(net.node(1));
    let a_addr = SocketAddrV6::new(
        link_local(net.node(0), "thunderbolt0"),
        a.ring().port(),
        0,
        if_index(net.node(1), "thunderbolt1"),
    );
    let group = SocketAddrV6::new(GROUP, sovereign_ring::DEFAULT_PORT, 0, a_addr.scope_id());

    // Announcements: garbage, then real nodes with a foreign, a revoked
    // and an expired certificate, then a replayed genuine announcement.
    let before = a.ring().counters();
    rogue
        .block_on(rogue.spawn(async move {
            let udp = UdpSocket::bind("[::]:0").await.unwrap();
            udp.send_to(b"\x00garbage", group).await.unwrap();
        }))
        .unwrap();
    wait_counter(&a, "a garbage announcement refused", &before, |c| {
        c.announcements_refused
    });
    for (identity, revocations) in [
        (foreign.clone(), foreign_ca.revocations()),
        (revoked.clone(), ca.revocations()),
        (short, ca.revocations()),
    ] {
        let name = identity.name().to_string();
        let before = a.ring().counters();
        let intruder = Node::start_with(net.node(1), identity, revocations, |c| c.port = 0);
        wait_counter(
            &a,
            &format!("{name}'s announcements refused"),
            &before,
            |c| c.announcements_refused,
        );
        assert!(
            !a.view().members.contains_key(&name),
            "{name} must not join"
        );
        drop(intruder);
        std::thread::sleep(Duration::from_millis(300));
    }
    let replay = capture_announcement(net.node(0));
    let before = a.ring().counters();
    rogue
        .block_on(rogue.spawn(async move {
            let udp = UdpSocket::bind("[::]:0").await.unwrap();
            udp.send_to(&replay, group).await.unwrap();
        }))
        .unwrap();
    wait_counter(&a, "a replayed announcement refused", &before, |c| {
        c.announcements_refused
    });

    // Connections: garbage and a 4 GiB frame claim before TLS, a foreign
    // and a revoked certificate, another protocol version.
    let before = a.ring().counters();
    rogue
        .block_on(rogue.spawn(raw_tcp(a_addr, b"GET / HTTP/1.1\r\n\r\n".to_vec())))
        .unwrap();
    let before = wait_counter(&a, "garbage refused", &before, |c| c.connections_refused);
    rogue
        .block_on(rogue.spawn(raw_tcp(a_addr, vec![0xff, 0xff, 0xff, 0xff, 0])))
        .unwrap();
    let mut before = wait_counter(&a, "a 4 GiB claim refused", &before, |c| {
        c.connections_refused
    });
    let hold = Duration::from_secs(3);
    for (who, identity, version) in [
        ("a foreign certificate", foreign.clone(), Some(1)),
        ("a revoked certificate", revoked.clone(), Some(1)),
        ("protocol version 2", mallory.clone(), Some(2)),
    ] {
        rogue
            .block_on(rogue.spawn(tls_client(a_addr, identity, version, vec![], hold)))
            .unwrap();
        before = wait_counter(&a, &format!("{who} refused"), &before, |c| {
            c.connections_refused
        });
    }

    // Authenticated but hostile: a frame claiming 4 GiB, a garbage frame.
    for (who, bytes) in [
        ("a 4 GiB frame", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ("a garbage frame", vec![0, 0, 0, 3, 0xee, 0xee, 0xee]),
    ] {
        rogue
            .block_on(rogue.spawn(tls_client(a_addr, mallory.clone(), Some(1), bytes, hold)))
            .unwrap();
        before = wait_counter(&a, &format!("{who} closing the link"), &before, |c| {
            c.links_refused
        });
    }

    // A peer that says hello and then hangs is dropped by the heartbeat.
    let mut events = a.ring().link_events();
    rogue
        .block_on(rogue.spawn(tls_client(
            a_addr,
            mallory,
            Some(1),
            vec![],
            Duration::from_secs(10),
        )))
        .unwrap();
    let reason = loop {
        match events.try_recv() {
            Ok(LinkEvent::Down { peer, reason, .. }) if peer == "mallory" => break reason,
            Ok(_) => {}
            Err(e) => panic!("mallory's link did not go down: {e}"),
        }
    };
    assert!(reason.contains("hangs"), "{reason}");

    // What was refused is reported (for the audit log), with who and why.
    let mut seen = Vec::new();
    while let Ok(refusal) = refusals.try_recv() {
        seen.push(format!("{}: {}", refusal.kind, refusal.reason));
    }
    for (kind, what) in [
        ("announcement", "node-z"),
        ("announcement", "node-revoked"),
        ("tls", "refused connection from"),
        ("frame", "closed link with mallory"),
    ] {
        assert!(
            seen.iter()
                .any(|r| r.starts_with(&format!("{kind}: ")) && r.contains(what)),
            "no {kind} refusal naming {what}: {seen:#?}"
        );
    }

    // Nothing crashed: node-a and node-b still talk.
    wait_members(&a, &["node-a", "node-b"]);
    let mut inbox = b.ring().subscribe(Channel::Control);
    a.send("node-b", "still here");
    wait_until("node-b to hear node-a", || {
        inbox
            .try_recv()
            .is_ok_and(|m| &m.payload[..] == b"still here")
    });
}

/// A genuine announcement heard in `node`'s namespace on its thunderbolt0.
fn capture_announcement(node: &NetNode) -> Vec<u8> {
    let path = node.path();
    let index = if_index(node, "thunderbolt0");
    std::thread::spawn(move || {
        enter_namespace(Path::new(&path)).unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket
            .bind(
                &std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, sovereign_ring::DEFAULT_PORT))
                    .into(),
            )
            .unwrap();
        socket.join_multicast_v6(&GROUP, index).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let socket: std::net::UdpSocket = socket.into();
        let mut buf = vec![0u8; 8192];
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        buf.truncate(len);
        buf
    })
    .join()
    .unwrap()
}
