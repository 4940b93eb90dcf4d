//! A node's scheduler: the loop that starts queued deployments, claims
//! ready jobs up to the node's parallelism, runs them on a [`Target`],
//! keeps their leases alive, and takes over jobs whose node died.
//!
//! Design notes: `docs/design/scheduler.md`. In short: all coordination
//! goes through the store (so one node and five behave the same); each
//! claim bumps the job's fencing token and every later write carries it;
//! a finished job releases its dependants in the same transaction, and the
//! loop is woken at once to claim them, so a chain of jobs pays no polling
//! delay. Polling (`poll`) only finds work made by other nodes.
//!
//! **Architecture Invariant:** the scheduler reports only through
//! [`Event`]s (emitted on the node's [`crate::events`] bus) and never sees
//! a concrete target.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::revision;
use crate::events::{Event, EventBus};
use crate::executor::{Executor, JobContext};
use crate::service::ServiceManager;
use crate::store::{ClaimedJob, FinishEffect, FinishedAttempt, Outcome, Store, StoreError, now_ms};
use crate::targets::{JobRequest, RunResult, Target};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub node_id: String,
    /// Jobs this node runs at once.
    pub parallelism: usize,
    /// How long a claim or lock holds without renewal.
    pub lease: Duration,
    /// How often to look for work made elsewhere and for expired leases.
    pub poll: Duration,
    /// Output kept per job attempt.
    pub max_log_bytes: u64,
    /// Where revisions are unpacked.
    pub work_dir: PathBuf,
    /// On shutdown, how long running jobs may take to finish.
    pub shutdown_grace: Duration,
}

impl SchedulerConfig {
    pub fn new(node_id: impl Into<String>, work_dir: PathBuf) -> Self {
        SchedulerConfig {
            node_id: node_id.into(),
            parallelism: 8,
            lease: Duration::from_secs(15),
            poll: Duration::from_millis(500),
            max_log_bytes: 1 << 20,
            work_dir,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// How long a job's result is retried against a store that answers with
/// an error (not one that does not answer: that is retried until it does).
const FINISH_RETRY_LIMIT: Duration = Duration::from_secs(600);

/// How long ending a dead node's leftover processes may take once a sweep
/// is due (the sweep task waking late on a busy host, reading /proc,
/// SIGKILL, seeing them gone).
const SWEEP_MARGIN: Duration = Duration::from_millis(500);

/// How long a store call of the loop that does not go through the writer
/// (which bounds its own batches) may wait: past the server's statement
/// timeout (30 s), so only a connection that will never answer reaches
/// it (`bounded`).
const STORE_CALL_DEADLINE: Duration = Duration::from_secs(45);

/// `call`, or the store unavailable after [`STORE_CALL_DEADLINE`]: a
/// connection gone silent (its server gone without a reset; sqlx sets no
/// keepalive) would hold the loop forever. Only the store call is cut
/// short, never the events that follow what it did.
async fn bounded<T>(call: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_CALL_DEADLINE, call)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("the store did not answer within {} s", STORE_CALL_DEADLINE.as_secs()))))
}

/// How often a node renews its leases.
pub fn renew_interval(lease: Duration) -> Duration {
    (lease / 3).min(Duration::from_secs(1)).max(Duration::from_millis(50))
}

/// How often a node looks for processes left on its host by a dead node
/// of its installation: every poll interval, as for other work left by
/// other nodes (not more than four times a second: it reads /proc).
pub fn sweep_interval(poll: Duration) -> Duration {
    poll.max(Duration::from_millis(250))
}

/// The shortest lease that lets a node on the same host as a node that
/// dies end the dead node's processes before that node's leases run out,
/// so before any node can retry its jobs: the dead node may have renewed
/// last one renew interval before it died, and its processes are found
/// within one sweep interval and ended within `SWEEP_MARGIN`. (The
/// renew interval is a third of the lease, at most 1 s.)
pub fn minimum_lease(poll: Duration) -> Duration {
    let rest = sweep_interval(poll) + SWEEP_MARGIN;
    // lease >= lease/3 + rest while the lease is under 3 s; above, lease >= 1s + rest.
    let short = rest * 3 / 2;
    if short <= Duration::from_secs(3) { short } else { rest + Duration::from_secs(1) }
}

/// A lease too short for the node's sweep and poll intervals.
#[derive(Debug, thiserror::Error)]
#[error(
    "a lease of {} is too short with a poll interval of {}: it must be at least {} (a dead node's leases may have been renewed {} before it died; another node on its host finds its leftover processes within a sweep interval of {} and needs up to {} to end them; all of that must fit in the lease, or a retry of its job could start while they still run)",
    humantime::format_duration(*lease),
    humantime::format_duration(*poll),
    humantime::format_duration(*minimum),
    humantime::format_duration(renew_interval(*minimum)),
    humantime::format_duration(sweep_interval(*poll)),
    humantime::format_duration(SWEEP_MARGIN)
)]
pub struct LeaseTooShort {
    pub lease: Duration,
    pub poll: Duration,
    pub minimum: Duration,
}

