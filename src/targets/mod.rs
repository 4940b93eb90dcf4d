//! Where jobs and service instances run: the target seam.
//!
//! A target is a folder `targets/<name>/` holding a [`TargetKind`] (its
//! name, its [`Capabilities`], the `[[service]]` keys it adds and how it
//! reads them, how a node builds it) and a runtime [`Target`]; the
//! `registry!` line below lists every target. Nothing outside a target's
//! folder names it: the config asks the kind for its keys and settings,
//! the executor (`crate::executor`) routes jobs by the spec's target name,
//! the service manager starts instances through `dyn Target` and reaches
//! them at the [`Instance::addr`] the target gives.
//!
//! **Architecture Invariant:** `src/scheduler/`, `src/service/` and
//! `src/executor/` name no concrete target (`tests/seam.rs` checks it).
//! What differs between targets is asked of [`Capabilities`], never of a
//! name.
//!
//! Two rollout shapes: targets whose instances Slipway starts, checks and
//! switches one by one ([`Target::start_instance`]: local, docker), and
//! targets that run their own rollout, which Slipway starts, watches,
//! judges and reverts ([`Target::rollout`]: SSH hosts, each behind its own
//! supervisor; ECS, whose deployments Slipway judges). See
//! docs/design/targets.md; docs/adding-a-target.md is the recipe.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::secret::{Credentials, Secret};
use crate::store::{JobSpec, Outcome};

pub mod ports;

pub use local::LocalTarget;

/// The registry: every target, one name per folder. Adding a target is
/// adding its name here.
macro_rules! registry {
    ($($name:ident),+ $(,)?) => {
        $(pub mod $name;)+
        /// Every registered kind of target, in registration order.
        pub fn kinds() -> &'static [&'static dyn TargetKind] {
            static KINDS: &[&dyn TargetKind] = &[$(&$name::KIND),+];
            KINDS
        }
    };
}

registry!(local, docker, ssh, ecs);

/// The target a spec names when it names none.
pub const DEFAULT: &str = "local";

/// The kind registered under `name`.
pub fn kind(name: &str) -> Option<&'static dyn TargetKind> {
    kinds().iter().copied().find(|k| k.name() == name)
}

/// What a kind of target can do. The rest of Slipway asks these, never a
/// target's name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Runs a job's commands (a service's migration among them).
    pub runs_jobs: bool,
    /// Runs instances of managed services ([`Target::start_instance`]).
    pub runs_instances: bool,
    /// Runs images: a service's versions are tags of its `image`, pinned
    /// to a digest when a deploy is accepted and pulled before they run
    /// ([`Target::resolve`], [`Target::prepare`]).
    pub uses_images: bool,
    /// Places files from secrets in each instance (`secret_files`).
    pub secret_files: bool,
    /// Runs its own rollout, which Slipway starts, watches, judges and
    /// reverts ([`Target::rollout`]) instead of switching instances itself.
    pub own_rollout: bool,
    /// Runs on machines other than the node's.
    pub remote: bool,
    /// Slipway's own proxy serves the service on its `listen` address (on
    /// this node, or on each host). Without it (ECS: AWS's load balancer)
    /// a service has no `listen`.
    pub proxied: bool,
    /// An attempt cut off by a node's death is found again on the target
    /// and followed, never run twice (ECS one-off tasks, by their tags):
    /// a service's steps on it are retried after an interruption as if
    /// idempotent.
    pub resumes_jobs: bool,
    /// Keeps a service's images in a registry of its own that the Docker
    /// Registry HTTP API does not reach (ECS: ECR): registry retention
    /// lists and deletes them through the target
    /// ([`Target::registry_images`], [`Target::delete_registry_images`]).
    pub own_registry: bool,
}

/// A key a target adds to `[[service]]`, for the unknown-key check, the
/// JSON Schema and the docs.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    /// TOML type, for people and the schema: "integer", "string", "float".
    pub kind: &'static str,
    pub doc: &'static str,
}

/// A target's own settings of one service, as its [`TargetKind`] read
/// them from `[[service]]`; opaque to everything else. Stored with the
/// service's spec, so they must stay readable by later builds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Settings(serde_json::Value);

impl Settings {
    pub fn of<T: Serialize>(value: &T) -> Settings {
        Settings(serde_json::to_value(value).unwrap_or_default())
    }

    /// The settings as the target's own type.
    pub fn get<T: serde::de::DeserializeOwned>(&self) -> Result<T, TargetError> {
        serde_json::from_value(self.0.clone()).map_err(|e| TargetError::new(TargetErrorKind::Refused, format!("unreadable target settings: {e}")))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_null() || self.0.as_object().is_some_and(|o| o.is_empty())
    }
}

