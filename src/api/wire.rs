//! The JSON the API speaks, shared by the server and the CLI client.
//! Times are Unix milliseconds; durations are milliseconds.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::{self, DeploymentKind, DeploymentState, JobState, Outcome};

/// An event that asks for a deployment. (The OpenAPI document describes
/// it by [`EventRequestSchema`], one shape per kind.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// `deploy` (a service at a version) or `run` (named jobs).
    pub kind: EventKind,
    /// For `deploy`: the service.
    #[serde(default)]
    pub service: Option<String>,
    /// For `deploy`: the version (letters, digits, `.`, `_`, `-`, `+`).
    #[serde(default)]
    pub version: Option<String>,
    /// For `deploy` of a service with an `artifact`: the release tarball's
    /// SHA-256 (64 hex digits, optionally after `sha256:`).
    #[serde(default)]
    pub digest: Option<String>,
    /// For `run`: the jobs (their `needs` run too).
    #[serde(default)]
    pub jobs: Vec<String>,
    /// For `published`: the image whose followers get the version
    /// (instead of `service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The environment; optional when the config has only one.
    #[serde(default)]
    pub environment: Option<String>,
    /// Idempotency key: an event with a key already seen is answered with
    /// the first delivery's deployment and starts nothing.
    #[serde(default)]
    pub id: Option<String>,
}

