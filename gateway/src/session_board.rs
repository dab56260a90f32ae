//! The session board: the decision thread's live sessions, published for the sync thread.
//!
//! Owns: the latest complete list of live sessions (as `control::LiveSession` records) and
//! a change counter the sync thread waits on, so the controller's `session list` sees a
//! gateway's sessions within a fraction of a second. The decision thread publishes after
//! each change (open, renew, close, expiry); the sync thread reads. Must not decide
//! anything or touch the firewall; publishing never blocks on the reader.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use postern_protocol::control::LiveSession;

/// Latest published live-session list with a change counter.
#[derive(Debug, Default)]
pub struct SessionBoard {
    inner: Mutex<Published>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Published {
    generation: u64,
    sessions: Arc<Vec<LiveSession>>,
}

impl SessionBoard {
    pub fn new() -> Arc<SessionBoard> {
        Arc::new(SessionBoard::default())
    }

    /// Replaces the published list (complete, any order) and wakes waiting readers.
    pub fn publish(&self, sessions: Vec<LiveSession>) {
        let mut p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        p.generation += 1;
        p.sessions = Arc::new(sessions);
        drop(p);
        self.changed.notify_all();
    }

    /// The current generation and list.
    pub fn current(&self) -> (u64, Arc<Vec<LiveSession>>) {
        let p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (p.generation, Arc::clone(&p.sessions))
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// current generation and list either way.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> (u64, Arc<Vec<LiveSession>>) {
        let p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (p, _) = self
            .changed
            .wait_timeout_while(p, timeout, |p| p.generation == seen)
            .unwrap_or_else(PoisonError::into_inner);
        (p.generation, Arc::clone(&p.sessions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u32) -> LiveSession {
        LiveSession {
            session: id,
            device: "0".repeat(32),
            device_name: "laptop".into(),
            user: "alice".into(),
            app: "ssh".into(),
            source: "10.0.0.2".into(),
            mode: "lease".into(),
            opened_at_ms: 1,
            renewed_at_ms: 1,
            expires_at_ms: 2,
        }
    }

    #[test]
    fn a_reader_wakes_on_publish_and_times_out_without() {
        let board = SessionBoard::new();
        let (g0, list) = board.current();
        assert!(list.is_empty());
        let (g, _) = board.wait_change(g0, Duration::from_millis(10));
        assert_eq!(
            g, g0,
            "nothing published: same generation after the timeout"
        );
        let b = Arc::clone(&board);
        let writer = std::thread::spawn(move || b.publish(vec![session(5)]));
        let (g1, list) = board.wait_change(g0, Duration::from_secs(5));
        writer.join().expect("writer thread does not panic");
        assert_ne!(g1, g0);
        assert_eq!(list.as_slice(), &[session(5)]);
    }
}