/// Refuse a lease shorter than [`minimum_lease`] for `poll`.
pub fn check_lease(lease: Duration, poll: Duration) -> Result<(), LeaseTooShort> {
    let minimum = minimum_lease(poll);
    if lease < minimum { Err(LeaseTooShort { lease, poll, minimum }) } else { Ok(()) }
}

/// Why a running job is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    DeploymentCancelled,
    LeaseLost,
    Shutdown,
}

#[derive(Clone)]
struct Running {
    cancel: CancellationToken,
    why: Arc<OnceLock<StopReason>>,
    /// Told to the target: the job is handed over, not cancelled.
    stopping: crate::targets::Stopping,
}

/// Attempts this node runs now, by (job id, fence): a job re-claimed by
/// this node while its old attempt is still being stopped is two entries,
/// two slots. Shared by the loop (slots, leases) and the job tasks. An
/// entry goes in *before* its task is spawned, so a slot is never counted
/// late (and parallelism never exceeded).
type RunningMap = Arc<Mutex<HashMap<(i64, i64), Running>>>;

fn snapshot(running: &RunningMap) -> HashMap<(i64, i64), Running> {
    running.lock().map(|m| m.clone()).unwrap_or_default()
}

fn register(running: &RunningMap, job: &ClaimedJob) {
    if let Ok(mut m) = running.lock() {
        m.insert((job.job_id, job.fence), Running { cancel: CancellationToken::new(), why: Arc::new(OnceLock::new()), stopping: Default::default() });
    }
}

fn running_len(running: &RunningMap) -> usize {
    running.lock().map(|m| m.len()).unwrap_or(0)
}

/// Whether the store answers this node, as its own calls find. Other
/// nodes' leases are judged only once it has answered for a whole lease
/// without a break: a lease that ran out while the store could not be
/// reached says nothing about its node (`docs/design/scheduler.md`,
/// "When the store does not answer").
struct StoreSeen {
    /// Since when every call got an answer; None while the last one found
    /// the store unavailable.
    answering_since: Mutex<Option<Instant>>,
}

impl StoreSeen {
    fn new() -> Self {
        StoreSeen { answering_since: Mutex::new(Some(Instant::now())) }
    }

    /// Start counting now (a node that just started knows nothing of
    /// what the store went through before).
    fn restart(&self) {
        if let Ok(mut s) = self.answering_since.lock() {
            *s = Some(Instant::now());
        }
    }

    fn saw<T>(&self, r: &Result<T, StoreError>) {
        if let Ok(mut s) = self.answering_since.lock() {
            match r {
                Ok(_) => {
                    s.get_or_insert_with(Instant::now);
                }
                Err(StoreError::Unavailable(_)) => *s = None,
                // The store answered, with an error of its own.
                Err(_) => {}
            }
        }
    }

    fn answering_for(&self) -> Duration {
        self.answering_since.lock().ok().and_then(|s| s.map(|t| t.elapsed())).unwrap_or_default()
    }
}

/// Removes a job from the running map when its task is done with it,
/// also if the task panics.
struct Slot {
    running: RunningMap,
    attempt: (i64, i64),
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.running.lock() {
            m.remove(&self.attempt);
        }
    }
}

pub struct Scheduler {
    store: Arc<dyn Store>,
    /// Runs each job on its target (see `crate::executor`).
    executor: Arc<Executor>,
    cfg: SchedulerConfig,
    events: EventBus,
    wake: Arc<Notify>,
    /// Set when queued deployments may be startable (a submit, a finished
    /// or cancelled deployment freed a lock); otherwise only the poll tick
    /// looks, keeping a query off every job's path.
    activate: Arc<AtomicBool>,
    materialized: Arc<Materialized>,
    store_seen: StoreSeen,
}

