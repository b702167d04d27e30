//! Cluster identity through the library, as the ring uses it: identities
//! made by enrollment load and refuse tampering; real rustls handshakes
//! (TLS 1.3, mutual) between two enrolled nodes succeed and name the peer;
//! a foreign node, a wrong name and a revoked node are refused, and a newer
//! revocation list takes effect at the next handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::ServerName;
use sovereign_identity::{tls, IdentityError, NodeIdentity, PeerInfo, RevocationList, Revocations};
use sovereign_provisioning::cluster::{Cluster, EnrollRequest, REVOCATION_FILE};

fn enroll(cluster: &mut Cluster, dir: &Path, name: &str) -> NodeIdentity {
    let out = dir.join(format!("{name}.identity"));
    let request = EnrollRequest {
        name: name.into(),
        days: 30,
        ..EnrollRequest::default()
    };
    cluster.enroll(&request, &out).expect("enroll");
    NodeIdentity::load(&out).expect("load identity")
}

/// Accepts one connection, completes the handshake, echoes 4 bytes.
fn serve_once(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<Result<PeerInfo, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut stream = StreamOwned::new(conn, tcp);
        let mut buf = [0; 4];
        stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        stream.write_all(&buf).map_err(|e| e.to_string())?;
        stream.flush().map_err(|e| e.to_string())?;
        tls::peer_info(&stream.conn).ok_or_else(|| "no peer certificate".to_string())
    });
    (addr, handle)
}

/// Connects as `name`'s client, sends 4 bytes and reads them back.
fn connect(config: Arc<ClientConfig>, addr: SocketAddr, name: &str) -> Result<PeerInfo, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(config, server_name).map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, tcp);
    stream.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0; 4];
    stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    assert_eq!(
        stream.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    tls::peer_info(&stream.conn).ok_or_else(|| "no peer certificate".to_string())
}

#[test]
fn enrolled_nodes_talk_mutual_tls_and_revocation_takes_effect_at_the_next_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::init(&dir.path().join("acme"), "acme", None).expect("init");
    let a = enroll(&mut cluster, dir.path(), "node-a");
    let b = enroll(&mut cluster, dir.path(), "node-b");
    let mut other = Cluster::init(&dir.path().join("other"), "other", None).expect("init");
    let mallory = enroll(&mut other, dir.path(), "node-m");

    let revocations = Revocations::new(RevocationList::empty(a.ca()));
    let server = tls::server_config(&a, revocations.clone());

    // b reaches a; each learns who the other is.
    let (addr, handle) = serve_once(server.clone());
    let seen_by_b = connect(
        tls::client_config(&b, Revocations::new(RevocationList::empty(b.ca()))),
        addr,
        "node-a",
    )
    .expect("b connects to a");
    let seen_by_a = handle.join().expect("server thread").expect("a accepts b");
    assert_eq!(seen_by_b.name, "node-a");
    assert_eq!(seen_by_b.public_key, a.signing_key().verifying_key());
    assert_eq!(seen_by_a.name, "node-b");
    assert_eq!(seen_by_a.serial, b.serial());

    // A node of another cluster: neither side accepts the other's certificate.
    let (addr, handle) = serve_once(server.clone());
    let client = tls::client_config(
        &mallory,
        Revocations::new(RevocationList::empty(mallory.ca())),
    );
    let refused = connect(client, addr, "node-a").unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    let refused = handle.join().expect("server thread").unwrap_err();
    assert!(refused.contains("UnknownCA"), "{refused}");

    // The client refuses a server that is not the node it asked for.
    let (addr, handle) = serve_once(server.clone());
    let client = tls::client_config(&b, Revocations::new(RevocationList::empty(b.ca())));
    let refused = connect(client, addr, "node-x").unwrap_err();
    assert!(refused.contains("NotValidForName"), "{refused}");
    let _ = handle.join();

    // Revoking b: the list a already shares takes effect at once.
    cluster.revoke("node-b").expect("revoke");
    let list = RevocationList::load(&dir.path().join("acme").join(REVOCATION_FILE), a.ca())
        .expect("load list");
    assert_eq!(list.sequence(), 1);
    assert!(list.is_revoked(b.serial()));
    assert!(revocations.update(list.clone()).expect("newer list"));
    assert!(!revocations.update(list.clone()).expect("same list"));
    let (addr, handle) = serve_once(server.clone());
    let client = tls::client_config(&b, Revocations::new(RevocationList::empty(b.ca())));
    assert!(connect(client, addr, "node-a").is_err());
    let refused = handle.join().expect("server thread").unwrap_err();
    assert!(refused.contains("Revoked"), "{refused}");

    // A newer list replaces it; the older one is never accepted again.
    cluster.revoke("node-a").expect("revoke a");
    let newer = RevocationList::load(&dir.path().join("acme").join(REVOCATION_FILE), a.ca())
        .expect("load list");
    assert!(revocations.update(newer).expect("newer list"));
    match revocations.update(list) {
        Err(IdentityError::StaleRevocationList {
            offered: 1,
            current: 2,
        }) => {}
        other => panic!("stale list accepted: {other:?}"),
    }
    // A list signed by another CA is refused before it can be offered.
    other.revoke("node-m").expect("revoke m");
    let foreign = RevocationList::load(&dir.path().join("other").join(REVOCATION_FILE), a.ca());
    assert!(matches!(
        foreign,
        Err(IdentityError::RevocationSignature { .. })
    ));
}

