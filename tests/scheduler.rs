//! Scheduler regression tests from the review of issue 3: a job whose
//! daemon keeps its output pipe open must still end, and a node must never
//! run more jobs at once than its parallelism.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use slipway::config::{Command, revision};
use slipway::events::EventBus;
use slipway::scheduler::{Scheduler, SchedulerConfig};
use slipway::store::{self, DeploymentKind, JobSpec, NewDeployment, NewEvent, NewJob, Outcome, Store};
use slipway::targets::{JobRequest, LocalTarget, OutputSink, RunResult, Target};
use tokio_util::sync::CancellationToken;

fn spec(cmd: Vec<&str>, timeout_ms: u64) -> JobSpec {
    JobSpec {
        command: Command::Argv(cmd.into_iter().map(String::from).collect()),
        timeout_ms,
        kill_grace_ms: 1000,
        retry_attempts: 1,
        retry_any: false,
        retry_exit_codes: vec![],
        retry_backoff_ms: 1000,
        retry_max_backoff_ms: 1000,
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

async fn setup(dir: &std::path::Path) -> (Arc<dyn Store>, String) {
    let store: Arc<dyn Store> = store::open(&common::sqlite_url(dir)).await.unwrap();
    let cfgdir = dir.join("cfg");
    std::fs::create_dir_all(&cfgdir).unwrap();
    std::fs::write(cfgdir.join("slipway.toml"), "[project]\nname='x'\n").unwrap();
    let rev = revision::snapshot(&cfgdir, "[project]\nname='x'\n").unwrap();
    store.put_revision(&rev).await.unwrap();
    (store, rev.id)
}

async fn submit(store: &Arc<dyn Store>, rev: &str, key: &str, jobs: Vec<NewJob>) -> i64 {
    store
        .submit(NewDeployment {
            event: NewEvent { key: Some(key.into()), kind: "run".into(), payload: "{}".into() },
            kind: DeploymentKind::Run,
            environment: "default".into(),
            service: None,
            version: None,
            lock_key: format!("default/jobs/{key}"),
            revision: rev.into(),
            jobs,
            hold: None,
            only_after: None,
        })
        .await
        .unwrap()
        .deployment_id
}

/// A job whose daemon (setsid) keeps stdout open: the job ends at once,
/// but the deployment stays `running` until the daemon exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue3_daemon_holding_stdout_does_not_keep_job_running() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rev) = setup(dir.path()).await;
    let id = submit(
        &store,
        &rev,
        "d1",
        vec![NewJob {
            name: "starts-daemon".into(),
            needs: vec![],
            spec: spec(
                vec!["sh", "-c", &format!("setsid sh -c 'echo $$ > {}; exec sleep 40' & sleep 0.5; echo started", dir.path().join("daemon.pid").display())],
                5_000,
            ),
        }],
    )
    .await;
    let mut cfg = SchedulerConfig::new("n1", dir.path().join("work"));
    cfg.poll = Duration::from_millis(100);
    let sched = Scheduler::new(store.clone(), Arc::new(LocalTarget::default()), cfg, EventBus::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sched.run(shutdown.clone()));
    // The daemon goes with the test, whether it passes or not.
    struct KillDaemon(std::path::PathBuf);
    impl Drop for KillDaemon {
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.0).ok().and_then(|p| p.trim().parse().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _daemon = KillDaemon(dir.path().join("daemon.pid"));
    let state = common::eventually(Duration::from_secs(15), "the job to end although its daemon holds the output pipe (timeout 5s)", || async {
        let state = store.deployment(id).await.unwrap().unwrap().state.as_str().to_string();
        if state != "running" && state != "queued" { Ok(state) } else { Err(state) }
    })
    .await;
    shutdown.cancel();
    let _ = task.await;
    assert_eq!(state, "succeeded");
}

/// Counts how many runs overlap.
struct Counting {
    now: AtomicUsize,
    max: AtomicUsize,
}

#[async_trait]
impl Target for Counting {
    async fn run(&self, _r: JobRequest, _o: OutputSink, _c: CancellationToken) -> RunResult {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        // A run that lasts, so that runs could overlap (scenario).
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        RunResult { outcome: Outcome::Succeeded, exit_code: Some(0), reason: None, parts: Vec::new() }
    }
}

/// Many short fan-outs at parallelism 4: the loop must never count slots
/// before the job tasks it just spawned are registered. Run on several
/// runtime shapes, since the race depends on task placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue3_parallelism_is_never_exceeded_4_workers() {
    parallelism_body().await
}

async fn parallelism_body() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rev) = setup(dir.path()).await;
    let mut ids = vec![];
    for d in 0..40 {
        let mut jobs = vec![NewJob { name: "root".into(), needs: vec![], spec: spec(vec!["true"], 5_000) }];
        for c in 0..6 {
            jobs.push(NewJob { name: format!("child{c}"), needs: vec![0], spec: spec(vec!["true"], 5_000) });
        }
        ids.push(submit(&store, &rev, &format!("p{d}"), jobs).await);
    }
    let target = Arc::new(Counting { now: AtomicUsize::new(0), max: AtomicUsize::new(0) });
    let mut cfg = SchedulerConfig::new("n1", dir.path().join("work"));
    cfg.parallelism = 4;
    cfg.poll = Duration::from_secs(30);
    let sched = Scheduler::new(store.clone(), target.clone(), cfg, EventBus::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sched.run(shutdown.clone()));
    common::eventually(Duration::from_secs(60), "every deployment to end", || async {
        let mut running = Vec::new();
        for id in &ids {
            if !store.deployment(*id).await.unwrap().unwrap().state.is_terminal() {
                running.push(*id);
            }
        }
        if running.is_empty() { Ok(()) } else { Err(format!("still running: {running:?}")) }
    })
    .await;
    shutdown.cancel();
    let _ = task.await;
    for id in &ids {
        assert_eq!(store.deployment(*id).await.unwrap().unwrap().state.as_str(), "succeeded");
    }
    let max = target.max.load(Ordering::SeqCst);
    assert!(max <= 4, "parallelism 4, but {max} jobs ran at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn issue3_parallelism_is_never_exceeded_1_worker() {
    parallelism_body().await
}
#[tokio::test(flavor = "current_thread")]
async fn issue3_parallelism_is_never_exceeded_current_thread() {
    parallelism_body().await
}

