//! From a request ("deploy api 1.4.0 to staging", "run these jobs") to a
//! stored deployment: read and validate the config as it is on disk now,
//! snapshot it as a revision, plan, and store event + deployment + jobs in
//! one transaction. The revision is fixed here: every job of the
//! deployment runs against it, whatever happens to the files afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{self, ConfigErrors, revision};
use crate::plan::{self, PlanError, Selection};
use crate::store::{DeploymentKind, DeploymentState, Hold, JobSpec, NewDeployment, NewEvent, NewJob, Store, StoreError, Submitted};

pub mod gates;
pub mod git;

/// What someone asks for.
#[derive(Debug, Clone)]
pub enum Request {
    /// `digest`: the SHA-256 of the release tarball, for services
    /// deployed from one (required there, refused elsewhere).
    Deploy {
        service: String,
        /// Checked where the request came in (API, hook, CLI).
        version: crate::values::Version,
        environment: Option<String>,
        digest: Option<crate::values::Digest>,
    },
    Run {
        jobs: Vec<String>,
        environment: Option<String>,
    },
    /// Back to the version the service ran before its current one: only
    /// its rollout runs (migrations go forward only).
    Rollback {
        service: String,
        environment: Option<String>,
    },
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
    /// The config has several environments and the request named none: a
    /// usage mistake (the CLI's exit 2, as `plan` without `--env`).
    #[error("{0}")]
    EnvironmentRequired(String),
    /// The request is well-formed but the state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// Something the request needs is down (the Docker Engine).
    #[error("{0}")]
    Unavailable(String),
    /// A container image's tag could not be pinned to a digest (unknown
    /// tag, registry unreachable or refusing). Refused like bad input when
    /// a person asks; but when the registry itself just announced the tag
    /// (a hook), most likely passing, so the hook asks to be retried.
    #[error("{0}")]
    Unpinned(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Versions and event keys travel from payloads into argv and file names:
/// a strict alphabet, checked before anything else.
pub fn valid_version(v: &str) -> bool {
    crate::values::Version::parse(v).is_ok()
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
    pub targets: Option<Arc<crate::targets::Targets>>,
    /// Reports what does not come from the scheduler: a deployment now
    /// waiting for an approval, a rejected config revision.
    pub events: Option<crate::events::EventBus>,
    /// One decision on an environment's config commits at a time on this
    /// node (a push and a poll at once would fetch and check twice).
    pub deciding: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Configs of accepted commits, parsed once: (environment, revision).
    pub parsed: std::sync::Mutex<std::collections::HashMap<(String, String), config::Config>>,
    /// What the drift check has settled on this node (a service record in
    /// step with its revision, or redeployed): it asks no more about them.
    pub redeployed: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per git environment, this node's last failed fetch of its branch,
    /// until a fetch succeeds: shown by `status` and `revisions`, so a
    /// broken URL or credential is not only a line in the server log.
    pub fetch_failures: std::sync::Mutex<std::collections::HashMap<String, git::FetchFailure>>,
}

/// Keys Slipway derives itself (deliveries, commits, promotions): a
/// caller's `id` may not start with these, or it could take a key a future
/// delivery, commit or promotion will need, and stop it.
pub const RESERVED_KEY_PREFIXES: &[&str] = &["github:", "registry:", "published:", "git:", "promote:", "resubmit:"];

/// What a request asked for, as its idempotency key means it: stored with
/// its event (`"request"` in the payload), so the same key again is
/// either this request (answered "already seen") or another one (a
/// conflict naming this one). The environment is the resolved one, jobs
/// are a set, a digest is its 64 hex digits: `deploy web 4.1` and `deploy
/// web 4.1 --env staging` (its only environment) are the same request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Asked {
    /// `deploy`, `run` or `rollback`.
    pub kind: String,
    pub environment: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub jobs: Vec<String>,
}

impl Asked {
    /// "deploy web 4.1 in staging", "run a, b in staging".
    pub fn describe(&self) -> String {
        let pinned = self.digest.as_deref().map(|d| format!(" (sha256:{})", &d[..d.len().min(12)])).unwrap_or_default();
        match self.kind.as_str() {
            "run" => format!("run {} in {}", self.jobs.join(", "), self.environment),
            "rollback" => format!("roll {} back in {}", self.service.as_deref().unwrap_or("?"), self.environment),
            k => format!("{k} {} {}{pinned} in {}", self.service.as_deref().unwrap_or("?"), self.version.as_deref().unwrap_or("?"), self.environment),
        }
    }

