//! A service's `migrate` on ECS: a one-off task (`RunTask`) of the task
//! definition the rollout will deploy, its container's command overridden,
//! started where the service runs (its launch type or capacity providers,
//! its network configuration), gated on the task reaching STOPPED with
//! exit code 0. Exactly once per deployment: the task carries
//! `startedBy` and tags naming the installation, deployment, job and
//! attempt, and an attempt first looks for a task of an earlier one (a
//! node killed while it ran): one still running is followed, one that
//! succeeded (or that an interrupted attempt left, whatever its end) is
//! the result, and only one whose failure was recorded is run again.

use std::time::{Duration, Instant};

use aws_sdk_ecs::types::{ContainerOverride, DesiredStatus, KeyValuePair, NetworkConfiguration, Tag, Task, TaskField, TaskOverride};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::client::{Clients, EcsTarget, aws_error};
use super::config::ServiceSettings;
use super::rollout::{describe_service, say, tag, task_definition_for};
use crate::store::Outcome;
use crate::targets::{JobRequest, OutputSink, RunResult, TargetError};

const TAG_JOB: &str = "slipway:job";
const TAG_ATTEMPT: &str = "slipway:attempt";

/// `startedBy` of the tasks of one job of one deployment: ECS takes at
/// most 36 letters, digits, `-`, `/` and `_`, so a hash of installation,
/// deployment and job (the tags say them in words).
fn started_by(installation: &str, deployment_id: i64, job: &str) -> String {
    let h = sha2::Sha256::digest(format!("{installation}\n{deployment_id}\n{job}").as_bytes());
    format!("sw-{}", hex::encode(&h[..16]))
}

