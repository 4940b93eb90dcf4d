//! The durable state: events, revisions, deployments, jobs, attempts,
//! logs, locks and nodes, behind the [`Store`] trait.
//!
//! One implementation, [`sql::SqlStore`], speaks to SQLite (one node, one
//! file, WAL) and PostgreSQL (several nodes) through sqlx's `Any` driver;
//! the few statements that differ (row locks, `SKIP LOCKED`, DDL) are
//! chosen by dialect. Both pass the same test suite (`tests/store.rs`).
//!
//! The scheduler's correctness rests on four store operations, each one
//! transaction: [`Store::submit`] (event + deployment + jobs + supersede),
//! [`Store::activate`] (take the deployment's lock lease), [`Store::claim`]
//! (lease a ready job, bump its fencing token) and [`Store::finish`] (record
//! an attempt, fenced, and release dependants). See
//! `docs/design/scheduler.md`.

pub mod migrate;
pub mod spec;
pub mod sql;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::revision::Revision;

/// Milliseconds since the Unix epoch: the only time type stored.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store query failed ({op}): {source}")]
    Query { op: &'static str, source: sqlx::Error },
    #[error("bad store URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// The store was migrated by a newer Slipway: reading it with this
    /// one could misread or damage what that one wrote.
    #[error(
        "the store's schema is at version {found}, newer than this Slipway knows (up to {known}): a newer Slipway upgraded it. \
         Run that version or a newer one against this store; this one refuses to start rather than misread it"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl StoreError {
    pub(crate) fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |e| match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => StoreError::Unavailable(format!("{op}: {e}")),
            // A full disk or failing I/O under the store: nothing is wrong
            // with the request, the store cannot write now (503, exit 4),
            // and /healthz says so for a while (see `disk_trouble`).
            sqlx::Error::Database(ref d) if d.code().as_deref().and_then(disk_trouble_of).is_some() => {
                let what = d.code().as_deref().and_then(disk_trouble_of).unwrap_or_default();
                let message = format!("{op}: {what} ({})", d.message());
                if let Ok(mut last) = DISK_TROUBLE.lock() {
                    *last = Some((std::time::Instant::now(), message.clone()));
                }
                StoreError::Unavailable(message)
            }
            // Timeouts, lock waits, a server shutting down or full, a busy
            // SQLite file: the store is there but cannot answer now.
            sqlx::Error::Database(ref d)
                if d.code()
                    .is_some_and(|c| matches!(c.as_ref(), "57014" | "55P03" | "57P01" | "57P02" | "57P03" | "57P05" | "53300" | "5" | "6" | "261" | "517")) =>
            {
                StoreError::Unavailable(format!("{op}: {e}"))
            }
            other => StoreError::Query { op, source: other },
        }
    }
}

/// What a database error code says about the disk under the store, if it
/// is about that: SQLite's SQLITE_FULL (13) and SQLITE_IOERR family (10,
/// and its extended codes 10 + n·256), PostgreSQL's class 53
/// (insufficient resources: 53100 disk_full, 53200 out_of_memory…; 53300,
/// too many connections, is a busy server, mapped above).
fn disk_trouble_of(code: &str) -> Option<&'static str> {
    match code {
        "13" => Some("the disk holding the SQLite store is full"),
        "53100" => Some("the disk of the PostgreSQL server is full"),
        c if c.starts_with("53") && c.len() == 5 && c != "53300" => Some("the PostgreSQL server is out of resources (disk or memory)"),
        // SQLite's codes are at most 4 digits, SQLSTATEs always 5.
        c if c.len() < 5 && c.parse::<i32>().is_ok_and(|n| n & 0xff == 10) => {
            Some("an I/O error on the disk holding the SQLite store (is it full or failing?)")
        }
        _ => None,
    }
}

/// The last write that failed for a full disk or an I/O error, and when.
static DISK_TROUBLE: std::sync::Mutex<Option<(std::time::Instant, String)>> = std::sync::Mutex::new(None);