/// `POST /api/v1/events` as the document states it: [`EventRequest`]'s
/// fields, one shape per `kind` (a field of another kind is 400). Only
/// read by the tests, which hold it to [`EventRequest`].
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[schema(as = EventRequest, examples(
    json!({"kind": "deploy", "service": "web", "version": "1.4.0", "environment": "staging"}),
    json!({"kind": "run", "jobs": ["build"], "environment": "staging", "id": "ci-run-4711"}),
    json!({"kind": "published", "service": "web", "version": "1.4.1"})
))]
pub enum EventRequestSchema {
    /// A service at a version: its jobs and what they need.
    Deploy {
        #[schema(value_type = Name)]
        service: String,
        #[schema(value_type = Version)]
        version: String,
        /// Optional when the config has only one environment.
        #[serde(default)]
        #[schema(value_type = Option<Name>)]
        environment: Option<String>,
        /// For a service with an `artifact`: the release tarball's SHA-256.
        #[serde(default)]
        #[schema(value_type = Option<Digest>)]
        digest: Option<String>,
        /// Idempotency key: an event with a key already seen is answered
        /// with the first delivery's deployment and starts nothing.
        #[serde(default)]
        #[schema(value_type = Option<EventId>)]
        id: Option<String>,
    },
    /// Named jobs and what they need.
    Run {
        #[schema(value_type = Vec<Name>, min_items = 1)]
        jobs: Vec<String>,
        /// Optional when the config has only one environment.
        #[serde(default)]
        #[schema(value_type = Option<Name>)]
        environment: Option<String>,
        /// Idempotency key (as for `deploy`).
        #[serde(default)]
        #[schema(value_type = Option<EventId>)]
        id: Option<String>,
    },
    /// An artifact was published (as `POST /api/v1/published`): exactly
    /// one of `image` (its followers) and `service`; deploys where
    /// `auto_deploy` opts in.
    Published {
        #[serde(default)]
        #[schema(value_type = Option<Image>)]
        image: Option<String>,
        #[serde(default)]
        #[schema(value_type = Option<Name>)]
        service: Option<String>,
        #[schema(value_type = Version)]
        version: String,
        #[serde(default)]
        #[schema(value_type = Option<Digest>)]
        digest: Option<String>,
        /// Idempotency key, 1 to 256 printable characters; by default the
        /// artifact and version themselves.
        #[serde(default)]
        #[schema(value_type = Option<PublishedId>)]
        id: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Deploy,
    Run,
    /// "An artifact was published": `image` (its followers) or `service`,
    /// `version`, optional `digest`; deploys where `auto_deploy` opts in
    /// (as `POST /api/v1/published`).
    Published,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventAccepted {
    pub event_id: i64,
    pub deployment_id: i64,
    /// True when this event id was seen before.
    pub duplicate: bool,
    /// Queued deployments this one superseded.
    pub superseded: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    pub id: i64,
    pub kind: DeploymentKind,
    pub environment: String,
    pub service: Option<String>,
    pub version: Option<String>,
    /// Config revision (content hash) every job runs against.
    pub revision: String,
    pub state: DeploymentState,
    pub reason: Option<String>,
    pub superseded_by: Option<i64>,
    pub cancel_requested: bool,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    /// What it was, where not a plain deploy or run: "rollback",
    /// "promotion from staging", "config change" (a redeploy of what runs,
    /// for a new config commit). In lists and single deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl From<store::DeploymentRow> for Deployment {
    fn from(d: store::DeploymentRow) -> Self {
        Deployment {
            duration_ms: d.started_at.map(|s| d.finished_at.unwrap_or_else(store::now_ms) - s),
            id: d.id,
            kind: d.kind,
            environment: d.environment,
            service: d.service,
            version: d.version,
            revision: d.revision,
            state: d.state,
            reason: d.reason,
            superseded_by: d.superseded_by,
            cancel_requested: d.cancel_requested,
            created_at: d.created_at,
            started_at: d.started_at,
            finished_at: d.finished_at,
            cause: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub name: String,
    pub state: JobState,
    /// Attempts started so far.
    pub attempt: i64,
    pub node: Option<String>,
    pub needs: Vec<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
}

impl From<store::JobRow> for Job {
    fn from(j: store::JobRow) -> Self {
        Job {
            duration_ms: j.started_at.map(|s| j.finished_at.unwrap_or_else(store::now_ms) - s),
            name: j.name,
            state: j.state,
            attempt: j.attempt,
            node: j.node,
            needs: j.needs,
            started_at: j.started_at,
            finished_at: j.finished_at,
            exit_code: j.exit_code,
            reason: j.reason,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    pub job: String,
    pub attempt: i64,
    pub node: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub duration_ms: i64,
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    /// A job on a group of hosts: each host's result of this attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<AttemptHost>,
}

/// One host's part of an attempt of a job on a group of hosts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptHost {
    pub host: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub duration_ms: i64,
    /// `skipped`: not run, because earlier batches failed too often.
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    /// "exit code 3", "connection timed out after 5s", ...
    pub reason: Option<String>,
}

impl From<store::AttemptRow> for Attempt {
    fn from(a: store::AttemptRow) -> Self {
        Attempt {
            duration_ms: a.finished_at - a.started_at,
            job: a.job,
            attempt: a.attempt,
            node: a.node,
            started_at: a.started_at,
            finished_at: a.finished_at,
            outcome: a.outcome,
            exit_code: a.exit_code,
            reason: a.reason,
            hosts: a
                .parts
                .into_iter()
                .map(|p| AttemptHost {
                    host: p.part,
                    started_at: p.started_at,
                    finished_at: p.finished_at,
                    duration_ms: p.finished_at - p.started_at,
                    outcome: p.outcome,
                    exit_code: p.exit_code,
                    reason: p.reason,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeploymentDetail {
    pub deployment: Deployment,
    pub jobs: Vec<Job>,
    /// Every attempt of every job, in order.
    pub attempts: Vec<Attempt>,
    /// Job names by wave: a job's wave is its longest distance from a job
    /// that needs nothing (the planner's columns).
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    /// The chain of `needs` that took longest, first job first, by the
    /// time each job took (a running job: so far; one not started: none).
    #[serde(default)]
    pub critical_path: Vec<String>,
    #[serde(default)]
    pub critical_path_ms: i64,
    /// The answering node's change counter when this was read: pass it
    /// back as `after` (with `wait`) to be answered as soon as the
    /// deployment changes.
    #[serde(default)]
    pub seq: u64,
}

impl DeploymentDetail {
    /// The deployment with its graph's shape worked out from its jobs.
    pub fn new(deployment: Deployment, jobs: Vec<Job>, attempts: Vec<Attempt>) -> Self {
        use crate::plan::shape::{RanJob, shape};
        let ran: Vec<RanJob<'_>> = jobs
            .iter()
            .map(|j| RanJob { name: &j.name, needs: &j.needs, took: std::time::Duration::from_millis(j.duration_ms.unwrap_or(0).max(0) as u64) })
            .collect();
        let s = shape(&ran);
        let name = |i: &usize| jobs[*i].name.clone();
        let waves = s.waves.iter().map(|w| w.iter().map(name).collect()).collect();
        let critical_path = s.critical_path.iter().map(name).collect();
        let critical_path_ms = i64::try_from(s.critical_path_duration.as_millis()).unwrap_or(i64::MAX);
        DeploymentDetail { deployment, jobs, attempts, waves, critical_path, critical_path_ms, seq: 0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Position in the deployment's log; pass as `after` to continue.
    pub seq: i64,
    pub job: String,
    pub attempt: i64,
    pub ts: i64,
    /// `stdout`, `stderr` or `slipway` (the engine's own notes).
    pub stream: String,
    pub line: String,
    /// The host that wrote it, for a job on a group of hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl From<store::LogRecord> for LogLine {
    fn from(l: store::LogRecord) -> Self {
        LogLine { seq: l.seq, job: l.job, attempt: l.attempt, ts: l.ts, stream: l.stream, line: l.line, host: l.part }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// A service in an environment: its recorded version and, on the node
/// that answers, its live instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceInfo {
    pub environment: String,
    pub service: String,
    /// The version that last took all traffic.
    pub version: String,
    /// What `rollback` would return to.
    pub previous_version: Option<String>,
    /// The SHA-256 `version` runs by: a container image's digest, or a
    /// release tarball's checksum.
    pub digest: Option<String>,
    /// Services on a target that runs its own rollout: what runs, in the
    /// target's own names (an ECS task definition ARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<String>,
    pub revision: String,
    /// The deployment that put `version` in place.
    pub deployment_id: i64,
    pub updated_at: i64,
    /// The proxy's address, when this node runs the service.
    pub listen: Option<String>,
    /// Instances on this node (empty when another node runs them).
    pub instances: Vec<InstanceInfo>,
    /// Crashed instances the supervisor restarted since the last rollout.
    pub restarts: u32,
    /// The newest deployment of this service in this environment.
    pub last_deployment: Option<Deployment>,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"name": "ci", "roles": {"staging": "deployer", "*": "viewer"}})))]
pub struct TokenRequest {
    #[schema(value_type = Name)]
    pub name: String,
    /// Environment (or "*" for every one) → role.
    #[schema(schema_with = roles_schema)]
    pub roles: std::collections::BTreeMap<String, super::auth::Role>,
}

/// A new token: shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub name: String,
    pub token: String,
    pub roles: std::collections::BTreeMap<String, super::auth::Role>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub roles: std::collections::BTreeMap<String, super::auth::Role>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// One entry of the audit log.
/// `GET /api/v1/whoami`: the caller as the API sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name (None: no token exists yet and the API is open).
    pub name: Option<String>,
    /// How the audit log and approvals name this caller.
    pub actor: String,
    /// Role per environment (`*`: every one).
    pub roles: std::collections::BTreeMap<String, super::auth::Role>,
    /// No token exists yet: everything is allowed but approving.
    pub open: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditInfo {
    pub id: i64,
    pub at: i64,
    /// Who: "anonymous", "github webhook", "registry notifications".
    pub actor: String,
    /// The client's address.
    pub address: String,
    /// What: "POST /api/v1/events".
    pub action: String,
    /// What it meant and what came of it.
    pub detail: String,
    /// The HTTP status answered.
    pub status: u16,
    /// The environment it acted in, where it acted in one.
    #[serde(default)]
    pub environment: Option<String>,
}

/// `why`: why a service runs the version it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhyInfo {
    pub environment: String,
    pub service: String,
    /// The recorded version (with its digest), if any.
    pub running: Option<String>,
    /// The newest version seen (asked for, or published).
    pub newest: Option<String>,
    /// The answer, in a sentence or a few.
    pub verdict: String,
    /// What became of each version seen, newest first.
    pub history: Vec<String>,
}

/// `POST /api/v1/published`: a version of an artifact was published.
/// Names exactly one of `image` and `service` (400 otherwise).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"image": "ghcr.io/team/web", "version": "1.4.2"}), json!({"service": "web", "version": "1.4.3", "digest": "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"})))]
pub struct PublishedRequest {
    /// The image (`registry/repository`) whose services follow it…
    #[serde(default)]
    #[schema(value_type = Option<Image>)]
    pub image: Option<String>,
    /// …or the service, by name.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub service: Option<String>,
    #[schema(value_type = Version)]
    pub version: String,
    /// The artifact's digest (`sha256:…`): a container image is pinned to
    /// it rather than to what the tag names at deploy time; a release
    /// tarball is checked against it.
    #[serde(default)]
    #[schema(value_type = Option<Digest>)]
    pub digest: Option<String>,
    /// Idempotency key (1 to 256 printable characters); by default the artifact
    /// and version themselves, so the same version published twice
    /// deploys once.
    #[serde(default)]
    #[schema(value_type = Option<PublishedId>)]
    pub id: Option<String>,
}

/// `POST /hooks/registry`: a registry's notification envelope (Docker
/// Distribution's). Each tagged push of a manifest (`action` `push`, a
/// `target` with a `tag` and a manifest `mediaType`, an `id`) is acted
/// on; every other event is counted and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(examples(json!({"events": [{"id": "320678d8-ca14-430f-8bb6-4ca139cd83f7", "action": "push",
    "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": "sha256:fc6a51919cfeb2e6763f62b6d9e8815acbf7cd2e476ea353743570610737b752",
        "repository": "team/web", "tag": "1.4.0"}, "request": {"host": "registry.internal:5000"}}]})))]
