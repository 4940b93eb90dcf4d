//! Polling config repositories: each environment whose `git.poll` is set
//! is fetched that often, and a new head commit is decided on (accepted
//! or rejected, see `submit::git`). Off by default: a push webhook is the
//! cheaper trigger. Every git environment is fetched once at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::submit::Submitter;

const CONFIG_EVERY: Duration = Duration::from_secs(5);

pub async fn run(submitter: Arc<Submitter>, shutdown: CancellationToken) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    // The node's config, read again every few seconds, not every tick.
    let mut config: Option<(Instant, crate::config::Config)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if config.as_ref().is_none_or(|(at, _)| at.elapsed() >= CONFIG_EVERY) {
            match submitter.config().await {
                Ok(l) => config = Some((Instant::now(), l.config)),
                Err(_) => continue,
            }
        }
        let Some((_, current)) = &config else { continue };
        for env in &current.environments {
            let Some(git) = &env.git else { continue };
            // Every git environment is fetched once when the node starts
            // (a push may have been missed while it was down); after that
            // only those with `poll`.
            match (last.get(&env.name), git.poll) {
                (None, _) => {}
                (Some(t), Some(every)) if t.elapsed() >= every => {}
                _ => continue,
            }
            last.insert(env.name.clone(), Instant::now());
            // One at a time: a slow fetch delays the next poll, never piles up.
            let checked = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = submitter.check_revision(&env.name) => r,
            };
            match checked {
                Ok(r) => tracing::debug!(environment = %env.name, commit = %r.commit, state = %r.state, "polled config repository"),
                Err(e) => tracing::warn!(environment = %env.name, "polling the config repository failed: {e}"),
            }
        }
    }
}
