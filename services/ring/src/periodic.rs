//! The ring's periodic timers (announcements, heartbeats).

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

/// A timer that fires every `period`. When the node was held up (a starved
/// CPU, a paused VM) it skips the ticks it missed instead of firing them back
/// to back (tokio's default), so a late node sends one announcement or
/// heartbeat, never a burst that its neighbours' rate limits must absorb.
pub(crate) fn every(period: Duration) -> Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    interval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timer_held_up_for_ten_periods_fires_once_not_ten_times() {
        let period = Duration::from_millis(100);
        let mut timer = every(period);
        timer.tick().await;
        // The runtime is held up for ten periods without polling the timer.
        tokio::time::advance(period * 10).await;
        timer.tick().await;
        let again = tokio::time::timeout(Duration::ZERO, timer.tick()).await;
        assert!(again.is_err(), "a missed tick fired at once");
    }
}