pub struct RegistryEnvelope {
    /// The events, as the registry sends them.
    #[schema(value_type = Vec<Value>)]
    pub events: Vec<serde_json::Value>,
}

/// The answer to a webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HookAnswer {
    /// `X-GitHub-Delivery`.
    pub delivery: String,
    pub event: String,
    /// This delivery was seen before: nothing new was started.
    pub duplicate: bool,
    /// What the delivery was ("pong", "…:1.4.0 published", why it was ignored).
    pub note: Option<String>,
    /// Per service and environment that follow the published image.
    pub results: Vec<HookResult>,
    /// A push: what became of the new commit, per environment following
    /// the branch.
    #[serde(default)]
    pub revisions: Vec<RevisionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HookResult {
    pub service: String,
    pub environment: String,
    pub version: String,
    /// The deployment started (or started by the first delivery).
    pub deployment_id: Option<i64>,
    /// Available, not deployed: why.
    pub held: Option<String>,
    /// The deployment was refused: why.
    pub error: Option<String>,
}

/// What `gc` found, or removed when `applied`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GarbageInfo {
    /// Containers with Slipway's labels that no live Slipway holds.
    pub containers: Vec<GarbageItemInfo>,
    /// Images of deployed repositories that nothing runs or could roll back to.
    pub images: Vec<GarbageItemInfo>,
    pub applied: bool,
    /// Why something was not looked at or left alone.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GarbageItemInfo {
    pub id: String,
    pub what: String,
}

