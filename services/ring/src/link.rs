//! One authenticated link to a neighbour over one cable: the hello that
//! checks protocol versions, then a writer task (frames queued by the ring,
//! and a heartbeat every interval) and a reader task that hands frames to
//! the ring and closes the link when nothing arrived for `dead_after` (a
//! hung peer), on a frame over the maximum or one that does not decode.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::wire::{check_hello, codec, Frame, Hello, HelloError, PROTOCOL_VERSION};

/// Frames a link queues before senders wait.
const QUEUE: usize = 256;

/// Traffic counters of one link.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
}

/// The ring's handle on a running link.
#[derive(Debug, Clone)]
pub(crate) struct LinkHandle {
    /// Unique within this ring.
    pub id: u64,
    /// The interface (cable) it runs over.
    pub iface: String,
    /// The interface's index.
    pub index: u32,
    /// The certified peer.
    pub peer: String,
    /// Its certificate's serial (checked again when revocations change).
    pub serial: u64,
    /// Queues frames for the writer.
    pub tx: mpsc::Sender<Frame>,
    /// Traffic counters.
    pub counters: Arc<Counters>,
    /// Closes the link.
    pub close: CancellationToken,
    /// When it came up.
    pub since: SystemTime,
}

/// What the ring does with a link's frames and its end.
pub(crate) trait LinkOwner: Send + Sync + 'static {
    /// A frame arrived on `link`.
    fn frame(&self, link: &LinkHandle, frame: Frame) -> impl Future<Output = ()> + Send;
    /// `link` ended for `reason`; `protocol` when the peer broke the protocol.
    fn closed(&self, link: &LinkHandle, reason: String, protocol: bool);
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The hello was refused.
    #[error(transparent)]
    Hello(#[from] HelloError),
    /// The peer closed, sent nothing in time, or the connection failed.
    #[error("{0}")]
    Io(String),
}

/// Exchanges hellos over an established TLS stream; the framed stream.
pub(crate) async fn handshake<S>(
    stream: S,
    timeout: Duration,
) -> Result<Framed<S, LengthDelimitedCodec>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, codec());
    let hello = postcard::to_stdvec(&Hello {
        version: PROTOCOL_VERSION,
    })
    .expect("hellos serialize");
    let exchange = async {
        framed
            .send(Bytes::from(hello))
            .await
            .map_err(|e| HandshakeError::Io(format!("sending hello: {e}")))?;
        match framed.next().await {
            Some(Ok(frame)) => Ok(check_hello(&frame)?),
            Some(Err(e)) => Err(HandshakeError::Io(format!("reading hello: {e}"))),
            None => Err(HandshakeError::Io("closed before its hello".into())),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Io(format!("no hello within {timeout:?}")))??;
    Ok(framed)
}

/// A new link's handle and the receiving end of its queue.
pub(crate) fn handle(
    id: u64,
    iface: String,
    index: u32,
    peer: (String, u64),
    close: CancellationToken,
) -> (LinkHandle, mpsc::Receiver<Frame>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = LinkHandle {
        id,
        iface,
        index,
        peer: peer.0,
        serial: peer.1,
        tx,
        counters: Arc::new(Counters::default()),
        close,
        since: SystemTime::now(),
    };
    (handle, rx)
}

/// Runs the link's writer and reader until it closes.
pub(crate) fn spawn<S, O>(
    framed: Framed<S, LengthDelimitedCodec>,
    link: LinkHandle,
    mut queue: mpsc::Receiver<Frame>,
    owner: Arc<O>,
    heartbeat: Duration,
    dead_after: Duration,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    O: LinkOwner,
{
    let (mut sink, mut stream) = framed.split();
    let writer_link = link.clone();
    tokio::spawn(async move {
        let link = writer_link;
        let mut tick = crate::periodic::every(heartbeat);
        loop {
            let frame = tokio::select! {
                _ = link.close.cancelled() => break,
                _ = tick.tick() => Frame::Heartbeat,
                frame = queue.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
            };
            let body = Bytes::from(postcard::to_stdvec(&frame).expect("frames serialize"));
            let len = body.len() as u64 + 4;
            if let Err(e) = sink.send(body).await {
                tracing::debug!(peer = %link.peer, iface = %link.iface, error = %e, "ring: link write failed");
                link.close.cancel();
                break;
            }
            link.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
            link.counters.bytes_sent.fetch_add(len, Ordering::Relaxed);
        }
    });
    tokio::spawn(async move {
        let (reason, protocol) = loop {
            let next = tokio::select! {
                _ = link.close.cancelled() => break ("closed".to_string(), false),
                next = tokio::time::timeout(dead_after, stream.next()) => next,
            };
            let body = match next {
                Err(_) => {
                    break (
                        format!("nothing received for {dead_after:?} (peer hangs)"),
                        false,
                    )
                }
                Ok(None) => break ("closed by the peer".to_string(), false),
                // Only a frame over the maximum is InvalidData; a reset or a
                // cut connection is the peer leaving, not breaking the protocol.
                Ok(Some(Err(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
                    break (format!("refused frame: {e}"), true)
                }
                Ok(Some(Err(e))) => break (format!("connection lost: {e}"), false),
                Ok(Some(Ok(body))) => body,
            };
            link.counters
                .frames_received
                .fetch_add(1, Ordering::Relaxed);
            link.counters
                .bytes_received
                .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            match postcard::from_bytes::<Frame>(&body) {
                Ok(frame) => owner.frame(&link, frame).await,
                Err(e) => break (format!("refused frame: undecodable ({e})"), true),
            }
        };
        link.close.cancel();
        owner.closed(&link, reason, protocol);
    });
}