    /// The request a stored event was made for: its `"request"`, or, for
    /// an event stored before requests were kept with their key, what its
    /// deployment row says (kind, environment, service, version; `true`:
    /// only those can be compared).
    fn of_stored(payload: &str, deployment: Option<&crate::store::DeploymentRow>) -> Option<(Asked, bool)> {
        if let Some(r) = serde_json::from_str::<serde_json::Value>(payload).ok().and_then(|v| v.get("request").cloned()) {
            return serde_json::from_value(r).ok().map(|a| (a, false));
        }
        let d = deployment?;
        Some((
            Asked {
                kind: d.kind.as_str().to_string(),
                environment: d.environment.clone(),
                service: d.service.clone(),
                version: d.version.clone(),
                digest: None,
                jobs: vec![],
            },
            true,
        ))
    }

    /// Equal, or for an older event's `first` (`legacy`), equal in what
    /// it kept.
    fn same_as(&self, first: &Asked, legacy: bool) -> bool {
        if legacy {
            let kind = if self.kind == "rollback" { "deploy" } else { self.kind.as_str() };
            return kind == first.kind
                && self.environment == first.environment
                && self.service == first.service
                && (self.kind != "deploy" || self.version == first.version);
        }
        self == first
    }
}

/// A key a caller chose (`--id`), as opposed to one Slipway derives
/// from what it is for (a delivery, a commit, a promotion): only a
/// caller's key can be reused for a different request by mistake.
pub fn is_caller_key(key: &str) -> bool {
    !RESERVED_KEY_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// An event key from anything: `prefix:` and a digest, so it is always a
/// valid key (length, alphabet) whatever the parts hold.
pub fn key_of(prefix: &str, parts: &[&str]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    format!("{prefix}:{}", &hex::encode(h.finalize())[..40])
}

/// The config a deployment runs against, and the node's own config (which
/// holds the environment's gates: a commit cannot lift its own approval).
pub struct Source {
    pub disk: config::Config,
    pub config: config::Config,
    pub environment: String,
    /// To store with the deployment (None: already stored).
    pub revision: Option<revision::Revision>,
    pub revision_id: String,
}

/// Where a promotion request comes from: its idempotency key, the kind and
/// payload of its stored event, and who asks.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub key: Option<String>,
    pub event_kind: Option<String>,
    pub payload: String,
    pub actor: Option<String>,
}

/// A promotion: where the version comes from, and its soak.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub from: String,
    pub deployment: i64,
    pub not_before: crate::store::Millis,
}

/// Everything one submission needs; built by the public entry points.
struct Submission {
    selection: Selection,
    environment: Option<String>,
    kind: DeploymentKind,
    service: Option<String>,
    version: Option<String>,
    digest: Option<String>,
    key: Option<String>,
    payload: String,
    /// Run only this job of the plan, without what it needs (a rollback:
    /// the migration of the version returned to already ran). Rollbacks
    /// pass no gate.
    only: Option<String>,
    /// The stored event's kind (default: the deployment kind).
    event_kind: Option<String>,
    source: Option<Source>,
    promotion: Option<Promotion>,
    /// Who asks (a token's actor), kept with a hold: they cannot approve.
    actor: Option<String>,
    /// An approval already given (a waiting deployment submitted again on
    /// a newer revision keeps it).
    approved: Option<(String, crate::store::Millis)>,
    /// See [`NewDeployment::only_after`].
    only_after: Option<i64>,
}

impl Submission {
    fn new(selection: Selection, environment: Option<String>, kind: DeploymentKind, key: Option<String>, payload: String) -> Self {
        Submission {
            selection,
            environment,
            kind,
            service: None,
            version: None,
            digest: None,
            key,
            payload,
            only: None,
            event_kind: None,
            source: None,
            promotion: None,
            actor: None,
            approved: None,
            only_after: None,
        }
    }
}

impl Submitter {
    pub async fn submit(&self, request: Request, key: Option<String>, payload: String) -> Result<Submitted, SubmitError> {
        self.submit_by(request, key, payload, None).await
    }

