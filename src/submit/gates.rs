//! The gate loop every node runs, each second: waiting deployments are
//! judged by the gate rules ([`crate::gate`]) and released, dropped or
//! given their current reason; queued ones whose deploy window closed go
//! back to waiting; automatic promotions and the drift check of git
//! environments are submitted. It lives beside the submitter because it
//! submits (promotions, deployments resubmitted on a moved config); the
//! rules it applies live in `gate`, which the submitter uses too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Origin, SubmitError, Submitter, key_of};
use crate::config::Config;
use crate::gate::{Verdict, due_promotions, evaluate, waits};
use crate::store::{DeploymentState, Millis, Store};

/// The gate loop; see the module header.
pub async fn run(store: Arc<dyn Store>, submitter: Arc<Submitter>, shutdown: CancellationToken) {
    let mut failed = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = once(&store, &submitter, &mut failed).await {
            tracing::debug!("gate loop: {e}");
        }
    }
}

/// A deployment released inside its window may still wait in the queue
/// (behind a lock) until the window closes: it goes back to waiting for
/// the next one rather than start outside it. What already started runs
/// to its end.
pub async fn hold_back_closed(store: &Arc<dyn Store>, config: &Config, now: Millis) -> Result<(), crate::store::StoreError> {
    for (d, hold) in store.queued_in_windows().await? {
        let Some(env) = config.environment(&d.environment) else { continue };
        if env.window_open(now / 1000) {
            continue;
        }
        let Some(waits) = waits(&hold, Some(env), now) else { continue };
        // The same words the gate loop would use, so they stay put.
        let what = format!("waiting for {}", waits.join("; "));
        if store.hold_back(d.id, &what).await? {
            tracing::info!(deployment = d.id, environment = %d.environment, "the deploy window closed while it was queued: waiting again");
        }
    }
    Ok(())
}

/// A promotion that could not be submitted is not tried again for this
/// long (it would fail the same way every second, on every node).
const PROMOTION_BACKOFF: Duration = Duration::from_secs(60);

async fn once(store: &Arc<dyn Store>, submitter: &Submitter, failed: &mut HashMap<(String, String, i64), Instant>) -> Result<(), SubmitError> {
    let config = match submitter.config().await {
        Ok(c) => c.config,
        // An invalid config on disk releases nothing; the API says why.
        Err(_) => return Ok(()),
    };
    let has_promotions = config.environments.iter().any(|e| e.promote_from.is_some());
    let now = crate::store::now_ms();
    if config.environments.iter().any(|e| !e.windows.is_empty()) {
        hold_back_closed(store, &config, now).await?;
    }
    let has_git = config.environments.iter().any(|e| e.git.is_some());
    let holds = store.holds().await?;
    if holds.is_empty() && !has_promotions && !has_git {
        return Ok(());
    }
    let services = store.services().await?;
    if has_git && let Err(e) = submitter.redeploy_drifted(&config, &services).await {
        tracing::debug!("drift check: {e}");
    }
    for (d, hold) in holds {
        let env = config.environment(&d.environment);
        let source_version = hold
            .source_environment
            .as_ref()
            .and_then(|from| services.iter().find(|r| &r.environment == from && Some(&r.service) == d.service.as_ref()).map(|r| r.version.as_str()));
        match evaluate(&d, &hold, env, now, source_version) {
            Verdict::Release => {
                // Never an older config than the environment's current one.
                match submitter.resubmit_if_moved(&d, &hold).await {
                    Ok(None) => {}
                    Ok(Some(new)) => {
                        tracing::info!(
                            deployment = d.id,
                            again = new.deployment_id,
                            "the config moved while it waited: submitted again on the current revision"
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(deployment = d.id, "not released: cannot tell whether its config is current: {e}");
                        continue;
                    }
                }
                if store.release(d.id).await? {
                    tracing::info!(deployment = d.id, environment = %d.environment, "gates passed; deployment queued");
                    if let Some(w) = &submitter.wake {
                        w.work_changed();
                    }
                }
            }
            Verdict::Drop(why) => {
                if store.drop_waiting(d.id, &why, None).await?
                    && let Some(bus) = &submitter.events
                {
                    bus.emit(crate::events::Event::DeploymentFinished { deployment: d.id, state: DeploymentState::Cancelled }).await;
                }
            }
            Verdict::Wait(what) => {
                if hold.waiting_for.as_deref() != Some(what.as_str()) {
                    store.set_waiting_for(d.id, &what).await?;
                }
            }
        }
    }
    let mut due = Vec::new();
    for target in config.environments.iter().filter(|e| e.promote_from.is_some()) {
        // The services (and their auto_deploy) of the config the target runs.
        let runs = if target.git.is_some() {
            match submitter.config_for(&target.name).await {
                Ok(c) => c,
                Err(_) => continue,
            }
        } else {
            config.clone()
        };
        due.extend(due_promotions(target, &runs, &services).into_iter().map(|(svc, from, src)| (svc, from, target.name.clone(), src)));
    }
    failed.retain(|_, at| at.elapsed() < PROMOTION_BACKOFF);
    for (service, from, to, source) in due {
        if failed.contains_key(&(to.clone(), service.clone(), source)) {
            continue;
        }
        // One promotion per source deployment, whichever node sees it.
        let kind = format!("promote:{to}:{service}:");
        let done = store.events_of_kind(&kind, 1).await?;
        if done.first().is_some_and(|e| e.payload.contains(&format!("\"source_deployment\":{source}"))) {
            continue;
        }
        let Some(src) = store.deployment(source).await? else { continue };
        if src.state != DeploymentState::Succeeded {
            continue;
        }
        let key = key_of("promote", &[&to, &service, &source.to_string()]);
        let payload = serde_json::json!({ "kind": "promote", "service": service, "from": from, "to": to, "source_deployment": source }).to_string();
        match submitter.promote(&service, &from, &to, Origin { key: Some(key), event_kind: Some(kind), payload, actor: None }).await {
            Ok(s) if !s.duplicate => tracing::info!(service, from, to, deployment = s.deployment_id, "promotion submitted"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(service, from, to, "promotion not submitted (tried again in {}s): {e}", PROMOTION_BACKOFF.as_secs());
                failed.insert((to.clone(), service.clone(), source), Instant::now());
            }
        }
    }
    Ok(())
}