#[test]
fn identity_files_refuse_tampering_and_another_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::init(&dir.path().join("acme"), "acme", None).expect("init");
    let a = enroll(&mut cluster, dir.path(), "node-a");
    let b = enroll(&mut cluster, dir.path(), "node-b");
    let mut other = Cluster::init(&dir.path().join("other"), "other", None).expect("init");
    let m = enroll(&mut other, dir.path(), "node-m");
    assert_eq!(a.name(), "node-a");
    assert!(a.age_identity().is_some());
    a.require_ca(cluster.ca()).expect("a belongs to acme");
    assert!(matches!(
        m.require_ca(cluster.ca()),
        Err(IdentityError::WrongCluster { .. })
    ));

    // The PEM files flash derives for the LAN API load into rustls as they are.
    {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let key = PrivateKeyDer::from_pem_slice(a.private_key_pem().as_bytes()).expect("key.pem");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(a.chain_pem().as_bytes())
                .collect::<Result<_, _>>()
                .expect("cert.pem");
        assert_eq!(chain.len(), 2);
        ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("the LAN API's certificate and key match");
    }

    // Round trip.
    let again = NodeIdentity::parse("copy", &a.to_pem()).expect("parse own output");
    assert_eq!(again.certificate_der(), a.certificate_der());

    // b's key with a's certificate.
    let blocks = pem::parse_many(a.to_pem()).expect("pem");
    let b_blocks = pem::parse_many(b.to_pem()).expect("pem");
    let swapped = pem::encode_many(&[b_blocks[0].clone(), blocks[1].clone(), blocks[2].clone()]);
    assert!(matches!(
        NodeIdentity::parse("swapped", &swapped),
        Err(IdentityError::KeyMismatch { .. })
    ));

    // A flipped bit in the certificate's signature.
    let mut cert = blocks[1].contents().to_vec();
    let last = cert.len() - 1;
    cert[last] ^= 1;
    let forged = pem::encode_many(&[
        blocks[0].clone(),
        pem::Pem::new("CERTIFICATE", cert),
        blocks[2].clone(),
    ]);
    let err = NodeIdentity::parse("forged", &forged).unwrap_err();
    assert!(matches!(err, IdentityError::BadSignature { .. }), "{err}");

    // A bare key is not an identity.
    let err = NodeIdentity::parse("node.key", "sovereign-ed25519-secret-key:AAAA\n").unwrap_err();
    assert!(err.to_string().contains("sovereign node enroll"), "{err}");
}