/// How the rest of the node tells the scheduler there is new work.
#[derive(Clone)]
pub struct SchedulerHandle {
    wake: Arc<Notify>,
    activate: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// A deployment was submitted or cancelled: look now.
    pub fn work_changed(&self) {
        self.activate.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Unpacked revisions, by id: one cell per revision, so that the jobs of a
/// deployment's first wave, which all start at once, wait for one load and
/// unpack instead of each loading the archive from the store (issue 19:
/// 46 loads of the same revision at the start of a 1,000-job graph on
/// PostgreSQL).
type Materialized = Mutex<HashMap<String, Arc<tokio::sync::OnceCell<PathBuf>>>>;

/// The revision's files under `work_dir`, unpacked once per process.
async fn materialize(store: &dyn Store, work_dir: &std::path::Path, cache: &Materialized, revision_id: &str) -> Result<PathBuf, String> {
    unpack_once(cache, work_dir, revision_id, || async {
        let rev = store
            .revision(revision_id)
            .await
            .map_err(|e| format!("cannot load revision {}: {e}", revision::short(revision_id)))?
            .ok_or_else(|| format!("revision {} is missing from the store", revision::short(revision_id)))?;
        Ok(rev.archive)
    })
    .await
}

/// The revision unpacked under `work_dir` by the first caller, with the
/// archive `load` gives; callers that come meanwhile wait for that one.
/// A failure is not kept: the next caller tries again.
async fn unpack_once<F, Fut>(cache: &Materialized, work_dir: &std::path::Path, revision_id: &str, load: F) -> Result<PathBuf, String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
{
    let cell = {
        let mut cells = cache.lock().unwrap_or_else(|e| e.into_inner());
        // Every job asks: the key is copied only for the first.
        match cells.get(revision_id) {
            Some(cell) => cell.clone(),
            None => cells.entry(revision_id.to_string()).or_default().clone(),
        }
    };
    let path = cell
        .get_or_try_init(|| async {
            let archive = load().await?;
            let (work, id) = (work_dir.to_path_buf(), revision_id.to_string());
            tokio::task::spawn_blocking(move || revision::materialize(&work, &id, &archive))
                .await
                .map_err(|e| format!("unpacking revision: {e}"))?
                .map_err(|e| format!("cannot unpack revision {} under {}: {e}", revision::short(revision_id), work_dir.display()))
        })
        .await?;
    Ok(path.clone())
}

/// A node id unique to this process: host, pid and a random suffix.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "node".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

impl Scheduler {
    /// Every job on `target` (in-process tests and benchmarks).
    pub fn new(store: Arc<dyn Store>, target: Arc<dyn Target>, cfg: SchedulerConfig, events: EventBus) -> Self {
        Self::with_executor(store, Arc::new(Executor::single(target)), cfg, events)
    }

    pub fn with_executor(store: Arc<dyn Store>, executor: Arc<Executor>, cfg: SchedulerConfig, events: EventBus) -> Self {
        Scheduler {
            store,
            executor,
            cfg,
            events,
            wake: Arc::new(Notify::new()),
            activate: Arc::new(AtomicBool::new(true)),
            materialized: Arc::default(),
            store_seen: StoreSeen::new(),
        }
    }

    /// Let this node run rollouts through `services`.
    pub fn with_services(mut self, services: Arc<ServiceManager>) -> Self {
        self.executor = Arc::new((*self.executor).clone().with_services(services));
        self
    }

    /// Unpack a revision for a job or a service (cached per revision).
    pub fn workdir_fn(&self) -> impl Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PathBuf, String>> + Send>> + use<> {
        let (store, work_dir, materialized) = (self.store.clone(), self.cfg.work_dir.clone(), self.materialized.clone());
        move |id: String| {
            let (store, work_dir, materialized) = (store.clone(), work_dir.clone(), materialized.clone());
            Box::pin(async move { materialize(&*store, &work_dir, &materialized, &id).await })
        }
    }

    pub fn handle(&self) -> SchedulerHandle {
        SchedulerHandle { wake: self.wake.clone(), activate: self.activate.clone() }
    }

    /// Run until `shutdown` fires, then let running jobs finish within the
    /// grace period; jobs still running then are stopped and recorded as
    /// interrupted.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let this = Arc::new(self);
        this.store.register_node(&this.cfg.node_id).await?;
        this.store_seen.restart();
        // Remains of jobs of a Slipway of this installation that died on
        // this host go first, so a retried job never runs beside its own
        // interrupted attempt.
        this.executor.start().await;
        let swept = this.executor.sweep_jobs().await;
        if swept > 0 {
            tracing::warn!(processes = swept, "killed processes left by jobs of a Slipway process of this installation that died");
        }
        tracing::info!(killed = swept, "swept this host for processes left by dead nodes of this installation");
        if this.store.single_node() {
            // Only one node can use this store, so whatever a previous
            // process left running is dead: reap it now, not after a lease.
            this.store.expire_all_leases().await?;
        }
        let running: RunningMap = Arc::default();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let renew_every = renew_interval(this.cfg.lease);
        let mut last_reap = Instant::now() - this.cfg.poll;
        // Leases are renewed by a task of their own: nothing the loop waits
        // on (a slow store write, a full event channel) may delay them, or
        // other nodes would take over jobs that are alive.
        let renewer_stop = CancellationToken::new();
        let renewer = {
            let (this, running, stop) = (this.clone(), running.clone(), renewer_stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(renew_every) => {}
                    }
                    // Bounded: a renewal slower than the lease is no
                    // renewal, and a store that does not answer at all
                    // (no reset, no error) must still count as down.
                    let renewed = tokio::time::timeout(this.cfg.lease, this.renew(&snapshot(&running)))
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("renewing leases took longer than the lease ({:?})", this.cfg.lease))));
                    this.store_seen.saw(&renewed);
                    if let Err(e) = renewed {
                        tracing::warn!(error = %e, "renewing leases failed; retrying");
                    }
                }
            })
        };
        // Sweeps too: a dead node's processes on this host must be ended
        // before its leases run out (`minimum_lease`), whatever the loop
        // is waiting for.
        let sweeper = {
            let (this, stop, every) = (this.clone(), renewer_stop.clone(), sweep_interval(this.cfg.poll));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let swept = this.executor.sweep_jobs().await;
                    if swept > 0 {
                        tracing::warn!(processes = swept, "killed processes left by jobs of a Slipway process of this installation that died");
                    }
                }
            })
        };
        let mut store_down_since: Option<Instant> = None;
        let mut last_activate = Instant::now();

        while !shutdown.is_cancelled() {
            let step = async {
                if last_reap.elapsed() >= this.cfg.poll && this.may_reap() {
                    this.reap(&snapshot(&running)).await?;
                    last_reap = Instant::now();
                }
                if this.activate.swap(false, Ordering::SeqCst) || last_activate.elapsed() >= this.cfg.poll {
                    last_activate = Instant::now();
                    let started = bounded(this.store.activate(&this.cfg.node_id, this.cfg.lease)).await;
                    if started.is_err() {
                        this.activate.store(true, Ordering::SeqCst);
                    }
                    for d in started? {
                        this.events.emit(Event::DeploymentStarted { deployment: d, node: this.cfg.node_id.clone() }).await;
                    }
                }
                let free = this.cfg.parallelism.saturating_sub(running_len(&running));
                if free > 0 {
                    for job in this.store.claim(&this.cfg.node_id, this.cfg.lease, free as i64).await? {
                        register(&running, &job);
                        let me = this.clone();
                        let (running, shutdown) = (running.clone(), shutdown.clone());
                        tasks.spawn(async move { me.run_chain(job, running, shutdown).await });
                    }
                }
                Ok::<(), StoreError>(())
            }
            .await;
            this.store_seen.saw(&step);
            let pause = match step {
                Ok(()) => {
                    if let Some(since) = store_down_since.take() {
                        tracing::info!(after = ?since.elapsed(), lease = ?this.cfg.lease, "store reachable again; other nodes' leases are judged again once it has answered for a lease");
                    }
                    renew_every.min(this.cfg.poll)
                }
                Err(e) => {
                    if store_down_since.is_none() {
                        store_down_since = Some(Instant::now());
                    }
                    tracing::warn!(error = %e, "scheduler step failed; retrying");
                    Duration::from_millis(500)
                }
            };
            tokio::select! {
                _ = this.wake.notified() => {}
                Some(done) = tasks.join_next() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "job task failed");
                    }
                }
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => {}
            }
        }

        // Shutdown: no new claims. Give running jobs the grace period.
        if running_len(&running) > 0 {
            tracing::info!(jobs = running_len(&running), grace = ?this.cfg.shutdown_grace, "waiting for running jobs before stopping");
        }
        let deadline = tokio::time::Instant::now() + this.cfg.shutdown_grace;
        loop {
            tokio::select! {
                done = tasks.join_next() => if done.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    for r in snapshot(&running).values() {
                        let _ = r.why.set(StopReason::Shutdown);
                        r.stopping.hand_over();
                        r.cancel.cancel();
                    }
                    // Killed jobs record themselves quickly; one stuck on a
                    // dead store is abandoned (its lease will expire).
                    let drained = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
                    if drained.is_err() {
                        tracing::warn!("abandoning job results that could not be recorded; their leases will expire");
                        tasks.abort_all();
                    }
                    break;
                }
            }
        }
        renewer_stop.cancel();
        let _ = renewer.await;
        let _ = sweeper.await;
        Ok(())
    }

    /// Whether this node may judge other nodes' leases now: only once the
    /// store has answered it for a whole lease since it last did not (or
    /// since this node started), so that every live node has had a lease
    /// to renew, and to record what it finished, after the store came
    /// back. A single-node store needs no wait: every lease in it that
    /// this node does not hold is a dead process's.
    fn may_reap(&self) -> bool {
        // A lease, plus a renewal interval and a margin: an owner's renewal
        // that started just before the store came back may hang for up to a
        // lease (its timeout) before the next one is sent.
        self.store.single_node() || self.store_seen.answering_for() >= self.cfg.lease + renew_interval(self.cfg.lease) + Duration::from_millis(500)
    }

    /// Keep our leases; stop jobs whose lease is gone or whose deployment
    /// was cancelled.
    async fn renew(&self, running: &HashMap<(i64, i64), Running>) -> Result<(), StoreError> {
        if running.is_empty() {
            return self.store.renew(&self.cfg.node_id, &[], self.cfg.lease).await.map(|_| ());
        }
        let held: Vec<(i64, i64)> = running.keys().copied().collect();
        // Answers come in the order of `held`.
        for (key, r) in held.iter().zip(self.store.renew(&self.cfg.node_id, &held, self.cfg.lease).await?) {
            if let Some(job) = running.get(key) {
                if !r.held {
                    let _ = job.why.set(StopReason::LeaseLost);
                    job.stopping.hand_over();
                    job.cancel.cancel();
                } else if r.cancel {
                    let _ = job.why.set(StopReason::DeploymentCancelled);
                    job.cancel.cancel();
                }
            }
        }
        Ok(())
    }

    /// Jobs whose node stopped renewing: retry if idempotent, else fail
    /// them as interrupted. Fenced, so two nodes reaping at once is safe.
    async fn reap(&self, running: &HashMap<(i64, i64), Running>) -> Result<(), StoreError> {
        bounded(self.store.reap_locks(&self.cfg.node_id, self.cfg.lease)).await?;
        let expired = bounded(self.store.expired()).await?;
        // What a dead node left running on this host goes (and is seen
        // gone) before its jobs are retried.
        if expired.iter().any(|x| !running.contains_key(&(x.job_id, x.fence))) {
            let swept = self.executor.sweep_jobs().await;
            if swept > 0 {
                tracing::warn!(processes = swept, "killed processes left by jobs of a Slipway process of this installation that died");
            }
        }
        for x in expired {
            // Our own job whose lease ran out while the store was down: we
            // still hold it (and maybe its result), so renew, don't reap.
            if running.contains_key(&(x.job_id, x.fence)) {
                continue;
            }
            let retry = x.spec.idempotent && (x.attempt as u32) < x.spec.interrupted_attempt_limit();
            let node = x.node.clone().unwrap_or_else(|| "?".into());
            let reason = if retry {
                format!("interrupted: node {node} stopped renewing its lease mid-run; retrying because the job is idempotent")
            } else if x.spec.idempotent {
                format!("interrupted: node {node} stopped renewing its lease mid-run, and the job has no attempts left")
            } else {
                format!(
                    "interrupted: node {node} stopped renewing its lease mid-run; not retried because the job is not declared idempotent (set `idempotent = true` if running it twice is safe)"
                )
            };
            tracing::warn!(deployment = x.deployment_id, job = %x.name, %reason, "reaping job");
            let effect = self
                .store
                .finish(FinishedAttempt {
                    job_id: x.job_id,
                    fence: x.fence,
                    node,
                    started_at: x.started_at,
                    outcome: Outcome::Interrupted,
                    exit_code: None,
                    reason: Some(reason.clone()),
                    retry_at: retry.then(now_ms),
                    takeover: true,
                    parts: Vec::new(),
                })
                .await?;
            if !effect.stale {
                self.events
                    .emit(Event::JobFinished {
                        deployment: x.deployment_id,
                        job_id: x.job_id,
                        name: x.name.clone(),
                        attempt: x.attempt,
                        outcome: Outcome::Interrupted,
                        reason: Some(reason),
                        duration: Duration::from_millis((now_ms() - x.started_at).max(0) as u64),
                        retry_in: retry.then_some(Duration::ZERO),
                    })
                    .await;
                self.after_finish(&effect).await;
            }
        }
        Ok(())
    }

    async fn after_finish(&self, effect: &FinishEffect) {
        if let Some((deployment, state)) = effect.deployment_finished {
            self.events.emit(Event::DeploymentFinished { deployment, state }).await;
        }
        if effect.deployment_finished.is_some() {
            // Its lock is free: a queued deployment may start.
            self.activate.store(true, Ordering::SeqCst);
        }
        if effect.newly_ready > 0 || effect.deployment_finished.is_some() {
            self.wake.notify_one();
        }
    }

    async fn workdir(&self, revision_id: &str) -> Result<PathBuf, String> {
        materialize(&*self.store, &self.cfg.work_dir, &self.materialized, revision_id).await
    }

    /// Run a claimed job, then, in the same slot, whatever job the store
    /// hands over with its result (`finish_and_claim`): a chain of jobs
    /// runs without a trip through the loop between links.
    async fn run_chain(self: Arc<Self>, first: ClaimedJob, running: RunningMap, shutdown: CancellationToken) {
        // The loop registered `first`; each next job is registered before
        // the slot of the one before is released.
        let mut next = Some(first);
        let mut _slot: Option<Slot> = None;
        while let Some(job) = next.take() {
            let key = (job.job_id, job.fence);
            let Some(entry) = running.lock().ok().and_then(|m| m.get(&key).cloned()) else {
                tracing::error!(job = %job.name, "claimed job missing from the running map; its lease will expire");
                return;
            };
            _slot = Some(Slot { running: running.clone(), attempt: key });
            next = self.run_job(job, entry.cancel, entry.why, entry.stopping, &shutdown).await;
            if let Some(n) = &next {
                register(&running, n);
            }
        }
    }

    /// Whether `job`'s previous attempt was interrupted, asked only for a
    /// target that finds an earlier attempt's work (one extra read per
    /// retry there). Unknown (the store blinks): not resuming, as before.
    async fn resuming(&self, job: &ClaimedJob) -> bool {
        let target = job.spec.target.as_deref().unwrap_or(crate::targets::DEFAULT);
        if job.attempt < 2 || !crate::targets::kind(target).is_some_and(|k| k.capabilities().resumes_jobs) {
            return false;
        }
        let attempts = self.store.attempts(job.deployment_id).await.unwrap_or_default();
        attempts.iter().any(|a| a.job == job.name && a.attempt == job.attempt - 1 && a.outcome == Outcome::Interrupted)
    }

    /// Returns the next job to run in this slot, if the store gave one.
    /// `shutdown`: once it fires, no next job is taken.
    async fn run_job(
        &self,
        job: ClaimedJob,
        cancel: CancellationToken,
        why: Arc<OnceLock<StopReason>>,
        stopping: crate::targets::Stopping,
        shutdown: &CancellationToken,
    ) -> Option<ClaimedJob> {
        let started_at = now_ms();
        let start = Instant::now();
        self.events
            .emit(Event::JobStarted {
                deployment: job.deployment_id,
                job_id: job.job_id,
                name: job.name.clone(),
                attempt: job.attempt,
                node: self.cfg.node_id.clone(),
                queued_for: Duration::from_millis((started_at - job.ready_at).max(0) as u64),
                since_event: Duration::from_millis((started_at - job.event_at).max(0) as u64),
            })
            .await;
        let note = |line: String| Event::JobOutput {
            deployment: job.deployment_id,
            job_id: job.job_id,
            attempt: job.attempt,
            ts: now_ms(),
            stream: "slipway",
            line,
            part: None,
        };
        // The secrets this job is given: masked in everything kept of it.
        let redactor = redactor_for(&job.spec);
        // A retry never starts beside what this host still runs of an
        // earlier attempt (a dead node's leftovers are ended; a live node
        // stopping its attempt is waited for, at most until its timeout
        // would have ended it).
        let earlier = if job.attempt > 1 {
            let within = Duration::from_millis(job.spec.timeout_ms.saturating_add(job.spec.kill_grace_ms)).saturating_add(self.cfg.lease);
            let ended = self.executor.end_earlier_attempts(&job.spec, job.deployment_id, &job.name, job.attempt, within, &cancel).await;
            if let Ok(n @ 1..) = ended {
                self.events
                    .emit(note(format!(
                        "[slipway] {n} processes of an earlier attempt were still running on this host; attempt {} started once they were gone",
                        job.attempt
                    )))
                    .await;
            }
            ended.err()
        } else {
            None
        };
        // A job that runs once per environment, ever (a service's
        // bootstrap): done there before, it is not run again.
        let once = job.spec.once_per_environment.then(|| once_key(&job.environment, &job.name));
        let done_before = match &once {
            Some(key) if earlier.is_none() => match self.store.event_by_key(key).await {
                Ok(Some(e)) => Some(Ok(e)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
            _ => None,
        };
        let earlier = match done_before {
            Some(Ok(e)) => {
                let first: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
                let line = format!(
                    "[slipway] not run: {} already ran in {} (deployment {}); it runs once per environment",
                    job.name,
                    job.environment,
                    first["deployment"].as_i64().map(|d| d.to_string()).unwrap_or_else(|| "?".into())
                );
                self.events.emit(note(line)).await;
                Some(RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts: Vec::new() })
            }
            // Unknown whether it ran: not run now; the attempt fails and
            // may be retried.
            Some(Err(e)) => Some(RunResult::failed(format!("cannot tell whether {} already ran in {}: {e}", job.name, job.environment))),
            None => earlier,
        };
        let result = match (earlier, self.workdir(&job.revision).await) {
            (Some(r), _) => r,
            (None, Err(e)) => RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(e), parts: Vec::new() },
            (None, Ok(revision_dir)) => {
                // A tarball service's migrate and rollout run in its
                // unpacked release (fetched by the job before them).
                let cache = self.cfg.work_dir.parent().unwrap_or(&self.cfg.work_dir).join("artifacts");
                let workdir = Executor::workdir(&job.spec, revision_dir, &cache);
                let mut values = BTreeMap::new();
                values.insert("deployment", job.deployment_id.to_string());
                values.insert("env", job.environment.clone());
                values.insert("revision", job.revision.clone());
                values.insert("service", job.service.clone().unwrap_or_default());
                values.insert("version", job.version.clone().unwrap_or_default());
                let resuming = self.resuming(&job).await;
                let req = JobRequest {
                    deployment_id: job.deployment_id,
                    job: job.name.clone(),
                    attempt: job.attempt,
                    spec: job.spec.clone(),
                    workdir,
                    values,
                    stopping,
                    resuming,
                };
                let (tx, rx) = mpsc::channel(256);
                let c = cancel.clone();
                let ctx = JobContext { environment: job.environment.clone(), revision: job.revision.clone(), version: job.version.clone() };
                let executor = self.executor.clone();
                let run = tokio::spawn(async move { executor.run(ctx, req, &cache, tx, c).await });
                self.forward_output(&job, rx, &redactor).await;
                match run.await {
                    Ok(r) => r,
                    Err(e) => RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(format!("target failed: {e}")), parts: Vec::new() },
                }
            }
        };
        // Ran to success: recorded before its attempt is, so a node that
        // dies in between runs it again rather than never.
        // (Recorded again when it was skipped: the key keeps the first.)
        let result = match (&once, result.outcome == Outcome::Succeeded) {
            (Some(key), true) => {
                let payload = serde_json::json!({ "deployment": job.deployment_id, "job": job.name, "environment": job.environment }).to_string();
                // The store may blink: a few tries, as a rollout's commit.
                let mut delay = Duration::from_millis(200);
                let mut recorded = Err(String::new());
                for attempt in 1..=5 {
                    match self.store.record_event(crate::store::NewEvent { key: Some(key.clone()), kind: "job.once".into(), payload: payload.clone() }).await {
                        Ok(_) => {
                            recorded = Ok(());
                            break;
                        }
                        Err(e) => recorded = Err(e.to_string()),
                    }
                    if attempt < 5 {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
                match recorded {
                    Ok(()) => result,
                    Err(e) => RunResult::failed(format!("{} ran, but cannot be recorded as done in {} ({e}): it would run again", job.name, job.environment)),
                }
            }
            _ => result,
        };
        let stop = why.get().copied();
        let (outcome, reason) = match (stop, result.outcome) {
            (Some(StopReason::Shutdown), Outcome::Cancelled) => {
                (Outcome::Interrupted, Some(format!("interrupted: node {} shut down while the job ran", self.cfg.node_id)))
            }
            (Some(StopReason::DeploymentCancelled), Outcome::Cancelled) => (Outcome::Cancelled, Some("deployment cancelled while the job ran".into())),
            (_, o) => (o, result.reason.as_deref().map(|r| redactor.redact(r))),
        };
        let spec = &job.spec;
        let more_attempts = (job.attempt as u32) < spec.retry_attempts;
        let retry_in = match outcome {
            Outcome::Failed | Outcome::TimedOut if more_attempts && spec.retryable(result.exit_code.filter(|_| outcome == Outcome::Failed)) => {
                Some(spec.backoff(job.attempt as u32 + 1))
            }
            Outcome::Interrupted if spec.idempotent && (job.attempt as u32) < spec.interrupted_attempt_limit() => Some(Duration::ZERO),
            _ => None,
        };
        if stop == Some(StopReason::LeaseLost) {
            // Someone else owns the job now; writing would be wrong and
            // the fenced write would be refused anyway.
            self.events.emit(note("[slipway] lease lost: another node took this job over; this attempt's result is discarded".into())).await;
            return None;
        }
        let summary = match (&outcome, &reason, retry_in) {
            (Outcome::Succeeded, _, _) => format!("[slipway] attempt {} succeeded in {:.1?}", job.attempt, start.elapsed()),
            (o, r, Some(d)) => format!(
                "[slipway] attempt {} {}: {}; retrying in {:.1?} (attempt {} of {})",
                job.attempt,
                o,
                r.clone().unwrap_or_default(),
                d,
                job.attempt + 1,
                spec.retry_attempts
            ),
            (o, r, None) => format!("[slipway] attempt {} {}: {}", job.attempt, o, r.clone().unwrap_or_default()),
        };
        self.events.emit(note(summary)).await;
        let done = FinishedAttempt {
            job_id: job.job_id,
            fence: job.fence,
            node: self.cfg.node_id.clone(),
            started_at,
            outcome,
            exit_code: result.exit_code,
            reason: reason.clone(),
            retry_at: retry_in.map(|d| now_ms().saturating_add(d.as_millis().min(i64::MAX as u128 / 2) as i64)),
            takeover: false,
            parts: result.parts.iter().map(|p| crate::store::PartResult { reason: p.reason.as_deref().map(|r| redactor.redact(r)), ..p.clone() }).collect(),
        };
        // The store may be down: keep trying until it answers (the result
        // is this node's to record; it holds the job's slot, so at most
        // `parallelism` results wait, and the renewer keeps their leases
        // once the store is back; our own reaper leaves a job we hold
        // alone; a fenced write cannot clobber another node's takeover).
        // A store that answers with an error is tried until the limit;
        // then the reaper of some node decides.
        let mut delay = Duration::from_millis(100);
        let give_up = Instant::now() + FINISH_RETRY_LIMIT;
        let mut claimed = None;
        let effect = loop {
            // Checked now, not when the job started: a node stopping must
            // not take new work with the results of the old.
            let result = if !shutdown.is_cancelled() {
                self.store.finish_and_claim(done.clone(), &self.cfg.node_id, self.cfg.lease).await.map(|(e, c)| {
                    claimed = c;
                    e
                })
            } else {
                self.store.finish(done.clone()).await
            };
            self.store_seen.saw(&result);
            match result {
                Ok(e) => break Some(e),
                Err(e) if matches!(e, StoreError::Unavailable(_)) || Instant::now() < give_up => {
                    tracing::warn!(job = %job.name, error = %e, "cannot record job result yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    // The result stays in the log at least.
                    tracing::error!(deployment = job.deployment_id, job = %job.name, attempt = job.attempt, %outcome, exit_code = ?done.exit_code, error = %e, "giving up recording job result; its lease will expire");
                    break None;
                }
            }
        };
        self.events
            .emit(Event::JobFinished {
                deployment: job.deployment_id,
                job_id: job.job_id,
                name: job.name.clone(),
                attempt: job.attempt,
                outcome,
                reason,
                duration: start.elapsed(),
                retry_in,
            })
            .await;
        if let Some(effect) = effect {
            self.after_finish(&effect).await;
        }
        if retry_in.is_some() {
            let wake = self.wake.clone();
            let d = retry_in.unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                wake.notify_one();
            });
        }
        claimed
    }

    /// Output lines to events (secret values masked), bounded at
    /// `max_log_bytes` per attempt.
    async fn forward_output(&self, job: &ClaimedJob, mut rx: mpsc::Receiver<crate::targets::Line>, redactor: &crate::config::secret::Redactor) {
        let max = self.cfg.max_log_bytes;
        let mut kept = 0u64;
        let mut dropped_lines = 0u64;
        let mut dropped_bytes = 0u64;
        let ev = |stream: &'static str, line: String, part: Option<String>| Event::JobOutput {
            deployment: job.deployment_id,
            job_id: job.job_id,
            attempt: job.attempt,
            ts: now_ms(),
            stream,
            line,
            part,
        };
        let mut pieces = redactor.pieces::<(crate::targets::Stream, Option<String>)>();
        let mut ended = false;
        while !ended {
            // What the masker shows now, or at the end what it still held.
            let shown: Vec<((crate::targets::Stream, Option<String>), String)> = match rx.recv().await {
                Some(crate::targets::Line { stream, text, part, cut }) => {
                    pieces.piece((stream, part.clone()), text, cut).map(|t| ((stream, part), t)).into_iter().collect()
                }
                None => {
                    ended = true;
                    pieces.finish()
                }
            };
            for ((stream, part), line) in shown {
                let size = line.len() as u64 + 1;
                // Once truncated, stay truncated: a log with holes misleads.
                if dropped_lines > 0 || kept + size > max {
                    if dropped_lines == 0 {
                        self.events
                            .emit(ev(
                                "slipway",
                                format!("[slipway] output truncated: this attempt reached max_log_bytes ({max} bytes); further output is counted, not kept"),
                                None,
                            ))
                            .await;
                    }
                    dropped_lines += 1;
                    dropped_bytes += size;
                    continue;
                }
                kept += size;
                self.events.emit(ev(stream.as_str(), line, part)).await;
            }
        }
        if dropped_lines > 0 {
            self.events.emit(ev("slipway", format!("[slipway] {dropped_lines} lines ({dropped_bytes} bytes) of output were dropped"), None)).await;
        }
    }
}