/// A top-level table of `slipway.toml` that a kind owns (`[[hosts]]`):
/// its keys are checked like any table's; the kind reads it once per
/// config ([`TargetKind::read_tables`]).
#[derive(Debug, Clone, Copy)]
pub struct TableKeys {
    pub name: &'static str,
    /// `[[name]]` (an array of tables) rather than `[name]`.
    pub array: bool,
    pub keys: &'static [Key],
    pub doc: &'static str,
}

/// What a kind reads its own top-level tables from.
pub struct ConfigTables<'a, 'i> {
    /// The whole document, spans kept.
    pub doc: &'a toml::Spanned<toml::de::DeTable<'i>>,
    /// The config's `[secret.*]`s, by name: tables name them.
    pub secrets: &'a BTreeMap<String, crate::config::secret::SecretRef>,
    pub problems: &'a mut Vec<crate::config::Problem>,
}

impl<'i> ConfigTables<'_, 'i> {
    /// Each table named `name` (one, or each element of an array of
    /// tables), spans kept.
    pub fn tables(&self, name: &str) -> Vec<toml::Spanned<toml::de::DeTable<'i>>> {
        crate::config::tables_named(self.doc, name)
    }

    /// A table's keys as `T`; a value of the wrong type is a problem at its
    /// place, and `None`.
    pub fn read<T: serde::de::DeserializeOwned>(&mut self, table: &toml::Spanned<toml::de::DeTable<'_>>) -> Option<T> {
        read_table(table, self.problems)
    }

    pub fn problem(&mut self, p: crate::config::Problem) {
        self.problems.push(p);
    }
}

fn read_table<T: serde::de::DeserializeOwned>(table: &toml::Spanned<toml::de::DeTable<'_>>, problems: &mut Vec<crate::config::Problem>) -> Option<T> {
    let de = toml::de::Deserializer::from(table.clone());
    match T::deserialize(de) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(crate::config::type_problem(&e));
            None
        }
    }
}

/// One `[[service]]` or `[[job]]` table, as a target's kind reads its keys
/// from it.
pub struct KeyTable<'a, 'i> {
    /// For messages: `service "web"`, `job "restart"`.
    pub owner: &'a str,
    /// The table, spans kept (relative to the whole file).
    pub table: &'a toml::Spanned<toml::de::DeTable<'i>>,
    /// What the kind read from its own top-level tables
    /// ([`TargetKind::read_tables`]).
    pub kind: &'a Settings,
    pub problems: &'a mut Vec<crate::config::Problem>,
}

impl KeyTable<'_, '_> {
    /// This target's keys as `T` (a struct of `Option<Spanned<_>>`s that
    /// ignores other keys); a value of the wrong type is a problem at its
    /// place, and `None`.
    pub fn read<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        read_table(self.table, self.problems)
    }

    pub fn problem(&mut self, p: crate::config::Problem) {
        self.problems.push(p);
    }
}

/// What a node gives a target when it builds it.
#[derive(Debug, Clone, Default)]
pub struct NodeContext {
    /// The installation (see `crate::process::installation_of_store`):
    /// what a target starts carries it, and only its orphans are swept.
    /// Empty: in-process tests and benchmarks (nothing is ever swept).
    pub installation: String,
}

