//! A service's stop request (Ctrl-C or SIGTERM), listened for once for the
//! whole life of the process so that no signal falls between two listeners.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Becomes true once Ctrl-C or SIGTERM arrived; cheap to clone and to wait on
/// from several places (a waiting phase, then the server).
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Starts listening for Ctrl-C and SIGTERM now, inside a tokio runtime.
    /// Call it first: a signal that arrives before any listener exists
    /// would be swallowed by tokio's handler and never seen.
    pub fn on_signal() -> std::io::Result<Self> {
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let (requested, seen) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            let _ = requested.send(true);
        });
        Ok(Self(seen))
    }

    /// Completes once the stop is requested (at once if it already was).
    pub async fn requested(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sigterm_sent_before_anyone_waits_is_still_seen() {
        let stop = Shutdown::on_signal().unwrap();
        // Let the listening task start, then signal before anyone waits.
        tokio::task::yield_now().await;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), stop.requested())
            .await
            .expect("the SIGTERM was lost");
    }
}
