//! Moving the ring to a newer version between requests: while a switch
//! waits, new requests at this entry are held and those in flight finish on
//! the version they started on. The node says it is draining (in its
//! advert) until they have; the ring switches once no member drains, or
//! after [`DRAIN_LIMIT`] (answers still running then are replayed on the new
//! version, as after a lost node).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The longest a switch waits for answers in flight, and a new request for
/// the switch.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    holding: bool,
    in_flight: usize,
    /// Requests waiting to enter.
    held: usize,
}

/// The requests in flight at this entry, and whether new ones are held.
pub struct Drain {
    state: Mutex<State>,
    released: Condvar,
    draining: watch::Sender<bool>,
}

/// A request in flight; it leaves when dropped.
pub struct InFlight(Arc<Drain>);

impl Drain {
    /// Nothing in flight, nothing held.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            released: Condvar::new(),
            draining: watch::Sender::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, state: &State) {
        let now = state.holding && state.in_flight > 0;
        self.draining.send_if_modified(|draining| {
            let changed = *draining != now;
            *draining = now;
            changed
        });
    }

    /// A request enters: it waits while a switch waits (at most `limit`),
    /// then counts as in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>, limit: Duration) -> InFlight {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        state.held += 1;
        while state.holding {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .released
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.held -= 1;
        state.in_flight += 1;
        self.publish(&state);
        InFlight(Arc::clone(self))
    }

    /// Holds new requests (a switch waits for those in flight) or lets them in.
    pub fn hold(&self, holding: bool) {
        let mut state = self.lock();
        if state.holding != holding {
            state.holding = holding;
            self.publish(&state);
            if !holding {
                self.released.notify_all();
            }
        }
    }

    /// Whether requests that entered here still run while a switch waits.
    pub fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Requests waiting for a switch to let them in.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Follows [`Drain::draining`].
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        self.0.publish(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_request_waits_for_the_switch_and_draining_ends_with_the_last_answer() {
        let drain = Drain::new();
        let first = drain.enter(DRAIN_LIMIT);
        assert!(!drain.draining(), "nothing waits: no drain");
        drain.hold(true);
        assert!(drain.draining());
        let (tx, rx) = std::sync::mpsc::channel();
        let held = Arc::clone(&drain);
        let waiter = std::thread::spawn(move || {
            let guard = held.enter(DRAIN_LIMIT);
            tx.send(()).unwrap();
            guard
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a new request is held while a switch waits"
        );
        assert_eq!(drain.held(), 1);
        drop(first);
        assert!(!drain.draining(), "the last answer in flight finished");
        drain.hold(false);
        rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let second = waiter.join().unwrap();
        assert_eq!(drain.held(), 0);
        drain.hold(true);
        assert!(drain.draining(), "the released request is in flight");
        drop(second);
        assert!(!drain.draining());
    }

    #[test]
    fn a_held_request_goes_in_after_the_limit() {
        let drain = Drain::new();
        drain.hold(true);
        let _guard = drain.enter(Duration::from_millis(10));
        assert!(drain.draining());
    }
}