/// A kind of target, registered with `registry!`: its config, its
/// capabilities, and how a node builds its runtime [`Target`].
#[async_trait]
pub trait TargetKind: Send + Sync + 'static {
    /// `target = "<name>"` in `[[service]]`.
    fn name(&self) -> &'static str;
    /// One line for people: "processes on this node".
    fn about(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// The `[[service]]` keys this target adds (beyond the common ones).
    fn service_keys(&self) -> &'static [Key] {
        &[]
    }
    /// Read this target's keys of a service; problems go to
    /// `table.problems`, each at its place, and the answer is then `None`.
    fn service_settings(&self, _table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        Some(Settings::default())
    }
    /// The `[[job]]` keys this target adds. A job that uses them and names
    /// no target runs on this one.
    fn job_keys(&self) -> &'static [Key] {
        &[]
    }
    /// Read this target's keys of a job, like [`TargetKind::service_settings`].
    fn job_settings(&self, _table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        Some(Settings::default())
    }
    /// The top-level tables this kind owns (`[[hosts]]`).
    fn tables(&self) -> &'static [TableKeys] {
        &[]
    }
    /// Read this kind's top-level tables, once per config; what it returns
    /// is handed to [`TargetKind::service_settings`] and
    /// [`TargetKind::job_settings`] as `table.kind`.
    fn read_tables(&self, _tables: &mut ConfigTables<'_, '_>) -> Option<Settings> {
        Some(Settings::default())
    }
    /// How many rounds a service's rollout on this target takes one after
    /// another (hosts batch by batch): its timeout grows with them.
    fn rollout_rounds(&self, _settings: &Settings) -> u32 {
        1
    }
    /// A rollout job's timeout, for targets whose rollout is not Slipway's
    /// instance by instance (ECS: its deadline and the revert). `None`:
    /// long enough for every instance to be replaced one by one.
    fn rollout_timeout(&self, _spec: &crate::config::service::ServiceSpec) -> Option<std::time::Duration> {
        None
    }
    /// Whether the scheduler sweeps this kind's target at its start and
    /// with every reap (cheap sweeps of job processes, which must be gone
    /// before a lease runs out) rather than only when it is first built
    /// and after the node's restore (an Engine listing).
    fn sweeps_with_reaps(&self) -> bool {
        false
    }
    /// The node's runtime target. Called on first use and again after it
    /// failed (an Engine that was down), never concurrently for a kind.
    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError>;
    /// The target's side on a machine it deploys to, run there by Slipway
    /// itself as `slipway agent <kind> ARGS…` (SSH hosts: supervise a
    /// job's process, receive uploads). Returns the process's exit code;
    /// `Err` says why for people. Kinds without one refuse.
    async fn agent(&self, _args: Vec<String>) -> Result<u8, String> {
        Err(format!("target {:?} has no agent", self.name()))
    }
}

/// Why a target could not do something. `kind` is for code (a port taken
/// is retried on another port; an unreachable target is reported as
/// such); the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    pub kind: TargetErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetErrorKind {
    /// The target cannot be reached (the Engine is down, a host is dead).
    Unavailable,
    /// The port chosen for an instance was taken before it bound it.
    PortTaken,
    /// What was asked for does not exist (an image, a tag).
    NotFound,
    /// The request cannot work as given (bad settings, refused
    /// credentials, a missing image in the spec).
    Refused,
    /// This target does not do that.
    Unsupported,
    /// Anything else.
    Failed,
}

impl TargetError {
    pub fn new(kind: TargetErrorKind, message: impl Into<String>) -> Self {
        TargetError { kind, message: message.into() }
    }
}

impl From<String> for TargetError {
    fn from(message: String) -> Self {
        TargetError { kind: TargetErrorKind::Failed, message }
    }
}

impl From<&str> for TargetError {
    fn from(message: &str) -> Self {
        TargetError { kind: TargetErrorKind::Failed, message: message.into() }
    }
}

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
    /// Why the attempt's `cancel` fired, once it has.
    pub stopping: Stopping,
    /// The attempt before this one was interrupted (its node died or
    /// stopped), not failed: a target that finds that attempt's work
    /// ([`Capabilities::resumes_jobs`]) takes its result, whatever it was,
    /// rather than running it again. Set only for such targets.
    pub resuming: bool,
}

/// Why an attempt is being stopped, said before its cancel fires: handed
/// over (this node stops, or another node took the job over) rather than
/// cancelled or timed out. A target whose work outlives the node (an ECS
/// task) then leaves it running for the next attempt to follow.
#[derive(Debug, Clone, Default)]
pub struct Stopping(Arc<std::sync::OnceLock<()>>);

impl Stopping {
    pub fn hand_over(&self) {
        let _ = self.0.set(());
    }

    pub fn handed_over(&self) -> bool {
        self.0.get().is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// One line of a job's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
    /// Which part of the job wrote it, for targets that run a job in parts
    /// (the host, for a job on a group of hosts); `None`: the job itself.
    pub part: Option<String>,
    /// The line goes on in the next piece of the same stream and part: it
    /// was longer than [`MAX_LINE_BYTES`] and cut ([`LineCutter`]). Whoever
    /// masks secrets joins across the cut, or a secret cut in two would
    /// pass as two unmasked halves.
    pub cut: bool,
}

impl From<(Stream, String)> for Line {
    fn from((stream, text): (Stream, String)) -> Self {
        Line { stream, text, part: None, cut: false }
    }
}

/// Lines of output, in order per stream (and part).
pub type OutputSink = mpsc::Sender<Line>;

/// How an attempt ended, as the target saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled`.
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// For people: "exit code 3", "killed by signal 9", "timed out after 5m".
    pub reason: Option<String>,
    /// Targets that run a job in parts (a group of hosts): each part's
    /// result, recorded with the attempt.
    pub parts: Vec<crate::store::PartResult>,
}

