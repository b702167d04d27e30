//! Replication on a running node: the engine of `sovereign-replication` over
//! the ring's replication channel, its peers from the ring's membership, and
//! the node's advert following what its store holds, so a model imported
//! here (from a stick, or `sovereign import` on a dev host) reaches every
//! member and each plans onto it once its own import verified it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sovereign_replication::{Config, Incoming, Outgoing, Peers, Status};
use sovereign_ring::{Channel, Membership, Ring};
use tokio::sync::{mpsc, watch};

use crate::advert::Adverts;

/// How often the store is looked at for models that became live.
const STORE_POLL: Duration = Duration::from_secs(1);

/// Starts replication for `ring`'s node as `config` says, and keeps the
/// models the store holds current in the node's `adverts`.
/// Returns the replication status, kept current for `/health`.
pub fn start(ring: Arc<Ring>, config: Config, adverts: Arc<Adverts>) -> watch::Receiver<Status> {
    let store = config.store.clone();
    let (status_tx, status) = watch::channel(Status::default());
    let (inbound_tx, inbound) = mpsc::channel::<Incoming>(64);
    let (outbound, mut outbound_rx) = mpsc::channel::<Outgoing>(64);
    let (peers_tx, peers) = watch::channel(peers_of(&ring.membership().borrow()));

    let mut messages = ring.subscribe(Channel::Replication);
    tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let incoming = Incoming {
                from: message.from,
                payload: message.payload,
            };
            if inbound_tx.send(incoming).await.is_err() {
                return;
            }
        }
    });
    let sender = Arc::clone(&ring);
    tokio::spawn(async move {
        while let Some(out) = outbound_rx.recv().await {
            if let Err(e) = sender
                .send(&out.to, Channel::Replication, out.payload)
                .await
            {
                tracing::debug!(to = out.to, "replication: cannot send: {e}");
            }
        }
    });
    let mut membership = ring.membership();
    tokio::spawn(async move {
        while membership.changed().await.is_ok() {
            let peers = peers_of(&membership.borrow_and_update());
            peers_tx.send_if_modified(|old| {
                let changed = *old != peers;
                *old = peers;
                changed
            });
        }
    });
    tokio::spawn(async move {
        let never = std::future::pending::<()>();
        if let Err(e) =
            sovereign_replication::run(config, inbound, outbound, peers, status_tx, never).await
        {
            tracing::error!("replication stopped: {e}");
        }
    });
    tokio::spawn(follow_store(store, adverts));
    status
}

/// The members and the models each advertises.
fn peers_of(view: &Membership) -> Peers {
    view.members
        .iter()
        .map(|(name, member)| (name.clone(), member.advert.models.clone()))
        .collect()
}

/// Re-advertises the node whenever the models its store holds change.
async fn follow_store(store: PathBuf, adverts: Arc<Adverts>) {
    let mut tick = tokio::time::interval(STORE_POLL);
    loop {
        tick.tick().await;
        let held = sovereign_replication::held_models(&store);
        let shown = format!("{held:?}");
        if adverts.update(|advert| advert.models = held) {
            tracing::info!(models = %shown, "store changed: new advert");
        }
    }
}

/// The spool's default place: beside the store (`STORE.spool`), on the same partition.
pub fn default_spool(store: &Path) -> PathBuf {
    match store.file_name() {
        Some(name) => store.with_file_name(format!("{}.spool", name.to_string_lossy())),
        None => store.join("..").join("spool"),
    }
}
