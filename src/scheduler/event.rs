//! What the scheduler (and, for gates and git revisions, the submitter)
//! reports. The store's log writer, the metrics, the
//! server's own log and anything else that watches a node meet the
//! scheduler only through [`Event`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

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

/// Fan-out to every consumer. Channels are bounded and sends wait, so a
/// slow consumer slows the scheduler rather than losing output.
#[derive(Clone, Default)]
pub struct EventBus {
    consumers: Vec<mpsc::Sender<Arc<Event>>>,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a consumer; it receives every event emitted from now on.
    pub fn subscribe(&mut self, capacity: usize) -> mpsc::Receiver<Arc<Event>> {
        let (tx, rx) = mpsc::channel(capacity);
        self.consumers.push(tx);
        rx
    }

    pub async fn emit(&self, event: Event) {
        let event = Arc::new(event);
        for c in &self.consumers {
            // A consumer that has gone away is not the scheduler's problem.
            let _ = c.send(event.clone()).await;
        }
    }
}
