//! Link state from the kernel: an rtnetlink socket subscribed to link
//! changes reports every interface's carrier the moment it changes (a
//! pulled cable, a peer powered off), after a dump of the current state.

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

/// An interface's state as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfaceState {
    /// The interface name.
    pub name: String,
    /// Its index (the scope id of its link-local addresses).
    pub index: u32,
    /// Administratively up with carrier: usable.
    pub up: bool,
}

fn state(message: &LinkMessage, removed: bool) -> Option<IfaceState> {
    let name = message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    let flags = message.header.flags;
    Some(IfaceState {
        name,
        index: message.header.index,
        up: !removed && flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    })
}

/// Sends the state of every interface, then every change, until `tx` closes.
pub(crate) async fn watch(tx: mpsc::UnboundedSender<IfaceState>) -> std::io::Result<()> {
    let (connection, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    let connection = tokio::spawn(connection);
    let result = async {
        let mut dump = handle.link().get().execute();
        while let Some(link) = dump
            .try_next()
            .await
            .map_err(|e| std::io::Error::other(format!("netlink link dump: {e}")))?
        {
            if let Some(s) = state(&link, false) {
                if tx.send(s).is_err() {
                    return Ok(());
                }
            }
        }
        while let Some((message, _)) = messages.next().await {
            let s = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    state(&link, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    state(&link, true)
                }
                _ => None,
            };
            if let Some(s) = s {
                if tx.send(s).is_err() {
                    return Ok(());
                }
            }
        }
        Err(std::io::Error::other("netlink link monitor closed"))
    }
    .await;
    connection.abort();
    result
}
