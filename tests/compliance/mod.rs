//! The target compliance suite: what every target must do for the
//! executor and the service manager to deploy on it, as in vector's sink
//! compliance tests. A recipe: a target supplies a [`Fixture`] (how to
//! start its environment, how to make a working and a broken artifact,
//! how to crash an instance behind the manager's back) and one line,
//! `compliance_suite!(MyFixture);`, in `tests/target_<name>.rs`, which
//! instantiates every property below as a test of its own.
//!
//! In-process properties run a real [`ServiceManager`] (and executor, for
//! jobs) over a real SQLite store and the target under test, deploying the
//! demo service (`slipway-demo`; for image targets, the fixture's image of
//! it). One property runs the real binary: a node killed with SIGKILL, and
//! the next node brings the service back.
//!
//! Every in-process property runs inside [`Harness::run`], which bounds it
//! in time and stops every instance and manager it started, even when it
//! fails; it then fails the property if the target still holds anything
//! of it ([`Fixture::leftovers`]).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use slipway::config::service::{HealthCheck, RolloutSpec, ServiceSpec, Strategy};
use slipway::executor::{Executor, JobContext};
use slipway::service::manager::ServiceStatus;
use slipway::service::{RolloutRequest, ServiceManager};
use slipway::store::{ArtifactRef, JobSpec, Outcome, Store};
use slipway::targets::{Instance, InstanceRequest, JobRequest, Keep, LocalTarget, RunResult, Settings, Target, Targets};
use tokio_util::sync::CancellationToken;

use crate::common::{eventually, free_port};

pub mod own;

/// No property may take longer than this (the slowest, on docker, take
/// under 10 s on 2 cores with another property running beside them).
const PROPERTY_LIMIT: Duration = Duration::from_secs(30);
pub const SERVICE: &str = "web";
/// The health deadline of every spec here: what a broken version costs.
const HEALTH_DEADLINE: Duration = Duration::from_secs(3);
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Every version the properties deploy (on image targets, each is a tag
/// of the demo image).
pub const VERSIONS: &[&str] = &["1.0", "2.0", "2.1", "3.0", "9.0"];

pub fn demo_bin() -> String {
    crate::common::demo_bin().to_string()
}

/// One property's own corner of the target: an environment name (labels,
/// container names, what cleanup looks for), a repository name for image
/// targets, and a directory (the services' workdir and the store's home).
pub struct Scope {
    pub env: String,
    pub repo: String,
    pub dir: PathBuf,
}

/// What a target supplies to run the suite. Properties never ask which
/// target runs: whatever differs is asked of the fixture.
#[async_trait::async_trait]
pub trait Fixture: Send + Sync + 'static {
    /// Start what the target needs (an Engine, a registry, hosts). `None`
    /// (with a message saying why) skips the suite; a fixture must refuse
    /// to skip when its `SLIPWAY_REQUIRE_…` variable is set.
    async fn start() -> Option<Self>
    where
        Self: Sized;
    /// The name a spec selects the target by.
    fn name(&self) -> &'static str;
    fn target(&self) -> Arc<dyn Target>;
    /// Per property, before it runs: make every version of [`VERSIONS`] a
    /// working artifact in `scope`.
    async fn prepare(&self, scope: &Scope) {
        for v in VERSIONS {
            self.release(scope, v, true).await;
        }
    }
    /// The demo's argv, with `{port}` and `{version}` left for the
    /// target and the manager. `breakable`: one that fails to run while
    /// [`Fixture::release`] made its version broken (a target whose
    /// artifact can go missing ignores it).
    fn demo_command(&self, scope: &Scope, breakable: bool) -> Vec<String>;
    /// Image targets: the image a version of the demo runs (`repo:tag`).
    fn image(&self, _scope: &Scope, _version: &str) -> Option<String> {
        None
    }
    /// The target's own settings of the demo service.
    fn settings(&self) -> Settings {
        Settings::default()
    }
    /// Make `version` of the demo a working artifact, or one that cannot
    /// run (a pruned image, a release that exits at once).
    async fn release(&self, scope: &Scope, version: &str, working: bool);
    /// Kill an instance behind the manager's back (SIGKILL), as a crash or
    /// the OOM killer would; `id` as [`Instance::id`] says it.
    async fn crash(&self, id: &str);
    /// What is left of a dead instance that the target must remove (a
    /// container); `None` once nothing is.
    async fn remains(&self, _id: &str) -> Option<String> {
        None
    }
    /// What `scope` still holds on the target once everything stopped
    /// (removed now, so one failure does not leak into the next run).
    async fn leftovers(&self, _scope: &Scope) -> Vec<String> {
        vec![]
    }
    /// Rounds of the exit race property (a container costs more than a
    /// process).
    fn rounds(&self) -> usize {
        50
    }
    /// Image targets: publish `version` of the demo where the target
    /// resolves and pulls from (a registry), returning `repository:tag`.
    async fn publish(&self, _scope: &Scope, _version: &str) -> Option<String> {
        None
    }
    /// The `[[service]]` keys that run the demo on this target in a real
    /// `slipway serve` (beyond name, listen and health), for `scope`; it may
    /// go on with top-level tables of its own (`[[hosts]]`, `[secret.…]`).
    async fn service_toml(&self, scope: &Scope) -> String;
    /// The target's settings of a job (`JobSpec::settings`).
    fn job_settings(&self) -> Settings {
        Settings::default()
    }
    /// What the kind read from its own top-level tables (`[[hosts]]`), as
    /// `Target::machines` takes them.
    fn tables(&self) -> Settings {
        Settings::default()
    }
    /// Own-rollout targets: stop what `scope`'s services run on purpose
    /// after every node stopped (services on hosts outlive their node),
    /// through the target's own means, before [`Fixture::leftovers`] looks
    /// for what should not be there.
    async fn retire(&self, _scope: &Scope) {}
}

/// One `#[tokio::test]` per property, for one fixture type.
#[macro_export]
macro_rules! compliance_suite {
    ($fixture:ty) => {
        $crate::compliance_suite!(@each $fixture;
            instance_lifecycle, deploys_and_serves, unhealthy_version_rolls_back, crash_during_rollout_rolls_back,
            restart_restores_the_recorded_version, failed_restore_is_retried, zero_downtime_through_the_proxy,
            same_version_again_is_a_no_op, output_is_complete_once_exited, dead_instance_is_replaced,
            runs_jobs_with_exit_codes_and_output, jobs_stop_on_timeout_and_cancel, capabilities_match_what_it_does,
            images_are_pinned_and_pulled, gc_keeps_what_runs, a_killed_node_comes_back_serving, long_lines_arrive_in_marked_pieces);
    };
    // A target that runs its own rollouts (SSH hosts): the manager hands it
    // the whole rollout, and no instance passes through the node, so the
    // per-instance properties above do not apply; these say the same
    // things of the service as a whole (tests/compliance/own.rs).
    (own_rollout: $fixture:ty) => {
        $crate::compliance_suite!(@each $fixture;
            runs_jobs_with_exit_codes_and_output, jobs_stop_on_timeout_and_cancel, capabilities_match_what_it_does,
            images_are_pinned_and_pulled, a_killed_node_comes_back_serving, long_lines_arrive_in_marked_pieces);
        $crate::compliance_suite!(@own $fixture;
            deploys_and_serves_on_hosts, unhealthy_version_rolls_back_on_hosts, crash_during_rollout_rolls_back_on_hosts,
            same_version_again_is_a_no_op_on_hosts, zero_downtime_on_hosts, dead_instance_is_replaced_on_hosts,
            services_outlive_the_node_and_are_adopted);
    };
    (@own $fixture:ty; $($property:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $property() {
                let Some(f) = <$fixture as $crate::compliance::Fixture>::start().await else { return };
                $crate::compliance::own::$property(std::sync::Arc::new(f)).await;
            }
        )+
    };
    (@each $fixture:ty; $($property:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $property() {
                let Some(f) = <$fixture as $crate::compliance::Fixture>::start().await else { return };
                $crate::compliance::$property(std::sync::Arc::new(f)).await;
            }
        )+
    };
}

