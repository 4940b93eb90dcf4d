//! From a request ("deploy api 1.4.0 to staging", "run these jobs") to a
//! stored deployment: read and validate the config as it is on disk now,
//! snapshot it as a revision, plan, and store event + deployment + jobs in
//! one transaction. The revision is fixed here: every job of the
//! deployment runs against it, whatever happens to the files afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{self, ConfigErrors, revision};
use crate::plan::{self, PlanError, Selection};
use crate::store::{DeploymentKind, JobSpec, NewDeployment, NewEvent, NewJob, Store, StoreError, Submitted};

/// What someone asks for.
#[derive(Debug, Clone)]
pub enum Request {
    /// `digest`: the SHA-256 of the release tarball, for services
    /// deployed from one (required there, refused elsewhere).
    Deploy { service: String, version: String, environment: Option<String>, digest: Option<String> },
    Run { jobs: Vec<String>, environment: Option<String> },
    /// Back to the version the service ran before its current one: only
    /// its rollout runs (migrations go forward only).
    Rollback { service: String, environment: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the config on disk is invalid:\n{0}")]
    Config(ConfigErrors),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Revision(#[from] revision::RevisionError),
    #[error("{0}")]
    Invalid(String),
    /// The request is well-formed but the state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// Something the request needs is down (the Docker Engine).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Versions and event keys travel from payloads into argv and file names:
/// a strict alphabet, checked before anything else.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

pub fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 128 && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
}

pub struct Submitter {
    pub config_path: PathBuf,
    pub store: Arc<dyn Store>,
    pub parallelism: usize,
    pub wake: Option<crate::scheduler::SchedulerHandle>,
    /// Resolves a container service's `image:version` to a digest when
    /// the deploy is accepted (None: such deploys are refused).
    pub targets: Option<Arc<dyn crate::target::Targets>>,
}

impl Submitter {
    pub async fn submit(&self, request: Request, key: Option<String>, payload: String) -> Result<Submitted, SubmitError> {
        if let Some(k) = &key
            && !valid_key(k) {
                return Err(SubmitError::Invalid(format!(
                    "invalid event id {k:?}: use at most 128 letters, digits, '.', '_', '-' or ':'"
                )));
            }
        let request = match request {
            Request::Rollback { service, environment } => {
                let env = environment.clone();
                let rows = self.store.services().await?;
                let row = rows
                    .into_iter()
                    .find(|r| r.service == service && env.as_ref().is_none_or(|e| *e == r.environment))
                    .ok_or_else(|| SubmitError::Invalid(format!("service {service:?} has no recorded version{}: nothing to roll back", env.as_deref().map(|e| format!(" in {e}")).unwrap_or_default())))?;
                let version = row.previous_version.ok_or_else(|| {
                    SubmitError::Conflict(format!("service {service:?} in {} has run only {}: there is no earlier version to roll back to", row.environment, row.version))
                })?;
                return self.submit_rollback(service, version, row.environment, row.previous_sha256, key, payload).await;
            }
            r => r,
        };
        let mut digest = None;
        let (selection, environment, kind, service, version) = match &request {
            Request::Deploy { service, version, environment, digest: d } => {
                if let Some(d) = d {
                    digest = Some(crate::service::artifact::parse_sha256(d).ok_or_else(|| {
                        SubmitError::Invalid(format!("invalid sha256 {d:?}: 64 hexadecimal digits, optionally after \"sha256:\""))
                    })?);
                }
                if !config::valid_name(service) {
                    return Err(SubmitError::Invalid(format!("invalid service name {service:?}")));
                }
                if !valid_version(version) {
                    return Err(SubmitError::Invalid(format!(
                        "invalid version {version:?}: a version starts with a letter or digit and uses only letters, digits, '.', '_', '-' and '+' (at most 128)"
                    )));
                }
                (Selection::Service { service: service.clone() }, environment.clone(), DeploymentKind::Deploy, Some(service.clone()), Some(version.clone()))
            }
            Request::Run { jobs, environment } => {
                if jobs.is_empty() {
                    return Err(SubmitError::Invalid("name at least one job to run".into()));
                }
                if let Some(bad) = jobs.iter().find(|j| !config::valid_name(j)) {
                    return Err(SubmitError::Invalid(format!("invalid job name {bad:?}")));
                }
                (Selection::Jobs { jobs: jobs.clone() }, environment.clone(), DeploymentKind::Run, None, None)
            }
            Request::Rollback { .. } => unreachable!("handled above"),
        };
        self.submit_selection(selection, environment, kind, service, version, digest, key, payload, None).await
    }

    async fn submit_rollback(
        &self,
        service: String,
        version: String,
        environment: String,
        digest: Option<String>,
        key: Option<String>,
        payload: String,
    ) -> Result<Submitted, SubmitError> {
        let job = config::service::rollout_job(&service);
        let selection = Selection::Jobs { jobs: vec![job.clone()] };
        self.submit_selection(selection, Some(environment), DeploymentKind::Deploy, Some(service), Some(version), digest, key, payload, Some(job)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn submit_selection(
        &self,
        selection: Selection,
        environment: Option<String>,
        kind: DeploymentKind,
        service: Option<String>,
        version: Option<String>,
        digest: Option<String>,
        key: Option<String>,
        payload: String,
        // Run only this job of the plan, without what it needs (a
        // rollback: the migration of the version returned to already ran).
        only: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        if let Some(env) = &environment
            && !config::valid_name(env) {
                return Err(SubmitError::Invalid(format!("invalid environment name {env:?}")));
            }
        // Reading and hashing the directory is blocking work.
        let path = self.config_path.clone();
        let (loaded, rev) = tokio::task::spawn_blocking(move || -> Result<_, SubmitError> {
            let loaded = config::load(&path).map_err(SubmitError::Config)?;
            let rev = revision::snapshot(&loaded.dir, &loaded.text)?;
            Ok((loaded, rev))
        })
        .await
        .map_err(|e| SubmitError::Invalid(format!("reading the config failed: {e}")))??;
        let environment = resolve_environment(&loaded.config, environment)?;
        // Past durations only feed estimates, but a store that is down
        // must fail the request now, not after every later call times out.
        let history = match self.store.history(&environment).await {
            Ok(h) => h,
            Err(e @ StoreError::Unavailable(_)) => return Err(e.into()),
            Err(_) => Default::default(),
        };
        let parallelism = loaded.config.project.parallelism.unwrap_or(self.parallelism);
        let plan = plan::build(&loaded.config, &environment, &selection, parallelism, &history)?;
        self.store.put_revision(&rev).await?;
        let lock_key = match &service {
            Some(s) => format!("{environment}/service/{s}"),
            None => format!("{environment}/jobs"),
        };
        let artifact = self.release(&loaded.config, service.as_deref(), version.as_deref(), digest).await?;
        let jobs = plan
            .jobs
            .iter()
            .filter(|j| only.as_ref().is_none_or(|o| *o == j.name))
            .map(|j| {
                let mut spec = JobSpec::from_job(&j.job);
                if matches!(j.job.command, config::Command::Fetch(_) | config::Command::Pull(_) | config::Command::Rollout(_)) || service.as_deref().is_some_and(|s| j.name == config::service::migrate_job(s)) {
                    spec.artifact = artifact.clone();
                }
                NewJob { name: j.name.clone(), needs: if only.is_some() { vec![] } else { j.needs.clone() }, spec }
            })
            .collect();
        let submitted = self
            .store
            .submit(NewDeployment {
                event: NewEvent { key, kind: kind.as_str().to_string(), payload },
                kind,
                environment,
                service,
                version,
                lock_key,
                revision: rev.id,
                jobs,
            })
            .await?;
        if let Some(w) = &self.wake {
            w.work_changed();
        }
        Ok(submitted)
    }
}

impl Submitter {
    /// The config on disk, as the next deployment would read it.
    pub async fn config(&self) -> Result<config::LoadedConfig, SubmitError> {
        let path = self.config_path.clone();
        tokio::task::spawn_blocking(move || config::load(&path).map_err(SubmitError::Config))
            .await
            .map_err(|e| SubmitError::Invalid(format!("reading the config failed: {e}")))?
    }

    /// What a deploy runs, pinned: a tarball service's URL (version filled
    /// in) with the request's checksum; a container service's
    /// `image:version` with the digest it names now, asked of the
    /// registry through the engine (or the request's digest). A tarball
    /// service without a checksum, or a checksum for a service with
    /// neither, is refused before anything is stored.
    async fn release(&self, config: &config::Config, service: Option<&str>, version: Option<&str>, digest: Option<String>) -> Result<Option<crate::store::ArtifactRef>, SubmitError> {
        let Some(service) = service else { return Ok(None) };
        let spec = config.services.iter().find(|s| s.name == service).and_then(|s| s.spec.as_ref());
        if let Some(c) = spec.and_then(|s| s.container.as_ref()) {
            let reference = format!("{}:{}", c.image, version.unwrap_or_default());
            let sha256 = match digest {
                Some(d) => d,
                None => {
                    let targets = self.targets.as_ref().ok_or_else(|| SubmitError::Invalid("this node cannot resolve image tags".into()))?;
                    let docker = targets.get("docker").await.map_err(SubmitError::Unavailable)?;
                    let auth = c.auth.as_ref().map(|a| a.credentials()).transpose().map_err(|e| SubmitError::Invalid(format!("cannot pin {reference} to a digest: {e}")))?;
                    docker
                        .resolve(&reference, auth.as_ref())
                        .await
                        .map_err(|e| SubmitError::Invalid(format!("cannot pin {reference} to a digest: {e}")))?
                        .ok_or_else(|| SubmitError::Invalid(format!("the docker target named no digest for {reference}")))?
                }
            };
            return Ok(Some(crate::store::ArtifactRef { url: reference, sha256, kind: crate::store::ArtifactKind::Image }));
        }
        release(spec, service, version, digest)
    }
}

fn release(spec: Option<&config::service::ServiceSpec>, service: &str, version: Option<&str>, digest: Option<String>) -> Result<Option<crate::store::ArtifactRef>, SubmitError> {
    let artifact = spec.and_then(|s| s.artifact.as_ref());
    match (artifact, digest) {
        (Some(a), Some(sha256)) => {
            let url = a.url.replace("{version}", version.unwrap_or_default()).replace("{service}", service);
            Ok(Some(crate::store::ArtifactRef { url, sha256, kind: crate::store::ArtifactKind::Tarball }))
        }
        (Some(a), None) => Err(SubmitError::Invalid(format!(
            "service {service:?} is deployed from a release tarball ({}): give its SHA-256 with --sha256 (or `digest` in the event)",
            a.url
        ))),
        (None, Some(_)) => Err(SubmitError::Invalid(format!("a SHA-256 was given, but service {service:?} has no `artifact` to check it against"))),
        (None, None) => Ok(None),
    }
}

/// The environment a request means: the one named, or the only one.
pub fn resolve_environment(config: &config::Config, requested: Option<String>) -> Result<String, SubmitError> {
    let names = config.environment_names();
    match requested {
        Some(e) if names.contains(&e) => Ok(e),
        Some(e) => Err(SubmitError::Plan(PlanError::UnknownEnvironment { env: e, known: names.join(", ") })),
        None if names.len() == 1 => Ok(names[0].clone()),
        None => Err(SubmitError::Invalid(format!("this config has several environments ({}); say which with --env", names.join(", ")))),
    }
}
