//! `POST /hooks/github` in-process, against every store backend: GitHub's
//! sample deliveries (tests/fixtures/github) with good, bad and missing
//! signatures, a redelivery, opt-in per environment, the tag filter,
//! injection strings, the payload limit.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;
use slipway::trigger::github::sign;

const SECRET: &str = "hook-secret-5521";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/github/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

/// GitHub's sample package delivery, with `tag` as its tag (the sample's
/// is empty).
fn published(tag: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_str(&fixture("registry-package-published-docker.json")).expect("json");
    let pv = &mut v["registry_package"]["package_version"];
    pv["container_metadata"]["tag"]["name"] = Value::String(tag.into());
    pv["package_url"] = Value::String(format!("ghcr.io/Codertocat/hello-world:{tag}"));
    serde_json::to_vec(&v).expect("json")
}

struct Hooks {
    base: String,
    http: reqwest::Client,
    node: slipway::node::RunningNode,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Hooks {
    async fn start(store: std::sync::Arc<dyn slipway::store::Store>) -> Hooks {
        Hooks::start_with(store, "").await
    }

    /// [`Hooks::start`] with `extra` appended to the config.
    async fn start_with(store: std::sync::Arc<dyn slipway::store::Store>, extra: &str) -> Hooks {
        let secrets = tempfile::tempdir().expect("tempdir");
        std::fs::write(secrets.path().join("hook"), SECRET).expect("secret");
        let config = format!(
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[secret.hook]
file = "{}"

[github]
webhook_secret = "hook"
max_payload = 65536

[events]
hmac_secret = "hook"
environments = ["staging"]

[registry_hook]
token = "hook"
hosts = ["ghcr.io"]

[[service]]
name = "web"
follows = "ghcr.io/codertocat/hello-world"
auto_deploy = ["staging"]
tags = "semver"

[[job]]
name = "deploy-web"
service = "web"
command = ["true"]
{}"#,
            secrets.path().join("hook").display(),
            extra
        );
        let dir = common::config_dir(&config, &[]);
        let mut cfg = SchedulerConfig::new("hooks", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "hooks-test".into() });
        let http = slipway::http::builder().timeout(Duration::from_secs(20)).pool_max_idle_per_host(0).build().expect("client");
        Hooks { base: format!("http://{}", node.addr), http, node, _dirs: (dir, secrets) }
    }

    async fn deliver(&self, event: &str, delivery: &str, body: &[u8], signature: Option<String>) -> (u16, Value) {
        let mut r =
            self.http.post(format!("{}/hooks/github", self.base)).header("x-github-event", event).header("x-github-delivery", delivery).body(body.to_vec());
        if let Some(sig) = signature {
            r = r.header("x-hub-signature-256", sig);
        }
        let r = r.send().await.expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: &str, signature: Option<String>) -> (u16, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body.to_string());
        if let Some(sig) = signature {
            r = r.header("x-slipway-signature-256", sig);
        }
        let r = r.send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn signed(&self, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
        self.deliver(event, delivery, body, Some(sign(SECRET.as_bytes(), body))).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.expect("get");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn deployments(&self) -> Vec<Value> {
        let v: Value = self.http.get(format!("{}/api/v1/deployments", self.base)).send().await.expect("get").json().await.expect("json");
        v.as_array().cloned().unwrap_or_default()
    }

    async fn wait_done(&self, id: i64) {
        common::eventually(Duration::from_secs(20), &format!("deployment {id} to end"), || async {
            let d: Value = self.http.get(format!("{}/api/v1/deployments/{id}", self.base)).send().await.expect("get").json().await.expect("json");
            if matches!(d["deployment"]["state"].as_str(), Some("queued" | "running")) { Err(d["deployment"].clone()) } else { Ok(()) }
        })
        .await
    }

    async fn why(&self, env: &str) -> Value {
        self.http.get(format!("{}/api/v1/services/{env}/web/why", self.base)).send().await.expect("get").json().await.expect("json")
    }

    /// A registry's notification of a push of `tag` (with `digest`).
    async fn registry_push(&self, id: &str, tag: &str, digest: &str) -> (u16, Value) {
        let body = json!({"events": [{"id": id, "action": "push", "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": format!("sha256:{digest}"), "repository": "codertocat/hello-world", "tag": tag}, "request": {"host": "ghcr.io"}}]});
        let r = self.http.post(format!("{}/hooks/registry", self.base)).bearer_auth(SECRET).json(&body).send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn stop(self) {
        self.node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.node.task).await;
    }
}

