//! Registry tag retention against Debian's real docker-registry (deletes
//! enabled): images pushed by the test over the registry's HTTP API (no
//! Docker Engine needed), what environments run recorded in the store, the
//! dry run through `slipway plan`, the API and the CLI, then `--apply`
//! and the registry itself asked what is left. Also basic auth, refused
//! credentials, an unreachable registry, and `keep_tags` validation.

mod common;
#[path = "common/docker.rs"]
mod dockerkit;
#[path = "common/push.rs"]
mod push;

use push::Pusher;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;
use slipway::store::{ServiceRow, Store};

/// A node in-process on the config in `dir`, with `store`.
async fn node(dir: &Path, store: Arc<dyn Store>) -> (slipway::node::RunningNode, String) {
    let mut cfg = SchedulerConfig::new("retention", dir.join(".slipway/work"));
    cfg.poll = Duration::from_millis(100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = start_node(NodeOptions { config_path: dir.join("slipway.toml"), store, scheduler: cfg, listener, scope: "retention-test".into() });
    let base = format!("http://{}", node.addr);
    (node, base)
}

async fn stop(node: slipway::node::RunningNode) {
    node.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
}

/// The real binary, as a person runs it (blocking: run it off the runtime).
async fn slipway(dir: &Path, server: &str, args: &[&str]) -> (i32, String, String) {
    let (dir, server) = (dir.to_path_buf(), server.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(common::slipway_bin())
            .arg("--config")
            .arg(&dir)
            .arg("--server")
            .arg(&server)
            .args(&args)
            .env_remove("SLIPWAY_STORE")
            .output()
            .expect("run slipway");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    })
    .await
    .expect("join")
}

/// What a finished rollout records (the store keeps the version before
/// as the one to roll back to).
fn service_row(env: &str, service: &str, version: &str) -> ServiceRow {
    ServiceRow {
        environment: env.into(),
        service: service.into(),
        version: version.into(),
        previous_version: None,
        // Only the record of what runs matters to retention.
        spec: "{}".into(),
        revision: "r".into(),
        deployment_id: 1,
        updated_at: 0,
        artifact_dir: None,
        sha256: None,
        previous_sha256: None,
        target_ref: None,
    }
}

fn repo_of(v: &Value) -> &Value {
    &v["repositories"][0]
}

