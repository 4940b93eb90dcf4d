//! Config from git, in-process against every store backend: a repository
//! made by the test, commits changing different files, a push webhook and
//! an explicit check; only the jobs whose `files` match (and what needs
//! them) run; a bad commit is rejected and the environment stays on its
//! last good one; `plan --from --to` (the real binary) shows the decision.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;
use slipway::trigger::github::sign;

const SECRET: &str = "git-hook-secret";

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(repo: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (path, text) in files {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

/// The repository's config: each job appends its name to `ran`.
fn repo_config(ran: &Path, broken: bool) -> String {
    repo_config_with(ran, broken, 1)
}

/// … and a managed service `web` (the demo binary) with `instances`.
fn repo_config_with(ran: &Path, broken: bool, instances: u32) -> String {
    let run = |name: &str| format!(r#"command = ["sh", "-c", "echo {name} >> {}"]"#, ran.display());
    format!(
        r#"
[[job]]
name = "nginx"
{}
files = ["nginx/**"]

[[job]]
name = "reload"
{}
needs = ["nginx"]

[[job]]
name = "schema"
{}
files = ["db/*.sql"]

[[job]]
name = "backup"
{}
{}
"#,
        run("nginx"),
        run("reload"),
        run("schema"),
        run("backup"),
        if broken { "needs = [\"nginx-typo\"]" } else { "" }
    ) + &format!(
        r#"
[[service]]
name = "web"
listen = "127.0.0.1:{}"
instances = {instances}
command = ["{}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1 }}
"#,
        web_port(),
        common::demo_bin()
    )
}

/// One port for the test's `web` service, the same in every commit.
fn web_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(common::free_port)
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

/// A notification receiver on 127.0.0.1:0.
async fn receiver() -> (String, Seen) {
    let seen: Seen = Default::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|axum::extract::State(seen): axum::extract::State<Seen>, axum::Json(body): axum::Json<Value>| async move {
                seen.lock().unwrap().push(body)
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

struct Node {
    base: String,
    http: reqwest::Client,
    node: slipway::node::RunningNode,
    dir: tempfile::TempDir,
}

impl Node {
    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.base)).send().await.expect("get").json().await.expect("json")
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).json(&body).send().await.expect("post");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, delivery: &str, branch: &str, after: &str, repo: &Path) -> (u16, Value) {
        let body = json!({ "ref": format!("refs/heads/{branch}"), "after": after, "repository": { "clone_url": format!("{}/", repo.display()), "full_name": "o/config" } }).to_string();
        let r = self
            .http
            .post(format!("{}/hooks/github", self.base))
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign(SECRET.as_bytes(), body.as_bytes()))
            .body(body)
            .send()
            .await
            .expect("push");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn wait_done(&self, id: i64) -> Value {
        common::eventually(Duration::from_secs(30), &format!("deployment {id} to end"), || async {
            let d = self.get(&format!("/api/v1/deployments/{id}")).await;
            if matches!(d["deployment"]["state"].as_str(), Some("queued" | "running" | "waiting")) { Err(d["deployment"].clone()) } else { Ok(d) }
        })
        .await
    }
}

fn ran(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    std::fs::write(path, "").expect("truncate");
    v.sort();
    v
}

// Issue 6: a git repository, two commits changing different files, only the affected jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_config_from_git_runs_only_the_jobs_a_commit_touches() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let repo = tempfile::tempdir().expect("repo");
        let ran_file = scratch.path().join(format!("ran-{backend}"));
        // No commit yet: the node's fetch at start finds no branch.
        git(repo.path(), &["init", "-q", "-b", "main"]);

        let (hook, seen) = receiver().await;
        let secret = scratch.path().join(format!("secret-{backend}"));
        std::fs::write(&secret, SECRET).expect("secret");
        let node_config = format!(
            r#"
[[environment]]
name = "staging"
[environment.git]
url = "{}"
branch = "main"

[secret.hook]
file = "{}"

[github]
webhook_secret = "hook"

[[notify]]
url = "{hook}"
on = ["revision_rejected"]
"#,
            repo.path().display(),
            secret.display()
        );
        let dir = common::config_dir(&node_config, &[]);
        let mut cfg = SchedulerConfig::new("git", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "git-test".into() });
        let http = slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let n = Node { base: format!("http://{}", node.addr), http, node, dir };

        // Before any commit is accepted, a run in staging says why not.
        let (s, e) = n.post("/api/v1/events", json!({"kind": "run", "jobs": ["backup"], "environment": "staging"})).await;
        assert_eq!(s, 409, "{backend}: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("no commit of it is accepted yet"), "{e}");

        // The first commit is the baseline: accepted, nothing runs (the
        // node may have decided so itself already: the answer is the same).
        let c1 = commit(repo.path(), &[("slipway.toml", &repo_config(&ran_file, false)), ("nginx/site.conf", "a"), ("db/001.sql", "create")], "first");
        let (s, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!(s, 200, "{backend}: {r}");
        assert_eq!((r["commit"].as_str(), r["state"].as_str(), r["deployment"].as_i64()), (Some(c1.as_str()), Some("accepted"), None), "{r}");

        // A commit touching nginx/: nginx and reload (which needs it) run.
        let c2 = commit(repo.path(), &[("nginx/site.conf", "b")], "nginx");
        let (s, a) = n.push("d-1", "main", &c2, repo.path()).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let rev = &a["revisions"][0];
        assert_eq!(rev["commit"], c2.as_str(), "{a}");
        assert_eq!(rev["changed"], json!(["nginx/site.conf"]));
        let id = rev["deployment"].as_i64().expect("deployment");
        let d = n.wait_done(id).await;
        assert_eq!(d["deployment"]["state"], "succeeded", "{d}");
        assert_eq!(d["deployment"]["revision"], c2.as_str(), "the revision is the commit");
        assert_eq!(ran(&ran_file), ["nginx", "reload"], "{backend}");
        let jobs: Vec<&str> = d["jobs"].as_array().expect("jobs").iter().filter_map(|j| j["name"].as_str()).collect();
        assert!(!jobs.contains(&"schema") && !jobs.contains(&"backup"), "{jobs:?}");

        // The same push again: nothing new.
        let (s, again) = n.push("d-1", "main", &c2, repo.path()).await;
        assert_eq!(s, 202);
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(again["revisions"][0]["deployment"].as_i64(), Some(id));

        // A commit touching db/: only schema runs.
        let c3 = commit(repo.path(), &[("db/002.sql", "alter")], "db");
        let (s, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["jobs"], json!([{"job": "schema", "why": "db/002.sql changed (files = [\"db/*.sql\"])"}]));
        n.wait_done(r["deployment"].as_i64().expect("deployment")).await;
        assert_eq!(ran(&ran_file), ["schema"]);

        // A broken commit is rejected with the validation errors; staging
        // stays on c3, and what runs there runs against c3.
        let c4 = commit(repo.path(), &[("slipway.toml", &repo_config(&ran_file, true)), ("nginx/site.conf", "c")], "broken");
        let (s, r) = n.push("d-2", "main", &c4, repo.path()).await;
        assert_eq!(s, 202, "{r}");
        let rejected = &r["revisions"][0];
        assert_eq!(rejected["state"], "rejected", "{r}");
        assert!(rejected["errors"].as_str().unwrap_or("").contains("nginx-typo"), "{rejected}");
        assert!(rejected["deployment"].is_null());
        // Reported once, to whoever listens for it.
        common::eventually(Duration::from_secs(20), "the rejection to be notified", || async {
            seen.lock().unwrap().iter().find(|b| b["event"] == "revision.rejected" && b["revision"]["commit"] == c4.as_str()).cloned()
        })
        .await;
        let envs = n.get("/api/v1/environments").await;
        assert_eq!(envs[0]["revision"]["commit"], c3.as_str(), "{envs}");
        assert_eq!(envs[0]["rejected"]["commit"], c4.as_str(), "{envs}");
        let (s, e) = n.post("/api/v1/events", json!({"kind": "run", "jobs": ["backup"], "environment": "staging"})).await;
        assert_eq!(s, 202, "{e}");
        let d = n.wait_done(e["deployment_id"].as_i64().expect("id")).await;
        assert_eq!(d["deployment"]["revision"], c3.as_str());
        assert_eq!(ran(&ran_file), ["backup"]);

        // Fixed: the next commit is compared with the last good one (c3),
        // so the nginx change of the rejected commit runs now.
        let c5 = commit(repo.path(), &[("slipway.toml", &repo_config(&ran_file, false))], "fix");
        let (_, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!((r["commit"].as_str(), r["previous"].as_str()), (Some(c5.as_str()), Some(c3.as_str())), "{r}");
        n.wait_done(r["deployment"].as_i64().expect("deployment")).await;
        assert_eq!(ran(&ran_file), ["nginx", "reload"]);

        // A commit that changes a running service's definition (not its
        // version) rolls it out again, at its version, on the new revision.
        let (s, e) = n.post("/api/v1/events", json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "staging"})).await;
        assert_eq!(s, 202, "{e}");
        assert_eq!(n.wait_done(e["deployment_id"].as_i64().expect("id")).await["deployment"]["state"], "succeeded");
        let c6 = commit(repo.path(), &[("slipway.toml", &repo_config_with(&ran_file, false, 2))], "two web instances");
        let (_, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!((r["commit"].as_str(), r["redeploy"].clone()), (Some(c6.as_str()), json!(["web"])), "{r}");
        // (The gate loop's drift check submits it, within a second or so.)
        let again = common::eventually(Duration::from_secs(10), &format!("{backend}: a redeploy of web on {c6}"), || async {
            let list = n.get("/api/v1/deployments?limit=5").await;
            list.as_array().expect("list").iter().find(|d| d["service"] == "web" && d["revision"] == c6.as_str()).cloned().ok_or(list)
        })
        .await;
        let again = n.wait_done(again["id"].as_i64().expect("id")).await;
        assert_eq!((again["deployment"]["state"].as_str(), again["deployment"]["version"].as_str()), (Some("succeeded"), Some("1.0")), "{again}");
        let services = n.get("/api/v1/services").await;
        assert_eq!(services[0]["instances"].as_array().map(|i| i.len()), Some(2), "{services}");

        // Payload strings that are not branch names never reach git.
        for bad in ["$(touch x)", "../../etc", "-upload-pack=x"] {
            let (s, e) = n.push("d-3", bad, &c5, repo.path()).await;
            assert_eq!(s, 400, "{bad}: {e}");
        }
        // A push to a branch nothing follows changes nothing.
        let (s, a) = n.push("d-4", "feature", &c5, repo.path()).await;
        assert_eq!(s, 202);
        assert!(a["revisions"].as_array().is_some_and(|r| r.is_empty()), "{a}");

        // `plan --from --to` shows the same decision, and a rejection.
        let plan = Command::new(common::slipway_bin())
            .args(["--config"])
            .arg(n.dir.path())
            .args(["plan", "--env", "staging", "--from", &c1[..10], "--to", &c3, "--json"])
            .output()
            .expect("plan");
        assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
        let p: Value = serde_json::from_slice(&plan.stdout).expect("plan json");
        let jobs: Vec<&str> = p["jobs"].as_array().expect("jobs").iter().filter_map(|j| j["job"].as_str()).collect();
        assert_eq!(jobs, ["nginx", "reload", "schema"], "{p}");
        let plan = Command::new(common::slipway_bin())
            .args(["--config"])
            .arg(n.dir.path())
            .args(["plan", "--env", "staging", "--from", &c3, "--to", &c4])
            .output()
            .expect("plan");
        assert_eq!(plan.status.code(), Some(3), "{}", String::from_utf8_lossy(&plan.stderr));
        assert!(String::from_utf8_lossy(&plan.stderr).contains("would be REJECTED"));

        n.node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), n.node.task).await;
    }
}

