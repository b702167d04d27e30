//! TLS for the LAN (rustls): the node's certificate from the cluster CA,
//! TLS 1.3 only, for the listener `conn.rs` serves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The address of a client, for TCP and TLS connections alike.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// A TCP listener and the TLS configuration its connections are served with
/// (each handshake runs in its connection's own task: see `conn.rs`).
pub struct TlsListener {
    pub(crate) tcp: TcpListener,
    pub(crate) acceptor: TlsAcceptor,
}

/// A TLS 1.3 server config from a certificate chain and key in PEM files.
pub fn pem_server_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(Arc::new(config))
}

impl TlsListener {
    /// Wraps `tcp` with the certificate chain and key in PEM files.
    pub fn new(tcp: TcpListener, cert: &Path, key: &Path) -> Result<Self, String> {
        Ok(Self::with_config(tcp, pem_server_config(cert, key)?))
    }

    /// Wraps `tcp` with a ready server config (a node identity's, from
    /// `sovereign_identity::tls::lan_server_config`).
    pub fn with_config(tcp: TcpListener, config: Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
        }
    }
}