/// How long `/healthz` reports a store write that failed for its disk: a
/// node keeps writing (heartbeats, leases, logs), so while the disk stays
/// full this never lapses, and once there is room again it does.
pub const DISK_TROUBLE_SHOWN: Duration = Duration::from_secs(30);

/// The disk trouble a store write met in the last [`DISK_TROUBLE_SHOWN`],
/// if any (a read of the store still works on a full disk, so a ping
/// alone would call it fine).
pub fn disk_trouble() -> Option<String> {
    let last = DISK_TROUBLE.lock().ok()?;
    last.as_ref().filter(|(at, _)| at.elapsed() < DISK_TROUBLE_SHOWN).map(|(_, m)| m.clone())
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $s),* } }
            pub fn parse(s: &str) -> Option<Self> { match s { $($s => Some($name::$variant),)* _ => None } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// Life of a deployment. `waiting` is held by a gate (an approval, a
    /// soak time, a deploy window: see [`Hold`]); `queued` waits for its
    /// lock; the others after `running` are terminal. `rolled_back`: a
    /// rollout failed and the service went back to its last good version.
    DeploymentState {
        Waiting = "waiting",
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        RolledBack = "rolled_back",
        Cancelled = "cancelled",
        Superseded = "superseded",
    }
);

impl DeploymentState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, DeploymentState::Waiting | DeploymentState::Queued | DeploymentState::Running)
    }
}

string_enum!(
    /// Life of a job. `pending` waits for its needs, `ready` for a slot.
    JobState {
        Pending = "pending",
        Ready = "ready",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        RolledBack = "rolled_back",
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
);

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::RolledBack | JobState::Skipped | JobState::Cancelled)
    }
}

string_enum!(
    /// How one attempt of a job ended (`interrupted`: its node died or
    /// lost the lease mid-run).
    Outcome {
        Succeeded = "succeeded",
        Failed = "failed",
        TimedOut = "timed_out",
        Cancelled = "cancelled",
        Interrupted = "interrupted",
        RolledBack = "rolled_back",
        // Only for a part of a job (a host): not run, because earlier
        // batches failed more than the job tolerates.
        Skipped = "skipped",
    }
);

string_enum!(
    DeploymentKind {
        Deploy = "deploy",
        Run = "run",
    }
);

/// What a job runs, frozen at submit time from the pinned revision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub command: crate::config::Command,
    pub timeout_ms: u64,
    pub kill_grace_ms: u64,
    pub retry_attempts: u32,
    pub retry_any: bool,
    pub retry_exit_codes: Vec<i32>,
    pub retry_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub idempotent: bool,
    pub env: std::collections::BTreeMap<String, String>,
    /// The deployment's release tarball (URL with the version filled, and
    /// its SHA-256 from the request): fetched by `<service>.fetch`, and
    /// the directory the service's other jobs and instances run in.
    #[serde(default)]
    pub artifact: Option<ArtifactRef>,
    /// Environment variables from secrets: only where to read them.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, crate::config::secret::SecretRef>,
    /// Jobs on targets that place files: files from secrets (path in the
    /// instance → secret).
    #[serde(default)]
    pub secret_files: std::collections::BTreeMap<String, crate::config::secret::SecretRef>,
    /// The target the job runs on; `None`: the default target.
    #[serde(default)]
    pub target: Option<String>,
    /// That target's own settings of the job (the hosts it runs on).
    #[serde(default)]
    pub settings: crate::targets::Settings,
    /// Once per environment, ever (a service's `bootstrap`): a later
    /// deployment there finds it done and skips it.
    #[serde(default)]
    pub once_per_environment: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactRef {
    /// A tarball's URL, or a container image's `image:tag`.
    pub url: String,
    pub sha256: String,
    #[serde(default)]
    pub kind: ArtifactKind,
}

