//! The `Store` contract, one suite for every backend: each test runs its
//! case against every store `common::stores` opens (SQLite always,
//! PostgreSQL when `SLIPWAY_TEST_POSTGRES` is set), each fresh, and labels
//! every assertion with the backend's name.
//!
//! Run against both:
//! `SLIPWAY_TEST_POSTGRES=postgres://… SLIPWAY_REQUIRE_POSTGRES=1 cargo test --test store`

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway::config::Command;
use slipway::config::revision::Revision;
use slipway::store::{
    ClaimedJob, Counts, DeploymentKind, DeploymentRow, DeploymentState, FinishEffect, FinishedAttempt, JobRow, JobSpec, JobState, NewDeployment, NewEvent,
    NewJob, NewLogLine, Outcome, PartResult, Store, Submitted, now_ms,
};

// ---------------------------------------------------------------- helpers

const REV: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const LEASE: Duration = Duration::from_secs(60);
const N1: &str = "node-1";
const N2: &str = "node-2";
const N3: &str = "node-3";

type Backend = (&'static str, Arc<dyn Store>);

/// Every backend, fresh, with the revision `REV` stored.
async fn backends(dir: &tempfile::TempDir) -> Vec<Backend> {
    let stores = common::stores(dir.path()).await;
    for (name, store) in &stores {
        assert_eq!(store.backend(), *name, "common::stores labels its stores by backend");
        store.put_revision(&revision()).await.unwrap_or_else(|e| panic!("[{name}] put_revision: {e}"));
    }
    stores
}

/// Every backend, fresh, each with its URL for a connection from outside
/// the store, and that URL again in the third place on PostgreSQL only.
async fn backends_with_urls(dir: &tempfile::TempDir) -> Vec<(Backend, String, Option<String>)> {
    let sqlite = common::sqlite_url(dir.path());
    let mut cases = vec![(("sqlite", slipway::store::open(&sqlite).await.expect("open sqlite store")), sqlite, None)];
    if let Some(url) = common::postgres_url().await {
        cases.push((("postgres", slipway::store::open(&url).await.expect("open postgres store")), url.clone(), Some(url)));
    }
    for ((name, store), _, _) in &cases {
        store.put_revision(&revision()).await.unwrap_or_else(|e| panic!("[{name}] put_revision: {e}"));
    }
    cases
}

/// On PostgreSQL (`url`), a transaction outside the store holding the
/// deployment's row, so that the store's next batch of finishes waits on
/// it and the finishes sent meanwhile queue up for the batch after it.
async fn hold_deployment_row(url: Option<&str>, dep: i64) -> Option<sqlx::AnyConnection> {
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(url?).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut admin).await.expect("begin");
    sqlx::query("SELECT id FROM deployments WHERE id = $1 FOR UPDATE").bind(dep).fetch_all(&mut admin).await.expect("hold the deployment's row");
    Some(admin)
}

/// Let `hold_deployment_row`'s row go, after `wait` for the queue to fill.
async fn release_deployment_row(held: Option<sqlx::AnyConnection>, wait: Duration) {
    if let Some(mut admin) = held {
        tokio::time::sleep(wait).await;
        sqlx::query("COMMIT").execute(&mut admin).await.expect("let the row go");
    }
}

fn revision() -> Revision {
    Revision { id: REV.to_string(), config_text: "[project]\nname = \"t\"\n".to_string(), archive: vec![] }
}

/// A spec with non-default values everywhere, so a lossy round trip shows.
fn spec() -> JobSpec {
    JobSpec {
        command: Command::Argv(vec!["./deploy.sh".into(), "{version}".into()]),
        timeout_ms: 90_000,
        kill_grace_ms: 2_500,
        retry_attempts: 3,
        retry_any: false,
        retry_exit_codes: vec![75, 111],
        retry_backoff_ms: 1_000,
        retry_max_backoff_ms: 30_000,
        idempotent: true,
        env: BTreeMap::from([("REGION".to_string(), "eu-west-1".to_string())]),
        artifact: Some(slipway::store::ArtifactRef {
            url: "https://example.org/web-1.tar.gz".into(),
            sha256: "ab".repeat(32),
            kind: slipway::store::ArtifactKind::Image,
        }),
        secrets: BTreeMap::from([(
            "DB_PASSWORD".to_string(),
            slipway::config::secret::SecretRef { name: "db".into(), source: slipway::config::secret::SecretSource::Env("DB_PW".into()) },
        )]),
        secret_files: BTreeMap::from([(
            "/run/secrets/db".to_string(),
            slipway::config::secret::SecretRef { name: "db".into(), source: slipway::config::secret::SecretSource::File("/etc/slipway/db".into()) },
        )]),
        // A non-default target: the round trip keeps it.
        target: Some("docker".into()),
        // And the target's own settings of the job.
        settings: slipway::targets::Settings::of(&serde_json::json!({ "hosts": ["10.0.0.11:22"], "batch": 2 })),
        once_per_environment: false,
    }
}

/// Jobs from (name, indexes of the jobs it needs).
fn jobs(list: &[(&str, &[usize])]) -> Vec<NewJob> {
    list.iter().map(|(name, needs)| NewJob { name: name.to_string(), needs: needs.to_vec(), spec: spec() }).collect()
}

/// `n` jobs `j000`… with no needs.
fn independent(n: usize) -> Vec<NewJob> {
    (0..n).map(|i| NewJob { name: format!("j{i:03}"), needs: vec![], spec: spec() }).collect()
}

/// `layers` layers of `width` jobs, each needing every job of the layer before.
fn layered(layers: usize, width: usize) -> Vec<NewJob> {
    let mut out = Vec::new();
    for l in 0..layers {
        for w in 0..width {
            let needs = if l == 0 { vec![] } else { ((l - 1) * width..l * width).collect() };
            out.push(NewJob { name: format!("l{l:02}w{w}"), needs, spec: spec() });
        }
    }
    out
}

/// a -> b, a -> c, (b, c) -> d.
fn diamond() -> Vec<NewJob> {
    jobs(&[("a", &[]), ("b", &[0]), ("c", &[0]), ("d", &[1, 2])])
}

/// A `deploy` deployment to `staging` on `lock_key`, no event key.
fn new_deployment(lock_key: &str, jobs: Vec<NewJob>) -> NewDeployment {
    NewDeployment {
        event: NewEvent { key: None, kind: "push".into(), payload: r#"{"ref":"main"}"#.into() },
        kind: DeploymentKind::Deploy,
        environment: "staging".into(),
        service: Some("api".into()),
        version: Some("1.2.3".into()),
        lock_key: lock_key.into(),
        revision: REV.into(),
        jobs,
        hold: None,
        only_after: None,
    }
}

fn run_deployment(lock_key: &str, jobs: Vec<NewJob>) -> NewDeployment {
    NewDeployment { kind: DeploymentKind::Run, ..new_deployment(lock_key, jobs) }
}

async fn submit(b: &Backend, new: NewDeployment) -> Submitted {
    b.1.submit(new).await.unwrap_or_else(|e| panic!("[{}] submit: {e}", b.0))
}

async fn deployment(b: &Backend, id: i64) -> DeploymentRow {
    b.1.deployment(id).await.unwrap_or_else(|e| panic!("[{}] deployment: {e}", b.0)).unwrap_or_else(|| panic!("[{}] no deployment {id}", b.0))
}

async fn dep_state(b: &Backend, id: i64) -> DeploymentState {
    deployment(b, id).await.state
}

async fn job_rows(b: &Backend, dep: i64) -> Vec<JobRow> {
    b.1.jobs(dep).await.unwrap_or_else(|e| panic!("[{}] jobs: {e}", b.0))
}

async fn job_row(b: &Backend, dep: i64, name: &str) -> JobRow {
    job_rows(b, dep).await.into_iter().find(|j| j.name == name).unwrap_or_else(|| panic!("[{}] no job {name} in {dep}", b.0))
}

async fn job_states(b: &Backend, dep: i64) -> BTreeMap<String, JobState> {
    job_rows(b, dep).await.into_iter().map(|j| (j.name, j.state)).collect()
}

fn states(list: &[(&str, JobState)]) -> BTreeMap<String, JobState> {
    list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

async fn deployment_count(b: &Backend) -> usize {
    b.1.deployments(1000, None).await.unwrap_or_else(|e| panic!("[{}] deployments: {e}", b.0)).len()
}

async fn activate(b: &Backend, node: &str) -> Vec<i64> {
    let mut ids = b.1.activate(node, LEASE).await.unwrap_or_else(|e| panic!("[{}] activate: {e}", b.0));
    ids.sort_unstable();
    ids
}

async fn claim_with(b: &Backend, node: &str, lease: Duration, limit: i64) -> Vec<ClaimedJob> {
    b.1.claim(node, lease, limit).await.unwrap_or_else(|e| panic!("[{}] claim: {e}", b.0))
}

async fn claim(b: &Backend, node: &str, limit: i64) -> Vec<ClaimedJob> {
    claim_with(b, node, LEASE, limit).await
}

fn names(claimed: &[ClaimedJob]) -> Vec<&str> {
    let mut v: Vec<&str> = claimed.iter().map(|j| j.name.as_str()).collect();
    v.sort_unstable();
    v
}

fn by_name<'a>(claimed: &'a [ClaimedJob], name: &str) -> &'a ClaimedJob {
    claimed.iter().find(|j| j.name == name).unwrap_or_else(|| panic!("{name} was not claimed"))
}

/// The report of `node` for `job`, with the fence it was claimed with.
fn done(job: &ClaimedJob, node: &str, outcome: Outcome) -> FinishedAttempt {
    let ok = outcome == Outcome::Succeeded;
    FinishedAttempt {
        job_id: job.job_id,
        fence: job.fence,
        node: node.to_string(),
        started_at: now_ms(),
        outcome,
        exit_code: Some(if ok { 0 } else { 1 }),
        reason: if ok { None } else { Some(format!("{} exited with 1", job.name)) },
        retry_at: None,
        takeover: false,
        parts: Vec::new(),
    }
}

async fn finish(b: &Backend, attempt: FinishedAttempt) -> FinishEffect {
    b.1.finish(attempt).await.unwrap_or_else(|e| panic!("[{}] finish: {e}", b.0))
}

/// Finish `job` as claimed, and check the fence was current.
async fn finish_ok(b: &Backend, job: &ClaimedJob, node: &str, outcome: Outcome) -> FinishEffect {
    let effect = finish(b, done(job, node, outcome)).await;
    assert!(!effect.stale, "[{}] finishing {} with its current fence must not be stale", b.0, job.name);
    effect
}

/// Claim every ready job and finish it Succeeded, until the deployment ends.
async fn run_to_end(b: &Backend, dep: i64) -> DeploymentState {
    for _ in 0..1000 {
        let claimed = claim(b, N1, 100).await;
        if claimed.is_empty() {
            break;
        }
        for j in &claimed {
            finish_ok(b, j, N1, Outcome::Succeeded).await;
        }
    }
    dep_state(b, dep).await
}

async fn counts(b: &Backend) -> Counts {
    b.1.counts().await.unwrap_or_else(|e| panic!("[{}] counts: {e}", b.0))
}

fn nonzero<K: Copy + Eq + std::hash::Hash>(v: &[(K, i64)]) -> HashMap<K, i64> {
    v.iter().filter(|(_, n)| *n != 0).map(|(k, n)| (*k, *n)).collect()
}

/// How a node of the concurrency tests works: how many jobs it claims at a
/// time, and how long it holds them before finishing (its "work").
#[derive(Clone, Copy)]
struct Slots {
    claim: i64,
    work: Duration,
}

/// Four at a time, finished at once: a node with parallel slots.
const FOUR_AT_ONCE: Slots = Slots { claim: 4, work: Duration::ZERO };

/// For a graph whose layers are four wide and each need the whole layer
/// before: a node taking all four and finishing them at once would release
/// the next layer and claim it again before any other node's poll could land
/// (a CI run of 6a20ce1 saw one node run all 200). Two at a time, held a
/// moment, leaves the other half of each layer to the other nodes.
const TWO_HELD: Slots = Slots { claim: 2, work: Duration::from_millis(3) };

/// One node of the concurrency tests: claim and finish until the
/// deployment is over or stuck; returns the job ids this node ran.
async fn drain(store: Arc<dyn Store>, label: &'static str, node: String, dep: i64, slots: Slots) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut mine = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "[{label}] {node}: no end after 60s");
        let claimed = store.claim(&node, LEASE, slots.claim).await.unwrap_or_else(|e| panic!("[{label}] {node} claim: {e}"));
        if claimed.is_empty() {
            let d = store.deployment(dep).await.unwrap().unwrap();
            if d.state.is_terminal() {
                break;
            }
            // Nothing ready or running: the deployment must be over. A job's
            // end, its dependants' release and the deployment's end are one
            // transaction, so a second look that still sees it open means
            // it is stuck (the caller's assertions say how).
            let rows = store.jobs(dep).await.unwrap();
            if !rows.iter().any(|j| matches!(j.state, JobState::Ready | JobState::Running)) {
                let d = store.deployment(dep).await.unwrap().unwrap();
                if !d.state.is_terminal() {
                    eprintln!("[{label}] {node}: deployment {dep} is stuck {}: nothing ready or running", d.state);
                }
                break;
            }
            // A node's poll interval, as a real node would wait (scenario).
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        tokio::time::sleep(slots.work).await;
        // Finish them all at once, as a node with parallel slots would.
        let results = futures_util::future::join_all(claimed.iter().map(|j| {
            store.finish(FinishedAttempt {
                job_id: j.job_id,
                fence: j.fence,
                node: node.clone(),
                started_at: now_ms(),
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                reason: None,
                retry_at: None,
                takeover: false,
                parts: Vec::new(),
            })
        }))
        .await;
        for (j, r) in claimed.iter().zip(results) {
            let eff = r.unwrap_or_else(|e| panic!("[{label}] {node} finish {}: {e}", j.name));
            assert!(!eff.stale, "[{label}] {node}: finishing {} (fence {}) was stale", j.name, j.fence);
        }
        mine.extend(claimed.iter().map(|j| j.job_id));
    }
    mine
}

/// Three nodes drain `dep` concurrently; returns every node's job ids.
async fn drain_with_three_nodes(b: &Backend, dep: i64, slots: Slots) -> Vec<Vec<i64>> {
    let tasks: Vec<_> = [N1, N2, N3].iter().map(|n| tokio::spawn(drain(b.1.clone(), b.0, n.to_string(), dep, slots))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| panic!("[{}] node task: {e}", b.0)));
    }
    out
}

/// Every job claimed once, the deployment succeeded, nothing left open.
async fn assert_ran_exactly_once(b: &Backend, dep: i64, per_node: &[Vec<i64>], total: usize) {
    let name = b.0;
    let all: Vec<i64> = per_node.iter().flatten().copied().collect();
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "[{name}] some job was claimed twice ({} claims, {} jobs)", all.len(), unique.len());
    let rows = job_rows(b, dep).await;
    let open: Vec<(&str, JobState)> = rows.iter().filter(|j| j.state != JobState::Succeeded).map(|j| (j.name.as_str(), j.state)).collect();
    assert!(open.is_empty(), "[{name}] {} jobs not succeeded (lost dependants?), first ones: {:?}", open.len(), &open[..open.len().min(8)]);
    assert_eq!(rows.len(), total, "[{name}]");
    assert_eq!(unique, rows.iter().map(|j| j.id).collect::<HashSet<_>>(), "[{name}] every job claimed");
    assert!(rows.iter().all(|j| j.attempt == 1), "[{name}] one attempt each");
    assert_eq!(b.1.attempts(dep).await.unwrap().len(), total, "[{name}] one attempt row each");
    assert_eq!(dep_state(b, dep).await, DeploymentState::Succeeded, "[{name}] every job succeeded, so the deployment must have (lost completion?)");
    assert!(per_node.iter().filter(|v| !v.is_empty()).count() >= 2, "[{name}] work was shared: {:?}", per_node.iter().map(Vec::len).collect::<Vec<_>>());
}

