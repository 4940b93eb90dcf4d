//! The `docker` target: service instances are containers on the Docker
//! Engine, driven through its API over the local socket (bollard), never
//! through the `docker` CLI.
//!
//! Every container Slipway creates carries labels (`slipway.service`,
//! `slipway.environment`, `slipway.version`, `slipway.owner`), so that a
//! later Slipway can tell its containers from anyone else's; it never
//! touches a container without them. The instance's port is published on
//! 127.0.0.1 only: clients reach it through Slipway's proxy.
//!
//! Images are pulled by the digest pinned when a deploy was accepted
//! ([`Target::resolve`], [`Target::prepare`]); a restarted Slipway adopts
//! the healthy containers of the version it recorded; `gc` removes what no
//! live Slipway holds and images nothing runs or could roll back to.

mod config;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    Capabilities, Garbage, GarbageItem, Instance, InstanceRequest, JobRequest, KEEP_LINES, Keep, Key, Lifeline, NodeContext, OutputSink, RunResult, KeyTable,
    Target, TargetError, TargetErrorKind, TargetKind,
};
use config::Settings;
use crate::config::secret::{Credentials, Secret};
use crate::store::Outcome;

/// Every Engine call is bounded: a stuck daemon must not stall a rollout.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of a pull (timeouts and registry errors), with backoff.
const PULL_ATTEMPTS: u32 = 3;
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

pub const LABEL_SERVICE: &str = "slipway.service";
pub const LABEL_ENVIRONMENT: &str = "slipway.environment";
pub const LABEL_VERSION: &str = "slipway.version";
pub const LABEL_OWNER: &str = "slipway.owner";
/// `sha256:…` of the image the container runs (pinned at submit).
pub const LABEL_DIGEST: &str = "slipway.digest";
pub const LABEL_DEPLOYMENT: &str = "slipway.deployment";
/// A digest of the service spec the container was started from.
pub const LABEL_SPEC: &str = "slipway.spec";
/// The installation (store) a container belongs to.
pub const LABEL_SCOPE: &str = "slipway.scope";

/// On one-off job containers (migrations): the job's name.
pub const LABEL_JOB: &str = "slipway.job";

/// Where the Engine is looked for: `DOCKER_HOST`, else its usual socket.
fn engine_socket() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// What bollard sends as `X-Registry-Auth`.
fn docker_credentials(auth: Option<&Credentials>) -> Option<bollard::auth::DockerCredentials> {
    auth.map(|c| bollard::auth::DockerCredentials {
        username: c.username.clone(),
        password: c.password.as_ref().map(|p| p.expose().to_string()),
        identitytoken: c.token.as_ref().map(|t| t.expose().to_string()),
        serveraddress: Some(c.host.clone()),
        ..Default::default()
    })
}

/// Why a registry said no, for people: the Engine's words, with what
/// they mean when they mean refused credentials.
fn registry_error(e: String, auth: Option<&Credentials>) -> String {
    // The Engine's and the registry's own words for refused credentials;
    // not bare numbers, which an image reference may hold ("host:4010").
    let lower = e.to_lowercase();
    if ["unauthorized", "authentication required", "access to the resource is denied", "no basic auth credentials", "incorrect username or password"]
        .iter()
        .any(|w| lower.contains(w))
    {
        match auth {
            Some(c) => {
                format!("the registry refused the credentials of [[registry]] {:?} (user {:?}): {e}", c.host, c.username.as_deref().unwrap_or("(token)"))
            }
            None => format!("the registry wants credentials and none are configured (add a [[registry]] for its host): {e}"),
        }
    } else {
        e
    }
}

#[derive(Clone)]
pub struct DockerTarget {
    docker: Docker,
    /// Which Slipway installation (store) this is: containers of another
    /// installation sharing the Engine are never swept, adopted or
    /// collected, even when their Slipway is down.
    scope: String,
    /// Containers of dead Slipway processes this one adopted: its own
    /// now, though their owner label still names the dead one (labels are
    /// fixed at creation).
    adopted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Containers whose removal failed (the Engine was away): removed once
    /// it answers again, so none is left running unheld.
    pending: Pending,
}

type Pending = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// The Engine answers (again): remove what could not be removed while it
/// was away.
async fn retry_pending(docker: &Docker, pending: &Pending) {
    let left: Vec<String> = pending.lock().map(|p| p.iter().cloned().collect()).unwrap_or_default();
    for id in left {
        remove_or_remember(docker, &id, pending).await;
    }
}