fn kept(v: &Value) -> Vec<(String, String)> {
    repo_of(v)["kept"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| {
            (
                k["tag"].as_str().unwrap_or("").to_string(),
                k["reasons"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect::<Vec<_>>().join("; "),
            )
        })
        .collect()
}

fn to_delete(v: &Value) -> BTreeSet<String> {
    repo_of(v)["delete"].as_array().into_iter().flatten().filter_map(|d| d["digest"].as_str().map(str::to_string)).collect()
}

// Issue 6, retention: newest N kept, what production runs and could roll
// back to kept, a digest shared with a kept tag kept, the rest deleted by
// digest — only with --apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_retention_keeps_newest_and_protected_tags_and_deletes_the_rest_by_digest() {
    let reg = dockerkit::Registry::start();
    let p = Pusher::new(&reg);
    let a = p.image("2024-01-01T00:00:00Z", &["0.9.0"]).await;
    let b = p.image("2024-01-02T00:00:00Z", &["1.0.0", "stable"]).await;
    let c = p.image("2024-01-03T00:00:00Z", &["1.1.0"]).await;
    let d = p.image("2024-01-04T00:00:00.123456789Z", &["1.1.1", "1.1"]).await;
    let e = p.image("2024-01-05T00:00:00Z", &["1.2.0", "old-build"]).await;
    let f = p.image("2024-01-06T00:00:00Z", &["1.3.0"]).await;

    let config = format!(
        r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[[service]]
name = "worker"
follows = "{}"
keep_tags = 2

[[job]]
name = "deploy-worker"
service = "worker"
command = ["true"]
"#,
        reg.repo()
    );
    let dir = common::config_dir(&config, &[]);
    let url = slipway::cli::serve::store_url(None, None, dir.path());
    std::fs::create_dir_all(dir.path().join(".slipway")).expect("mkdir");
    let store = slipway::store::open(&url).await.expect("store");
    // Production ran 0.9.0, then 1.0.0: it runs 1.0.0 and could roll
    // back to 0.9.0, both old. (Recorded as a rollout records them.)
    for version in ["0.9.0", "1.0.0"] {
        store.set_service(service_row("production", "worker", version)).await.expect("record");
    }

    // `slipway plan` shows the dry run (it reads the same store).
    let (code, out, err) = slipway(dir.path(), "http://127.0.0.1:9", &["plan", "--env", "production"]).await;
    assert_eq!(code, 0, "plan: {out}{err}");
    assert!(out.contains("retention (dry run"), "{out}");
    for line in
        ["would delete", "1.1.0", "1.1.1, 1.1", "production runs it", "production could roll back to it", "newest 2", "shares its digest with kept tag 1.0.0"]
    {
        assert!(out.contains(line), "plan lacks {line:?}:\n{out}");
    }
    // … and `plan --json` has the same dry run, as the API shapes it.
    let (code, out, err) = slipway(dir.path(), "http://127.0.0.1:9", &["--json", "plan", "--env", "production"]).await;
    assert_eq!(code, 0, "plan --json: {out}{err}");
    let planned: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("plan --json: {e}: {out}"));
    assert!(planned["jobs"].is_array(), "{planned:#}");
    assert_eq!(planned["retention"]["applied"], false, "{planned:#}");
    assert_eq!(to_delete(&planned["retention"]), BTreeSet::from([c.clone(), d.clone()]), "{planned:#}");

    let (n, base) = node(dir.path(), store.clone()).await;
    let http = slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client");

    // The API's dry run: the right ones, for the right reasons; nothing gone.
    let v: Value = http.get(format!("{base}/api/v1/retention")).send().await.expect("get").json().await.expect("json");
    assert_eq!(v["applied"], false);
    assert!(repo_of(&v)["errors"].as_array().is_some_and(|e| e.is_empty()), "{v:#}");
    assert_eq!(to_delete(&v), BTreeSet::from([c.clone(), d.clone()]), "{v:#}");
    let k = kept(&v);
    let tags: Vec<&str> = k.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tags, vec!["1.3.0", "1.2.0", "old-build", "1.0.0", "stable", "0.9.0"], "{v:#}");
    assert_eq!(k[0].1, "newest 2");
    assert_eq!(k[2].1, "shares its digest with kept tag 1.2.0");
    assert_eq!(k[3].1, "production runs it");
    assert_eq!(k[4].1, "shares its digest with kept tag 1.0.0");
    assert_eq!(k[5].1, "production could roll back to it");
    let d_tags: Vec<&str> = repo_of(&v)["delete"][0]["tags"].as_array().expect("tags").iter().filter_map(|t| t.as_str()).collect();
    assert_eq!(d_tags, vec!["1.1.1", "1.1"]);
    for digest in [&a, &b, &c, &d, &e, &f] {
        assert_eq!(p.manifest_status(digest).await, 200, "the dry run deleted {digest}");
    }

    // The CLI's dry run says the same, and deletes nothing.
    let (code, out, err) = slipway(dir.path(), &base, &["retention"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would delete") && out.contains("slipway retention --apply"), "{out}");
    assert_eq!(p.manifest_status(&c).await, 200);

    // Apply: the two digests are gone, everything kept is still there.
    let (code, out, err) = slipway(dir.path(), &base, &["retention", "--apply"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("deleted") && !out.contains("would delete"), "{out}");
    for digest in [&c, &d] {
        assert_eq!(p.manifest_status(digest).await, 404, "{digest} should be deleted:\n{out}");
    }
    for digest in [&a, &b, &e, &f] {
        assert_eq!(p.manifest_status(digest).await, 200, "{digest} should be kept:\n{out}");
    }
    let left = p.tags().await;
    for t in ["0.9.0", "1.0.0", "stable", "1.2.0", "old-build", "1.3.0"] {
        assert!(left.contains(t), "{t} gone: {left:?}");
    }

    // Audited, by what it did.
    let audit: Value = http.get(format!("{base}/api/v1/audit")).send().await.expect("audit").json().await.expect("json");
    let text = audit.to_string();
    assert!(text.contains("retention --apply: 2 of 2 manifest(s) deleted"), "{audit:#}");

    // Again: nothing left to delete (tags the registry still lists for a
    // deleted manifest, if any, are skipped, not errors).
    let v: Value = http.post(format!("{base}/api/v1/retention")).send().await.expect("post").json().await.expect("json");
    assert!(to_delete(&v).is_empty() && repo_of(&v)["errors"].as_array().is_some_and(|e| e.is_empty()), "{v:#}");

    stop(n).await;
}

// Basic auth: the registry's credentials come from [[registry]] (a secret
// file, read at use); wrong ones give a clear error naming the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_retention_with_basic_auth_and_refused_credentials() {
    let reg = dockerkit::Registry::start_with_auth("deployer", "s3cret-pw");
    let p = Pusher::new(&reg);
    let old = p.image("2024-02-01T00:00:00Z", &["1.0.0"]).await;
    let mid = p.image("2024-02-02T00:00:00Z", &["1.1.0"]).await;
    let new = p.image("2024-02-03T00:00:00Z", &["1.2.0"]).await;

    let secrets = tempfile::tempdir().expect("tempdir");
    let pw = secrets.path().join("registry-password");
    std::fs::write(&pw, "s3cret-pw\n").expect("secret");
    let config = format!(
        r#"
[secret.registry]
file = "{}"

[[registry]]
host = "127.0.0.1:{}"
username = "deployer"
password = "registry"

[[service]]
name = "shop"
follows = "{}"
keep_tags = 1

[[job]]
name = "deploy-shop"
service = "shop"
command = ["true"]
"#,
        pw.display(),
        reg.port,
        reg.repo()
    );
    let dir = common::config_dir(&config, &[]);
    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.expect("store");
    let (n, base) = node(dir.path(), store).await;
    let http = slipway::http::builder().timeout(Duration::from_secs(30)).build().expect("client");

    let v: Value = http.post(format!("{base}/api/v1/retention")).send().await.expect("post").json().await.expect("json");
    assert_eq!(v["applied"], true);
    assert_eq!(to_delete(&v), BTreeSet::from([old.clone(), mid.clone()]), "{v:#}");
    assert!(repo_of(&v)["delete"].as_array().expect("delete").iter().all(|d| d["deleted"] == true), "{v:#}");
    assert_eq!(p.manifest_status(&old).await, 404);
    assert_eq!(p.manifest_status(&mid).await, 404);
    assert_eq!(p.manifest_status(&new).await, 200);

    // A rotated-away password: refused, said so, naming the registry and
    // the user, never the password; nothing else happens.
    std::fs::write(&pw, "wrong-password\n").expect("secret");
    let v: Value = http.get(format!("{base}/api/v1/retention")).send().await.expect("get").json().await.expect("json");
    let errors = repo_of(&v)["errors"].to_string();
    assert!(errors.contains(&format!("registry 127.0.0.1:{} refused the credentials of user \\\"deployer\\\" (HTTP 401)", reg.port)), "{v:#}");
    assert!(!v.to_string().contains("wrong-password"), "{v:#}");
    let (code, out, err) = slipway(dir.path(), &base, &["retention"]).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains(&format!("error: registry 127.0.0.1:{} refused", reg.port)), "{out}{err}");
    assert_eq!(p.manifest_status(&new).await, 200);
    stop(n).await;
}