// Issue 6: signatures, redelivery, opt-in, tag filter, bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_github_deliveries_are_checked_deduplicated_and_deploy_where_opted_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let body = published("1.4.0");

        // Missing and wrong signatures: 401, nothing stored or started.
        let (s, e) = h.deliver("registry_package", "d-1", &body, None).await;
        assert_eq!(s, 401, "{backend}: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("X-Hub-Signature-256"), "{e}");
        let (s, _) = h.deliver("registry_package", "d-1", &body, Some(sign(b"not the secret", &body))).await;
        assert_eq!(s, 401);
        let mut tampered = body.clone();
        tampered.extend_from_slice(b" ");
        let (s, _) = h.deliver("registry_package", "d-1", &tampered, Some(sign(SECRET.as_bytes(), &body))).await;
        assert_eq!(s, 401, "a body changed after signing");
        assert!(h.deployments().await.is_empty(), "{backend}");

        // Signed: staging deploys 1.4.0, production holds it, saying why.
        let (s, a) = h.signed("registry_package", "d-1", &body).await;
        assert_eq!(s, 202, "{backend}: {a}");
        assert_eq!(a["duplicate"], false);
        let results = a["results"].as_array().cloned().unwrap_or_default();
        let staging = results.iter().find(|r| r["environment"] == "staging").cloned().expect("staging");
        let production = results.iter().find(|r| r["environment"] == "production").cloned().expect("production");
        let id = staging["deployment_id"].as_i64().unwrap_or_else(|| panic!("a deployment in staging: {a}"));
        assert!(production["deployment_id"].is_null() && production["held"].as_str().unwrap_or("").contains("auto_deploy is off for production"), "{a}");
        // Redelivered: the same answer, nothing new.
        let (s, b) = h.signed("registry_package", "d-1", &body).await;
        assert_eq!(s, 202);
        assert_eq!(b["duplicate"], true, "{b}");
        assert_eq!(b["results"][0]["deployment_id"], staging["deployment_id"]);
        // Replayed under a new delivery id (the id is not signed): the
        // same body is the same event.
        let (s, c) = h.signed("registry_package", "d-9", &body).await;
        assert_eq!((s, c["duplicate"].as_bool()), (202, Some(true)), "{c}");
        let list = h.deployments().await;
        assert_eq!(list.len(), 1, "{backend}: {list:?}");
        assert_eq!((list[0]["id"].as_i64(), list[0]["version"].as_str(), list[0]["environment"].as_str()), (Some(id), Some("1.4.0"), Some("staging")));

        // `latest` does not pass the semver filter anywhere.
        let (s, l) = h.signed("registry_package", "d-2", &published("latest")).await;
        assert_eq!(s, 202);
        assert!(l["results"].as_array().is_some_and(|r| r.iter().all(|r| r["deployment_id"].is_null())), "{l}");
        assert!(l.to_string().contains("does not pass the service's tag filter (semver)"), "{l}");

        // Injection strings in the tag: refused before anything uses them.
        for tag in ["$(touch x)", "../../etc"] {
            let (s, e) = h.signed("registry_package", "d-3", &published(tag)).await;
            assert_eq!(s, 400, "{tag}: {e}");
            assert!(e["error"]["message"].as_str().unwrap_or("").contains("is not"), "{e}");
        }
        // A malformed delivery id is refused too.
        let (s, _) = h.signed("registry_package", "../x", &body).await;
        assert_eq!(s, 400);

        // Too large: 413. A ping: pong. A push: recorded, nothing to do yet.
        let big = vec![b' '; 70_000];
        let (s, _) = h.signed("registry_package", "d-4", &big).await;
        assert_eq!(s, 413);
        let (s, p) = h.signed("ping", "d-5", br#"{"zen":"Design for failure."}"#).await;
        assert_eq!((s, p["note"].as_str()), (200, Some("pong")));
        let (s, p) = h.signed("push", "d-6", fixture("push.json").as_bytes()).await;
        assert_eq!(s, 202, "{p}");
        assert_eq!(h.deployments().await.len(), 1, "{backend}");

        // `why`, from the record: production never opted in; staging has
        // 1.4.0 and held `latest` back.
        h.wait_done(id).await;
        let why = |env: &'static str| {
            let (http, base) = (h.http.clone(), h.base.clone());
            async move { http.get(format!("{base}/api/v1/services/{env}/web/why")).send().await.expect("get").json::<Value>().await.expect("json") }
        };
        let p = why("production").await;
        assert_eq!(p["newest"], "latest", "{p}");
        assert!(p["verdict"].as_str().unwrap_or("").contains("runs nothing in production yet"), "{p}");
        assert!(
            p["history"].to_string().contains("1.4.0 from a GitHub registry_package delivery: available, not deployed: auto_deploy is off for production"),
            "{p}"
        );
        let s = why("staging").await;
        assert!(
            s["verdict"].as_str().unwrap_or("").starts_with("web runs 1.4.0, not latest: available, not deployed: tag latest does not pass"),
            "{backend}: {s}"
        );
        // The audit log has every delivery, refused ones included, newest
        // first, with who, where from and what came of it.
        let audit: Value = h.http.get(format!("{}/api/v1/audit?limit=100", h.base)).send().await.expect("get").json().await.expect("json");
        let entries = audit.as_array().cloned().unwrap_or_default();
        assert!(
            entries.iter().all(|e| e["address"] == "127.0.0.1" && e["actor"] == "github webhook" && e["action"] == "POST /hooks/github"),
            "{backend}: {audit}"
        );
        let refused: Vec<&Value> = entries.iter().filter(|e| e["status"] == 401).collect();
        assert_eq!(refused.len(), 3, "{audit}");
        assert!(refused[0]["detail"].as_str().unwrap_or("").contains("does not match"), "{audit}");
        assert!(
            entries.iter().any(|e| e["status"] == 202 && e["detail"].as_str().unwrap_or("").contains(&format!("web 1.4.0 in staging → deployment {id}"))),
            "{audit}"
        );
        assert!(entries.iter().any(|e| e["detail"].as_str().unwrap_or("").contains("(a redelivery)")), "{audit}");
        h.stop().await;
    }
}