impl From<crate::service::manager::GarbageReport> for GarbageInfo {
    fn from(r: crate::service::manager::GarbageReport) -> Self {
        let items = |v: Vec<crate::targets::GarbageItem>| v.into_iter().map(|i| GarbageItemInfo { id: i.id, what: i.what }).collect();
        GarbageInfo { containers: items(r.garbage.containers), images: items(r.garbage.images), applied: r.applied, notes: r.notes }
    }
}

/// What retention keeps and deletes, per repository (deleted, when `applied`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetentionInfo {
    pub applied: bool,
    pub repositories: Vec<RetentionRepositoryInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetentionRepositoryInfo {
    /// `registry/repository`.
    pub image: String,
    pub keep_tags: u32,
    /// The services whose versions are this image's tags.
    pub services: Vec<String>,
    /// Newest first, each with every reason it stays.
    pub kept: Vec<RetentionKeptInfo>,
    /// Manifests the policy deletes, with the tags that go with each.
    pub delete: Vec<RetentionDeleteInfo>,
    /// Why the repository was not (entirely) handled, naming the registry.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetentionKeptInfo {
    pub tag: String,
    pub digest: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetentionDeleteInfo {
    pub digest: String,
    pub tags: Vec<String>,
    /// Whether it is gone (only ever true when applied).
    pub deleted: bool,
}

impl From<crate::retention::Report> for RetentionInfo {
    fn from(r: crate::retention::Report) -> Self {
        let repositories = r
            .repositories
            .into_iter()
            .map(|repo| RetentionRepositoryInfo {
                delete: repo
                    .delete
                    .into_iter()
                    .map(|d| RetentionDeleteInfo { deleted: repo.deleted.contains(&d.digest), digest: d.digest, tags: d.tags })
                    .collect(),
                image: repo.image,
                keep_tags: repo.keep,
                services: repo.services,
                kept: repo.kept.into_iter().map(|k| RetentionKeptInfo { tag: k.tag, digest: k.digest, reasons: k.reasons }).collect(),
                errors: repo.errors,
            })
            .collect();
        RetentionInfo { applied: r.applied, repositories }
    }
}

/// What happened to a service outside a deployment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceEventInfo {
    pub at: i64,
    /// `instance_died`, `restarted`, `restart_failed`, `restored`, `restore_failed`.
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceInfo {
    pub address: String,
    pub id: String,
    pub running: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the store does not answer.
    pub status: String,
    pub store: String,
    pub node: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable kind: `bad_request`, `not_found`,
    /// `invalid_config`, `payload_too_large`, `store_unavailable`, `internal`.
    pub kind: String,
    pub message: String,
    /// For `invalid_config`: each problem with file, line and column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    pub kind: String,
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub hint: Option<String>,
}

/// A deployment waiting at a gate, and what it waits for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovalInfo {
    pub deployment: Deployment,
    /// An approver must approve it.
    pub approval_required: bool,
    pub approved_by: Option<String>,
    pub approved_at: Option<i64>,
    /// Soak: not before this time (ms since the epoch; 0: none).
    pub not_before: i64,
    /// It starts only inside the environment's deploy windows.
    pub window: bool,
    /// A promotion: where its version comes from.
    pub source_environment: Option<String>,
    pub source_deployment: Option<i64>,
    pub waiting_for: Option<String>,
    /// Who asked for it (a token's actor, as the audit log names it): the
    /// one caller who may not approve it.
    #[serde(default)]
    pub requested_by: Option<String>,
}

