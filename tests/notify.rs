//! Outgoing notifications (`[[notify]]`) in-process: a real HTTP receiver
//! on 127.0.0.1:0 that refuses its first delivery (so the retry shows),
//! JSON and Slack shapes, the `on` filter, a URL from a secret, and an
//! endpoint that is down beside them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::Value;
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

async fn receiver() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{kind}",
            axum::routing::post(|State(seen): State<Seen>, Path(kind): Path<String>, Json(body): Json<Value>| async move {
                let mut s = seen.lock().unwrap();
                // The very first delivery is refused: it must be retried.
                let first = s.is_empty();
                s.push((kind, body));
                if first { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_deployments_are_notified_retried_and_shaped() {
    let (url, seen) = receiver().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("slack"), format!("{url}/slack")).expect("secret");
    let config = format!(
        r#"
[secret.slack]
file = "{slack}"

[[notify]]
url = "{url}/json"

[[notify]]
url_secret = "slack"
format = "slack"
on = ["failed", "rolled_back"]

[[notify]]
url = "http://127.0.0.1:{dead}/down"

[[job]]
name = "ok"
command = ["true"]

[[job]]
name = "bad"
shell = true
command = "echo broken; exit 3"
"#,
        slack = secrets.path().join("slack").display(),
        dead = common::free_port()
    );
    let dir = common::config_dir(&config, &[]);
    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.expect("store");
    let mut cfg = SchedulerConfig::new("notify", dir.path().join(".slipway/work"));
    cfg.poll = Duration::from_millis(100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "notify-test".into() });
    let http = slipway::http::builder().build().expect("client");
    let base = format!("http://{}", node.addr);
    for job in ["ok", "bad"] {
        let r = http.post(format!("{base}/api/v1/events")).json(&serde_json::json!({"kind": "run", "jobs": [job]})).send().await.expect("post");
        assert_eq!(r.status().as_u16(), 202);
    }
    // started + succeeded, started + failed on JSON (one of them twice:
    // refused, then retried); failed on Slack.
    let got = common::eventually(Duration::from_secs(15), "five JSON notifications of three kinds and one on Slack", || async {
        let got = seen.lock().unwrap().clone();
        let json_events: Vec<&str> = got.iter().filter(|(k, _)| k == "json").filter_map(|(_, b)| b["event"].as_str()).collect();
        let distinct: std::collections::BTreeSet<&str> = json_events.iter().copied().collect();
        if distinct.len() == 3 && json_events.len() >= 5 && got.iter().any(|(k, _)| k == "slack") { Ok(got) } else { Err(format!("{got:?}")) }
    })
    .await;
    let json: Vec<&Value> = got.iter().filter(|(k, _)| k == "json").map(|(_, b)| b).collect();
    let events: std::collections::BTreeSet<&str> = json.iter().filter_map(|b| b["event"].as_str()).collect();
    assert_eq!(events.into_iter().collect::<Vec<_>>(), ["deployment.failed", "deployment.started", "deployment.succeeded"], "{got:?}");
    assert_eq!(json.len(), 5, "four notifications, the first one retried: {got:?}");
    let failed = json.iter().find(|b| b["event"] == "deployment.failed").expect("failed");
    assert!(failed["deployment"]["reason"].as_str().unwrap_or("").contains("exit code 3"), "{failed}");
    let slack: Vec<&Value> = got.iter().filter(|(k, _)| k == "slack").map(|(_, b)| b).collect();
    assert_eq!(slack.len(), 1, "only `on = [\"failed\", …]`: {got:?}");
    assert!(slack[0]["text"].as_str().unwrap_or("").contains("deployment #2 failed"), "{}", slack[0]);
    node.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
}

/// Deployments that end without the scheduler running them — superseded
/// by a newer deploy while waiting, or cancelled while waiting — are
/// notified too (`on` lists both among its defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_superseded_and_cancelled_waiting_deployments_are_notified() {
    let (url, seen) = receiver().await;
    let config = format!(
        r#"
[[environment]]
name = "prod"
approval = true

[[notify]]
url = "{url}/gone"
on = ["superseded", "cancelled"]

[[service]]
name = "api"

[[job]]
name = "api-deploy"
service = "api"
command = ["true"]
"#
    );
    let dir = common::config_dir(&config, &[]);
    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.expect("store");
    let mut cfg = SchedulerConfig::new("notify-gone", dir.path().join(".slipway/work"));
    cfg.poll = Duration::from_millis(100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "notify-gone-test".into() });
    let http = slipway::http::builder().build().expect("client");
    let base = format!("http://{}", node.addr);
    let mut ids = Vec::new();
    for version in ["1.0", "2.0"] {
        let r = http
            .post(format!("{base}/api/v1/events"))
            .json(&serde_json::json!({"kind": "deploy", "service": "api", "version": version, "environment": "prod"}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 202);
        let body: Value = r.json().await.expect("json");
        ids.push(body["deployment_id"].as_i64().expect("id"));
    }
    let r = http.post(format!("{base}/api/v1/deployments/{}/cancel", ids[1])).send().await.expect("cancel");
    assert_eq!(r.status().as_u16(), 202);
    let got = common::eventually(Duration::from_secs(15), "two distinct notifications", || async {
        let mut got =
            seen.lock().unwrap().iter().map(|(_, b)| (b["event"].as_str().unwrap_or("").to_string(), b["deployment"]["id"].as_i64())).collect::<Vec<_>>();
        got.sort();
        got.dedup();
        if got.len() >= 2 { Ok(got) } else { Err(format!("{got:?}")) }
    })
    .await;
    assert_eq!(got, [("deployment.cancelled".to_string(), Some(ids[1])), ("deployment.superseded".to_string(), Some(ids[0]))], "{got:?}");
    node.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
}