impl ArtifactRef {
    /// A container image's `image@sha256:…`: the `url` without its tag,
    /// pinned to the digest (what a one-off task or container runs).
    pub fn pinned_image(&self) -> String {
        let repository = self.url.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map(|(r, _)| r).unwrap_or(&self.url);
        format!("{repository}@sha256:{}", self.sha256)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// Unpacked into the node's cache; the service's commands run in it.
    #[default]
    Tarball,
    /// Made available on an image target; run by digest.
    Image,
}

impl JobSpec {
    /// A service's post-rollout check, run once, as a job-like command.
    pub fn verify(step: &crate::config::service::StepSpec) -> Self {
        JobSpec {
            command: crate::config::Command::Argv(step.command.clone()),
            timeout_ms: step.timeout.as_millis() as u64,
            kill_grace_ms: 5000,
            retry_attempts: 1,
            retry_any: false,
            retry_exit_codes: vec![],
            retry_backoff_ms: 1000,
            retry_max_backoff_ms: 1000,
            idempotent: step.idempotent,
            env: Default::default(),
            artifact: None,
            secrets: Default::default(),
            secret_files: Default::default(),
            target: None,
            settings: Default::default(),
            once_per_environment: false,
        }
    }

    pub fn from_job(job: &crate::config::Job) -> Self {
        let (retry_any, retry_exit_codes) = match &job.retry.on {
            crate::config::RetryOn::Any => (true, vec![]),
            crate::config::RetryOn::ExitCodes(c) => (false, c.clone()),
        };
        JobSpec {
            command: job.command.clone(),
            timeout_ms: job.timeout.as_millis() as u64,
            kill_grace_ms: job.kill_grace.as_millis() as u64,
            retry_attempts: job.retry.attempts,
            retry_any,
            retry_exit_codes,
            retry_backoff_ms: job.retry.backoff.as_millis() as u64,
            retry_max_backoff_ms: job.retry.max_backoff.as_millis() as u64,
            idempotent: job.idempotent,
            env: job.env.clone(),
            artifact: None,
            secrets: job.secrets.clone(),
            secret_files: job.secret_files.clone(),
            target: job.target.clone(),
            settings: job.settings.clone(),
            once_per_environment: job.once_per_environment,
        }
    }

    /// Attempts an idempotent job may reach when its runs are interrupted
    /// (node died or shut down): its retry attempts plus a few, so a job
    /// that kills its node cannot loop forever. Crash and graceful stop
    /// use the same limit.
    pub fn interrupted_attempt_limit(&self) -> u32 {
        self.retry_attempts.saturating_add(3)
    }

    pub fn retryable(&self, exit_code: Option<i32>) -> bool {
        self.retry_any || exit_code.is_some_and(|c| self.retry_exit_codes.contains(&c))
    }

    /// Delay before attempt `next` (2 = first retry): exponential, capped,
    /// with full jitter in the upper half so retries of many jobs spread.
    pub fn backoff(&self, next: u32) -> Duration {
        let exp = self.retry_backoff_ms.saturating_mul(1u64 << (next.saturating_sub(2)).min(30));
        let capped = exp.min(self.retry_max_backoff_ms.max(self.retry_backoff_ms));
        let jitter = rand::random_range(0..=capped / 2);
        Duration::from_millis(capped / 2 + jitter)
    }
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Idempotency key: the same key is accepted once.
    pub key: Option<String>,
    pub kind: String,
    pub payload: String,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    /// Indexes into `NewDeployment::jobs`.
    pub needs: Vec<usize>,
    pub spec: JobSpec,
}

#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub event: NewEvent,
    pub kind: DeploymentKind,
    pub environment: String,
    pub service: Option<String>,
    pub version: Option<String>,
    /// At most one running deployment per lock key.
    pub lock_key: String,
    pub revision: String,
    pub jobs: Vec<NewJob>,
    /// Gates it waits for before it may queue (None: queued at once).
    pub hold: Option<Hold>,
    /// Only if nothing on its lock is waiting, queued or running, and the
    /// service's record still names this deployment (the one the caller
    /// saw run): else nothing is stored and the answer is `busy`. For
    /// background redeploys, which must never supersede anyone's deploy
    /// nor act on a record gone stale.
    pub only_after: Option<i64>,
}