// Issue 6: the generic "artifact published" event on /api/v1/events, by HMAC signature (or token).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_generic_published_event_is_signed_or_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        // A token exists: the API is closed to unsigned, tokenless calls.
        let (s, _) = h.post_json("/api/v1/tokens", None, &json!({"name": "root", "roles": {"*": "admin"}})).await;
        assert_eq!(s, 201, "{backend}");
        let event = json!({"kind": "published", "image": "ghcr.io/codertocat/hello-world", "version": "2.0.0", "id": "build-77"}).to_string();
        let (s, _) = h.post_raw("/api/v1/events", &event, None).await;
        assert_eq!(s, 401, "{backend}: neither a token nor a signature");
        let (s, e) = h.post_raw("/api/v1/events", &event, Some(sign(b"wrong", event.as_bytes()))).await;
        assert_eq!(s, 401, "{e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("does not match"), "{e}");

        // Signed: staging (opted in, and the signer may deploy there)
        // deploys; production holds it, saying why.
        let (s, a) = h.post_raw("/api/v1/events", &event, Some(sign(SECRET.as_bytes(), event.as_bytes()))).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let results = a["results"].as_array().cloned().unwrap_or_default();
        let staging = results.iter().find(|r| r["environment"] == "staging").expect("staging");
        assert!(staging["deployment_id"].as_i64().is_some(), "{a}");
        let production = results.iter().find(|r| r["environment"] == "production").expect("production");
        assert!(production["held"].as_str().is_some(), "{a}");
        // Twice: deploys once.
        let (_, again) = h.post_raw("/api/v1/events", &event, Some(sign(SECRET.as_bytes(), event.as_bytes()))).await;
        assert_eq!(again["duplicate"], true, "{again}");
        // The signer may deploy only where [events] says; a bad digest is 400.
        let run = json!({"kind": "run", "jobs": ["deploy-web"], "environment": "production"}).to_string();
        let (s, _) = h.post_raw("/api/v1/events", &run, Some(sign(SECRET.as_bytes(), run.as_bytes()))).await;
        assert_eq!(s, 403);
        let bad = json!({"kind": "published", "service": "web", "version": "2.0.1", "digest": "sha256:$(id)"}).to_string();
        let (s, _) = h.post_raw("/api/v1/events", &bad, Some(sign(SECRET.as_bytes(), bad.as_bytes()))).await;
        assert_eq!(s, 400);
        h.stop().await;
    }
}

/// GitHub's `package` delivery of the same publication as
/// [`published`]'s `registry_package` one (GitHub sends both to a hook
/// subscribed to both).
fn published_as_package(tag: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&published(tag)).expect("json");
    let p = v.as_object_mut().and_then(|o| o.remove("registry_package")).expect("registry_package");
    v["package"] = p;
    serde_json::to_vec(&v).expect("json")
}

// Issue 13: one publication sent as `package` and `registry_package` deployed twice; the same body under another event was called a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_a_publication_announced_by_several_events_deploys_once_and_keeps_its_origins() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let (s, a) = h.signed("registry_package", "d-1", &published("1.4.0")).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let staging = |a: &Value| a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == "staging").cloned()).unwrap_or(Value::Null);
        let id = staging(&a)["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: deployed: {a}"));

        // The same publication as a `package` event: not a redelivery of
        // the first (another kind of delivery), but the same deployment.
        let (s, b) = h.signed("package", "d-2", &published_as_package("1.4.0")).await;
        assert_eq!((s, b["duplicate"].as_bool()), (202, Some(false)), "{backend}: {b}");
        assert_eq!(staging(&b)["deployment_id"].as_i64(), Some(id), "{backend}: {b}");
        // Its redelivery is a duplicate of it.
        let (_, c) = h.signed("package", "d-3", &published_as_package("1.4.0")).await;
        assert_eq!(c["duplicate"], true, "{backend}: {c}");
        // The same body under another event is that other event (which
        // reads no package in it), not a duplicate.
        let (s, d) = h.signed("package", "d-4", &published("1.4.0")).await;
        assert_eq!((s, d["duplicate"].as_bool()), (202, Some(false)), "{backend}: {d}");
        assert!(d["note"].as_str().unwrap_or("").contains("no package_url"), "{backend}: {d}");
        // A registry notification of the same push (the same digest) and
        // a generic published event: still that one deployment.
        let (s, r) = h.registry_push("ev-1", "1.4.0", "3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498").await;
        assert_eq!(s, 200, "{backend}: {r}");
        assert!(
            r["results"]
                .as_array()
                .is_some_and(|r| r.iter().filter(|r| r["environment"] == "staging").all(|r| r["deployment_id"].as_i64() == Some(id) || r["held"].is_string())),
            "{backend}: {r}"
        );

        let list = h.deployments().await;
        assert_eq!(list.len(), 1, "{backend}: deployed once: {list:?}");
        // `why` names both deliveries that announced it, by their kind.
        h.wait_done(id).await;
        let why = h.why("staging").await;
        assert!(
            why["history"].to_string().contains(&format!("deployment #{id} (deploy) (from a GitHub registry_package delivery, a GitHub package delivery")),
            "{backend}: {why}"
        );
        h.stop().await;
    }
}

