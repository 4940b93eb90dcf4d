//! Long polls for `GET /api/v1/deployments/{id}?wait=…&after=…`: the
//! answer comes as soon as the deployment changes on this node, instead of
//! a client polling on a timer and learning of the end up to one period
//! late (the CLI's `run` and `deploy` follow a deployment this way).
//!
//! Every event this node's scheduler emits about a deployment gets a
//! sequence number; a detail carries the number it was read at (`seq`),
//! and a client passes it back as `after`. The last [`RECENT`] numbers are
//! kept with their deployments, so "has deployment d changed since n?" is
//! answered without a race: an event between two requests is found, not
//! missed. What another node did is not seen here: `wait` bounds how long
//! that stays unnoticed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// Events remembered with their deployment. A client further behind than
/// this is answered at once.
const RECENT: usize = 4096;
/// The longest wait a client may ask for: a read is answered at least
/// this often, so a wait on what never changes here (a deployment held
/// for an approval, another node's work) stays short.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

pub struct Changes {
    recent: Mutex<VecDeque<(u64, i64)>>,
    /// The last sequence number handed out (0: none yet).
    seq: watch::Sender<u64>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes { recent: Mutex::new(VecDeque::with_capacity(RECENT)), seq: watch::Sender::new(0) }
    }
}

impl Changes {
    /// The sequence number of the last event: what a read made now has seen.
    pub fn seq(&self) -> u64 {
        *self.seq.borrow()
    }

    fn record(&self, deployment: i64) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq() + 1;
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((seq, deployment));
        // Under the lock, so numbers reach `recent` in order.
        self.seq.send_replace(seq);
    }

    /// Whether `deployment` may have changed after `after`: an event of it
    /// since, or `after` is not one of ours to judge (too old, or from a
    /// node that restarted since).
    fn changed_since(&self, deployment: i64, after: u64) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let latest = recent.back().map_or(0, |&(s, _)| s);
        let oldest = recent.front().map_or(1, |&(s, _)| s);
        if after > latest || after + 1 < oldest {
            return true;
        }
        recent.iter().rev().take_while(|&&(s, _)| s > after).any(|&(_, d)| d == deployment)
    }

    /// Wait until `deployment` changes after `after`, or `limit` passes.
    pub async fn wait(&self, deployment: i64, after: u64, limit: Duration) {
        // Subscribed before looking, so an event between the look and the
        // wait still wakes us.
        let mut rx = self.seq.subscribe();
        let deadline = tokio::time::Instant::now() + limit.min(MAX_WAIT);
        while !self.changed_since(deployment, after) {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The deadline, or the sender gone (never: `self` holds it).
                _ => return,
            }
        }
    }
}

/// Number every event that names a deployment, until the bus closes.
pub async fn consume(changes: Arc<Changes>, mut events: crate::events::Subscription) {
    while let Some(ev) = events.recv().await {
        if let Some(d) = ev.deployment() {
            changes.record(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_found_by_deployment_and_not_missed_between_requests() {
        let c = Changes::default();
        let start = c.seq();
        assert_eq!(start, 0);
        c.record(1);
        c.record(2);
        assert!(c.changed_since(1, start) && c.changed_since(2, start));
        assert!(!c.changed_since(3, start), "no event of deployment 3");
        let after_two = c.seq();
        assert!(!c.changed_since(1, after_two) && !c.changed_since(2, after_two));
        c.record(2);
        assert!(c.changed_since(2, after_two) && !c.changed_since(1, after_two));
        // A number this node never gave (it restarted): answered at once.
        assert!(c.changed_since(1, after_two + 100));
    }

    #[test]
    fn a_client_further_behind_than_the_window_is_answered_at_once() {
        let c = Changes::default();
        for _ in 0..RECENT + 10 {
            c.record(7);
        }
        assert!(c.changed_since(8, 1), "its events fell out of the window: it may have missed one");
        assert!(!c.changed_since(8, c.seq() - 5));
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_change_or_the_limit() {
        let c = Arc::new(Changes::default());
        let after = c.seq();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let t = tokio::time::Instant::now();
                c.wait(5, after, MAX_WAIT).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.record(6);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "another deployment's event does not end the wait");
        c.record(5);
        let took = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task");
        assert!(took < MAX_WAIT, "woken by the change, not by the limit: {took:?}");
        // Nothing happens: the limit ends it.
        let t = tokio::time::Instant::now();
        c.wait(5, c.seq(), Duration::from_millis(100)).await;
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
