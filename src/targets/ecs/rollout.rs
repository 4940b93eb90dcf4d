//! A service's rollout on ECS: Slipway starts it (a new task definition
//! revision, `UpdateService` with the circuit breaker on), ECS runs it,
//! Slipway watches and judges it, and reverts it to the task definition
//! it recorded before. Success is only ever the deployment of *our* task
//! definition being the PRIMARY one and COMPLETED: a tool that waits for
//! "stable" reports success after ECS has rolled back by itself
//! (fabfuel/ecs-deploy#185). Design: docs/design/ecs.md.

use std::time::Instant;

use aws_sdk_ecs::types::{DeploymentCircuitBreaker, DeploymentConfiguration, DeploymentRolloutState, Service, Tag, TaskDefinition, TaskDefinitionField};
use tokio_util::sync::CancellationToken;

use super::client::{Clients, EcsTarget, aws_error};
use super::config::ServiceSettings;
use crate::service::RolloutRequest;
use crate::store::Outcome;
use crate::targets::{Line, OutputSink, RunResult, Stream, TargetError, TargetErrorKind};

/// Tags on what Slipway registers and starts: which deployment made it,
/// for what image, for which installation.
pub(super) const TAG_DEPLOYMENT: &str = "slipway:deployment";
pub(super) const TAG_IMAGE: &str = "slipway:image";
pub(super) const TAG_INSTALLATION: &str = "slipway:installation";
/// How many of a family's newest revisions are searched for one Slipway
/// registered for the same image (a rollback, a redeploy).
const REUSE_WITHIN: usize = 10;
/// ECS's events kept for the record of a failed rollout.
const EVENTS: usize = 8;

pub(super) async fn say(output: &OutputSink, text: String) {
    let _ = output.send(Line { stream: Stream::Stdout, text, part: None, cut: false }).await;
}

/// The image a request pins: `repository@sha256:…`.
pub(super) fn pinned(repository: &str, sha256: Option<&str>) -> Result<String, TargetError> {
    match sha256 {
        Some(hex) if !hex.is_empty() => Ok(format!("{repository}@sha256:{hex}")),
        _ => Err(TargetError::new(TargetErrorKind::Refused, format!("{repository} was not pinned to a digest when the deploy was accepted"))),
    }
}

pub(super) async fn describe_service(c: &Clients, s: &ServiceSettings) -> Result<Service, TargetError> {
    let what = format!("describing ECS service {} in cluster {}", s.ecs_service, s.cluster);
    let out = c.ecs.describe_services().cluster(&s.cluster).services(&s.ecs_service).send().await.map_err(|e| aws_error(&what, e))?;
    if let Some(f) = out.failures().first() {
        return Err(TargetError::new(TargetErrorKind::NotFound, format!("{what}: {}", f.reason().unwrap_or("not found"))));
    }
    match out.services().first() {
        Some(svc) if svc.status() != Some("INACTIVE") => Ok(svc.clone()),
        _ => Err(TargetError::new(TargetErrorKind::NotFound, format!("{what}: no such active service"))),
    }
}

async fn describe_task_definition(c: &Clients, arn: &str) -> Result<(TaskDefinition, Vec<Tag>), TargetError> {
    let out = c
        .ecs
        .describe_task_definition()
        .task_definition(arn)
        .include(TaskDefinitionField::Tags)
        .send()
        .await
        .map_err(|e| aws_error(&format!("describing task definition {arn}"), e))?;
    let td = out.task_definition().cloned().ok_or_else(|| TargetError::from(format!("ECS described no task definition {arn}")))?;
    Ok((td, out.tags().to_vec()))
}

pub(super) fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

fn image_of<'a>(td: &'a TaskDefinition, container: &str) -> Option<&'a str> {
    td.container_definitions().iter().find(|c| c.name() == Some(container)).and_then(|c| c.image())
}