impl RunResult {
    pub fn failed(reason: impl Into<String>) -> Self {
        RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(reason.into()), parts: Vec::new() }
    }
}

/// One instance of a service to start: everything resolved but where it
/// listens, which the target chooses ([`InstanceRequest::filled`]).
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    pub service: String,
    pub environment: String,
    pub version: String,
    /// Argv and environment with every placeholder filled but `{port}`.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// Image targets: the image to run, by digest once pinned.
    pub image: Option<String>,
    /// The target's own settings of the service ([`TargetKind::service_settings`]).
    pub settings: Settings,
    /// The deployment that rolled this version out (for labels).
    pub deployment_id: i64,
    /// A digest of the service's spec: a restart adopts only instances
    /// started from the spec it records (not a same-version redeploy with
    /// other settings that was cut short).
    pub spec_digest: String,
    /// Environment variables whose values are secrets (kept apart from
    /// `env` so that no `Debug` of a request ever shows them).
    pub secret_env: BTreeMap<String, Secret>,
    /// Targets with [`Capabilities::secret_files`]: files to place before
    /// the start (mode 0444).
    pub secret_files: BTreeMap<String, Secret>,
}

impl InstanceRequest {
    /// Argv and environment with `{port}` filled: the port the instance
    /// listens on, as it sees it (inside a container, the container's).
    pub fn filled(&self, port: u16) -> (Vec<String>, BTreeMap<String, String>) {
        let p = port.to_string();
        let fill = |s: &String| s.replace("{port}", &p);
        (self.argv.iter().map(fill).collect(), self.env.iter().map(|(k, v)| (k.clone(), fill(v))).collect())
    }
}

/// A node's targets, by name, built on first use from their kinds (and
/// again after a failure, so an Engine that comes back resumes work).
pub struct Targets {
    node: NodeContext,
    /// The targets built so far, by kind. A plain lock, never held across
    /// an await: reading it never waits for a connection in progress.
    built: std::sync::Mutex<HashMap<&'static str, Arc<dyn Target>>>,
    /// One build at a time per kind (held across the connection): a slow
    /// connection to one target never holds up another, nor a reader.
    building: HashMap<&'static str, tokio::sync::Mutex<()>>,
    /// Targets given ready-made (tests): used as they are, never rebuilt.
    given: HashMap<String, Arc<dyn Target>>,
    /// Made by [`Targets::only`]: the one given target answers every name.
    single: bool,
    /// Until the node's restore is done, a first connection does not sweep:
    /// the restore adopts first (see [`Targets::after_restore`]).
    restored: AtomicBool,
}

/// How long [`Targets::start`] waits for a target to be built; one that
/// takes longer (an Engine that hangs) is built on first use instead.
const START_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

impl Targets {
    pub fn new(node: NodeContext) -> Self {
        let building = kinds().iter().map(|k| (k.name(), tokio::sync::Mutex::new(()))).collect();
        Targets { node, built: Default::default(), building, given: HashMap::new(), single: false, restored: AtomicBool::new(true) }
    }

    /// Only `target`, under `name`, and asked for any other name it answers
    /// that target too (in-process tests and benchmarks with one target).
    pub fn only(name: &str, target: Arc<dyn Target>) -> Self {
        Targets { single: true, ..Self::exactly(name, target) }
    }

    /// Only `target`, under `name`; any other name is unknown.
    pub fn exactly(name: &str, target: Arc<dyn Target>) -> Self {
        Targets {
            node: NodeContext::default(),
            built: Default::default(),
            building: HashMap::new(),
            given: HashMap::from([(name.to_string(), target)]),
            single: false,
            restored: AtomicBool::new(true),
        }
    }

    /// `target` under `name`, instead of building that kind (and no longer
    /// one target for every name).
    pub fn with(mut self, name: &str, target: Arc<dyn Target>) -> Self {
        self.given.insert(name.to_string(), target);
        self.single = false;
        self
    }

    /// For a node that restores its services: sweeping waits for that.
    pub fn restoring(self) -> Self {
        self.restored.store(false, Ordering::SeqCst);
        self
    }

    /// Still restoring: what looks orphaned may be about to be adopted.
    pub fn is_restoring(&self) -> bool {
        !self.restored.load(Ordering::SeqCst)
    }

    fn cached(&self, name: &str) -> Option<Arc<dyn Target>> {
        self.built.lock().ok().and_then(|b| b.get(name).cloned())
    }