/// Force-remove a container; on failure, remember it for later.
async fn remove_or_remember(docker: &Docker, id: &str, pending: &Pending) {
    let remove = docker.remove_container(id, Some(RemoveContainerOptionsBuilder::default().force(true).build()));
    match tokio::time::timeout(API_TIMEOUT, remove).await {
        Ok(Ok(())) | Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => {
            if let Ok(mut p) = pending.lock() {
                p.remove(id);
            }
        }
        _ => {
            if let Ok(mut p) = pending.lock() {
                p.insert(id.to_string());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker Engine: {0} (is dockerd running, and may this user use its socket, {socket}?)", socket = engine_socket())]
    Unreachable(String),
}

impl DockerTarget {
    /// Connect to the local Engine (`DOCKER_HOST`, else its usual socket)
    /// and check that it answers.
    pub async fn connect() -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| DockerError::Unreachable(e.to_string()))?;
        Self::checked(docker).await
    }

    /// Connect to the Engine on the Unix socket at `path`.
    pub async fn connect_to(path: &str) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_socket(path, API_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)
            .map_err(|e| DockerError::Unreachable(format!("{path}: {}", crate::http::error_chain(&e))))?;
        Self::checked(docker).await.map_err(|DockerError::Unreachable(e)| DockerError::Unreachable(format!("{path}: {e}")))
    }

    async fn checked(docker: Docker) -> Result<Self, DockerError> {
        match tokio::time::timeout(Duration::from_secs(5), docker.ping()).await {
            Ok(Ok(_)) => Ok(DockerTarget { docker, scope: String::new(), adopted: Default::default(), pending: Default::default() }),
            Ok(Err(e)) => Err(DockerError::Unreachable(crate::http::error_chain(&e))),
            Err(_) => Err(DockerError::Unreachable("no answer within 5s".into())),
        }
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Mark (and only ever touch) containers of this installation: see
    /// [`crate::process::scope_of_store`].
    pub fn scoped(mut self, scope: &str) -> Self {
        self.scope = scope.to_string();
        self
    }

    fn labels(&self, mut l: HashMap<String, String>) -> HashMap<String, String> {
        l.insert(LABEL_SCOPE.to_string(), self.scope.clone());
        l
    }

    fn is_adopted(&self, id: &str) -> bool {
        self.adopted.lock().map(|a| a.contains(id)).unwrap_or(false)
    }

    /// Every container with our labels, running or not.
    async fn labelled(&self) -> Result<Vec<bollard::models::ContainerSummary>, String> {
        let scope = format!("{LABEL_SCOPE}={}", self.scope);
        let filters = HashMap::from([("label", vec![LABEL_OWNER, scope.as_str()])]);
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        bounded("listing containers", self.docker.list_containers(Some(opts))).await
    }

    /// Held by nobody: left by a Slipway that is gone, and not adopted.
    fn orphaned(&self, c: &bollard::models::ContainerSummary) -> bool {
        let owner = c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER)).cloned().unwrap_or_default();
        owner != crate::process::owner_mark() && crate::process::owner_is_dead(&owner) && !c.id.as_deref().is_some_and(|id| self.is_adopted(id))
    }
}

fn label<'a>(c: &'a bollard::models::ContainerSummary, key: &str) -> &'a str {
    c.labels.as_ref().and_then(|l| l.get(key)).map(String::as_str).unwrap_or("")
}

async fn bounded<T, E: std::error::Error>(what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", crate::http::error_chain(&e))),
        Err(_) => Err(format!("{what}: the Docker Engine did not answer within {}s", API_TIMEOUT.as_secs())),
    }
}

pub struct DockerInstance {
    docker: Docker,
    pending: Pending,
    id: String,
    addr: SocketAddr,
    life: Lifeline,
}

/// The `docker` kind: registered in `targets/mod.rs`.
pub struct Kind;

pub static KIND: Kind = Kind;

#[async_trait]
impl TargetKind for Kind {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn about(&self) -> &'static str {
        "containers on this node's Docker Engine; instances publish their port on 127.0.0.1"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { runs_jobs: true, runs_instances: true, uses_images: true, secret_files: true, proxied: true, ..Capabilities::default() }
    }

    fn service_keys(&self) -> &'static [Key] {
        config::KEYS
    }

    fn service_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<super::Settings> {
        config::read(table).map(|s| super::Settings::of(&s))
    }

    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        let t = DockerTarget::connect().await.map_err(|e| TargetError::new(TargetErrorKind::Unavailable, e.to_string()))?;
        Ok(Arc::new(t.scoped(&node.installation)))
    }
}

