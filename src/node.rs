//! One node: the event consumers, the scheduler, the service manager, the
//! gate loop, the git poll and the API, wired together and stopped
//! together. `slipway serve` and the in-process tests start it here.
//!
//! Every task started here is spawned on one [`TaskTracker`] and awaited
//! when the node stops (within [`STOP_DEADLINE`]): the process exits only
//! after the log writer has stored the last lines it was given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, metrics::Metrics};
use crate::events::{EventBus, logwriter, server_log};
use crate::executor::Executor;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::service::ServiceManager;
use crate::store::{Store, StoreError};
use crate::submit::Submitter;
use crate::targets::{NodeContext, Targets};

/// How long a stopping node waits, once the scheduler has stopped, for its
/// other tasks (the event consumers drain what is queued; the store may be
/// slow). Past it the node stops anyway.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// How long open API connections (log follows) may hold a graceful close.
const API_CLOSE: Duration = Duration::from_secs(5);

/// After connections were abandoned: how long handlers still running may
/// go on emitting before the node closes the bus.
const BUS_GRACE: Duration = Duration::from_secs(1);

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
/// ends when the scheduler has stopped, the API has closed and every other
/// task of the node has ended (or [`STOP_DEADLINE`] has passed).
pub struct RunningNode {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

/// Wire one node: event consumers (store log writer, metrics, server log,
/// notifications), the scheduler, the gate loop, the git poll and the API
/// on `listener`.
pub fn start_node(opts: NodeOptions) -> RunningNode {
    start(opts, None)
}

/// [`start_node`] with the API served over TLS with `certificate` (which
/// `serve` reloads on `SIGHUP`, see [`api::tls`]).
pub fn start_node_tls(opts: NodeOptions, certificate: Arc<api::tls::Certificate>) -> Result<RunningNode, rustls::Error> {
    let config = certificate.server_config()?;
    Ok(start(opts, Some(config)))
}

fn start(opts: NodeOptions, tls: Option<Arc<rustls::ServerConfig>>) -> RunningNode {
    let store = opts.store;
    let addr = opts.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let tasks = TaskTracker::new();
    let mut bus = EventBus::new();
    let log_rx = bus.subscribe(4096);
    let metrics_rx = bus.subscribe(4096);
    let report_rx = bus.subscribe(4096);
    let notify_rx = bus.subscribe(4096);
    let changes_rx = bus.subscribe(4096);
    let close_bus = bus.closer();
    let metrics = Arc::new(Metrics::new());
    // The consumers end when every sender of the bus is gone (scheduler,
    // submitter), or the node closes the bus, after they have handled what
    // was queued.
    tasks.spawn(logwriter::run(store.clone(), log_rx));
    tasks.spawn(api::metrics::consume(metrics.clone(), metrics_rx));
    tasks.spawn(server_log::run(report_rx));
    tasks.spawn(crate::notify::run(store.clone(), opts.config_path.clone(), notify_rx));
    let changes = Arc::new(api::changes::Changes::default());
    tasks.spawn(api::changes::consume(changes.clone(), changes_rx));
    let node = opts.scheduler.node_id.clone();
    #[cfg(feature = "aws")]
    let lease = opts.scheduler.lease;
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
    tasks.spawn({
        let (services, workdir) = (services.clone(), sched.workdir_fn());
        async move { services.restore(workdir).await }
    });
    let wake = sched.handle();
    let submitter = Arc::new(Submitter {
        config_path: opts.config_path,
        store: store.clone(),
        parallelism,
        wake: Some(wake),
        targets: Some(targets.clone()),
        events: Some(events),
        deciding: Default::default(),
        parsed: Default::default(),
        redeployed: Default::default(),
        fetch_failures: Default::default(),
    });
    tasks.spawn(crate::submit::gates::run(store.clone(), submitter.clone(), shutdown.clone()));
    tasks.spawn(crate::trigger::poll::run(submitter.clone(), shutdown.clone()));
    tasks.spawn(tend_machines(submitter.clone(), targets.clone(), shutdown.clone()));
    let state = Arc::new(AppState { store: store.clone(), submitter, metrics, node, services: Some(services.clone()), refusals: Default::default(), changes });
    // `[sqs]`: one node of the installation reads the queue (a lease).
    #[cfg(feature = "aws")]
    tasks.spawn(crate::trigger::sqs_consumer::run(state.clone(), state.node.clone(), lease, shutdown.clone()));
    let app = api::router(state.clone());
    let server = {
        let stop = shutdown.clone();
        match tls {
            None => tasks.spawn(api::serve::serve(opts.listener, app, stop)),
            Some(config) => tasks.spawn(api::serve::serve(api::tls::TlsListener::new(opts.listener, config), app, stop)),
        }
    };
    let scheduler = tasks.spawn(Scheduler::run(sched, shutdown.clone()));
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let result = scheduler.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("scheduler task failed: {e}"))));
        token.cancel();
        services.stop_all_services().await;
        // Open log streams would hold a graceful close forever; the
        // server's task holds the submitter, hence the bus, until it ends.
        let abort = server.abort_handle();
        let closed = matches!(tokio::time::timeout(API_CLOSE, server).await, Ok(Ok(_)));
        if !closed {
            abort.abort();
        }
        // Refusals counted but not yet summed up in the audit log.
        let _ = tokio::time::timeout(Duration::from_secs(5), api::audit::flush_refusals(&state)).await;
        // The last holder of the submitter here: with it goes the bus, so
        // the consumers see their streams end and finish.
        drop(state);
        tasks.close();
        if !closed && tokio::time::timeout(BUS_GRACE, tasks.wait()).await.is_err() {
            // Something still holds the state and so the bus (a task a
            // handler started): the consumers would wait for it. What the
            // handlers still running emitted in the grace is taken first.
            close_bus.cancel();
        }
        if tokio::time::timeout(STOP_DEADLINE, tasks.wait()).await.is_err() {
            tracing::warn!(left = tasks.len(), "stopping without waiting longer for the node's tasks (the last job output may not be stored)");
        }
        result
    });
    RunningNode { addr, shutdown, task }
}

/// Every [`crate::targets::TEND_EVERY`], each target whose kind has tables
/// in the config on disk (`[[hosts]]`) looks after its machines
/// ([`crate::targets::Target::tend`]; SSH hosts: their supervisors kept
/// running). Until the node stops.
async fn tend_machines(submitter: Arc<Submitter>, targets: Arc<Targets>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(crate::targets::TEND_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // An invalid config on disk is reported where it is used; the
        // machines wait for a valid one.
        let Ok(loaded) = submitter.config().await else { continue };
        for kind in crate::targets::kinds() {
            let Some(tables) = loaded.config.targets.get(kind.name()).filter(|t| !t.is_empty()) else { continue };
            let target = match targets.get(kind.name()).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(target = kind.name(), error = %e.message, "cannot look after the target's machines");
                    continue;
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = target.tend(tables) => {}
            }
        }
    }
}