impl From<(store::DeploymentRow, store::Hold)> for ApprovalInfo {
    fn from((d, h): (store::DeploymentRow, store::Hold)) -> Self {
        ApprovalInfo {
            deployment: Deployment::from(d),
            approval_required: h.approval,
            approved_by: h.approved_by,
            approved_at: h.approved_at,
            not_before: h.not_before,
            window: h.window,
            source_environment: h.source_environment,
            source_deployment: h.source_deployment,
            waiting_for: h.waiting_for,
            requested_by: h.requested_by,
        }
    }
}

/// `POST /api/v1/services/{environment}/{service}/promote`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"from": "staging"})))]
pub struct PromoteRequest {
    /// The environment whose running version is promoted.
    #[schema(value_type = Name)]
    pub from: String,
}

/// What became of one commit of an environment's config branch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevisionInfo {
    pub environment: String,
    pub commit: String,
    /// The revision id its deployments name.
    pub revision: String,
    pub branch: String,
    /// `accepted` or `rejected`.
    pub state: String,
    pub previous: Option<String>,
    pub changed: Vec<String>,
    /// The jobs its changes run, and why.
    pub jobs: Vec<TouchedJob>,
    pub deployment: Option<i64>,
    /// Services whose definition it changed, redeployed at the version
    /// they run.
    pub redeploy: Vec<String>,
    /// Why it was rejected: the validation report.
    pub errors: Option<String>,
    pub at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TouchedJob {
    pub job: String,
    pub why: String,
}

impl From<crate::submit::git::RevisionRecord> for RevisionInfo {
    fn from(r: crate::submit::git::RevisionRecord) -> Self {
        RevisionInfo {
            environment: r.environment,
            commit: r.commit,
            revision: r.revision,
            branch: r.branch,
            state: r.state,
            previous: r.previous,
            changed: r.changed,
            jobs: r.jobs.into_iter().map(|t| TouchedJob { job: t.job, why: t.why }).collect(),
            deployment: r.deployment,
            redeploy: r.redeploy,
            errors: r.errors,
            at: r.at,
        }
    }
}