/// The manager's targets: the one under test, under its name only, so a
/// spec that would run elsewhere fails loudly instead of passing there
/// (verify steps run on the node's default target, as in `slipway serve`).
fn only(fx: &Arc<dyn Fixture>) -> Targets {
    let targets = Targets::exactly(fx.name(), fx.target());
    if fx.name() == slipway::targets::DEFAULT { targets } else { targets.with(slipway::targets::DEFAULT, Arc::new(LocalTarget::default())) }
}

// ---- a breakable demo for targets that run processes ---------------------------

/// The flag file that makes `version` of the demo broken (see
/// [`flag_demo_command`]).
pub fn flag(scope: &Scope, version: &str) -> PathBuf {
    scope.dir.join(format!("broken-{version}"))
}

/// The demo's argv for a target that runs processes where `scope.dir` is
/// seen (this machine): when `breakable`, a shell wrapper exits at once
/// (code 5, saying "broken") while the version's [`flag`] file exists.
pub fn flag_demo_command(scope: &Scope, breakable: bool) -> Vec<String> {
    let demo = demo_bin();
    if !breakable {
        return [demo.as_str(), "serve", "--port", "{port}", "--version", "{version}"].map(String::from).to_vec();
    }
    let flag = scope.dir.join("broken-");
    let script = format!("test -e '{}'\"$0\" && {{ echo broken >&2; exit 5; }}; exec '{demo}' serve --port \"$1\" --version \"$0\"", flag.display());
    ["sh", "-c", &script, "{version}", "{port}"].map(String::from).to_vec()
}

/// [`Fixture::release`] for [`flag_demo_command`]: the flag removed or made.
pub fn flag_release(scope: &Scope, version: &str, working: bool) {
    if working {
        let _ = std::fs::remove_file(flag(scope, version));
    } else {
        std::fs::write(flag(scope, version), "").expect("write the flag");
    }
}

// ---- the harness -------------------------------------------------------------

/// One property's world: the fixture, its scope on the target, the store,
/// and everything started, for cleanup.
struct Harness {
    fx: Arc<dyn Fixture>,
    target: Arc<dyn Target>,
    scope: Scope,
    _dir: tempfile::TempDir,
    /// The store's own: the scope's directory is the services' workdir,
    /// which targets on other machines pack and ship.
    _store_dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    managers: Mutex<Vec<(Arc<ServiceManager>, CancellationToken)>>,
    instances: Mutex<Vec<Arc<dyn Instance>>>,
    deployment: AtomicI64,
}

static HARNESSES: AtomicU64 = AtomicU64::new(0);

impl Harness {
    async fn new(fx: Arc<dyn Fixture>) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store_dir = tempfile::tempdir().expect("tempdir");
        let store = slipway::store::open(&format!("sqlite://{}", store_dir.path().join("s.db").display())).await.expect("open the SQLite store");
        let n = HARNESSES.fetch_add(1, Ordering::SeqCst) + 1;
        // Unique per harness: container names (`slipway-ENV-SERVICE-PORT`)
        // cannot collide between properties running at once, and cleanup
        // finds this property's things by their environment.
        let scope = Scope {
            env: format!("staging-{}-{n}", std::process::id()),
            repo: format!("slipway-test/compliance-{}-{n}", std::process::id()),
            dir: dir.path().to_path_buf(),
        };
        fx.prepare(&scope).await;
        Harness {
            target: fx.target(),
            fx,
            scope,
            _dir: dir,
            _store_dir: store_dir,
            store,
            managers: Mutex::default(),
            instances: Mutex::default(),
            deployment: AtomicI64::new(0),
        }
    }

    fn dir(&self) -> &Path {
        &self.scope.dir
    }

    /// A new manager (a node's, as after a start) over this store and
    /// target.
    fn manager(&self) -> (Arc<ServiceManager>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let m = ServiceManager::with_targets(Arc::new(only(&self.fx)), self.store.clone(), shutdown.clone());
        self.managers.lock().unwrap().push((m.clone(), shutdown.clone()));
        (m, shutdown)
    }

    /// An instance started directly on the target: stopped at cleanup.
    fn track(&self, i: &Arc<dyn Instance>) {
        self.instances.lock().unwrap().push(i.clone());
    }

    /// Run a property, bounded in time; whatever happens, stop every
    /// instance and manager it started, then report: its own failure
    /// first, else what the target still holds of it.
    async fn run(&self, what: &str, body: impl Future<Output = ()>) {
        let started = Instant::now();
        let result = tokio::time::timeout(PROPERTY_LIMIT, AssertUnwindSafe(body).catch_unwind()).await;
        let took = started.elapsed();
        let left = self.cleanup().await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("{what}: did not finish within {PROPERTY_LIMIT:?}"),
        }
        assert!(left.is_empty(), "{what}: left on the target after every instance and manager stopped (removed now): {left:#?}");
        eprintln!("{what} on {}: {took:?}", self.fx.name());
    }

    async fn cleanup(&self) -> Vec<String> {
        let instances: Vec<_> = std::mem::take(&mut *self.instances.lock().unwrap());
        futures_util::future::join_all(instances.iter().map(|i| i.stop(STOP_GRACE))).await;
        let managers: Vec<_> = std::mem::take(&mut *self.managers.lock().unwrap());
        for (m, shutdown) in managers {
            // Bounded: a manager wedged by the failure must not hang the run.
            let _ = tokio::time::timeout(Duration::from_secs(10), m.stop_all_services()).await;
            shutdown.cancel();
        }
        self.fx.retire(&self.scope).await;
        self.fx.leftovers(&self.scope).await
    }

    fn next_deployment(&self) -> i64 {
        self.deployment.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A request for one instance of the demo at `version`, listening where
    /// the target chooses (versions from "9" exit at once with code 4).
    fn demo_request(&self, version: &str) -> InstanceRequest {
        let argv = self.fx.demo_command(&self.scope, false).iter().map(|a| a.replace("{version}", version)).collect();
        self.instance_request(version, argv)
    }

    /// A request for one instance running `argv` (in the demo image on
    /// image targets), `{port}` filled by the target.
    fn instance_request(&self, version: &str, argv: Vec<String>) -> InstanceRequest {
        InstanceRequest {
            service: SERVICE.into(),
            environment: self.scope.env.clone(),
            version: version.into(),
            argv,
            env: BTreeMap::new(),
            workdir: self.dir().to_path_buf(),
            image: self.fx.image(&self.scope, version),
            settings: self.fx.settings(),
            deployment_id: 0,
            spec_digest: String::new(),
            secret_env: BTreeMap::new(),
            secret_files: BTreeMap::new(),
        }
    }

    async fn break_release(&self, version: &str) {
        self.fx.release(&self.scope, version, false).await
    }

    async fn mend_release(&self, version: &str) {
        self.fx.release(&self.scope, version, true).await
    }

    async fn kill(&self, id: &str) {
        self.fx.crash(id).await
    }

    async fn remains(&self, id: &str) -> Option<String> {
        self.fx.remains(id).await
    }

    /// Roll `spec` out at `version` with `m`; the result and every line
    /// the rollout reported.
    async fn roll(&self, m: &Arc<ServiceManager>, spec: &ServiceSpec, version: &str) -> Rolled {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<slipway::targets::Line>(64);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collector = {
            let lines = lines.clone();
            tokio::spawn(async move {
                while let Some(slipway::targets::Line { text: line, .. }) = rx.recv().await {
                    lines.lock().unwrap().push(line);
                }
            })
        };
        let req = RolloutRequest {
            sha256: None,
            environment: self.scope.env.clone(),
            deployment_id: self.next_deployment(),
            revision: format!("rev-{version}"),
            version: version.into(),
            spec: spec.clone(),
            workdir: self.dir().to_path_buf(),
        };
        let started = Instant::now();
        let result = m.rollout(req, tx, CancellationToken::new()).await;
        let took = started.elapsed();
        // The sink went with the rollout: the collector ends once it has
        // everything (bounded, in case a clone of the sink lingers).
        let _ = tokio::time::timeout(Duration::from_secs(2), collector).await;
        let lines = lines.lock().unwrap().clone();
        Rolled { version: version.into(), result, lines, took }
    }

    async fn recorded_version(&self) -> Option<String> {
        let rows = self.store.services().await.expect("read recorded services");
        rows.into_iter().find(|r| r.environment == self.scope.env && r.service == SERVICE).map(|r| r.version)
    }

    /// A new manager (a node's after a restart) over this store, restored:
    /// it must ask for exactly the revision `expected` (in this scope's
    /// directory).
    async fn restored_manager(&self, expected: &str) -> Arc<ServiceManager> {
        let (m, _) = self.manager();
        let workdir = self.dir().to_path_buf();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let asked2 = asked.clone();
        m.restore(move |revision| {
            asked2.lock().unwrap().push(revision);
            let dir = workdir.clone();
            async move { Ok(dir) }
        })
        .await;
        assert_eq!(*asked.lock().unwrap(), vec![expected.to_string()], "restore unpacks the recorded revision");
        m
    }

    /// The service's status on `m`.
    async fn status(&self, m: &ServiceManager) -> ServiceStatus {
        let all = m.status().await;
        all.into_iter().find(|s| s.environment == self.scope.env && s.service == SERVICE).expect("the service in status()")
    }
}

