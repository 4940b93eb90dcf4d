//! The service manager of a node: for every (environment, service) it
//! runs, its proxy, its instances and their version. Rollouts
//! (`<service>.rollout` jobs) go through [`ServiceManager::rollout`]; a
//! supervisor restarts instances that die; [`ServiceManager::restore`]
//! brings every recorded service back when the node starts.
//!
//! See docs/design/rollouts.md for the rollout loop and its failure cases.
//!
//! **Architecture Invariant:** the manager sees targets only through
//! `dyn Target` / `dyn Instance`, found by the name in the service's spec:
//! health checks, the proxy and the rollout logic are the same for every
//! target, and an instance is reached at the address its target gives.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::health;
use super::proxy::Proxy;
use crate::config::service::{ServiceSpec, Strategy};
use crate::process::substitute;
use crate::store::{Outcome, ServiceEvent, ServiceRow, Store, now_ms};
use crate::targets::{Instance, InstanceRequest, JobRequest, OutputSink, RunResult, Stream, Target, Targets};

/// A rollout to run: the job's deployment, the service as the pinned
/// revision declares it, and the version.
#[derive(Debug, Clone)]
pub struct RolloutRequest {
    /// Tarball services: the release's checksum (`workdir` is its
    /// unpacked directory).
    pub sha256: Option<String>,
    pub environment: String,
    pub deployment_id: i64,
    pub revision: String,
    pub version: String,
    pub spec: ServiceSpec,
    pub workdir: PathBuf,
}

/// The version a service runs and how to start more of it.
#[derive(Clone)]
struct Generation {
    sha256: Option<String>,
    version: String,
    spec: ServiceSpec,
    workdir: PathBuf,
    revision: String,
    deployment_id: i64,
}

#[derive(Default)]
struct ServiceState {
    current: Option<Generation>,
    instances: Vec<Arc<dyn Instance>>,
    /// Restarts by the supervisor since the last rollout, for status.
    restarts: u32,
}

struct Managed {
    proxy: Proxy,
    /// Stops this entry's proxy and supervisor (node shutdown, or the
    /// service moved to another `listen` address).
    stop: CancellationToken,
    /// Held for a whole rollout: one rollout per service at a time, and
    /// the supervisor keeps out while it runs. Taken through
    /// [`Managed::hold`], never directly, so that `shown` follows it.
    state: Mutex<ServiceState>,
    /// The state as its last holder left it: what `status` shows, without
    /// waiting for a rollout (which can take minutes: health deadlines,
    /// drains, stop graces) to let go of `state`.
    shown: std::sync::Mutex<Shown>,
}

/// What [`ServiceManager::status`] reads of a service.
#[derive(Default, Clone)]
struct Shown {
    version: Option<String>,
    instances: Vec<Arc<dyn Instance>>,
    restarts: u32,
}

impl Managed {
    fn new(proxy: Proxy, stop: CancellationToken, state: ServiceState) -> Managed {
        let shown = std::sync::Mutex::new(Shown::of(&state));
        Managed { proxy, stop, state: Mutex::new(state), shown }
    }

    async fn hold(&self) -> Held<'_> {
        Held { state: self.state.lock().await, shown: &self.shown }
    }

    fn try_hold(&self) -> Option<Held<'_>> {
        Some(Held { state: self.state.try_lock().ok()?, shown: &self.shown })
    }

    fn shown(&self) -> Shown {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The held state of a service; what it holds when let go (however it
/// is let go: at the end, on an early return, a cancelled rollout) is
/// what `status` shows from then on.
struct Held<'a> {
    state: tokio::sync::MutexGuard<'a, ServiceState>,
    shown: &'a std::sync::Mutex<Shown>,
}

impl Shown {
    fn of(s: &ServiceState) -> Shown {
        Shown { version: s.current.as_ref().map(|g| g.version.clone()), instances: s.instances.clone(), restarts: s.restarts }
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = ServiceState;
    fn deref(&self) -> &ServiceState {
        &self.state
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut ServiceState {
        &mut self.state
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = Shown::of(&self.state);
    }
}

/// How long a rollout after `stop_all_services` waits for the stopped
/// proxy to close its port before binding it again.
const PROXY_RELEASE: Duration = Duration::from_secs(5);

pub struct ServiceManager {
    /// Where instances start, by the service's target; `verify` steps run
    /// on the default target (they check the service from the node).
    targets: Arc<Targets>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    client: reqwest::Client,
    services: Mutex<HashMap<(String, String), Arc<Managed>>>,
    /// Per (environment, service): the values of the secrets its instances
    /// were last given, masked in what `note` records (an instance's last
    /// output may print them).
    redactors: std::sync::Mutex<HashMap<(String, String), crate::config::secret::Redactor>>,
}

/// What `gc` found (or removed, when `applied`).
#[derive(Debug, Clone)]
pub struct GarbageReport {
    pub garbage: crate::targets::Garbage,
    pub applied: bool,
    /// Why some of it was not looked at or left alone.
    pub notes: Vec<String>,
}

/// What `status` shows of a service on this node.
#[derive(Debug, Clone)]
pub struct ServiceStatus {
    pub environment: String,
    pub service: String,
    pub version: Option<String>,
    pub listen: SocketAddr,
    pub instances: Vec<(SocketAddr, String, bool)>,
    pub restarts: u32,
}

/// Output of a rollout, line by line, into the job's log; nowhere for
/// the supervisor and restore, which record outcomes as service events.
struct Say<'a>(Option<&'a OutputSink>);

impl Say<'_> {
    async fn line(&self, s: impl Into<String>) {
        if let Some(out) = self.0 {
            let _ = out.send((Stream::Stdout, format!("[rollout] {}", s.into())).into()).await;
        }
    }
}

/// A digest of a spec, for labels: the same for the same settings, and
/// the same as older builds computed for a spec they could hold (so a
/// restart after an upgrade adopts what the older build started).
fn spec_digest(spec: &ServiceSpec) -> String {
    use sha2::Digest;
    let json = crate::store::spec::legacy_service_json(spec).unwrap_or_else(|| serde_json::to_string(spec).unwrap_or_default());
    hex::encode(&sha2::Sha256::digest(json.as_bytes())[..8])
}

/// Health checks and verifies: no pooled connections (an instance may be gone).
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    crate::http::client(|b| b.connect_timeout(Duration::from_secs(2)).pool_max_idle_per_host(0))
}

