//! Connection handling for the API's listener, plain or TLS: accept, then
//! do the TLS handshake and serve HTTP/1 in a task of its own, so no client
//! holds up another; cap connections globally and per client address; close
//! a connection whose request head does not arrive in time (slow or idle).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::tls::ClientAddr;

/// Limits on connections (the unit's `LimitNOFILE=` sits above `max`).
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Connections open at once, all clients together.
    pub max: usize,
    /// Connections open at once from one client address (handshakes included).
    pub per_client: usize,
    /// How long a client may take to finish the TLS handshake.
    pub handshake: Duration,
    /// How long a client may take to send a request head, counted from the
    /// connection (or the previous response) on: slow and idle clients are closed.
    pub header: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max: 1024,
            per_client: 64,
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(30),
        }
    }
}

/// Open connections per client address; a [`Slot`] gives its place back on drop.
#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
}

impl Slot {
    fn take(counts: &Arc<Mutex<Counts>>, client: IpAddr, limits: &ConnLimits) -> Option<Self> {
        let mut c = counts.lock().ok()?;
        let mine = c.by_client.get(&client).copied().unwrap_or(0);
        if c.total >= limits.max || mine >= limits.per_client {
            return None;
        }
        c.total += 1;
        c.by_client.insert(client, mine + 1);
        Some(Self {
            counts: Arc::clone(counts),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.total -= 1;
            if let Some(n) = c.by_client.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    c.by_client.remove(&self.client);
                }
            }
        }
    }
}

/// Serves `router` on `tcp` (TLS when `tls` is given) until `shutdown` completes.
pub async fn serve_connections(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let counts = Arc::new(Mutex::new(Counts::default()));
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = Slot::take(&counts, addr.ip(), &limits) else {
            tracing::info!(client = %addr, "connection refused: too many open connections");
            continue;
        };
        let (tls, router) = (tls.clone(), router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_one(tls, addr, router, &limits).await,
                        Ok(Err(e)) => {
                            tracing::info!(client = %addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(client = %addr, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => serve_one(stream, addr, router, &limits).await,
            };
            if let Err(e) = result {
                tracing::debug!(client = %addr, error = %e, "connection ended");
            }
        });
    }
}

/// Serves HTTP/1 on one connection.
async fn serve_one<I>(
    io: I,
    addr: std::net::SocketAddr,
    router: Router,
    limits: &ConnLimits,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request
                .extensions_mut()
                .insert(ConnectInfo(ClientAddr(addr)));
            tower::ServiceExt::oneshot(router.clone(), request)
        });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .serve_connection(TokioIo::new(io), service)
        .await
}