/// The key under which a job that runs once per environment is recorded
/// as done there.
fn once_key(environment: &str, job: &str) -> String {
    format!("once/{environment}/{job}")
}

/// The secrets a job is given, directly or through what it runs (a
/// rollout's service, a pull's registry): what its output and reason mask.
fn redactor_for(spec: &crate::store::JobSpec) -> crate::config::secret::Redactor {
    let mut refs: Vec<&crate::config::secret::SecretRef> = spec.secrets.values().chain(spec.secret_files.values()).collect();
    match &spec.command {
        crate::config::Command::Rollout(s) => {
            refs.extend(s.secret_refs());
        }
        crate::config::Command::Pull(c) => refs.extend(c.auth.iter().flat_map(|a| a.password.iter().chain(a.token.iter()))),
        _ => {}
    }
    if refs.is_empty() {
        return Default::default();
    }
    crate::config::secret::Redactor::of(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: the minimum lease is the shortest one in which a node
    /// can have renewed, died, and had its processes found and ended by a
    /// node on its host.
    #[test]
    fn issue13_minimum_lease_fits_renewal_sweep_and_margin() {
        let fits = |lease: Duration, poll: Duration| lease >= renew_interval(lease) + sweep_interval(poll) + SWEEP_MARGIN;
        for poll_ms in [1, 100, 200, 250, 500, 1000, 1500, 2000, 5000, 20_000] {
            let poll = Duration::from_millis(poll_ms);
            let min = minimum_lease(poll);
            assert!(fits(min, poll), "poll {poll:?}: minimum {min:?} does not fit");
            assert!(!fits(min - Duration::from_millis(1), poll), "poll {poll:?}: {min:?} is not the minimum");
            assert!(check_lease(min, poll).is_ok() && check_lease(min - Duration::from_millis(1), poll).is_err());
        }
        assert_eq!(minimum_lease(Duration::from_millis(500)), Duration::from_millis(1500));
        // The default lease fits the default poll interval.
        assert!(check_lease(SchedulerConfig::new("n", PathBuf::new()).lease, Duration::from_millis(500)).is_ok());
    }

    /// Issue 19: the jobs of a deployment's first wave start together;
    /// each used to load the revision's archive from the store and unpack
    /// it (46 loads at the start of a 1,000-job graph on PostgreSQL).
    #[tokio::test]
    async fn issue19_a_revision_is_loaded_once_however_many_jobs_start_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let body = b"echo hi\n";
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        tar.append_data(&mut header, "run.sh", &body[..]).unwrap();
        let archive = tar.into_inner().unwrap();

        let cache = Materialized::default();
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            // The others arrive while this load is in progress.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(archive.clone())
        };
        let all = futures_util::future::join_all((0..20).map(|_| unpack_once(&cache, dir.path(), "rev-a", load))).await;
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for twenty jobs");
        let first = all[0].clone().unwrap();
        assert!(all.iter().all(|p| p.as_ref() == Ok(&first)), "{all:?}");
        assert_eq!(std::fs::read(first.join("run.sh")).unwrap(), body);

        // A failed load is not remembered: the next job tries again.
        let failed = unpack_once(&cache, dir.path(), "rev-b", || async { Err::<Vec<u8>, _>("store gone".to_string()) }).await;
        assert_eq!(failed, Err("store gone".to_string()));
        let again = unpack_once(&cache, dir.path(), "rev-b", load).await.unwrap();
        assert!(again.join("run.sh").is_file());
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }
}