// ------------------------------------------------------------------ cases

/// 1. submit stores the event, the deployment and its jobs; a second
/// delivery of the same event key creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_stores_everything_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        // Revisions round-trip, and storing one twice is harmless.
        b.1.put_revision(&revision()).await.unwrap_or_else(|e| panic!("[{name}] put_revision again: {e}"));
        let rev = b.1.revision(REV).await.unwrap().unwrap_or_else(|| panic!("[{name}] revision lost"));
        assert_eq!((rev.id.as_str(), rev.config_text.as_str(), rev.archive.len()), (REV, revision().config_text.as_str(), 0), "[{name}] revision");
        assert!(b.1.revision("nope").await.unwrap().is_none(), "[{name}] unknown revision");

        let before = now_ms();
        let mut new = new_deployment("staging/api", jobs(&[("build", &[]), ("migrate", &[0]), ("deploy", &[0, 1])]));
        new.event.key = Some("delivery-1".into());
        let s = submit(&b, new.clone()).await;
        assert!(!s.duplicate, "[{name}] first delivery is not a duplicate");
        assert!(s.superseded.is_empty(), "[{name}] nothing to supersede");
        assert!(s.event_id > 0 && s.deployment_id > 0, "[{name}] ids: {s:?}");

        let d = deployment(&b, s.deployment_id).await;
        assert_eq!(d.id, s.deployment_id, "[{name}]");
        assert_eq!(d.event_id, s.event_id, "[{name}] deployment's event");
        assert_eq!(d.state, DeploymentState::Queued, "[{name}] a new deployment is queued");
        assert_eq!(d.kind, DeploymentKind::Deploy, "[{name}]");
        assert_eq!(d.environment, "staging", "[{name}]");
        assert_eq!(d.service.as_deref(), Some("api"), "[{name}]");
        assert_eq!(d.version.as_deref(), Some("1.2.3"), "[{name}]");
        assert_eq!(d.revision, REV, "[{name}]");
        assert_eq!((d.reason.as_deref(), d.superseded_by, d.cancel_requested), (None, None, false), "[{name}]");
        assert!(d.created_at >= before && d.created_at <= now_ms(), "[{name}] created_at {} not in [{before}, now]", d.created_at);
        assert_eq!((d.started_at, d.finished_at), (None, None), "[{name}] not started");

        let rows = job_rows(&b, s.deployment_id).await;
        let got: Vec<_> =
            rows.iter().map(|j| (j.name.as_str(), j.state, j.attempt, j.node.as_deref(), j.needs.iter().map(String::as_str).collect::<Vec<_>>())).collect();
        assert_eq!(
            got,
            vec![
                ("build", JobState::Pending, 0, None, vec![]),
                ("migrate", JobState::Pending, 0, None, vec!["build"]),
                ("deploy", JobState::Pending, 0, None, vec!["build", "migrate"]),
            ],
            "[{name}] jobs as submitted"
        );
        assert!(rows.iter().all(|j| j.deployment_id == s.deployment_id && j.started_at.is_none() && j.finished_at.is_none()), "[{name}] {rows:?}");
        assert_eq!(deployment_count(&b).await, 1, "[{name}]");

        // The same key again, even with another body: the first answer, nothing new.
        let mut again = new_deployment("other/lock", jobs(&[("x", &[])]));
        again.event.key = Some("delivery-1".into());
        again.event.payload = "{}".into();
        let dup = submit(&b, again).await;
        assert!(dup.duplicate, "[{name}] same key is a duplicate");
        assert_eq!((dup.event_id, dup.deployment_id), (s.event_id, s.deployment_id), "[{name}] duplicate answers with the first ids");
        assert!(dup.superseded.is_empty(), "[{name}]");
        assert_eq!(deployment_count(&b).await, 1, "[{name}] a duplicate creates no deployment");
        assert_eq!(job_rows(&b, s.deployment_id).await.len(), 3, "[{name}] a duplicate adds no jobs");
        assert_eq!(dep_state(&b, s.deployment_id).await, DeploymentState::Queued, "[{name}] a duplicate supersedes nothing");

        // A need that points nowhere is refused, and leaves nothing behind.
        let mut bad = new_deployment("staging/bad", jobs(&[("x", &[]), ("y", &[7])]));
        bad.event.key = Some("delivery-bad".into());
        assert!(b.1.submit(bad.clone()).await.is_err(), "[{name}] needs index out of range must be an error");
        assert_eq!(deployment_count(&b).await, 1, "[{name}] a refused submit creates nothing");
        bad.jobs = jobs(&[("x", &[])]);
        let retried = submit(&b, bad).await;
        assert!(!retried.duplicate, "[{name}] the refused submit did not keep its event key");
        assert_eq!(deployment_count(&b).await, 2, "[{name}]");

        // Events without a key are never duplicates of each other.
        let k1 = submit(&b, run_deployment("r1", jobs(&[("x", &[])]))).await;
        let k2 = submit(&b, run_deployment("r2", jobs(&[("x", &[])]))).await;
        assert!(!k1.duplicate && !k2.duplicate, "[{name}] keyless events");
        assert_ne!(k1.deployment_id, k2.deployment_id, "[{name}]");
        assert_ne!(k1.event_id, k2.event_id, "[{name}]");
        assert_eq!(deployment_count(&b).await, 4, "[{name}]");
        let queued = b.1.deployments(10, Some(DeploymentState::Queued)).await.unwrap();
        assert_eq!(
            queued.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![k2.deployment_id, k1.deployment_id, retried.deployment_id, s.deployment_id],
            "[{name}] newest first"
        );
        assert_eq!(b.1.deployments(2, None).await.unwrap().len(), 2, "[{name}] limit");
        assert!(b.1.deployments(10, Some(DeploymentState::Running)).await.unwrap().is_empty(), "[{name}] state filter");
    }
}

/// 2. A queued deploy is superseded by a newer deploy on its lock key; runs
/// never supersede, other keys never interfere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_deploy_supersedes_queued_one_on_same_lock() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let first = submit(&b, new_deployment("prod/api", diamond())).await;
        let other_key = submit(&b, new_deployment("prod/web", diamond())).await;
        let second = submit(&b, new_deployment("prod/api", diamond())).await;
        assert_eq!(second.superseded, vec![first.deployment_id], "[{name}] second supersedes first only");
        assert!(other_key.superseded.is_empty(), "[{name}]");

        let d1 = deployment(&b, first.deployment_id).await;
        assert_eq!(d1.state, DeploymentState::Superseded, "[{name}]");
        assert_eq!(d1.superseded_by, Some(second.deployment_id), "[{name}] superseded_by");
        assert!(d1.finished_at.is_some(), "[{name}] superseded is terminal: finished_at set");
        assert!(d1.reason.as_deref().unwrap_or("").contains(&second.deployment_id.to_string()), "[{name}] reason names the successor: {:?}", d1.reason);
        let rows = job_rows(&b, first.deployment_id).await;
        assert!(rows.iter().all(|j| j.state == JobState::Cancelled && j.finished_at.is_some()), "[{name}] superseded jobs cancelled: {rows:?}");
        assert_eq!(dep_state(&b, second.deployment_id).await, DeploymentState::Queued, "[{name}]");
        assert_eq!(dep_state(&b, other_key.deployment_id).await, DeploymentState::Queued, "[{name}] other lock key untouched");
        assert!(job_rows(&b, second.deployment_id).await.iter().all(|j| j.state == JobState::Pending), "[{name}]");

        // A run neither supersedes nor is superseded.
        let run = submit(&b, run_deployment("prod/api", diamond())).await;
        assert!(run.superseded.is_empty(), "[{name}] a run supersedes nothing");
        assert_eq!(dep_state(&b, second.deployment_id).await, DeploymentState::Queued, "[{name}] deploy still queued after a run");
        let run2 = submit(&b, run_deployment("prod/api", diamond())).await;
        assert!(run2.superseded.is_empty(), "[{name}] a run does not supersede a run");
        assert_eq!(dep_state(&b, run.deployment_id).await, DeploymentState::Queued, "[{name}]");
        let third = submit(&b, new_deployment("prod/api", diamond())).await;
        assert_eq!(third.superseded, vec![second.deployment_id], "[{name}] a deploy supersedes only queued deploys");
        assert_eq!(dep_state(&b, run.deployment_id).await, DeploymentState::Queued, "[{name}] queued run survives a deploy");
        assert_eq!(dep_state(&b, run2.deployment_id).await, DeploymentState::Queued, "[{name}]");
        assert_eq!(dep_state(&b, other_key.deployment_id).await, DeploymentState::Queued, "[{name}]");

        // A running deploy is not superseded.
        assert_eq!(activate(&b, N1).await, vec![other_key.deployment_id, run.deployment_id], "[{name}] oldest per key starts");
        let web2 = submit(&b, new_deployment("prod/web", diamond())).await;
        assert!(web2.superseded.is_empty(), "[{name}] a running deploy is never superseded");
        assert_eq!(dep_state(&b, other_key.deployment_id).await, DeploymentState::Running, "[{name}]");
        let d = deployment(&b, other_key.deployment_id).await;
        assert_eq!((d.superseded_by, d.reason), (None, None), "[{name}]");
    }
}

/// 2b. Submits racing on one lock key (a burst of webhooks): afterwards
/// one deploy is queued, the newest, and every other one was superseded by
/// a newer one. One event key delivered several times at once makes one
/// deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_supersede_consistently() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let mut problems = Vec::new();
        for round in 0..10 {
            let key = format!("prod/race{round}");
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let store = b.1.clone();
                    let key = key.clone();
                    tokio::spawn(async move { store.submit(new_deployment(&key, diamond())).await })
                })
                .collect();
            let mut ids = Vec::new();
            for t in tasks {
                ids.push(t.await.unwrap().unwrap_or_else(|e| panic!("[{name}] submit: {e}")).deployment_id);
            }
            ids.sort_unstable();
            let newest = *ids.last().unwrap();
            let mut table = Vec::new();
            for &id in &ids {
                let d = deployment(&b, id).await;
                let ok = if id == newest {
                    d.state == DeploymentState::Queued
                } else {
                    d.state == DeploymentState::Superseded && d.superseded_by.is_some_and(|by| by > id)
                };
                table.push(format!("{id}:{}{}{}", d.state, d.superseded_by.map(|s| format!("->{s}")).unwrap_or_default(), if ok { "" } else { "(!)" }));
            }
            if table.iter().any(|t| t.ends_with("(!)")) {
                problems.push(format!("round {round}: {}", table.join(" ")));
            }
        }
        assert!(
            problems.is_empty(),
            "[{name}] 8 concurrent deploys on one lock key must leave exactly the newest queued, each other superseded by a newer one \
             (id:state->superseded_by, (!) marks a violation):\n{}",
            problems.join("\n")
        );

        // The same event key, eight deliveries at once.
        let before = deployment_count(&b).await;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = b.1.clone();
                tokio::spawn(async move {
                    let mut new = new_deployment("prod/dup", diamond());
                    new.event.key = Some("burst-1".into());
                    store.submit(new).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap().unwrap_or_else(|e| panic!("[{name}] submit: {e}")));
        }
        assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1, "[{name}] exactly one delivery is new: {answers:?}");
        assert_eq!(answers.iter().map(|a| a.deployment_id).collect::<HashSet<_>>().len(), 1, "[{name}] all answer the same deployment: {answers:?}");
        assert_eq!(deployment_count(&b).await, before + 1, "[{name}] one deployment for one event key");
    }
}

/// 3. One running deployment per lock key, oldest first; roots start ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_starts_oldest_per_lock_and_waits_for_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let d1 = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0]), ("c", &[])]))).await.deployment_id;
        let r1 = submit(&b, run_deployment("prod/ops", jobs(&[("x", &[])]))).await.deployment_id;
        let r2 = submit(&b, run_deployment("prod/ops", jobs(&[("y", &[])]))).await.deployment_id;
        let before = now_ms();
        assert_eq!(activate(&b, N1).await, vec![d1, r1], "[{name}] one per lock key, the oldest");
        let d = deployment(&b, d1).await;
        assert_eq!(d.state, DeploymentState::Running, "[{name}]");
        assert!(d.started_at.is_some_and(|t| t >= before), "[{name}] started_at: {:?}", d.started_at);
        assert_eq!(dep_state(&b, r2).await, DeploymentState::Queued, "[{name}] younger on the same key waits");
        assert_eq!(job_states(&b, d1).await, states(&[("a", JobState::Ready), ("b", JobState::Pending), ("c", JobState::Ready)]), "[{name}] roots ready");
        assert_eq!(job_states(&b, r2).await, states(&[("y", JobState::Pending)]), "[{name}] queued jobs stay pending");

        // A deploy on a busy key waits, and a second activation changes nothing.
        let d2 = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0])]))).await;
        assert!(d2.superseded.is_empty(), "[{name}]");
        let d2 = d2.deployment_id;
        assert!(activate(&b, N2).await.is_empty(), "[{name}] locks are held");
        assert_eq!(dep_state(&b, d2).await, DeploymentState::Queued, "[{name}]");
        assert_eq!(job_states(&b, d2).await, states(&[("a", JobState::Pending), ("b", JobState::Pending)]), "[{name}]");

        // Finish d1 job by job: d2 starts only after the last one.
        let first = claim(&b, N1, 10).await;
        assert_eq!(names(&first), vec!["a", "c", "x"], "[{name}] only ready jobs are claimed");
        for j in &first {
            if j.deployment_id == d1 {
                finish_ok(&b, j, N1, Outcome::Succeeded).await;
            }
        }
        assert!(activate(&b, N1).await.is_empty(), "[{name}] d1 still runs b");
        assert_eq!(dep_state(&b, d2).await, DeploymentState::Queued, "[{name}]");
        let bj = claim(&b, N1, 10).await;
        assert_eq!(names(&bj), vec!["b"], "[{name}]");
        let eff = finish_ok(&b, &bj[0], N1, Outcome::Succeeded).await;
        assert_eq!(eff.deployment_finished, Some((d1, DeploymentState::Succeeded)), "[{name}] last job finishes the deployment");
        let d = deployment(&b, d1).await;
        assert_eq!((d.state, d.reason.clone()), (DeploymentState::Succeeded, None), "[{name}]");
        assert!(d.finished_at.is_some(), "[{name}] finished_at");

        assert_eq!(activate(&b, N2).await, vec![d2], "[{name}] the lock is free now");
        assert_eq!(job_states(&b, d2).await, states(&[("a", JobState::Ready), ("b", JobState::Pending)]), "[{name}]");
        assert_eq!(dep_state(&b, r2).await, DeploymentState::Queued, "[{name}] r1 still holds prod/ops");
        let x = by_name(&first, "x");
        finish_ok(&b, x, N1, Outcome::Succeeded).await;
        assert_eq!(activate(&b, N2).await, vec![r2], "[{name}]");
    }
}