/// Whether two task definitions differ at most in `container`'s image: a
/// revision registered earlier is reused only then, so a deploy never
/// brings back settings changed since (roles, sidecars, environment).
fn same_but_image(a: &TaskDefinition, b: &TaskDefinition, container: &str) -> bool {
    let without_image = |td: &TaskDefinition| -> Vec<aws_sdk_ecs::types::ContainerDefinition> {
        td.container_definitions()
            .iter()
            .map(|cd| {
                let mut cd = cd.clone();
                if cd.name() == Some(container) {
                    cd.image = None;
                }
                cd
            })
            .collect()
    };
    without_image(a) == without_image(b)
        && a.task_role_arn() == b.task_role_arn()
        && a.execution_role_arn() == b.execution_role_arn()
        && a.network_mode() == b.network_mode()
        && a.volumes() == b.volumes()
        && a.placement_constraints() == b.placement_constraints()
        && a.requires_compatibilities() == b.requires_compatibilities()
        && a.cpu() == b.cpu()
        && a.memory() == b.memory()
        && a.pid_mode() == b.pid_mode()
        && a.ipc_mode() == b.ipc_mode()
        && a.proxy_configuration() == b.proxy_configuration()
        && a.ephemeral_storage() == b.ephemeral_storage()
        && a.runtime_platform() == b.runtime_platform()
}

fn nonempty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// The task definition that runs `image` in the service's container:
/// the service's current one when it already does; else the newest
/// revision Slipway registered for that image (a rollback returns to the
/// very task definition that ran before); else a copy of the current one
/// with only that container's image replaced, tagged with the deployment.
/// Returns its ARN, and whether it was registered just now.
pub(super) async fn task_definition_for(
    target: &EcsTarget,
    c: &Clients,
    s: &ServiceSettings,
    current_arn: &str,
    image: &str,
    deployment_id: i64,
) -> Result<(String, bool), TargetError> {
    let (current, current_tags) = describe_task_definition(c, current_arn).await?;
    let Some(running) = image_of(&current, &s.container) else {
        let names: Vec<&str> = current.container_definitions().iter().filter_map(|c| c.name()).collect();
        return Err(TargetError::new(
            TargetErrorKind::Refused,
            format!("task definition {current_arn} has no container {:?} (it has {}); set `container` to the one that runs the image", s.container, names.join(", ")),
        ));
    };
    let current_arn = current.task_definition_arn().unwrap_or(current_arn).to_string();
    if running == image {
        return Ok((current_arn, false));
    }
    let family = current.family().unwrap_or_default().to_string();
    // A revision Slipway registered earlier for this image.
    let listed = c
        .ecs
        .list_task_definitions()
        .family_prefix(&family)
        .sort(aws_sdk_ecs::types::SortOrder::Desc)
        .max_results(REUSE_WITHIN as i32)
        .send()
        .await
        .map_err(|e| aws_error(&format!("listing task definitions of {family}"), e))?;
    let mut arns: Vec<(i64, String)> = listed
        .task_definition_arns()
        .iter()
        .filter_map(|a| {
            let (fam, rev) = a.rsplit_once('/')?.1.rsplit_once(':')?;
            (fam == family).then(|| rev.parse::<i64>().ok().map(|r| (r, a.clone()))).flatten()
        })
        .collect();
    // Newest first, whatever order the API kept.
    arns.sort_by_key(|a| std::cmp::Reverse(a.0));
    for (_, arn) in arns.into_iter().take(REUSE_WITHIN) {
        if arn == current_arn {
            continue;
        }
        let (td, tags) = describe_task_definition(c, &arn).await?;
        if tag(&tags, TAG_IMAGE) == Some(image)
            && image_of(&td, &s.container) == Some(image)
            && tag(&tags, TAG_INSTALLATION) == Some(&target.installation)
            && same_but_image(&td, &current, &s.container)
        {
            return Ok((arn, false));
        }
    }
    let containers = current
        .container_definitions()
        .iter()
        .map(|cd| {
            let mut cd = cd.clone();
            if cd.name() == Some(s.container.as_str()) {
                cd.image = Some(image.to_string());
            }
            cd
        })
        .collect::<Vec<_>>();
    // The current definition's own tags are kept, Slipway's replaced.
    let mut tags: Vec<Tag> = current_tags.into_iter().filter(|t| !t.key().unwrap_or_default().starts_with("slipway:")).collect();
    for (k, v) in [(TAG_DEPLOYMENT, deployment_id.to_string()), (TAG_IMAGE, image.to_string()), (TAG_INSTALLATION, target.installation.clone())] {
        tags.push(Tag::builder().key(k).value(v).build());
    }
    let out = c
        .ecs
        .register_task_definition()
        .family(&family)
        .set_task_role_arn(current.task_role_arn().map(str::to_string))
        .set_execution_role_arn(current.execution_role_arn().map(str::to_string))
        .set_network_mode(current.network_mode().cloned())
        .set_container_definitions(Some(containers))
        .set_volumes(nonempty(current.volumes()))
        .set_placement_constraints(nonempty(current.placement_constraints()))
        .set_requires_compatibilities(nonempty(current.requires_compatibilities()))
        .set_cpu(current.cpu().map(str::to_string))
        .set_memory(current.memory().map(str::to_string))
        .set_tags(Some(tags))
        .set_pid_mode(current.pid_mode().cloned())
        .set_ipc_mode(current.ipc_mode().cloned())
        .set_proxy_configuration(current.proxy_configuration().cloned())
        .set_ephemeral_storage(current.ephemeral_storage().cloned())
        .set_runtime_platform(current.runtime_platform().cloned())
        .set_enable_fault_injection(current.enable_fault_injection())
        .send()
        .await
        .map_err(|e| aws_error(&format!("registering a task definition of {family}"), e))?;
    let arn = out.task_definition().and_then(|t| t.task_definition_arn()).ok_or_else(|| TargetError::from("ECS registered a task definition without an ARN"))?;
    Ok((arn.to_string(), true))
}

