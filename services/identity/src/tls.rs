//! rustls configurations built from a node identity (TLS 1.3 only, the
//! ring provider): mutual TLS between nodes (the ring), and the LAN API's
//! server side. Peer certificates are checked by [`ClusterCa::verify_for`]
//! against the revocation list in force at each handshake, at the time
//! the clock rule gives.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::KeyUsage;

use crate::{cert, ClusterCa, IdentityError, NodeIdentity, PeerInfo, Revocations};

/// The crypto provider of every Sovereign TLS config (ring, as the API uses).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The only protocol version Sovereign speaks.
const TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The certificate chain a node presents: its own certificate.
fn own_chain(identity: &NodeIdentity) -> Vec<CertificateDer<'static>> {
    vec![identity.certificate_der().clone()]
}

/// A node's server side for ring links: presents the node certificate and
/// requires a client certificate issued by the cluster CA and not revoked.
pub fn server_config(identity: &NodeIdentity, revocations: Revocations) -> Arc<ServerConfig> {
    let verifier = Arc::new(PeerVerifier::new(identity, revocations));
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(own_chain(identity), identity.private_key_der())
        .expect("a loaded identity's key matches its certificate");
    Arc::new(config)
}

/// A node's client side for ring links: presents the node certificate and
/// accepts a server whose certificate the cluster CA issued for the name
/// connected to, and that is not revoked.
pub fn client_config(identity: &NodeIdentity, revocations: Revocations) -> Arc<ClientConfig> {
    let verifier = Arc::new(PeerVerifier::new(identity, revocations));
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(own_chain(identity), identity.private_key_der())
        .expect("a loaded identity's key matches its certificate");
    Arc::new(config)
}

/// The LAN API's server side: the node certificate, TLS 1.3, no client
/// certificates (staff clients authenticate with bearer keys).
pub fn lan_server_config(identity: &NodeIdentity) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("the ring provider supports TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(own_chain(identity), identity.private_key_der())
        .expect("a loaded identity's key matches its certificate");
    Arc::new(config)
}

/// Who is on the other end of an established connection (its certificate,
/// verified during the handshake by the configs above).
pub fn peer_info(conn: &CommonState) -> Option<PeerInfo> {
    let der = conn.peer_certificates()?.first()?;
    let fields = cert::fields("peer certificate", der).ok()?;
    Some(PeerInfo {
        name: fields.name,
        serial: fields.serial,
        public_key: fields.public_key,
    })
}

/// Checks peers against the cluster CA and the revocation list in force.
#[derive(Debug)]
struct PeerVerifier {
    ca: ClusterCa,
    revocations: Revocations,
    clock_floor: SystemTime,
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn new(identity: &NodeIdentity, revocations: Revocations) -> Self {
        Self {
            ca: identity.ca().clone(),
            revocations,
            clock_floor: identity.clock_floor(),
            hints: vec![DistinguishedName::from(
                identity.ca().subject_der().to_vec(),
            )],
            provider: provider(),
        }
    }

    /// Verifies `end_entity` for `usage` at rustls's `now`, raised to the floor.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<PeerInfo, rustls::Error> {
        let now = (UNIX_EPOCH + Duration::from_secs(now.as_secs())).max(self.clock_floor);
        let list = self.revocations.current();
        self.ca
            .verify_for(end_entity, &list, now, usage)
            .map_err(|e| {
                tracing::info!(error = %e, "peer certificate refused");
                rustls::Error::InvalidCertificate(certificate_error(e))
            })
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

/// Maps a refusal onto rustls's categories (the alert sent to the peer).
fn certificate_error(error: IdentityError) -> CertificateError {
    match error {
        IdentityError::Expired { .. } => CertificateError::Expired,
        IdentityError::NotYetValid { .. } => CertificateError::NotValidYet,
        IdentityError::Revoked { .. } => CertificateError::Revoked,
        IdentityError::ForeignCa { .. } => CertificateError::UnknownIssuer,
        IdentityError::BadSignature { .. } => CertificateError::BadSignature,
        IdentityError::Malformed { .. } => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, now, KeyUsage::server_auth())?;
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(server_name))
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