impl Drop for Harness {
    /// Last resort (cleanup did not run): stop the managers' proxies and
    /// supervisors; instances nobody holds are the target's to end.
    fn drop(&mut self) {
        if let Ok(managers) = self.managers.lock() {
            for (_, shutdown) in managers.iter() {
                shutdown.cancel();
            }
        }
    }
}

/// What a rollout returned and said.
struct Rolled {
    version: String,
    result: RunResult,
    lines: Vec<String>,
    took: Duration,
}

impl Rolled {
    fn text(&self) -> String {
        format!("rollout of {} → {:?} after {:?}; it said:\n  {}", self.version, self.result, self.took, self.lines.join("\n  "))
    }

    fn reason(&self) -> &str {
        self.result.reason.as_deref().unwrap_or("")
    }

    fn assert_succeeded(&self) {
        assert_eq!(self.result.outcome, Outcome::Succeeded, "{}", self.text());
    }

    fn assert_rolled_back(&self) {
        assert_eq!(self.result.outcome, Outcome::RolledBack, "{}", self.text());
    }

    /// Addresses of the instances of `version` the rollout said it started
    /// ("started web 3.0 on 127.0.0.1:PORT (…)").
    fn started(&self, version: &str) -> Vec<SocketAddr> {
        let prefix = format!("started {SERVICE} {version} on ");
        self.lines
            .iter()
            .filter_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(|a| a.parse().unwrap_or_else(|e| panic!("unparsable address {a:?} in the rollout's output: {e}")))
            .collect()
    }
}

// ---- specs -----------------------------------------------------------------

fn rolling() -> Strategy {
    Strategy::Rolling { max_surge: 1, max_unavailable: 0 }
}

impl Harness {
    /// The demo behind a proxy on a free port: HTTP health every 100 ms,
    /// healthy after 2 passes, 3 s deadline; drain 100 ms, stop grace 2 s.
    /// Versions starting with "3" never become healthy; versions starting
    /// with "9" exit (code 4) as soon as they start.
    fn demo_spec(&self, instances: u32, strategy: Strategy) -> ServiceSpec {
        self.spec_with_command(instances, strategy, self.fx.demo_command(&self.scope, false))
    }

    /// Like [`Harness::demo_spec`], but a version fails to run while
    /// [`Harness::break_release`] holds.
    fn breakable_spec(&self, instances: u32, strategy: Strategy) -> ServiceSpec {
        self.spec_with_command(instances, strategy, self.fx.demo_command(&self.scope, true))
    }

    /// Built from its serialized form, so that fields added to
    /// `ServiceSpec` later (optional ones: `artifact`, …) take their
    /// defaults here instead of breaking the suite.
    fn spec_with_command(&self, instances: u32, strategy: Strategy, command: Vec<String>) -> ServiceSpec {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let image = self.fx.image(&self.scope, "x").map(|i| serde_json::json!({ "repository": i.rsplit_once(':').map(|(r, _)| r).unwrap_or(&i) }));
        let mut spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": SERVICE,
            "listen": listen.to_string(),
            "instances": instances,
            "command": command,
            "env": {},
            "health": {
                "check": { "http": { "path": "/healthz", "status": 200 } },
                "interval": { "secs": 0, "nanos": 100_000_000 },
                "timeout": { "secs": 1, "nanos": 0 },
                "healthy_after": 2,
                "deadline": { "secs": HEALTH_DEADLINE.as_secs(), "nanos": 0 },
            },
            "rollout": { "strategy": "blue_green", "drain": { "secs": 0, "nanos": 100_000_000 } },
            "verify": null,
            "stop_grace": { "secs": STOP_GRACE.as_secs(), "nanos": 0 },
            "artifact": null,
            "target": self.fx.name(),
            "image": image,
            "settings": self.fx.settings(),
        }))
        .expect("a ServiceSpec from its serialized form");
        spec.rollout.strategy = strategy;
        // What the suite relies on, stated in types.
        assert_eq!(spec.health.check, HealthCheck::Http { path: "/healthz".into(), status: 200 });
        assert_eq!((spec.health.interval, spec.health.deadline, spec.rollout.drain), (Duration::from_millis(100), HEALTH_DEADLINE, Duration::from_millis(100)));
        spec
    }
}

// ---- HTTP and polling ------------------------------------------------------

/// A client that keeps no idle connections: every check is a fresh one.
fn probe_client() -> reqwest::Client {
    slipway::http::builder().timeout(Duration::from_secs(5)).pool_max_idle_per_host(0).build().expect("client")
}