    /// [`submit`](Self::submit) on behalf of `actor` (who then cannot
    /// approve the deployment if it waits for an approval).
    pub async fn submit_by(&self, request: Request, key: Option<String>, payload: String, actor: Option<String>) -> Result<Submitted, SubmitError> {
        if let Some(k) = &key
            && !valid_key(k)
        {
            return Err(SubmitError::Invalid(format!("invalid event id {k:?}: use at most 128 letters, digits, '.', '_', '-' or ':'")));
        }
        match request {
            Request::Rollback { service, environment } => {
                let env = environment.clone();
                let rows = self.store.services().await?;
                let row = rows.into_iter().find(|r| r.service == service && env.as_ref().is_none_or(|e| *e == r.environment)).ok_or_else(|| {
                    SubmitError::Invalid(format!(
                        "service {service:?} has no recorded version{}: nothing to roll back",
                        env.as_deref().map(|e| format!(" in {e}")).unwrap_or_default()
                    ))
                })?;
                let version = row.previous_version.ok_or_else(|| {
                    SubmitError::Conflict(format!(
                        "service {service:?} in {} has run only {}: there is no earlier version to roll back to",
                        row.environment, row.version
                    ))
                })?;
                let job = config::service::rollout_job(&service);
                let mut sub = Submission::new(Selection::Jobs { jobs: vec![job.clone()] }, Some(row.environment), DeploymentKind::Deploy, key, payload);
                sub.service = Some(service);
                sub.version = Some(version);
                sub.digest = row.previous_sha256;
                sub.only = Some(job);
                // Its event says so: `status` and `why` call it a rollback.
                sub.event_kind = Some(ROLLBACK_EVENT.into());
                self.submit_selection(sub).await
            }
            Request::Deploy { service, version, environment, digest } => {
                check_deploy(&service, version.as_str())?;
                let mut sub = Submission::new(Selection::Service { service: service.clone() }, environment, DeploymentKind::Deploy, key, payload);
                sub.digest = digest.map(String::from);
                sub.service = Some(service);
                sub.version = Some(version.into());
                sub.actor = actor;
                self.submit_selection(sub).await
            }
            Request::Run { jobs, environment } => {
                if jobs.is_empty() {
                    return Err(SubmitError::Invalid("name at least one job to run".into()));
                }
                if let Some(bad) = jobs.iter().find(|j| !config::valid_name(j)) {
                    return Err(SubmitError::Invalid(format!("invalid job name {bad:?}")));
                }
                let mut sub = Submission::new(Selection::Jobs { jobs }, environment, DeploymentKind::Run, key, payload);
                sub.actor = actor;
                self.submit_selection(sub).await
            }
        }
    }

    /// Deploy a service again at the version its record `row` names (a
    /// background redeploy), only if nothing of it is in flight and its
    /// record still names `row`'s deployment; else `busy` and nothing
    /// stored.
    pub(crate) async fn redeploy_if_idle(
        &self,
        row: &crate::store::ServiceRow,
        digest: Option<String>,
        key: String,
        payload: String,
    ) -> Result<Submitted, SubmitError> {
        check_deploy(&row.service, &row.version)?;
        let mut sub =
            Submission::new(Selection::Service { service: row.service.clone() }, Some(row.environment.clone()), DeploymentKind::Deploy, Some(key), payload);
        sub.digest = digest.map(|d| parse_digest(&d)).transpose()?;
        sub.service = Some(row.service.clone());
        sub.version = Some(row.version.clone());
        sub.only_after = Some(row.deployment_id);
        self.submit_selection(sub).await
    }

    /// Deploy `service` to `to` at the version (and digest) it runs in
    /// `from`. When `to` promotes from `from`, the deployment waits out the
    /// soak time from the moment that version succeeded there.
    pub async fn promote(&self, service: &str, from: &str, to: &str, origin: Origin) -> Result<Submitted, SubmitError> {
        let Origin { key, event_kind, payload, actor } = origin;
        for n in [service, from, to] {
            if !config::valid_name(n) {
                return Err(SubmitError::Invalid(format!("invalid name {n:?}")));
            }
        }
        if from == to {
            return Err(SubmitError::Invalid(format!("cannot promote from {from} to itself")));
        }
        let disk = self.config().await?;
        let target = disk
            .config
            .environment(to)
            .ok_or_else(|| SubmitError::Plan(PlanError::UnknownEnvironment { env: to.to_string(), known: disk.config.environment_names().join(", ") }))?;
        if disk.config.environment(from).is_none() {
            return Err(SubmitError::Plan(PlanError::UnknownEnvironment { env: from.to_string(), known: disk.config.environment_names().join(", ") }));
        }
        if let Some(p) = &target.promote_from
            && p != from
        {
            return Err(SubmitError::Invalid(format!("environment {to} promotes from {p}, not from {from}")));
        }
        let row = self
            .store
            .services()
            .await?
            .into_iter()
            .find(|r| r.environment == from && r.service == service)
            .ok_or_else(|| SubmitError::Conflict(format!("service {service:?} has never been deployed to {from}: nothing to promote")))?;
        let source = self.store.deployment(row.deployment_id).await?;
        let finished = source.as_ref().and_then(|d| d.finished_at).unwrap_or(row.updated_at);
        let soak = if target.promote_from.as_deref() == Some(from) { target.soak } else { std::time::Duration::ZERO };
        let mut sub = Submission::new(Selection::Service { service: service.to_string() }, Some(to.to_string()), DeploymentKind::Deploy, key, payload);
        sub.service = Some(service.to_string());
        sub.version = Some(row.version.clone());
        sub.digest = row.sha256.clone();
        sub.event_kind = event_kind;
        sub.actor = actor;
        sub.promotion = Some(Promotion { from: from.to_string(), deployment: row.deployment_id, not_before: finished + soak.as_millis() as i64 });
        self.submit_selection(sub).await
    }