#[async_trait]
impl Target for DockerTarget {
    /// A one-off container from the job's pinned image (a docker
    /// service's migration): its output streamed line by line, its exit
    /// code the job's, removed afterwards whatever happens.
    async fn run(&self, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        let failed = |reason: String| RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(reason), parts: Vec::new() };
        let Some(image) = req.spec.artifact.as_ref().map(|a| a.pinned_image()) else {
            return failed("no pinned image for this job".into());
        };
        let crate::config::Command::Argv(argv) = &req.spec.command else { return failed("a container job takes an argv command".into()) };
        let argv: Vec<String> = argv.iter().map(|a| crate::process::substitute(a, &req.values)).collect();
        let mut env: Vec<String> = req.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for (k, v) in &req.values {
            env.push(format!("SLIPWAY_{}={v}", k.to_ascii_uppercase()));
        }
        env.push(format!("SLIPWAY_JOB={}", req.job));
        for (k, secret) in &req.spec.secrets {
            match secret.read() {
                Ok(v) => env.push(format!("{k}={}", v.expose())),
                Err(e) => return failed(e),
            }
        }
        let labels = self.labels(HashMap::from([
            (LABEL_SERVICE.to_string(), req.values.get("service").cloned().unwrap_or_default()),
            (LABEL_ENVIRONMENT.to_string(), req.values.get("env").cloned().unwrap_or_default()),
            (LABEL_VERSION.to_string(), req.values.get("version").cloned().unwrap_or_default()),
            (LABEL_OWNER.to_string(), crate::process::owner_mark().to_string()),
            (LABEL_DIGEST.to_string(), image.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default()),
            (LABEL_DEPLOYMENT.to_string(), req.deployment_id.to_string()),
            // A one-off: never adopted as an instance.
            (LABEL_JOB.to_string(), req.job.clone()),
        ]));
        let body = ContainerCreateBody { image: Some(image.clone()), cmd: Some(argv), env: Some(env), labels: Some(labels), ..Default::default() };
        let id = match bounded(
            &format!("creating a container of {image}"),
            self.docker.create_container(None::<bollard::query_parameters::CreateContainerOptions>, body),
        )
        .await
        {
            Ok(c) => c.id,
            Err(e) => return failed(e),
        };
        let remove = || async {
            let r = self.docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).build()));
            let _ = tokio::time::timeout(API_TIMEOUT, r).await;
        };
        let files: Result<std::collections::BTreeMap<String, Secret>, String> = req.spec.secret_files.iter().map(|(p, r)| Ok((p.clone(), r.read()?))).collect();
        if let Err(e) = async { upload_secrets(&self.docker, &id, &files?).await }.await {
            remove().await;
            return failed(e);
        }
        if let Err(e) = bounded("starting the container", self.docker.start_container(&id, None)).await {
            remove().await;
            return failed(e);
        }
        let follow = async {
            let mut logs = self.docker.logs(&id, Some(LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build()));
            // Docker's frames are not lines (and it splits a line longer
            // than 16 KiB): each stream is cut into lines as the other
            // targets cut a process's output, marks and all.
            let (mut out, mut err) = (super::LineCutter::default(), super::LineCutter::default());
            while let Some(Ok(chunk)) = logs.next().await {
                let (stream, cutter) =
                    if matches!(chunk, bollard::container::LogOutput::StdErr { .. }) { (super::Stream::Stderr, &mut err) } else { (super::Stream::Stdout, &mut out) };
                for (text, cut) in cutter.feed(&chunk.into_bytes()) {
                    let _ = output.send(super::Line { stream, text, part: None, cut }).await;
                }
            }
            for (stream, cutter) in [(super::Stream::Stdout, &mut out), (super::Stream::Stderr, &mut err)] {
                if let Some(text) = cutter.finish() {
                    let _ = output.send(super::Line { stream, text, part: None, cut: false }).await;
                }
            }
        };
        let timeout = Duration::from_millis(req.spec.timeout_ms.max(1));
        let ended = tokio::select! {
            _ = follow => None,
            _ = tokio::time::sleep(timeout) => Some(Outcome::TimedOut),
            _ = cancel.cancelled() => Some(Outcome::Cancelled),
        };
        if ended.is_some() {
            let grace = (req.spec.kill_grace_ms / 1000).max(1) as i32;
            let _ = tokio::time::timeout(API_TIMEOUT, self.docker.stop_container(&id, Some(StopContainerOptionsBuilder::default().t(grace).build()))).await;
        }
        let code = match tokio::time::timeout(API_TIMEOUT, self.docker.inspect_container(&id, None::<InspectContainerOptions>)).await {
            Ok(Ok(info)) => info.state.and_then(|s| s.exit_code),
            _ => None,
        };
        remove().await;
        match (ended, code) {
            (Some(Outcome::TimedOut), c) => RunResult { parts: Vec::new(),
                outcome: Outcome::TimedOut,
                exit_code: c.map(|c| c as i32),
                reason: Some(format!("timed out after {}", humantime::format_duration(timeout))),
            },
            (Some(o), c) => RunResult { outcome: o, exit_code: c.map(|c| c as i32), reason: Some("stopped on request".into()), parts: Vec::new() },
            (None, Some(0)) => RunResult { outcome: Outcome::Succeeded, exit_code: Some(0), reason: None, parts: Vec::new() },
            (None, Some(c)) => RunResult { parts: Vec::new(), outcome: Outcome::Failed, exit_code: Some(c as i32), reason: Some(format!("exit code {c}")) },
            (None, None) => failed("the container's exit code is unknown (the Engine did not say)".into()),
        }
    }

    /// Remove the containers of a Slipway on this host that died without
    /// stopping them (SIGKILL, a crash): as on the local target, a node's
    /// instances die with it and its restart brings the recorded version
    /// back. Containers without our labels are never touched.
    async fn sweep_orphans(&self) -> usize {
        let Ok(containers) = self.labelled().await else { return 0 };
        let mut removed = 0;
        for c in containers.iter().filter(|c| self.orphaned(c)) {
            let owner = label(c, LABEL_OWNER);
            let Some(id) = &c.id else { continue };
            let remove = self.docker.remove_container(id, Some(RemoveContainerOptionsBuilder::default().force(true).build()));
            if bounded("removing an orphaned container", remove).await.is_ok() {
                tracing::warn!(container = %id, owner = %owner, "removed a container left by a Slipway process that died");
                removed += 1;
            }
        }
        removed
    }

    async fn check(&self) -> Result<(), TargetError> {
        match tokio::time::timeout(Duration::from_secs(5), self.docker.ping()).await {
            Ok(Ok(_)) => {
                retry_pending(&self.docker, &self.pending).await;
                Ok(())
            }
            Ok(Err(e)) => Err(TargetError::new(TargetErrorKind::Unavailable, DockerError::Unreachable(crate::http::error_chain(&e)).to_string())),
            Err(_) => Err(TargetError::new(TargetErrorKind::Unavailable, DockerError::Unreachable("no answer within 5s".into()).to_string())),
        }
    }

    async fn adopt(&self, wanted: &super::Adoptable<'_>) -> Vec<Arc<dyn Instance>> {
        let super::Adoptable { environment, service, version, image, spec_digest } = *wanted;
        let Ok(containers) = self.labelled().await else { return vec![] };
        let digest = image.and_then(|i| i.rsplit_once('@')).map(|(_, d)| d);
        let mut out: Vec<Arc<dyn Instance>> = Vec::new();
        for c in containers {
            let Some(id) = c.id.clone() else { continue };
            let ours = label(&c, LABEL_SERVICE) == service && label(&c, LABEL_ENVIRONMENT) == environment && label(&c, LABEL_JOB).is_empty();
            let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            let same = label(&c, LABEL_VERSION) == version && digest.is_none_or(|d| label(&c, LABEL_DIGEST) == d) && label(&c, LABEL_SPEC) == spec_digest;
            // Published on 127.0.0.1 (as every instance of ours is).
            let port = c.ports.iter().flatten().find(|p| p.ip.as_deref() == Some("127.0.0.1")).and_then(|p| p.public_port);
            let (true, true, true, Some(port)) = (ours && self.orphaned(&c), running, same, port) else { continue };
            if let Ok(mut a) = self.adopted.lock() {
                a.insert(id.clone());
            }
            tracing::info!(container = %id, service, env = environment, version, "adopted a container left by a Slipway that died");
            let life = watch(&self.docker, &id, &self.pending);
            let adopted: Arc<dyn Instance> =
                Arc::new(DockerInstance { docker: self.docker.clone(), pending: self.pending.clone(), id, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), life });
            // Its port stays booked while it lives.
            super::ports::PORTS.hold(&adopted);
            out.push(adopted);
        }
        out
    }

    async fn garbage(&self, keep: &Keep) -> Result<Garbage, TargetError> {
        let containers = self.labelled().await?;
        let mut g = Garbage::default();
        // Images any container on the Engine uses (ours, other
        // installations', anyone's) are never collected.
        let everyone = bounded(
            "listing containers",
            self.docker.list_containers(Some(bollard::query_parameters::ListContainersOptionsBuilder::default().all(true).build())),
        )
        .await?;
        let in_use: std::collections::HashSet<String> = everyone.iter().filter_map(|c| c.image_id.clone()).collect();
        for c in &containers {
            if !self.orphaned(c) {
                continue;
            }
            let owner = label(c, LABEL_OWNER);
            let what = match label(c, LABEL_JOB) {
                "" => format!(
                    "{} {} ({}), left by Slipway pid {}",
                    label(c, LABEL_SERVICE),
                    label(c, LABEL_VERSION),
                    label(c, LABEL_ENVIRONMENT),
                    owner.split('.').next().unwrap_or(owner)
                ),
                job => format!("job {job} ({}), left by Slipway pid {}", label(c, LABEL_ENVIRONMENT), owner.split('.').next().unwrap_or(owner)),
            };
            g.containers.push(GarbageItem { id: c.id.clone().unwrap_or_default(), what });
        }
        let images =
            bounded("listing images", self.docker.list_images(Some(bollard::query_parameters::ListImagesOptionsBuilder::default().all(false).build()))).await?;
        for i in images {
            // Only images of repositories Slipway deploys, by digest.
            let names: Vec<&String> = i.repo_digests.iter().chain(i.repo_tags.iter()).collect();
            let repo_of = |n: &str| {
                n.rsplit_once('@').map(|(r, _)| r.to_string()).or_else(|| n.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map(|(r, _)| r.to_string()))
            };
            let ours = names.iter().any(|n| repo_of(n).is_some_and(|r| keep.repositories.contains(&r)));
            let foreign = names.iter().any(|n| repo_of(n).is_none_or(|r| !keep.repositories.contains(&r)));
            let kept = i.repo_digests.iter().any(|d| d.rsplit_once('@').is_some_and(|(_, h)| keep.digests.contains(h)));
            if !ours || foreign || kept || in_use.contains(&i.id) {
                continue;
            }
            let shown = i.repo_tags.first().or(i.repo_digests.first()).cloned().unwrap_or_else(|| i.id.clone());
            g.images
                .push(GarbageItem { id: i.id.clone(), what: format!("{shown} ({} MB), which no environment runs or could roll back to", i.size / 1_000_000) });
        }
        Ok(g)
    }

    async fn collect(&self, garbage: &Garbage) -> Garbage {
        let mut gone = Garbage::default();
        for c in &garbage.containers {
            let remove = self.docker.remove_container(&c.id, Some(RemoveContainerOptionsBuilder::default().force(true).build()));
            match bounded("removing an orphaned container", remove).await {
                Ok(()) => gone.containers.push(c.clone()),
                Err(e) => tracing::warn!(container = %c.id, error = %e, "gc could not remove a container"),
            }
        }
        for i in &garbage.images {
            // Name by name, never forced: an image that something started
            // using meanwhile stays.
            let names = match bounded("inspecting an image", self.docker.inspect_image(&i.id)).await {
                Ok(info) => info.repo_tags.unwrap_or_default().into_iter().chain(info.repo_digests.unwrap_or_default()).collect::<Vec<_>>(),
                Err(_) => continue,
            };
            let mut failed = None;
            for n in names {
                if let Err(e) = bounded("removing an image", self.docker.remove_image(&n, None::<bollard::query_parameters::RemoveImageOptions>, None)).await {
                    failed = Some(e);
                }
            }
            match failed {
                None => gone.images.push(i.clone()),
                Some(e) => tracing::warn!(image = %i.id, error = %e, "gc could not remove an image"),
            }
        }
        gone
    }

    async fn resolve(&self, reference: &str, _settings: &super::Settings, auth: Option<&Credentials>) -> Result<Option<String>, TargetError> {
        let inspected = bounded(&format!("resolving {reference} in its registry"), self.docker.inspect_registry_image(reference, docker_credentials(auth)))
            .await
            .map_err(|e| registry_failure(registry_error(e, auth)))?;
        let digest = inspected.descriptor.digest.unwrap_or_default();
        match digest.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 => Ok(Some(hex.to_string())),
            _ => Err(format!("the registry named no sha256 digest for {reference} (got {digest:?})").into()),
        }
    }

    async fn prepare(&self, reference: &str, auth: Option<&Credentials>, output: &OutputSink, cancel: &CancellationToken) -> Result<(), TargetError> {
        let say = |line: String| async move {
            let _ = output.send((super::Stream::Stdout, format!("[pull] {line}")).into()).await;
        };
        if let Ok(Ok(_)) = tokio::time::timeout(API_TIMEOUT, self.docker.inspect_image(reference)).await {
            say(format!("{reference} is already on the Engine")).await;
            return Ok(());
        }
        let mut delay = Duration::from_secs(1);
        let mut failures = Vec::new();
        for attempt in 1..=PULL_ATTEMPTS {
            say(format!("pulling {reference} (try {attempt} of {PULL_ATTEMPTS})")).await;
            let opts = bollard::query_parameters::CreateImageOptionsBuilder::default().from_image(reference).build();
            let pull = async {
                let mut s = self.docker.create_image(Some(opts), None, docker_credentials(auth));
                while let Some(r) = s.next().await {
                    r.map_err(|e| registry_error(crate::http::error_chain(&e), auth))?;
                }
                Ok::<(), String>(())
            };
            let result = tokio::select! {
                r = tokio::time::timeout(PULL_TIMEOUT, pull) => r.unwrap_or_else(|_| Err(format!("no complete pull within {}s", PULL_TIMEOUT.as_secs()))),
                _ = cancel.cancelled() => return Err("stopped on request".into()),
            };
            match result {
                Ok(()) => {
                    say(format!("pulled {reference}")).await;
                    return Ok(());
                }
                Err(e) => {
                    // Unknown image or refused credentials will not change.
                    let lower = e.to_lowercase();
                    let fin = lower.contains("not found") || lower.contains("manifest unknown") || lower.contains("credentials");
                    say(format!("try {attempt} failed: {e}")).await;
                    failures.push(format!("try {attempt}: {e}"));
                    if fin || attempt == PULL_ATTEMPTS {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        Err(registry_failure(format!("pulling {reference} failed: {}", failures.join("; "))))
    }

    async fn start_instance(&self, req: InstanceRequest) -> Result<Arc<dyn Instance>, TargetError> {
        let settings: Settings = req.settings.get()?;
        super::ports::on_free_port(|port| self.start_on(&req, &settings, port)).await
    }
}

impl DockerTarget {
    /// One container of `req`, its port published on `port` of 127.0.0.1.
    async fn start_on(&self, req: &InstanceRequest, settings: &Settings, port: u16) -> Result<Arc<dyn Instance>, TargetError> {
        let Some(image) = req.image.clone() else {
            return Err(TargetError::new(TargetErrorKind::Refused, format!("service {}: the docker target needs an image", req.service)));
        };
        let container_port = settings.port;
        // Inside the container, `{port}` is the container's port.
        let (argv, req_env) = req.filled(container_port);
        let port_key = format!("{container_port}/tcp");
        let labels = self.labels(HashMap::from([
            (LABEL_SERVICE.to_string(), req.service.clone()),
            (LABEL_ENVIRONMENT.to_string(), req.environment.clone()),
            (LABEL_VERSION.to_string(), req.version.clone()),
            (LABEL_OWNER.to_string(), crate::process::owner_mark().to_string()),
            (LABEL_DIGEST.to_string(), image.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default()),
            (LABEL_DEPLOYMENT.to_string(), req.deployment_id.to_string()),
            (LABEL_SPEC.to_string(), req.spec_digest.clone()),
        ]));
        let mut env: Vec<String> = req_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(req.secret_env.iter().map(|(k, v)| format!("{k}={}", v.expose())));
        env.push(format!("SLIPWAY_SERVICE={}", req.service));
        env.push(format!("SLIPWAY_ENV={}", req.environment));
        env.push(format!("SLIPWAY_VERSION={}", req.version));
        env.push(format!("SLIPWAY_PORT={container_port}"));
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: (!argv.is_empty()).then_some(argv),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key.clone()]),
            host_config: Some(HostConfig {
                memory: settings.memory_bytes.map(|b| b.min(i64::MAX as u64) as i64),
                nano_cpus: settings.millicpus.map(|m| i64::from(m) * 1_000_000),
                port_bindings: Some(HashMap::from([(
                    port_key,
                    Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(port.to_string()) }]),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("slipway-{}-{}-{}", req.environment, req.service, port);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = bounded(&format!("creating a container of {image}"), self.docker.create_container(Some(options), body)).await.map_err(port_taken)?;
        let id = created.id;
        if let Err(e) = upload_secrets(&self.docker, &id, &req.secret_files).await {
            remove_or_remember(&self.docker, &id, &self.pending).await;
            return Err(e.into());
        }
        if let Err(e) = bounded("starting the container", self.docker.start_container(&id, None)).await {
            let _ = self.docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await;
            return Err(port_taken(e));
        }
        let life = watch(&self.docker, &id, &self.pending);
        Ok(Arc::new(DockerInstance { docker: self.docker.clone(), pending: self.pending.clone(), id, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), life }))
    }
}

/// A registry's answer, by kind: an unknown image or tag will not appear
/// by retrying.
fn registry_failure(e: String) -> TargetError {
    let lower = e.to_lowercase();
    let kind = if lower.contains("not found") || lower.contains("manifest unknown") { TargetErrorKind::NotFound } else { TargetErrorKind::Failed };
    TargetError::new(kind, e)
}

/// The Engine says in words that a published port is taken (another
/// process on this host took it between our pick and its bind).
fn port_taken(e: String) -> TargetError {
    // A container's name carries its host port, so a name already in use
    // (409 at create) means another container of this environment and
    // service, perhaps another installation's or a test's beside us, was
    // given the same port: another port will do (issue 19's CI run of
    // 0510112, two processes offered one port by the kernel).
    let taken = e.contains("port is already allocated") || e.contains("address already in use") || e.contains("is already in use by container");
    TargetError::new(if taken { TargetErrorKind::PortTaken } else { TargetErrorKind::Failed }, e)
}

/// A tar of the secret files, built in memory. Mode 0444, as Docker's own
/// secrets: an image's non-root user must read them too. No directory
/// entries: the Engine creates missing parents, and an entry would reset
/// an existing directory's mode (or replace a symlinked one).
fn secret_tar(files: &std::collections::BTreeMap<String, Secret>) -> Result<Vec<u8>, String> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, value) in files {
        let bytes = value.expose().as_bytes();
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o444);
        h.set_cksum();
        b.append_data(&mut h, path.trim_start_matches('/'), bytes).map_err(|e| format!("cannot pack secret file {path}: {e}"))?;
    }
    b.into_inner().map_err(|e| format!("cannot pack the secret files: {e}"))
}