/// What a `waiting` deployment waits for. Released (to `queued`) by the
/// gate loop (`submit::gates`) once every condition holds (`crate::gate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hold {
    /// An approver must approve it (`slipway approve`).
    pub approval: bool,
    pub approved_by: Option<String>,
    pub approved_at: Option<Millis>,
    /// Not before this time (a promotion's soak).
    pub not_before: Millis,
    /// Only inside the environment's deploy windows.
    pub window: bool,
    /// A promotion: the environment and deployment it comes from. It is
    /// dropped if that environment no longer runs the version.
    pub source_environment: Option<String>,
    pub source_deployment: Option<i64>,
    /// What it waits for now, in words (kept current by the gate loop).
    pub waiting_for: Option<String>,
    /// Who asked for it (a token's actor): they may not approve it.
    pub requested_by: Option<String>,
    /// The digest its artifact was pinned to (so it can be submitted again
    /// on a newer revision without resolving the tag again).
    pub digest: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub event_id: i64,
    pub deployment_id: i64,
    /// The event key was seen before: nothing new was created.
    pub duplicate: bool,
    /// Queued deployments this one replaced.
    pub superseded: Vec<i64>,
    /// Refused under `only_after`: nothing was stored.
    pub busy: bool,
}

#[derive(Debug, Clone)]
pub struct DeploymentRow {
    pub id: i64,
    pub event_id: i64,
    pub kind: DeploymentKind,
    pub environment: String,
    pub service: Option<String>,
    pub version: Option<String>,
    pub revision: String,
    pub state: DeploymentState,
    pub reason: Option<String>,
    pub superseded_by: Option<i64>,
    pub cancel_requested: bool,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: i64,
    pub deployment_id: i64,
    pub name: String,
    pub state: JobState,
    pub attempt: i64,
    pub node: Option<String>,
    pub needs: Vec<String>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
}

/// One part of an attempt of a job that runs in parts: one host of a job
/// on a group of hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartResult {
    /// The host's name.
    pub part: String,
    pub started_at: Millis,
    pub finished_at: Millis,
    /// `Skipped`: not run (an earlier batch failed too often).
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    /// "exit code 3", "connection timed out after 5s", "host key mismatch…".
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub job_id: i64,
    pub job: String,
    pub attempt: i64,
    pub node: String,
    pub started_at: Millis,
    pub finished_at: Millis,
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    /// Each part's result, for a job that runs in parts.
    pub parts: Vec<PartResult>,
}

/// A job this node now holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job_id: i64,
    pub deployment_id: i64,
    pub name: String,
    pub attempt: i64,
    /// Fencing token: every later write for this attempt must carry it.
    pub fence: i64,
    pub spec: JobSpec,
    pub revision: String,
    pub environment: String,
    pub service: Option<String>,
    pub version: Option<String>,
    /// When the job became ready (for queue latency).
    pub ready_at: Millis,
    /// When the deployment's event was accepted.
    pub event_at: Millis,
}