/// 4. claim leases ready jobs with a new fence; stale reports change nothing;
/// lapsed leases are found; a reaped job with `retry_at` is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_fences_and_expired_leases() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let mut new = new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[]), ("c", &[0])]));
        new.environment = "prod".into();
        let dep = submit(&b, new).await;
        activate(&b, N1).await;
        let event_at = deployment(&b, dep.deployment_id).await.created_at;

        let short = claim_with(&b, N1, Duration::from_millis(1), 1).await;
        assert_eq!(names(&short), vec!["a"], "[{name}] limit 1, lowest id first");
        let a = &short[0];
        assert_eq!((a.fence, a.attempt), (1, 1), "[{name}] first claim: fence and attempt 1");
        assert_eq!(a.deployment_id, dep.deployment_id, "[{name}]");
        assert_eq!((a.revision.as_str(), a.environment.as_str()), (REV, "prod"), "[{name}]");
        assert_eq!((a.service.as_deref(), a.version.as_deref()), (Some("api"), Some("1.2.3")), "[{name}]");
        assert_eq!(a.spec, spec(), "[{name}] spec round-trips");
        assert_eq!(a.event_at, event_at, "[{name}] event_at");
        assert!(a.ready_at >= event_at && a.ready_at <= now_ms(), "[{name}] ready_at {}", a.ready_at);

        let long = claim(&b, N1, 10).await;
        assert_eq!(names(&long), vec!["b"], "[{name}] a claimed job is not claimed again");
        let bj = &long[0];
        assert_eq!((bj.fence, bj.attempt), (1, 1), "[{name}]");
        assert!(claim(&b, N2, 10).await.is_empty(), "[{name}] nothing ready is left (c is pending)");
        let row = job_row(&b, dep.deployment_id, "a").await;
        assert_eq!((row.state, row.attempt, row.node.as_deref()), (JobState::Running, 1, Some(N1)), "[{name}]");
        assert!(row.started_at.is_some(), "[{name}] started_at set by claim");

        // A lease is time: let a's 1 ms one lapse (scenario, not a wait
        // for a condition; what lapsed is the assertion).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let expired = b.1.expired().await.unwrap();
        assert_eq!(expired.iter().map(|e| e.job_id).collect::<Vec<_>>(), vec![a.job_id], "[{name}] only a's lease lapsed");
        let e = &expired[0];
        assert_eq!((e.name.as_str(), e.fence, e.attempt, e.node.as_deref(), e.deployment_id), ("a", 1, 1, Some(N1), dep.deployment_id), "[{name}]");
        assert_eq!(Some(e.started_at), row.started_at, "[{name}] expired started_at");
        assert_eq!(e.spec.command, spec().command, "[{name}]");
        assert!(e.spec.retry_attempts >= spec().retry_attempts, "[{name}]");

        // A report with an old fence is refused and changes nothing.
        let stale = finish(&b, FinishedAttempt { fence: 0, ..done(a, N1, Outcome::Succeeded) }).await;
        assert!(stale.stale, "[{name}] wrong fence is stale");
        assert_eq!((stale.newly_ready, stale.deployment_finished), (0, None), "[{name}]");
        assert_eq!(
            job_states(&b, dep.deployment_id).await,
            states(&[("a", JobState::Running), ("b", JobState::Running), ("c", JobState::Pending)]),
            "[{name}] unchanged"
        );
        assert!(b.1.attempts(dep.deployment_id).await.unwrap().is_empty(), "[{name}] no attempt recorded for a stale report");

        // The reaper finishes it with the current fence and asks for a retry.
        let reaped = finish(
            &b,
            FinishedAttempt {
                fence: e.fence,
                node: N2.into(),
                started_at: e.started_at,
                outcome: Outcome::Interrupted,
                exit_code: None,
                reason: Some("lease of node-1 expired".into()),
                retry_at: Some(now_ms()),
                takeover: false,
                job_id: e.job_id,
                parts: Vec::new(),
            },
        )
        .await;
        assert!(!reaped.stale, "[{name}] current fence is not stale");
        assert_eq!(reaped.deployment_finished, None, "[{name}]");
        let row = job_row(&b, dep.deployment_id, "a").await;
        assert_eq!((row.state, row.node.as_deref()), (JobState::Ready, None), "[{name}] retried job is ready, unowned");
        assert!(b.1.expired().await.unwrap().is_empty(), "[{name}] no longer expired");
        let attempts = b.1.attempts(dep.deployment_id).await.unwrap();
        assert_eq!(attempts.len(), 1, "[{name}]");
        assert_eq!((attempts[0].outcome, attempts[0].attempt, attempts[0].node.as_str()), (Outcome::Interrupted, 1, N2), "[{name}]");

        // The old holder's late report is stale now, even with its own fence.
        let late = finish(&b, done(a, N1, Outcome::Succeeded)).await;
        assert!(late.stale, "[{name}] a report for a job that is no longer running is stale");
        assert_eq!(job_row(&b, dep.deployment_id, "a").await.state, JobState::Ready, "[{name}]");

        let again = claim(&b, N2, 10).await;
        assert_eq!(names(&again), vec!["a"], "[{name}] reaped job claimable again");
        assert_eq!((again[0].fence, again[0].attempt), (2, 2), "[{name}] fence and attempt bumped");
        let old = finish(&b, done(a, N1, Outcome::Succeeded)).await;
        assert!(old.stale, "[{name}] fence 1 is stale once fence 2 is out");
        assert_eq!(job_row(&b, dep.deployment_id, "a").await.node.as_deref(), Some(N2), "[{name}]");
        let eff = finish_ok(&b, &again[0], N2, Outcome::Succeeded).await;
        assert_eq!(eff.newly_ready, 1, "[{name}] c");
    }
}

/// 5. Dependants start when all their needs succeeded; a failure skips what
/// is downstream only; the deployment fails once every job is terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependants_and_failure_propagation() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        use JobState::*;

        // Success: d waits for both b and c.
        let ok = submit(&b, new_deployment("prod/api", diamond())).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![ok], "[{name}]");
        let a = claim(&b, N1, 10).await;
        assert_eq!(names(&a), vec!["a"], "[{name}]");
        let queued = submit(&b, new_deployment("prod/api", diamond())).await.deployment_id;
        let eff = finish_ok(&b, &a[0], N1, Outcome::Succeeded).await;
        assert_eq!((eff.newly_ready, eff.deployment_finished), (2, None), "[{name}] a releases b and c");
        assert_eq!(job_states(&b, ok).await, states(&[("a", Succeeded), ("b", Ready), ("c", Ready), ("d", Pending)]), "[{name}]");
        let bc = claim(&b, N1, 10).await;
        assert_eq!(names(&bc), vec!["b", "c"], "[{name}]");
        let eff = finish_ok(&b, by_name(&bc, "b"), N1, Outcome::Succeeded).await;
        assert_eq!(eff.newly_ready, 0, "[{name}] d still needs c");
        assert_eq!(job_row(&b, ok, "d").await.state, Pending, "[{name}]");
        assert!(claim(&b, N1, 10).await.is_empty(), "[{name}] d not claimable yet");
        let eff = finish_ok(&b, by_name(&bc, "c"), N1, Outcome::Succeeded).await;
        assert_eq!(eff.newly_ready, 1, "[{name}] d ready after b and c");
        assert_eq!(job_row(&b, ok, "d").await.state, Ready, "[{name}]");
        assert!(activate(&b, N1).await.is_empty(), "[{name}] lock still held");
        let d = claim(&b, N1, 10).await;
        assert_eq!(names(&d), vec!["d"], "[{name}]");
        let eff = finish_ok(&b, &d[0], N1, Outcome::Succeeded).await;
        assert_eq!(eff.deployment_finished, Some((ok, DeploymentState::Succeeded)), "[{name}]");
        assert_eq!(activate(&b, N1).await, vec![queued], "[{name}] success releases the lock");
        assert_eq!(run_to_end(&b, queued).await, DeploymentState::Succeeded, "[{name}]");

        // Failure: a -> b, a -> c, (b, c) -> d, d -> e, c -> f.
        let graph = jobs(&[("a", &[]), ("b", &[0]), ("c", &[0]), ("d", &[1, 2]), ("e", &[3]), ("f", &[2])]);
        let bad = submit(&b, new_deployment("prod/api", graph.clone())).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![bad], "[{name}]");
        let next = submit(&b, new_deployment("prod/api", diamond())).await.deployment_id;
        let a = claim(&b, N1, 10).await;
        finish_ok(&b, &a[0], N1, Outcome::Succeeded).await;
        let bj = claim(&b, N1, 1).await;
        assert_eq!(names(&bj), vec!["b"], "[{name}]");
        let eff = finish_ok(&b, &bj[0], N1, Outcome::Failed).await;
        assert_eq!((eff.newly_ready, eff.deployment_finished), (0, None), "[{name}] c and f are still open");
        assert_eq!(
            job_states(&b, bad).await,
            states(&[("a", Succeeded), ("b", Failed), ("c", Ready), ("d", Skipped), ("e", Skipped), ("f", Pending)]),
            "[{name}] everything downstream of b is skipped, nothing else"
        );
        for skipped in ["d", "e"] {
            let row = job_row(&b, bad, skipped).await;
            assert!(row.reason.as_deref().is_some_and(|r| r.contains("\"b\"")), "[{name}] {skipped}'s reason names b: {:?}", row.reason);
            assert!(row.finished_at.is_some(), "[{name}] skipped is terminal");
        }
        let b_row = job_row(&b, bad, "b").await;
        assert_eq!((b_row.exit_code, b_row.reason.as_deref()), (Some(1), Some("b exited with 1")), "[{name}]");
        assert_eq!(dep_state(&b, bad).await, DeploymentState::Running, "[{name}] not failed while c runs");

        let c = claim(&b, N2, 10).await;
        assert_eq!(names(&c), vec!["c"], "[{name}] the independent branch still runs");
        let eff = finish_ok(&b, &c[0], N2, Outcome::Succeeded).await;
        assert_eq!((eff.newly_ready, eff.deployment_finished), (1, None), "[{name}] f ready; d stays skipped");
        assert_eq!(job_row(&b, bad, "d").await.state, Skipped, "[{name}]");
        assert!(activate(&b, N1).await.is_empty(), "[{name}] failing deployment keeps its lock until the end");
        let f = claim(&b, N2, 10).await;
        assert_eq!(names(&f), vec!["f"], "[{name}]");
        let eff = finish_ok(&b, &f[0], N2, Outcome::Succeeded).await;
        assert_eq!(eff.deployment_finished, Some((bad, DeploymentState::Failed)), "[{name}]");
        let d = deployment(&b, bad).await;
        assert_eq!(d.state, DeploymentState::Failed, "[{name}]");
        assert!(d.reason.as_deref().is_some_and(|r| r.contains("\"b\"")), "[{name}] reason names b: {:?}", d.reason);
        assert!(d.finished_at.is_some(), "[{name}]");
        assert_eq!(activate(&b, N1).await, vec![next], "[{name}] failure releases the lock");
    }
}

/// Finishes that arrive together share one transaction, and their plain
/// ones one statement (`finish_many_on`): each still gets its own answer,
/// a stale one changes nothing, a second finish of the same attempt is
/// stale, a retried one is ready again, and successes and failures reach
/// their own dependants only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_finishes_that_share_a_batch_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        use JobState::*;
        // ok -> after_ok, bad -> after_bad; the rest stand alone.
        let graph =
            jobs(&[("ok", &[]), ("bad", &[]), ("stale", &[]), ("twice", &[]), ("retried", &[]), ("cancelled", &[]), ("after_ok", &[0]), ("after_bad", &[1])]);
        let dep = submit(&b, new_deployment("prod/api", graph)).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let claimed = claim(&b, N1, 10).await;
        assert_eq!(claimed.len(), 6, "[{name}] the six jobs without needs");
        let mut stale = done(by_name(&claimed, "stale"), N1, Outcome::Succeeded);
        stale.fence += 1;
        let mut retried = done(by_name(&claimed, "retried"), N1, Outcome::Failed);
        retried.retry_at = Some(now_ms());
        let twice = done(by_name(&claimed, "twice"), N1, Outcome::Succeeded);
        let finishes = vec![
            ("ok", done(by_name(&claimed, "ok"), N1, Outcome::Succeeded)),
            ("bad", done(by_name(&claimed, "bad"), N1, Outcome::Failed)),
            ("stale", stale),
            ("twice", twice.clone()),
            ("twice", twice),
            ("retried", retried),
            ("cancelled", done(by_name(&claimed, "cancelled"), N1, Outcome::Cancelled)),
        ];
        // All at once, so the store's writer finds them queued together.
        let tasks: Vec<_> = finishes
            .into_iter()
            .map(|(job, f)| {
                let store = b.1.clone();
                tokio::spawn(async move { (job, store.finish(f).await) })
            })
            .collect();
        let mut stale_of: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
        for t in tasks {
            let (job, effect) = t.await.unwrap();
            let effect = effect.unwrap_or_else(|e| panic!("[{name}] finish {job}: {e}"));
            stale_of.entry(job).or_default().push(effect.stale);
        }
        stale_of.get_mut("twice").unwrap().sort();
        let want: BTreeMap<&str, Vec<bool>> = [
            ("ok", vec![false]),
            ("bad", vec![false]),
            ("stale", vec![true]),
            ("twice", vec![false, true]),
            ("retried", vec![false]),
            ("cancelled", vec![false]),
        ]
        .into_iter()
        .collect();
        assert_eq!(stale_of, want, "[{name}] which finishes were stale");
        assert_eq!(
            job_states(&b, dep).await,
            states(&[
                ("ok", Succeeded),
                ("bad", Failed),
                ("stale", Running),
                ("twice", Succeeded),
                ("retried", Ready),
                ("cancelled", Cancelled),
                ("after_ok", Ready),
                ("after_bad", Skipped),
            ]),
            "[{name}]"
        );
        let bad = job_row(&b, dep, "bad").await;
        assert_eq!((bad.exit_code, bad.reason.as_deref()), (Some(1), Some("bad exited with 1")), "[{name}] each row got its own values");
        let attempts = b.1.attempts(dep).await.unwrap();
        let mut recorded: Vec<(&str, Outcome)> = attempts.iter().map(|a| (a.job.as_str(), a.outcome)).collect();
        recorded.sort_by_key(|(j, _)| *j);
        assert_eq!(
            recorded,
            vec![
                ("bad", Outcome::Failed),
                ("cancelled", Outcome::Cancelled),
                ("ok", Outcome::Succeeded),
                ("retried", Outcome::Failed),
                ("twice", Outcome::Succeeded)
            ],
            "[{name}] one attempt row per finish that counted, none for the stale ones"
        );
    }
}