/// Place secret files in a created (not yet started) container.
async fn upload_secrets(docker: &Docker, id: &str, files: &std::collections::BTreeMap<String, Secret>) -> Result<(), String> {
    if files.is_empty() {
        return Ok(());
    }
    let upload = docker.upload_to_container(
        id,
        Some(bollard::query_parameters::UploadToContainerOptionsBuilder::default().path("/").build()),
        bollard::body_full(secret_tar(files)?.into()),
    );
    bounded("placing the secret files in the container", upload).await
}

/// Follow a container until it stops: then announce why (exit code, the
/// OOM flag) with its last lines of log.
fn watch(docker: &Docker, id: &str, pending: &Pending) -> Lifeline {
    let (life, exit_tx) = Lifeline::new();
    let (docker, id, lines, pending) = (docker.clone(), id.to_string(), life.keeper(), pending.clone());
    tokio::spawn(async move {
        let mut why = match wait_until_stopped(&docker, &id, &exit_tx, &pending).await {
            Some(why) => why,
            None => return, // nobody holds the instance any more
        };
        why.push_str(&oom_note(&docker, &id).await);
        // Its own last words, for the record of a failed rollout. One
        // entry more than is kept: the first may begin mid-line.
        let want = KEEP_LINES + 1;
        let logs = docker.logs(&id, Some(LogsOptionsBuilder::default().stdout(true).stderr(true).tail(&want.to_string()).build()));
        let chunks = tokio::time::timeout(Duration::from_secs(5), logs.collect::<Vec<_>>()).await;
        // The whole log only if Docker gave all it had: fewer entries than
        // asked for, and no error or timeout that cut the answer short.
        let whole = chunks.as_ref().is_ok_and(|c| c.len() < want && c.iter().all(Result::is_ok));
        let frames = chunks.unwrap_or_default().into_iter().filter_map(Result::ok).map(|c| {
            let stream = if matches!(c, bollard::container::LogOutput::StdErr { .. }) { super::Stream::Stderr } else { super::Stream::Stdout };
            (stream, c.into_bytes())
        });
        keep_last_lines(&lines, frames, whole);
        exit_tx.send(why);
    });
    life
}