#[derive(Debug, Clone)]
pub struct FinishedAttempt {
    /// Each part's result (a job on a group of hosts), recorded with the
    /// attempt.
    pub parts: Vec<PartResult>,
    pub job_id: i64,
    pub fence: i64,
    pub node: String,
    pub started_at: Millis,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    /// Make the job ready again at this time (a retry) instead of final.
    pub retry_at: Option<Millis>,
    /// Another node's takeover of a job whose lease ran out: written only
    /// if the lease is still out when it is written, so an owner that
    /// renewed between the reaper's read and this write keeps its job.
    pub takeover: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FinishEffect {
    /// The fencing token no longer matched: another node owns the job now,
    /// and nothing was written.
    pub stale: bool,
    pub newly_ready: u64,
    pub deployment_finished: Option<(i64, DeploymentState)>,
}

#[derive(Debug, Clone)]
pub struct Renewal {
    pub job_id: i64,
    /// False: the lease was lost (fence moved on); stop the job.
    pub held: bool,
    /// The deployment was cancelled; stop the job.
    pub cancel: bool,
}

/// A running job whose lease ran out.
#[derive(Debug, Clone)]
pub struct Expired {
    pub job_id: i64,
    pub deployment_id: i64,
    pub name: String,
    pub fence: i64,
    pub node: Option<String>,
    pub attempt: i64,
    pub started_at: Millis,
    pub spec: JobSpec,
}

#[derive(Debug, Clone)]
pub struct LogRecord {
    pub seq: i64,
    pub job: String,
    pub attempt: i64,
    pub ts: Millis,
    pub stream: String,
    pub line: String,
    pub part: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub deployment_id: i64,
    pub job_id: i64,
    pub attempt: i64,
    pub ts: Millis,
    pub stream: &'static str,
    pub line: String,
    /// The part of the job that wrote it (a host), if it runs in parts.
    pub part: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub deployments: Vec<(DeploymentState, i64)>,
    pub jobs: Vec<(JobState, i64)>,
    /// Jobs ready and waiting for a slot on any node.
    pub ready: i64,
    pub queued_deployments: i64,
}

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: String,
    pub started_at: Millis,
    pub heartbeat_at: Millis,
}

/// What a service runs in an environment: the version that last took
/// all traffic (its last good version), and the one before it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceRow {
    pub environment: String,
    pub service: String,
    pub version: String,
    pub previous_version: Option<String>,
    /// The service's spec as deployed, as the store writes it
    /// ([`spec::encode_service`], read with [`spec::decode_service`]): a restart brings back this,
    /// not whatever the config says today.
    pub spec: String,
    pub revision: String,
    pub deployment_id: i64,
    pub updated_at: Millis,
    /// The unpacked release its instances run in (tarball services).
    pub artifact_dir: Option<String>,
    /// Tarball services: the SHA-256 of `version`'s release, and of
    /// `previous_version`'s (what a rollback fetches).
    pub sha256: Option<String>,
    pub previous_sha256: Option<String>,
    /// Targets that run their own rollout: what runs, in the target's own
    /// names (an ECS task definition ARN).
    pub target_ref: Option<String>,
}

/// An API token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// JSON: environment (or "*") → role.
    pub roles: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// What [`Store::revoke_token`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Revoked,
    /// No live token has that name.
    NoSuchToken,
    /// It is the last live token with the admin role for `*`: nothing
    /// done, since without it no token could ever be made again.
    LastAdmin,
}

impl TokenRow {
    /// A live token with the admin role for every environment (`*`).
    pub fn is_root_admin(&self) -> bool {
        self.revoked_at.is_none() && serde_json::from_str::<HashMap<String, String>>(&self.roles).is_ok_and(|r| r.get("*").is_some_and(|role| role == "admin"))
    }
}

/// One action taken through the API, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Assigned by the store.
    pub id: i64,
    pub at: Millis,
    /// Who: "anonymous", "github webhook", "registry", later a token's name.
    pub actor: String,
    /// The client's address.
    pub address: String,
    /// What: "POST /api/v1/events".
    pub action: String,
    /// What it meant and what came of it ("deploy web 1.4.0 in staging →
    /// deployment 12", or the error).
    pub detail: String,
    /// The HTTP status answered.
    pub status: i64,
    /// The environment it acted in, where it acted in one.
    pub environment: Option<String>,
}