/// Issue 19: on PostgreSQL one statement finishes a batch's plain
/// finishes, writes their attempts (the parts' rows after it) and makes
/// their dependants ready, reading the finishing jobs as they were before
/// it. A job whose two needs both succeed in that statement becomes ready
/// once; one with a need that failed in it is skipped, never made ready;
/// an attempt's parts are recorded. On PostgreSQL the three finishes are
/// made to share one batch: a transaction outside the store holds the
/// deployment's row while the writer's batch before them waits on it, so
/// they queue up behind it. (On SQLite they may or may not share one; the
/// outcome is the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_needs_finishing_together_release_a_dependant_once_and_keep_parts() {
    let dir = tempfile::tempdir().unwrap();
    for (b, _, url) in backends_with_urls(&dir).await {
        let name = b.0;
        use JobState::*;
        let graph = jobs(&[("w", &[]), ("x", &[]), ("y", &[]), ("z", &[]), ("both", &[1, 2]), ("half", &[1, 3])]);
        let dep = submit(&b, new_deployment("prod/api", graph)).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let claimed = claim(&b, N1, 10).await;
        assert_eq!(names(&claimed), vec!["w", "x", "y", "z"], "[{name}] the jobs without needs");
        let mut x = done(by_name(&claimed, "x"), N1, Outcome::Succeeded);
        let part = |host: &str, outcome: Outcome, exit_code: i64| PartResult {
            part: host.to_string(),
            started_at: x.started_at,
            finished_at: x.started_at + 7,
            outcome,
            exit_code: Some(exit_code),
            reason: (exit_code != 0).then(|| format!("exit code {exit_code}")),
        };
        x.parts = vec![part("web-1", Outcome::Succeeded, 0), part("web-2", Outcome::Failed, 3)];
        let spawn = |f: FinishedAttempt| {
            let store = b.1.clone();
            tokio::spawn(async move { store.finish(f).await })
        };
        // PostgreSQL: hold the deployment's row, so that w's batch waits.
        let held = hold_deployment_row(url.as_deref(), dep).await;
        let first = spawn(done(by_name(&claimed, "w"), N1, Outcome::Succeeded));
        if held.is_some() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!first.is_finished(), "[{name}] w's batch waits for the held row");
        }
        let x_task = spawn(x);
        let others = [spawn(done(by_name(&claimed, "y"), N1, Outcome::Succeeded)), spawn(done(by_name(&claimed, "z"), N1, Outcome::Failed))];
        release_deployment_row(held, Duration::from_millis(300)).await;
        let x_effect = x_task.await.unwrap().unwrap_or_else(|e| panic!("[{name}] finish x: {e}"));
        assert!(!x_effect.stale, "[{name}] x's finish counted");
        for t in std::iter::once(first).chain(others) {
            let effect = t.await.unwrap().unwrap_or_else(|e| panic!("[{name}] finish: {e}"));
            assert!(!effect.stale, "[{name}] no finish was stale");
        }
        if url.is_some() {
            assert_eq!(x_effect.newly_ready, 1, "[{name}] x, y and z shared a batch, which made one job ready: both");
        }
        assert_eq!(
            job_states(&b, dep).await,
            states(&[("w", Succeeded), ("x", Succeeded), ("y", Succeeded), ("z", Failed), ("both", Ready), ("half", Skipped)]),
            "[{name}]"
        );
        let attempts = b.1.attempts(dep).await.unwrap();
        let x_row = attempts.iter().find(|a| a.job == "x").unwrap_or_else(|| panic!("[{name}] x's attempt is recorded"));
        let got: Vec<(&str, Outcome, Option<i64>, Option<&str>)> =
            x_row.parts.iter().map(|p| (p.part.as_str(), p.outcome, p.exit_code, p.reason.as_deref())).collect();
        assert_eq!(got, vec![("web-1", Outcome::Succeeded, Some(0), None), ("web-2", Outcome::Failed, Some(3), Some("exit code 3"))], "[{name}] x's parts");
        assert_eq!((x_row.attempt, x_row.node.as_str(), x_row.exit_code), (1, N1, Some(0)), "[{name}] x's attempt row");
        let z_row = attempts.iter().find(|a| a.job == "z").unwrap_or_else(|| panic!("[{name}] z's attempt is recorded"));
        assert_eq!((z_row.outcome, z_row.reason.as_deref()), (Outcome::Failed, Some("z exited with 1")), "[{name}] z's attempt row");
        assert_eq!(attempts.len(), 4, "[{name}] one attempt row per finish");
        let next = claim(&b, N1, 10).await;
        assert_eq!(names(&next), vec!["both"], "[{name}] made ready once, and alone");
        let effect = finish_ok(&b, &next[0], N1, Outcome::Succeeded).await;
        assert_eq!(effect.deployment_finished, Some((dep, DeploymentState::Failed)), "[{name}] z failed, so the deployment did");
    }
}

/// Issue 19: finishes that want their slot's next job, sent together
/// with one that wants none, so that the store's writer may take them in
/// one batch (on SQLite one query finishes them, writes their attempts,
/// releases their dependants and claims for them, telling the finishes it
/// made final by a mark on their lease; on PostgreSQL one statement does
/// all but the claim). Whatever the batches, the jobs the finishes released are handed
/// out once each, to finishes that counted and want one; a stale finish
/// gets no job; a job ready before is claimed the same way; every claimed
/// job runs on the claiming node under a lease; and no job is left with
/// the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_finishes_that_want_a_next_job_get_distinct_ones_and_leave_no_mark() {
    let dir = tempfile::tempdir().unwrap();
    for (b, url, _) in backends_with_urls(&dir).await {
        let name = b.0;
        use JobState::*;
        // g is ready from the start but left unclaimed.
        let graph = jobs(&[("a", &[]), ("b", &[]), ("c", &[]), ("d", &[]), ("e", &[0]), ("f", &[1]), ("g", &[])]);
        let dep = submit(&b, new_deployment("prod/api", graph)).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let claimed = claim(&b, N1, 4).await;
        assert_eq!(names(&claimed), vec!["a", "b", "c", "d"], "[{name}] the lowest ids first");
        let mut stale = done(by_name(&claimed, "d"), N1, Outcome::Succeeded);
        stale.fence += 1;
        let finishes = [
            ("a", done(by_name(&claimed, "a"), N1, Outcome::Succeeded)),
            ("b", done(by_name(&claimed, "b"), N1, Outcome::Succeeded)),
            ("c", done(by_name(&claimed, "c"), N1, Outcome::Succeeded)),
            ("d", stale),
        ];
        let tasks: Vec<_> = finishes
            .into_iter()
            .map(|(job, f)| {
                let store = b.1.clone();
                // c's slot wants nothing more: a plain finish in the same batch.
                tokio::spawn(async move {
                    let result = if job == "c" { store.finish(f).await.map(|e| (e, None)) } else { store.finish_and_claim(f, N1, LEASE).await };
                    (job, result)
                })
            })
            .collect();
        let mut next: BTreeMap<&str, Option<ClaimedJob>> = BTreeMap::new();
        for t in tasks {
            let (job, result) = t.await.unwrap();
            let (effect, got) = result.unwrap_or_else(|e| panic!("[{name}] finish and claim {job}: {e}"));
            assert_eq!(effect.stale, job == "d", "[{name}] only d's finish is stale");
            next.insert(job, got);
        }
        assert!(next["d"].is_none(), "[{name}] a stale finish gets no next job");
        // However the finishes were batched, the wanting ones took the
        // lowest ids ready then: what they had just released, not g.
        let (to, mut handed): (Vec<&str>, Vec<&str>) = next.iter().filter_map(|(k, j)| j.as_ref().map(|j| (*k, j.name.as_str()))).unzip();
        handed.sort();
        assert_eq!((to, handed), (vec!["a", "b"], vec!["e", "f"]), "[{name}] what the finishes released, each handed out once, to a and b");
        assert_eq!(
            job_states(&b, dep).await,
            states(&[("a", Succeeded), ("b", Succeeded), ("c", Succeeded), ("d", Running), ("e", Running), ("f", Running), ("g", Ready)]),
            "[{name}]"
        );
        for j in next.values().flatten() {
            let row = job_row(&b, dep, &j.name).await;
            assert_eq!((row.node.as_deref(), row.attempt, j.attempt), (Some(N1), 1, 1), "[{name}] {} runs on the claiming node", j.name);
        }
        let attempts = b.1.attempts(dep).await.unwrap();
        let mut recorded: Vec<&str> = attempts.iter().map(|a| a.job.as_str()).collect();
        recorded.sort();
        assert_eq!(recorded, vec!["a", "b", "c"], "[{name}] one attempt row per finish that counted");
        // Leases as the store keeps them: the claimed ones in the future,
        // the finished ones cleared, none with the mark.
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
        let leases: Vec<(String, Option<i64>)> = sqlx::query_as("SELECT name, lease_until FROM jobs WHERE deployment_id = $1 ORDER BY name")
            .bind(dep)
            .fetch_all(&mut conn)
            .await
            .expect("read leases");
        let now = now_ms();
        for (job, lease) in &leases {
            match job.as_str() {
                "a" | "b" | "c" | "g" => assert_eq!(*lease, None, "[{name}] {job} is final or ready: no lease"),
                _ => assert!(lease.is_some_and(|l| l > now), "[{name}] {job} runs under a lease in the future, not {lease:?}"),
            }
        }
        // d's slot takes g, which was ready before (not released by it).
        let (e, g) = b.1.finish_and_claim(done(by_name(&claimed, "d"), N1, Outcome::Succeeded), N1, LEASE).await.unwrap();
        assert!(!e.stale, "[{name}] d's finish with its own fence counts");
        let g = g.unwrap_or_else(|| panic!("[{name}] d's slot gets g"));
        assert_eq!((g.name.as_str(), g.attempt), ("g", 1), "[{name}]");
        // The rest runs to the end, each finish claiming as a slot does.
        let mut effect = FinishEffect::default();
        for j in next.values().flatten().chain([&g]) {
            let (e, got) = b.1.finish_and_claim(done(j, N1, Outcome::Succeeded), N1, LEASE).await.unwrap();
            assert!(!e.stale && got.is_none(), "[{name}] {} finishes; nothing is left to claim", j.name);
            effect = e;
        }
        assert_eq!(effect.deployment_finished, Some((dep, DeploymentState::Succeeded)), "[{name}] the last finish ends the deployment");
    }
}

/// Issue 19: a batch of more than 100 plain finishes goes in statements
/// of 100 (their parameters), each seeing what the ones before it wrote:
/// a job whose needs finish in different chunks is released once, by the
/// later chunk. 150 roots finish and claim at once; on PostgreSQL they are
/// made to share batches (the first waits on the deployment's row, held
/// from outside, while the rest queue: 128 to a batch), on SQLite they
/// mostly do. Every job released is handed out at most once, each wanting
/// finish gets one while any is left, and the attempts are all recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_a_batch_of_more_than_a_hundred_finishes_releases_and_claims_across_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    const ROOTS: usize = 150;
    for (b, _, url) in backends_with_urls(&dir).await {
        let name = b.0;
        // r000… roots; d000… each needs its root; "ends" needs the first and the last root.
        let mut graph = independent(ROOTS);
        for i in 0..ROOTS {
            graph.push(NewJob { name: format!("d{i:03}"), needs: vec![i], spec: spec() });
        }
        graph.push(NewJob { name: "ends".into(), needs: vec![0, ROOTS - 1], spec: spec() });
        let dep = submit(&b, new_deployment("prod/api", graph)).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let claimed = claim(&b, N1, ROOTS as i64).await;
        assert_eq!(claimed.len(), ROOTS, "[{name}] every root");
        let held = hold_deployment_row(url.as_deref(), dep).await;
        let tasks: Vec<_> = claimed
            .iter()
            .map(|j| {
                let (store, f) = (b.1.clone(), done(j, N1, Outcome::Succeeded));
                tokio::spawn(async move { store.finish_and_claim(f, N1, LEASE).await })
            })
            .collect();
        release_deployment_row(held, Duration::from_millis(500)).await;
        let mut handed = Vec::new();
        for t in tasks {
            let (effect, next) = t.await.unwrap().unwrap_or_else(|e| panic!("[{name}] finish and claim: {e}"));
            assert!(!effect.stale, "[{name}] no finish was stale");
            handed.extend(next.map(|j| j.name));
        }
        let distinct: HashSet<&String> = handed.iter().collect();
        assert_eq!(distinct.len(), handed.len(), "[{name}] no job handed out twice: {handed:?}");
        // 151 jobs released for 150 wanting slots: every slot got one.
        assert_eq!(handed.len(), ROOTS, "[{name}] every finish got a next job");
        let rows = job_rows(&b, dep).await;
        let count = |s: JobState| rows.iter().filter(|r| r.state == s).count();
        assert_eq!(
            (count(JobState::Succeeded), count(JobState::Running), count(JobState::Ready)),
            (ROOTS, ROOTS, 1),
            "[{name}] roots done, one job released but left"
        );
        assert!(rows.iter().all(|r| r.state != JobState::Pending), "[{name}] nothing left pending: ends was released once both its needs had");
        assert_eq!(b.1.attempts(dep).await.unwrap().len(), ROOTS, "[{name}] one attempt row per finish");
    }
}

/// Issue 19: the PostgreSQL writer keeps one connection from batch to
/// batch. When the server ends it while it sits idle (a restart, an
/// `idle_session_timeout`, an operator's `pg_terminate_backend`), the next
/// batch fails at its first statement, before anything ran, and goes once
/// more on a new connection: its callers see no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_a_kept_postgres_connection_the_server_ended_is_replaced() {
    let Some(url) = common::postgres_url().await else { return };
    let store = slipway::store::open(&url).await.expect("open postgres store");
    store.put_revision(&revision()).await.unwrap();
    let b: Backend = ("postgres", store);
    let dep = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0])]))).await.deployment_id;
    assert_eq!(activate(&b, N1).await, vec![dep]);
    // A batch: the writer now holds its connection.
    let a = claim(&b, N1, 10).await;
    assert_eq!(names(&a), vec!["a"]);
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&mut admin)
    .await
    .expect("end the store's sessions");
    assert!(ended >= 1, "the store's connections were found and ended");
    sqlx::Connection::close(admin).await.expect("close the admin connection");
    // pg_terminate_backend only signals: wait until they are gone.
    common::eventually(Duration::from_secs(10), "the store's sessions to end", || {
        let url = url.clone();
        async move {
            let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.map_err(|e| e.to_string())?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
                .fetch_one(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            if left == 0 { Ok(()) } else { Err(format!("{left} sessions left")) }
        }
    })
    .await;
    let effect = finish_ok(&b, &a[0], N1, Outcome::Succeeded).await;
    assert_eq!(effect.newly_ready, 1, "b became ready in the batch that met the ended connection");
    assert_eq!(run_to_end(&b, dep).await, DeploymentState::Succeeded);
}