/// A container's last log entries into `keeper`, cut into lines by
/// [`super::LineCutter`]: Docker's entries are not lines (it splits a
/// line longer than 16 KiB into several). Unless `whole` (the entries are
/// the whole log), each stream's first entries may be the end of a line
/// begun before them, which the keeper then leaves out
/// ([`super::LineKeeper::begins_mid_line`]): masking sees only whole
/// lines, and a secret cut by the tail's start would be kept in part.
fn keep_last_lines(keeper: &super::LineKeeper, frames: impl IntoIterator<Item = (super::Stream, bytes::Bytes)>, whole: bool) {
    let streams = [super::Stream::Stdout, super::Stream::Stderr];
    if !whole {
        streams.iter().for_each(|s| keeper.begins_mid_line(*s));
    }
    let mut cutters = [super::LineCutter::default(), super::LineCutter::default()];
    for (stream, bytes) in frames {
        for (text, cut) in cutters[stream as usize].feed(&bytes) {
            keeper.push_piece(stream, text, cut);
        }
    }
    for (stream, cutter) in streams.into_iter().zip(&mut cutters) {
        if let Some(text) = cutter.finish() {
            keeper.push_piece(stream, text, false);
        }
    }
}

/// Why a stopped container was killed, if memory is the likely reason.
/// The Engine's OOM flag can lag the exit (containerd reports the OOM
/// event and the exit separately), so a SIGKILL (137) under a memory
/// limit is asked about again briefly; if the flag never comes, both
/// possible causes are named.
async fn oom_note(docker: &Docker, id: &str) -> String {
    let mut sigkill_limit = None;
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let Ok(Ok(info)) = tokio::time::timeout(API_TIMEOUT, docker.inspect_container(id, None::<InspectContainerOptions>)).await else { break };
        let state = info.state.as_ref();
        if state.and_then(|s| s.oom_killed) == Some(true) {
            return " (OOM-killed: it reached its memory limit)".into();
        }
        let limit = info.host_config.as_ref().and_then(|h| h.memory).filter(|m| *m > 0);
        match (state.and_then(|s| s.exit_code), limit) {
            (Some(137), Some(limit)) => sigkill_limit = Some(limit),
            _ => break,
        }
    }
    match sigkill_limit {
        Some(limit) => {
            format!(" (SIGKILL under its memory limit of {} MiB, not flagged as an OOM kill by the Engine: out of memory, or killed from outside)", limit >> 20)
        }
        None => String::new(),
    }
}

