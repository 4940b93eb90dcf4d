//! Gates and promotion in-process, against every store backend: a managed
//! service (the demo binary) in staging and production on one node;
//! production promotes from staging after a soak time and an approval,
//! the approval needs the approver role for production, a waiting
//! deployment is notified, a version that leaves staging is not promoted,
//! and a deploy outside the deploy window waits and says why.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use common::Api;
use serde_json::{Value, json};
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;

const SOAK_MS: i64 = 4000;

type Seen = Arc<Mutex<Vec<Value>>>;

async fn receiver() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(|State(seen): State<Seen>, Json(body): Json<Value>| async move { seen.lock().unwrap().push(body) }))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

/// Lookups of this file's own on the shared test client.
trait Lookups {
    async fn deployment_of(&self, env: &str, version: &str, token: &str) -> Value;
    async fn production(&self, version: &str, token: &str) -> Value;
}

impl Lookups for Api {
    /// The deployment of `version` in `env`, once there is one.
    async fn deployment_of(&self, env: &str, version: &str, token: &str) -> Value {
        common::eventually(Duration::from_secs(15), &format!("a deployment of {version} in {env}"), || async {
            let (_, list) = self.call("GET", "/api/v1/deployments?limit=50", Some(token), None).await;
            list.as_array().into_iter().flatten().find(|d| d["environment"] == env && d["version"] == version).cloned()
        })
        .await
    }

    /// The production deployment of `version`, once there is one.
    async fn production(&self, version: &str, token: &str) -> Value {
        self.deployment_of("production", version, token).await
    }
}