/// An environment: where its config comes from, its gates, and (config
/// from git) the commit it runs and a newer rejected one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentInfo {
    pub name: String,
    /// `URL branch` of its config repository (None: the node's directory).
    pub git: Option<String>,
    pub promote_from: Option<String>,
    pub soak_secs: u64,
    pub approval: bool,
    /// Deploy windows (UTC).
    pub windows: Vec<String>,
    /// The last accepted commit.
    pub revision: Option<RevisionInfo>,
    /// A commit newer than `revision` that was rejected.
    pub rejected: Option<RevisionInfo>,
    /// The answering node's last fetch of the branch failed (and none has
    /// succeeded since): when (ms) and what git said.
    pub fetch_failed_at: Option<i64>,
    pub fetch_error: Option<String>,
}

// The rules the server checks, stated in the OpenAPI document as string
// schemas of their own (one definition each; the unit tests below hold
// each pattern to the function that enforces it).

/// `crate::config::valid_name`: environments, services, jobs, tokens.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$";
/// A filter by name, where an empty value filters nothing.
pub const NAME_FILTER_PATTERN: &str = "^([A-Za-z0-9_-][A-Za-z0-9._-]{0,63})?$";
/// `super::valid_host`: a host named in a path (`/hosts/{host}/drain`).
pub const HOST_PATTERN: &str = "^[A-Za-z0-9._:\\[\\]-]{1,255}$";
/// `crate::submit::valid_version`.
pub const VERSION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$";
/// `crate::submit::valid_key`: an event's idempotency key.
pub const EVENT_ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";
/// `super::hooks::published_id_problem`: a publication's id, any 1 to 256
/// characters but control characters (Unicode's Cc).
pub const PUBLISHED_ID_PATTERN: &str = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,256}$";
/// `crate::service::artifact::parse_sha256`.
pub const DIGEST_PATTERN: &str = "^(sha256:)?[0-9A-Fa-f]{64}$";
/// A token's role is given per environment name, or `*` for every one.
pub const ROLE_SCOPE_PATTERN: &str = "^(\\*|[A-Za-z0-9_-][A-Za-z0-9._-]{0,63})$";
/// `crate::config::valid_image` (after lowercasing, as the server does),
/// slightly looser: the server also refuses a first part it reads as a
/// registry host (with a `.` or `:`) that holds other characters.
pub const IMAGE_PATTERN: &str = "^([A-Za-z0-9.:-]+/)?[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$";

fn string_schema(pattern: &str, min: usize, max: usize, description: &str, example: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(Some(min))
        .max_length(Some(max))
        .description(Some(description))
        .examples([serde_json::json!(example)])
        .into()
}

macro_rules! string_rule {
    ($(#[$doc:meta])* $ty:ident, $pattern:expr, $min:expr, $max:expr, $description:expr, $example:expr) => {
        $(#[$doc])*
        pub struct $ty;
        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                string_schema($pattern, $min, $max, $description, $example)
            }
        }
        impl utoipa::ToSchema for $ty {}
    };
}

string_rule!(
    /// Document-only: a name (see [`NAME_PATTERN`]).
    Name, NAME_PATTERN, 1, 64,
    "A name of an environment, service, job or token: letters, digits, '-', '_' and '.', at most 64 characters, not starting with '.'.",
    "staging"
);
string_rule!(
    /// Document-only: a name to filter by, or empty (see [`NAME_FILTER_PATTERN`]).
    NameFilter, NAME_FILTER_PATTERN, 0, 64,
    "A name to filter by (letters, digits, '-', '_' and '.', at most 64 characters, not starting with '.'), or empty for no filter.",
    "staging"
);
string_rule!(
    /// Document-only: a host's name or address (see [`HOST_PATTERN`]).
    HostName, HOST_PATTERN, 1, 255,
    "A host's name or address as the config names it: letters, digits, '.', '_', '-', ':', '[' and ']', at most 255 characters.",
    "web-1"
);
string_rule!(
    /// Document-only: a version (see [`VERSION_PATTERN`]).
    Version, VERSION_PATTERN, 1, 128,
    "A version: starts with a letter or digit, then letters, digits, '.', '_', '-' and '+'; at most 128 characters.",
    "1.4.0"
);
string_rule!(
    /// Document-only: an event id (see [`EVENT_ID_PATTERN`]).
    EventId, EVENT_ID_PATTERN, 1, 128,
    "The idempotency key of a deploy or run event: at most 128 letters, digits, '.', '_', '-' or ':'. Keys starting with github:, registry:, published:, git:, promote: or resubmit: are Slipway's own (400).",
    "ci-run-4711"
);
string_rule!(
    /// Document-only: a publication's id (see [`PUBLISHED_ID_PATTERN`]).
    PublishedId, PUBLISHED_ID_PATTERN, 1, 256,
    "The id of one publication: 1 to 256 characters, none of them a control character. The same id again is a retry of that publication; another publication under it is refused (409).",
    "build-4711"
);
string_rule!(
    /// Document-only: a SHA-256 digest (see [`DIGEST_PATTERN`]).
    Digest, DIGEST_PATTERN, 64, 71,
    "A SHA-256: 64 hexadecimal digits, optionally after 'sha256:'.",
    "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
);
string_rule!(
    /// Document-only: an image without a tag (see [`IMAGE_PATTERN`]).
    Image, IMAGE_PATTERN, 1, 255,
    "An image without a tag or digest: an optional registry host (with a '.' or ':', or localhost), then the repository's path; compared in lowercase.",
    "ghcr.io/team/web"
);