/// Point the service at `arn` with the circuit breaker on (ECS stops a
/// failing deployment and goes back by itself), the service's other
/// deployment settings kept.
async fn update_service(c: &Clients, s: &ServiceSettings, svc: &Service, arn: &str) -> Result<Option<String>, TargetError> {
    let breaker = DeploymentCircuitBreaker::builder().enable(true).rollback(true).build();
    let mut config = svc.deployment_configuration().cloned().unwrap_or_else(|| DeploymentConfiguration::builder().build());
    config.deployment_circuit_breaker = Some(breaker);
    let out = c
        .ecs
        .update_service()
        .cluster(&s.cluster)
        .service(&s.ecs_service)
        .task_definition(arn)
        .deployment_configuration(config)
        .send()
        .await
        .map_err(|e| aws_error(&format!("updating ECS service {} to {arn}", s.ecs_service), e))?;
    // The deployment it started: watched by its id, not only by its task
    // definition (a read right after may still show the old state).
    Ok(out
        .service()
        .and_then(|svc| svc.deployments().iter().find(|d| d.status() == Some("PRIMARY") && d.task_definition().is_some_and(|t| same_definition(t, arn))))
        .and_then(|d| d.id())
        .map(str::to_string))
}

/// What ECS said of its service: its last events, newest first.
fn events(svc: &Service) -> String {
    let lines: Vec<&str> = svc.events().iter().take(EVENTS).filter_map(|e| e.message()).collect();
    if lines.is_empty() { String::new() } else { format!("; ECS events: {}", lines.join(" | ")) }
}

/// Same task definition, whether ECS names it by ARN or family:revision.
fn same_definition(a: &str, b: &str) -> bool {
    let short = |x: &str| x.rsplit_once('/').map(|(_, s)| s.to_string()).unwrap_or_else(|| x.to_string());
    a == b || short(a) == short(b)
}

enum Watch {
    Completed,
    /// ECS gave up, or went back by itself: its reason, for the record.
    Failed(String),
    TimedOut(String),
    Stopped,
}

pub(super) async fn run(target: &EcsTarget, req: &RolloutRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
    match rollout(target, req, &output, cancel).await {
        Ok(r) => r,
        Err(e) => RunResult::failed(e.message),
    }
}