    /// The target `name`, built (connected) if it is not yet. The error
    /// says what is unreachable, for people.
    pub async fn get(&self, name: &str) -> Result<Arc<dyn Target>, TargetError> {
        if let Some(t) = self.given.get(name) {
            return Ok(t.clone());
        }
        if let (true, Some(t)) = (self.single, self.given.values().next()) {
            return Ok(t.clone());
        }
        let (Some(lock), Some(kind)) = (self.building.get(name), kind(name)) else {
            return Err(TargetError::new(TargetErrorKind::Unsupported, format!("unknown target {name:?}")));
        };
        if let Some(t) = self.cached(name) {
            // Kept across outages (it remembers what it adopted); asked
            // first, so a target that went away is reported as such, not as
            // whatever call failed next.
            t.check().await?;
            return Ok(t);
        }
        let t = {
            let _building = lock.lock().await;
            if let Some(t) = self.cached(name) {
                return Ok(t); // built meanwhile
            }
            let t = kind.build(&self.node).await?;
            if let Ok(mut b) = self.built.lock() {
                b.insert(kind.name(), t.clone());
            }
            t
        };
        // What a dead Slipway of this installation left goes (after the
        // restore had its chance to adopt it).
        if self.restored.load(Ordering::SeqCst) {
            t.sweep_orphans().await;
        }
        Ok(t)
    }

