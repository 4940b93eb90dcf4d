//! The node's own log: one line per deployment and job event (output
//! lines are the log writer's).

use super::Event;

pub async fn run(mut rx: super::Subscription) {
    while let Some(ev) = rx.recv().await {
        match &*ev {
            Event::DeploymentStarted { deployment, .. } => tracing::info!(deployment, "deployment started"),
            Event::JobStarted { deployment, name, attempt, .. } => tracing::info!(deployment, job = %name, attempt, "job started"),
            Event::JobFinished { deployment, name, attempt, outcome, reason, duration, retry_in, .. } => tracing::info!(
                deployment,
                job = %name,
                attempt,
                outcome = %outcome,
                reason = reason.as_deref().unwrap_or(""),
                duration_ms = duration.as_millis() as u64,
                retry_in_ms = retry_in.map(|d| d.as_millis() as u64),
                "job finished"
            ),
            Event::DeploymentFinished { deployment, state } => tracing::info!(deployment, state = %state, "deployment finished"),
            Event::DeploymentWaiting { deployment } => tracing::info!(deployment, "deployment waiting for approval"),
            Event::RevisionRejected { environment, commit, errors } => {
                tracing::warn!(environment = %environment, commit = %commit, "config revision rejected:\n{errors}")
            }
            Event::JobOutput { .. } => {}
        }
    }
}
