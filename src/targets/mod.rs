//! Where jobs run, behind the [`Target`] trait.
//!
//! **Architecture Invariant:** the scheduler never sees a concrete target:
//! it hands a [`JobRequest`] to a `dyn Target` and gets a [`RunResult`]
//! back. Output goes through an [`OutputSink`] line by line; bounding it is
//! the scheduler's job, not the target's.
//!
//! A target also runs service *instances* ([`Target::start_instance`],
//! [`Instance`]); health checks, the proxy and rollouts are the service
//! manager's (`crate::service`), the same for every target.
//!
//! Targets live in `targets/<name>/`: `local` (processes on this node) for
//! now; Docker, SSH and ECS follow.

pub mod docker;
pub mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::secret::{Credentials, Secret};
use crate::store::{JobSpec, Outcome};

pub use local::LocalTarget;

/// Everything a target needs to run one attempt of one job.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub deployment_id: i64,
    pub job: String,
    pub attempt: i64,
    pub spec: JobSpec,
    /// The materialized revision: the job's working directory.
    pub workdir: PathBuf,
    /// Values for `{placeholder}`s in argv commands and `SLIPWAY_*`
    /// environment variables (version, service, env, deployment, revision).
    pub values: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Lines of output, in order per stream.
pub type OutputSink = mpsc::Sender<(Stream, String)>;

/// How an attempt ended, as the target saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled`.
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// For people: "exit code 3", "killed by signal 9", "timed out after 5m".
    pub reason: Option<String>,
}

/// One instance of a service to start: everything already resolved
/// (placeholders filled, port chosen).
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    pub service: String,
    pub environment: String,
    pub version: String,
    /// The port the instance must listen on (on 127.0.0.1 for `local`).
    pub port: u16,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// Container targets: the image to run (by digest once pinned) and
    /// the port inside the container (published on `port`).
    pub image: Option<String>,
    pub container_port: Option<u16>,
    /// Container targets: limits (bytes; thousandths of a CPU).
    pub memory_bytes: Option<u64>,
    pub millicpus: Option<u32>,
    /// The deployment that rolled this version out (for labels).
    pub deployment_id: i64,
    /// A digest of the service's spec: a restart adopts only instances
    /// started from the spec it records (not a same-version redeploy with
    /// other settings that was cut short).
    pub spec_digest: String,
    /// Environment variables whose values are secrets (kept apart from
    /// `env` so that no `Debug` of a request ever shows them).
    pub secret_env: BTreeMap<String, Secret>,
    /// Container targets: files to place before the start (mode 0444).
    pub secret_files: BTreeMap<String, Secret>,
}

/// The targets a node can start service instances on, by name. A target
/// that needs a connection (the Docker Engine) is connected on first use
/// and again after a failure, so an Engine that comes back resumes work.
#[async_trait]
pub trait Targets: Send + Sync + 'static {
    async fn get(&self, name: &str) -> Result<std::sync::Arc<dyn Target>, String>;

    /// The node's restore has adopted what it could: what dead Slipway
    /// processes left on the targets may go now.
    async fn after_restore(&self) {}

    /// Still restoring: what looks orphaned may be about to be adopted.
    fn restoring(&self) -> bool {
        false
    }
}

/// This node's targets: `local` always; `docker` when its Engine answers.
pub struct NodeTargets {
    local: std::sync::Arc<dyn Target>,
    docker: tokio::sync::Mutex<Option<std::sync::Arc<dyn Target>>>,
    /// Until the node's restore is done, a first connection does not sweep:
    /// the restore adopts first (see [`Targets::after_restore`]).
    restored: std::sync::atomic::AtomicBool,
    /// The installation's container scope (see `crate::process::scope_of_store`).
    scope: String,
}

impl NodeTargets {
    pub fn new(local: std::sync::Arc<dyn Target>) -> Self {
        NodeTargets { local, docker: tokio::sync::Mutex::new(None), restored: std::sync::atomic::AtomicBool::new(true), scope: String::new() }
    }

    /// Containers of this installation carry (and only they are touched
    /// by) this scope.
    pub fn scoped(mut self, scope: String) -> Self {
        self.scope = scope;
        self
    }

    /// For a node that restores its services: sweeping waits for that.
    pub fn restoring(self) -> Self {
        self.restored.store(false, std::sync::atomic::Ordering::SeqCst);
        self
    }
}

