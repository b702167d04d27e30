/*!
`sovereign-ring`: the ring transport of a Sovereign node. Nodes cabled by
Thunderbolt (each cable its own point-to-point interface, never bridged)
find each other with signed announcements on IPv6 link-local multicast,
link up over mutual TLS 1.3 with certificates from the cluster CA, watch
their cables through netlink and their peers with heartbeats, agree on a
membership view by flooding link-state reports, and relay messages for
members that are not neighbours (an open daisy chain works; a closed ring
that loses a cable routes the other way).

```no_run
# use std::sync::Arc;
# use sovereign_ring::*;
# async fn demo(node: Arc<sovereign_identity::NodeIdentity>, revocations: sovereign_identity::Revocations) -> Result<(), RingError> {
let mut config = RingConfig::new(Identity::new(node, revocations), vec!["thunderbolt*".into()]);
config.advert = Advert { memory_budget_mb: 4096, models: vec![], isa: "avx2".into(), draining: false };
let ring = Ring::start(config).await?;
let mut view = ring.membership();
view.changed().await.ok();
let mut inbox = ring.subscribe(Channel::Inference);
ring.send("node-c", Channel::Inference, bytes::Bytes::from_static(b"hidden state")).await?;
let message = inbox.recv().await;
# Ok(()) }
```

The transport API (**API Boundary**): [`Ring`] (`start`, `name`,
`membership`, `set_advert`, `send`, `subscribe`, `link_events`, `links`,
`counters`), [`RingConfig`], [`Advert`], [`Membership`], [`Member`],
[`Channel`], [`Message`], [`LinkEvent`], [`LinkStats`], [`RingCounters`],
[`RingError`]. The link protocol is in [`wire`].

**Architecture Invariant:** no certificate check and no handshake is
written here: peers are verified by `sovereign-identity` (the cluster CA,
the revocation list in force) and links are rustls TLS 1.3.
**Architecture Invariant:** a frame's length is checked against
[`wire::MAX_FRAME`] before anything is allocated for it; bad input from a
peer closes its link or drops its datagram, counted in [`RingCounters`],
logged at a limited rate, and never panics.
*/
#![deny(missing_docs)]

mod auth;
mod config;
mod discovery;
mod error;
mod link;
mod netlink;
mod periodic;
mod ratelimit;
mod ring;
mod topology;
pub mod wire;

pub use auth::Identity;
pub use config::{Advert, RingConfig, DEFAULT_PORT};
pub use discovery::GROUP;
pub use error::RingError;
pub use ring::{LinkEvent, LinkStats, Message, Refused, Ring, RingCounters};
pub use topology::{Member, Membership};
pub use wire::Channel;