/// The attempt that started a task (one without the tag: the first).
fn attempt_of(task: &Task) -> i64 {
    tag(task.tags(), TAG_ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(1)
}

pub(super) async fn run(target: &EcsTarget, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
    let timeout = Duration::from_millis(req.spec.timeout_ms);
    match one_off(target, &req, &output, &cancel, timeout).await {
        Ok(r) => r,
        Err(e) => RunResult::failed(e.message),
    }
}

async fn one_off(target: &EcsTarget, req: &JobRequest, output: &OutputSink, cancel: &CancellationToken, timeout: Duration) -> Result<RunResult, TargetError> {
    let s = EcsTarget::settings(&req.spec.settings)?;
    let crate::config::Command::Argv(argv) = &req.spec.command else {
        return Err(TargetError::from("a one-off task on ECS takes an argv command"));
    };
    let argv: Vec<String> = argv.iter().map(|a| crate::process::substitute(a, &req.values)).collect();
    let image = req.spec.artifact.as_ref().map(|a| a.pinned_image()).ok_or_else(|| TargetError::from("no pinned image for this job"))?;
    let c = target.clients(&s.aws).await;
    let by = started_by(&target.installation, req.deployment_id, &req.job);
    let deadline = Instant::now() + timeout;

    let svc = describe_service(&c, &s).await?;
    let current = svc.task_definition().unwrap_or_default().to_string();
    let family = family_of(&current);
    let task_arn = match earlier(&c, &s, &family, &by, req.attempt).await? {
        Some(t) if t.last_status() != Some("STOPPED") => {
            let arn = t.task_arn().unwrap_or_default().to_string();
            say(output, format!("task {arn} of attempt {} still runs: following it (a one-off task is never started twice)", attempt_of(&t))).await;
            arn
        }
        Some(t) if exit_code(&t, &s.container) == Some(0) => {
            let arn = t.task_arn().unwrap_or_default();
            say(output, format!("task {arn} of attempt {} already ran to exit code 0: not run again", attempt_of(&t))).await;
            return Ok(ended(&t, &s.container));
        }
        // The interrupted attempt's own task ended while no node watched:
        // its result is this attempt's (the job's retry policy decides on
        // it), not a second run.
        Some(t) if req.resuming && attempt_of(&t) == req.attempt - 1 => {
            let arn = t.task_arn().unwrap_or_default();
            say(output, format!("task {arn} of the interrupted attempt {} ended while no node watched it: its result stands", req.attempt - 1)).await;
            return Ok(ended(&t, &s.container));
        }
        _ => {
            let (td, registered) = task_definition_for(target, &c, &s, &current, &image, req.deployment_id).await?;
            say(output, format!("task definition {} {td} ({image})", if registered { "registered:" } else { "of" })).await;
            match start(&c, &s, &svc, &td, &by, req, &argv).await {
                Ok(arn) => arn,
                // The call may have started it before failing (a timeout):
                // one found under this attempt is followed, never doubled.
                Err(e) => match earlier(&c, &s, &family, &by, req.attempt + 1).await {
                    Ok(Some(t)) if attempt_of(&t) == req.attempt => t.task_arn().unwrap_or_default().to_string(),
                    _ => return Err(e),
                },
            }
        }
    };
    say(output, format!("one-off task {task_arn}: {}", argv.join(" "))).await;
    let mut said = String::new();
    let mut last_error: Option<String>;
    loop {
        // A failed look is waited out until the deadline (the task goes
        // on either way); it is named then.
        let described = tokio::select! {
            _ = cancel.cancelled() => None,
            d = describe(&c, &s, &task_arn) => Some(d),
        };
        let Some(described) = described else {
            return Ok(cancelled(&c, &s, req, output, &task_arn).await);
        };
        match described {
            Ok(Some(t)) => {
                last_error = None;
                let status = t.last_status().unwrap_or("?").to_string();
                if status != said {
                    say(output, format!("task {status}")).await;
                    said = status;
                }
                if t.last_status() == Some("STOPPED") {
                    return Ok(ended(&t, &s.container));
                }
            }
            Ok(None) => last_error = Some(format!("ECS does not know task {task_arn}")),
            Err(e) => last_error = Some(e.message),
        }
        if Instant::now() >= deadline {
            let why = stop(&c, &s, &task_arn, "timed out").await;
            let detail = last_error.map(|e| format!(" (last answer: {e})")).unwrap_or_default();
            return Ok(RunResult {
                outcome: Outcome::TimedOut,
                exit_code: None,
                reason: Some(format!("{why} after {}{detail}", humantime::format_duration(timeout))),
                parts: Vec::new(),
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(cancelled(&c, &s, req, output, &task_arn).await),
            _ = tokio::time::sleep(super::client::POLL.min(deadline.saturating_duration_since(Instant::now()))) => {}
        }
    }
}

/// `StopTask`, and what to say of it.
async fn stop(c: &Clients, s: &ServiceSettings, task_arn: &str, why: &str) -> String {
    match c.ecs.stop_task().cluster(&s.cluster).task(task_arn).reason(format!("slipway: {why}")).send().await {
        Ok(_) => format!("task stopped: {why}"),
        Err(e) => format!("{why}, and stopping the task failed (it may still run): {}", aws_error("StopTask", e).message),
    }
}

/// The attempt's cancel fired: a job handed over (this node stops, or
/// another took it) leaves the task running for the next attempt to
/// follow; a cancelled one stops it.
async fn cancelled(c: &Clients, s: &ServiceSettings, req: &JobRequest, output: &OutputSink, task_arn: &str) -> RunResult {
    if req.stopping.handed_over() {
        say(output, format!("task {task_arn} left running: the next attempt follows it")).await;
        return RunResult { outcome: Outcome::Cancelled, exit_code: None, reason: Some(format!("handed over; task {task_arn} still runs")), parts: Vec::new() };
    }
    let why = stop(c, s, task_arn, "cancelled").await;
    RunResult { outcome: Outcome::Cancelled, exit_code: None, reason: Some(why), parts: Vec::new() }
}

/// `family` of `arn:…:task-definition/family:revision` (or `family:revision`).
fn family_of(task_definition: &str) -> String {
    let name = task_definition.rsplit_once('/').map(|(_, n)| n).unwrap_or(task_definition);
    name.rsplit_once(':').map(|(f, _)| f).unwrap_or(name).to_string()
}

/// Most tasks of a family listed when looking for an earlier attempt's.
const LIST_PAGES: usize = 10;

/// The task an earlier attempt (below `attempt`) of this job started, if
/// ECS still knows it: a running one first (never two at once), else the
/// newest attempt's stopped one (ECS keeps those about an hour). ECS
/// allows `startedBy` only as ListTasks' sole filter: running tasks are
/// listed by it, stopped ones by family, and filtered here.
async fn earlier(c: &Clients, s: &ServiceSettings, family: &str, by: &str, attempt: i64) -> Result<Option<Task>, TargetError> {
    let mut arns: Vec<String> = Vec::new();
    let running = c.ecs.list_tasks().cluster(&s.cluster).started_by(by).send().await.map_err(|e| aws_error("listing this job's running tasks", e))?;
    arns.extend(running.task_arns().iter().cloned());
    let mut token: Option<String> = None;
    for _ in 0..LIST_PAGES {
        let out = c
            .ecs
            .list_tasks()
            .cluster(&s.cluster)
            .family(family)
            .desired_status(DesiredStatus::Stopped)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| aws_error("listing the family's stopped tasks", e))?;
        arns.extend(out.task_arns().iter().filter(|a| !arns.contains(a)).cloned().collect::<Vec<_>>());
        match out.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    let mut tasks: Vec<(i64, Task)> = Vec::new();
    // DescribeTasks takes at most 100 tasks a call.
    for chunk in arns.chunks(100) {
        let out = c
            .ecs
            .describe_tasks()
            .cluster(&s.cluster)
            .set_tasks(Some(chunk.to_vec()))
            .include(TaskField::Tags)
            .send()
            .await
            .map_err(|e| aws_error("describing this job's tasks", e))?;
        // `startedBy` names the deployment and job; a task without an
        // attempt tag counts as the first attempt's.
        tasks.extend(
            out.tasks()
                .iter()
                .filter(|t| t.started_by() == Some(by))
                .map(|t| (attempt_of(t), t.clone()))
                .filter(|(a, _)| *a < attempt),
        );
    }
    tasks.sort_by_key(|(a, t)| (t.last_status() != Some("STOPPED"), *a));
    Ok(tasks.pop().map(|(_, t)| t))
}

async fn start(c: &Clients, s: &ServiceSettings, svc: &aws_sdk_ecs::types::Service, td: &str, by: &str, req: &JobRequest, argv: &[String]) -> Result<String, TargetError> {
    let mut env: Vec<KeyValuePair> = req.spec.env.iter().map(|(k, v)| KeyValuePair::builder().name(k).value(v).build()).collect();
    for (k, v) in &req.values {
        env.push(KeyValuePair::builder().name(format!("SLIPWAY_{}", k.to_ascii_uppercase())).value(v).build());
    }
    env.push(KeyValuePair::builder().name("SLIPWAY_JOB").value(&req.job).build());
    let overrides = TaskOverride::builder()
        .container_overrides(ContainerOverride::builder().name(&s.container).set_command(Some(argv.to_vec())).set_environment(Some(env)).build())
        .build();
    let tags = [(TAG_JOB, req.job.clone()), (TAG_ATTEMPT, req.attempt.to_string()), (super::rollout::TAG_DEPLOYMENT, req.deployment_id.to_string())]
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    // Where the service's own tasks run.
    let network: Option<NetworkConfiguration> = svc.network_configuration().cloned();
    // The same request twice (a retried call) starts one task.
    let token = hex::encode(&sha2::Sha256::digest(format!("{by}/{}", req.attempt).as_bytes())[..24]);
    let out = c
        .ecs
        .run_task()
        .cluster(&s.cluster)
        .task_definition(td)
        .count(1)
        .started_by(by)
        .set_launch_type(if svc.capacity_provider_strategy().is_empty() { svc.launch_type().cloned() } else { None })
        .set_capacity_provider_strategy((!svc.capacity_provider_strategy().is_empty()).then(|| svc.capacity_provider_strategy().to_vec()))
        .set_platform_version(svc.platform_version().map(str::to_string))
        .set_network_configuration(network)
        .overrides(overrides)
        .set_tags(Some(tags))
        .client_token(token)
        .send()
        .await
        .map_err(|e| aws_error(&format!("running a one-off task of {td}"), e))?;
    if let Some(f) = out.failures().first() {
        return Err(TargetError::from(format!("ECS did not start the task: {} {}", f.reason().unwrap_or("?"), f.detail().unwrap_or(""))));
    }
    out.tasks().first().and_then(|t| t.task_arn()).map(str::to_string).ok_or_else(|| TargetError::from("ECS started no task"))
}

async fn describe(c: &Clients, s: &ServiceSettings, arn: &str) -> Result<Option<Task>, TargetError> {
    let out = c
        .ecs
        .describe_tasks()
        .cluster(&s.cluster)
        .tasks(arn)
        .include(TaskField::Tags)
        .send()
        .await
        .map_err(|e| aws_error(&format!("describing task {arn}"), e))?;
    Ok(out.tasks().first().cloned())
}

fn exit_code(t: &Task, container: &str) -> Option<i32> {
    t.containers().iter().find(|c| c.name() == Some(container)).and_then(|c| c.exit_code())
}

/// How a stopped task ended: its container's exit code, ECS's reasons.
fn ended(t: &Task, container: &str) -> RunResult {
    let code = exit_code(t, container);
    let stopped = t.stopped_reason().unwrap_or("no reason given");
    let detail = t.containers().iter().find(|c| c.name() == Some(container)).and_then(|c| c.reason()).map(|r| format!(", {r}")).unwrap_or_default();
    match code {
        Some(0) => RunResult { outcome: Outcome::Succeeded, exit_code: Some(0), reason: None, parts: Vec::new() },
        Some(n) => RunResult { outcome: Outcome::Failed, exit_code: Some(n), reason: Some(format!("exit code {n} (ECS: {stopped}{detail})")), parts: Vec::new() },
        None => RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(format!("the task stopped without an exit code (ECS: {stopped}{detail})")), parts: Vec::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_definitions_family() {
        assert_eq!(family_of("arn:aws:ecs:eu-west-1:123456789012:task-definition/api:7"), "api");
        assert_eq!(family_of("api-web:12"), "api-web");
        assert_eq!(family_of("api"), "api");
    }

    #[test]
    fn started_by_fits_ecs_and_names_the_job() {
        for s in [started_by("inst", 42, "api.migrate"), started_by("inst", 42, &"x".repeat(200))] {
            assert!(s.len() <= 36 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-/_".contains(c)), "{s}");
        }
        assert_ne!(started_by("a", 1, "j"), started_by("b", 1, "j"));
        assert_ne!(started_by("a", 1, "j"), started_by("a", 2, "j"));
        assert_ne!(started_by("a", 1, "j"), started_by("a", 1, "k"));
    }
}