// Issue 13: a late retry of an older version's publication moved a service back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_a_late_publication_of_an_older_version_is_held_not_deployed() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let staging = |a: &Value| a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == "staging").cloned()).unwrap_or(Value::Null);
        let (s, a) = h.signed("registry_package", "d-1", &published("1.5.0")).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let first = staging(&a)["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: {a}"));
        h.wait_done(first).await;

        // 1.4.0, late, from each sender: held, saying why; nothing deployed.
        let (_, g) = h.signed("registry_package", "d-2", &published("1.4.0")).await;
        let held = staging(&g)["held"].as_str().unwrap_or_default().to_string();
        assert!(
            held.starts_with("older than 1.5.0, which was last deployed to staging") && held.contains("(by semver)") && held.contains("deploy 1.4.0 by hand"),
            "{backend}: {g}"
        );
        let (s, r) = h.registry_push("ev-2", "1.4.0", &"b".repeat(64)).await;
        assert_eq!(s, 200, "{backend}: {r}");
        assert!(staging(&r)["held"].as_str().is_some_and(|h| h.starts_with("older than 1.5.0")), "{backend}: {r}");
        let event = json!({"kind": "published", "image": "ghcr.io/codertocat/hello-world", "version": "1.3.9"}).to_string();
        let (s, p) = h.post_raw("/api/v1/events", &event, Some(sign(SECRET.as_bytes(), event.as_bytes()))).await;
        assert_eq!(s, 202, "{backend}: {p}");
        assert!(staging(&p)["held"].as_str().is_some_and(|h| h.starts_with("older than 1.5.0")), "{backend}: {p}");
        // The same version again (another push of it): not newer either.
        let (_, same) = h.registry_push("ev-3", "1.5.0", &"c".repeat(64)).await;
        assert!(staging(&same)["held"].as_str().is_some_and(|h| h.starts_with("1.5.0 was last deployed to staging")), "{backend}: {same}");
        assert_eq!(h.deployments().await.len(), 1, "{backend}");

        // Newer deploys; an older one than that newer one, while it may
        // still be in flight, is held against it.
        let (_, n) = h.signed("registry_package", "d-5", &published("1.10.0")).await;
        let newer = staging(&n)["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: 1.10.0 deploys: {n}"));
        let (_, o) = h.signed("registry_package", "d-6", &published("1.9.0")).await;
        assert!(staging(&o)["held"].as_str().is_some_and(|h| h.starts_with("older than 1.10.0, which ")), "{backend}: {o}");
        h.wait_done(newer).await;

        // `why` says what became of it; a person can still deploy it.
        let why = h.why("staging").await;
        assert!(
            why["history"].to_string().contains("1.9.0 from a GitHub registry_package delivery: available, not deployed: older than 1.10.0"),
            "{backend}: {why}"
        );
        let (s, d) = h.post_json("/api/v1/events", None, &json!({"kind": "deploy", "service": "web", "version": "1.4.0", "environment": "staging"})).await;
        assert_eq!(s, 202, "{backend}: by hand: {d}");
        let versions: Vec<String> = h.deployments().await.iter().filter_map(|d| d["version"].as_str().map(String::from)).collect();
        assert_eq!(versions, ["1.4.0", "1.10.0", "1.5.0"], "{backend}");
        h.stop().await;
    }
}

// Issue 13: a generic published event's id reused for another version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_a_published_event_id_reused_for_another_publication_is_a_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let send = |version: &str| {
            let event = json!({"kind": "published", "image": "ghcr.io/codertocat/hello-world", "version": version, "id": "build-77"}).to_string();
            let sig = sign(SECRET.as_bytes(), event.as_bytes());
            let h = &h;
            async move { h.post_raw("/api/v1/events", &event, Some(sig)).await }
        };
        let (s, a) = send("2.0.0").await;
        assert_eq!(s, 202, "{backend}: {a}");
        let (s, again) = send("2.0.0").await;
        assert_eq!((s, again["duplicate"].as_bool()), (202, Some(true)), "{backend}: {again}");
        let (s, e) = send("2.0.1").await;
        assert_eq!(s, 409, "{backend}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(r#"event id "build-77" was already used for ghcr.io/codertocat/hello-world 2.0.0 published (deployment "#)
                && message.contains("2.0.1"),
            "{backend}: {message}"
        );
        assert_eq!(h.deployments().await.len(), 1, "{backend}");
        h.stop().await;
    }
}

// Issue 13: a flood of refused deliveries grew the audit log by 18,640 rows.

