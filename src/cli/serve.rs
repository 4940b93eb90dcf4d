//! `slipway serve`: one node — scheduler, API and event consumers, wired
//! together and stopped together.
//!
//! Shutdown: the first SIGINT/SIGTERM stops claiming work and the API,
//! and gives running jobs `--shutdown-grace` to finish; a second signal
//! exits at once (the jobs' leases then expire and another node, or this
//! one restarted, takes over).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CliError, exit};
use crate::api::{self, AppState, metrics::Metrics};
use crate::executor::Executor;
use crate::scheduler::event::{Event, EventBus};
use crate::scheduler::{self, Scheduler, SchedulerConfig, logwriter};
use crate::service::ServiceManager;
use crate::store::{self, Store};
use crate::submit::Submitter;
use crate::targets::{NodeContext, Targets};

pub struct ServeOptions {
    pub config: PathBuf,
    pub listen: String,
    pub store: Option<String>,
    pub parallelism: Option<usize>,
    pub node_id: Option<String>,
    pub lease: Option<Duration>,
    pub poll: Duration,
    pub shutdown_grace: Duration,
}

/// The store a command uses: `--store`, else `SLIPWAY_STORE` (clap reads
/// both into one option), else the config's `[project] store`, else a
/// SQLite file in `.slipway/` next to the config.
pub fn store_url(explicit: Option<&str>, config_store: Option<&str>, config_dir: &Path) -> String {
    if let Some(s) = explicit.or(config_store) {
        return s.to_string();
    }
    let dir = std::fs::canonicalize(config_dir).unwrap_or_else(|_| config_dir.to_path_buf());
    format!("sqlite://{}", dir.join(".slipway").join("slipway.db").display())
}

/// Hold an exclusive lock on a SQLite store for the life of the process:
/// two nodes on one SQLite file would each reap the other's jobs.
fn lock_sqlite(db: &str) -> Result<std::fs::File, CliError> {
    use std::os::fd::AsRawFd;
    let path = format!("{db}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot open lock file {path}: {e}")))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(CliError::new(
            exit::UNAVAILABLE,
            format!("another `slipway serve` already uses the SQLite store {db} (lock {path} is held); several nodes need a PostgreSQL store"),
        ));
    }
    Ok(file)
}

pub async fn serve(opts: ServeOptions) -> Result<u8, CliError> {
    let loaded = crate::config::load(&opts.config).map_err(CliError::config)?;
    // Before anything starts: a node with too short a lease could retry a
    // job beside the remains of its attempt.
    let lease = opts.lease.or(loaded.config.project.lease).unwrap_or(SchedulerConfig::new(String::new(), PathBuf::new()).lease);
    if let Err(e) = scheduler::check_lease(lease, opts.poll) {
        return Err(match (opts.lease, loaded.config.project.lease) {
            (None, Some(_)) => CliError::new(exit::INVALID_CONFIG, format!("{}: [project] lease: {e}", loaded.path.display())),
            _ => CliError::new(exit::USAGE, format!("--lease/--poll: {e}")),
        });
    }
    let url = store_url(opts.store.as_deref(), loaded.config.project.store.as_deref(), &loaded.dir);
    let _lock = match url.strip_prefix("sqlite://") {
        Some(path) => {
            if let Some(parent) = Path::new(path).parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            Some(lock_sqlite(path)?)
        }
        None => None,
    };
    let store: Arc<dyn Store> = store::open(&url).await.map_err(|e| {
        let code = if matches!(e, store::StoreError::SchemaTooNew { .. }) { exit::INCOMPATIBLE_STORE } else { exit::UNAVAILABLE };
        CliError::new(code, e.to_string())
    })?;
    let addr: SocketAddr =
        opts.listen.parse().map_err(|e| CliError::new(exit::USAGE, format!("--listen {:?} is not an address like 127.0.0.1:7878: {e}", opts.listen)))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint =
            if e.kind() == std::io::ErrorKind::AddrInUse { " (the port is in use: is another slipway serve running? pick another with --listen)" } else { "" };
        CliError::new(exit::UNAVAILABLE, format!("cannot listen on {addr}: {e}{hint}"))
    })?;
    let local = listener.local_addr().unwrap_or(addr);

    let node_id = opts.node_id.clone().unwrap_or_else(scheduler::default_node_id);
    let parallelism = opts.parallelism.or(loaded.config.project.parallelism).unwrap_or(8);
    let work_dir = loaded.dir.join(".slipway").join("work");
    let mut cfg = SchedulerConfig::new(node_id.clone(), work_dir);
    cfg.parallelism = parallelism;
    cfg.poll = opts.poll;
    cfg.shutdown_grace = opts.shutdown_grace;
    if let Some(l) = opts.lease.or(loaded.config.project.lease) {
        cfg.lease = l;
    }
    if let Some(m) = loaded.config.project.max_log_bytes {
        cfg.max_log_bytes = m;
    }

    // Registered before the API answers, so a node that listens is listed.
    store.register_node(&node_id).await.map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    // One identity for the installation's containers and processes.
    let scope = crate::process::installation_of_store(&url);
    let node = start_node(NodeOptions { config_path: loaded.path.clone(), store: store.clone(), scheduler: cfg, listener, scope });
    let shutdown = node.shutdown.clone();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            // Not eprintln!: with stderr closed it would panic here, and the node would never stop.
            let _ = writeln!(std::io::stderr(), "slipway: stopping (running jobs get their grace period; signal again to exit now)");
            shutdown.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let _ = writeln!(std::io::stderr(), "slipway: exiting now");
            std::process::exit(exit::INTERRUPTED as i32);
        });
    }

    let _ = writeln!(
        std::io::stderr(),
        "slipway serve: node {node_id}, listening on http://{local}, store {} ({}), parallelism {parallelism}, config {}",
        store::sql::redact_url(&url),
        store.backend(),
        loaded.path.display()
    );
    let result = node.task.await.unwrap_or_else(|e| Err(crate::store::StoreError::Unavailable(format!("node task failed: {e}"))));
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => Err(CliError::new(exit::UNAVAILABLE, format!("scheduler stopped: {e}"))),
    }
}