    /// The revision a deployment to `environment` would run against now:
    /// the accepted commit's, or the node's directory hashed.
    async fn current_revision(&self, environment: &str) -> Result<String, SubmitError> {
        let disk = self.config().await?;
        if disk.config.environment(environment).is_some_and(|e| e.git.is_some()) {
            return self
                .accepted_revision(environment)
                .await?
                .map(|r| r.revision)
                .ok_or_else(|| SubmitError::Conflict(format!("environment {environment} has no accepted commit")));
        }
        let (dir, text) = (disk.dir.clone(), disk.text.clone());
        Ok(tokio::task::spawn_blocking(move || revision::snapshot(&dir, &text))
            .await
            .map_err(|e| SubmitError::Invalid(format!("reading the config failed: {e}")))??
            .id)
    }

    /// A waiting deployment about to be released, whose environment's
    /// config has moved on since it was submitted: submitted again on the
    /// current revision (same version, same pinned digest, same promotion,
    /// the approval it got), so it does not roll out an older config.
    /// None when its revision is still current.
    pub async fn resubmit_if_moved(&self, d: &crate::store::DeploymentRow, hold: &Hold) -> Result<Option<Submitted>, SubmitError> {
        let current = self.current_revision(&d.environment).await?;
        if current == d.revision {
            return Ok(None);
        }
        // Cancelled or superseded since it was read: nothing to carry on.
        if self.store.deployment(d.id).await?.map(|now| now.state) != Some(d.state) {
            return Ok(None);
        }
        let payload = serde_json::json!({ "kind": "resubmit", "of": d.id, "revision": current }).to_string();
        // One resubmission of it per revision, whichever node (or path:
        // its release, a commit changing its service) gets there first.
        let key = Some(key_of("resubmit", &[&d.id.to_string(), &current]));
        let mut sub = match (d.kind, &d.service, &d.version) {
            (DeploymentKind::Deploy, Some(service), Some(version)) => {
                let mut sub =
                    Submission::new(Selection::Service { service: service.clone() }, Some(d.environment.clone()), DeploymentKind::Deploy, key, payload);
                sub.service = Some(service.clone());
                sub.version = Some(version.clone());
                sub.digest = hold.digest.clone();
                sub
            }
            _ => {
                let jobs = self.store.jobs(d.id).await?.into_iter().map(|j| j.name).collect();
                Submission::new(Selection::Exactly { jobs }, Some(d.environment.clone()), d.kind, key, payload)
            }
        };
        sub.event_kind = Some(RESUBMIT_EVENT.into());
        sub.actor = hold.requested_by.clone();
        sub.approved = hold.approved_by.clone().map(|by| (by, hold.approved_at.unwrap_or_default()));
        if let (Some(from), Some(dep)) = (&hold.source_environment, hold.source_deployment) {
            sub.promotion = Some(Promotion { from: from.clone(), deployment: dep, not_before: hold.not_before });
        }
        let new = self.submit_selection(sub).await?;
        // Cancelled while we submitted (a person, `slipway cancel`): the
        // copy goes too, or a cancelled deploy would come back.
        if !new.duplicate
            && let Some(old) = self.store.deployment(d.id).await?
            && old.state == DeploymentState::Cancelled
        {
            self.store.cancel(new.deployment_id).await?;
            return Ok(None);
        }
        self.store
            .drop_waiting(
                d.id,
                &format!("the config moved to {} before it started: submitted again as deployment {}", revision::short(&current), new.deployment_id),
                Some(new.deployment_id),
            )
            .await?;
        Ok(Some(new))
    }

    /// Run `jobs` (exactly those) of an accepted git revision.
    pub(crate) async fn submit_revision(
        &self,
        source: Source,
        jobs: Vec<String>,
        key: String,
        event_kind: String,
        payload: String,
    ) -> Result<Submitted, SubmitError> {
        let mut sub = Submission::new(Selection::Exactly { jobs }, Some(source.environment.clone()), DeploymentKind::Run, Some(key), payload);
        sub.event_kind = Some(event_kind);
        sub.source = Some(source);
        self.submit_selection(sub).await
    }