// Issue 6: `poll` finds a new commit by itself (no webhook, no check); a
// branch that cannot be fetched says so until a fetch succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_polled_branch_is_followed_without_a_webhook() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (_, store) = common::stores(scratch.path()).await.into_iter().next().expect("a store");
    let repo = tempfile::tempdir().expect("repo");
    let ran_file = scratch.path().join("ran");
    let node_config = format!("[[environment]]\nname = \"staging\"\n[environment.git]\nurl = \"{}\"\npoll = \"200ms\"\n", repo.path().display());
    let dir = common::config_dir(&node_config, &[]);
    let mut cfg = SchedulerConfig::new("poll", dir.path().join(".slipway/work"));
    cfg.poll = Duration::from_millis(100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "poll-test".into() });
    let n = Node { base: format!("http://{}", node.addr), http: slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client"), node, dir };
    let newest = |n: &Node| {
        let (base, http) = (n.base.clone(), n.http.clone());
        async move { http.get(format!("{base}/api/v1/environments/staging/revisions")).send().await.expect("get").json::<Value>().await.expect("json")[0].clone() }
    };
    // Not a repository yet: every poll fails, and the environment says so.
    let staging = common::eventually(Duration::from_secs(10), "a failed fetch recorded on staging", || async {
        let staging = n.get("/api/v1/environments").await[0].clone();
        if staging["fetch_error"].is_string() { Ok(staging) } else { Err(staging) }
    })
    .await;
    assert!(staging["fetch_error"].as_str().unwrap_or("").contains("git fetch of main"), "{staging}");
    assert!(staging["fetch_failed_at"].is_i64(), "{staging}");
    git(repo.path(), &["init", "-q", "-b", "main"]);
    let c1 = commit(repo.path(), &[("slipway.toml", &repo_config(&ran_file, false)), ("nginx/site.conf", "a")], "first");
    // The first commit, fetched once the repository exists.
    common::eventually(Duration::from_secs(10), "the first commit to be fetched", || async {
        let newest = newest(&n).await;
        if newest["commit"] == c1.as_str() { Ok(()) } else { Err(newest) }
    })
    .await;
    let staging = n.get("/api/v1/environments").await[0].clone();
    assert!(staging["fetch_error"].is_null(), "a fetch succeeded since: {staging}");
    let c2 = commit(repo.path(), &[("nginx/site.conf", "b")], "nginx");
    let seen = common::eventually(Duration::from_secs(10), "the poll to find the new commit", || async {
        let seen = newest(&n).await;
        if seen["commit"] == c2.as_str() { Ok(seen) } else { Err(seen) }
    })
    .await;
    n.wait_done(seen["deployment"].as_i64().expect("a deployment")).await;
    assert_eq!(ran(&ran_file), ["nginx", "reload"]);
    n.node.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), n.node.task).await;
}