pub struct NodeOptions {
    pub config_path: PathBuf,
    pub store: Arc<dyn Store>,
    pub scheduler: SchedulerConfig,
    pub listener: tokio::net::TcpListener,
    /// Which containers and local processes are this installation's
    /// (`crate::process::installation_of_store`): only those are ever swept.
    pub scope: String,
}

/// A node started by [`start_node`]: cancel `shutdown` to stop it; `task`
/// ends when the scheduler has stopped and the API has closed.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
}

/// Wire one node: event consumers (store log writer, metrics, server log),
/// the scheduler, and the API on `listener`. Used by `serve` and by the
/// in-process tests.
pub fn start_node(opts: NodeOptions) -> RunningNode {
    let store = opts.store;
    let addr = opts.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut bus = EventBus::new();
    let log_rx = bus.subscribe(4096);
    let metrics_rx = bus.subscribe(4096);
    let report_rx = bus.subscribe(4096);
    let notify_rx = bus.subscribe(4096);
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(logwriter::run(store.clone(), log_rx));
    tokio::spawn(api::metrics::consume(metrics.clone(), metrics_rx));
    tokio::spawn(report(report_rx));
    tokio::spawn(crate::notify::run(store.clone(), opts.config_path.clone(), notify_rx));
    let node = opts.scheduler.node_id.clone();
    let parallelism = opts.scheduler.parallelism;
    let shutdown = CancellationToken::new();
    // The submitter reports gates and rejected revisions on the same bus.
    let events = bus.clone();
    let targets = Arc::new(Targets::new(NodeContext { installation: opts.scope }).restoring());
    let services = ServiceManager::with_targets(targets.clone(), store.clone(), shutdown.clone());
    let executor = Arc::new(Executor::new(targets.clone()).with_services(services.clone()));
    let sched = Scheduler::with_executor(store.clone(), executor, opts.scheduler, bus);
    // Services come back at their recorded versions while the node starts
    // taking work (a rollout waits for its service's restore).
    tokio::spawn({
        let (services, workdir) = (services.clone(), sched.workdir_fn());
        async move { services.restore(workdir).await }
    });
    let wake = sched.handle();
    let submitter = Arc::new(Submitter {
        config_path: opts.config_path,
        store: store.clone(),
        parallelism,
        wake: Some(wake),
        targets: Some(targets),
        events: Some(events),
        deciding: Default::default(),
        parsed: Default::default(),
        redeployed: Default::default(),
        fetch_failures: Default::default(),
    });
    tokio::spawn(crate::gate::run(store.clone(), submitter.clone(), shutdown.clone()));
    tokio::spawn(crate::trigger::poll::run(submitter.clone(), shutdown.clone()));
    let state = Arc::new(AppState { store: store.clone(), submitter, metrics, node, services: Some(services.clone()), refusals: Default::default() });
    let app = api::router(state.clone());
    let listener = opts.listener;
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let stop = token.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(async move { stop.cancelled().await }).await
        });
        let result = Scheduler::run(sched, token.clone()).await;
        token.cancel();
        services.stop_all_services().await;
        // Open log streams would hold a graceful shutdown forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        // Refusals counted but not yet summed up in the audit log.
        let _ = tokio::time::timeout(Duration::from_secs(5), api::audit::flush_refusals(&state)).await;
        result
    });
    RunningNode { addr, shutdown, task }
}

/// The server's own log: one line per job event.
async fn report(mut rx: tokio::sync::mpsc::Receiver<Arc<Event>>) {
    while let Some(ev) = rx.recv().await {
        match &*ev {
            Event::DeploymentStarted { deployment, .. } => tracing::info!(deployment, "deployment started"),
            Event::JobStarted { deployment, name, attempt, .. } => tracing::info!(deployment, job = %name, attempt, "job started"),
            Event::JobFinished { deployment, name, attempt, outcome, reason, duration, retry_in, .. } => tracing::info!(
                deployment,
                job = %name,
                attempt,
                outcome = %outcome,
                reason = reason.as_deref().unwrap_or(""),
                duration_ms = duration.as_millis() as u64,
                retry_in_ms = retry_in.map(|d| d.as_millis() as u64),
                "job finished"
            ),
            Event::DeploymentFinished { deployment, state } => tracing::info!(deployment, state = %state, "deployment finished"),
            Event::DeploymentWaiting { deployment } => tracing::info!(deployment, "deployment waiting for approval"),
            Event::RevisionRejected { environment, commit, errors } => {
                tracing::warn!(environment = %environment, commit = %commit, "config revision rejected:\n{errors}")
            }
            Event::JobOutput { .. } => {}
        }
    }
}