/// Issue 13 (review): made-up paths, each new, were each their own key
/// of the bound (one audit row per request, and a map growing without
/// limit). The bound counts per route; unknown paths share one.
#[tokio::test]
async fn issue13_refusals_at_made_up_paths_share_one_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.expect("store");
    let h = Hooks::start(store.clone()).await;
    for n in 0..300 {
        for path in [format!("/hooks/made-up-{n}"), format!("/api/v1/made-up-{n}")] {
            let r = h.http.post(format!("{}{path}", h.base)).body("x").send().await.expect("send");
            assert!(r.status().is_client_error(), "{path}: {}", r.status());
        }
    }
    h.stop().await;
    let audit = store.audit(10_000).await.expect("audit");
    assert!(audit.len() <= 2 * 11, "{} rows for 600 refusals: {:?}", audit.len(), audit.iter().map(|a| (&a.action, a.status)).collect::<Vec<_>>());
    assert!(audit.iter().any(|a| a.action.starts_with("POST /hooks/made-up-")), "the first ones are kept as they were");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_a_flood_of_refused_deliveries_adds_a_bounded_number_of_audit_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store.clone()).await;
        let body = published("1.4.0");
        // 3,000 with a wrong signature and 300 signed but unreadable, 16
        // at a time.
        let bad_signature = sign(b"not the secret", &body);
        let unreadable = b"not json".to_vec();
        let mut statuses = std::collections::BTreeMap::new();
        let started = std::time::Instant::now();
        for round in 0..(3300 / 16 + 1) {
            let sends = (0..16).map(|i| round * 16 + i).filter(|n| *n < 3300).map(|n| {
                let h = &h;
                let (payload, sig) = if n < 3000 { (&body, bad_signature.clone()) } else { (&unreadable, sign(SECRET.as_bytes(), &unreadable)) };
                async move { h.deliver("registry_package", &format!("d-{n}"), payload, Some(sig)).await.0 }
            });
            for s in futures_util::future::join_all(sends).await {
                *statuses.entry(s).or_insert(0) += 1;
            }
        }
        assert_eq!(statuses, [(400, 300), (401, 3000)].into_iter().collect(), "{backend}");
        // The first ones are there, one by one, and no more than the bound:
        // 10 a minute per sender, endpoint and status, and a summary row.
        let minutes = started.elapsed().as_secs() / 60 + 1;
        let audit = store.audit(10_000).await.expect("audit");
        assert!(audit.len() as u64 <= 2 * 11 * minutes, "{backend}: {} rows: {:?}", audit.len(), audit.iter().map(|a| &a.detail).collect::<Vec<_>>());
        let oldest: Vec<_> = audit.iter().rev().take(10).collect();
        assert!(oldest.iter().all(|a| a.status == 401 && a.detail.contains("does not match") && a.action == "POST /hooks/github"), "{backend}: {oldest:?}");
        assert_eq!(audit.iter().filter(|a| a.status == 400).count(), 10, "{backend}");
        // The rest are summed up, at the latest when the node stops.
        h.stop().await;
        let audit = store.audit(10_000).await.expect("audit");
        let summary = |status: i64, n: u64| {
            audit.iter().any(|a| {
                a.status == status && a.detail.starts_with(&format!("and {n} more refused deliveries like this in the last")) && a.detail.contains("(HTTP")
            })
        };
        let details = audit.iter().map(|a| &a.detail).collect::<Vec<_>>();
        if minutes == 1 {
            assert!(summary(401, 2990) && summary(400, 290), "{backend}: {details:?}");
            assert_eq!(audit.len(), 22, "{backend}: {details:?}");
        } else {
            // Slower than a minute (a loaded machine): more windows, each
            // bounded, and nothing uncounted.
            let counted: u64 =
                audit.iter().map(|a| a.detail.strip_prefix("and ").and_then(|d| d.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(1)).sum();
            assert_eq!(counted, 3300, "{backend}: {details:?}");
        }
    }
}

/// A copy of a `workflow_run` fixture (GitHub's payload shape) with `f`
/// applied.
fn workflow_run(name: &str, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_str(&fixture(name)).expect("json");
    f(&mut v);
    serde_json::to_vec(&v).expect("json")
}

const ON_WORKFLOW: &str = r#"
[[service]]
name = "api"
on_workflow = { workflow = "CI", branch = "main", version = "sha-{head_sha:7}" }
auto_deploy = ["staging"]

[[job]]
name = "deploy-api"
service = "api"
command = ["true"]
"#;