#[async_trait]
impl Targets for NodeTargets {
    async fn get(&self, name: &str) -> Result<std::sync::Arc<dyn Target>, String> {
        match name {
            "local" => Ok(self.local.clone()),
            "docker" => {
                let cached = self.docker.lock().await.clone();
                if let Some(t) = cached {
                    // Kept across Engine outages (it remembers what it
                    // adopted); asked first, so an Engine that went away is
                    // reported as such, not as whatever call failed next.
                    t.check().await?;
                    return Ok(t);
                }
                let mut d = self.docker.lock().await;
                if let Some(t) = &*d {
                    return Ok(t.clone()); // connected meanwhile
                }
                let t: std::sync::Arc<dyn Target> = std::sync::Arc::new(docker::DockerTarget::connect().await.map_err(|e| e.to_string())?.scoped(&self.scope));
                // What a dead Slipway on this host left running goes first
                // (after the restore had its chance to adopt it).
                if self.restored.load(std::sync::atomic::Ordering::SeqCst) {
                    t.sweep_orphans().await;
                }
                *d = Some(t.clone());
                Ok(t)
            }
            other => Err(format!("unknown target {other:?}")),
        }
    }

    async fn after_restore(&self) {
        let connected = self.docker.lock().await.clone();
        self.restored.store(true, std::sync::atomic::Ordering::SeqCst);
        match connected {
            Some(t) => {
                t.sweep_orphans().await;
            }
            // Connect now (a first connection sweeps), so that no later
            // request — a dry-run `gc` — is what removes them. Without an
            // Engine this fails at once and the first later use sweeps.
            None => {
                let _ = self.get("docker").await;
            }
        }
    }