impl ServiceManager {
    /// Every service on `target` (in-process tests and benchmarks).
    pub fn new(target: Arc<dyn Target>, store: Arc<dyn Store>, shutdown: CancellationToken) -> Arc<Self> {
        Self::with_targets(Arc::new(Targets::only(crate::targets::DEFAULT, target)), store, shutdown)
    }

    /// `targets` resolves the target each service runs on.
    pub fn with_targets(targets: Arc<Targets>, store: Arc<dyn Store>, shutdown: CancellationToken) -> Arc<Self> {
        let client = http_client().unwrap_or_default();
        Arc::new(ServiceManager { targets, store, shutdown, client, services: Mutex::new(HashMap::new()), redactors: Default::default() })
    }

    /// The target a service's instances run on.
    async fn target_of(&self, spec: &ServiceSpec) -> Result<Arc<dyn Target>, String> {
        self.targets.get(&spec.target).await.map_err(|e| e.message)
    }

    /// The service's entry, binding its proxy on first use. A port in use
    /// is an error here, before any instance starts.
    async fn managed(self: &Arc<Self>, environment: &str, spec: &ServiceSpec) -> Result<Arc<Managed>, String> {
        let key = (environment.to_string(), spec.name.clone());
        let mut services = self.services.lock().await;
        if let Some(m) = services.get(&key) {
            if m.stop.is_cancelled() {
                // Stopped (`stop_all_services`): its proxy and restart
                // loop have ended, so a later rollout starts afresh, on a
                // proxy of its own once the old one has let go of the
                // port (its connections end within their own timeouts).
                let old = m.clone();
                services.remove(&key);
                let _ = tokio::time::timeout(PROXY_RELEASE, old.proxy.stopped()).await;
            } else if m.proxy.local_addr() == spec.listen || spec.listen.port() == 0 {
                return Ok(m.clone());
            }
        }
        let stop = self.shutdown.child_token();
        let proxy = Proxy::bind(&spec.name, spec.listen, stop.clone()).await.map_err(|e| e.to_string())?;
        // The address changed in the config: the new proxy takes over the
        // running version and its instances (what a failed rollout returns
        // to); the old proxy and its supervisor stop.
        let mut state = ServiceState::default();
        if let Some(old) = services.get(&key) {
            let mut o = old.hold().await;
            state.current = o.current.take();
            state.instances = std::mem::take(&mut o.instances);
            state.restarts = o.restarts;
            proxy.set_backends(state.instances.iter().map(|i| i.addr()).collect());
            old.stop.cancel();
        }
        let m = Arc::new(Managed::new(proxy, stop, state));
        services.insert(key, m.clone());
        let me = self.clone();
        let (env, m2) = (environment.to_string(), m.clone());
        tokio::spawn(async move { me.supervise(env, m2).await });
        Ok(m)
    }

    /// Record what happened to a service outside a deployment: in the
    /// server log and in the store (`GET …/services/{env}/{name}/events`).
    async fn note(&self, environment: &str, service: &str, kind: &str, message: String) {
        let message = match self.redactors.lock().ok().and_then(|r| r.get(&(environment.to_string(), service.to_string())).cloned()) {
            Some(r) => r.redact(&message),
            None => message,
        };
        if kind.ends_with("failed") {
            tracing::warn!(service, env = environment, kind, "{message}");
        } else {
            tracing::info!(service, env = environment, kind, "{message}");
        }
        let event = ServiceEvent { environment: environment.to_string(), service: service.to_string(), at: now_ms(), kind: kind.to_string(), message };
        if let Err(e) = self.store.record_service_event(event).await {
            tracing::warn!(service, env = environment, error = %e, "cannot record a service event");
        }
    }