/// GET `path` on `addr`: the trimmed body of a 2xx answer, or why not.
async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Result<String, String> {
    let resp = client.get(format!("http://{addr}{path}")).send().await.map_err(|e| format!("GET {path} on {addr}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| format!("GET {path} on {addr}: body: {e}"))?;
    if status.is_success() { Ok(body.trim().to_string()) } else { Err(format!("GET {path} on {addr}: {status} {body:?}")) }
}

fn hello(version: &str) -> String {
    format!("hello from demo {version}")
}

/// `n` GETs of / through `listen`: every one must answer `version`
/// (round robin: with n ≥ the instance count, every instance is asked).
async fn assert_serves(listen: SocketAddr, version: &str, n: usize) {
    let client = probe_client();
    for k in 0..n {
        let got = get(&client, listen, "/").await;
        assert_eq!(got.as_deref(), Ok(hello(version).as_str()), "request {k} of {n} through the proxy on {listen}");
    }
}

/// Nothing listens on `addr` any more. `not_body` is what the gone
/// instance answered: if the port was reused meanwhile by someone else
/// (another test), a connection that answers something else also shows
/// the instance is gone.
async fn assert_gone(addr: SocketAddr, not_body: &str) {
    match tokio::net::TcpStream::connect(addr).await {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "connecting to {addr}: {e}"),
        Ok(_) => {
            let got = get(&probe_client(), addr, "/").await;
            assert_ne!(got.as_deref(), Ok(not_body), "{addr} still serves {not_body:?}: the instance outlived its stop");
        }
    }
}

/// Running instance ids in `s`, after asserting it runs `version` on `n`
/// live instances.
fn assert_status(s: &ServiceStatus, version: &str, n: usize) -> Vec<String> {
    assert_eq!(s.version.as_deref(), Some(version), "status: {s:?}");
    assert_eq!(s.instances.len(), n, "status: {s:?}");
    assert!(s.instances.iter().all(|(_, _, alive)| *alive), "every instance runs: {s:?}");
    s.instances.iter().map(|(_, id, _)| id.clone()).collect()
}

/// Whole numbers appearing in `s` ("exit code 3" → [3]).
fn numbers_in(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect()
}

// ---- 1. the target's own contract --------------------------------------------

/// `start_instance` → an instance that serves on `addr()`, has an id, no
/// exit while it runs, ends on `stop` (SIGTERM first: well within the
/// grace) and frees its port; a missing program is an error naming it; an
/// instance that exits at once says how, and what it wrote.
pub async fn instance_lifecycle(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("instance_lifecycle", async {
        let client = probe_client();

        // Runs and serves.
        let i = h.target.start_instance(h.demo_request("1.0")).await.expect("start the demo");
        h.track(&i);
        assert!(!i.id().trim().is_empty(), "an instance has an id");
        let addr = i.addr();
        let body = eventually(Duration::from_secs(5), "the instance to answer HTTP", || get(&client, addr, "/")).await;
        assert_eq!(body, hello("1.0"));
        assert_eq!(get(&client, addr, "/healthz").await.as_deref(), Ok("ok 1.0"));
        assert_eq!(i.exit(), None, "exit() while it runs");
        assert!(tokio::time::timeout(Duration::from_millis(200), i.exited()).await.is_err(), "exited() resolved while the instance runs");

        // Stops, gracefully, and frees its port.
        let t = Instant::now();
        i.stop(STOP_GRACE).await;
        let took = t.elapsed();
        let why = i.exit().expect("exit() is Some once stop() has returned");
        assert!(!why.trim().is_empty(), "exit() says how it ended");
        assert!(took < STOP_GRACE, "the demo ends on SIGTERM: stop() should not need the whole {STOP_GRACE:?} grace (took {took:?}, exit: {why})");
        assert!(tokio::time::timeout(Duration::from_secs(1), i.exited()).await.is_ok(), "exited() resolves once stopped");
        assert_gone(addr, &hello("1.0")).await;
        // Stopping again is harmless and prompt.
        assert!(tokio::time::timeout(Duration::from_secs(1), i.stop(STOP_GRACE)).await.is_ok(), "a second stop() returns at once");

        // A program that does not exist.
        let missing = "slipway-compliance-no-such-program";
        match h.target.start_instance(h.instance_request("1.0", vec![missing.into(), "--port".into(), "1".into()])).await {
            Err(e) => assert!(e.message.contains(missing), "the error names the program: {e}"),
            Ok(i) => {
                h.track(&i);
                panic!("starting {missing:?} succeeded ({})", i.id());
            }
        }

        // One that exits at once, with output.
        let i = h.target.start_instance(h.demo_request("9.0")).await.expect("start the crashing demo");
        h.track(&i);
        assert!(tokio::time::timeout(Duration::from_secs(5), i.exited()).await.is_ok(), "exited() resolves when the instance exits by itself");
        let why = i.exit().expect("exit() is Some once exited() resolved");
        assert!(numbers_in(&why).contains(&4), "exit() mentions exit code 4: {why:?}");
        // Polled: whether the output is in at the very moment of the exit
        // is `output_is_complete_once_exited`'s to check.
        eventually(Duration::from_secs(1), "\"cannot boot\" in last_output()", || async {
            let out = i.last_output();
            if out.iter().any(|l| l.contains("cannot boot")) { Ok(()) } else { Err(format!("last_output() = {out:?}")) }
        })
        .await;
    })
    .await;
}

// ---- 2. deploy -------------------------------------------------------------

/// Rollout 1.0 on 2 instances: succeeded, served through the proxy, 2 live
/// instances in status, recorded in the store.
pub async fn deploys_and_serves(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("deploys_and_serves", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        let r = h.roll(&m, &spec, "1.0").await;
        r.assert_succeeded();
        assert_eq!(r.started("1.0").len(), 2, "{}", r.text());
        assert_serves(spec.listen, "1.0", 4).await;
        let s = h.status(&m).await;
        assert_eq!(s.listen, spec.listen);
        assert_status(&s, "1.0", 2);
        // The instances are the ones the rollout reported, each serving.
        let client = probe_client();
        for (addr, id, _) in &s.instances {
            assert!(r.started("1.0").contains(addr), "{addr} ({id}) was not reported started: {}", r.text());
            assert_eq!(get(&client, *addr, "/").await.as_deref(), Ok(hello("1.0").as_str()), "instance {addr} ({id})");
        }
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "the store records the deployed version");
    })
    .await;
}

// ---- 3. health failure → rollback ------------------------------------------

/// After 1.0, 3.0 (its /healthz answers 500) is rolled back: the reason
/// carries the check's answer, traffic stays on 1.0, no 3.0 instance is
/// left, the store still says 1.0.
pub async fn unhealthy_version_rolls_back(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("unhealthy_version_rolls_back", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = assert_status(&h.status(&m).await, "1.0", 2);

        let r = h.roll(&m, &spec, "3.0").await;
        r.assert_rolled_back();
        assert!(r.reason().contains("500") && r.reason().contains("broken"), "the reason carries the failed check's answer: {}", r.text());
        assert!(r.reason().contains("1.0"), "the reason names the version returned to: {}", r.text());

        assert_serves(spec.listen, "1.0", 4).await;
        let after = assert_status(&h.status(&m).await, "1.0", 2);
        assert_eq!(after, before, "with max_unavailable = 0 the running 1.0 instances are never touched");
        let broken = r.started("3.0");
        assert!(!broken.is_empty(), "the rollout reports the 3.0 instances it started: {}", r.text());
        let s = h.status(&m).await;
        for addr in &broken {
            assert!(!s.instances.iter().any(|(a, _, _)| a == addr), "3.0 instance {addr} still in status: {s:?}");
            assert_gone(*addr, &hello("3.0")).await;
        }
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "the store still records 1.0");
    })
    .await;
}

// ---- 4. crash during a rollout ---------------------------------------------