// Issue 18: deploy when CI passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue18_a_successful_workflow_run_deploys_once_and_every_other_run_says_why_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start_with(store, ON_WORKFLOW).await;

        // Requested and in progress: acknowledged, nothing deployed.
        for (name, action) in [("workflow-run-requested.json", "requested"), ("workflow-run-in-progress.json", "in_progress")] {
            let (s, a) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0950", &workflow_run(name, |_| {})).await;
            assert_eq!(s, 202, "{backend}: {a}");
            let note = a["note"].as_str().unwrap_or_default();
            assert!(note.contains(&format!("action {action:?}")) && note.contains("only a completed run deploys"), "{backend}: {a}");
            assert_eq!(a["results"], json!([]), "{backend}: {a}");
        }
        // Completed, but not a success: each says which conclusion.
        for conclusion in ["failure", "cancelled", "skipped", "timed_out", "action_required", "neutral", "stale", "startup_failure"] {
            let body = workflow_run("workflow-run-completed.json", |v| v["workflow_run"]["conclusion"] = conclusion.into());
            let (s, a) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0951", &body).await;
            assert_eq!(s, 202, "{backend}: {a}");
            assert!(a["note"].as_str().unwrap_or_default().contains(&format!("concluded {conclusion:?}: only a successful run deploys")), "{backend}: {a}");
            assert_eq!(a["results"], json!([]), "{backend}: {a}");
        }
        // Signed with another secret: refused.
        let success = workflow_run("workflow-run-completed.json", |_| {});
        let (s, _) = h.deliver("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0952", &success, Some(sign(b"not the secret", &success))).await;
        assert_eq!(s, 401, "{backend}");
        assert!(h.deployments().await.is_empty(), "{backend}: nothing deployed yet");

        // Success on main: staging deploys the rendered version, production
        // (not opted in) holds it, saying why.
        let (s, a) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0953", &success).await;
        assert_eq!(s, 202, "{backend}: {a}");
        assert!(a["note"].as_str().unwrap_or_default().contains("workflow \"CI\" run 30433642 (attempt 1) of acb5820 on \"main\" succeeded"), "{a}");
        let result = |a: &Value, env: &str| a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == env).cloned()).unwrap_or(Value::Null);
        let staging = result(&a, "staging");
        assert_eq!((staging["service"].as_str(), staging["version"].as_str()), (Some("api"), Some("sha-acb5820")), "{backend}: {a}");
        let id = staging["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: deployed in staging: {a}"));
        assert!(result(&a, "production")["held"].as_str().unwrap_or_default().contains("auto_deploy is off for production"), "{backend}: {a}");

        // Redelivered (same X-GitHub-Delivery, same body): a duplicate.
        let (s, b) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0953", &success).await;
        assert_eq!((s, b["duplicate"].as_bool(), result(&b, "staging")["deployment_id"].as_i64()), (202, Some(true), Some(id)), "{backend}: {b}");
        // The run re-run (attempt 2 of the same run and commit, a new
        // delivery): the same deployment, nothing new.
        let rerun = workflow_run("workflow-run-completed.json", |v| {
            v["workflow_run"]["run_attempt"] = 2.into();
            v["workflow_run"]["updated_at"] = "2020-01-22T19:40:01Z".into();
            v["workflow_run"]["previous_attempt_url"] = "https://api.github.com/repos/octo-org/octo-repo/actions/runs/30433642/attempts/1".into();
        });
        let (s, c) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0954", &rerun).await;
        assert_eq!((s, c["duplicate"].as_bool(), result(&c, "staging")["deployment_id"].as_i64()), (202, Some(false), Some(id)), "{backend}: {c}");

        // Another branch, a pull request's run, another workflow: nothing,
        // and the note says what the service waits for.
        for (field, value) in [("head_branch", "feature/x"), ("event", "pull_request"), ("name", "Lint")] {
            let body = workflow_run("workflow-run-completed.json", |v| {
                v["workflow_run"][field] = value.into();
                v["workflow_run"]["head_sha"] = "b".repeat(40).into();
                if field == "name" {
                    v["workflow"]["name"] = value.into();
                    v["workflow"]["path"] = ".github/workflows/lint.yml".into();
                }
            });
            let (s, d) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0955", &body).await;
            assert_eq!(s, 202, "{backend}: {d}");
            assert!(d["note"].as_str().unwrap_or_default().contains("api waits for \"CI\" on \"main\" from push"), "{backend}: {field}: {d}");
            assert_eq!(d["results"], json!([]), "{backend}: {d}");
        }

        let list = h.deployments().await;
        assert_eq!(list.len(), 1, "{backend}: deployed once: {list:?}");
        assert_eq!(
            (list[0]["service"].as_str(), list[0]["version"].as_str(), list[0]["environment"].as_str()),
            (Some("api"), Some("sha-acb5820"), Some("staging"))
        );
        h.wait_done(id).await;
        let d: Value = h.http.get(format!("{}/api/v1/deployments/{id}", h.base)).send().await.expect("get").json().await.expect("json");
        assert_eq!(d["deployment"]["state"], "succeeded", "{backend}: {d}");

        // A newer commit's successful run deploys its own version.
        let next = workflow_run("workflow-run-completed.json", |v| {
            v["workflow_run"]["head_sha"] = "c".repeat(40).into();
            v["workflow_run"]["id"] = 30433777.into();
        });
        let (s, e) = h.signed("workflow_run", "72d3162e-cc78-11e3-81ab-4c9367dc0956", &next).await;
        assert_eq!(s, 202, "{backend}: {e}");
        let next_id = result(&e, "staging")["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: {e}"));
        assert_ne!(next_id, id);
        assert_eq!(result(&e, "staging")["version"], "sha-ccccccc");
        h.wait_done(next_id).await;
        h.stop().await;
    }
}

/// A NUL byte a client sends, quoted back in the error that refuses it,
/// reaches the audit log: PostgreSQL's text cannot hold the byte, so there
/// the entry was lost ("cannot write the audit log"), and
/// `GET /api/v1/audit?actor=…%00…` answered 500. A publication's id with
/// one (or any control character) is refused: keys are hashed from
/// NUL-separated parts, and such an id could spell the key another
/// publication deploys under.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_text_with_a_nul_byte_is_refused_and_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let (s, e) = h.post_json("/api/v1/published", None, &json!({"service": "web", "version": "2.0.0", "id": "build\u{0}77"})).await;
        assert_eq!(s, 400, "{backend}: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("control character"), "{backend}: {e}");
        let (s, e) = h.post_json("/api/v1/events", None, &json!({"kind": "run", "jobs": ["deploy-web"], "x\u{0}y": 1})).await;
        assert_eq!(s, 400, "{backend}: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("x\u{0}y"), "{backend}: the refusal quotes the byte: {e}");
        assert!(h.deployments().await.is_empty(), "{backend}");

        let (s, log) = h.get("/api/v1/audit?limit=50").await;
        assert_eq!(s, 200, "{backend}: {log}");
        let refused = log.as_array().map(|a| a.iter().filter(|e| e["action"] == "POST /api/v1/events" && e["status"] == 400).count()).unwrap_or(0);
        assert_eq!(refused, 1, "{backend}: the refusal quoting a NUL byte is audited: {log}");
        assert!(log.to_string().contains("x\u{FFFD}y"), "{backend}: kept as U+FFFD: {log}");
        let (s, none) = h.get("/api/v1/audit?actor=a%00b").await;
        assert_eq!((s, none.as_array().map(Vec::len)), (200, Some(0)), "{backend}: {none}");
        h.stop().await;
    }
}