/// 6. A failed attempt with `retry_at` makes the job ready again, but not
/// before then; every attempt is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_waits_and_records_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let dep = submit(&b, new_deployment("prod/api", jobs(&[("flaky", &[]), ("after", &[0])]))).await.deployment_id;
        activate(&b, N1).await;
        let first = claim(&b, N1, 10).await;
        assert_eq!(names(&first), vec!["flaky"], "[{name}]");
        let started1 = now_ms() - 50;
        let retry_at = now_ms() + 1000;
        let eff = finish(
            &b,
            FinishedAttempt {
                started_at: started1,
                exit_code: Some(75),
                reason: Some("temporary failure".into()),
                retry_at: Some(retry_at),
                takeover: false,
                ..done(&first[0], N1, Outcome::Failed)
            },
        )
        .await;
        assert!(!eff.stale, "[{name}]");
        assert_eq!((eff.newly_ready, eff.deployment_finished), (0, None), "[{name}] a retry releases and finishes nothing");
        assert_eq!(job_states(&b, dep).await, states(&[("flaky", JobState::Ready), ("after", JobState::Pending)]), "[{name}]");
        let row = job_row(&b, dep, "flaky").await;
        assert_eq!((row.exit_code, row.node.as_deref(), row.attempt), (Some(75), None, 1), "[{name}]");
        assert_eq!(counts(&b).await.ready, 1, "[{name}] waiting retry counts as ready");
        assert!(claim(&b, N2, 10).await.is_empty(), "[{name}] not claimable before not_before");
        assert_eq!(dep_state(&b, dep).await, DeploymentState::Running, "[{name}]");

        // Until just past not_before (scenario: the retry's time comes).
        let wait = retry_at - now_ms() + 30;
        tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
        let second = claim(&b, N2, 10).await;
        assert_eq!(names(&second), vec!["flaky"], "[{name}] claimable after not_before");
        assert_eq!((second[0].fence, second[0].attempt), (2, 2), "[{name}]");
        assert!(second[0].ready_at >= retry_at, "[{name}] ready_at is the retry time");
        let eff = finish(
            &b,
            FinishedAttempt {
                exit_code: Some(111),
                reason: Some("connection refused".into()),
                retry_at: Some(now_ms() - 1),
                takeover: false,
                ..done(&second[0], N2, Outcome::TimedOut)
            },
        )
        .await;
        assert!(!eff.stale, "[{name}]");
        let third = claim(&b, N1, 10).await;
        assert_eq!(names(&third), vec!["flaky"], "[{name}] retry_at in the past: claimable at once");
        assert_eq!((third[0].fence, third[0].attempt), (3, 3), "[{name}]");
        let eff = finish_ok(&b, &third[0], N1, Outcome::Succeeded).await;
        assert_eq!(eff.newly_ready, 1, "[{name}]");

        let attempts = b.1.attempts(dep).await.unwrap();
        let got: Vec<_> = attempts.iter().map(|a| (a.job.as_str(), a.attempt, a.node.as_str(), a.outcome, a.exit_code, a.reason.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("flaky", 1, N1, Outcome::Failed, Some(75), Some("temporary failure")),
                ("flaky", 2, N2, Outcome::TimedOut, Some(111), Some("connection refused")),
                ("flaky", 3, N1, Outcome::Succeeded, Some(0), None),
            ],
            "[{name}] every attempt, in order"
        );
        assert_eq!(attempts[0].started_at, started1, "[{name}] started_at as reported");
        assert!(attempts.iter().all(|a| a.finished_at >= a.started_at && a.job_id == first[0].job_id), "[{name}] {attempts:?}");
        assert_eq!(run_to_end(&b, dep).await, DeploymentState::Succeeded, "[{name}]");
        assert_eq!(job_row(&b, dep, "flaky").await.attempt, 3, "[{name}]");
    }
}

/// 7. Cancel: a queued deployment at once; a running one once its running
/// jobs are done (renew tells them); unknown ids are `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        use JobState::*;
        assert!(b.1.cancel(987_654).await.unwrap().is_none(), "[{name}] unknown id");

        let running = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0]), ("c", &[])]))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![running], "[{name}]");
        let queued = submit(&b, run_deployment("prod/api", diamond())).await.deployment_id;
        let after = submit(&b, run_deployment("prod/api", jobs(&[("z", &[])]))).await.deployment_id;

        // Queued: cancelled at once, jobs too, never started.
        let row = b.1.cancel(queued).await.unwrap().unwrap_or_else(|| panic!("[{name}] cancel queued: None"));
        assert_eq!((row.id, row.state), (queued, DeploymentState::Cancelled), "[{name}] queued is cancelled at once");
        assert!(row.finished_at.is_some() && row.reason.is_some(), "[{name}] {row:?}");
        assert!(job_rows(&b, queued).await.iter().all(|j| j.state == Cancelled), "[{name}] its jobs are cancelled");
        assert_eq!(deployment(&b, queued).await.state, DeploymentState::Cancelled, "[{name}] stored");

        // Running: a runs, c ready, b pending.
        let a = claim(&b, N1, 1).await;
        assert_eq!(names(&a), vec!["a"], "[{name}]");
        let a = &a[0];
        let row = b.1.cancel(running).await.unwrap().unwrap_or_else(|| panic!("[{name}] cancel running: None"));
        assert_eq!((row.state, row.cancel_requested), (DeploymentState::Running, true), "[{name}] running: cancel is requested");
        assert_eq!(job_states(&b, running).await, states(&[("a", Running), ("b", Cancelled), ("c", Cancelled)]), "[{name}]");
        assert!(claim(&b, N2, 10).await.is_empty(), "[{name}] nothing of a cancelled deployment is claimable");
        let r = b.1.renew(N1, &[(a.job_id, a.fence)], LEASE).await.unwrap();
        assert_eq!(r.len(), 1, "[{name}]");
        assert_eq!((r[0].job_id, r[0].held, r[0].cancel), (a.job_id, true, true), "[{name}] renew tells the holder to stop");
        assert!(activate(&b, N2).await.is_empty(), "[{name}] lock held until the running job ends");

        // Cancelling twice is harmless.
        let again = b.1.cancel(running).await.unwrap().unwrap();
        assert_eq!((again.state, again.cancel_requested), (DeploymentState::Running, true), "[{name}]");

        let eff = finish_ok(&b, a, N1, Outcome::Cancelled).await;
        assert_eq!(eff.deployment_finished, Some((running, DeploymentState::Cancelled)), "[{name}]");
        let d = deployment(&b, running).await;
        assert_eq!(d.state, DeploymentState::Cancelled, "[{name}]");
        assert!(d.finished_at.is_some() && d.reason.is_some(), "[{name}] {d:?}");
        assert_eq!(job_row(&b, running, "a").await.state, Cancelled, "[{name}]");
        assert_eq!(activate(&b, N2).await, vec![after], "[{name}] lock released, the next one starts");

        // A terminal deployment is returned unchanged.
        let t = b.1.cancel(running).await.unwrap().unwrap();
        assert_eq!(t.state, DeploymentState::Cancelled, "[{name}]");

        // Running, but no job running: cancelled at once, lock released.
        let idle = submit(&b, run_deployment("prod/idle", jobs(&[("p", &[]), ("q", &[0])]))).await.deployment_id;
        let idle_next = submit(&b, run_deployment("prod/idle", jobs(&[("p", &[])]))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![idle], "[{name}]");
        let row = b.1.cancel(idle).await.unwrap().unwrap();
        assert_eq!(row.state, DeploymentState::Cancelled, "[{name}] nothing running: cancelled at once");
        assert_eq!(job_states(&b, idle).await, states(&[("p", Cancelled), ("q", Cancelled)]), "[{name}]");
        assert_eq!(activate(&b, N1).await, vec![idle_next], "[{name}] and its lock is free");
        b.1.cancel(idle_next).await.unwrap();

        // A running job that fails after cancel: still `cancelled`, and a retry is not scheduled.
        let z = claim(&b, N1, 10).await;
        assert_eq!(names(&z), vec!["z"], "[{name}]");
        b.1.cancel(after).await.unwrap();
        let eff = finish(&b, FinishedAttempt { retry_at: Some(now_ms()), ..done(&z[0], N1, Outcome::Failed) }).await;
        assert_eq!(eff.deployment_finished, Some((after, DeploymentState::Cancelled)), "[{name}] no retry after cancel");
        assert_eq!(job_row(&b, after, "z").await.state, Cancelled, "[{name}]");
    }
}

/// Issue 19 (found by `slipway-bench scheduler --store postgres://…`): a
/// lease renewal and a batch of finishes locked the same job rows in
/// opposite orders, and PostgreSQL stalled both for its deadlock_timeout
/// (a second) before aborting the renewal. Here a transaction holds the
/// lower job's row as a batch finishing it does, the renewal of both
/// starts, and then the transaction takes the higher one: with the rows
/// locked in id order by both, the renewal waits without holding
/// anything, and both go through. The test database scans without
/// indexes, so the rows are met where each row version lies (the
/// renewed job's newest version last), as a bitmap scan meets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_a_lease_renewal_and_a_batch_of_finishes_do_not_deadlock() {
    let Some(url) = common::postgres_url().await else { return };
    let db = url.rsplit_once('/').map(|(_, d)| d.to_string()).expect("a database name");
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    for setting in ["enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {db} SET {setting} = off"))).execute(&mut admin).await.expect(setting);
    }
    let b: Backend = ("postgres", slipway::store::open(&url).await.expect("open postgres store"));
    b.1.put_revision(&revision()).await.unwrap();
    b.1.register_node(N1).await.unwrap();
    submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[])]))).await;
    activate(&b, N1).await;
    let mine = claim_with(&b, N1, LEASE, 10).await;
    let (a, bj) = (by_name(&mine, "a"), by_name(&mine, "b"));
    assert!(a.job_id < bj.job_id);
    // a's newest row version now lies after b's.
    sqlx::query("UPDATE jobs SET lease_until = lease_until WHERE id = $1").bind(a.job_id).execute(&mut admin).await.unwrap();

    let mut batch = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut batch).await.unwrap();
    sqlx::query("UPDATE jobs SET lease_until = lease_until WHERE id = $1").bind(a.job_id).execute(&mut batch).await.unwrap();
    let store = b.1.clone();
    let held = [(bj.job_id, bj.fence), (a.job_id, a.fence)];
    let renewal = tokio::spawn(async move { store.renew(N1, &held, LEASE).await });
    // Let the renewal reach the row a holds (it waits there either way).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query("UPDATE jobs SET lease_until = lease_until WHERE id = $1").bind(bj.job_id).execute(&mut batch),
    )
    .await
    .expect("the batch's second row within 10 s");
    second.expect("the batch's second row: not aborted as a deadlock");
    sqlx::query("COMMIT").execute(&mut batch).await.unwrap();
    let renewed = tokio::time::timeout(Duration::from_secs(10), renewal).await.expect("the renewal within 10 s").unwrap();
    let renewed = renewed.expect("the renewal: not aborted as a deadlock");
    // One answer per held job, in the order asked.
    assert_eq!(renewed.iter().map(|r| (r.job_id, r.held)).collect::<Vec<_>>(), vec![(bj.job_id, true), (a.job_id, true)]);
}

/// 8. renew says whether this node still holds each (job, fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_detects_lost_leases() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        b.1.register_node(N1).await.unwrap();
        b.1.register_node(N2).await.unwrap();
        let dep = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[]), ("c", &[])]))).await.deployment_id;
        activate(&b, N1).await;
        let mine = claim_with(&b, N1, Duration::from_millis(1), 10).await;
        assert_eq!(names(&mine), vec!["a", "b", "c"], "[{name}]");
        let (a, bj, c) = (by_name(&mine, "a"), by_name(&mine, "b"), by_name(&mine, "c"));

        // Every lease lapses; a is reaped and taken by N2. N1 goes on to
        // renew a and b, but not c (as if a previous process with the same
        // node id had left it behind). Leases are time: 30 ms outlasts
        // the 1 ms ones (scenario, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let expired = b.1.expired().await.unwrap();
        assert_eq!(expired.len(), 3, "[{name}] all lapsed");
        let reap =
            finish(&b, FinishedAttempt { node: N2.into(), outcome: Outcome::Interrupted, retry_at: Some(now_ms()), ..done(a, N1, Outcome::Interrupted) }).await;
        assert!(!reap.stale, "[{name}]");
        let taken = claim_with(&b, N2, Duration::from_millis(1), 10).await;
        assert_eq!(names(&taken), vec!["a"], "[{name}]");
        assert_eq!(taken[0].fence, a.fence + 1, "[{name}]");
        tokio::time::sleep(Duration::from_millis(30)).await; // N2's 1 ms lease lapses too

        let r = b.1.renew(N1, &[(a.job_id, a.fence), (bj.job_id, bj.fence)], LEASE).await.unwrap();
        let r: HashMap<i64, (bool, bool)> = r.iter().map(|r| (r.job_id, (r.held, r.cancel))).collect();
        assert_eq!(r.get(&a.job_id), Some(&(false, false)), "[{name}] a's fence moved on: lost");
        assert_eq!(r.get(&bj.job_id), Some(&(true, false)), "[{name}] b is still N1's");
        let expired: Vec<i64> = b.1.expired().await.unwrap().iter().map(|e| e.job_id).collect();
        assert_eq!(expired, vec![a.job_id, c.job_id], "[{name}] renew extended b's lease only: not N2's a, nor c, which N1 did not name");

        let r = b.1.renew(N2, &[(a.job_id, taken[0].fence)], LEASE).await.unwrap();
        assert_eq!((r[0].job_id, r[0].held, r[0].cancel), (a.job_id, true, false), "[{name}] the new holder holds it");
        let expired: Vec<i64> = b.1.expired().await.unwrap().iter().map(|e| e.job_id).collect();
        assert_eq!(expired, vec![c.job_id], "[{name}] a renewed by N2");
        let r = b.1.renew(N2, &[(a.job_id, a.fence)], LEASE).await.unwrap();
        assert!(!r[0].held, "[{name}] right node, old fence: not held");
        let r = b.1.renew(N1, &[(a.job_id, taken[0].fence)], LEASE).await.unwrap();
        assert!(!r[0].held, "[{name}] right fence, other node: not held");

        // Once finished, a job is not held by anyone.
        finish_ok(&b, &taken[0], N2, Outcome::Succeeded).await;
        let r = b.1.renew(N2, &[(a.job_id, taken[0].fence)], LEASE).await.unwrap();
        assert!(!r[0].held, "[{name}] finished job is not held");
        let nodes: HashSet<String> = b.1.nodes().await.unwrap().into_iter().map(|n| n.id).collect();
        assert_eq!(nodes, HashSet::from([N1.to_string(), N2.to_string()]), "[{name}] nodes");
        assert_eq!(job_states(&b, dep).await, states(&[("a", JobState::Succeeded), ("b", JobState::Running), ("c", JobState::Running)]), "[{name}]");
    }
}

/// Issue 13: a reaper reads a lapsed lease, the owner renews it, then the
/// reaper writes its takeover: the takeover changes nothing (final or
/// retried alike), and the owner still holds the job and records it.
#[tokio::test]
async fn issue13_a_takeover_after_the_owner_renewed_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        b.1.register_node(N1).await.unwrap();
        submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[])]))).await;
        activate(&b, N1).await;
        let mine = claim_with(&b, N1, Duration::from_millis(1), 10).await;
        let (a, bj) = (by_name(&mine, "a"), by_name(&mine, "b"));
        // Let the 1 ms leases lapse (scenario, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(b.1.expired().await.unwrap().len(), 2, "[{name}] both lapsed: the reaper reads them");
        // The owner renews before the reaper writes.
        let r = b.1.renew(N1, &[(a.job_id, a.fence), (bj.job_id, bj.fence)], LEASE).await.unwrap();
        assert!(r.iter().all(|r| r.held), "[{name}] renewed: {r:?}");
        for (job, retry_at) in [(a, None), (bj, Some(now_ms()))] {
            let takeover = FinishedAttempt { node: N2.into(), outcome: Outcome::Interrupted, retry_at, takeover: true, ..done(job, N1, Outcome::Interrupted) };
            assert!(finish(&b, takeover).await.stale, "[{name}] {}: a takeover of a renewed lease must change nothing", job.name);
        }
        assert_eq!(job_states(&b, a.deployment_id).await, states(&[("a", JobState::Running), ("b", JobState::Running)]), "[{name}]");
        finish_ok(&b, a, N1, Outcome::Succeeded).await;
        finish_ok(&b, bj, N1, Outcome::Succeeded).await;
        assert!(b.1.attempts(a.deployment_id).await.unwrap().iter().all(|x| x.outcome == Outcome::Succeeded), "[{name}] no interrupted attempt recorded");
    }
}