/// A version whose process exits right after it starts (the demo's 9.0)
/// is rolled back as soon as it exits (not at the health deadline), with
/// the exit in the reason; traffic stays on the previous version.
pub async fn crash_during_rollout_rolls_back(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("crash_during_rollout_rolls_back", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        assert_serves(spec.listen, "1.0", 2).await;
        let before = assert_status(&h.status(&m).await, "1.0", 2);

        let r = h.roll(&m, &spec, "9.0").await;
        r.assert_rolled_back();
        assert!(r.reason().contains("exit") && numbers_in(r.reason()).contains(&4), "the reason says the instance exited with code 4: {}", r.text());
        assert!(r.took < HEALTH_DEADLINE, "an exit is noticed when it happens, not at the {HEALTH_DEADLINE:?} health deadline: {}", r.text());

        assert_serves(spec.listen, "1.0", 4).await;
        let after = assert_status(&h.status(&m).await, "1.0", 2);
        assert_eq!(after, before, "the running 1.0 instances are untouched");
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"));
    })
    .await;
}

// ---- 5. restart recovery ---------------------------------------------------

/// Manager A deploys 1.0 and goes away with its instances, as a crashed
/// node would; manager B over the same store restores 1.0 on 2 instances
/// behind the same address, and rolls on from there.
pub async fn restart_restores_the_recorded_version(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("restart_restores_the_recorded_version", async {
        let spec = h.demo_spec(2, rolling());
        let (a, a_shutdown) = h.manager();
        h.roll(&a, &spec, "1.0").await.assert_succeeded();
        assert_serves(spec.listen, "1.0", 2).await;
        let a_instances: Vec<SocketAddr> = h.status(&a).await.instances.iter().map(|(addr, _, _)| *addr).collect();

        // A goes: instances stopped, proxy and supervisor shut down.
        a.stop_all_services().await;
        a_shutdown.cancel();
        drop(a);
        for addr in &a_instances {
            assert_gone(*addr, &hello("1.0")).await;
        }
        eventually(Duration::from_secs(5), "A's proxy to release the listen address", || async {
            match tokio::net::TcpStream::connect(spec.listen).await {
                Err(_) => Ok(()),
                Ok(_) => Err(format!("{} still accepts connections", spec.listen)),
            }
        })
        .await;

        // B starts over the same store.
        let b = h.restored_manager("rev-1.0").await;
        assert_serves(spec.listen, "1.0", 4).await;
        assert_status(&h.status(&b).await, "1.0", 2);

        // B knows what it runs: the next rollout goes on from 1.0.
        let r = h.roll(&b, &spec, "2.0").await;
        r.assert_succeeded();
        assert!(r.lines.iter().any(|l| l.contains("1.0 → 2.0")), "the restored version is the starting point: {}", r.text());
        assert_serves(spec.listen, "2.0", 2).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("2.0"));
    })
    .await;
}

/// A service that cannot be restored at start (its release broken: see
/// [`Harness::break_release`]) comes back by itself once the cause is
/// gone: the supervisor keeps trying, as `restore` promises.
pub async fn failed_restore_is_retried(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("failed_restore_is_retried", async {
        let spec = h.breakable_spec(1, rolling());
        let (a, a_shutdown) = h.manager();
        h.roll(&a, &spec, "1.0").await.assert_succeeded();
        a.stop_all_services().await;
        a_shutdown.cancel();
        drop(a);
        eventually(Duration::from_secs(5), "A's proxy to release the listen address", || async {
            match tokio::net::TcpStream::connect(spec.listen).await {
                Err(_) => Ok(()),
                Ok(_) => Err(format!("{} still accepts connections", spec.listen)),
            }
        })
        .await;

        h.break_release("1.0").await;
        let (b, _) = h.manager();
        let workdir = h.dir().to_path_buf();
        b.restore(move |_| {
            let dir = workdir.clone();
            async move { Ok(dir) }
        })
        .await;
        assert!(h.status(&b).await.instances.is_empty(), "the restore cannot have succeeded: {:?}", h.status(&b).await);
        h.mend_release("1.0").await;
        let client = probe_client();
        let body = eventually(Duration::from_secs(10), "the service back after its cause is gone", || get(&client, spec.listen, "/")).await;
        assert_eq!(body, hello("1.0"));
        assert_status(&h.status(&b).await, "1.0", 1);
    })
    .await;
}

// ---- 6. zero downtime ------------------------------------------------------

/// What the load saw.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    versions: Mutex<BTreeSet<String>>,
}