async fn rollout(target: &EcsTarget, req: &RolloutRequest, output: &OutputSink, cancel: CancellationToken) -> Result<RunResult, TargetError> {
    let s = EcsTarget::settings(&req.spec.settings)?;
    let repository = req.spec.image.as_ref().map(|i| i.repository.as_str()).ok_or_else(|| TargetError::from("a service on ECS needs an `image`"))?;
    let image = pinned(repository, req.sha256.as_deref())?;
    let c = target.clients(&s.aws).await;
    let svc = describe_service(&c, &s).await?;
    let current = svc.task_definition().map(str::to_string).ok_or_else(|| TargetError::from(format!("ECS service {} runs no task definition", s.ecs_service)))?;
    let (ours, registered) = task_definition_for(target, &c, &s, &current, &image, req.deployment_id).await?;
    let mine = |d: &&aws_sdk_ecs::types::Deployment| d.task_definition().is_some_and(|t| same_definition(t, &ours));
    // What a failure goes back to: what the service ran, or, when it is on
    // ours already (a rollout a dead node started), what ECS still drains.
    // Never ours.
    let (previous, deployment_id) = if same_definition(&ours, &current) {
        let primary_done = svc
            .deployments()
            .iter()
            .find(|d| d.status() == Some("PRIMARY"))
            .is_some_and(|d| mine(&d) && d.rollout_state().is_none_or(|st| *st == DeploymentRolloutState::Completed) && svc.deployments().len() == 1);
        if primary_done {
            say(output, format!("ECS service {} already runs {ours} ({image}), its deployment COMPLETED: nothing to do", s.ecs_service)).await;
            return Ok(ok());
        }
        let draining = svc.deployments().iter().find(|d| !mine(d)).and_then(|d| d.task_definition()).map(str::to_string);
        say(output, format!("ECS service {} is already deploying {ours} ({image}): watching it", s.ecs_service)).await;
        (draining, svc.deployments().iter().find(mine).and_then(|d| d.id()).map(str::to_string))
    } else {
        say(output, format!("task definition {} {ours} ({image}); service {} ran {current}", if registered { "registered:" } else { "reused:" }, s.ecs_service)).await;
        match update_service(&c, &s, &svc, &ours).await {
            Ok(id) => (Some(current), id),
            Err(e) => {
                // The call may have taken effect before it failed.
                let why = format!("the service's update failed: {}", e.message);
                return Ok(give_back(&c, &s, Some(&current), &ours, why, output).await);
            }
        }
    };
    say(output, format!("ECS service {} in cluster {} now deploys {ours} (circuit breaker on)", s.ecs_service, s.cluster)).await;
    let deadline = Instant::now() + req.spec.health.deadline;
    let why = match watch(&c, &s, &ours, deployment_id.as_deref(), deadline, output, &cancel).await {
        Watch::Completed => {
            say(output, format!("ECS deployment of {ours} COMPLETED")).await;
            return Ok(ok());
        }
        Watch::Failed(why) => why,
        Watch::TimedOut(why) => why,
        Watch::Stopped => "stopped on request".to_string(),
    };
    say(output, format!("rollout failed: {why}")).await;
    Ok(give_back(&c, &s, previous.as_deref(), &ours, why, output).await)
}

