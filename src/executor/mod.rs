//! The executor: between the scheduler and the targets. The scheduler
//! hands it a claimed job; it routes the job by its command and the
//! target its spec names: a command runs on that target (a process here,
//! a one-off container of the pinned image), a pull makes the pinned
//! image available there, a rollout goes to the service manager, a
//! tarball fetch to the node's artifact cache. Sweeps of what dead
//! Slipway processes left, and the wait for an earlier attempt to end,
//! go to the job's target the same way.
//!
//! **Architecture Invariant:** the executor names no concrete target:
//! it asks [`Targets`] by the name in the spec (`tests/seam.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Command;
use crate::service::{RolloutRequest, ServiceManager};
use crate::store::{ArtifactKind, JobSpec, Outcome};
use crate::targets::{JobRequest, OutputSink, RunResult, Target, Targets};

/// What a job runs for, beyond its request: where it belongs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub environment: String,
    pub revision: String,
    /// The deployment's version (rollouts need one).
    pub version: Option<String>,
}

#[derive(Clone)]
pub struct Executor {
    targets: Arc<Targets>,
    /// Runs `<service>.rollout` jobs; a node without one fails them.
    services: Option<Arc<ServiceManager>>,
}

impl Executor {
    pub fn new(targets: Arc<Targets>) -> Self {
        Executor { targets, services: None }
    }

    /// Every job on `target`, whatever its spec names (in-process tests
    /// and benchmarks with one target).
    pub fn single(target: Arc<dyn Target>) -> Self {
        Executor::new(Arc::new(Targets::only(crate::targets::DEFAULT, target)))
    }

    pub fn with_services(mut self, services: Arc<ServiceManager>) -> Self {
        self.services = Some(services);
        self
    }

    pub fn targets(&self) -> &Arc<Targets> {
        &self.targets
    }

    /// The target a job runs on.
    async fn target_of(&self, spec: &JobSpec) -> Result<Arc<dyn Target>, String> {
        self.targets.get(spec.target.as_deref().unwrap_or(crate::targets::DEFAULT)).await.map_err(|e| e.message)
    }

    /// Build the node's targets that can be built now (at the scheduler's
    /// start, so that its first sweep covers them).
    pub async fn start(&self) {
        self.targets.start().await
    }

    /// Ended what jobs of dead Slipway processes of this installation left
    /// running on this node's targets (see [`Targets::sweep_jobs`]).
    pub async fn sweep_jobs(&self) -> usize {
        self.targets.sweep_jobs().await
    }

    /// Before attempt `attempt` (> 1) of a job: end what earlier attempts
    /// left on its target (see [`Target::end_earlier_attempts`]).
    pub async fn end_earlier_attempts(
        &self,
        spec: &JobSpec,
        deployment_id: i64,
        job: &str,
        attempt: i64,
        within: Duration,
        cancel: &CancellationToken,
    ) -> Result<usize, RunResult> {
        match self.target_of(spec).await {
            Ok(t) => t.end_earlier_attempts(deployment_id, job, attempt, within, cancel).await,
            // Unreachable now: the attempt itself will say so.
            Err(_) => Ok(0),
        }
    }

    /// Where a job runs: a service's unpacked release (fetched by the job
    /// before it), else the revision.
    pub fn workdir(spec: &JobSpec, revision_dir: PathBuf, artifacts: &Path) -> PathBuf {
        match (&spec.command, spec.artifact.as_ref().filter(|a| a.kind == ArtifactKind::Tarball)) {
            (Command::Fetch(_), _) | (_, None) => revision_dir,
            (_, Some(a)) => crate::service::artifact::dir_for(artifacts, &a.sha256),
        }
    }

    /// Run one attempt to its end. Returns within the spec's timeout plus
    /// its kill grace, and promptly once `cancel` fires.
    pub async fn run(&self, ctx: JobContext, req: JobRequest, artifacts: &Path, out: OutputSink, cancel: CancellationToken) -> RunResult {
        match &req.spec.command {
            // A rollout is the service manager's, in this process: its
            // timeout is applied here (no process to kill).
            Command::Rollout(spec) => {
                let (Some(services), Some(version)) = (self.services.clone(), ctx.version.clone()) else {
                    return RunResult::failed("a rollout needs a node with a service manager and a version: use `slipway deploy SERVICE VERSION`");
                };
                let rollout = RolloutRequest {
                    sha256: req.spec.artifact.as_ref().map(|a| a.sha256.clone()),
                    environment: ctx.environment.clone(),
                    deployment_id: req.deployment_id,
                    revision: ctx.revision.clone(),
                    version,
                    spec: (**spec).clone(),
                    workdir: req.workdir.clone(),
                };
                let timeout = Duration::from_millis(req.spec.timeout_ms.max(1));
                let stop = cancel.child_token();
                let work = services.rollout(rollout, out, stop.clone());
                tokio::pin!(work);
                tokio::select! {
                    r = &mut work => r,
                    _ = tokio::time::sleep(timeout) => {
                        // Ask it to stop (it rolls back), and wait for that.
                        stop.cancel();
                        let mut r = work.await;
                        r.reason = Some(format!("timed out after {}: {}", humantime::format_duration(timeout), r.reason.unwrap_or_default()));
                        if r.outcome == Outcome::Succeeded { r.outcome = Outcome::TimedOut; }
                        r
                    }
                }
            }
            Command::Pull(image) => {
                let Some(pinned) = req.spec.artifact.as_ref() else { return RunResult::failed("no pinned image digest") };
                let reference = format!("{}@sha256:{}", image.repository, pinned.sha256);
                let auth = match image.auth.as_ref().map(|a| a.credentials()).transpose() {
                    Ok(a) => a,
                    Err(e) => return RunResult::failed(e),
                };
                let result = match self.target_of(&req.spec).await {
                    Ok(t) => t.prepare(&reference, auth.as_ref(), &out, &cancel).await.map_err(|e| e.message),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() },
                    Err(e) if cancel.is_cancelled() => RunResult { outcome: Outcome::Cancelled, exit_code: None, reason: Some(e), parts: Vec::new() },
                    Err(e) => RunResult::failed(e),
                }
            }
            Command::Fetch(spec) => {
                let Some(a) = req.spec.artifact.as_ref() else {
                    return RunResult::failed("no release checksum: deploy with `--sha256` (or `digest` in the event)");
                };
                match crate::service::artifact::fetch(spec, &a.url, &a.sha256, artifacts, &out, &cancel).await {
                    Ok(_) => RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() },
                    Err(e) if cancel.is_cancelled() => RunResult { outcome: Outcome::Cancelled, exit_code: None, reason: Some(e), parts: Vec::new() },
                    Err(e) => RunResult::failed(e),
                }
            }
            Command::Unreadable(why) => RunResult::failed(why.clone()),
            // A command: on the job's target (a process here, a one-off
            // container of the pinned image, ...).
            Command::Argv(_) | Command::Shell(_) => match self.target_of(&req.spec).await {
                Ok(t) => t.run(req, out, cancel).await,
                Err(e) => RunResult::failed(e),
            },
        }
    }
}