    /// The config and revision a deployment to `requested` runs against:
    /// the directory on disk as it is now, or, for an environment that
    /// takes its config from git, its last accepted commit.
    pub async fn source(&self, requested: Option<String>) -> Result<Source, SubmitError> {
        let disk = self.config().await?;
        let environment = resolve_environment(&disk.config, requested)?;
        if let Some(git) = disk.config.environment(&environment).and_then(|e| e.git.clone()) {
            let Some(accepted) = self.accepted_revision(&environment).await? else {
                return Err(SubmitError::Conflict(format!(
                    "environment {environment} takes its config from git ({} branch {}) and no commit of it is accepted yet: push to the branch{}",
                    git.shown(),
                    git.branch,
                    if git.poll.is_some() { " or wait for the next poll" } else { " (with the webhook set up) or run `slipway revisions check`" }
                )));
            };
            let rev = self
                .store
                .revision(&accepted.revision)
                .await?
                .ok_or_else(|| SubmitError::Invalid(format!("revision {} of environment {environment} is not in the store", accepted.revision)))?;
            let config = parse_for(&environment, &disk.config.environment_names(), &format!("{}@{}", git.shown(), accepted.short()), &rev.config_text)
                .map_err(SubmitError::Config)?;
            return Ok(Source { disk: disk.config, config, environment, revision: None, revision_id: rev.id });
        }
        let dir = disk.dir.clone();
        let text = disk.text.clone();
        let rev = tokio::task::spawn_blocking(move || revision::snapshot(&dir, &text))
            .await
            .map_err(|e| SubmitError::Invalid(format!("reading the config failed: {e}")))??;
        Ok(Source { config: disk.config.clone(), disk: disk.config, environment, revision_id: rev.id.clone(), revision: Some(rev) })
    }

    /// The config deployments to `environment` run against now, without
    /// snapshotting anything: the node's, or the environment's accepted
    /// commit's. What services exist there and how they are triggered is
    /// read from it.
    pub async fn config_for(&self, environment: &str) -> Result<config::Config, SubmitError> {
        let disk = self.config().await?;
        let Some(git) = disk.config.environment(environment).and_then(|e| e.git.clone()) else { return Ok(disk.config) };
        let accepted = self
            .accepted_revision(environment)
            .await?
            .ok_or_else(|| SubmitError::Conflict(format!("environment {environment} has no accepted commit of {} yet", git.shown())))?;
        let cache_key = (environment.to_string(), accepted.revision.clone());
        if let Some(c) = self.parsed.lock().ok().and_then(|m| m.get(&cache_key).cloned()) {
            return Ok(c);
        }
        let rev = self
            .store
            .revision(&accepted.revision)
            .await?
            .ok_or_else(|| SubmitError::Invalid(format!("revision {} of environment {environment} is not in the store", accepted.revision)))?;
        let config = parse_for(environment, &disk.config.environment_names(), &format!("{}@{}", git.shown(), accepted.short()), &rev.config_text)
            .map_err(SubmitError::Config)?;
        if let Ok(mut m) = self.parsed.lock() {
            // A few environments, each at one commit at a time.
            if m.len() >= 64 {
                m.clear();
            }
            m.insert(cache_key, config.clone());
        }
        Ok(config)
    }