/// Which audit entries to list (all: every field `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Entries that acted in this environment.
    pub environment: Option<String>,
    /// Entries of this actor, exactly as recorded ("token alice").
    pub actor: Option<String>,
}

/// A stored event (a webhook delivery, a registry notification).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub payload: String,
    pub received_at: Millis,
    /// The deployment it started, if any.
    pub deployment_id: Option<i64>,
}

/// Something that happened to a running service outside a deployment (a
/// crashed instance restarted, a service restored when its node started).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    pub environment: String,
    pub service: String,
    pub at: Millis,
    /// `restarted`, `restart_failed`, `restored`, `restore_failed`.
    pub kind: String,
    pub message: String,
}

/// The durable state. Every method is one transaction or one statement.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "sqlite" or "postgres".
    fn backend(&self) -> &'static str;
    /// Only one node can use this store (SQLite): at start-up, every lease
    /// left by a previous process is known dead.
    fn single_node(&self) -> bool;
    async fn ping(&self) -> Result<()>;

    async fn put_revision(&self, revision: &Revision) -> Result<()>;
    async fn revision(&self, id: &str) -> Result<Option<Revision>>;

    async fn submit(&self, new: NewDeployment) -> Result<Submitted>;
    async fn deployments(&self, limit: i64, state: Option<DeploymentState>) -> Result<Vec<DeploymentRow>>;
    async fn deployment(&self, id: i64) -> Result<Option<DeploymentRow>>;
    async fn jobs(&self, deployment: i64) -> Result<Vec<JobRow>>;
    async fn attempts(&self, deployment: i64) -> Result<Vec<AttemptRow>>;
    /// Ask to cancel. `None` if there is no such deployment.
    async fn cancel(&self, id: i64) -> Result<Option<DeploymentRow>>;
    /// Waiting deployments (oldest first) with what holds them.
    async fn holds(&self) -> Result<Vec<(DeploymentRow, Hold)>>;
    async fn hold(&self, deployment: i64) -> Result<Option<Hold>>;
    /// Record an approval of a waiting deployment that needs one: false
    /// when it is not waiting (any more) or needs none.
    async fn approve(&self, deployment: i64, by: &str) -> Result<bool>;
    async fn set_waiting_for(&self, deployment: i64, what: &str) -> Result<()>;
    /// `waiting` → `queued`; false if it was no longer waiting.
    async fn release(&self, deployment: i64) -> Result<bool>;
    /// Whether a deployment on `lock_key` is waiting, queued or running.
    async fn in_flight_on(&self, lock_key: &str) -> Result<bool>;
    /// Queued deployments that may start only inside a deploy window
    /// (oldest first), with their holds.
    async fn queued_in_windows(&self) -> Result<Vec<(DeploymentRow, Hold)>>;
    /// `queued` → `waiting` again, saying why (its window closed before
    /// it could start); false if it was no longer queued.
    async fn hold_back(&self, deployment: i64, waiting_for: &str) -> Result<bool>;
    /// End a waiting deployment that can no longer go ahead, with the
    /// reason: `cancelled` (the version it promotes left its source
    /// environment) or, given `replaced_by`, `superseded` by that copy of
    /// it (submitted again on a newer config revision).
    async fn drop_waiting(&self, deployment: i64, reason: &str, replaced_by: Option<i64>) -> Result<bool>;

    async fn register_node(&self, node: &str) -> Result<()>;
    async fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// Start queued deployments whose lock is free; returns their ids.
    async fn activate(&self, node: &str, lease: Duration) -> Result<Vec<i64>>;
    async fn claim(&self, node: &str, lease: Duration, limit: i64) -> Result<Vec<ClaimedJob>>;
    /// Extend this node's leases (jobs and locks) and report lost or
    /// cancelled jobs, one answer per held job in `held`'s order.
    async fn renew(&self, node: &str, held: &[(i64, i64)], lease: Duration) -> Result<Vec<Renewal>>;
    async fn finish(&self, done: FinishedAttempt) -> Result<FinishEffect>;
    /// Record an attempt and, unless it was stale, claim one more ready
    /// job for `node` at once (the finished job's slot is free). Stores
    /// may do both in one transaction.
    async fn finish_and_claim(&self, done: FinishedAttempt, node: &str, lease: Duration) -> Result<(FinishEffect, Option<ClaimedJob>)> {
        let effect = self.finish(done).await?;
        if effect.stale {
            return Ok((effect, None));
        }
        let next = self.claim(node, lease, 1).await?.into_iter().next();
        Ok((effect, next))
    }
    /// Running jobs whose lease ended before now.
    async fn expired(&self) -> Result<Vec<Expired>>;
    /// Take over or drop lock leases whose holder stopped renewing them.
    async fn reap_locks(&self, node: &str, lease: Duration) -> Result<u64>;
    /// Treat every lease as expired now (single-node restart).
    async fn expire_all_leases(&self) -> Result<()>;

    async fn append_logs(&self, lines: &[NewLogLine]) -> Result<()>;
    async fn logs(&self, deployment: i64, job: Option<&str>, after: i64, limit: i64) -> Result<Vec<LogRecord>>;

    /// Typical duration of recent successful runs of each job in `environment`.
    async fn history(&self, environment: &str) -> Result<HashMap<String, Duration>>;
    async fn counts(&self) -> Result<Counts>;

    /// Record that `row.version` now takes all of the service's traffic;
    /// the version it replaced becomes `previous_version`.
    async fn set_service(&self, row: ServiceRow) -> Result<()>;
    async fn services(&self) -> Result<Vec<ServiceRow>>;
    async fn record_service_event(&self, event: ServiceEvent) -> Result<()>;
    /// Store an event that starts no deployment by itself (a webhook
    /// delivery). Returns its id and whether its key was seen before.
    async fn record_event(&self, event: NewEvent) -> Result<(i64, bool)>;
    /// The event stored under an idempotency key, if any (to tell a
    /// repeated request from a different one reusing its key).
    async fn event_by_key(&self, key: &str) -> Result<Option<EventRow>>;
    /// Append to the audit log (there is no way to change or delete an
    /// entry).
    async fn record_audit(&self, entry: AuditEntry) -> Result<()>;
    /// The audit log, newest first.
    async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        self.audit_filtered(&AuditFilter::default(), limit).await
    }
    /// The entries `filter` selects, newest first (at most 1,000).
    async fn audit_filtered(&self, filter: &AuditFilter, limit: i64) -> Result<Vec<AuditEntry>>;
    /// Store a new API token (by its hash). False: the name is taken.
    async fn create_token(&self, token: TokenRow) -> Result<bool>;
    /// Every token, revoked ones included, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRow>>;
    /// The live (not revoked) token with this hash.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>>;
    /// Revoke by name, unless it is the last live admin token for `*`
    /// (checked and revoked in one transaction, so two admins revoking
    /// each other at once cannot both succeed).
    async fn revoke_token(&self, name: &str) -> Result<Revoked>;
    /// The newest events whose kind starts with one of `prefixes`
    /// (`github.`, `registry.`), newest first.
    async fn events(&self, prefixes: &[&str], limit: i64) -> Result<Vec<EventRow>>;
    /// Events of exactly this kind, newest first (indexed).
    async fn events_of_kind(&self, kind: &str, limit: i64) -> Result<Vec<EventRow>>;
    /// The events with these ids (those that exist), in no set order.
    async fn events_by_id(&self, ids: &[i64]) -> Result<Vec<EventRow>>;
    /// Newest first.
    async fn service_events(&self, environment: &str, service: &str, limit: i64) -> Result<Vec<ServiceEvent>>;
    /// Take the named lease for `holder`, or renew it, for `ttl` from now:
    /// true if `holder` has it now (it was free, expired, or already
    /// `holder`'s). One statement, so two nodes asking at once never both
    /// get it.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;
    /// Give the lease up, if `holder` has it (a node that stops cleanly
    /// hands over at once rather than after its lease lapses).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
}