/// 8 keep-alive clients GET / through `listen` until `stop`.
fn start_load(listen: SocketAddr, stop: Arc<AtomicBool>, load: Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|_| {
            let (stop, load) = (stop.clone(), load.clone());
            tokio::spawn(async move {
                let client = slipway::http::builder().timeout(Duration::from_secs(10)).build().expect("client");
                while !stop.load(Ordering::SeqCst) {
                    match get(&client, listen, "/").await {
                        Ok(body) if body.starts_with("hello from demo ") => {
                            load.ok.fetch_add(1, Ordering::SeqCst);
                            let v = body.trim_start_matches("hello from demo ").to_string();
                            load.versions.lock().unwrap().insert(v);
                        }
                        Ok(body) => {
                            load.failed.fetch_add(1, Ordering::SeqCst);
                            load.errors.lock().unwrap().push(format!("unexpected body {body:?}"));
                        }
                        Err(e) => {
                            load.failed.fetch_add(1, Ordering::SeqCst);
                            let mut errors = load.errors.lock().unwrap();
                            if errors.len() < 10 {
                                errors.push(e);
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// Stops the load when dropped: a property that fails mid-way leaves no
/// client running.
struct LoadRun {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// With 1.0 running through `spec.listen`, under constant load through
/// it: 1.0 → 2.0 (`spec`'s strategy), 2.0 → 3.0 (rolled back), 2.0 → 2.1
/// (blue-green), all with `m`. Asserts not one request failed, every
/// version served, none reached the broken 3.0.
async fn three_rollouts_under_load(h: &Harness, m: &Arc<ServiceManager>, spec: &ServiceSpec) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let mut run = LoadRun { stop: stop.clone(), tasks: start_load(spec.listen, stop.clone(), load.clone()) };
    eventually(Duration::from_secs(5), "the load to get going", || async {
        if load.ok.load(Ordering::SeqCst) >= 50 { Ok(()) } else { Err(format!("{} requests so far", load.ok.load(Ordering::SeqCst))) }
    })
    .await;

    let to2 = h.roll(m, spec, "2.0").await;
    let to3 = h.roll(m, spec, "3.0").await;
    let blue_green = ServiceSpec { rollout: RolloutSpec { strategy: Strategy::BlueGreen, ..spec.rollout.clone() }, ..spec.clone() };
    let to21 = h.roll(m, &blue_green, "2.1").await;
    let at_end = load.ok.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), "load after the last rollout", || async {
        if load.ok.load(Ordering::SeqCst) >= at_end + 50 { Ok(()) } else { Err(String::from("too few requests")) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in std::mem::take(&mut run.tasks) {
        t.await.expect("a load task panicked");
    }

    to2.assert_succeeded();
    to3.assert_rolled_back();
    to21.assert_succeeded();
    let (ok, failed) = (load.ok.load(Ordering::SeqCst), load.failed.load(Ordering::SeqCst));
    let errors = load.errors.lock().unwrap().clone();
    assert_eq!(failed, 0, "{failed} of {} requests failed during the rollouts; first errors: {errors:?}", ok + failed);
    assert!(ok >= 500, "too little load to prove anything: {ok} requests");
    eprintln!("{ok} requests through {}, none failed, during 3 rollouts ({:?}, {:?}, {:?})", spec.listen, to2.took, to3.took, to21.took);
    let versions = load.versions.lock().unwrap().clone();
    for v in ["1.0", "2.0", "2.1"] {
        assert!(versions.contains(v), "the load never saw {v}: {versions:?}");
    }
    assert!(!versions.contains("3.0"), "a request reached the unhealthy 3.0: {versions:?}");
}

/// Under constant load through the proxy: 1.0 → 2.0 (rolling, surge 1),
/// 2.0 → 3.0 (rolled back), 2.0 → 2.1 (blue-green). Not one request fails
/// and none ever reaches the broken 3.0.
pub async fn zero_downtime_through_the_proxy(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("zero_downtime_through_the_proxy", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        three_rollouts_under_load(&h, &m, &spec).await;
        assert_serves(spec.listen, "2.1", 4).await;
        assert_status(&h.status(&m).await, "2.1", 2);
    })
    .await;
}

// ---- 7. idempotence --------------------------------------------------------

/// Rolling out the version that already runs, with the same spec, says
/// "nothing to do" and keeps the very same instances; the same version
/// with a changed spec is rolled out.
pub async fn same_version_again_is_a_no_op(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("same_version_again_is_a_no_op", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = assert_status(&h.status(&m).await, "1.0", 2);

        let again = h.roll(&m, &spec, "1.0").await;
        again.assert_succeeded();
        assert!(again.lines.iter().any(|l| l.contains("nothing to do")), "{}", again.text());
        assert!(again.started("1.0").is_empty(), "nothing started: {}", again.text());
        let after = assert_status(&h.status(&m).await, "1.0", 2);
        assert_eq!(after, before, "the same instances keep running");
        assert_serves(spec.listen, "1.0", 2).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"));

        // Same version, one more instance: not a no-op.
        let bigger = ServiceSpec { instances: 3, ..spec.clone() };
        let r = h.roll(&m, &bigger, "1.0").await;
        r.assert_succeeded();
        assert!(!r.lines.iter().any(|l| l.contains("nothing to do")), "a changed spec is rolled out: {}", r.text());
        assert_status(&h.status(&m).await, "1.0", 3);
        assert_serves(spec.listen, "1.0", 3).await;
    })
    .await;
}

// ---- output completeness ---------------------------------------------------

/// Once `exited()` has resolved, `last_output()` holds everything the
/// instance wrote: rollback reasons quote it ("its last output: …"), and
/// they are read right after the exit is seen.
pub async fn output_is_complete_once_exited(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    // The race this catches is a process's: ~1 ms a round. A container
    // takes ~0.5 s to create, start, wait for and remove, so docker gets
    // fewer rounds to stay well inside PROPERTY_LIMIT.
    let rounds = h.fx.rounds();
    h.run("output_is_complete_once_exited", async {
        let mut missing = 0;
        for _ in 0..rounds {
            let i = h.target.start_instance(h.demo_request("9.0")).await.expect("start the crashing demo");
            h.track(&i);
            i.exited().await;
            if !i.last_output().iter().any(|l| l.contains("cannot boot")) {
                missing += 1;
            }
            // Gone before the next round: exited containers hold their name.
            i.stop(STOP_GRACE).await;
        }
        assert_eq!(missing, 0, "{missing} of {rounds} instances had exited() resolve before their output was in last_output()");
    })
    .await;
}

// ---- supervision -----------------------------------------------------------

/// An instance that dies between rollouts (killed, as by a crash or the
/// OOM killer) is replaced at the same version by the supervisor, the
/// proxy serves through the replacement, and nothing of the dead one is
/// left (on docker: its container is removed, not just stopped).
pub async fn dead_instance_is_replaced(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("dead_instance_is_replaced", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let (dead_addr, dead_id, _) = h.status(&m).await.instances[0].clone();

        h.kill(&dead_id).await;
        let s = eventually(Duration::from_secs(10), "the supervisor to replace the dead instance", || async {
            let s = h.status(&m).await;
            if s.restarts >= 1 && s.instances.len() == 2 && s.instances.iter().all(|(_, _, alive)| *alive) { Ok(s) } else { Err(format!("status: {s:?}")) }
        })
        .await;
        assert!(!s.instances.iter().any(|(_, id, _)| *id == dead_id), "the dead instance is out of the service: {s:?}");
        assert_status(&s, "1.0", 2);
        assert_serves(spec.listen, "1.0", 4).await;
        assert_gone(dead_addr, &hello("1.0")).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "a restart is no deployment");
        eventually(Duration::from_secs(5), "nothing left of the dead instance", || async {
            match h.remains(&dead_id).await {
                None => Ok(()),
                Some(left) => Err(left),
            }
        })
        .await;

        // Issue 19 (a CI run of a7bab2f): stopping the services while the
        // node runs on (a host's service stopped) must stop the restart
        // loop too; it used to find the instances gone and start them again.
        m.stop_all_services().await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let s = h.status(&m).await;
        assert!(s.instances.is_empty(), "three ticks of the restart loop after the services stopped, nothing runs again: {s:?}");

        // A later rollout on the same manager starts the service afresh: a
        // proxy that listens and a restart loop of its own. (It used to get
        // the stopped entry back, whose proxy no longer listened.)
        h.roll(&m, &spec, "2.0").await.assert_succeeded();
        assert_serves(spec.listen, "2.0", 4).await;
        let (_, id, _) = h.status(&m).await.instances[0].clone();
        h.kill(&id).await;
        eventually(Duration::from_secs(10), "the new restart loop to replace a dead instance", || async {
            let s = h.status(&m).await;
            if s.restarts >= 1 && s.instances.len() == 2 && s.instances.iter().all(|(_, i, alive)| *alive && *i != id) {
                Ok(())
            } else {
                Err(format!("status: {s:?}"))
            }
        })
        .await;
        m.stop_all_services().await;
    })
    .await;
}

// ---- jobs ------------------------------------------------------------------

/// The executor over this target alone.
fn executor(fx: &Arc<dyn Fixture>) -> Executor {
    Executor::new(Arc::new(only(fx)))
}

/// A job of the demo (`migrate`, on image targets in the image pinned by
/// the fixture's registry) with `args` after the program.
async fn demo_job(h: &Harness, args: &[&str], timeout: Duration) -> JobSpec {
    let program = h.fx.demo_command(&h.scope, false).first().cloned().expect("a demo command");
    let argv = std::iter::once(program).chain(args.iter().map(|a| a.to_string())).collect();
    let artifact = match h.fx.publish(&h.scope, "1.0").await {
        None => None,
        Some(reference) => {
            let sha256 = h.target.resolve(&reference, &Default::default(), None).await.expect("resolve the published demo").expect("a digest");
            Some(ArtifactRef { url: reference, sha256, kind: slipway::store::ArtifactKind::Image })
        }
    };
    JobSpec {
        timeout_ms: timeout.as_millis() as u64,
        kill_grace_ms: 2000,
        artifact,
        target: Some(h.fx.name().to_string()),
        settings: h.fx.job_settings(),
        ..JobSpec::verify(&slipway::config::service::StepSpec { command: argv, timeout, idempotent: false })
    }
}

/// Run `spec` through the executor; its result and its output lines.
async fn run_job(h: &Harness, spec: JobSpec, cancel: CancellationToken) -> (RunResult, Vec<String>) {
    let (result, lines) = run_job_lines(h, spec, cancel).await;
    (result, lines.into_iter().map(|l| l.text).collect())
}

/// [`run_job`] with each line as the target sent it (stream, cut mark).
async fn run_job_lines(h: &Harness, spec: JobSpec, cancel: CancellationToken) -> (RunResult, Vec<slipway::targets::Line>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<slipway::targets::Line>(256);
    let collector = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line);
        }
        lines
    });
    let values = BTreeMap::from([
        ("version", "1.0".to_string()),
        ("env", h.scope.env.clone()),
        ("service", SERVICE.to_string()),
        ("deployment", h.next_deployment().to_string()),
        ("revision", "rev".to_string()),
    ]);
    let req = JobRequest {
        deployment_id: h.next_deployment(),
        job: format!("{SERVICE}.migrate"),
        attempt: 1,
        spec,
        workdir: h.dir().to_path_buf(),
        values,
        stopping: Default::default(),
        resuming: false,
    };
    let ctx = JobContext { environment: h.scope.env.clone(), revision: "rev".into(), version: Some("1.0".into()) };
    let result = executor(&h.fx).run(ctx, req, &h.dir().join("artifacts"), tx, cancel).await;
    let lines = tokio::time::timeout(Duration::from_secs(5), collector).await.expect("output ends with the job").expect("collector");
    (result, lines)
}

/// A job runs on the target with `{placeholders}` filled per argument: a
/// success says so, a failure carries its exit code and its output.
pub async fn runs_jobs_with_exit_codes_and_output(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("runs_jobs_with_exit_codes_and_output", async {
        let ok = demo_job(&h, &["migrate", "--file", "migrations.log", "--version", "{version}"], Duration::from_secs(60)).await;
        let (r, lines) = run_job(&h, ok, CancellationToken::new()).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}: {lines:?}");
        assert!(lines.iter().any(|l| l.contains("migration to 1.0 applied")), "the job's output, with {{version}} filled: {lines:?}");

        let bad = demo_job(&h, &["migrate", "--file", "/no/such/dir/migrations.log", "--version", "1.0"], Duration::from_secs(60)).await;
        let (r, lines) = run_job(&h, bad, CancellationToken::new()).await;
        assert_eq!((r.outcome, r.exit_code), (Outcome::Failed, Some(1)), "{r:?}: {lines:?}");
        assert!(r.reason.as_deref().is_some_and(|why| numbers_in(why).contains(&1)), "the reason names exit code 1: {r:?}");
        assert!(lines.iter().any(|l| l.contains("cannot write /no/such/dir/migrations.log")), "stderr is kept: {lines:?}");
    })
    .await;
}