/// 9. Three nodes claiming at once never run a job twice and never lose a
/// dependant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_claim_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let flat = submit(&b, new_deployment("prod/flat", independent(200))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![flat], "[{name}]");
        let per_node = drain_with_three_nodes(&b, flat, FOUR_AT_ONCE).await;
        assert_ran_exactly_once(&b, flat, &per_node, 200).await;

        let layers = submit(&b, new_deployment("prod/layers", layered(50, 4))).await.deployment_id;
        assert_eq!(activate(&b, N2).await, vec![layers], "[{name}]");
        assert_eq!(counts(&b).await.ready, 4, "[{name}] first layer only");
        let per_node = drain_with_three_nodes(&b, layers, TWO_HELD).await;
        assert_ran_exactly_once(&b, layers, &per_node, 200).await;
    }
}

/// 9b. Three nodes activating, claiming and finishing at once never run two
/// deployments of one lock key together, nor a younger before an older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_activate_one_deployment_per_lock() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let mut key_of: HashMap<i64, &'static str> = HashMap::new();
        for i in 0..16 {
            let key = if i % 4 == 3 { "prod/other" } else { "prod/jobs" };
            let id = submit(&b, run_deployment(key, jobs(&[("a", &[]), ("b", &[0]), ("c", &[0])]))).await.deployment_id;
            key_of.insert(id, key);
        }
        let key_of = Arc::new(key_of);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

        // The monitor: every snapshot of deployments must respect the locks.
        let monitor = {
            let (store, key_of, stop) = (b.1.clone(), key_of.clone(), stop.clone());
            tokio::spawn(async move {
                let mut violations = Vec::new();
                let mut snapshots = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let all = store.deployments(1000, None).await.unwrap();
                    snapshots += 1;
                    for key in ["prod/jobs", "prod/other"] {
                        let of_key: Vec<&DeploymentRow> = all.iter().filter(|d| key_of[&d.id] == key).collect();
                        let running: Vec<i64> = of_key.iter().filter(|d| d.state == DeploymentState::Running).map(|d| d.id).collect();
                        let oldest_queued = of_key.iter().filter(|d| d.state == DeploymentState::Queued).map(|d| d.id).min();
                        if running.len() > 1 {
                            violations.push(format!("{key}: running together: {running:?}"));
                        }
                        if let (Some(&r), Some(q)) = (running.first(), oldest_queued)
                            && q < r
                        {
                            violations.push(format!("{key}: {r} runs while older {q} is queued"));
                        }
                    }
                    // The monitor's sampling interval (scenario).
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (violations, snapshots)
            })
        };

        let nodes: Vec<_> = [N1, N2, N3]
            .iter()
            .map(|node| {
                let store = b.1.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        if Instant::now() > deadline {
                            break; // the assertions below say what is left
                        }
                        store.activate(node, LEASE).await.unwrap_or_else(|e| panic!("[{name}] activate: {e}"));
                        let claimed = store.claim(node, LEASE, 2).await.unwrap_or_else(|e| panic!("[{name}] claim: {e}"));
                        for j in &claimed {
                            let eff = store.finish(done(j, node, Outcome::Succeeded)).await.unwrap_or_else(|e| panic!("[{name}] finish: {e}"));
                            assert!(!eff.stale, "[{name}] {node}: stale finish of {}", j.job_id);
                        }
                        if claimed.is_empty() {
                            let all = store.deployments(1000, None).await.unwrap();
                            if all.iter().all(|d| d.state.is_terminal()) {
                                break;
                            }
                            // A node's poll interval (scenario).
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                })
            })
            .collect();
        for n in nodes {
            n.await.unwrap_or_else(|e| panic!("[{name}] node task: {e}"));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (violations, snapshots) = monitor.await.unwrap();
        assert!(violations.is_empty(), "[{name}] lock violations seen in {snapshots} snapshots: {violations:?}");
        let all = b.1.deployments(1000, None).await.unwrap();
        assert_eq!(all.len(), 16, "[{name}]");
        assert!(
            all.iter().all(|d| d.state == DeploymentState::Succeeded),
            "[{name}] every deployment succeeds within 30 s: {:?}",
            all.iter().map(|d| (d.id, d.state)).collect::<Vec<_>>()
        );
        assert_eq!(counts(&b).await.ready, 0, "[{name}]");
    }
}

/// 10. Logs page in order, per job or all; history has typical durations
/// of successful runs per environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_page_in_order_and_history_per_environment() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let dep = submit(&b, new_deployment("prod/api", jobs(&[("build", &[]), ("test", &[])]))).await.deployment_id;
        let other = submit(&b, new_deployment("prod/web", jobs(&[("build", &[])]))).await.deployment_id;
        let rows = job_rows(&b, dep).await;
        let id_of = |n: &str| rows.iter().find(|j| j.name == n).unwrap().id;
        let (build, test) = (id_of("build"), id_of("test"));
        let other_build = job_rows(&b, other).await[0].id;

        let t0 = now_ms();
        let lines: Vec<NewLogLine> = (0..2500)
            .map(|i| NewLogLine {
                deployment_id: dep,
                job_id: if i % 3 == 0 { test } else { build },
                attempt: 1 + (i % 2) as i64,
                ts: t0 + i as i64,
                stream: if i % 5 == 0 { "stderr" } else { "stdout" },
                line: format!("line {i:04} ünïcode ✓"),
                part: None,
            })
            .collect();
        // Several appends, one interleaved with another deployment's.
        b.1.append_logs(&lines[..1000]).await.unwrap();
        b.1.append_logs(&[NewLogLine {
            deployment_id: other,
            job_id: other_build,
            attempt: 1,
            ts: t0,
            stream: "stdout",
            line: "elsewhere".into(),
            part: None,
        }])
        .await
        .unwrap();
        b.1.append_logs(&lines[1000..2499]).await.unwrap();
        b.1.append_logs(&[]).await.unwrap();
        b.1.append_logs(&lines[2499..]).await.unwrap();

        let page_all = |job: Option<&'static str>| {
            let store = b.1.clone();
            async move {
                let mut out = Vec::new();
                let mut after = 0;
                let mut pages = 0;
                loop {
                    let page = store.logs(dep, job, after, 700).await.unwrap();
                    assert!(page.len() <= 700, "[{name}] limit");
                    if page.is_empty() {
                        break;
                    }
                    pages += 1;
                    after = page.last().unwrap().seq;
                    out.extend(page);
                }
                (out, pages)
            }
        };
        let (all, pages) = page_all(None).await;
        assert_eq!(pages, 4, "[{name}] 2500 lines in pages of 700");
        assert_eq!(all.len(), 2500, "[{name}] every line, and only this deployment's");
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "[{name}] seq increases");
        for (i, (rec, want)) in all.iter().zip(&lines).enumerate() {
            let job = if want.job_id == test { "test" } else { "build" };
            assert_eq!(
                (rec.job.as_str(), rec.attempt, rec.ts, rec.stream.as_str(), rec.line.as_str()),
                (job, want.attempt, want.ts, want.stream, want.line.as_str()),
                "[{name}] line {i}"
            );
        }
        let (tests, _) = page_all(Some("test")).await;
        let want: Vec<&str> = lines.iter().filter(|l| l.job_id == test).map(|l| l.line.as_str()).collect();
        assert_eq!(want.len(), 834, "[{name}]");
        assert_eq!(tests.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(), want, "[{name}] job filter, in order");
        assert!(tests.iter().all(|r| r.job == "test"), "[{name}]");
        let mid = all[1234].seq;
        let rest = b.1.logs(dep, None, mid, 10_000).await.unwrap();
        assert_eq!(rest.len(), 2500 - 1235, "[{name}] after is exclusive");
        assert_eq!(rest[0].line, lines[1235].line, "[{name}]");
        assert!(b.1.logs(dep, Some("nope"), 0, 100).await.unwrap().is_empty(), "[{name}] unknown job");
        let elsewhere = b.1.logs(other, None, 0, 100).await.unwrap();
        assert_eq!(elsewhere.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(), vec!["elsewhere"], "[{name}]");

        // The log deployments never ran; out of the way of what follows.
        for d in [dep, other] {
            assert_eq!(b.1.cancel(d).await.unwrap().map(|d| d.state), Some(DeploymentState::Cancelled), "[{name}]");
        }

        // History: "migrate" succeeded twice in prod taking ~3 s; "lint" only failed.
        for round in 0..2 {
            let mut new = new_deployment(&format!("prod/hist{round}"), jobs(&[("migrate", &[]), ("lint", &[])]));
            new.environment = "prod".into();
            let d = submit(&b, new).await.deployment_id;
            activate(&b, N1).await;
            let claimed = claim(&b, N1, 10).await;
            assert_eq!(names(&claimed), vec!["lint", "migrate"], "[{name}]");
            let m = by_name(&claimed, "migrate");
            let eff = finish(&b, FinishedAttempt { started_at: now_ms() - 3000, ..done(m, N1, Outcome::Succeeded) }).await;
            assert!(!eff.stale, "[{name}]");
            let lint = by_name(&claimed, "lint");
            finish(&b, FinishedAttempt { started_at: now_ms() - 60_000, ..done(lint, N1, Outcome::Failed) }).await;
            assert_eq!(dep_state(&b, d).await, DeploymentState::Failed, "[{name}]");
        }
        let mut staging = new_deployment("staging/api", jobs(&[("smoke", &[])]));
        staging.environment = "staging".into();
        let s = submit(&b, staging).await.deployment_id;
        activate(&b, N1).await;
        let smoke = claim(&b, N1, 10).await;
        finish(&b, FinishedAttempt { started_at: now_ms() - 500, ..done(&smoke[0], N1, Outcome::Succeeded) }).await;
        assert_eq!(dep_state(&b, s).await, DeploymentState::Succeeded, "[{name}]");

        let prod = b.1.history("prod").await.unwrap();
        assert_eq!(prod.keys().collect::<HashSet<_>>(), HashSet::from([&"migrate".to_string()]), "[{name}] only succeeded jobs of prod: {prod:?}");
        let migrate = prod["migrate"];
        assert!(migrate >= Duration::from_millis(3000) && migrate < Duration::from_millis(4000), "[{name}] migrate took {migrate:?}");
        let staging = b.1.history("staging").await.unwrap();
        assert_eq!(staging.keys().collect::<HashSet<_>>(), HashSet::from([&"smoke".to_string()]), "[{name}] {staging:?}");
        let smoke_d = staging["smoke"];
        assert!(smoke_d >= Duration::from_millis(500) && smoke_d < Duration::from_millis(1500), "[{name}] smoke took {smoke_d:?}");
        assert!(b.1.history("nowhere").await.unwrap().is_empty(), "[{name}]");
    }
}

/// 11. counts: deployments and jobs by state, and the ready count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_by_state() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        use JobState::*;
        let empty = counts(&b).await;
        assert!(nonzero(&empty.deployments).is_empty() && nonzero(&empty.jobs).is_empty(), "[{name}] empty store: {empty:?}");
        assert_eq!((empty.ready, empty.queued_deployments), (0, 0), "[{name}]");

        let d1 = submit(&b, new_deployment("k1", jobs(&[("a", &[]), ("b", &[]), ("c", &[0])]))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![d1], "[{name}]");
        let a = claim(&b, N1, 1).await;
        assert_eq!(names(&a), vec!["a"], "[{name}]");
        let d2 = submit(&b, new_deployment("k1", jobs(&[("x", &[]), ("y", &[])]))).await.deployment_id;
        let d3 = submit(&b, new_deployment("k3", jobs(&[("solo", &[])]))).await.deployment_id;
        b.1.cancel(d3).await.unwrap().unwrap();
        let d4 = submit(&b, new_deployment("k1", jobs(&[("z", &[])]))).await;
        assert_eq!(d4.superseded, vec![d2], "[{name}]");

        let c = counts(&b).await;
        assert_eq!(
            nonzero(&c.deployments),
            HashMap::from([(DeploymentState::Running, 1), (DeploymentState::Queued, 1), (DeploymentState::Cancelled, 1), (DeploymentState::Superseded, 1)]),
            "[{name}] deployments by state"
        );
        assert_eq!(nonzero(&c.jobs), HashMap::from([(Running, 1), (Ready, 1), (Pending, 2), (Cancelled, 3)]), "[{name}] jobs by state");
        assert_eq!((c.ready, c.queued_deployments), (1, 1), "[{name}]");

        finish_ok(&b, &a[0], N1, Outcome::Succeeded).await;
        let c = counts(&b).await;
        assert_eq!(nonzero(&c.jobs), HashMap::from([(Succeeded, 1), (Ready, 2), (Pending, 1), (Cancelled, 3)]), "[{name}] after a");
        assert_eq!(c.ready, 2, "[{name}] b and c");

        assert_eq!(run_to_end(&b, d1).await, DeploymentState::Succeeded, "[{name}]");
        let c = counts(&b).await;
        assert_eq!(nonzero(&c.deployments)[&DeploymentState::Succeeded], 1, "[{name}]");
        assert_eq!((c.ready, c.queued_deployments), (0, 1), "[{name}] d4 waits for activation");
        assert_eq!(activate(&b, N1).await, vec![d4.deployment_id], "[{name}]");
        let c = counts(&b).await;
        assert_eq!((c.ready, c.queued_deployments), (1, 0), "[{name}]");
    }
}

/// 12. expire_all_leases: every running job is expired now, and every lock
/// can be taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_all_leases_expires_every_running_job() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let d1 = submit(&b, new_deployment("k1", jobs(&[("a", &[]), ("b", &[]), ("c", &[0])]))).await.deployment_id;
        let d2 = submit(&b, new_deployment("k2", jobs(&[("x", &[]), ("y", &[])]))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![d1, d2], "[{name}]");
        let mut running: Vec<i64> = claim(&b, N1, 2).await.iter().map(|j| j.job_id).collect();
        running.extend(claim(&b, N2, 2).await.iter().map(|j| j.job_id));
        running.sort_unstable();
        assert_eq!(running.len(), 4, "[{name}] a, b, x, y");
        assert!(b.1.expired().await.unwrap().is_empty(), "[{name}] long leases");
        assert_eq!(b.1.reap_locks(N3, LEASE).await.unwrap(), 0, "[{name}] locks are fresh");

        b.1.expire_all_leases().await.unwrap();
        let mut expired: Vec<i64> = b.1.expired().await.unwrap().iter().map(|e| e.job_id).collect();
        expired.sort_unstable();
        assert_eq!(expired, running, "[{name}] every running job, and only those");
        assert_eq!(job_row(&b, d1, "c").await.state, JobState::Pending, "[{name}]");
        assert_eq!(b.1.reap_locks(N3, LEASE).await.unwrap(), 2, "[{name}] both locks lapsed and are taken over");
        assert_eq!(b.1.reap_locks(N3, LEASE).await.unwrap(), 0, "[{name}] and are fresh again");
        for d in [d1, d2] {
            assert_eq!(dep_state(&b, d).await, DeploymentState::Running, "[{name}] running deployments keep their lock");
        }
    }
}

// ---------------------------------------------------------------- services

fn service_row(version: &str, sha: Option<&str>, dep: i64) -> slipway::store::ServiceRow {
    slipway::store::ServiceRow {
        environment: "staging".into(),
        service: "web".into(),
        version: version.into(),
        previous_version: None,
        spec: "{}".into(),
        revision: REV.into(),
        deployment_id: dep,
        updated_at: now_ms(),
        artifact_dir: sha.map(|s| format!("/cache/{s}")),
        sha256: sha.map(String::from),
        previous_sha256: None,
        target_ref: None,
    }
}