/// A token's roles: environment name (or `*` for every one) → role.
fn roles_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let role = utoipa::openapi::Ref::from_schema_name(<super::auth::Role as ToSchema>::name());
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("Environment (or \"*\" for every one) → role; at least one."))
        .min_properties(Some(1))
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(ROLE_SCOPE_PATTERN))))
        .additional_properties(Some(AdditionalProperties::RefOr(role.into())))
        .build()
}

/// `POST /api/v1/events`: kinds `deploy` and `run` answer with the
/// deployment, kind `published` with what the publication did per
/// service and environment (as `POST /api/v1/published`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EventAnswer {
    Accepted(EventAccepted),
    Published(HookAnswer),
}

/// `DELETE /api/v1/tokens/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenRevoked {
    /// The token's name.
    pub revoked: String,
}

/// One event of `GET /api/v1/deployments/{id}/logs/stream`, as an
/// EventSource reads it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SseEventInfo {
    pub event: SseEventKind,
    /// `line`: a LogLine; `end`: the Deployment (JSON); `error`: why the
    /// store could not be read.
    pub data: String,
    /// `line`: its seq (an EventSource keeps the last one for the others).
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SseEventKind {
    Line,
    Error,
    End,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random strings over the characters the rules care about, plus the
    /// edges (empty, at and past each length limit, a leading '.', '-' or
    /// '+', a trailing newline).
    fn samples() -> Vec<String> {
        const ALPHABET: &[char] = &['a', 'Z', '0', '9', '.', '_', '-', '+', ':', '*', '/', '@', ' ', '\n', 'é', 'f', 'F'];
        let mut v: Vec<String> = vec![
            String::new(),
            "*".into(),
            ".web".into(),
            "-web".into(),
            "+1".into(),
            "web\n".into(),
            "a".repeat(64),
            "a".repeat(65),
            "1".repeat(128),
            "1".repeat(129),
            "sha256:".to_string() + &"a".repeat(64),
            "A".repeat(64),
            "sha256:".to_string() + &"a".repeat(63),
            "ghcr.io/team/web".into(),
            "localhost:5000/web".into(),
            "Team/Web".into(),
        ];
        for _ in 0..20_000 {
            let len = rand::random::<u32>() as usize % 80;
            v.push((0..len).map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()]).collect());
        }
        v
    }

    fn re(p: &str) -> regex::Regex {
        regex::Regex::new(p).expect("pattern compiles")
    }

    #[test]
    fn issue13_document_patterns_state_the_rules_the_server_checks() {
        let (name, version, key, digest, scope, image) =
            (re(NAME_PATTERN), re(VERSION_PATTERN), re(EVENT_ID_PATTERN), re(DIGEST_PATTERN), re(ROLE_SCOPE_PATTERN), re(IMAGE_PATTERN));
        let (filter, host, published) = (re(NAME_FILTER_PATTERN), re(HOST_PATTERN), re(PUBLISHED_ID_PATTERN));
        let edges =
            ["".to_string(), "[::1]".into(), "10.0.0.7:22".into(), "a\u{e9}".into(), "a\u{0}b".into(), "\u{7f}".into(), "x\u{85}".into(), "\u{a0}".into()];
        let lengths = ["\u{e9}".repeat(256), "\u{e9}".repeat(257), "a".repeat(256), "a".repeat(257)];
        for s in samples().into_iter().chain(edges).chain(lengths) {
            assert_eq!(published.is_match(&s), super::super::hooks::published_id_problem(&s).is_none(), "published id {s:?}");
            assert_eq!(name.is_match(&s), crate::config::valid_name(&s), "name {s:?}");
            assert_eq!(filter.is_match(&s), s.is_empty() || crate::config::valid_name(&s), "name filter {s:?}");
            assert_eq!(host.is_match(&s), super::super::valid_host(&s), "host {s:?}");
            assert_eq!(version.is_match(&s), crate::submit::valid_version(&s), "version {s:?}");
            assert_eq!(key.is_match(&s), crate::submit::valid_key(&s), "event id {s:?}");
            assert_eq!(digest.is_match(&s), crate::service::artifact::parse_sha256(&s).is_some(), "digest {s:?}");
            assert_eq!(scope.is_match(&s), s == "*" || crate::config::valid_name(&s), "role scope {s:?}");
            // Looser by design (see IMAGE_PATTERN): never refuses an image the server takes.
            if crate::config::valid_image(&s.to_ascii_lowercase()) {
                assert!(image.is_match(&s), "image {s:?}");
            }
        }
    }

    #[test]
    fn issue13_the_documented_event_shapes_are_events_the_server_reads() {
        let doc = <EventRequestSchema as utoipa::PartialSchema>::schema();
        let doc = serde_json::to_value(doc).expect("schema");
        let examples = doc["examples"].as_array().expect("examples").clone();
        assert_eq!(examples.len(), 3, "one example per kind");
        let extra = [
            serde_json::json!({"kind": "deploy", "service": "api", "version": "2.0.0", "digest": "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae", "id": "k"}),
            serde_json::json!({"kind": "published", "image": "ghcr.io/team/web", "version": "1.4.0", "id": "any id at all"}),
        ];
        for e in examples.iter().chain(extra.iter()) {
            let shape: EventRequestSchema = serde_json::from_value(e.clone()).unwrap_or_else(|err| panic!("{e}: not the documented shape: {err}"));
            let read: EventRequest = serde_json::from_value(e.clone()).unwrap_or_else(|err| panic!("{e}: the server cannot read it: {err}"));
            let kind = match shape {
                EventRequestSchema::Deploy { .. } => EventKind::Deploy,
                EventRequestSchema::Run { .. } => EventKind::Run,
                EventRequestSchema::Published { .. } => EventKind::Published,
            };
            assert_eq!(read.kind, kind, "{e}");
        }
        // A field of another kind is not the documented shape.
        assert!(serde_json::from_value::<EventRequestSchema>(serde_json::json!({"kind": "run", "jobs": ["build"], "service": "web"})).is_err());
    }
}

/// A host of a target's group (`slipway hosts`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub target: String,
    pub group: String,
    pub name: String,
    pub address: String,
    pub reachable: bool,
    /// Why it could not be asked ("connection timed out after 5s").
    pub error: Option<String>,
    /// The host key it offered ("SHA256:…").
    pub fingerprint: Option<String>,
    pub drained: bool,
    pub services: Vec<HostServiceInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostServiceInfo {
    pub environment: String,
    pub service: String,
    pub version: String,
    pub instances: u32,
    pub healthy: u32,
}

impl HostInfo {
    pub fn of(target: &str, m: crate::targets::Machine) -> Self {
        HostInfo {
            target: target.to_string(),
            group: m.group,
            name: m.name,
            address: m.address,
            reachable: m.reachable,
            error: m.error,
            fingerprint: m.fingerprint,
            drained: m.drained,
            services: m
                .services
                .into_iter()
                .map(|s| HostServiceInfo { environment: s.environment, service: s.service, version: s.version, instances: s.instances, healthy: s.healthy })
                .collect(),
        }
    }
}

/// What `drain` / `undrain` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostDrained {
    pub host: String,
    pub drained: bool,
    pub message: String,
}