/// A line longer than [`slipway::targets::MAX_LINE_BYTES`] arrives in
/// pieces no longer than that, each but the last marked `cut`, which
/// together are the line: what masks secrets joins them (issue 19: a
/// secret across a cut was stored as two unmasked halves).
pub async fn long_lines_arrive_in_marked_pieces(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("long_lines_arrive_in_marked_pieces", async {
        let long = format!("{}é", "v".repeat(40_000));
        let job = demo_job(&h, &["migrate", "--file", "migrations.log", "--version", &long], Duration::from_secs(60)).await;
        let (r, lines) = run_job_lines(&h, job, CancellationToken::new()).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        let first = lines
            .iter()
            .position(|l| l.text.starts_with("migration to vvv"))
            .unwrap_or_else(|| panic!("no output line: {:?}", lines.iter().map(|l| l.text.len()).collect::<Vec<_>>()));
        let last = lines[first..].iter().position(|l| !l.cut).map(|i| first + i).expect("the line ends");
        let pieces = &lines[first..=last];
        assert!(pieces.len() >= 3, "40 KB in pieces of at most 16 KiB: {:?}", pieces.iter().map(|l| (l.text.len(), l.cut)).collect::<Vec<_>>());
        assert!(pieces.iter().all(|l| l.text.len() <= slipway::targets::MAX_LINE_BYTES && l.stream == pieces[0].stream && l.part == pieces[0].part));
        let whole: String = pieces.iter().map(|l| l.text.as_str()).collect();
        assert!(
            whole.starts_with(&format!("migration to {long} applied")),
            "the pieces are the line, no character cut: {}",
            &whole[whole.len().saturating_sub(80)..]
        );
    })
    .await;
}

/// A job that runs too long ends as timed out, a cancelled one as
/// cancelled, both promptly, and neither leaves anything behind.
pub async fn jobs_stop_on_timeout_and_cancel(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("jobs_stop_on_timeout_and_cancel", async {
        // The demo's server never ends by itself: a job that hangs.
        let port = free_port().to_string();
        let hang = ["serve", "--port", port.as_str(), "--version", "1.0"];
        let spec = demo_job(&h, &hang, Duration::from_millis(1500)).await;
        let t = Instant::now();
        let (r, lines) = run_job(&h, spec, CancellationToken::new()).await;
        assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}: {lines:?}");
        assert!(t.elapsed() < Duration::from_secs(15), "a timeout of 1.5 s (grace 2 s) ended after {:?}", t.elapsed());

        let spec = demo_job(&h, &hang, Duration::from_secs(60)).await;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let t = Instant::now();
        let (r, lines) = run_job(&h, spec, cancel).await;
        assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}: {lines:?}");
        assert!(t.elapsed() < Duration::from_secs(15), "cancelled after 1 s, ended after {:?}", t.elapsed());
    })
    .await;
}

// ---- what the kind says of itself ----------------------------------------

/// The kind is registered under the fixture's name, and its capabilities
/// say what the target does: image targets pin tags, others answer
/// without a digest; targets that run instances start them.
pub async fn capabilities_match_what_it_does(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("capabilities_match_what_it_does", async {
        let kind = slipway::targets::kind(h.fx.name()).unwrap_or_else(|| panic!("no target registered as {:?}", h.fx.name()));
        let caps = kind.capabilities();
        assert_eq!(caps.uses_images, h.fx.image(&h.scope, "1.0").is_some(), "uses_images, and the fixture runs an image: {caps:?}");
        if !caps.uses_images {
            assert_eq!(h.target.resolve("example.org/x:1", &Default::default(), None).await, Ok(None), "a target without images pins nothing");
        }
        let started = h.target.start_instance(h.demo_request("1.0")).await;
        match (caps.runs_instances, started) {
            (true, Ok(i)) => h.track(&i),
            (false, Err(e)) => assert_eq!(e.kind, slipway::targets::TargetErrorKind::Unsupported, "{e}"),
            (true, Err(e)) => panic!("runs_instances, but starting one failed: {e}"),
            (false, Ok(i)) => {
                h.track(&i);
                panic!("started an instance without runs_instances");
            }
        }
        // Secret files reach an instance only where the target places them;
        // elsewhere they are refused, never dropped silently.
        if caps.runs_instances {
            let file = h.dir().join("secret-value");
            std::fs::write(&file, "s3cret").expect("write the secret");
            let secret =
                slipway::config::secret::SecretRef { name: "s".into(), source: slipway::config::secret::SecretSource::File(file) }.read().expect("read");
            let mut req = h.demo_request("1.0");
            req.secret_files.insert("/run/secrets/s".into(), secret);
            match (caps.secret_files, h.target.start_instance(req).await) {
                (true, Ok(i)) => h.track(&i),
                (false, Err(e)) => assert_eq!(e.kind, slipway::targets::TargetErrorKind::Unsupported, "{e}"),
                (true, Err(e)) => panic!("secret_files, but an instance with one failed to start: {e}"),
                (false, Ok(i)) => {
                    h.track(&i);
                    panic!("an instance with a secret file started without secret_files: the file was dropped");
                }
            }
        }
        // Jobs run where the kind says they do.
        let job = demo_job(&h, &["migrate", "--file", "migrations.log", "--version", "1.0"], Duration::from_secs(60)).await;
        let (r, lines) = run_job(&h, job, CancellationToken::new()).await;
        assert_eq!(r.outcome == Outcome::Succeeded, caps.runs_jobs, "runs_jobs is {}, the job: {r:?} {lines:?}", caps.runs_jobs);
    })
    .await;
}