/// How the container stopped. A dropped connection to the Engine is not
/// a stopped container (a restarted dockerd with live-restore, a socket
/// that came back): the wait is taken up again until the Engine can say.
/// None once nobody holds the instance.
async fn wait_until_stopped(docker: &Docker, id: &str, holder: &super::ExitSender, pending: &Pending) -> Option<String> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut wait = docker.wait_container(id, Some(WaitContainerOptionsBuilder::default().condition("not-running").build()));
        match wait.next().await {
            Some(Ok(r)) => return Some(format!("exit code {}", r.status_code)),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => return Some(format!("exit code {code}")),
            Some(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => return Some("removed outside Slipway".into()),
            Some(Err(_)) | None => {}
        }
        // The Engine went quiet: ask again, with backoff, what became of it.
        loop {
            if holder.abandoned() {
                return None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match tokio::time::timeout(API_TIMEOUT, docker.inspect_container(id, None::<InspectContainerOptions>)).await {
                Ok(Ok(info)) => match info.state {
                    Some(st) if st.running == Some(true) => {
                        // The Engine is back: what could not be removed
                        // while it was away goes now.
                        retry_pending(docker, pending).await;
                        backoff = Duration::from_millis(200);
                        break; // still up: wait again
                    }
                    Some(st) => return Some(format!("exit code {}", st.exit_code.unwrap_or(-1))),
                    None => return Some("stopped (the Engine gave no state)".into()),
                },
                Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => return Some("removed outside Slipway".into()),
                _ => {} // still unreachable
            }
        }
    }
}

