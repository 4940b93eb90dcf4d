//! A node's event bus: what happens to deployments and jobs, fanned out
//! to everything that watches a node.
//!
//! Emitters only emit: the scheduler (starts, job output, results, ends),
//! the submitter (a deployment waiting at a gate, a superseded one, a
//! rejected config revision), the gate loop (a promotion dropped) and the
//! API (a cancel that ended a deployment by itself). Consumers only
//! subscribe, each on its own bounded channel: [`logwriter`] (job output
//! into the store), [`server_log`] (the node's own log), the metrics
//! (`api::metrics::consume`) and the notifier (`notify::run`); `node`
//! wires them. A consumer's stream ends when every emitter has let go of
//! the bus, which is how a stopping node lets them finish, or once the
//! node closes the bus ([`EventBus::closer`]): a client connection the API
//! had to abandon on its way down still holds a sender, and would
//! otherwise keep the consumers, and the node's stop, waiting.
//!
//! This module depends on nothing but the store's types, so every other
//! module may emit or consume without depending on the scheduler.

pub mod logwriter;
pub mod server_log;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{DeploymentState, Millis, Outcome};

#[derive(Debug, Clone)]
pub enum Event {
    DeploymentStarted {
        deployment: i64,
        node: String,
    },
    JobStarted {
        deployment: i64,
        job_id: i64,
        name: String,
        attempt: i64,
        node: String,
        /// From ready to started.
        queued_for: Duration,
        /// From the event's acceptance to this start.
        since_event: Duration,
    },
    JobOutput {
        deployment: i64,
        job_id: i64,
        attempt: i64,
        ts: Millis,
        stream: &'static str,
        line: String,
        /// The part of the job that wrote it (a host), if it runs in parts.
        part: Option<String>,
    },
    JobFinished {
        deployment: i64,
        job_id: i64,
        name: String,
        attempt: i64,
        outcome: Outcome,
        reason: Option<String>,
        duration: Duration,
        /// Another attempt follows after this delay.
        retry_in: Option<Duration>,
    },
    DeploymentFinished {
        deployment: i64,
        state: DeploymentState,
    },
    /// Not from the scheduler: a deployment stored `waiting` for an
    /// approval (the submitter reports it).
    DeploymentWaiting {
        deployment: i64,
    },
    /// Not from the scheduler: a commit of an environment's config branch
    /// failed validation; the environment stays on its last good one.
    RevisionRejected {
        environment: String,
        commit: String,
        errors: String,
    },
}

impl Event {
    /// The deployment a change of state is about (not output lines: they
    /// come many per job, and reach the store later, through the log
    /// writer).
    pub fn deployment(&self) -> Option<i64> {
        match self {
            Event::DeploymentStarted { deployment, .. }
            | Event::JobStarted { deployment, .. }
            | Event::JobFinished { deployment, .. }
            | Event::DeploymentFinished { deployment, .. }
            | Event::DeploymentWaiting { deployment } => Some(*deployment),
            Event::JobOutput { .. } | Event::RevisionRejected { .. } => None,
        }
    }
}

/// Fan-out to every consumer. Channels are bounded and sends wait, so a
/// slow consumer slows the scheduler rather than losing output.
#[derive(Clone, Default)]
pub struct EventBus {
    consumers: Vec<mpsc::Sender<Arc<Event>>>,
    closed: CancellationToken,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a consumer; it receives every event emitted from now on.
    pub fn subscribe(&mut self, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        self.consumers.push(tx);
        Subscription { rx, closed: self.closed.clone() }
    }

    /// Cancelled, it ends every consumer's stream once what is queued has
    /// been taken, whoever still holds a sender.
    pub fn closer(&self) -> CancellationToken {
        self.closed.clone()
    }

    pub async fn emit(&self, event: Event) {
        let event = Arc::new(event);
        for c in &self.consumers {
            // A consumer that has gone away is not the scheduler's problem.
            let _ = c.send(event.clone()).await;
        }
    }
}

/// A consumer's end of the bus: every event emitted since it subscribed,
/// in order, until every sender is gone or the bus is closed.
pub struct Subscription {
    rx: mpsc::Receiver<Arc<Event>>,
    closed: CancellationToken,
}

impl Subscription {
    /// The next event; `None` once the stream has ended (what was queued
    /// when the bus was closed is still given out first).
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        tokio::select! {
            biased;
            ev = self.rx.recv() => ev,
            _ = self.closed.cancelled() => self.rx.try_recv().ok(),
        }
    }

    /// An event already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: i64) -> Event {
        Event::JobOutput { deployment: 1, job_id: 1, attempt: 1, ts: n, stream: "stdout", line: n.to_string(), part: None }
    }

    /// Closing the bus ends a consumer's stream although a sender lives
    /// on, after every event queued before the close; an event emitted
    /// after the consumer has gone is dropped, not waited on.
    #[tokio::test]
    async fn issue19_a_closed_bus_hands_out_what_was_queued_and_then_ends() {
        let mut bus = EventBus::new();
        let mut sub = bus.subscribe(16);
        for n in 0..3 {
            bus.emit(line(n)).await;
        }
        bus.closer().cancel();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let mut got = Vec::new();
            while let Some(ev) = sub.recv().await {
                if let Event::JobOutput { ts, .. } = *ev {
                    got.push(ts);
                }
            }
            got
        })
        .await
        .expect("the stream ends once the bus is closed, though the bus lives on");
        assert_eq!(got, vec![0, 1, 2]);
        drop(sub);
        tokio::time::timeout(Duration::from_secs(5), bus.emit(line(3))).await.expect("an emit after the consumer ended does not wait");
    }
}