// A stored job spec this binary cannot read (an older Slipway's `pull`
// took a string) fails that job, saying why; the other job runs: one bad
// row must not stop the node's claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue5_an_unreadable_stored_spec_fails_its_job_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rev) = setup(dir.path()).await;
    let bad = submit(&store, &rev, "old", vec![NewJob { name: "web.fetch".into(), needs: vec![], spec: spec(vec!["true"], 5_000) }]).await;
    let good = submit(&store, &rev, "new", vec![NewJob { name: "fine".into(), needs: vec![], spec: spec(vec!["true"], 5_000) }]).await;
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&common::sqlite_url(dir.path())).await.unwrap();
        let old = r#"{"command":{"pull":"registry.example.org/web"},"timeout_ms":1000,"kill_grace_ms":1000,"retry_attempts":1,"retry_any":false,"retry_exit_codes":[],"retry_backoff_ms":1000,"retry_max_backoff_ms":1000,"idempotent":true,"env":{}}"#;
        sqlx::query("UPDATE jobs SET spec = ? WHERE deployment_id = ?").bind(old).bind(bad).execute(&mut conn).await.unwrap();
    }
    let mut cfg = SchedulerConfig::new("n1", dir.path().join("work"));
    cfg.poll = Duration::from_millis(100);
    let sched = Scheduler::new(store.clone(), Arc::new(LocalTarget::default()), cfg, EventBus::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sched.run(shutdown.clone()));
    let done = |s: &str| s != "running" && s != "queued";
    let (b, g) = common::eventually(Duration::from_secs(15), "both deployments to end", || async {
        let b = store.deployment(bad).await.unwrap().unwrap().state.as_str().to_string();
        let g = store.deployment(good).await.unwrap().unwrap().state.as_str().to_string();
        if done(&b) && done(&g) { Ok((b, g)) } else { Err(format!("{b}, {g}")) }
    })
    .await;
    shutdown.cancel();
    let _ = task.await;
    assert_eq!((b.as_str(), g.as_str()), ("failed", "succeeded"));
    let reason = store.deployment(bad).await.unwrap().unwrap().reason.unwrap_or_default();
    assert!(reason.contains("cannot read the job's stored spec"), "{reason}");
}
