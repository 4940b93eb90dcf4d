//! Issue 17: what the dashboard needed of the API, in-process on both
//! stores (SQLite always, PostgreSQL when configured): `whoami`,
//! `requested_by` on approvals, a deployment's waves and critical path,
//! the audit log's environment filter, and the page's own files served
//! without a token but with their security headers.

mod common;

use std::time::Duration;

use common::Api;
use serde_json::json;
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;

const CONFIG: &str = r#"
[[environment]]
name = "staging"

[[environment]]
name = "production"
approval = true

[[job]]
name = "a"
command = ["true"]

[[job]]
name = "b"
needs = ["a"]
command = ["true"]

[[job]]
name = "c"
needs = ["a"]
command = ["sleep", "0.4"]

[[job]]
name = "d"
needs = ["b", "c"]
command = ["true"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_whoami_approvals_graph_shape_audit_filter_and_the_pages() {
    let scratch = tempfile::tempdir().expect("scratch");
    for (backend, store) in common::stores(scratch.path()).await {
        let dir = common::config_dir(CONFIG, &[]);
        let mut cfg = SchedulerConfig::new(format!("ui-{backend}"), dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "ui-api".into() });
        let api = Api::new(&format!("http://{}", node.addr));

        // Open API: whoami says so.
        let (s, me) = api.call("GET", "/api/v1/whoami", None, None).await;
        assert_eq!((s, me["open"].clone(), me["actor"].clone()), (200, json!(true), json!("anonymous")), "[{backend}] {me}");

        // The graph's shape: waves a | b, c | d; c is the slow branch.
        let run = api.submit(None, json!({"kind": "run", "jobs": ["d"], "environment": "staging"})).await;
        api.wait_state(run, None, &["succeeded"]).await;
        let (_, detail) = api.call("GET", &format!("/api/v1/deployments/{run}"), None, None).await;
        let mut waves: Vec<Vec<String>> = serde_json::from_value(detail["waves"].clone()).expect("waves");
        waves.iter_mut().for_each(|w| w.sort());
        assert_eq!(waves, vec![vec!["a"], vec!["b", "c"], vec!["d"]], "[{backend}] {detail}");
        assert_eq!(detail["critical_path"], json!(["a", "c", "d"]), "[{backend}] {detail}");
        assert!(detail["critical_path_ms"].as_i64().unwrap_or(0) >= 400, "[{backend}] {detail}");

        // Tokens: whoami names them; without one, 401.
        let (_, root) = api.call("POST", "/api/v1/tokens", None, Some(json!({"name": "root", "roles": {"*": "admin"}}))).await;
        let root = root["token"].as_str().expect("token").to_string();
        let (_, bob) = api.call("POST", "/api/v1/tokens", Some(&root), Some(json!({"name": "bob", "roles": {"*": "deployer"}}))).await;
        let bob = bob["token"].as_str().expect("token").to_string();
        let (s, _) = api.call("GET", "/api/v1/whoami", None, None).await;
        assert_eq!(s, 401, "[{backend}]");
        let (s, _) = api.call("GET", "/api/v1/whoami", Some("not-a-token"), None).await;
        assert_eq!(s, 401, "[{backend}]");
        let (s, me) = api.call("GET", "/api/v1/whoami", Some(&bob), None).await;
        assert_eq!(s, 200);
        assert_eq!(
            (me["name"].clone(), me["actor"].clone(), me["roles"].clone(), me["open"].clone()),
            (json!("bob"), json!("token bob"), json!({"*": "deployer"}), json!(false))
        );

        // Who asked for a waiting deployment.
        let waiting = api.submit(Some(&bob), json!({"kind": "run", "jobs": ["a"], "environment": "production"})).await;
        api.wait_state(waiting, Some(&root), &["waiting"]).await;
        let (_, holds) = api.call("GET", "/api/v1/approvals", Some(&root), None).await;
        let hold = holds.as_array().into_iter().flatten().find(|h| h["deployment"]["id"] == waiting).cloned().unwrap_or_default();
        assert_eq!(hold["requested_by"], "token bob", "[{backend}] {holds}");
        // bob may not approve: refused, and audited under production.
        let (s, _) = api.call("POST", &format!("/api/v1/deployments/{waiting}/approve"), Some(&bob), None).await;
        assert_eq!(s, 403);

        // The audit filter: by environment, by actor, both; a bad name 400;
        // an empty value filters nothing.
        let audit = |q: &'static str| {
            let (api, root) = (&api, root.clone());
            async move {
                let (s, rows) = api.call("GET", &format!("/api/v1/audit?{q}"), Some(&root), None).await;
                (s, rows.as_array().cloned().unwrap_or_default())
            }
        };
        let (_, prod) = audit("environment=production").await;
        assert!(!prod.is_empty() && prod.iter().all(|r| r["environment"] == "production"), "[{backend}] {prod:?}");
        assert!(prod.iter().any(|r| r["status"] == 403 && r["action"].as_str().unwrap_or("").ends_with("/approve")), "[{backend}] the refusal: {prod:?}");
        let (_, staging) = audit("environment=staging").await;
        assert!(staging.iter().any(|r| r["detail"].as_str().unwrap_or("").contains(&format!("deployment {run}"))), "[{backend}] {staging:?}");
        let (_, bobs) = audit("actor=token%20bob").await;
        assert!(!bobs.is_empty() && bobs.iter().all(|r| r["actor"] == "token bob"), "[{backend}] {bobs:?}");
        let (_, both) = audit("actor=token%20bob&environment=staging").await;
        assert!(both.is_empty(), "[{backend}] bob did nothing in staging: {both:?}");
        let (s, _) = audit("environment=no%20such").await;
        assert_eq!(s, 400, "[{backend}]");
        let (s, all) = audit("environment=&actor=").await;
        assert!(s == 200 && all.len() > prod.len(), "[{backend}]");

        // The page: no token needed, strict headers; the API still needs one.
        let res = api.http.get(format!("{}/", api.base)).send().await.expect("GET /");
        assert_eq!(res.status(), 200);
        let h = res.headers().clone();
        assert!(h["content-type"].to_str().unwrap_or("").starts_with("text/html"));
        let csp = h["content-security-policy"].to_str().unwrap_or("").to_string();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let js = api.http.get(format!("{}/ui/app.js", api.base)).send().await.expect("GET app.js");
        assert!(js.status() == 200 && js.headers()["content-type"].to_str().unwrap_or("").starts_with("text/javascript"));
        let (s, _) = api.call("GET", "/api/v1/deployments", None, None).await;
        assert_eq!(s, 401, "[{backend}] the page is public, the API is not");
        node.shutdown.cancel();
    }
}