    fn values(&self, environment: &str, g: &Generation, port: u16) -> BTreeMap<&'static str, String> {
        let mut v = BTreeMap::new();
        v.insert("port", port.to_string());
        v.insert("version", g.version.clone());
        v.insert("service", g.spec.name.clone());
        v.insert("env", environment.to_string());
        v.insert("deployment", g.deployment_id.to_string());
        v.insert("revision", g.revision.clone());
        v
    }

    /// Start one instance of `g`; where it listens is its target's choice.
    async fn start_one(&self, environment: &str, g: &Generation) -> Result<Arc<dyn Instance>, String> {
        // Every placeholder but `{port}`, which the target fills.
        let mut values = self.values(environment, g, 0);
        values.remove("port");
        // Read once, now, on this node: a rotated secret reaches the next
        // instance started.
        let read = |m: &BTreeMap<String, crate::config::secret::SecretRef>| -> Result<BTreeMap<String, (String, crate::config::secret::Secret)>, String> {
            m.iter().map(|(k, r)| Ok((k.clone(), (r.name.clone(), r.read()?)))).collect()
        };
        let env_secrets = read(&g.spec.secrets)?;
        let file_secrets = read(&g.spec.secret_files)?;
        let req = InstanceRequest {
            service: g.spec.name.clone(),
            environment: environment.to_string(),
            version: g.version.clone(),
            argv: g.spec.command.iter().map(|a| substitute(a, &values)).collect(),
            env: g.spec.env.iter().map(|(k, v)| (k.clone(), substitute(v, &values))).collect(),
            workdir: g.workdir.clone(),
            // The digest pinned when the deploy was accepted, never the
            // tag: a tag moved since changes nothing.
            image: g.spec.image.as_ref().map(|i| match &g.sha256 {
                Some(hex) => format!("{}@sha256:{hex}", i.repository),
                None => format!("{}:{}", i.repository, g.version),
            }),
            settings: g.spec.settings.clone(),
            deployment_id: g.deployment_id,
            spec_digest: spec_digest(&g.spec),
            secret_env: env_secrets.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect(),
            secret_files: file_secrets.iter().map(|(p, (_, v))| (p.clone(), v.clone())).collect(),
        };
        // What note() masks: the values this instance was given.
        let given = env_secrets.values().chain(file_secrets.values()).map(|(name, v)| (name.as_str(), v));
        self.remember(environment, &g.spec.name, crate::config::secret::Redactor::of_values(given));
        let target = self.target_of(&g.spec).await?;
        target.start_instance(req).await.map_err(|e| e.message)
    }

    /// Start `count` instances of `g` and wait until all are healthy. On
    /// any failure every one of them is stopped and the error says why.
    async fn start_healthy(
        &self,
        environment: &str,
        g: &Generation,
        count: usize,
        say: &Say<'_>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Arc<dyn Instance>>, String> {
        // Started side by side: creating a container is most of a
        // rollout's time on the docker target.
        let results = futures_util::future::join_all((0..count).map(|_| self.start_one(environment, g))).await;
        let mut started = Vec::new();
        let mut first_error = None;
        for r in results {
            match r {
                Ok(i) => {
                    say.line(format!("started {} {} on {} ({})", g.spec.name, g.version, i.addr(), i.id())).await;
                    started.push(i);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            self.stop_all(&started, g.spec.stop_grace).await;
            return Err(e);
        }
        let checks = started.iter().map(|i| {
            let values = self.values(environment, g, i.addr().port());
            let i = i.clone();
            async move { health::wait_healthy(&self.client, &g.spec.health, &*i, &g.workdir, &values, cancel).await }
        });
        let results = futures_util::future::join_all(checks).await;
        let mut failure = None;
        for (i, r) in started.iter().zip(results) {
            match r {
                Ok(seen) => say.line(format!("{} is healthy: {seen}", i.addr())).await,
                Err(e) => {
                    say.line(format!("{} is not healthy: {e}", i.addr())).await;
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            None => Ok(started),
            Some(e) => {
                self.stop_all(&started, g.spec.stop_grace).await;
                Err(e)
            }
        }
    }

    async fn stop_all(&self, instances: &[Arc<dyn Instance>], grace: Duration) {
        futures_util::future::join_all(instances.iter().map(|i| i.stop(grace))).await;
    }

    /// Out of the proxy first, then wait for in-flight requests (at most
    /// `drain`), then stop.
    async fn retire(&self, proxy: &Proxy, keep: &[Arc<dyn Instance>], old: &[Arc<dyn Instance>], drain: Duration, grace: Duration, say: &Say<'_>) {
        if old.is_empty() {
            return;
        }
        proxy.set_backends(keep.iter().map(|i| i.addr()).collect());
        let in_flight: usize = old.iter().map(|i| proxy.in_flight(i.addr())).sum();
        let addrs: Vec<String> = old.iter().map(|i| i.addr().to_string()).collect();
        say.line(format!("draining {} ({in_flight} request(s) in flight, at most {})", addrs.join(", "), humantime::format_duration(drain))).await;
        let until = tokio::time::Instant::now() + drain;
        while tokio::time::Instant::now() < until && old.iter().any(|i| proxy.in_flight(i.addr()) > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_all(old, grace).await;
        for i in old {
            say.line(format!("stopped {} ({})", i.addr(), i.id())).await;
        }
    }

    /// Run one rollout to its end: the service runs `req.version` on all
    /// its instances, or (on failure) what it ran before.
    /// The targets instances start on (`slipway hosts` asks them too).
    pub fn targets(&self) -> &Arc<Targets> {
        &self.targets
    }

    pub async fn rollout(self: &Arc<Self>, req: RolloutRequest, out: OutputSink, cancel: CancellationToken) -> RunResult {
        if runs_own_rollout(&req.spec) {
            return self.own_rollout(req, out, cancel).await;
        }
        let say = Say(Some(&out));
        let env = req.environment.clone();
        let m = match self.managed(&env, &req.spec).await {
            Ok(m) => m,
            Err(e) => return RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(e), parts: Vec::new() },
        };
        let mut state = m.hold().await;
        let new = Generation {
            sha256: req.sha256.clone(),
            version: req.version.clone(),
            spec: req.spec.clone(),
            workdir: req.workdir.clone(),
            revision: req.revision.clone(),
            deployment_id: req.deployment_id,
        };
        let n = new.spec.instances as usize;
        let old_gen = state.current.clone();
        let old: Vec<Arc<dyn Instance>> = std::mem::take(&mut state.instances);
        if let Some(g) = &old_gen
            && g.version == new.version
            && g.spec == new.spec
            && g.sha256 == new.sha256
            && g.workdir == new.workdir
            && old.len() == n
            && old.iter().all(|i| i.exit().is_none())
        {
            state.instances = old;
            say.line(format!("{} already runs {} on {n} instance(s): nothing to do", new.spec.name, new.version)).await;
            return self.commit(&env, &new, None, &say).await;
        }
        say.line(format!(
            "rolling {} out: {} → {} ({n} instance(s), {})",
            new.spec.name,
            old_gen.as_ref().map(|g| g.version.as_str()).unwrap_or("nothing"),
            new.version,
            match new.spec.rollout.strategy {
                Strategy::BlueGreen => "blue-green".to_string(),
                Strategy::Rolling { max_surge, max_unavailable } => format!("rolling, max surge {max_surge}, max unavailable {max_unavailable}"),
            }
        ))
        .await;
        let result = match new.spec.rollout.strategy {
            Strategy::BlueGreen => self.blue_green(&env, &m.proxy, &new, &old, &say, &cancel).await,
            Strategy::Rolling { max_surge, max_unavailable } => {
                self.rolling(&env, &m.proxy, &new, old.clone(), max_surge as usize, max_unavailable as usize, &say, &cancel).await
            }
        };
        let mut new_instances = match result {
            Ok(instances) => instances,
            Err((why, survivors)) => {
                // Back to the last good version: keep what still runs of
                // it, start what is missing.
                return self.roll_back(&env, &m, &mut state, old_gen, survivors, why, &say).await;
            }
        };
        state.current = Some(new.clone());
        state.restarts = 0;
        if let Some(verify) = &new.spec.verify {
            say.line(format!("verifying: {}", verify.command.join(" "))).await;
            let values = self.values(&env, &new, new.spec.listen.port());
            let job = JobRequest {
                deployment_id: new.deployment_id,
                job: format!("{}.verify", new.spec.name),
                attempt: 1,
                spec: crate::store::JobSpec { secrets: new.spec.secrets.clone(), ..crate::store::JobSpec::verify(verify) },
                workdir: new.workdir.clone(),
                values,
                stopping: Default::default(),
                resuming: false,
            };
            let r = match self.targets.get(crate::targets::DEFAULT).await {
                Ok(t) => t.run(job, out.clone(), cancel.child_token()).await,
                Err(e) => RunResult::failed(e.message),
            };
            if r.outcome != Outcome::Succeeded {
                let why = format!("verify failed: {}", r.reason.unwrap_or_else(|| r.outcome.to_string()));
                say.line(why.clone()).await;
                let survivors = Vec::new();
                // The old instances are gone: roll back starts them anew.
                let stale = std::mem::take(&mut new_instances);
                let res = self.roll_back(&env, &m, &mut state, old_gen, survivors, why, &say).await;
                self.stop_all(&stale, new.spec.stop_grace).await;
                return res;
            }
            say.line("verify passed").await;
        }
        // All traffic is on the new version and it passed verify: the
        // commit point a restart honours (and what a rollback returns from).
        if let RunResult { outcome: Outcome::Failed, reason, .. } = self.commit(&env, &new, None, &say).await {
            state.instances = new_instances;
            let why = reason.unwrap_or_default();
            return RunResult {
                parts: Vec::new(),
                outcome: Outcome::Failed,
                exit_code: None,
                reason: Some(format!(
                    "{} serves {}, but {why}: a restart of this node would bring back the version recorded before",
                    new.spec.name, new.version
                )),
            };
        }
        state.instances = new_instances;
        say.line(format!("{} runs {} on {n} instance(s) behind {}", new.spec.name, new.version, new.spec.listen)).await;
        RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() }
    }

    /// A target that rolls out itself (SSH hosts): it does the rollout (and
    /// the rollback); what it rolled out is recorded here as for any.
    async fn own_rollout(self: &Arc<Self>, req: RolloutRequest, out: OutputSink, cancel: CancellationToken) -> RunResult {
        let target = match self.targets.get(&req.spec.target).await {
            Ok(t) => t,
            Err(e) => return RunResult::failed(e.message),
        };
        let result = target.rollout(&req, out.clone(), cancel).await;
        if result.outcome != Outcome::Succeeded {
            return result;
        }
        let g = Generation {
            sha256: req.sha256.clone(),
            version: req.version.clone(),
            spec: req.spec.clone(),
            workdir: req.workdir.clone(),
            revision: req.revision.clone(),
            deployment_id: req.deployment_id,
        };
        // Recorded first: a node that dies now restores what the target
        // runs, not what it ran before.
        if let failed @ RunResult { outcome: Outcome::Failed, .. } = self.commit(&req.environment, &g, None, &Say(Some(&out))).await {
            return failed;
        }
        // Then what the target says runs, in its own names, for status and
        // why (the same version again: the row's previous one is kept).
        if let Some(target_ref) = target.running_ref(&req.spec).await {
            let _ = self.commit(&req.environment, &g, Some(target_ref), &Say(None)).await;
        }
        result
    }

    /// After a restart: a service its target rolls out itself, brought to
    /// its recorded version (see `restore`).
    async fn converge(self: Arc<Self>, req: RolloutRequest) {
        // Not beside a deployment of the service (another node's, or the
        // one this node's death cut off, until its lease is reaped): its
        // rollout would be taken for the target going back. After one, the
        // record may have moved on: then there is nothing to restore.
        let lock = crate::submit::lock_key(&req.environment, Some(&req.spec.name));
        let mut waited = false;
        loop {
            match self.store.in_flight_on(&lock).await {
                Ok(false) => break,
                Ok(true) => waited = true,
                Err(e) => {
                    tracing::warn!(service = %req.spec.name, env = %req.environment, error = %e, "cannot tell whether a deployment of the service is under way; asking again")
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        if waited {
            let now =
                self.store.services().await.ok().and_then(|rows| rows.into_iter().find(|r| r.environment == req.environment && r.service == req.spec.name));
            if now.as_ref().is_some_and(|r| r.deployment_id != req.deployment_id) {
                return; // a later deployment recorded what runs
            }
        }
        let target = match self.targets.get(&req.spec.target).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(service = %req.spec.name, env = %req.environment, error = %e.message, "cannot restore the service");
                return;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::targets::Line>(256);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = target.rollout(&req, tx, self.shutdown.child_token()).await;
        let _ = drain.await;
        let (kind, message) = match r.outcome {
            Outcome::Succeeded => ("restored", format!("{} {} restored on its hosts", req.spec.name, req.version)),
            _ => ("restore_failed", format!("cannot restore {} {} on its hosts: {}", req.spec.name, req.version, r.reason.unwrap_or_default())),
        };
        self.note(&req.environment, &req.spec.name, kind, message).await;
    }

    async fn commit(&self, env: &str, g: &Generation, target_ref: Option<String>, say: &Say<'_>) -> RunResult {
        let spec = crate::store::spec::encode_service(&g.spec);
        let row = ServiceRow {
            environment: env.to_string(),
            service: g.spec.name.clone(),
            version: g.version.clone(),
            previous_version: None,
            spec,
            revision: g.revision.clone(),
            deployment_id: g.deployment_id,
            updated_at: now_ms(),
            artifact_dir: g.spec.artifact.as_ref().map(|_| g.workdir.display().to_string()),
            sha256: g.sha256.clone(),
            previous_sha256: None,
            target_ref,
        };
        // The store may blink: a few tries, then the rollout fails.
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=5 {
            match self.store.set_service(row.clone()).await {
                Ok(()) => {
                    say.line(format!("recorded: {} {} runs {}", env, g.spec.name, g.version)).await;
                    return RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() };
                }
                Err(e) if attempt < 5 => {
                    say.line(format!("cannot record the new version yet ({e}); retrying")).await;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    return RunResult {
                        parts: Vec::new(),
                        outcome: Outcome::Failed,
                        exit_code: None,
                        reason: Some(format!("cannot record the new version: {e}")),
                    };
                }
            }
        }
        RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some("cannot record the new version".into()), parts: Vec::new() }
    }

    /// Start all new instances, switch all traffic at once, retire the old.
    async fn blue_green(
        &self,
        env: &str,
        proxy: &Proxy,
        new: &Generation,
        old: &[Arc<dyn Instance>],
        say: &Say<'_>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Arc<dyn Instance>>, (String, Vec<Arc<dyn Instance>>)> {
        let n = new.spec.instances as usize;
        let started = self.start_healthy(env, new, n, say, cancel).await.map_err(|e| (e, old.to_vec()))?;
        say.line(format!("traffic → {} ({} instance(s))", new.version, started.len())).await;
        self.retire(proxy, &started, old, new.spec.rollout.drain, new.spec.stop_grace, say).await;
        Ok(started)
    }

    /// Replace instances a batch at a time within the surge/unavailable
    /// budget. On failure returns the old instances still running.
    #[allow(clippy::too_many_arguments)]
    async fn rolling(
        &self,
        env: &str,
        proxy: &Proxy,
        new: &Generation,
        mut old: Vec<Arc<dyn Instance>>,
        surge: usize,
        unavailable: usize,
        say: &Say<'_>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Arc<dyn Instance>>, (String, Vec<Arc<dyn Instance>>)> {
        let n = new.spec.instances as usize;
        let mut fresh: Vec<Arc<dyn Instance>> = Vec::new();
        // Dead old instances count as unavailable already.
        old.retain(|i| i.exit().is_none());
        while fresh.len() < n {
            if cancel.is_cancelled() {
                let f = std::mem::take(&mut fresh);
                self.stop_all(&f, new.spec.stop_grace).await;
                return Err(("stopped on request".into(), old));
            }
            let missing = n - fresh.len();
            // Take down first what the unavailable budget allows (only
            // instances that will not be needed again).
            let down = unavailable.min(old.len()).min(missing);
            if down > 0 {
                let gone: Vec<_> = old.drain(..down).collect();
                let keep: Vec<_> = old.iter().chain(fresh.iter()).cloned().collect();
                self.retire(proxy, &keep, &gone, new.spec.rollout.drain, new.spec.stop_grace, say).await;
            }
            let batch = (surge + down).max(1).min(missing);
            match self.start_healthy(env, new, batch, say, cancel).await {
                Ok(started) => fresh.extend(started),
                Err(e) => {
                    proxy.set_backends(old.iter().map(|i| i.addr()).collect());
                    let f = std::mem::take(&mut fresh);
                    self.stop_all(&f, new.spec.stop_grace).await;
                    return Err((e, old));
                }
            }
            let serving: Vec<_> = old.iter().chain(fresh.iter()).cloned().collect();
            proxy.set_backends(serving.iter().map(|i| i.addr()).collect());
            say.line(format!("traffic → {} of {} instance(s) on {}", fresh.len(), n, new.version)).await;
            // Back to at most n instances.
            let excess = (old.len() + fresh.len()).saturating_sub(n).min(old.len());
            if excess > 0 {
                let gone: Vec<_> = old.drain(..excess).collect();
                let keep: Vec<_> = old.iter().chain(fresh.iter()).cloned().collect();
                self.retire(proxy, &keep, &gone, new.spec.rollout.drain, new.spec.stop_grace, say).await;
            }
        }
        let rest = std::mem::take(&mut old);
        self.retire(proxy, &fresh, &rest, new.spec.rollout.drain, new.spec.stop_grace, say).await;
        Ok(fresh)
    }

    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        env: &str,
        m: &Managed,
        state: &mut ServiceState,
        old_gen: Option<Generation>,
        mut survivors: Vec<Arc<dyn Instance>>,
        why: String,
        say: &Say<'_>,
    ) -> RunResult {
        let Some(g) = old_gen else {
            m.proxy.set_backends(vec![]);
            state.current = None;
            state.instances = vec![];
            say.line(format!("failed, and there is no earlier version to return to: {why}")).await;
            return RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(why), parts: Vec::new() };
        };
        survivors.retain(|i| i.exit().is_none());
        let missing = (g.spec.instances as usize).saturating_sub(survivors.len());
        say.line(format!("rolling back to {} ({} instance(s) still run, starting {missing})", g.version, survivors.len())).await;
        if missing > 0 {
            // No cancel here: going back is not optional.
            match self.start_healthy(env, &g, missing, say, &CancellationToken::new()).await {
                Ok(more) => survivors.extend(more),
                Err(e) => say.line(format!("could not start every instance of {}: {e}", g.version)).await,
            }
        }
        m.proxy.set_backends(survivors.iter().map(|i| i.addr()).collect());
        state.instances = survivors;
        state.current = Some(g.clone());
        // The store still names the old version unless the failure came
        // after the commit (verify): say it again either way.
        let _ = self.commit(env, &g, None, say).await;
        say.line(format!("traffic is on {} again", g.version)).await;
        RunResult { outcome: Outcome::RolledBack, exit_code: None, reason: Some(format!("rolled back to {}: {why}", g.version)), parts: Vec::new() }
    }

    /// Restart instances that die between rollouts, with backoff, and
    /// keep the proxy on the live ones.
    async fn supervise(self: Arc<Self>, env: String, m: Arc<Managed>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            tokio::select! {
                biased;
                _ = m.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            // try_lock: a rollout holds the lock and handles its own.
            let Some(mut state) = m.try_hold() else { continue };
            // Stopped while we slept or waited: whoever stopped us took
            // the instances, and must not see new ones appear.
            if m.stop.is_cancelled() {
                return;
            }
            let Some(g) = state.current.clone() else { continue };
            let dead: Vec<usize> = state.instances.iter().enumerate().filter(|(_, i)| i.exit().is_some()).map(|(n, _)| n).collect();
            // Missing: died now, or never started (a restore that failed).
            let missing = (g.spec.instances as usize).saturating_sub(state.instances.len() - dead.len());
            if missing == 0 {
                backoff = Duration::from_secs(1);
                continue;
            }
            let mut died = Vec::new();
            let mut gone = Vec::new();
            for &d in dead.iter().rev() {
                let i = state.instances.remove(d);
                died.push(health::exited(&*i, &i.exit().unwrap_or_default()));
                gone.push(i);
            }
            // Ended already, but what it leaves (an exited container and
            // its name) must go too: stop() cleans up on every target.
            self.stop_all(&gone, Duration::from_secs(1)).await;
            for why in died {
                self.note(&env, &g.spec.name, "instance_died", format!("{why}; restarting")).await;
            }
            m.proxy.set_backends(state.instances.iter().map(|i| i.addr()).collect());
            let say = Say(None);
            match self.start_healthy(&env, &g, missing, &say, &self.shutdown.child_token()).await {
                Ok(more) => {
                    state.restarts += more.len() as u32;
                    let started: Vec<String> = more.iter().map(|i| format!("{} ({})", i.addr(), i.id())).collect();
                    state.instances.extend(more);
                    m.proxy.set_backends(state.instances.iter().map(|i| i.addr()).collect());
                    let restarts = state.restarts;
                    drop(state);
                    self.note(
                        &env,
                        &g.spec.name,
                        "restarted",
                        format!("{} {} restarted as {} ({restarts} restarts since the last rollout)", g.spec.name, g.version, started.join(", ")),
                    )
                    .await;
                }
                Err(e) => {
                    drop(state);
                    self.note(
                        &env,
                        &g.spec.name,
                        "restart_failed",
                        format!("restarting {} {} failed: {e}; next try in {}", g.spec.name, g.version, humantime::format_duration(backoff)),
                    )
                    .await;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Bring every service recorded in the store back at its recorded
    /// version (a node start: after a crash, nothing of ours still runs).
    /// `workdir` unpacks a revision. Errors are logged, not fatal: one
    /// broken service must not keep the others down.
    pub async fn restore<W, F>(self: &Arc<Self>, workdir: W)
    where
        W: Fn(String) -> F,
        F: std::future::Future<Output = Result<PathBuf, String>>,
    {
        let rows = match self.store.services().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read recorded services; none restored");
                self.targets.after_restore().await;
                return;
            }
        };
        for row in rows {
            let spec: ServiceSpec = match crate::store::spec::decode_service(&row.spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(service = %row.service, env = %row.environment, error = %e, "recorded service spec unreadable; not restored");
                    continue;
                }
            };
            let dir = match &row.artifact_dir {
                // A tarball service runs in its unpacked release.
                Some(d) if Path::new(d).join(".complete").exists() => Ok(PathBuf::from(d)),
                Some(d) => Err(format!("its unpacked release {d} is gone; deploy it again")),
                None => workdir(row.revision.clone()).await,
            };
            let dir = match dir {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(service = %row.service, env = %row.environment, error = %e, "cannot unpack the service's revision; not restored");
                    continue;
                }
            };
            if runs_own_rollout(&spec) {
                // Runs elsewhere, under its target's own care (a supervisor
                // on each host): brought to its recorded version there, in
                // the background (hosts may be slow or dead). What already
                // runs it is kept; what a rollout cut short by this node's
                // death left on a newer version is rolled back.
                let req = RolloutRequest {
                    sha256: row.sha256.clone(),
                    environment: row.environment.clone(),
                    deployment_id: row.deployment_id,
                    revision: row.revision.clone(),
                    version: row.version.clone(),
                    spec,
                    workdir: dir,
                };
                let this = self.clone();
                tokio::spawn(async move { this.converge(req).await });
                continue;
            }
            let m = match self.managed(&row.environment, &spec).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(service = %row.service, env = %row.environment, error = %e, "cannot serve the service");
                    continue;
                }
            };
            let g = Generation {
                sha256: row.sha256.clone(),
                version: row.version.clone(),
                spec: spec.clone(),
                workdir: dir,
                revision: row.revision.clone(),
                deployment_id: row.deployment_id,
            };
            let mut state = m.hold().await;
            // Instances of the recorded version that a dead Slipway left
            // running are kept (once healthy) instead of replaced.
            let adopted = self.adopt(&row.environment, &g).await;
            let kept = adopted.len();
            let wanted = (spec.instances as usize).saturating_sub(kept);
            match self.start_healthy(&row.environment, &g, wanted, &Say(None), &self.shutdown.child_token()).await {
                Ok(started) => {
                    let instances: Vec<Arc<dyn Instance>> = adopted.into_iter().chain(started).collect();
                    m.proxy.set_backends(instances.iter().map(|i| i.addr()).collect());
                    let n = instances.len();
                    state.instances = instances;
                    let how = if kept > 0 { format!(" ({kept} adopted from the Slipway that ran them before)") } else { String::new() };
                    self.note(
                        &row.environment,
                        &row.service,
                        "restored",
                        format!("{} {} restored on {n} instance(s) behind {}{how}", row.service, row.version, spec.listen),
                    )
                    .await;
                }
                Err(e) => {
                    // What was adopted healthy keeps serving; the
                    // supervisor starts the rest.
                    m.proxy.set_backends(adopted.iter().map(|i| i.addr()).collect());
                    state.instances = adopted;
                    self.note(
                        &row.environment,
                        &row.service,
                        "restore_failed",
                        format!("cannot restore {} {} fully ({kept} adopted): {e}; the supervisor keeps trying", row.service, row.version),
                    )
                    .await;
                }
            }
            state.current = Some(g);
        }
        // What was not adopted may go now.
        self.targets.after_restore().await;
    }

    /// The values of the secrets `g`'s instances get: what `note` masks.
    fn remember_secrets(&self, environment: &str, g: &Generation) {
        self.remember(environment, &g.spec.name, crate::config::secret::Redactor::of(g.spec.secret_refs()));
    }

    /// Added to what was remembered, never in place of it: an instance
    /// started before a secret's rotation still has the old value.
    fn remember(&self, environment: &str, service: &str, redactor: crate::config::secret::Redactor) {
        if let Ok(mut r) = self.redactors.lock() {
            let key = (environment.to_string(), service.to_string());
            let joined = match r.get(&key) {
                Some(older) => redactor.and(older),
                None => redactor,
            };
            r.insert(key, joined);
        }
    }

    /// Take over healthy instances of `g` left by a dead Slipway (up to the
    /// wanted count); the rest of what it left is swept afterwards.
    async fn adopt(&self, environment: &str, g: &Generation) -> Vec<Arc<dyn Instance>> {
        // Adopted instances may print secrets too.
        self.remember_secrets(environment, g);
        let Ok(target) = self.target_of(&g.spec).await else { return vec![] };
        let image = g.spec.image.as_ref().and_then(|i| g.sha256.as_ref().map(|hex| format!("{}@sha256:{hex}", i.repository)));
        let spec_digest = spec_digest(&g.spec);
        let wanted = crate::targets::Adoptable { environment, service: &g.spec.name, version: &g.version, image: image.as_deref(), spec_digest: &spec_digest };
        let found = target.adopt(&wanted).await;
        let checks = found.iter().map(|i| {
            let values = self.values(environment, g, i.addr().port());
            let i = i.clone();
            let cancel = self.shutdown.child_token();
            async move { health::wait_healthy(&self.client, &g.spec.health, &*i, &g.workdir, &values, &cancel).await.is_ok() }
        });
        let healthy = futures_util::future::join_all(checks).await;
        let mut keep = Vec::new();
        let mut drop = Vec::new();
        for (i, ok) in found.into_iter().zip(healthy) {
            if ok && keep.len() < g.spec.instances as usize { keep.push(i) } else { drop.push(i) }
        }
        self.stop_all(&drop, g.spec.stop_grace).await;
        keep
    }

    pub async fn status(&self) -> Vec<ServiceStatus> {
        let services: Vec<((String, String), Arc<Managed>)> = self.services.lock().await.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut out = Vec::new();
        for ((environment, service), m) in services {
            // As the last holder left it: during a rollout, what ran
            // before it (whose instances it may be stopping).
            let shown = m.shown();
            out.push(ServiceStatus {
                environment,
                service,
                version: shown.version,
                listen: m.proxy.local_addr(),
                instances: shown.instances.iter().map(|i| (i.addr(), i.id(), i.exit().is_none())).collect(),
                restarts: shown.restarts,
            });
        }
        out.sort_by(|a, b| (&a.environment, &a.service).cmp(&(&b.environment, &b.service)));
        out
    }

    /// What `slipway gc` removes (with `apply`, removes it), asked of every
    /// target: what it made that no live Slipway holds (containers of dead
    /// Slipway processes), and images of the repositories services deploy
    /// that no environment runs or could roll back to. Nothing else is
    /// ever touched.
    pub async fn garbage(&self, apply: bool) -> Result<GarbageReport, String> {
        let rows = self.store.services().await.map_err(|e| e.to_string())?;
        let mut keep = crate::targets::Keep::default();
        for row in &rows {
            let Ok(spec) = crate::store::spec::decode_service(&row.spec) else { continue };
            if let Some(i) = spec.image {
                keep.repositories.insert(i.repository.into());
                keep.digests.extend([&row.sha256, &row.previous_sha256].into_iter().flatten().map(|h| format!("sha256:{h}")));
            }
        }
        let mut notes = Vec::new();
        if self.targets.is_restoring() {
            notes.push("this node is still restoring its services (and adopting their containers): ask again in a moment".into());
            return Ok(GarbageReport { garbage: Default::default(), applied: apply, notes });
        }
        let mut found = Vec::new();
        for (name, target) in self.targets.each().await {
            let target = match target {
                Ok(t) => t,
                Err(e) => {
                    notes.push(format!("target {name:?} was not asked: {e}"));
                    continue;
                }
            };
            let mut garbage = target.garbage(&keep).await.map_err(|e| e.message)?;
            if garbage.containers.is_empty() && garbage.images.is_empty() {
                continue;
            }
            // A deploy in flight may have pulled an image it has not
            // started yet: images wait until nothing is in flight.
            let in_flight = self.store.deployments(500, None).await.map_err(|e| e.to_string())?.into_iter().filter(|d| !d.state.is_terminal()).count();
            if in_flight > 0 && !garbage.images.is_empty() {
                notes.push(format!("{in_flight} deployment(s) in flight: images are left for a later gc"));
                garbage.images.clear();
            }
            found.push((target, garbage));
        }
        let mut garbage = crate::targets::Garbage::default();
        for (target, g) in found {
            let g = if apply { target.collect(&g).await } else { g };
            garbage.containers.extend(g.containers);
            garbage.images.extend(g.images);
        }
        Ok(GarbageReport { garbage, applied: apply, notes })
    }

    /// Stop every instance (node shutdown, or a host's service stopped).
    /// Their restart loops and proxies stop with them (one token each); a
    /// later rollout on this manager starts the service afresh, with a
    /// proxy and a restart loop of its own (`managed`).
    pub async fn stop_all_services(&self) {
        let services: Vec<Arc<Managed>> = self.services.lock().await.values().cloned().collect();
        // Each restart loop stops first: one that found the instances gone
        // would start them again (issue 19's CI run of a7bab2f: an instance
        // left on an SSH host after its service was stopped).
        for m in &services {
            m.stop.cancel();
        }
        for m in services {
            let mut state = m.hold().await;
            let grace = state.current.as_ref().map(|g| g.spec.stop_grace).unwrap_or(Duration::from_secs(5));
            state.current = None;
            let instances = std::mem::take(&mut state.instances);
            m.proxy.set_backends(vec![]);
            self.stop_all(&instances, grace).await;
        }
    }
}

/// Whether the service's target runs its own rollouts.
fn runs_own_rollout(spec: &ServiceSpec) -> bool {
    crate::targets::kind(&spec.target).is_some_and(|k| k.capabilities().own_rollout)
}