#[tokio::test]
async fn issue16_a_service_records_what_its_target_runs_and_loses_it_on_a_target_without() {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        let arn = "arn:aws:ecs:eu-west-1:123456789012:task-definition/web:7";
        let row = slipway::store::ServiceRow { target_ref: Some(arn.into()), ..service_row("1.0", None, 1) };
        store.set_service(row).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        let rows = store.services().await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(rows[0].target_ref.as_deref(), Some(arn), "[{name}]");
        // A later version on a target that names nothing: nothing stale kept.
        store.set_service(service_row("2.0", None, 2)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(store.services().await.unwrap()[0].target_ref, None, "[{name}]");
    }
}

#[tokio::test]
async fn a_service_records_its_version_and_the_one_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        store.set_service(service_row("1.0", Some("aa"), 1)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        store.set_service(service_row("2.0", Some("bb"), 2)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        // The same version again (a re-run rollout) keeps the older previous.
        store.set_service(service_row("2.0", Some("bb"), 3)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        let rows = store.services().await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(rows.len(), 1, "[{name}] one row per (environment, service)");
        let r = &rows[0];
        assert_eq!((r.version.as_str(), r.previous_version.as_deref(), r.deployment_id), ("2.0", Some("1.0"), 3), "[{name}]");
        assert_eq!((r.sha256.as_deref(), r.previous_sha256.as_deref(), r.artifact_dir.as_deref()), (Some("bb"), Some("aa"), Some("/cache/bb")), "[{name}]");

        for (kind, message) in [("instance_died", "exit code 1"), ("restarted", "as 127.0.0.1:1")] {
            let e =
                slipway::store::ServiceEvent { environment: "staging".into(), service: "web".into(), at: now_ms(), kind: kind.into(), message: message.into() };
            store.record_service_event(e).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        }
        let events = store.service_events("staging", "web", 10).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["restarted", "instance_died"], "[{name}] newest first");
        assert!(store.service_events("staging", "api", 10).await.unwrap_or_else(|e| panic!("[{name}] {e}")).is_empty(), "[{name}]");
    }
}

// Issue 6: a delivery that starts nothing is stored once per key.
#[tokio::test]
async fn an_event_without_a_deployment_is_stored_once_per_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        let ev = || slipway::store::NewEvent { key: Some("github:abc".into()), kind: "github.push".into(), payload: "{}".into() };
        let (first, dup) = store.record_event(ev()).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(!dup, "[{name}]");
        let (again, dup) = store.record_event(ev()).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(dup && again == first, "[{name}] the same key is one event");
        let (other, dup) =
            store.record_event(slipway::store::NewEvent { key: Some("github:abd".into()), ..ev() }).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(!dup && other != first, "[{name}]");
        // By id (the API names each deployment's cause from its event).
        let mut got: Vec<i64> =
            store.events_by_id(&[other, first, i64::MAX]).await.unwrap_or_else(|e| panic!("[{name}] {e}")).into_iter().map(|e| e.id).collect();
        got.sort_unstable();
        let mut want = vec![first, other];
        want.sort_unstable();
        assert_eq!(got, want, "[{name}] the unknown id is left out");
        assert!(store.events_by_id(&[]).await.unwrap_or_else(|e| panic!("[{name}] {e}")).is_empty());
    }
}

// Issue 6: the audit log keeps every entry, newest first.
#[tokio::test]
async fn the_audit_log_keeps_entries_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        for (n, status, env, actor) in [(1, 202, Some("staging"), "anonymous"), (2, 401, None, "token ops"), (3, 202, Some("prod"), "token ops")] {
            let e = slipway::store::AuditEntry {
                id: 0,
                at: now_ms(),
                actor: actor.into(),
                address: "127.0.0.1".into(),
                action: "POST /api/v1/events".into(),
                detail: format!("entry {n}"),
                status,
                environment: env.map(str::to_string),
            };
            store.record_audit(e).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        }
        // Filtered by environment, by actor, by both (issue 17: the
        // dashboard's audit filter).
        let filtered = |environment: Option<&str>, actor: Option<&str>| {
            let f = slipway::store::AuditFilter { environment: environment.map(str::to_string), actor: actor.map(str::to_string) };
            let store = store.clone();
            async move { store.audit_filtered(&f, 10).await.unwrap_or_else(|e| panic!("{e}")).into_iter().map(|e| e.detail).collect::<Vec<_>>() }
        };
        assert_eq!(filtered(Some("prod"), None).await, ["entry 3"], "[{name}]");
        assert_eq!(filtered(None, Some("token ops")).await, ["entry 3", "entry 2"], "[{name}]");
        assert_eq!(filtered(Some("staging"), Some("token ops")).await, Vec::<String>::new(), "[{name}]");
        assert_eq!(store.audit_filtered(&Default::default(), 1).await.unwrap_or_else(|e| panic!("{e}")).len(), 1, "[{name}]");
        let log: Vec<_> = store.audit(10).await.unwrap_or_else(|e| panic!("[{name}] {e}")).into_iter().filter(|e| e.detail != "entry 3").collect();
        assert_eq!(log[0].environment, None, "[{name}]");
        assert_eq!(log.iter().map(|e| (e.detail.as_str(), e.status)).collect::<Vec<_>>(), [("entry 2", 401), ("entry 1", 202)], "[{name}]");
        assert!(log[0].id > log[1].id);
    }
}

// Issue 6: a deployment released inside its deploy window but still queued
// (behind a lock) when the window closes goes back to waiting; it does not
// start outside the window. What has no window, or a window still open,
// stays queued.
#[tokio::test]
async fn issue6_a_queued_deployment_whose_window_closed_waits_again() {
    // 2026-11-23 was a Monday; its noon and its evening, in ms.
    const MONDAY: i64 = 1_795_392_000;
    let (noon, evening) = ((MONDAY + 12 * 3600) * 1000, (MONDAY + 20 * 3600) * 1000);
    let config = slipway::config::parse(
        "slipway.toml",
        "[[environment]]\nname = \"production\"\nwindows = [\"mon-fri 09:00-17:00\"]\n\n[[environment]]\nname = \"staging\"\n\n[[job]]\nname = \"j\"\ncommand = [\"true\"]\n",
    )
    .expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        let hold = slipway::store::Hold { window: true, ..Default::default() };
        let gated =
            submit(&b, NewDeployment { environment: "production".into(), hold: Some(hold.clone()), ..new_deployment("production/api", jobs(&[("a", &[])])) })
                .await
                .deployment_id;
        let free = submit(&b, new_deployment("staging/api", jobs(&[("a", &[])]))).await.deployment_id;
        assert_eq!(dep_state(&b, gated).await, DeploymentState::Waiting, "[{name}]");
        assert!(store.release(gated).await.unwrap_or_else(|e| panic!("[{name}] {e}")), "[{name}] released (its window was open)");

        slipway::submit::gates::hold_back_closed(store, &config, noon).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(dep_state(&b, gated).await, DeploymentState::Queued, "[{name}] the window is still open at noon");

        slipway::submit::gates::hold_back_closed(store, &config, evening).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        let d = deployment(&b, gated).await;
        assert_eq!(d.state, DeploymentState::Waiting, "[{name}] the window closed before it started");
        let reason = d.reason.unwrap_or_default();
        assert!(reason.starts_with("waiting for the deploy window of production (mon-fri 09:00-17:00 UTC); next opens Tue 09:00:00 UTC"), "[{name}] {reason}");
        assert_eq!(store.hold(gated).await.unwrap_or_else(|e| panic!("[{name}] {e}")).and_then(|h| h.waiting_for), Some(reason.clone()), "[{name}]");
        assert_eq!(dep_state(&b, free).await, DeploymentState::Queued, "[{name}] no window, no hold");
        // Nothing it could start: the held-back one is not activated.
        let started = store.activate(N1, LEASE).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(started, vec![free], "[{name}]");
    }
}

// Issue 6: a background redeploy (`only_after`) is stored only when nothing
// on its lock is in flight and the service's record is still the one its
// caller read; refused, it stores nothing (not even its event key), and it
// never supersedes anyone's deploy.
#[tokio::test]
async fn issue6_a_background_redeploy_waits_for_an_idle_service_and_a_current_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in backends(&dir).await {
        let (name, store) = &b;
        let lock = "staging/service/web";
        let redeploy = |ran: i64| NewDeployment {
            event: NewEvent { key: Some("git:drift-web".into()), kind: "deploy".into(), payload: "{}".into() },
            service: Some("web".into()),
            only_after: Some(ran),
            ..new_deployment(lock, jobs(&[("a", &[])]))
        };
        store.set_service(service_row("1.0", None, 1000)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));

        // Someone's deploy of 2.0 is queued: refused, and 2.0 stays queued.
        let theirs = submit(&b, NewDeployment { service: Some("web".into()), version: Some("2.0".into()), ..new_deployment(lock, jobs(&[("a", &[])])) })
            .await
            .deployment_id;
        let s = submit(&b, redeploy(1000)).await;
        assert!(s.busy && s.deployment_id == 0 && s.superseded.is_empty(), "[{name}] {s:?}");
        assert_eq!(dep_state(&b, theirs).await, DeploymentState::Queued, "[{name}]");

        // (Record 1000: an earlier deployment, before this store's ids.)
        // 2.0 has run since (its record names it): a redeploy read before is stale.
        store.cancel(theirs).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        store.set_service(service_row("2.0", None, theirs)).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(submit(&b, redeploy(1000)).await.busy, "[{name}] a stale record");

        // Idle and current: stored, once (the key was not taken by the refusals).
        let s = submit(&b, redeploy(theirs)).await;
        assert!(!s.busy && !s.duplicate && s.deployment_id > 0, "[{name}] {s:?}");
        assert_eq!(dep_state(&b, s.deployment_id).await, DeploymentState::Queued, "[{name}]");
        // Now it is in flight itself: a second one is refused before its key.
        assert!(submit(&b, redeploy(theirs)).await.busy, "[{name}]");
        assert!(store.in_flight_on(lock).await.unwrap_or_else(|e| panic!("[{name}] {e}")), "[{name}]");
        assert!(!store.in_flight_on("staging/service/other").await.unwrap_or_else(|e| panic!("[{name}] {e}")), "[{name}]");
    }
}

/// Issue 16: a named lease (the SQS consumer's: one poller per
/// installation). One holder at a time, even when nodes ask at once; the
/// holder renews it; another takes it once it has lapsed or been given up;
/// only the holder can give it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue16_named_lease_has_one_holder_renews_and_passes_on() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let (name, store) = (b.0, b.1.clone());
        let take = |holder: &'static str, ttl: Duration| {
            let store = store.clone();
            async move { store.try_lease("sqs", holder, ttl).await.unwrap_or_else(|e| panic!("[{name}] try_lease: {e}")) }
        };
        // Ten nodes at once, a free lease: exactly one gets it.
        let racers: Vec<_> = (0..10)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.try_lease("race", &format!("node-{i}"), LEASE).await.unwrap_or_else(|e| panic!("[{name}] race: {e}")) })
            })
            .collect();
        let mut won = 0;
        for r in racers {
            won += usize::from(r.await.unwrap());
        }
        assert_eq!(won, 1, "[{name}] one holder of a lease taken at once");

        assert!(take(N1, LEASE).await, "[{name}] a free lease is taken");
        assert!(!take(N2, LEASE).await, "[{name}] a held lease is refused to another");
        assert!(take(N1, LEASE).await, "[{name}] its holder renews it");
        assert!(!take(N2, LEASE).await, "[{name}] still refused after the renewal");
        // Another name is another lease.
        assert!(store.try_lease("other", N2, LEASE).await.unwrap(), "[{name}] names are independent");

        // Giving it up: only its holder can.
        store.release_lease("sqs", N2).await.unwrap_or_else(|e| panic!("[{name}] release: {e}"));
        assert!(!take(N2, LEASE).await, "[{name}] a release by someone else changes nothing");
        store.release_lease("sqs", N1).await.unwrap_or_else(|e| panic!("[{name}] release: {e}"));
        assert!(take(N2, LEASE).await, "[{name}] given up, it is taken at once");

        // A holder that stops renewing: another takes over once it lapses.
        assert!(!take(N3, Duration::from_millis(1)).await, "[{name}] N2 holds it");
        store.release_lease("sqs", N2).await.unwrap();
        assert!(take(N3, Duration::from_millis(1)).await, "[{name}] N3 takes it briefly");
        common::eventually(Duration::from_secs(10), "the lapsed lease to pass to N1", || take(N1, LEASE)).await;
        assert!(!take(N3, LEASE).await, "[{name}] the old holder cannot renew what another took over");
    }
}