/// Publications sent at once under one `id`, each of another version: the
/// id names one publication, so one is acted on and the others are
/// refused (409), naming it. The id used to be looked up first and
/// recorded only after acting, so publications that arrived together all
/// passed the lookup: several started deployments and were answered
/// `"duplicate": true` (found by fuzzing the API, on both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_publications_sent_at_once_under_one_id_start_one_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let sends = (1..=8).map(|i| {
            let h = &h;
            async move { h.post_json("/api/v1/published", None, &json!({"service": "web", "version": format!("3.0.{i}"), "id": "ci-build-42"})).await }
        });
        let answers = futures_util::future::join_all(sends).await;
        let accepted: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 202).map(|(_, a)| a).collect();
        let refused =
            answers.iter().filter(|(s, e)| *s == 409 && e["error"]["message"].as_str().unwrap_or("").contains("event id \"ci-build-42\" was already used"));
        assert_eq!((accepted.len(), refused.count()), (1, 7), "{backend}: {answers:?}");
        assert_eq!(accepted[0]["duplicate"].as_bool(), Some(false), "{backend}: {}", accepted[0]);
        let id = accepted[0]["results"][0]["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: no deployment: {}", accepted[0]));
        assert_eq!(h.deployments().await.len(), 1, "{backend}");
        // The same publication again is a retry: answered from what it started.
        let version = accepted[0]["results"][0]["version"].as_str().unwrap_or_default().to_string();
        let (s, again) = h.post_json("/api/v1/published", None, &json!({"service": "web", "version": version, "id": "ci-build-42"})).await;
        assert_eq!((s, again["duplicate"].as_bool(), again["results"][0]["deployment_id"].as_i64()), (202, Some(true), Some(id)), "{backend}: {again}");
        // What the claim came to is recorded: a later refusal names it.
        let (s, e) = h.post_json("/api/v1/published", None, &json!({"service": "web", "version": "3.1.0", "id": "ci-build-42"})).await;
        let message = e["error"]["message"].as_str().unwrap_or("");
        assert!(s == 409 && message.contains(&format!("web {version} published (deployment {id} in staging)")), "{backend}: {s} {e}");
        h.wait_done(id).await;
        h.stop().await;
    }
}

/// An id recorded before publications' ids were claimed (by an older
/// Slipway: its record of what it started, no claim) keeps its
/// publication: another one under it is refused every time it is sent,
/// and a retry of the original is still a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_an_id_recorded_before_claims_keeps_its_publication() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let old = json!({"what": "web", "version": "1.0.0", "digest": null, "results": []}).to_string();
        let key = slipway::submit::key_of("published", &["build-7"]);
        store
            .record_event(slipway::store::NewEvent { key: Some(key), kind: "published".into(), payload: old })
            .await
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        let h = Hooks::start(store).await;
        for _ in 0..2 {
            let (s, e) = h.post_json("/api/v1/published", None, &json!({"service": "web", "version": "2.0.0", "id": "build-7"})).await;
            assert!(s == 409 && e["error"]["message"].as_str().unwrap_or("").contains("already used for web 1.0.0 published"), "{backend}: {s} {e}");
        }
        let (s, again) = h.post_json("/api/v1/published", None, &json!({"service": "web", "version": "1.0.0", "id": "build-7"})).await;
        assert_eq!((s, again["duplicate"].as_bool()), (202, Some(true)), "{backend}: {again}");
        assert!(h.deployments().await.iter().all(|d| d["version"] != "2.0.0"), "{backend}");
        h.stop().await;
    }
}

/// Deliveries of one publication that arrive at the same moment (a
/// registry and GitHub both announcing it, a redelivery racing the first)
/// start one deployment, and every answer names it: one that found the
/// deployment its twin had just started was answered "held: … is queued
/// (deployment #N)" with no deployment id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_deliveries_of_one_publication_at_once_all_name_its_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let body = published("5.0.0");
        let sends = (0..8).map(|i| {
            let (h, body) = (&h, &body);
            async move { h.signed("registry_package", &format!("ad-{i}"), body).await }
        });
        let answers = futures_util::future::join_all(sends).await;
        let staging: Vec<Option<i64>> = answers
            .iter()
            .map(|(s, a)| {
                assert_eq!(*s, 202, "{backend}: {a}");
                a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == "staging")).and_then(|r| r["deployment_id"].as_i64())
            })
            .collect();
        let first = staging[0];
        assert!(first.is_some() && staging.iter().all(|d| *d == first), "{backend}: every answer names the one deployment: {answers:?}");
        assert_eq!(h.deployments().await.len(), 1, "{backend}");
        h.stop().await;
    }
}