/// After a failed rollout: the service back on `previous` (retried a few
/// times), `rolled_back`; or, where it cannot go back, failed saying the
/// service may still be on `ours`.
async fn give_back(c: &Clients, s: &ServiceSettings, previous: Option<&str>, ours: &str, why: String, output: &OutputSink) -> RunResult {
    let Some(previous) = previous else {
        return RunResult::failed(format!("{why}; there is no earlier task definition to go back to, and the service may still be on {ours}"));
    };
    let mut delay = std::time::Duration::from_secs(2);
    let mut last = String::new();
    for attempt in 1..=4 {
        match revert(c, s, previous, output).await {
            Ok(()) => {
                return RunResult { outcome: Outcome::RolledBack, exit_code: None, reason: Some(format!("rolled back to {previous}: {why}")), parts: Vec::new() };
            }
            Err(e) => {
                last = e.message;
                if attempt < 4 {
                    say(output, format!("cannot revert yet ({last}); retrying")).await;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
    RunResult::failed(format!("{why}; and the revert to {previous} failed ({last}): the service may still be on {ours}"))
}

fn ok() -> RunResult {
    RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() }
}

/// Until ours is the PRIMARY deployment and COMPLETED, or it failed, or
/// ECS went back by itself, or the deadline.
/// How long a deployment of ours may stay unlisted before a service that
/// points elsewhere counts as ECS having gone back (reads right after an
/// update may lag).
const UNLISTED_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

async fn watch(
    c: &Clients,
    s: &ServiceSettings,
    ours: &str,
    deployment_id: Option<&str>,
    deadline: Instant,
    output: &OutputSink,
    cancel: &CancellationToken,
) -> Watch {
    let started = Instant::now();
    let mut seen = false;
    let mut said = String::new();
    let mut last_error: Option<String>;
    loop {
        // A call may take up to its timeout: a cancel does not wait for it.
        let described = tokio::select! {
            _ = cancel.cancelled() => return Watch::Stopped,
            d = describe_service(c, s) => d,
        };
        match described {
            Ok(svc) => {
                last_error = None;
                let mine = svc.deployments().iter().find(|d| match deployment_id {
                    Some(id) => d.id() == Some(id),
                    None => d.task_definition().is_some_and(|t| same_definition(t, ours)),
                });
                match mine {
                    Some(d) => {
                        seen = true;
                        let state = d.rollout_state();
                        if state == Some(&DeploymentRolloutState::Failed) {
                            let reason = d.rollout_state_reason().unwrap_or("no reason given");
                            return Watch::Failed(format!("ECS deployment FAILED: {reason}{}", events(&svc)));
                        }
                        if state == Some(&DeploymentRolloutState::Completed) && d.status() == Some("PRIMARY") {
                            return Watch::Completed;
                        }
                        let now = format!(
                            "ECS deployment {}: {} of {} tasks running, {} pending, {} failed",
                            state.map(|s| s.as_str()).unwrap_or("(no state)"),
                            d.running_count(),
                            d.desired_count(),
                            d.pending_count(),
                            d.failed_tasks()
                        );
                        if now != said {
                            say(output, now.clone()).await;
                            said = now;
                        }
                    }
                    // Ours was there and is gone, or (after a grace for
                    // lagging reads) the service points elsewhere: ECS (its
                    // circuit breaker) or someone else put another task
                    // definition back.
                    None if seen || (started.elapsed() >= UNLISTED_GRACE && svc.task_definition().is_some_and(|t| !same_definition(t, ours))) => {
                        let now = svc.task_definition().unwrap_or("?");
                        return Watch::Failed(format!("ECS went back to {now} by itself: the deployment of {ours} did not stay{}", events(&svc)));
                    }
                    None => {}
                }
            }
            // A blip is waited out until the deadline; it is named then.
            Err(e) => last_error = Some(e.message),
        }
        let now = Instant::now();
        if now >= deadline {
            let detail = last_error.map(|e| format!(" (last answer: {e})")).unwrap_or_default();
            return Watch::TimedOut(format!("ECS deployment of {ours} not COMPLETED within the health deadline{detail}"));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Watch::Stopped,
            _ = tokio::time::sleep(super::client::POLL.min(deadline - now)) => {}
        }
    }
}

/// The service back on `previous`, unless it is there already (ECS's
/// circuit breaker went back by itself).
async fn revert(c: &Clients, s: &ServiceSettings, previous: &str, output: &OutputSink) -> Result<(), TargetError> {
    let svc = describe_service(c, s).await?;
    if svc.task_definition().is_some_and(|t| same_definition(t, previous)) {
        say(output, format!("ECS service {} is back on {previous}", s.ecs_service)).await;
        return Ok(());
    }
    update_service(c, s, &svc, previous).await?;
    say(output, format!("reverted: ECS service {} deploys {previous} again", s.ecs_service)).await;
    Ok(())
}