fn hello(port: u16) -> Option<String> {
    let out = std::process::Command::new("curl").args(["-sf", "--max-time", "5", &format!("http://127.0.0.1:{port}/")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// Issue 6: promotion with approval and soak time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_production_promotes_from_staging_after_soak_and_approval() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let (hook, seen) = receiver().await;
        let (staging_port, production_port) = (common::free_port(), common::free_port());
        let demo = common::demo_bin();
        // A window that is closed now: two hours from now, one hour long.
        let hour = (SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() / 3600 + 2) % 24;
        let config = format!(
            r#"
[[environment]]
name = "staging"

[[environment]]
name = "production"
promote_from = "staging"
soak = "{SOAK_MS}ms"
approval = true

[[environment]]
name = "weekend"
windows = ["{hour:02}:00-{:02}:00"]

[[service]]
name = "web"
follows = "ghcr.io/o/web"
auto_deploy = ["staging", "production"]
listen = {{ staging = "127.0.0.1:{staging_port}", production = "127.0.0.1:{production_port}", weekend = "127.0.0.1:{}" }}
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1, deadline = "10s" }}

[[notify]]
url = "{hook}"
on = ["waiting"]
"#,
            (hour + 1) % 24,
            common::free_port()
        );
        let dir = common::config_dir(&config, &[]);
        let mut cfg = SchedulerConfig::new("gates", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "gates-test".into() });
        let api = Api::new(&format!("http://{}", node.addr));
        let (_, admin) = api.call("POST", "/api/v1/tokens", None, Some(json!({"name": "root", "roles": {"*": "admin"}}))).await;
        let admin = admin["token"].as_str().expect("admin token").to_string();
        let token = |name: &'static str, roles: Value| {
            let (api, admin) = (&api, admin.clone());
            async move {
                api.call("POST", "/api/v1/tokens", Some(&admin), Some(json!({"name": name, "roles": roles}))).await.1["token"]
                    .as_str()
                    .expect("token")
                    .to_string()
            }
        };
        let alice = token("alice", json!({"production": "approver"})).await;
        let bob = token("bob", json!({"staging": "deployer", "production": "deployer"})).await;

        // 1.0 is published: it deploys to staging by itself, and not to
        // production, though auto_deploy names it: production takes
        // versions by promotion, waiting for the soak and an approval, and
        // says so.
        let (s, a) = api.call("POST", "/api/v1/published", Some(&bob), Some(json!({"image": "ghcr.io/o/web", "version": "1.0"}))).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let result =
            |env: &str| a["results"].as_array().into_iter().flatten().find(|r| r["environment"] == env).cloned().unwrap_or_else(|| panic!("{env}: {a}"));
        assert_eq!(result("production")["held"], "production takes versions by promotion from staging: promoted there once it has succeeded in staging", "{a}");
        assert!(result("production")["deployment_id"].is_null(), "{a}");
        let staged = api.wait_state(result("staging")["deployment_id"].as_i64().expect("id"), Some(&admin), &["succeeded", "failed", "rolled_back"]).await;
        assert_eq!(staged["state"], "succeeded", "{staged}");
        let p = api.production("1.0", &admin).await;
        let pid = p["id"].as_i64().expect("id");
        assert_eq!(p["state"], "waiting", "{p}");
        let reason = p["reason"].as_str().unwrap_or("");
        assert!(reason.starts_with("waiting for approval by an approver of production; soak in staging until"), "{reason}");
        let (_, pending) = api.call("GET", "/api/v1/approvals", Some(&alice), None).await;
        assert_eq!(pending[0]["deployment"]["id"].as_i64(), Some(pid), "{pending}");
        assert_eq!(pending[0]["source_environment"], "staging");
        assert_eq!(pending[0]["not_before"].as_i64(), Some(staged["finished_at"].as_i64().expect("finished") + SOAK_MS));
        common::eventually(Duration::from_secs(20), "the waiting notification", || async {
            seen.lock().unwrap().iter().find(|b| b["event"] == "deployment.waiting" && b["deployment"]["id"].as_i64() == Some(pid)).cloned()
        })
        .await;

        // Only an approver of production may approve; deployers may not.
        let (s, e) = api.call("POST", &format!("/api/v1/deployments/{pid}/approve"), Some(&bob), None).await;
        assert_eq!(s, 403, "{e}");
        let (s, a) = api.call("POST", &format!("/api/v1/deployments/{pid}/approve"), Some(&alice), None).await;
        assert_eq!(s, 200, "{a}");
        assert_eq!(a["approved_by"], "token alice");
        let (s, _) = api.call("POST", &format!("/api/v1/deployments/{pid}/approve"), Some(&alice), None).await;
        assert_eq!(s, 409, "approved twice");

        // It starts once the soak is over, not before, and production
        // serves 1.0 on its own address (staging keeps its own).
        let done = api.wait_state(pid, Some(&admin), &["succeeded", "failed", "rolled_back", "cancelled"]).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        // Issue 18: named as what it was (the gate loop's promotion).
        assert_eq!(done["cause"], "promotion from staging", "{done}");
        assert!(done["started_at"].as_i64().expect("started") >= staged["finished_at"].as_i64().expect("finished") + SOAK_MS, "{done} vs {staged}");
        assert!(hello(production_port).is_some_and(|b| b.contains("1.0")), "production");
        assert!(hello(staging_port).is_some_and(|b| b.contains("1.0")), "staging");

        // 2.0 reaches staging and waits for production; staging rolls back
        // to 1.0, so 2.0 is not promoted, and says why.
        let (_, a) =
            api.call("POST", "/api/v1/events", Some(&bob), Some(json!({"kind": "deploy", "service": "web", "version": "2.0", "environment": "staging"}))).await;
        api.wait_state(a["deployment_id"].as_i64().expect("id"), Some(&admin), &["succeeded"]).await;
        let p2 = api.production("2.0", &admin).await;
        assert_eq!(p2["state"], "waiting", "{p2}");
        let (s, r) = api.call("POST", "/api/v1/services/staging/web/rollback", Some(&bob), None).await;
        assert_eq!(s, 202, "{r}");
        api.wait_state(r["deployment_id"].as_i64().expect("id"), Some(&admin), &["succeeded"]).await;
        let dropped = api.wait_state(p2["id"].as_i64().expect("id"), Some(&admin), &["cancelled"]).await;
        assert_eq!(dropped["reason"], "not promoted: staging no longer runs 2.0 (it runs 1.0)", "{dropped}");

        // `promote` by hand: the version staging runs, with the same gates.
        let (s, e) = api.call("POST", "/api/v1/services/production/web/promote", Some(&bob), Some(json!({"from": "weekend"}))).await;
        assert_eq!(s, 400, "production promotes from staging only: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("promotes from staging, not from weekend"), "{e}");
        let (s, a) = api.call("POST", "/api/v1/services/production/web/promote", Some(&bob), Some(json!({"from": "staging"}))).await;
        assert_eq!(s, 202, "{a}");
        let manual = api.deployment(a["deployment_id"].as_i64().expect("id"), Some(&admin)).await;
        assert_eq!((manual["version"].as_str(), manual["state"].as_str()), (Some("1.0"), Some("waiting")), "{manual}");
        assert_eq!(manual["cause"], "promotion from staging", "a promotion asked for by hand: {manual}");
        let (s, _) = api.call("POST", &format!("/api/v1/deployments/{}/cancel", manual["id"]), Some(&bob), None).await;
        assert_eq!(s, 202);
        assert_eq!(api.deployment(manual["id"].as_i64().expect("id"), Some(&admin)).await["reason"], "cancelled while waiting");

        // Four eyes: whoever asks for a deployment cannot approve it, even
        // an admin.
        let (_, a) = api
            .call("POST", "/api/v1/events", Some(&admin), Some(json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "production"})))
            .await;
        let own = a["deployment_id"].as_i64().expect("id");
        let (s, e) = api.call("POST", &format!("/api/v1/deployments/{own}/approve"), Some(&admin), None).await;
        assert_eq!(s, 403, "{e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("another approver"), "{e}");
        let (s, _) = api.call("POST", &format!("/api/v1/deployments/{own}/approve"), Some(&alice), None).await;
        assert_eq!(s, 200);
        api.wait_state(own, Some(&admin), &["succeeded"]).await;

        // The config changes while a deployment waits: when its gates pass
        // it is submitted again on the current revision (keeping its
        // approval), never rolling out the config it was submitted with.
        let (_, a) = api
            .call("POST", "/api/v1/events", Some(&bob), Some(json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "production"})))
            .await;
        let stale = api.deployment(a["deployment_id"].as_i64().expect("id"), Some(&admin)).await;
        assert_eq!(stale["state"], "waiting", "{stale}");
        let path = dir.path().join("slipway.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, format!("{text}\n# edited while a deployment waited\n")).expect("edit");
        let (s, _) = api.call("POST", &format!("/api/v1/deployments/{}/approve", stale["id"]), Some(&alice), None).await;
        assert_eq!(s, 200);
        let old = api.wait_state(stale["id"].as_i64().expect("id"), Some(&admin), &["superseded", "cancelled"]).await;
        let again = old["superseded_by"].as_i64().unwrap_or_else(|| panic!("submitted again: {old}"));
        let fresh = api.wait_state(again, Some(&admin), &["succeeded", "failed", "rolled_back"]).await;
        assert_eq!(fresh["state"], "succeeded", "{fresh}");
        assert_ne!(fresh["revision"], stale["revision"], "the current config, not the one it waited with");

        // Outside its deploy window a deploy waits and says when it opens.
        let (_, a) = api
            .call("POST", "/api/v1/events", Some(&admin), Some(json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "weekend"})))
            .await;
        let w = api.deployment(a["deployment_id"].as_i64().expect("id"), Some(&admin)).await;
        assert_eq!(w["state"], "waiting", "{w}");
        let reason = w["reason"].as_str().unwrap_or("");
        assert!(reason.starts_with(&format!("waiting for the deploy window of weekend ({hour:02}:00-")) && reason.contains("next opens"), "{reason}");
        let (_, why) = api.call("GET", "/api/v1/services/weekend/web/why", Some(&admin), None).await;
        assert!(why["verdict"].as_str().unwrap_or("").contains("deploy window"), "{why}");

        node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), node.task).await;
    }
}