    fn restoring(&self) -> bool {
        !self.restored.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The instances a restarted node may take over (see [`Target::adopt`]).
#[derive(Debug, Clone)]
pub struct Adoptable<'a> {
    pub environment: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    /// `image@sha256:…` for container targets.
    pub image: Option<&'a str>,
    pub spec_digest: &'a str,
}

/// What `gc` must leave alone.
#[derive(Debug, Clone, Default)]
pub struct Keep {
    /// Image repositories Slipway deploys (only these are collected).
    pub repositories: std::collections::BTreeSet<String>,
    /// `sha256:…` digests a recorded service runs or could roll back to.
    pub digests: std::collections::BTreeSet<String>,
}

/// Things a target holds that nothing needs (see [`Target::garbage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Garbage {
    pub containers: Vec<GarbageItem>,
    pub images: Vec<GarbageItem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GarbageItem {
    pub id: String,
    /// For people: "web 2.0 (staging), left by Slipway pid 1234".
    pub what: String,
}

/// Lines of an instance's output kept for the record of a failed rollout.
pub const KEEP_LINES: usize = 40;

/// What every target's instance tracks the same way: how it ended (once
/// it has) and its last lines of output. The target's watcher holds the
/// [`ExitSender`] and the writing side; the instance answers
/// [`Instance::exit`], [`Instance::exited`] and [`Instance::last_output`]
/// from here.
#[derive(Clone)]
pub struct Lifeline {
    exit: tokio::sync::watch::Receiver<Option<String>>,
    output: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

/// Keeps an instance's last lines (see [`Lifeline::keeper`]).
#[derive(Clone)]
pub struct LineKeeper(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl LineKeeper {
    pub fn push_line(&self, line: String) {
        if let Ok(mut o) = self.0.lock() {
            if o.len() >= KEEP_LINES {
                o.pop_front();
            }
            o.push_back(line);
        }
    }
}

/// Announces how an instance ended, once.
pub struct ExitSender(tokio::sync::watch::Sender<Option<String>>);

impl ExitSender {
    pub fn send(self, why: String) {
        let _ = self.0.send(Some(why));
    }

    /// Nobody holds the instance any more: its watcher may give up.
    pub fn abandoned(&self) -> bool {
        self.0.is_closed()
    }
}

impl Lifeline {
    pub fn new() -> (Lifeline, ExitSender) {
        let (tx, exit) = tokio::sync::watch::channel(None);
        (Lifeline { exit, output: Default::default() }, ExitSender(tx))
    }

    /// Keep a line, dropping the oldest beyond [`KEEP_LINES`].
    pub fn push_line(&self, line: String) {
        self.keeper().push_line(line)
    }

    /// The writing side of the kept lines alone: a watcher holding it does
    /// not keep the instance "held" (see [`ExitSender::abandoned`]).
    pub fn keeper(&self) -> LineKeeper {
        LineKeeper(self.output.clone())
    }

    pub fn exit(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    pub async fn exited(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(Option::is_some).await;
    }

    pub fn last_output(&self) -> Vec<String> {
        self.output.lock().map(|o| o.iter().cloned().collect()).unwrap_or_default()
    }
}

/// A running instance of a service, as its target sees it.
#[async_trait]
pub trait Instance: Send + Sync + 'static {
    /// For people and records: "pid 1234", a container id.
    fn id(&self) -> String;
    /// Where the proxy and health checks reach it.
    fn addr(&self) -> std::net::SocketAddr;
    /// How it ended and its last output, kept by the target's watcher.
    fn lifeline(&self) -> &Lifeline;
    /// How it ended ("exit code 1", "killed by signal 9"), once it has.
    fn exit(&self) -> Option<String> {
        self.lifeline().exit()
    }
    /// Resolves once the instance has ended, for whatever reason.
    async fn exited(&self) {
        self.lifeline().exited().await
    }
    /// Its last lines of output (stdout and stderr interleaved).
    fn last_output(&self) -> Vec<String> {
        self.lifeline().last_output()
    }
    /// SIGTERM (or the target's equivalent), then a kill after `grace`.
    /// Returns once it has ended.
    async fn stop(&self, grace: std::time::Duration);
}

#[async_trait]
pub trait Target: Send + Sync + 'static {
    /// Start one instance of a service. An error says why, for people
    /// ("cannot start \"./server\": No such file or directory").
    async fn start_instance(&self, _request: InstanceRequest) -> Result<std::sync::Arc<dyn Instance>, String> {
        Err("this target cannot run service instances".into())
    }

    /// Pin `reference` (`image:tag`) to what it names now: the image's
    /// digest (hex of its SHA-256). Targets without images answer None.
    async fn resolve(&self, _reference: &str, _auth: Option<&Credentials>) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// Make `reference` (`image@sha256:…`) available before instances
    /// start (a pull). Targets without images have nothing to do.
    async fn prepare(&self, _reference: &str, _auth: Option<&Credentials>, _output: &OutputSink, _cancel: &CancellationToken) -> Result<(), String> {
        Ok(())
    }

    /// Run one attempt to the end. Must return within the spec's timeout
    /// plus its kill grace, and promptly once `cancel` fires.
    async fn run(&self, request: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult;

    /// Whether the target can be used now (the Docker Engine answers).
    /// The error says what is unreachable, for people.
    async fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Take over the running instances of `service` at `version` (and,
    /// when `image` names a digest, that image) that a Slipway on this host
    /// left behind when it died: a restart then keeps them instead of
    /// replacing them. Only instances carrying this target's marks are
    /// considered; those returned are this process's from now on.
    async fn adopt(&self, _wanted: &Adoptable<'_>) -> Vec<std::sync::Arc<dyn Instance>> {
        vec![]
    }

    /// What `gc` would remove here: things this target made that nothing
    /// live holds (instances of dead Slipway processes nobody adopted) and
    /// artifacts of `keep.repositories` that no environment runs or could
    /// roll back to.
    async fn garbage(&self, _keep: &Keep) -> Result<Garbage, String> {
        Ok(Garbage::default())
    }

    /// Remove what [`Target::garbage`] found; returns what is gone.
    async fn collect(&self, _garbage: &Garbage) -> Garbage {
        Garbage::default()
    }

    /// Stop what jobs of a dead Slipway process of this installation left
    /// running on this target. Called when a node starts, before it reaps
    /// expired leases, and periodically. Returns how many it stopped.
    async fn sweep_orphans(&self) -> usize {
        0
    }

    /// Before attempt `attempt` (> 1) of a job starts here: end what this
    /// target can see of earlier attempts of the same job that may still
    /// run (those of a dead Slipway), and wait, at most `within`, for those
    /// a live one is still stopping. `Ok(n)`: go ahead (`n` processes of
    /// earlier attempts were found); `Err`: the attempt's result instead
    /// (they did not end, or `cancel` fired).
    async fn end_earlier_attempts(
        &self,
        _deployment_id: i64,
        _job: &str,
        _attempt: i64,
        _within: std::time::Duration,
        _cancel: &CancellationToken,
    ) -> Result<usize, RunResult> {
        Ok(0)
    }
}

/// Longest line kept whole; longer ones are cut into pieces of this size
/// so one line without a newline cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