/// Open the store a URL names: `sqlite://PATH` or `postgres://…`.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(sql::SqlStore::open(url).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backoff_ms: u64, max_ms: u64) -> JobSpec {
        JobSpec {
            command: crate::config::Command::Argv(vec!["true".into()]),
            timeout_ms: 1000,
            kill_grace_ms: 1000,
            retry_attempts: 10,
            retry_any: false,
            retry_exit_codes: vec![75],
            retry_backoff_ms: backoff_ms,
            retry_max_backoff_ms: max_ms,
            idempotent: false,
            env: Default::default(),
            artifact: None,
            secrets: Default::default(),
            secret_files: Default::default(),
            target: None,
            settings: Default::default(),
            once_per_environment: false,
        }
    }

    /// Delay before attempt n is drawn from [d/2, d] with d = backoff ×
    /// 2^(n-2), capped at max_backoff: it grows, it is capped, it jitters.
    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let s = spec(1000, 16_000);
        for (attempt, full) in [(2u32, 1000u64), (3, 2000), (4, 4000), (5, 8000), (6, 16_000), (7, 16_000), (40, 16_000)] {
            let draws: Vec<u64> = (0..200).map(|_| s.backoff(attempt).as_millis() as u64).collect();
            assert!(draws.iter().all(|d| (full / 2..=full).contains(d)), "attempt {attempt}: {draws:?} outside [{}, {full}]", full / 2);
            let distinct: std::collections::HashSet<_> = draws.iter().collect();
            assert!(distinct.len() > 10, "attempt {attempt}: no jitter: {distinct:?}");
        }
    }

    /// A database error with just a code, as a driver reports it.
    #[derive(Debug)]
    struct Coded(&'static str);
    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }
    impl std::error::Error for Coded {}
    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "database or disk is full"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    // Issue 13: a full disk is an unavailable store (503, exit 4), said as
    // such; a constraint violation is not.
    #[test]
    fn issue13_disk_full_and_io_errors_are_an_unavailable_store() {
        let classify = |code: &'static str| StoreError::query("store revision")(sqlx::Error::Database(Box::new(Coded(code))));
        // SQLITE_FULL, SQLITE_IOERR, SQLITE_IOERR_WRITE (778), _FSYNC (1034);
        // PostgreSQL's disk_full and another class-53 shortage.
        for (code, says) in [
            ("13", "disk holding the SQLite store is full"),
            ("10", "I/O error"),
            ("778", "I/O error"),
            ("1034", "I/O error"),
            ("53100", "disk of the PostgreSQL server is full"),
            ("53200", "out of resources"),
        ] {
            match classify(code) {
                StoreError::Unavailable(m) => assert!(m.contains(says) && m.starts_with("store revision: "), "{code}: {m}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        assert!(disk_trouble().is_some_and(|m| m.contains("full") || m.contains("resources")), "remembered for /healthz");
        // Not disk trouble: a unique violation (SQLite 2067, PostgreSQL
        // 23505), a syntax error (1), a PostgreSQL code ending like an
        // SQLite I/O error.
        for code in ["2067", "23505", "1", "22010"] {
            assert!(matches!(classify(code), StoreError::Query { .. }), "{code}");
        }
        assert!(matches!(classify("53300"), StoreError::Unavailable(_)), "too many connections stays unavailable");
    }

    #[test]
    fn only_declared_failures_are_retryable() {
        let s = spec(1000, 1000);
        assert!(s.retryable(Some(75)));
        assert!(!s.retryable(Some(1)));
        assert!(!s.retryable(None), "a timeout is retryable only under on = \"any\"");
        let any = JobSpec { retry_any: true, ..s };
        assert!(any.retryable(None) && any.retryable(Some(1)));
    }
}