// A registry that is down: `plan` says so in one line and succeeds;
// `retention` fails with the registry named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue6_an_unreachable_registry_is_one_line_in_plan_and_an_error_in_retention() {
    let port = common::free_port();
    let config = format!(
        r#"
[[service]]
name = "worker"
follows = "127.0.0.1:{port}/team/worker"
keep_tags = 3

[[job]]
name = "deploy-worker"
service = "worker"
command = ["true"]
"#
    );
    let dir = common::config_dir(&config, &[]);
    let (code, out, err) = slipway(dir.path(), "http://127.0.0.1:9", &["plan"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(&format!("127.0.0.1:{port}"))).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains(&format!("not planned: registry 127.0.0.1:{port} cannot be reached")), "{out}");
    let (code, out, err) = slipway(dir.path(), "http://127.0.0.1:9", &["--json", "plan"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let p: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("plan --json: {e}: {out}"));
    let errors = p["retention"]["repositories"][0]["errors"].to_string();
    assert!(errors.contains(&format!("registry 127.0.0.1:{port} cannot be reached")), "{p:#}");

    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.expect("store");
    let (n, base) = node(dir.path(), store).await;
    let (code, out, err) = slipway(dir.path(), &base, &["retention", "--apply"]).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains(&format!("error: registry 127.0.0.1:{port} cannot be reached")), "{out}{err}");
    stop(n).await;
}

fn problems(text: &str) -> Vec<String> {
    match slipway::config::parse("slipway.toml", text) {
        Ok(_) => vec![],
        Err(e) => e.reports().into_iter().map(|r| format!("{}:{} {}", r.line.unwrap_or(0), r.column.unwrap_or(0), r.message)).collect(),
    }
}

#[test]
fn keep_tags_is_only_for_registry_backed_services_and_within_range() {
    let p = problems("[[service]]\nname = \"api\"\nkeep_tags = 5\n");
    assert_eq!(p, vec!["3:13 service \"api\" has `keep_tags` but no registry image whose tags it could keep"]);
    let p = problems(
        "[[service]]\nname = \"api\"\nfollows = \"reg.example.org/api\"\nkeep_tags = 0\n\n[[service]]\nname = \"b\"\nfollows = \"reg.example.org/b\"\nkeep_tags = 10001\n",
    );
    assert_eq!(p, vec!["4:13 `keep_tags` must be between 1 and 10000, not 0", "9:13 `keep_tags` must be between 1 and 10000, not 10001"]);
    let p = problems("[[service]]\nname = \"api\"\nfollows = \"reg.example.org/api\"\nkeep_tag = 3\n");
    assert_eq!(p, vec!["4:1 unknown key `keep_tag` in [[service]]"]);
    assert!(problems("[[service]]\nname = \"api\"\nfollows = \"reg.example.org/api\"\nkeep_tags = 10000\n").is_empty());
    let c = slipway::config::parse(
        "slipway.toml",
        "[[service]]\nname = \"shop\"\ntarget = \"docker\"\nimage = \"reg.example.org/shop\"\nport = 80\nlisten = \"127.0.0.1:8090\"\nkeep_tags = 20\n",
    )
    .expect("valid");
    assert_eq!(c.services[0].keep_tags, Some(20));
}
