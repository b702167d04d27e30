//! Connection handling for the API's listener, plain or TLS: accept, then
//! do the TLS handshake and serve HTTP/1 in a task of its own, so no client
//! holds up another; cap connections globally and per client address; when
//! full, the connection idle longest (handshake or request head still to
//! come, or a keep-alive connection between requests) makes room for the
//! newcomer, and one in the middle of a request never does; close a
//! connection whose request head does not arrive in time (slow or idle).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
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

/// Open connections per client address, and the idle ones (no request in
/// progress), longest idle first: when the table is full, the first of
/// those gives its place to the newcomer, so silent or idling clients
/// cannot keep out clients that talk.
#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
    idle: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

impl Counts {
    /// Puts a connection at the end of the idle line; returns its place.
    fn enqueue_idle(&mut self, evict: &Arc<Notify>) -> u64 {
        let key = self.next;
        self.next += 1;
        self.idle.insert(key, Arc::clone(evict));
        key
    }
}

/// A connection's place in [`Counts`]; gives it back on drop.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
    /// Its place in the idle line while no request is in progress.
    idle_key: Mutex<Option<u64>>,
    /// Requests begun and not yet answered in full.
    active: AtomicUsize,
    /// Fires when a newer client takes this connection's place.
    evict: Arc<Notify>,
}

impl Slot {
    /// A place for a connection from `client`, idle until it begins a
    /// request; `None` over the client's cap, or when full with no idle
    /// connection to give its place.
    fn take(counts: &Arc<Mutex<Counts>>, client: IpAddr, limits: &ConnLimits) -> Option<Self> {
        let mut c = counts.lock().ok()?;
        let mine = c.by_client.get(&client).copied().unwrap_or(0);
        if mine >= limits.per_client {
            return None;
        }
        if c.total >= limits.max {
            // The connection idle longest makes room (its task ends at once
            // and gives back its count).
            let (_, evict) = c.idle.pop_first()?;
            evict.notify_one();
        }
        c.total += 1;
        c.by_client.insert(client, mine + 1);
        let evict = Arc::new(Notify::new());
        let key = c.enqueue_idle(&evict);
        Some(Self {
            counts: Arc::clone(counts),
            client,
            idle_key: Mutex::new(Some(key)),
            active: AtomicUsize::new(0),
            evict,
        })
    }

    /// A request began: until it is answered in full (the guard drops with
    /// the response body) nobody takes this connection's place.
    fn begin(self: &Arc<Self>) -> InFlight {
        if self.active.fetch_add(1, Ordering::SeqCst) == 0 {
            if let (Ok(mut c), Ok(mut key)) = (self.counts.lock(), self.idle_key.lock()) {
                if let Some(key) = key.take() {
                    c.idle.remove(&key);
                }
            }
        }
        InFlight(Arc::clone(self))
    }

    fn is_idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.total -= 1;
            if let Some(key) = self.idle_key.get_mut().ok().and_then(|k| k.take()) {
                c.idle.remove(&key);
            }
            if let Some(n) = c.by_client.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    c.by_client.remove(&self.client);
                }
            }
        }
    }
}

/// A request in progress on a connection; when the last one ends, the
/// connection goes to the end of the idle line.
struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let slot = &self.0;
        if slot.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let (Ok(mut c), Ok(mut key)) = (slot.counts.lock(), slot.idle_key.lock()) {
                if key.is_none() {
                    *key = Some(c.enqueue_idle(&slot.evict));
                }
            }
        }
    }
}

/// A response body that holds its request's [`InFlight`] until it has been
/// sent in full (or dropped).
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
            let result = loop {
                tokio::select! {
                    result = &mut served => break result,
                    () = slot.evict.notified() => {
                        if slot.is_idle() {
                            tracing::info!(client = %addr, "connection closed: a newer client took the place of this idle one");
                            break Ok(());
                        }
                        // A request began just as it was picked: it keeps its place.
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
            let in_flight = slot.begin();
            request
                .extensions_mut()
                .insert(ConnectInfo(ClientAddr(addr)));
            let answer = tower::ServiceExt::oneshot(router.clone(), request);
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(response.map(|inner| {
                    Body::new(Tracked {
                        inner,
                        _in_flight: in_flight,
                    })
                }))
            }
        });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .serve_connection(TokioIo::new(io), service)
        .await
}
