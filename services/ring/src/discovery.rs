//! Discovery with nothing configured: every node sends a signed
//! announcement (certificate, link port, advert, sequence number) to an
//! IPv6 link-local multicast group on each ring interface, every heartbeat.
//! A received announcement is rate-limited per source, then checked against
//! the cluster CA, the revocations and its signature, and dropped when it
//! is not newer than the last one from that node on that interface (a
//! replay or a duplicate). Only then does the ring dial the sender.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::auth::{AuthError, Identity};
use crate::config::Advert;
use crate::ratelimit::Buckets;
use crate::wire::PROTOCOL_VERSION;

/// The link-local multicast group of ring announcements (`ff02::` + "Sovr").
pub const GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0x536f, 0x7672);

/// The largest announcement read; longer datagrams are cut and refused.
const MAX_DATAGRAM: usize = 4096;

/// What a node says about itself on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Announcement {
    version: u32,
    port: u16,
    advert: Advert,
    incarnation: u64,
    seq: u64,
}

/// An announcement as sent: the sender's certificate, the body and the
/// signature over it by the certificate's key.
#[derive(Debug, Serialize, Deserialize)]
struct Signed {
    certificate: Vec<u8>,
    body: Vec<u8>,
    signature: Vec<u8>,
}

/// A verified, fresh announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Discovered {
    /// The certified node name.
    pub peer: String,
    /// Its link address: link-local, scoped to the interface it came in on.
    pub addr: SocketAddrV6,
    /// What it offers.
    pub advert: Advert,
}

/// Why an announcement was dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The source sends faster than allowed.
    #[error("rate limited")]
    RateLimited,
    /// Not an announcement at all.
    #[error("malformed announcement")]
    Malformed,
    /// The certificate or signature failed.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// Another protocol version.
    #[error("announces ring protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u32),
    /// Not newer than the last announcement of that node on that link.
    #[error("replayed or duplicate announcement from {0}")]
    Replay(String),
    /// The node's own announcement (a loop back).
    #[error("own announcement")]
    Own,
}

/// The discovery socket and this node's announcement state.
#[derive(Debug)]
pub(crate) struct Discovery {
    socket: UdpSocket,
    identity: Identity,
    discovery_port: u16,
    link_port: u16,
    incarnation: u64,
    seq: AtomicU64,
    advert: Mutex<Advert>,
    seen: Mutex<HashMap<(u32, String), (u64, u64)>>,
    sources: Mutex<Buckets<Ipv6Addr>>,
}

impl Discovery {
    /// Binds the discovery port on every interface (joined per ring
    /// interface with [`Discovery::join`]).
    pub fn bind(
        identity: Identity,
        discovery_port: u16,
        link_port: u16,
        incarnation: u64,
        advert: Advert,
    ) -> std::io::Result<Self> {
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_multicast_loop_v6(false)?;
        socket.set_multicast_hops_v6(1)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, discovery_port)).into())?;
        Ok(Discovery {
            socket: UdpSocket::from_std(socket.into())?,
            identity,
            discovery_port,
            link_port,
            incarnation,
            seq: AtomicU64::new(0),
            advert: Mutex::new(advert),
            seen: Mutex::new(HashMap::new()),
            sources: Mutex::new(Buckets::new(1024, 20, 10.0)),
        })
    }

    /// Joins the announcement group on interface `index` (again after it
    /// came back: a membership the kernel dropped is renewed).
    pub fn join(&self, index: u32) {
        let socket = socket2::SockRef::from(&self.socket);
        let _ = socket.leave_multicast_v6(&GROUP, index);
        if let Err(e) = socket.join_multicast_v6(&GROUP, index) {
            tracing::warn!(index, error = %e, "ring: cannot join the announcement group");
        }
    }

    /// Changes the advert sent from the next announcement on.
    pub fn set_advert(&self, advert: Advert) {
        *self.advert.lock().unwrap_or_else(|e| e.into_inner()) = advert;
    }

    /// This node's announcement, signed, with the next sequence number.
    fn announcement(&self) -> Vec<u8> {
        let body = Announcement {
            version: PROTOCOL_VERSION,
            port: self.link_port,
            advert: self
                .advert
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            incarnation: self.incarnation,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        let body = postcard::to_stdvec(&body).expect("announcements serialize");
        let signed = Signed {
            certificate: self.identity.certificate().to_vec(),
            signature: self.identity.sign_announcement(&body),
            body,
        };
        postcard::to_stdvec(&signed).expect("announcements serialize")
    }

    /// Announces this node on interface `index`. A failure (the link went
    /// down, its address is not ready yet) is logged at debug level: the
    /// next heartbeat tries again.
    pub async fn announce(&self, index: u32) {
        let to = SocketAddrV6::new(GROUP, self.discovery_port, 0, index);
        if let Err(e) = self.socket.send_to(&self.announcement(), to).await {
            tracing::debug!(index, error = %e, "ring: announcement not sent");
        }
    }

    /// Waits for the next datagram; its interface index and checked content.
    pub async fn receive(&self) -> std::io::Result<(u32, Result<Discovered, Refusal>)> {
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            let (len, from) = self.socket.recv_from(&mut buf).await?;
            let SocketAddr::V6(from) = from else { continue };
            return Ok((from.scope_id(), self.check(&buf[..len], from)));
        }
    }

    /// Checks one datagram from `from`.
    fn check(&self, datagram: &[u8], from: SocketAddrV6) -> Result<Discovered, Refusal> {
        if !self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(*from.ip())
        {
            return Err(Refusal::RateLimited);
        }
        if datagram.len() >= MAX_DATAGRAM {
            return Err(Refusal::Malformed);
        }
        let signed: Signed = postcard::from_bytes(datagram).map_err(|_| Refusal::Malformed)?;
        let peer = self.identity.verify_announcement(
            &signed.certificate,
            &signed.body,
            &signed.signature,
        )?;
        if peer.name == self.identity.name() {
            return Err(Refusal::Own);
        }
        let body: Announcement =
            postcard::from_bytes(&signed.body).map_err(|_| Refusal::Malformed)?;
        if body.version != PROTOCOL_VERSION {
            return Err(Refusal::Version(body.version));
        }
        let key = (from.scope_id(), peer.name.clone());
        let version = (body.incarnation, body.seq);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(&key).is_some_and(|last| *last >= version) {
            return Err(Refusal::Replay(peer.name));
        }
        seen.insert(key, version);
        Ok(Discovered {
            peer: peer.name,
            addr: SocketAddrV6::new(*from.ip(), body.port, 0, from.scope_id()),
            advert: body.advert,
        })
    }
}
