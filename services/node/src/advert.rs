//! What this node tells the ring about itself, kept in one place: the
//! models its store holds (followed by replication) and whether it drains
//! answers before a switch of version (followed by the planner).

use std::sync::{Arc, Mutex, PoisonError};

use sovereign_ring::{Advert, Ring};

/// The node's advert, published to the ring whenever it changes.
pub struct Adverts {
    ring: Arc<Ring>,
    advert: Mutex<Advert>,
}

impl Adverts {
    /// Starts from `advert` (the one the ring was started with).
    pub fn new(ring: Arc<Ring>, advert: Advert) -> Arc<Self> {
        Arc::new(Self {
            ring,
            advert: Mutex::new(advert),
        })
    }

    /// Changes the advert; publishes it and returns `true` if it changed.
    pub fn update(&self, change: impl FnOnce(&mut Advert)) -> bool {
        let mut advert = self.advert.lock().unwrap_or_else(PoisonError::into_inner);
        let before = advert.clone();
        change(&mut advert);
        let changed = *advert != before;
        if changed {
            self.ring.set_advert(advert.clone());
        }
        changed
    }
}