/// A registry's event id seen again with another push (another tag, or
/// another digest) is that other push: it deploys, and is not answered
/// as a duplicate. It used to deploy and be answered `"duplicate": true`,
/// as if nothing had been done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_a_registry_event_id_seen_with_another_push_is_that_push_not_a_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start(store).await;
        let staging = |a: &Value| a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == "staging").cloned()).unwrap_or(Value::Null);
        let (s, a) = h.registry_push("ev-7", "1.4.0", &"a".repeat(64)).await;
        assert_eq!((s, a["duplicate"].as_bool()), (200, Some(false)), "{backend}: {a}");
        let first = staging(&a)["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: {a}"));
        let (_, again) = h.registry_push("ev-7", "1.4.0", &"a".repeat(64)).await;
        assert_eq!((again["duplicate"].as_bool(), staging(&again)["deployment_id"].as_i64()), (Some(true), Some(first)), "{backend}: {again}");
        h.wait_done(first).await;

        let (s, other) = h.registry_push("ev-7", "1.5.0", &"b".repeat(64)).await;
        assert_eq!((s, other["duplicate"].as_bool()), (200, Some(false)), "{backend}: another push under a seen id: {other}");
        let second = staging(&other)["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: 1.5.0 deploys: {other}"));
        assert_ne!(second, first, "{backend}");
        let (_, again) = h.registry_push("ev-7", "1.5.0", &"b".repeat(64)).await;
        assert_eq!((again["duplicate"].as_bool(), staging(&again)["deployment_id"].as_i64()), (Some(true), Some(second)), "{backend}: {again}");
        assert_eq!(h.deployments().await.len(), 2, "{backend}");
        h.wait_done(second).await;
        h.stop().await;
    }
}

/// A publication sent again by a token that may not deploy where the
/// first sender's deployed it: the answer names what it started where the
/// token may read, and only counts the rest (it named a deployment in an
/// environment the token may not read). It used to say "held: … may not
/// deploy in production" (a held decision did not look the publication
/// up).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_a_retry_by_a_token_that_may_not_deploy_there_names_what_the_publication_started() {
    let extra = r#"
[[service]]
name = "api"
follows = "ghcr.io/team/api"
auto_deploy = ["staging", "production"]

[[job]]
name = "deploy-api"
service = "api"
command = ["true"]
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let h = Hooks::start_with(store, extra).await;
        let (s, root) = h.post_json("/api/v1/tokens", None, &json!({"name": "root", "roles": {"*": "admin"}})).await;
        assert_eq!(s, 201, "{backend}: {root}");
        let root = root["token"].as_str().expect("token").to_string();
        let (s, ci) = h.post_json("/api/v1/tokens", Some(&root), &json!({"name": "ci", "roles": {"staging": "deployer"}})).await;
        assert_eq!(s, 201, "{backend}: {ci}");
        let ci = ci["token"].as_str().expect("token").to_string();
        let env = |a: &Value, e: &str| a["results"].as_array().and_then(|r| r.iter().find(|r| r["environment"] == e).cloned()).unwrap_or(Value::Null);

        let body = json!({"service": "api", "version": "1.0.0", "id": "rel-1"});
        let (s, a) = h.post_json("/api/v1/published", Some(&root), &body).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let production = env(&a, "production")["deployment_id"].as_i64().unwrap_or_else(|| panic!("{backend}: {a}"));
        let (s, b) = h.post_json("/api/v1/published", Some(&ci), &body).await;
        assert_eq!((s, b["duplicate"].as_bool()), (202, Some(true)), "{backend}: {b}");
        assert!(env(&b, "production").is_null(), "{backend}: ci may not read production: {b}");
        assert!(!b.to_string().contains(&format!("\"deployment_id\":{production}")), "{backend}: {b}");
        assert!(
            b["note"].as_str().is_some_and(|n| n.contains("1 deployment(s) it started in environments token ci may not read are not shown")),
            "{backend}: {b}"
        );
        assert_eq!(env(&b, "staging")["deployment_id"], env(&a, "staging")["deployment_id"], "{backend}: {b}");
        // A token that may read production is told it, as any retry is.
        let (s, r) = h.post_json("/api/v1/published", Some(&root), &body).await;
        assert_eq!((s, env(&r, "production")["deployment_id"].as_i64()), (202, Some(production)), "{backend}: {r}");
        // A conflicting publication under the id names only what ci may read.
        let (s, c) = h.post_json("/api/v1/published", Some(&ci), &json!({"service": "api", "version": "9.9.9", "id": "rel-1"})).await;
        let message = c["error"]["message"].as_str().unwrap_or("");
        assert_eq!(s, 409, "{backend}: {c}");
        assert!(message.contains("1 in environments token ci may not read") && !message.contains(&format!("deployment {production} ")), "{backend}: {message}");

        // A publication of its own from that token is held there, saying why.
        let (s, c) = h.post_json("/api/v1/published", Some(&ci), &json!({"service": "api", "version": "1.0.1", "id": "rel-2"})).await;
        assert_eq!(s, 202, "{backend}: {c}");
        assert!(env(&c, "production")["held"].as_str().is_some_and(|h| h.contains("may not deploy in production")), "{backend}: {c}");
        for d in h.deployments().await {
            h.wait_done(d["id"].as_i64().expect("id")).await;
        }
        h.stop().await;
    }
}
