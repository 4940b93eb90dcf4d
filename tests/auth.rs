//! API tokens and roles, in-process against every store backend: the
//! bootstrap of the first token, then every role against every endpoint
//! (a table), revocation.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;

const CONFIG: &str = r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[[job]]
name = "noop"
command = ["true"]

[[service]]
name = "web"
follows = "ghcr.io/o/web"
auto_deploy = ["staging", "production"]

[[job]]
name = "deploy-web"
service = "web"
command = ["true"]
"#;

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut r = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url),
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("send");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn token(&self, admin: Option<&str>, name: &str, roles: Value) -> String {
        let (s, v) = self.call("POST", "/api/v1/tokens", admin, Some(json!({"name": name, "roles": roles}))).await;
        assert_eq!(s, 201, "{v}");
        v["token"].as_str().expect("token").to_string()
    }
}

// Issue 6: every role against every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_every_role_against_every_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(dir.path()).await {
        let cfg_dir = common::config_dir(CONFIG, &[]);
        let mut cfg = SchedulerConfig::new("auth", cfg_dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: cfg_dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "auth-test".into() });
        let api = Api { base: format!("http://{}", node.addr), http: slipway::http::builder().timeout(Duration::from_secs(20)).build().expect("client") };

        // No token yet: open, and the first token must be an admin one.
        assert_eq!(api.call("GET", "/api/v1/deployments", None, None).await.0, 200, "{backend}");
        let (s, v) = api.call("POST", "/api/v1/tokens", None, Some(json!({"name": "ci", "roles": {"staging": "deployer"}}))).await;
        assert_eq!(s, 400, "{v}");
        // A request a proxy forwarded is not from this host, though its
        // connection is from loopback.
        for header in ["x-forwarded-for", "forwarded"] {
            let r = api
                .http
                .post(format!("{}/api/v1/tokens", api.base))
                .header(header, "for=203.0.113.9")
                .json(&json!({"name": "root", "roles": {"*": "admin"}}))
                .send()
                .await
                .expect("post");
            assert_eq!(r.status().as_u16(), 403, "{backend} {header}");
            assert!(r.text().await.unwrap_or_default().contains("not through a proxy"), "{backend} {header}");
        }
        let admin = api.token(None, "root", json!({"*": "admin"})).await;
        // From now on: no token, 401.
        let (s, v) = api.call("GET", "/api/v1/deployments", None, None).await;
        assert_eq!(s, 401, "{backend}: {v}");

        let viewer = api.token(Some(&admin), "viewer", json!({"*": "viewer"})).await;
        let deployer = api.token(Some(&admin), "deployer", json!({"staging": "deployer", "production": "viewer"})).await;
        let approver = api.token(Some(&admin), "approver", json!({"*": "approver"})).await;
        let run = |env: &str| json!({"kind": "run", "jobs": ["noop"], "environment": env});
        // (method, path, body) and the callers allowed; anyone else: 403
        // (with a token) or 401 (without, or with a wrong one).
        let table: Vec<(&str, &str, Option<Value>, &[&str])> = vec![
            ("GET", "/api/v1/deployments", None, &["viewer", "deployer", "approver", "admin"]),
            ("GET", "/api/v1/services", None, &["viewer", "deployer", "approver", "admin"]),
            // The audit log spans every environment: a role for "*".
            ("GET", "/api/v1/audit", None, &["viewer", "approver", "admin"]),
            ("POST", "/api/v1/events", Some(run("staging")), &["deployer", "admin"]),
            ("POST", "/api/v1/events", Some(run("production")), &["admin"]),
            ("POST", "/api/v1/services/production/web/rollback", None, &["admin"]),
            ("GET", "/api/v1/tokens", None, &["admin"]),
            ("POST", "/api/v1/gc", None, &["admin"]),
            ("GET", "/api/v1/approvals", None, &["viewer", "deployer", "approver", "admin"]),
            ("GET", "/api/v1/environments", None, &["viewer", "deployer", "approver", "admin"]),
            ("GET", "/api/v1/environments/production/revisions", None, &["viewer", "deployer", "approver", "admin"]),
            ("POST", "/api/v1/environments/staging/revisions/check", None, &["deployer", "admin"]),
            ("POST", "/api/v1/environments/production/revisions/check", None, &["admin"]),
            // Deployment 1 is the staging run above (approving it is 409:
            // it waits for nothing, but the role check comes first).
            ("POST", "/api/v1/deployments/1/approve", None, &["approver", "admin"]),
            ("POST", "/api/v1/services/staging/web/promote", Some(json!({"from": "production"})), &["deployer", "admin"]),
            ("POST", "/api/v1/services/production/web/promote", Some(json!({"from": "staging"})), &["admin"]),
            // Retention's plan spans every environment; deleting is admin's.
            ("GET", "/api/v1/retention", None, &["viewer", "approver", "admin"]),
            ("POST", "/api/v1/retention", None, &["admin"]),
        ];
        let callers: Vec<(&str, Option<&str>)> = vec![
            ("nobody", None),
            ("wrong", Some("slw_not-a-token")),
            ("viewer", Some(&viewer)),
            ("deployer", Some(&deployer)),
            ("approver", Some(&approver)),
            ("admin", Some(&admin)),
        ];
        for (method, path, body, allowed) in &table {
            for (who, token) in &callers {
                let (s, v) = api.call(method, path, *token, body.clone()).await;
                let expected = if token.is_none() || *who == "wrong" {
                    "401"
                } else if allowed.contains(who) {
                    "allowed"
                } else {
                    "403"
                };
                let got = match s {
                    401 => "401",
                    403 => "403",
                    _ => "allowed",
                };
                assert_eq!(got, expected, "{backend}: {who} {method} {path} → {s} {v}");
            }
        }
        // The public ones stay public.
        assert_eq!(api.call("GET", "/healthz", None, None).await.0, 200);

        // A generic "published" event: deploys where the token may, holds
        // the rest saying why; published twice, deployed once.
        let event = json!({"image": "ghcr.io/o/web", "version": "2.1.0"});
        let (s, a) = api.call("POST", "/api/v1/published", Some(&deployer), Some(event.clone())).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let results = a["results"].as_array().cloned().unwrap_or_default();
        let staging = results.iter().find(|r| r["environment"] == "staging").cloned().unwrap_or_default();
        let production = results.iter().find(|r| r["environment"] == "production").cloned().unwrap_or_default();
        assert!(staging["deployment_id"].is_i64(), "{a}");
        assert!(production["held"].as_str().unwrap_or("").contains("token deployer may not deploy in production"), "{a}");
        let (_, again) = api.call("POST", "/api/v1/published", Some(&deployer), Some(event)).await;
        assert_eq!((again["duplicate"].as_bool(), &again["results"][0]["deployment_id"]), (Some(true), &staging["deployment_id"]), "{again}");
        let (s, bad) = api.call("POST", "/api/v1/published", Some(&deployer), Some(json!({"service": "web", "version": "$(touch x)"}))).await;
        assert_eq!(s, 400, "{bad}");
        let (_, why) = api.call("GET", "/api/v1/services/production/web/why", Some(&viewer), None).await;
        assert!(why["verdict"].as_str().unwrap_or("").contains("may not deploy in production"), "{why}");

        // Reads are per environment too: a staging-only viewer sees
        // staging's deployments, not production's.
        let stager = api.token(Some(&admin), "stager", json!({"staging": "viewer"})).await;
        let (_, all) = api.call("GET", "/api/v1/deployments?limit=100", Some(&admin), None).await;
        let prod =
            all.as_array().and_then(|a| a.iter().find(|d| d["environment"] == "production")).and_then(|d| d["id"].as_i64()).expect("a production deployment");
        let (s, seen) = api.call("GET", "/api/v1/deployments?limit=100", Some(&stager), None).await;
        assert!(s == 200 && seen.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|d| d["environment"] == "staging")), "{seen}");
        assert_eq!(api.call("GET", &format!("/api/v1/deployments/{prod}"), Some(&stager), None).await.0, 403);
        assert_eq!(api.call("GET", &format!("/api/v1/deployments/{prod}/logs"), Some(&stager), None).await.0, 403);
        assert_eq!(api.call("GET", "/api/v1/services/production/web/why", Some(&stager), None).await.0, 403);

        // Triggers' keys are theirs: a caller cannot take one ahead of them.
        let (s, e) = api
            .call("POST", "/api/v1/events", Some(&deployer), Some(json!({"kind": "run", "jobs": ["noop"], "environment": "staging", "id": "published:x"})))
            .await;
        assert_eq!(s, 400, "{e}");
        // A viewer publishes nothing.
        assert_eq!(api.call("POST", "/api/v1/published", Some(&viewer), Some(json!({"service": "web", "version": "3.0.0"}))).await.0, 403);
        // A version with a build part deploys (its key is a digest).
        let (s, a) = api.call("POST", "/api/v1/published", Some(&admin), Some(json!({"service": "web", "version": "2.2.0+build.5"}))).await;
        assert!(s == 202 && a["results"][0]["deployment_id"].is_i64(), "{a}");

        // Revoked: 401 from then on; the audit log says who did what.
        let (s, _) = api.call("DELETE", "/api/v1/tokens/deployer", Some(&admin), None).await;
        assert_eq!(s, 200);
        assert_eq!(api.call("GET", "/api/v1/deployments", Some(&deployer), None).await.0, 401);
        let (_, log) = api.call("GET", "/api/v1/audit?limit=200", Some(&viewer), None).await;
        let text = log.to_string();
        assert!(text.contains("token deployer") && text.contains("revoke token deployer") && text.contains("token root"), "{backend}: {log}");
        assert!(!text.contains(&deployer) && !text.contains(&admin), "no token value in the audit log");
        let (_, tokens) = api.call("GET", "/api/v1/tokens", Some(&admin), None).await;
        assert!(!tokens.to_string().contains(&admin), "tokens are never shown again: {tokens}");

        node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
    }
}