// Issue 6: a promotion chain of three environments. A version that succeeds
// in staging is promoted to production, and, once it succeeds there, on to
// dr, each step from the one before, with the same digest-less version, and
// each after the previous finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_version_is_promoted_along_a_chain_of_three_environments() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let ports = [common::free_port(), common::free_port(), common::free_port()];
        let config = format!(
            r#"
[[environment]]
name = "staging"

[[environment]]
name = "production"
promote_from = "staging"

[[environment]]
name = "dr"
promote_from = "production"

[[service]]
name = "web"
follows = "ghcr.io/o/web"
auto_deploy = ["staging", "production", "dr"]
listen = {{ staging = "127.0.0.1:{}", production = "127.0.0.1:{}", dr = "127.0.0.1:{}" }}
command = ["{}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1 }}
"#,
            ports[0],
            ports[1],
            ports[2],
            common::demo_bin()
        );
        let dir = common::config_dir(&config, &[]);
        let mut cfg = SchedulerConfig::new("chain", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "chain-test".into() });
        let api = Api::new(&format!("http://{}", node.addr));
        let (_, admin) = api.call("POST", "/api/v1/tokens", None, Some(json!({"name": "root", "roles": {"*": "admin"}}))).await;
        let admin = admin["token"].as_str().expect("admin token").to_string();

        let (s, a) = api
            .call("POST", "/api/v1/events", Some(&admin), Some(json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "staging"})))
            .await;
        assert_eq!(s, 202, "{backend}: {a}");
        let mut finished_before = 0;
        let mut source = (String::new(), a["deployment_id"].as_i64().expect("id"));
        for env in ["staging", "production", "dr"] {
            // The deployment of 1.0 in `env` (staging's is the one asked for).
            let id = api.deployment_of(env, "1.0", &admin).await["id"].as_i64().expect("id");
            let d = api.wait_state(id, Some(&admin), &["succeeded", "failed", "rolled_back", "cancelled", "superseded"]).await;
            assert_eq!(d["state"], "succeeded", "{backend} {env}: {d}");
            assert!(d["started_at"].as_i64().unwrap_or(0) >= finished_before, "{backend} {env} started before the step before it finished: {d}");
            finished_before = d["finished_at"].as_i64().expect("finished");
            if env != "staging" {
                // `why` tells where it came from.
                let (_, why) = api.call("GET", &format!("/api/v1/services/{env}/web/why"), Some(&admin), None).await;
                let verdict = why["verdict"].as_str().unwrap_or("");
                assert!(verdict.ends_with(&format!("deployed by deployment #{id}, promoted from {} #{}", source.0, source.1)), "{backend} {env}: {why}");
            }
            source = (env.to_string(), id);
        }
        for (port, env) in ports.iter().zip(["staging", "production", "dr"]) {
            assert!(hello(*port).is_some_and(|b| b.contains("1.0")), "{backend}: {env} serves 1.0");
        }
        // Exactly one deployment per environment: nothing promoted twice.
        let (_, list) = api.call("GET", "/api/v1/deployments?limit=20", Some(&admin), None).await;
        assert_eq!(list.as_array().map(|l| l.len()), Some(3), "{backend}: {list}");

        node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), node.task).await;
    }
}