/// Image targets: a published tag is pinned to its digest, an unknown tag
/// is "not found", and the pinned digest is made available and runs.
pub async fn images_are_pinned_and_pulled(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("images_are_pinned_and_pulled", async {
        let Some(reference) = h.fx.publish(&h.scope, "2.0").await else {
            // Nothing to pin: preparing anything is a no-op.
            let (tx, _rx) = tokio::sync::mpsc::channel(8);
            assert_eq!(h.target.prepare("example.org/x@sha256:00", None, &tx, &CancellationToken::new()).await, Ok(()));
            return;
        };
        let digest = h.target.resolve(&reference, &Default::default(), None).await.expect("resolve").expect("a digest");
        assert!(digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()), "a sha256 in hex: {digest:?}");
        let repo = reference.rsplit_once(':').map(|(r, _)| r.to_string()).expect("repo:tag");
        let missing = h.target.resolve(&format!("{repo}:no-such-tag"), &Default::default(), None).await.expect_err("an unknown tag");
        assert_eq!(missing.kind, slipway::targets::TargetErrorKind::NotFound, "{missing}");
        let pinned = format!("{repo}@sha256:{digest}");
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        h.target.prepare(&pinned, None, &tx, &CancellationToken::new()).await.expect("make the pinned image available");
        drop(tx);
        while rx.recv().await.is_some() {}
        let mut req = h.demo_request("2.0");
        req.image = Some(pinned);
        let i = h.target.start_instance(req).await.expect("start from the digest");
        h.track(&i);
        let client = probe_client();
        let addr = i.addr();
        assert_eq!(eventually(Duration::from_secs(10), "the pinned image to serve", || get(&client, addr, "/")).await, hello("2.0"));
    })
    .await;
}

/// `gc` never lists (or removes) what a live manager runs.
pub async fn gc_keeps_what_runs(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("gc_keeps_what_runs", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let running: BTreeSet<String> = h.status(&m).await.instances.iter().map(|(_, id, _)| id.clone()).collect();
        let keep = Keep {
            repositories: h.fx.image(&h.scope, "1.0").map(|i| i.rsplit_once(':').map(|(r, _)| r.to_string()).unwrap_or(i)).into_iter().collect(),
            digests: BTreeSet::new(),
        };
        let garbage = h.target.garbage(&keep).await.expect("garbage");
        for item in garbage.containers.iter() {
            assert!(
                !running.iter().any(|id| id.contains(&item.id) || item.id.contains(id.trim_start_matches("container "))),
                "gc lists a running instance: {item:?}"
            );
        }
        h.target.collect(&garbage).await;
        assert_serves(spec.listen, "1.0", 4).await;
        // The same through the manager (what `slipway gc --apply` runs):
        // every target asked once, nothing running listed or removed.
        let report = m.garbage(true).await.expect("gc");
        let ids: Vec<&String> = report.garbage.containers.iter().map(|i| &i.id).collect();
        let distinct: BTreeSet<&String> = ids.iter().copied().collect();
        assert_eq!(ids.len(), distinct.len(), "an item listed twice: {:?}", report.garbage);
        for item in &report.garbage.containers {
            assert!(
                !running.iter().any(|id| id.contains(&item.id) || item.id.contains(id.trim_start_matches("container "))),
                "gc lists a running instance: {item:?}"
            );
        }
        assert_serves(spec.listen, "1.0", 4).await;
        assert_eq!(assert_status(&h.status(&m).await, "1.0", 2).len(), 2, "both instances still run after gc");
    })
    .await;
}

// ---- the real binary: kill -9 of a node --------------------------------------

/// `slipway serve` deploys the demo on this target, is killed with
/// SIGKILL, and the next node of the same store brings the service back
/// on its recorded version (adopting or replacing what the dead one left);
/// a graceful stop afterwards leaves nothing on the target (a target that
/// rolls out itself keeps serving until the fixture retires the service).
pub async fn a_killed_node_comes_back_serving(fx: Arc<dyn Fixture>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = HARNESSES.fetch_add(1, Ordering::SeqCst) + 1;
    let scope = Scope {
        env: format!("node-{}-{n}", std::process::id()),
        repo: format!("slipway-test/compliance-{}-{n}", std::process::id()),
        dir: dir.path().to_path_buf(),
    };
    fx.prepare(&scope).await;
    let listen = free_port();
    let config = format!(
        "[[environment]]\nname = \"{env}\"\n\n[[service]]\nname = \"{SERVICE}\"\nlisten = \"127.0.0.1:{listen}\"\ninstances = 2\nhealth = {{ http = \"/healthz\", interval = \"100ms\", healthy_after = 1, deadline = \"20s\" }}\n{own}\n",
        env = scope.env,
        own = fx.service_toml(&scope).await
    );
    std::fs::write(dir.path().join("slipway.toml"), config).expect("write slipway.toml");
    let body = move || crate::common::http_get(listen, "/");
    let own_rollout = slipway::targets::kind(fx.name()).is_some_and(|k| k.capabilities().own_rollout);
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        let (d, env) = (dir.path().to_path_buf(), scope.env.clone());
        tokio::task::spawn_blocking(move || {
            let mut first = crate::common::Server::start(&d, None, &[]);
            let out = first.cli(&d, &["deploy", SERVICE, "1.0", "--env", &env]);
            assert!(out.status.success(), "deploy: {}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), first.log_text());
            crate::common::wait_for(Duration::from_secs(20), "1.0 to serve", || body().filter(|b| b == &hello("1.0")));
            first.kill9();
            let mut second = crate::common::Server::start(&d, None, &[]);
            crate::common::wait_for(Duration::from_secs(40), "1.0 to serve again after the kill", || body().filter(|b| b == &hello("1.0")));
            let status = second.cli(&d, &["status"]);
            assert!(String::from_utf8_lossy(&status.stdout).contains("1.0"), "status: {}", String::from_utf8_lossy(&status.stdout));
            // A graceful stop: SIGTERM, and it ends by itself.
            unsafe { libc::kill(second.child.id() as i32, libc::SIGTERM) };
            crate::common::wait_for(Duration::from_secs(30), "the node to stop on SIGTERM", || second.child.try_wait().ok().flatten());
            // Services a target rolls out itself live on their hosts, not in
            // the node: they go on serving without it.
            if own_rollout {
                assert_eq!(body().as_deref(), Some(hello("1.0").as_str()), "a service on hosts outlives its node's stop");
            }
        })
        .await
    })
    .await;
    fx.retire(&scope).await;
    let left = fx.leftovers(&scope).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
        Err(_) => panic!("a_killed_node_comes_back_serving: did not finish within 120 s"),
    }
    assert!(left.is_empty(), "a_killed_node_comes_back_serving: left on the target after a graceful stop: {left:#?}");
}