/// What the test's HTTP server saw: path and Authorization header.
type Requests = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

// Issue 6: a private repository's credentials come from a [secret], reach git's HTTP request, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_git_credentials_come_from_a_secret_and_are_never_shown() {
    const TOKEN: &str = "tok-secret-4711";
    let seen: Requests = Default::default();
    let app = axum::Router::new()
        .fallback(|axum::extract::State(seen): axum::extract::State<Requests>, req: axum::extract::Request| async move {
            let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
            seen.lock().unwrap().push((req.uri().to_string(), auth));
            (axum::http::StatusCode::NOT_FOUND, "no such repository")
        })
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let git_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let scratch = tempfile::tempdir().expect("tempdir");
    let (_, store) = common::stores(scratch.path()).await.into_iter().next().expect("a store");
    std::fs::write(scratch.path().join("git-token"), TOKEN).expect("token");
    let node_config = format!(
        "[[environment]]\nname = \"staging\"\n[environment.git]\nurl = \"http://{git_addr}/ops/config.git\"\npassword = \"git_token\"\n\n[secret.git_token]\nfile = \"{}\"\n",
        scratch.path().join("git-token").display()
    );
    let dir = common::config_dir(&node_config, &[]);
    let cfg = SchedulerConfig::new("git-auth", dir.path().join(".slipway/work"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "git-auth-test".into() });
    let n = Node { base: format!("http://{}", node.addr), http: slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client"), node, dir };
    let (s, e) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
    assert_eq!(s, 503, "the repository answers 404: {e}");
    assert!(!e.to_string().contains(TOKEN), "{e}");
    let requests = seen.lock().unwrap().clone();
    let (path, auth) = requests.first().cloned().expect("git asked the server");
    assert!(path.starts_with("/ops/config.git/info/refs"), "{path}");
    let expected = format!("Basic {}", {
        // x-access-token:TOKEN, base64
        let out = Command::new("base64").arg("-w0").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().expect("base64");
        use std::io::Write as _;
        let mut out = out;
        out.stdin.take().expect("stdin").write_all(format!("x-access-token:{TOKEN}").as_bytes()).expect("write");
        String::from_utf8(out.wait_with_output().expect("base64").stdout).expect("utf8")
    });
    assert_eq!(auth.as_deref(), Some(expected.as_str()), "git sent the secret as basic auth");
    let envs = n.get("/api/v1/environments").await;
    assert!(!envs.to_string().contains(TOKEN), "{envs}");
    n.node.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), n.node.task).await;
}