    async fn submit_selection(&self, sub: Submission) -> Result<Submitted, SubmitError> {
        if let Some(env) = &sub.environment
            && !config::valid_name(env)
        {
            return Err(SubmitError::Invalid(format!("invalid environment name {env:?}")));
        }
        let source = match sub.source {
            Some(s) => s,
            None => self.source(sub.environment.clone()).await?,
        };
        let environment = source.environment.clone();
        // A caller's key names one request: the same again is answered
        // with what it created, before anything is planned or resolved;
        // another request under it is refused, naming the first.
        let asked = sub.key.as_deref().filter(|k| is_caller_key(k)).map(|_| Asked {
            kind: if sub.only.is_some() { "rollback".into() } else { sub.kind.as_str().to_string() },
            environment: environment.clone(),
            service: sub.service.clone(),
            version: if sub.only.is_some() { None } else { sub.version.clone() },
            digest: sub.digest.clone(),
            jobs: match &sub.selection {
                Selection::Jobs { jobs } | Selection::Exactly { jobs } => {
                    let mut j = jobs.clone();
                    j.sort();
                    j.dedup();
                    j
                }
                _ => vec![],
            },
        });
        if let (Some(asked), Some(key)) = (&asked, &sub.key)
            && let Some(seen) = self.seen_key(key, asked).await?
        {
            return Ok(seen);
        }
        let payload = match &asked {
            Some(a) => with_request(sub.payload, a),
            None => sub.payload,
        };
        // Past durations only feed estimates, but a store that is down
        // must fail the request now, not after every later call times out.
        let history = match self.store.history(&environment).await {
            Ok(h) => h,
            Err(e @ StoreError::Unavailable(_)) => return Err(e.into()),
            Err(_) => Default::default(),
        };
        let parallelism = source.config.project.parallelism.unwrap_or(self.parallelism);
        let plan = plan::build(&source.config, &environment, &sub.selection, parallelism, &history)?;
        if let Some(rev) = &source.revision {
            self.store.put_revision(rev).await?;
        }
        let service = sub.service;
        let lock_key = lock_key(&environment, service.as_deref());
        let only = sub.only;
        let artifact = self.release(&source.config, service.as_deref(), sub.version.as_deref(), sub.digest).await?;
        let jobs = plan
            .jobs
            .iter()
            .filter(|j| only.as_ref().is_none_or(|o| *o == j.name))
            .map(|j| {
                // A service with a `listen` per environment rolls out on
                // this environment's address.
                let mut spec = match &j.job.command {
                    config::Command::Rollout(svc) if !svc.listen_in.is_empty() => {
                        let mut job = j.job.clone();
                        job.command = config::Command::Rollout(Box::new(svc.for_environment(&environment)));
                        JobSpec::from_job(&job)
                    }
                    _ => JobSpec::from_job(&j.job),
                };
                if matches!(j.job.command, config::Command::Fetch(_) | config::Command::Pull(_) | config::Command::Rollout(_))
                    || service.as_deref().is_some_and(|s| j.name == config::service::migrate_job(s) || j.name == config::service::bootstrap_job(s))
                {
                    spec.artifact = artifact.clone();
                }
                NewJob { name: j.name.clone(), needs: if only.is_some() { vec![] } else { j.needs.clone() }, spec }
            })
            .collect();
        // Gates: deploys and runs (not rollbacks) into an environment with
        // an approval or deploy windows, and a promotion's soak.
        let env = source.disk.environment(&environment);
        let now = crate::store::now_ms();
        let hold = match (&only, env) {
            (None, Some(env)) => {
                let promotion = sub.promotion.as_ref();
                let hold = Hold {
                    approval: env.approval,
                    not_before: promotion.map(|p| p.not_before).unwrap_or(0),
                    window: !env.windows.is_empty(),
                    source_environment: promotion.map(|p| p.from.clone()),
                    source_deployment: promotion.map(|p| p.deployment),
                    requested_by: sub.actor.clone(),
                    digest: artifact.as_ref().map(|a| a.sha256.clone()),
                    approved_by: sub.approved.as_ref().map(|a| a.0.clone()),
                    approved_at: sub.approved.as_ref().map(|a| a.1),
                    ..Hold::default()
                };
                // What it waits for is its reason from the start.
                crate::gate::waits(&hold, Some(env), now).map(|w| Hold { waiting_for: Some(format!("waiting for {}", w.join("; "))), ..hold })
            }
            _ => None,
        };
        let waiting_approval = hold.as_ref().is_some_and(|h| h.approval);
        // A copy of a waiting deployment on a newer config supersedes it,
        // but nothing ended that anyone should hear about.
        let resubmission = sub.event_kind.as_deref() == Some(RESUBMIT_EVENT);
        let submitted = self
            .store
            .submit(NewDeployment {
                event: NewEvent { key: sub.key.clone(), kind: sub.event_kind.unwrap_or_else(|| sub.kind.as_str().to_string()), payload },
                kind: sub.kind,
                environment,
                service,
                version: sub.version,
                lock_key,
                revision: source.revision_id,
                jobs,
                hold,
                only_after: sub.only_after,
            })
            .await?;
        // Another request took the key in the meantime: the same check.
        if submitted.duplicate
            && let (Some(asked), Some(key)) = (&asked, &sub.key)
            && let Some(seen) = self.seen_key(key, asked).await?
        {
            return Ok(seen);
        }
        if let Some(w) = &self.wake {
            w.work_changed();
        }
        if let Some(bus) = &self.events {
            if waiting_approval && !submitted.duplicate {
                bus.emit(crate::events::Event::DeploymentWaiting { deployment: submitted.deployment_id }).await;
            }
            // The scheduler never ran these: their end is told here.
            for &old in submitted.superseded.iter().filter(|_| !resubmission) {
                bus.emit(crate::events::Event::DeploymentFinished { deployment: old, state: DeploymentState::Superseded }).await;
            }
        }
        Ok(submitted)
    }
}