    /// Every target this node has built (or was given), without waiting
    /// for one being built.
    pub fn built(&self) -> Vec<(String, Arc<dyn Target>)> {
        let mut out: Vec<(String, Arc<dyn Target>)> = self.given.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        if let Ok(b) = self.built.lock() {
            out.extend(b.iter().map(|(n, t)| (n.to_string(), t.clone())));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// At the scheduler's start: build the targets its sweeps cover
    /// ([`TargetKind::sweeps_with_reaps`]), side by side and each within
    /// `START_WITHIN` (3 s). The others (an Engine) are built on first use
    /// or after the restore, not on the start's path.
    pub async fn start(&self) {
        let names: Vec<&'static str> = kinds().iter().filter(|k| k.sweeps_with_reaps() && !self.given.contains_key(k.name())).map(|k| k.name()).collect();
        let builds = names.iter().map(|name| async move {
            match tokio::time::timeout(START_WITHIN, self.get(name)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::info!(target = name, error = %e, "target not available yet; tried again on first use"),
                Err(_) => tracing::info!(target = name, "target not built within {START_WITHIN:?}; tried again on first use"),
            }
        });
        futures_util::future::join_all(builds).await;
    }

    /// The node's restore has adopted what it could: what dead Slipway
    /// processes left on the targets may go now. A target not built yet is
    /// built now (a first build sweeps), so that no later request (a
    /// dry-run `gc`) is what removes it.
    pub async fn after_restore(&self) {
        let built = self.built();
        self.restored.store(true, Ordering::SeqCst);
        for (_, t) in &built {
            t.sweep_orphans().await;
        }
        for k in kinds() {
            if !built.iter().any(|(n, _)| n == k.name()) {
                let _ = self.get(k.name()).await;
            }
        }
    }

    /// The distinct targets behind every registered name, each once
    /// (`gc` asks each target once, even where one answers many names).
    pub async fn each(&self) -> Vec<(&'static str, Result<Arc<dyn Target>, TargetError>)> {
        let mut seen: Vec<Arc<dyn Target>> = Vec::new();
        let mut out = Vec::new();
        for k in kinds() {
            match self.get(k.name()).await {
                Ok(t) if seen.iter().any(|s| Arc::ptr_eq(s, &t)) => {}
                Ok(t) => {
                    seen.push(t.clone());
                    out.push((k.name(), Ok(t)));
                }
                Err(e) => out.push((k.name(), Err(e))),
            }
        }
        out
    }

    /// The scheduler's sweep: the targets whose kind sweeps with every reap
    /// ([`TargetKind::sweeps_with_reaps`]) end what jobs of dead Slipway
    /// processes left running. Returns how many they ended.
    pub async fn sweep_jobs(&self) -> usize {
        let mut n = 0;
        for (name, t) in self.built() {
            // A target standing for every name (tests) is swept as the default.
            let name = if self.single { DEFAULT } else { name.as_str() };
            if kind(name).is_some_and(|k| k.sweeps_with_reaps()) {
                n += t.sweep_orphans().await;
            }
        }
        n
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

/// An image in a target's own registry ([`Target::registry_images`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryImage {
    /// `sha256:…` of its manifest: what a delete names.
    pub digest: String,
    /// Never empty: untagged images are not listed.
    pub tags: Vec<String>,
    /// When it was pushed (Unix milliseconds), if the registry says.
    pub pushed: Option<i64>,
}

/// What [`Target::delete_registry_images`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryDeletion {
    /// The digests gone.
    pub deleted: Vec<String>,
    /// For people: a digest the registry refused and why, or a call that
    /// failed and which digests it left.
    pub errors: Vec<String>,
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
    output: Kept,
}

/// An instance's last lines or pieces of a line, each with its stream and
/// `cut` mark, and per stream (stdout, stderr) whether its oldest piece is
/// headless: the rest of a line whose beginning was dropped to keep
/// [`KEEP_LINES`].
type Kept = std::sync::Arc<std::sync::Mutex<(std::collections::VecDeque<(Stream, String, bool)>, [bool; 2])>>;

/// Keeps an instance's last lines (see [`Lifeline::keeper`]).
#[derive(Clone)]
pub struct LineKeeper(Kept);

impl LineKeeper {
    pub fn push_line(&self, line: String) {
        self.push_piece(Stream::Stdout, line, false)
    }

    /// What comes next of `stream` may begin inside a line (a tail read
    /// from the middle of a log): [`Lifeline::last_output`] leaves out
    /// everything up to that stream's first line end, as it does for a
    /// line whose beginning fell out of what is kept. Only before the
    /// stream's first piece; after it, nothing changes.
    pub fn begins_mid_line(&self, stream: Stream) {
        if let Ok(mut kept) = self.0.lock() {
            let (o, headless) = &mut *kept;
            if !o.iter().any(|(s, _, _)| *s == stream) {
                headless[stream as usize] = true;
            }
        }
    }

    /// A piece of a line cut at [`MAX_LINE_BYTES`] (`cut`: the line goes
    /// on in the next piece of the same stream): [`Lifeline::last_output`]
    /// joins them again, so that masking sees a secret across the cut
    /// whole. The other stream's lines may come between.
    pub fn push_piece(&self, stream: Stream, text: String, cut: bool) {
        if let Ok(mut kept) = self.0.lock() {
            let (o, headless) = &mut *kept;
            if o.len() >= KEEP_LINES
                && let Some((s, _, cut)) = o.pop_front()
            {
                headless[s as usize] = cut;
            }
            o.push_back((stream, text, cut));
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

    /// End the process group `pgid` this lifeline watches, unless it has
    /// ended already: SIGTERM, `grace` to exit, then SIGKILL (and at most
    /// 5 s more for its watcher to see it go).
    pub async fn end_group(&self, pgid: i32, grace: std::time::Duration) {
        if self.exit().is_some() {
            return;
        }
        crate::process::kill_group(pgid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            crate::process::kill_group(pgid, libc::SIGKILL);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.exited()).await;
        }
    }

    /// The last lines, the pieces of a cut line joined again.
    pub fn last_output(&self) -> Vec<String> {
        let Ok(kept) = self.output.lock() else { return Vec::new() };
        let (kept, headless) = &*kept;
        // A line whose beginning was dropped goes whole: masking sees
        // only whole lines, and a secret cut by the drop would be kept
        // in part, unmasked.
        let mut skipping = *headless;
        // Per stream, the line its last piece left open.
        let mut open: [Option<usize>; 2] = [None, None];
        let mut lines: Vec<String> = Vec::new();
        for (stream, text, cut) in kept.iter() {
            let i = *stream as usize;
            if skipping[i] {
                skipping[i] = *cut;
                continue;
            }
            let at = match open[i] {
                Some(at) => {
                    lines[at].push_str(text);
                    at
                }
                None => {
                    lines.push(text.clone());
                    lines.len() - 1
                }
            };
            open[i] = cut.then_some(at);
        }
        lines
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
    /// The target chooses where the instance listens (a free port here, a
    /// port on its host) and fills `{port}` ([`InstanceRequest::filled`]).
    async fn start_instance(&self, _request: InstanceRequest) -> Result<std::sync::Arc<dyn Instance>, TargetError> {
        Err(TargetError::new(TargetErrorKind::Unsupported, "this target cannot run service instances"))
    }

    /// Pin `reference` (`image:tag`) to what it names now: the image's
    /// digest (hex of its SHA-256). `settings`: the service's own
    /// ([`TargetKind::service_settings`]). Targets without images answer
    /// None.
    async fn resolve(&self, _reference: &str, _settings: &Settings, _auth: Option<&Credentials>) -> Result<Option<String>, TargetError> {
        Ok(None)
    }

    /// Make `reference` (`image@sha256:…`) available before instances
    /// start (a pull). Targets without images have nothing to do.
    async fn prepare(&self, _reference: &str, _auth: Option<&Credentials>, _output: &OutputSink, _cancel: &CancellationToken) -> Result<(), TargetError> {
        Ok(())
    }

    /// Run one attempt to the end. Must return within the spec's timeout
    /// plus its kill grace, and promptly once `cancel` fires.
    async fn run(&self, request: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult;

    /// The machines this target deploys to, as the config's tables of its
    /// kind declare them (`tables`, [`TargetKind::read_tables`]), each
    /// asked how it is now. Targets without machines of their own: none.
    async fn machines(&self, _tables: &Settings) -> Vec<Machine> {
        vec![]
    }

    /// Look after the machines of `tables`: called every few seconds by
    /// each node ([`TEND_EVERY`]); a target checks what is due (SSH: every
    /// host's supervisor, each group at its `check_every`, starting one
    /// where none answers) and reports what changed in its log. Returns
    /// promptly when nothing is due.
    async fn tend(&self, _tables: &Settings) {}

    /// Take the machine `name` out of service (`drained`) or back in:
    /// it gets no new deploys and its proxies stop taking connections.
    /// What it says happened, for people.
    async fn drain(&self, _tables: &Settings, name: &str, _drained: bool) -> Result<String, TargetError> {
        Err(TargetError::new(TargetErrorKind::NotFound, format!("no host {name:?} on this target")))
    }

    /// Targets with [`Capabilities::own_rollout`]: roll the service out
    /// themselves (SSH hosts: host by host, each behind its own proxy) and
    /// back on failure; `RolledBack` when it ended where it began. The
    /// service manager records the result as for any rollout.
    async fn rollout(&self, _request: &crate::service::RolloutRequest, _output: OutputSink, _cancel: CancellationToken) -> RunResult {
        RunResult::failed("this target does not run its own rollouts")
    }

    /// Targets with [`Capabilities::own_rollout`]: what runs for the
    /// service now, in the target's own names (an ECS task definition
    /// ARN), recorded with its version for `status` and `why`. `None`:
    /// nothing of the kind, or it cannot be asked now.
    async fn running_ref(&self, _spec: &crate::config::service::ServiceSpec) -> Option<String> {
        None
    }

    /// Whether the target can be used now (the Docker Engine answers).
    /// The error says what is unreachable, for people.
    async fn check(&self) -> Result<(), TargetError> {
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
    async fn garbage(&self, _keep: &Keep) -> Result<Garbage, TargetError> {
        Ok(Garbage::default())
    }

    /// Remove what [`Target::garbage`] found; returns what is gone.
    async fn collect(&self, _garbage: &Garbage) -> Garbage {
        Garbage::default()
    }

    /// Registry retention (`crate::retention`) for targets with
    /// [`Capabilities::own_registry`]: every tagged image of `image`'s
    /// repository (`host/path`, no tag) in the target's own registry, every
    /// page read. `settings`: those of a service on this target that runs
    /// `image` ([`TargetKind::service_settings`]). `None`: `image` is not in
    /// a registry of this target's (retention then asks the registry's
    /// HTTP API, as for every other target).
    async fn registry_images(&self, _image: &str, _settings: &Settings) -> Option<Result<Vec<RegistryImage>, TargetError>> {
        None
    }

    /// Delete the images `digests` (`sha256:…`) of `image`'s repository
    /// from the target's own registry, with every tag they carry. What the
    /// registry refused, and a call that failed (the digests it and later
    /// calls would have deleted are then not tried), are in `errors`.
    async fn delete_registry_images(&self, image: &str, _settings: &Settings, _digests: &[String]) -> RegistryDeletion {
        RegistryDeletion { deleted: vec![], errors: vec![format!("{image}: this target keeps no registry of its own")] }
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

/// A machine a target deploys to (a host of a group), as `slipway hosts`
/// shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    pub group: String,
    pub name: String,
    pub address: String,
    /// Answered just now; else `error` says why not.
    pub reachable: bool,
    pub error: Option<String>,
    /// The host key it offered ("SHA256:…").
    pub fingerprint: Option<String>,
    /// Taken out: no new deploys, its proxies take no new connections.
    pub drained: bool,
    pub services: Vec<MachineService>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineService {
    pub environment: String,
    pub service: String,
    pub version: String,
    pub instances: u32,
    pub healthy: u32,
    /// Its instances as the target names them (`pid 123`).
    pub ids: Vec<String>,
}

/// How often a node calls [`Target::tend`] of every target whose kind has
/// tables in the config.
pub const TEND_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest line kept whole; longer ones are cut into pieces of this size
/// so one line without a newline cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Bytes of one stream into lines, for every target that reads a process's
/// output: a line longer than [`MAX_LINE_BYTES`] is cut into pieces marked
/// `cut`, at a character's boundary so that no character is cut in two.
#[derive(Debug, Default)]
pub struct LineCutter {
    buf: Vec<u8>,
}

impl LineCutter {
    /// The lines and pieces these bytes complete, in order: (text, cut).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(String, bool)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let newline = self.buf.iter().position(|b| *b == b'\n');
            match newline {
                Some(pos) if pos <= MAX_LINE_BYTES || (pos == MAX_LINE_BYTES + 1 && self.buf[MAX_LINE_BYTES] == b'\r') => {
                    let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push((String::from_utf8_lossy(&line).into_owned(), false));
                }
                // A line of exactly the limit waiting for its "\r\n" is
                // kept whole.
                _ if self.buf.len() > MAX_LINE_BYTES + 1 => {
                    let at = char_boundary(&self.buf, MAX_LINE_BYTES);
                    let piece: Vec<u8> = self.buf.drain(..at).collect();
                    out.push((String::from_utf8_lossy(&piece).into_owned(), true));
                }
                _ => return out,
            }
        }
    }

    /// What is left when the stream ends: its last line had no newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned())
    }
}

/// `at`, or up to three bytes before it where a UTF-8 character begins.
/// (Bytes that are not UTF-8 are cut at `at`.)
fn char_boundary(bytes: &[u8], at: usize) -> usize {
    let continuation = |i: usize| bytes.get(i).is_some_and(|b| b & 0xC0 == 0x80);
    (at.saturating_sub(3)..=at).rev().find(|i| !continuation(*i)).filter(|i| *i > 0).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instances_last_output_joins_the_pieces_of_a_cut_line() {
        let (life, _exit) = Lifeline::new();
        let keeper = life.keeper();
        keeper.push_line("before".into());
        keeper.push_piece(Stream::Stdout, "top".into(), true);
        // The other stream's line between two pieces of one line.
        keeper.push_piece(Stream::Stderr, "an error".into(), false);
        keeper.push_piece(Stream::Stdout, "sec".into(), true);
        keeper.push_piece(Stream::Stdout, "ret end".into(), false);
        keeper.push_piece(Stream::Stdout, "unfinished".into(), true);
        assert_eq!(life.last_output(), ["before", "topsecret end", "an error", "unfinished"]);
    }

    #[test]
    fn issue19_a_line_whose_beginning_was_dropped_is_not_kept_in_part() {
        let (life, _exit) = Lifeline::new();
        let keeper = life.keeper();
        // A line of KEEP_LINES + 2 pieces, then one whole line: the
        // first two pieces go to keep KEEP_LINES, so the rest is headless.
        for i in 0..KEEP_LINES + 1 {
            keeper.push_piece(Stream::Stdout, format!("p{i} "), true);
        }
        // Stderr's line between its pieces neither ends nor joins it.
        keeper.push_piece(Stream::Stderr, "an error".into(), false);
        keeper.push_piece(Stream::Stdout, "end".into(), false);
        assert_eq!(life.last_output(), ["an error"], "nothing of the headless line");
        keeper.push_line("after".into());
        assert_eq!(life.last_output(), ["an error", "after"]);
        // Once its pieces are all gone, what is kept starts at a line.
        for i in 0..KEEP_LINES {
            keeper.push_line(format!("l{i}"));
        }
        assert_eq!(life.last_output().first().map(String::as_str), Some("l0"));
        assert_eq!(life.last_output().len(), KEEP_LINES);
    }

    #[test]
    fn a_long_line_is_cut_in_marked_pieces_and_never_inside_a_character() {
        let mut c = LineCutter::default();
        assert!(c.feed(&vec![b'a'; MAX_LINE_BYTES]).is_empty(), "a line of exactly the limit waits for its newline");
        let got = c.feed(b"\r\nnext\n");
        assert_eq!(got, vec![("a".repeat(MAX_LINE_BYTES), false), ("next".to_string(), false)]);

        // 'é' is two bytes; one would straddle the limit.
        let mut long = vec![b'a'; MAX_LINE_BYTES - 1];
        long.extend_from_slice("éé tail\n".as_bytes());
        let got = c.feed(&long);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0.len(), got[0].1), (MAX_LINE_BYTES - 1, true));
        assert_eq!(got[1], ("éé tail".to_string(), false));
        assert!(!got.iter().any(|(t, _)| t.contains('\u{FFFD}')));

        // Bytes that are not UTF-8 are still cut at the limit.
        let got = c.feed(&vec![0x80; MAX_LINE_BYTES + 2]);
        assert_eq!(got.len(), 1);
        assert!(got[0].1);
        assert_eq!(c.finish().map(|t| t.chars().count()), Some(2));
        assert_eq!(c.finish(), None);
    }
}