/// PostgreSQL runs a batch of claims, output lines and plain successful
/// finishes in one call of `slipway_write_batch` (migration 6, no
/// transaction around it), and the function gives back, having written
/// nothing, a batch that may complete its deployment or finishes a job of
/// one being cancelled: the general path then does what it always did. Counted by the server's own
/// function statistics (`track_functions`), set for this test's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_postgres_runs_a_common_batch_in_one_call_and_gives_back_the_rest() {
    const CALLS: &str = "SELECT calls FROM pg_stat_user_functions WHERE funcname = 'slipway_write_batch'";
    let Some(url) = common::postgres_url().await else { return };
    let db = url.rsplit('/').next().expect("a database in the URL").to_string();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    // Before the store opens, so that its connections count calls.
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {db} SET track_functions = 'pl'"))).execute(&mut admin).await.expect("track function calls");
    let b: Backend = ("postgres", slipway::store::open(&url).await.expect("open postgres store"));
    b.1.put_revision(&revision()).await.expect("put_revision");
    // The test's own calls, on a session that counts them too.
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    use JobState::*;

    let dep = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0]), ("c", &[0]), ("d", &[])]))).await.deployment_id;
    assert_eq!(activate(&b, N1).await, vec![dep]);
    let first = claim(&b, N1, 2).await;
    assert_eq!(names(&first), vec!["a", "d"]);
    // The common case: a's success releases b and c, and its slot takes b.
    let (e, next) = b.1.finish_and_claim(done(by_name(&first, "a"), N1, Outcome::Succeeded), N1, LEASE).await.expect("finish a");
    assert_eq!((e.stale, e.newly_ready, e.deployment_finished), (false, 2, None));
    let b_job = next.expect("a's slot gets a next job");
    assert_eq!((b_job.name.as_str(), b_job.attempt, b_job.deployment_id), ("b", 1, dep));
    assert_eq!(b_job.spec, spec(), "the claimed job's spec read back whole");
    assert_eq!(job_states(&b, dep).await, states(&[("a", Succeeded), ("b", Running), ("c", Ready), ("d", Running)]));
    // The same finish again is stale: nothing written, nothing handed out.
    let (e, next) = b.1.finish_and_claim(done(by_name(&first, "a"), N1, Outcome::Succeeded), N1, LEASE).await.expect("finish a again");
    assert!(e.stale && next.is_none(), "a second finish of a is stale and gets nothing: {e:?}");
    assert_eq!(job_row(&b, dep, "c").await.state, Ready, "c was not taken by a stale finish");
    // The function itself, called as the store calls it: a common batch
    // (a plain claim) is answered, and the answer carries what a claim
    // needs of its deployment.
    let answer = write_batch(&mut admin, serde_json::json!({ "now": now_ms(), "claims": [{ "node": N1, "lease_ms": 60_000, "limit": 1 }] })).await;
    let answer: serde_json::Value = serde_json::from_str(&answer.expect("a plain claim is answered")).expect("JSON");
    let (c, info) = (&answer["claims"][0][0][0], &answer["claims"][0][0][1]);
    assert_eq!((c[2].as_str(), info[0].as_str(), info[1].as_str()), (Some("c"), Some(REV), Some("staging")), "c claimed, with its deployment's part: {answer}");
    let c = ClaimedJob { job_id: c[0].as_i64().unwrap(), fence: c[4].as_i64().unwrap(), ..b_job.clone() };
    for job in [&b_job, &c] {
        let e = b.1.finish(done(job, N1, Outcome::Succeeded)).await.expect("finish");
        assert_eq!(e.deployment_finished, None, "d still runs");
    }
    // d is the last open job: the function gives its finish back, having
    // written nothing, and the general path completes the deployment.
    let d = by_name(&first, "d");
    let given_back = write_batch(&mut admin, serde_json::json!({ "now": now_ms(), "finishes": [finish_json(d)] })).await;
    assert_eq!(given_back, None, "a finish that may complete its deployment is given back");
    assert_eq!(job_row(&b, dep, "d").await.state, Running, "and nothing was written");
    let e = b.1.finish(done(by_name(&first, "d"), N1, Outcome::Succeeded)).await.expect("finish d");
    assert_eq!(e.deployment_finished, Some((dep, DeploymentState::Succeeded)));
    let mut recorded: Vec<String> = b.1.attempts(dep).await.unwrap().into_iter().map(|a| a.job).collect();
    recorded.sort();
    assert_eq!(recorded, vec!["a", "b", "c", "d"], "one attempt row per finish that counted");

    // A deployment being cancelled: its running job's success is recorded,
    // nothing after it starts, and the deployment ends cancelled.
    let dep2 = submit(&b, new_deployment("prod/web", jobs(&[("x", &[]), ("y", &[0]), ("z", &[])]))).await.deployment_id;
    assert_eq!(activate(&b, N1).await, vec![dep2]);
    let running = claim(&b, N1, 2).await;
    assert_eq!(names(&running), vec!["x", "z"]);
    b.1.cancel(dep2).await.expect("cancel").expect("the deployment exists");
    let given_back = write_batch(&mut admin, serde_json::json!({ "now": now_ms(), "finishes": [finish_json(by_name(&running, "x"))] })).await;
    assert_eq!(given_back, None, "a finish in a deployment being cancelled is given back");
    assert_eq!(job_row(&b, dep2, "x").await.state, Running, "and nothing was written");
    let (e, next) = b.1.finish_and_claim(done(by_name(&running, "x"), N1, Outcome::Succeeded), N1, LEASE).await.expect("finish x");
    assert!(!e.stale && next.is_none(), "x counts and its slot gets nothing: {e:?}, {next:?}");
    assert_eq!(job_row(&b, dep2, "y").await.state, Cancelled, "y never starts");
    let e = b.1.finish(done(by_name(&running, "z"), N1, Outcome::Cancelled)).await.expect("finish z");
    assert_eq!(e.deployment_finished, Some((dep2, DeploymentState::Cancelled)));

    // Every claim and plain successful finish went to the function (the
    // claim of a and d, a, a again, b, c, d, the claim of x and z, x; z's
    // finish was not a success): eight calls, one per batch, as each was
    // awaited before the next; and the test's own three.
    let calls = common::wait_for_diag(Duration::from_secs(30), "the function's calls counted", String::new, || {
        let url = url.clone();
        let n = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.ok()?;
                let n: Option<i64> = sqlx::query_scalar(CALLS).fetch_optional(&mut conn).await.ok()?;
                n
            })
        })
        .join()
        .ok()
        .flatten();
        n.filter(|n| *n >= 11)
    });
    assert_eq!(calls, 11, "one call per batch of claims and plain successful finishes");
}

/// A job's output line with a NUL byte in it (PostgreSQL's text cannot
/// hold one) is stored with U+FFFD in its place, on both stores, and the
/// lines sent with it and after it are stored too; so is a failure's
/// reason quoting it. Before, PostgreSQL
/// refused the whole append, and the log writer kept retrying it: nothing
/// that job or any other printed afterwards was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_an_output_line_with_a_nul_byte_is_stored_and_so_is_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let name = b.0;
        let dep = submit(&b, new_deployment("prod/api", jobs(&[("build", &[])]))).await.deployment_id;
        let job = job_rows(&b, dep).await[0].id;
        let line = |text: &str| NewLogLine { deployment_id: dep, job_id: job, attempt: 1, ts: now_ms(), stream: "stdout", line: text.into(), part: None };
        b.1.append_logs(&[line("before"), line("a\0b\0"), line("with it")]).await.unwrap_or_else(|e| panic!("[{name}] append a NUL byte: {e}"));
        b.1.append_logs(&[line("after")]).await.unwrap_or_else(|e| panic!("[{name}] append after: {e}"));
        let got: Vec<String> = b.1.logs(dep, None, 0, 100).await.unwrap().into_iter().map(|l| l.line).collect();
        assert_eq!(got, vec!["before", "a\u{FFFD}b\u{FFFD}", "with it", "after"], "[{name}]");
        // A reason quoting such output, as a failure's does.
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let claimed = claim(&b, N1, 1).await;
        let mut failed = done(&claimed[0], N1, Outcome::Failed);
        failed.reason = Some("exit code 1; its last output: a\0b".into());
        let effect = b.1.finish(failed).await.unwrap_or_else(|e| panic!("[{name}] finish with a NUL byte in its reason: {e}"));
        assert_eq!(effect.deployment_finished.map(|(_, s)| s), Some(DeploymentState::Failed), "[{name}]");
        let attempts = b.1.attempts(dep).await.unwrap();
        assert_eq!(attempts[0].reason.as_deref(), Some("exit code 1; its last output: a\u{FFFD}b"), "[{name}]");
    }
}

/// A NUL byte in text a client sends (an idempotency key, the audit entry
/// quoting it, an approver's name, a filter) is kept as U+FFFD on both
/// stores, and a lookup by the same text finds what was kept. PostgreSQL's
/// text cannot hold the byte: there a `published` delivery whose id had
/// one lost its audit entry, and `GET /api/v1/audit?actor=` with one
/// answered 500.
#[tokio::test]
async fn issue19_text_a_client_sends_with_a_nul_byte_is_kept_and_found_alike_on_both_stores() {
    use slipway::store::{AuditEntry, AuditFilter, Hold, ServiceEvent};
    let dir = tempfile::tempdir().unwrap();
    for b in backends(&dir).await {
        let (name, store) = (b.0, b.1.clone());
        let event = NewEvent { key: Some("x\0y".into()), kind: "published\0".into(), payload: "{\"id\":\"x\0y\"}".into() };
        let (id, duplicate) = store.record_event(event.clone()).await.unwrap_or_else(|e| panic!("[{name}] record an event: {e}"));
        assert!(!duplicate, "[{name}]");
        assert_eq!(store.record_event(event).await.unwrap_or_else(|e| panic!("[{name}] {e}")), (id, true), "[{name}] the same key again");
        let found = store.event_by_key("x\0y").await.unwrap_or_else(|e| panic!("[{name}] {e}")).unwrap_or_else(|| panic!("[{name}] not found by its key"));
        assert_eq!((found.id, found.kind.as_str(), found.payload.as_str()), (id, "published\u{FFFD}", "{\"id\":\"x\u{FFFD}y\"}"), "[{name}]");
        assert_eq!(store.events_of_kind("published\0", 10).await.unwrap_or_else(|e| panic!("[{name}] {e}")).len(), 1, "[{name}]");
        assert_eq!(store.events(&["published\0"], 10).await.unwrap_or_else(|e| panic!("[{name}] {e}")).len(), 1, "[{name}]");

        let entry = AuditEntry {
            id: 0,
            at: now_ms(),
            actor: "token a\0b".into(),
            address: "127.0.0.1".into(),
            action: "POST /api/v1/published".into(),
            detail: "published, id x\0y".into(),
            status: 200,
            environment: Some("prod\0".into()),
        };
        store.record_audit(entry).await.unwrap_or_else(|e| panic!("[{name}] record an audit entry: {e}"));
        for filter in [AuditFilter { actor: Some("token a\0b".into()), environment: None }, AuditFilter { actor: None, environment: Some("prod\0".into()) }] {
            let got = store.audit_filtered(&filter, 10).await.unwrap_or_else(|e| panic!("[{name}] {filter:?}: {e}"));
            assert_eq!(got.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(), vec!["published, id x\u{FFFD}y"], "[{name}] {filter:?}");
        }

        let mut new = new_deployment("prod/api", jobs(&[("build", &[])]));
        new.event.key = Some("k\0".into());
        new.hold = Some(Hold { approval: true, requested_by: Some("token a\0b".into()), ..Default::default() });
        let dep = submit(&b, new).await.deployment_id;
        store.set_waiting_for(dep, "an approval from\0").await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(store.approve(dep, "token c\0").await.unwrap_or_else(|e| panic!("[{name}] approve: {e}")), "[{name}]");
        let hold = store.hold(dep).await.unwrap_or_else(|e| panic!("[{name}] {e}")).unwrap_or_else(|| panic!("[{name}] no hold"));
        assert_eq!(
            (hold.approved_by.as_deref(), hold.requested_by.as_deref(), hold.waiting_for.as_deref()),
            (Some("token c\u{FFFD}"), Some("token a\u{FFFD}b"), Some("an approval from\u{FFFD}")),
            "[{name}]"
        );
        assert!(store.drop_waiting(dep, "cancelled by token a\0b", None).await.unwrap_or_else(|e| panic!("[{name}] {e}")), "[{name}]");
        assert_eq!(deployment(&b, dep).await.reason.as_deref(), Some("cancelled by token a\u{FFFD}b"), "[{name}]");

        let kept = ServiceEvent { environment: "prod".into(), service: "api".into(), at: now_ms(), kind: "restarted".into(), message: "exit\0".into() };
        store.record_service_event(kept).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        let got = store.service_events("prod", "api", 10).await.unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert_eq!(got.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), vec!["exit\u{FFFD}"], "[{name}]");
        assert!(store.service_events("prod\0", "api", 10).await.unwrap_or_else(|e| panic!("[{name}] {e}")).is_empty(), "[{name}]");
    }
}

/// Finishes that want a next job for two different nodes in one batch
/// (one store serves one node, so only a test sends this): each node gets
/// a job of its own, running on it. On PostgreSQL the batch is forced by
/// holding the deployment's row while the finishes queue; on SQLite they
/// are sent together and usually share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_finishes_claiming_for_two_nodes_in_one_batch_each_get_a_job_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    for (b, _, url) in backends_with_urls(&dir).await {
        let name = b.0;
        use JobState::*;
        let dep = submit(&b, new_deployment("prod/api", jobs(&[("w", &[]), ("a", &[]), ("b", &[]), ("c", &[1]), ("d", &[2])]))).await.deployment_id;
        assert_eq!(activate(&b, N1).await, vec![dep], "[{name}]");
        let on_1 = claim(&b, N1, 2).await;
        let on_2 = claim(&b, N2, 1).await;
        assert_eq!((names(&on_1), names(&on_2)), (vec!["a", "w"], vec!["b"]), "[{name}]");
        let held = hold_deployment_row(url.as_deref(), dep).await;
        // w's batch waits for the held row; a's and b's queue behind it.
        let store = b.1.clone();
        let w = done(by_name(&on_1, "w"), N1, Outcome::Succeeded);
        let first = tokio::spawn(async move { store.finish(w).await });
        if held.is_some() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let finish = |job: &ClaimedJob, node: &'static str| {
            let (store, f) = (b.1.clone(), done(job, node, Outcome::Succeeded));
            tokio::spawn(async move { store.finish_and_claim(f, node, LEASE).await })
        };
        let (a, bb) = (finish(by_name(&on_1, "a"), N1), finish(by_name(&on_2, "b"), N2));
        release_deployment_row(held, Duration::from_millis(300)).await;
        first.await.unwrap().unwrap_or_else(|e| panic!("[{name}] finish w: {e}"));
        let mut given = Vec::new();
        for (node, task) in [(N1, a), (N2, bb)] {
            let (effect, next) = task.await.unwrap().unwrap_or_else(|e| panic!("[{name}] finish for {node}: {e}"));
            assert!(!effect.stale, "[{name}] {node}'s finish counted");
            let next = next.unwrap_or_else(|| panic!("[{name}] {node}'s slot gets a next job"));
            assert_eq!(job_row(&b, dep, &next.name).await.node.as_deref(), Some(node), "[{name}] {} runs on {node}, which claimed it", next.name);
            given.push(next.name);
        }
        given.sort();
        assert_eq!(given, vec!["c", "d"], "[{name}] each node got one of the released jobs, none twice");
        assert_eq!(job_states(&b, dep).await, states(&[("w", Succeeded), ("a", Succeeded), ("b", Succeeded), ("c", Running), ("d", Running)]), "[{name}]");
    }
}

/// `slipway_write_batch`'s answer to `batch`, called from outside the store.
async fn write_batch(conn: &mut sqlx::AnyConnection, batch: serde_json::Value) -> Option<String> {
    sqlx::query_scalar("SELECT slipway_write_batch($1)").bind(batch.to_string()).fetch_one(conn).await.expect("call slipway_write_batch")
}

/// A successful finish of `job` as `slipway_write_batch` takes it.
fn finish_json(job: &ClaimedJob) -> serde_json::Value {
    serde_json::json!({ "id": job.job_id, "fence": job.fence, "outcome": "succeeded", "exit_code": 0, "reason": null, "takeover": 0,
        "node": N1, "started_at": now_ms(), "want": false })
}

/// On PostgreSQL a common batch that waited for its deployment's row (a
/// cancel, another node's finish) stamps its finish and its next job's
/// lease with the time after the wait, not the time it was sent: the lease
/// is a whole lease, as on the general path, which reads the clock after
/// its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue19_a_common_batch_that_waited_for_the_lock_gets_a_whole_lease() {
    let Some(url) = common::postgres_url().await else { return };
    let b: Backend = ("postgres", slipway::store::open(&url).await.expect("open postgres store"));
    b.1.put_revision(&revision()).await.expect("put_revision");
    let dep = submit(&b, new_deployment("prod/api", jobs(&[("a", &[]), ("b", &[0]), ("c", &[])]))).await.deployment_id;
    assert_eq!(activate(&b, N1).await, vec![dep]);
    let first = claim(&b, N1, 2).await;
    let held = hold_deployment_row(Some(&url), dep).await;
    let store = b.1.clone();
    let a = done(by_name(&first, "a"), N1, Outcome::Succeeded);
    let task = tokio::spawn(async move { store.finish_and_claim(a, N1, LEASE).await });
    let wait = Duration::from_millis(1500);
    release_deployment_row(held, wait).await;
    let released = now_ms();
    let (effect, next) = task.await.unwrap().expect("finish a");
    assert!(!effect.stale);
    assert_eq!(next.expect("a's slot gets b").name, "b");
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    let (finished, lease): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT finished_at FROM jobs WHERE deployment_id = $1 AND name = 'a'), \
         (SELECT lease_until FROM jobs WHERE deployment_id = $1 AND name = 'b')",
    )
    .bind(dep)
    .fetch_one(&mut conn)
    .await
    .expect("read the stamps");
    // Stamped after the wait (less a little for the moment between the
    // row's release and this test reading its clock).
    let slack = 200;
    assert!(finished >= released - slack, "a's finish is stamped after the wait: {finished} < {released} - {slack}");
    assert!(lease >= released + LEASE.as_millis() as i64 - slack, "b's lease runs a whole lease from after the wait: {lease}, released at {released}");
}
