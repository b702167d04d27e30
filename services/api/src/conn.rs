//! Connection handling for the API's listener, plain or TLS: accept, then
//! do the TLS handshake and serve HTTP/1 in a task of its own, so no client
//! holds up another; cap connections globally and per client address; when
//! full, the oldest connection that has not begun a request makes room for
//! the newcomer; close a connection whose request head does not arrive in
//! time (slow or idle).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::tls::ClientAddr;

/// Limits on connections (the unit's `LimitNOFILE=` sits above `max`).
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Connections open at once, all clients together (exceeded for an
    /// instant while a connection that gave its place closes).
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

/// Open connections per client address, and those that have not yet begun a
/// request (TLS handshake or first request head still to come), oldest
/// first: when the table is full, the oldest of those gives its place to the
/// newcomer, so silent clients cannot keep out clients that talk.
#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    next: u64,
}

/// A connection's place in [`Counts`]; gives it back on drop.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
    id: u64,
    started: AtomicBool,
}

impl Slot {
    /// A place for a connection from `client`, and what fires if a newer
    /// client takes it before this one begins a request; `None` over the
    /// client's cap, or when full with no connection still waiting to begin.
    fn take(
        counts: &Arc<Mutex<Counts>>,
        client: IpAddr,
        limits: &ConnLimits,
    ) -> Option<(Self, oneshot::Receiver<()>)> {
        let mut c = counts.lock().ok()?;
        let mine = c.by_client.get(&client).copied().unwrap_or(0);
        if mine >= limits.per_client {
            return None;
        }
        if c.total >= limits.max {
            // The oldest connection that never began a request makes room
            // (its task ends at once and gives back its count).
            let (_, evict) = c.waiting.pop_first()?;
            let _ = evict.send(());
        }
        c.total += 1;
        c.by_client.insert(client, mine + 1);
        let id = c.next;
        c.next += 1;
        let (evict, evicted) = oneshot::channel();
        c.waiting.insert(id, evict);
        Some((
            Self {
                counts: Arc::clone(counts),
                client,
                id,
                started: AtomicBool::new(false),
            },
            evicted,
        ))
    }

    /// The connection began a request: from now on nobody takes its place.
    fn start(&self) {
        if !self.started.swap(true, Ordering::Relaxed) {
            if let Ok(mut c) = self.counts.lock() {
                c.waiting.remove(&self.id);
            }
        }
    }

    fn is_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.total -= 1;
            c.waiting.remove(&self.id);
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
        let Some((slot, evicted)) = Slot::take(&counts, addr.ip(), &limits) else {
            tracing::info!(client = %addr, "connection refused: too many open connections");
            continue;
        };
        let (tls, router) = (tls.clone(), router.clone());
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let _ = stream.set_nodelay(true);
            let served = async {
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => serve_one(tls, addr, router, &limits, &slot).await,
                            Ok(Err(e)) => {
                                tracing::info!(client = %addr, error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                tracing::info!(client = %addr, "TLS handshake timed out");
                                Ok(())
                            }
                        }
                    }
                    None => serve_one(stream, addr, router, &limits, &slot).await,
                }
            };
            tokio::pin!(served);
            let result = tokio::select! {
                result = &mut served => result,
                Ok(()) = evicted => {
                    if slot.is_started() {
                        // Begun just as it was picked: it keeps its place.
                        served.await
                    } else {
                        tracing::info!(client = %addr, "connection closed: a newer client took its place before it began a request");
                        Ok(())
                    }
                }
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
    slot: &Arc<Slot>,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::clone(slot);
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            slot.start();
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