impl Submitter {
    /// What a caller's key already stands for: `None` if unused, the
    /// first request's answer (a duplicate) if `asked` is that request,
    /// a conflict naming it if not.
    async fn seen_key(&self, key: &str, asked: &Asked) -> Result<Option<Submitted>, SubmitError> {
        let Some(first) = self.store.event_by_key(key).await? else { return Ok(None) };
        let deployment = match first.deployment_id {
            Some(id) => self.store.deployment(id).await?,
            None => None,
        };
        let dep = first.deployment_id.map(|d| format!("deployment {d}")).unwrap_or_else(|| "no deployment".into());
        match Asked::of_stored(&first.payload, deployment.as_ref()) {
            Some((f, legacy)) if !asked.same_as(&f, legacy) => Err(SubmitError::Conflict(format!(
                "event id {key:?} was already used for {} ({dep}); this request ({}) is a different one: give it its own id",
                f.describe(),
                asked.describe()
            ))),
            _ => Ok(Some(Submitted { event_id: first.id, deployment_id: first.deployment_id.unwrap_or(0), duplicate: true, superseded: vec![], busy: false })),
        }
    }
}

/// The payload with what was asked kept in it (`"request"`); a payload
/// that is not a JSON object is wrapped as `"payload"`.
fn with_request(payload: String, asked: &Asked) -> String {
    let request = serde_json::to_value(asked).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&payload) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("request".into(), request);
            serde_json::Value::Object(m).to_string()
        }
        _ => serde_json::json!({ "payload": payload, "request": request }).to_string(),
    }
}

/// At most one deployment of a service (or of an environment's jobs) runs
/// at a time: this is the key of that lock.
pub(crate) fn lock_key(environment: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{environment}/service/{s}"),
        None => format!("{environment}/jobs"),
    }
}

fn check_deploy(service: &str, version: &str) -> Result<(), SubmitError> {
    if !config::valid_name(service) {
        return Err(SubmitError::Invalid(format!("invalid service name {service:?}")));
    }
    if !valid_version(version) {
        return Err(SubmitError::Invalid(format!(
            "invalid version {version:?}: a version starts with a letter or digit and uses only letters, digits, '.', '_', '-' and '+' (at most 128)"
        )));
    }
    Ok(())
}

fn parse_digest(d: &str) -> Result<String, SubmitError> {
    crate::service::artifact::parse_sha256(d)
        .ok_or_else(|| SubmitError::Invalid(format!("invalid sha256 {d:?}: 64 hexadecimal digits, optionally after \"sha256:\"")))
}

/// Parse a revision's config for `environment`: a repository's config
/// that declares no environments has the node's.
pub fn parse_for(environment: &str, node_environments: &[String], name: &str, text: &str) -> Result<config::Config, ConfigErrors> {
    let config = config::parse_in(name, text, node_environments)?;
    if config.environment(environment).is_none() {
        return Err(ConfigErrors {
            file: name.to_string(),
            source: Arc::new(text.to_string()),
            problems: vec![
                config::Problem::new(
                    config::ProblemKind::UnknownReference,
                    None,
                    format!(
                        "this config declares environments {} but not {environment:?}, which takes its config from it",
                        config.environment_names().join(", ")
                    ),
                )
                .hint(format!("add [[environment]] name = {environment:?}, or declare no environments at all")),
            ],
        });
    }
    Ok(config)
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
    async fn release(
        &self,
        config: &config::Config,
        service: Option<&str>,
        version: Option<&str>,
        digest: Option<String>,
    ) -> Result<Option<crate::store::ArtifactRef>, SubmitError> {
        let Some(service) = service else { return Ok(None) };
        let spec = config.services.iter().find(|s| s.name == service).and_then(|s| s.spec.as_ref());
        if let Some((c, target, spec_settings)) = spec.and_then(|s| s.image.as_ref().map(|i| (i, &s.target, &s.settings))) {
            let reference = format!("{}:{}", c.repository, version.unwrap_or_default());
            let sha256 = match digest {
                Some(d) => d,
                None => {
                    let targets = self.targets.as_ref().ok_or_else(|| SubmitError::Invalid("this node cannot resolve image tags".into()))?;
                    let on = targets.get(target).await.map_err(|e| SubmitError::Unavailable(e.message))?;
                    let auth = c
                        .auth
                        .as_ref()
                        .map(|a| a.credentials())
                        .transpose()
                        .map_err(|e| SubmitError::Invalid(format!("cannot pin {reference} to a digest: {e}")))?;
                    on.resolve(&reference, spec_settings, auth.as_ref())
                        .await
                        .map_err(|e| SubmitError::Unpinned(format!("cannot pin {reference} to a digest: {e}")))?
                        .ok_or_else(|| SubmitError::Unpinned(format!("target {target:?} named no digest for {reference}")))?
                }
            };
            return Ok(Some(crate::store::ArtifactRef { url: reference, sha256, kind: crate::store::ArtifactKind::Image }));
        }
        release(spec, service, version, digest)
    }
}