// Issue 6: a commit that changes a service's definition while a promotion of
// it waits (here for its soak) does not lose the promotion: the promotion is
// submitted again on the new commit, same version, still a promotion; no
// redeploy of the older running version supersedes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_definition_change_keeps_a_waiting_promotion() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let repo = tempfile::tempdir().expect("repo");
        git(repo.path(), &["init", "-q", "-b", "main"]);
        let (staging_port, production_port) = (common::free_port(), common::free_port());
        let repo_config = |instances: u32| {
            format!(
                r#"
[[service]]
name = "web"
follows = "ghcr.io/o/web"
auto_deploy = ["staging", "production"]
listen = {{ staging = "127.0.0.1:{staging_port}", production = "127.0.0.1:{production_port}" }}
instances = {instances}
command = ["{}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1 }}
"#,
                common::demo_bin()
            )
        };
        let node_config = format!(
            r#"
[[environment]]
name = "staging"
[environment.git]
url = "{0}"

[[environment]]
name = "production"
promote_from = "staging"
soak = "1h"
[environment.git]
url = "{0}"
"#,
            repo.path().display()
        );
        let c1 = commit(repo.path(), &[("slipway.toml", &repo_config(1))], "first");
        let dir = common::config_dir(&node_config, &[]);
        let mut cfg = SchedulerConfig::new("git", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "git-test".into() });
        let http = slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let n = Node { base: format!("http://{}", node.addr), http, node, dir };
        for env in ["staging", "production"] {
            let (s, r) = n.post(&format!("/api/v1/environments/{env}/revisions/check"), json!(null)).await;
            assert_eq!((s, r["commit"].as_str()), (200, Some(c1.as_str())), "{backend} {env}: {r}");
        }

        // Production runs 0.9 (deployed by hand: soak is for promotions);
        // 1.0 succeeds in staging and its promotion waits for the soak.
        for (env, version) in [("production", "0.9"), ("staging", "1.0")] {
            let (s, e) = n.post("/api/v1/events", json!({"kind": "deploy", "service": "web", "version": version, "environment": env})).await;
            assert_eq!(s, 202, "{backend}: {e}");
            let d = n.wait_done(e["deployment_id"].as_i64().expect("id")).await;
            assert_eq!(d["deployment"]["state"], "succeeded", "{backend}: {d}");
        }
        let waiting = |list: &Value| list.as_array().into_iter().flatten().find(|d| d["environment"] == "production" && d["state"] == "waiting").cloned();
        let promotion = common::eventually(Duration::from_secs(20), &format!("{backend}: the promotion to production to wait"), || async {
            let list = n.get("/api/v1/deployments?limit=20").await;
            waiting(&list).ok_or(list)
        })
        .await;
        assert_eq!((promotion["version"].as_str(), promotion["revision"].as_str()), (Some("1.0"), Some(c1.as_str())), "{promotion}");

        // A commit giving web two instances, decided in production.
        let c2 = commit(repo.path(), &[("slipway.toml", &repo_config(2))], "two instances");
        let (s, r) = n.post("/api/v1/environments/production/revisions/check", json!(null)).await;
        assert_eq!((s, r["commit"].as_str(), r["redeploy"].clone()), (200, Some(c2.as_str()), json!(["web"])), "{backend}: {r}");
        let list = n.get("/api/v1/deployments?limit=20").await;
        let again = waiting(&list).unwrap_or_else(|| panic!("{backend}: the promotion still waits: {list}"));
        assert_ne!(again["id"], promotion["id"], "{backend}: submitted again");
        assert_eq!((again["version"].as_str(), again["revision"].as_str()), (Some("1.0"), Some(c2.as_str())), "{backend}: {again}");
        assert!(again["reason"].as_str().unwrap_or("").contains("soak in staging"), "{backend}: {again}");
        let old = n.get(&format!("/api/v1/deployments/{}", promotion["id"])).await;
        assert_eq!((old["deployment"]["state"].as_str(), &old["deployment"]["superseded_by"]), (Some("superseded"), &again["id"]), "{backend}: {old}");
        assert!(
            !list.as_array().into_iter().flatten().any(|d| d["environment"] == "production" && d["version"] == "0.9" && d["revision"] == c2.as_str()),
            "{backend}: no redeploy of 0.9 superseding the promotion: {list}"
        );

        n.node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), n.node.task).await;
    }
}