#[async_trait]
impl Instance for DockerInstance {
    fn id(&self) -> String {
        format!("container {}", &self.id[..self.id.len().min(12)])
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lifeline(&self) -> &Lifeline {
        &self.life
    }

    async fn stop(&self, grace: Duration) {
        // SIGTERM, then SIGKILL after `grace`, timed here: the Engine's own
        // stop counts its timeout in whole seconds only.
        let signal = |sig: &'static str| {
            let kill = self.docker.kill_container(&self.id, Some(bollard::query_parameters::KillContainerOptionsBuilder::default().signal(sig).build()));
            tokio::time::timeout(API_TIMEOUT, kill)
        };
        if self.exit().is_none() {
            let _ = signal("SIGTERM").await;
            if tokio::time::timeout(grace, self.exited()).await.is_err() {
                let _ = signal("SIGKILL").await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), self.exited()).await;
        }
        remove_or_remember(&self.docker, &self.id, &self.pending).await;
    }
}

impl Drop for DockerInstance {
    /// A container nobody holds any more must not keep running unseen.
    fn drop(&mut self) {
        if self.life.exit().is_none()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (docker, id, pending) = (self.docker.clone(), self.id.clone(), self.pending.clone());
            rt.spawn(async move { remove_or_remember(&docker, &id, &pending).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue19_a_containers_last_lines_start_at_a_whole_line() {
        use super::super::Stream::{Stderr, Stdout};
        let f = |stream, text: &str| (stream, bytes::Bytes::from(text.to_string()));
        let last_lines = |frames: Vec<_>, whole| {
            let (life, _exit) = super::super::Lifeline::new();
            keep_last_lines(&life.keeper(), frames, whole);
            life.last_output()
        };
        // A line split by Docker: its end begins the tail, then whole lines.
        let frames = vec![f(Stdout, "t=hunter2 end of a long line\n"), f(Stderr, "err 1\n"), f(Stdout, "out 1\n"), f(Stdout, "out 2 no break")];
        assert_eq!(last_lines(frames.clone(), false), ["out 1", "out 2 no break"], "stderr's first entry may be a line's end too");
        // The whole log: nothing goes.
        assert_eq!(last_lines(frames, true), ["t=hunter2 end of a long line", "err 1", "out 1", "out 2 no break"]);
        // Docker's pieces of one line are one line again (cut only where
        // the shared cutter cuts), the other stream's entries between them.
        let frames = vec![f(Stdout, "a\nfirst half, "), f(Stderr, "x\nan error\n"), f(Stdout, "second half\n")];
        assert_eq!(last_lines(frames, false), ["an error", "first half, second half"]);
    }

    /// The Engine's own words for a port or a name taken mean "try another
    /// port"; anything else fails the start as it is.
    #[test]
    fn issue19_a_container_name_in_use_is_a_port_taken() {
        let name = "creating a container of demo:1.0: Docker responded with status code 409: Conflict. The container name \"/slipway-staging-web-40649\" is already in use by container \"3f2a\". You have to remove (or rename) that container to be able to reuse that name.";
        let port = "starting a container: Docker responded with status code 500: driver failed programming external connectivity: Bind for 127.0.0.1:40649 failed: port is already allocated";
        let other = "creating a container of demo:1.0: Docker responded with status code 404: No such image: demo:1.0";
        assert_eq!(port_taken(name.into()).kind, TargetErrorKind::PortTaken);
        assert_eq!(port_taken(port.into()).kind, TargetErrorKind::PortTaken);
        assert_eq!(port_taken(other.into()).kind, TargetErrorKind::Failed);
    }

    #[test]
    fn a_store_scope_ignores_credentials_but_not_the_database() {
        let a = crate::process::scope_of_store("postgres://slipway:pw1@db.example.org:5432/prod");
        assert_eq!(a, crate::process::scope_of_store("postgres://other:pw2@db.example.org:5432/prod"));
        assert_ne!(a, crate::process::scope_of_store("postgres://slipway:pw1@db.example.org:5432/staging"));
        assert_eq!(a.len(), 12);
    }
}
