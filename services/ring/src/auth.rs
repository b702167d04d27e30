//! Who this node is and who its peers are: the node identity from
//! `sovereign-identity` signs announcements and presents the certificate on
//! ring links; peers are checked against the cluster CA and the revocation
//! list in force. No verification is written here: the CA check and the TLS
//! configs are `sovereign-identity`'s.

use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, Verifier};
use sovereign_identity::{tls, NodeIdentity, PeerInfo, Revocations};
use tokio_rustls::rustls::{ClientConfig, CommonState, ServerConfig};

use crate::wire::ALPN;

/// A node identity and the revocations its peers are checked against.
#[derive(Debug, Clone)]
pub struct Identity {
    node: Arc<NodeIdentity>,
    revocations: Revocations,
}

/// Why a peer's credentials were refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The certificate is not one the cluster CA issued and still stands by.
    #[error("{0}")]
    Certificate(#[from] sovereign_identity::IdentityError),
    /// The signature is not the certificate key's over these bytes.
    #[error("bad signature by {0}")]
    Signature(String),
}

/// Domain separation: an announcement signature signs nothing else.
const ANNOUNCE_CONTEXT: &[u8] = b"sovereign-ring announcement v1\0";

impl Identity {
    /// `node`'s identity, peers checked against `revocations`.
    pub fn new(node: Arc<NodeIdentity>, revocations: Revocations) -> Self {
        Identity { node, revocations }
    }

    /// The node's name (its certificate's subject).
    pub fn name(&self) -> &str {
        self.node.name()
    }

    /// The node certificate (DER).
    pub(crate) fn certificate(&self) -> &[u8] {
        self.node.certificate_der()
    }

    /// Signs an announcement body.
    pub(crate) fn sign_announcement(&self, body: &[u8]) -> Vec<u8> {
        let message = [ANNOUNCE_CONTEXT, body].concat();
        self.node.signing_key().sign(&message).to_bytes().to_vec()
    }

    /// Checks `certificate` against the CA and the revocations now, then
    /// the announcement's signature by its key; the certified peer.
    pub(crate) fn verify_announcement(
        &self,
        certificate: &[u8],
        body: &[u8],
        signature: &[u8],
    ) -> Result<PeerInfo, AuthError> {
        let peer = self.node.ca().verify_peer(
            certificate,
            &self.revocations.current(),
            self.node.now(),
        )?;
        let signature = Signature::from_slice(signature)
            .map_err(|_| AuthError::Signature(peer.name.clone()))?;
        let message = [ANNOUNCE_CONTEXT, body].concat();
        peer.public_key
            .verify(&message, &signature)
            .map_err(|_| AuthError::Signature(peer.name.clone()))?;
        Ok(peer)
    }

    /// The TLS server side of ring links (mutual TLS 1.3, ring ALPN).
    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        let mut config = (*tls::server_config(&self.node, self.revocations.clone())).clone();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }

    /// The TLS client side of ring links (mutual TLS 1.3, ring ALPN).
    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        let mut config = (*tls::client_config(&self.node, self.revocations.clone())).clone();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }

    /// Whether a certificate serial is revoked by the list in force.
    pub(crate) fn is_revoked(&self, serial: u64) -> bool {
        self.revocations.current().is_revoked(serial)
    }
}

/// The verified peer of an established TLS connection.
pub(crate) fn peer_of(conn: &CommonState) -> Option<PeerInfo> {
    tls::peer_info(conn)
}
