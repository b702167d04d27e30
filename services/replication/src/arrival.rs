//! How far a transfer into the spool has come, shared with the import that
//! verifies the item while it arrives (the engine advances it after each
//! chunk is written; the import's reader waits on it).

use std::io;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use sovereign_signing::Arrival;

use crate::item::ItemMeta;

/// Where a transfer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Running,
    Complete,
    GivenUp,
}

/// A transfer's progress: bytes written to the spool, in order across the
/// item's files, and whether it ended.
pub(crate) struct Progress {
    sizes: Vec<u64>,
    state: Mutex<(u64, End)>,
    changed: Condvar,
    /// A reader waiting this long without a new byte gives up (so an import
    /// does not hold the store while a cable stays pulled).
    idle: Duration,
}

impl Progress {
    /// The progress of `meta`'s transfer, `received` bytes in.
    pub fn new(meta: &ItemMeta, received: u64, idle: Duration) -> Self {
        Self {
            sizes: meta.files.iter().map(|f| f.size).collect(),
            state: Mutex::new((received, End::Running)),
            changed: Condvar::new(),
            idle,
        }
    }

    fn set(&self, update: impl FnOnce(&mut (u64, End))) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        update(&mut state);
        self.changed.notify_all();
    }

    /// `received` bytes are written (and readable).
    pub fn advance(&self, received: u64) {
        self.set(|state| state.0 = state.0.max(received));
    }

    /// Every byte is written.
    pub fn complete(&self) {
        self.set(|state| state.1 = End::Complete);
    }

    /// The transfer is dropped: waiting readers fail.
    pub fn give_up(&self) {
        self.set(|state| {
            if state.1 == End::Running {
                state.1 = End::GivenUp;
            }
        });
    }

    /// Waits until `done` says yes of the state, failing when the transfer
    /// was given up or nothing changed for `idle`.
    fn wait_until<T>(&self, mut done: impl FnMut(u64, End) -> Option<T>) -> io::Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = done(state.0, state.1) {
                return Ok(value);
            }
            if state.1 == End::GivenUp {
                return Err(io::Error::other("the transfer was given up"));
            }
            let before = *state;
            let (next, waited) = self
                .changed
                .wait_timeout(state, self.idle)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if waited.timed_out() && *state == before {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte arrived for {:?}", self.idle),
                ));
            }
        }
    }
}

impl Arrival for Progress {
    fn wait_file(&self, index: usize, have: u64) -> io::Result<u64> {
        let Some(&size) = self.sizes.get(index) else {
            return Ok(0);
        };
        let start: u64 = self.sizes[..index].iter().sum();
        self.wait_until(|received, end| {
            let length = received.saturating_sub(start).min(size);
            (length > have || length == size || end == End::Complete).then_some(length)
        })
    }

    fn wait_complete(&self) -> io::Result<()> {
        self.wait_until(|_, end| (end == End::Complete).then_some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn meta() -> ItemMeta {
        ItemMeta::for_tests(&[100, 50])
    }

    #[test]
    fn a_reader_waits_for_bytes_per_file_and_fails_when_the_transfer_is_given_up() {
        let progress = Arc::new(Progress::new(&meta(), 40, Duration::from_secs(30)));
        assert_eq!(progress.wait_file(0, 10).unwrap(), 40);
        assert_eq!(progress.wait_file(2, 0).unwrap(), 0, "not part of the item");
        let waiter = {
            let progress = progress.clone();
            std::thread::spawn(move || progress.wait_file(1, 0))
        };
        progress.advance(100);
        progress.advance(120);
        assert_eq!(waiter.join().unwrap().unwrap(), 20);
        // A complete first file answers at once, even asked past its end.
        assert_eq!(progress.wait_file(0, 100).unwrap(), 100);
        let waiter = {
            let progress = progress.clone();
            std::thread::spawn(move || progress.wait_complete())
        };
        progress.give_up();
        assert!(waiter.join().unwrap().is_err());
        assert!(progress.wait_file(1, 20).is_err());
    }

    #[test]
    fn a_reader_gives_up_after_the_idle_time_and_completion_releases_every_wait() {
        let progress = Progress::new(&meta(), 40, Duration::from_millis(50));
        let error = progress.wait_file(0, 40).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        progress.complete();
        assert_eq!(progress.wait_file(1, 0).unwrap(), 0);
        assert!(progress.wait_complete().is_ok());
    }
}