// Issue 6: a commit changing a service's definition while a deploy of a newer
// version runs does not undo that deploy: the redeploy comes after it ends,
// at the version it left running (before, it was queued at the older one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_definition_change_during_a_deploy_redeploys_what_that_deploy_left() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let repo = tempfile::tempdir().expect("repo");
        git(repo.path(), &["init", "-q", "-b", "main"]);
        let port = common::free_port();
        // The migration makes a deploy last a few seconds.
        let repo_config = |instances: u32| {
            format!(
                r#"
[[service]]
name = "web"
listen = "127.0.0.1:{port}"
instances = {instances}
migrate = {{ command = ["sleep", "3"] }}
command = ["{}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1 }}
"#,
                common::demo_bin()
            )
        };
        let node_config = format!("[[environment]]\nname = \"staging\"\n[environment.git]\nurl = \"{}\"\n", repo.path().display());
        let c1 = commit(repo.path(), &[("slipway.toml", &repo_config(1))], "first");
        let dir = common::config_dir(&node_config, &[]);
        let mut cfg = SchedulerConfig::new("git", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "git-test".into() });
        let http = slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let n = Node { base: format!("http://{}", node.addr), http, node, dir };
        let (s, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!((s, r["commit"].as_str()), (200, Some(c1.as_str())), "{backend}: {r}");
        let deploy =
            |version: &'static str| n.post("/api/v1/events", json!({"kind": "deploy", "service": "web", "version": version, "environment": "staging"}));
        let (_, e) = deploy("1.0").await;
        assert_eq!(n.wait_done(e["deployment_id"].as_i64().expect("id")).await["deployment"]["state"], "succeeded", "{backend}");

        // 2.0 is running (in its migration) when a commit gives web two instances.
        let (_, e) = deploy("2.0").await;
        let newer = e["deployment_id"].as_i64().expect("id");
        common::eventually(Duration::from_secs(10), &format!("{backend}: deployment {newer} to run"), || async {
            let d = n.get(&format!("/api/v1/deployments/{newer}")).await["deployment"].clone();
            if d["state"] == "running" { Ok(()) } else { Err(d) }
        })
        .await;
        let c2 = commit(repo.path(), &[("slipway.toml", &repo_config(2))], "two instances");
        let (_, r) = n.post("/api/v1/environments/staging/revisions/check", json!(null)).await;
        assert_eq!((r["commit"].as_str(), r["redeploy"].clone()), (Some(c2.as_str()), json!(["web"])), "{backend}: {r}");
        assert_eq!(n.wait_done(newer).await["deployment"]["state"], "succeeded", "{backend}");

        // Then the redeploy, on c2, at 2.0.
        let again = common::eventually(Duration::from_secs(10), &format!("{backend}: the redeploy on {c2}"), || async {
            let list = n.get("/api/v1/deployments?limit=10").await;
            list.as_array().expect("list").iter().find(|d| d["revision"] == c2.as_str()).cloned().ok_or(list)
        })
        .await;
        assert_eq!(again["version"], "2.0", "{backend}: the redeploy is at what the running deploy left: {again}");
        let done = n.wait_done(again["id"].as_i64().expect("id")).await;
        assert_eq!(done["deployment"]["state"], "succeeded", "{backend}: {done}");
        let services = n.get("/api/v1/services").await;
        assert_eq!((services[0]["version"].as_str(), services[0]["instances"].as_array().map(|i| i.len())), (Some("2.0"), Some(2)), "{backend}: {services}");
        // Once per commit: nothing more follows. Scenario, not a wait for
        // a condition: a second redeploy would come within the gate loop's
        // second, so let it have the chance.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let list = n.get("/api/v1/deployments?limit=10").await;
        assert_eq!(list.as_array().expect("list").iter().filter(|d| d["revision"] == c2.as_str()).count(), 1, "{backend}: {list}");

        n.node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), n.node.task).await;
    }
}