fn release(
    spec: Option<&config::service::ServiceSpec>,
    service: &str,
    version: Option<&str>,
    digest: Option<String>,
) -> Result<Option<crate::store::ArtifactRef>, SubmitError> {
    let artifact = spec.and_then(|s| s.artifact.as_ref());
    match (artifact, digest) {
        (Some(a), Some(sha256)) => {
            let url = a.url.replace("{version}", version.unwrap_or_default()).replace("{service}", service);
            Ok(Some(crate::store::ArtifactRef { url, sha256, kind: crate::store::ArtifactKind::Tarball }))
        }
        (Some(a), None) => Err(SubmitError::Invalid(format!(
            "service {service:?} is deployed from a release tarball ({}): give its SHA-256 with --sha256 (or `digest` in the event)",
            crate::http::shown_url(&a.url, true)
        ))),
        (None, Some(_)) => Err(SubmitError::Invalid(format!("a SHA-256 was given, but service {service:?} has no `artifact` to check it against"))),
        (None, None) => Ok(None),
    }
}

/// The event kind of a rollback's deployment.
pub const ROLLBACK_EVENT: &str = "rollback";

/// The event kind of a waiting deployment submitted again at a newer
/// revision.
pub const RESUBMIT_EVENT: &str = "resubmit";

/// The environment a request means: the one named, or the only one.
pub fn resolve_environment(config: &config::Config, requested: Option<String>) -> Result<String, SubmitError> {
    let names = config.environment_names();
    match requested {
        Some(e) if names.contains(&e) => Ok(e),
        Some(e) => Err(SubmitError::Plan(PlanError::UnknownEnvironment { env: e, known: names.join(", ") })),
        None if names.len() == 1 => Ok(names[0].clone()),
        None => Err(SubmitError::EnvironmentRequired(format!("this config has several environments ({}); say which with --env", names.join(", ")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue13_a_key_means_its_request_and_an_older_event_is_judged_by_what_it_kept() {
        let asked = |version: &str, digest: Option<&str>| Asked {
            kind: "deploy".into(),
            environment: "staging".into(),
            service: Some("web".into()),
            version: Some(version.into()),
            digest: digest.map(String::from),
            jobs: vec![],
        };
        let stored = with_request(r#"{"kind":"deploy","id":"k"}"#.into(), &asked("4.1", None));
        let (first, legacy) = Asked::of_stored(&stored, None).expect("kept");
        assert!(!legacy && asked("4.1", None).same_as(&first, legacy));
        assert!(!asked("4.2", None).same_as(&first, legacy));
        assert!(!asked("4.1", Some(&"a".repeat(64))).same_as(&first, legacy), "a digest makes it another request");
        assert_eq!(first.describe(), "deploy web 4.1 in staging");
        // Not JSON: kept beside the request.
        assert!(Asked::of_stored(&with_request("x".into(), &asked("4.1", None)), None).is_some_and(|(a, _)| a == asked("4.1", None)));
        // Stored before requests were kept: its deployment row decides.
        let row = crate::store::DeploymentRow {
            id: 12,
            event_id: 3,
            kind: DeploymentKind::Deploy,
            environment: "staging".into(),
            service: Some("web".into()),
            version: Some("4.1".into()),
            revision: "r".into(),
            state: DeploymentState::Succeeded,
            reason: None,
            superseded_by: None,
            cancel_requested: false,
            created_at: 0,
            started_at: None,
            finished_at: None,
        };
        let (old, legacy) = Asked::of_stored(r#"{"kind":"deploy","service":"web","version":"4.1","id":"k"}"#, Some(&row)).expect("from the row");
        assert!(legacy && asked("4.1", None).same_as(&old, legacy) && !asked("4.2", None).same_as(&old, legacy));
        assert!(Asked::of_stored("{}", None).is_none(), "nothing to compare: taken as the same");
        assert!(is_caller_key("release-k") && !is_caller_key("github:abc") && !is_caller_key("published:abc"));
    }
}
