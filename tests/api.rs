//! In-process API tests: a whole node (scheduler + API) on 127.0.0.1:0,
//! against every store backend (SQLite always, PostgreSQL when
//! configured), driven over real HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use slipway::node::{NodeOptions, RunningNode, start_node};
use slipway::scheduler::SchedulerConfig;
use slipway::store::Store;

const CONFIG: &str = r#"
[project]
name = "api-test"

[[environment]]
name = "staging"

[[service]]
name = "api"

[[job]]
name = "prepare"
command = ["./say.sh", "prepare", "0"]
timeout = "30s"

[[job]]
name = "left"
needs = ["prepare"]
command = ["./say.sh", "left", "1"]
timeout = "30s"

[[job]]
name = "right"
needs = ["prepare"]
command = ["./say.sh", "right", "1"]
timeout = "30s"

[[job]]
name = "middle"
needs = ["prepare"]
command = ["./say.sh", "middle", "1"]
timeout = "30s"

[[job]]
name = "deploy"
service = "api"
needs = ["left", "right", "middle"]
command = ["./say.sh", "deploy-{version}", "0"]
timeout = "30s"

[[job]]
name = "slow"
command = ["./say.sh", "slow", "60"]
timeout = "2m"

[[job]]
name = "fails"
command = ["./fail.sh"]
timeout = "10s"

[[job]]
name = "after-fail"
needs = ["fails"]
command = ["true"]
"#;

const SAY: &str = "#!/bin/sh\necho \"$1 says hello from $SLIPWAY_ENV\"\nsleep \"$2\"\necho \"$1 done\" >&2\n";
const FAIL: &str = "#!/bin/sh\necho 'about to fail'\nexit 3\n";

struct Node {
    base: String,
    node: RunningNode,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(backend: &'static str, store: Arc<dyn Store>) -> Node {
        let dir = common::config_dir(CONFIG, &[("say.sh", SAY), ("fail.sh", FAIL)]);
        let mut cfg = SchedulerConfig::new(format!("test-{backend}"), dir.path().join(".slipway/work"));
        cfg.parallelism = 4;
        cfg.poll = Duration::from_millis(100);
        cfg.lease = Duration::from_secs(5);
        cfg.shutdown_grace = Duration::from_secs(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "api-test".into() });
        let base = format!("http://{}", node.addr);
        Node {
            base,
            node,
            http: slipway::http::builder()
                .timeout(Duration::from_secs(20))
                // A refused oversized body makes the server close that
                // connection; a pooled one could be reused mid-close.
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            _dir: dir,
        }
    }

    fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn wait_terminal(&self, id: i64) -> Value {
        common::eventually(Duration::from_secs(60), &format!("deployment {id} to finish"), || async {
            let (status, d) = self.get(&format!("/api/v1/deployments/{id}")).await;
            assert_eq!(status, 200, "{d}");
            if ["queued", "running"].contains(&d["deployment"]["state"].as_str().unwrap()) { Err(d["deployment"].clone()) } else { Ok(d) }
        })
        .await
    }

    async fn wait_job_state(&self, id: i64, job: &str, state: &str) {
        common::eventually(Duration::from_secs(30), &format!("job {job} of deployment {id} to be {state}"), || async {
            let (_, d) = self.get(&format!("/api/v1/deployments/{id}")).await;
            if job_of(&d, job)["state"] == state { Ok(()) } else { Err(job_of(&d, job).clone()) }
        })
        .await
    }

    async fn stop(self) {
        self.node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.node.task).await;
    }
}

fn job_of<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["jobs"].as_array().unwrap().iter().find(|j| j["name"] == name).unwrap_or(&Value::Null)
}

async fn for_each_backend<F, Fut>(f: F)
where
    F: Fn(&'static str, Node) -> Fut,
    Fut: std::future::Future<Output = Node>,
{
    let dir = tempfile::tempdir().unwrap();
    for (backend, store) in common::stores(dir.path()).await {
        let node = Node::start(backend, store).await;
        let node = f(backend, node).await;
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_runs_the_graph_in_parallel_and_records_everything() {
    for_each_backend(|backend, n| async move {
        let (status, accepted) = n.post("/api/v1/events", &json!({"kind": "deploy", "service": "api", "version": "1.4.0", "environment": "staging"})).await;
        assert_eq!(status, 202, "{backend}: {accepted}");
        let id = accepted["deployment_id"].as_i64().unwrap();
        let d = n.wait_terminal(id).await;
        assert_eq!(d["deployment"]["state"], "succeeded", "{backend}: {d}");
        assert_eq!(d["deployment"]["version"], "1.4.0");
        assert_eq!(d["jobs"].as_array().unwrap().len(), 5, "{backend}: service jobs and their needs only");
        // The three middle jobs ran at the same time: each started before
        // any of them finished.
        let starts: Vec<i64> = ["left", "right", "middle"].iter().map(|j| job_of(&d, j)["started_at"].as_i64().unwrap()).collect();
        let ends: Vec<i64> = ["left", "right", "middle"].iter().map(|j| job_of(&d, j)["finished_at"].as_i64().unwrap()).collect();
        assert!(starts.iter().max() < ends.iter().min(), "{backend}: not parallel: {starts:?} {ends:?}");
        // ...and strictly after what they need, strictly before what needs them.
        assert!(job_of(&d, "prepare")["finished_at"].as_i64() <= starts.iter().min().copied());
        assert!(job_of(&d, "deploy")["started_at"].as_i64() >= ends.iter().max().copied());
        assert_eq!(d["attempts"].as_array().unwrap().len(), 5);

        // Output, line by line, with the version substituted in argv
        // (the log writer flushes in batches: the job's last line and
        // Slipway's own end line arrive a moment after the job ends).
        let logs = common::eventually(Duration::from_secs(10), "the deploy job's whole output in its log", || async {
            let (status, logs) = n.get(&format!("/api/v1/deployments/{id}/logs?job=deploy")).await;
            let has = |k: &str, v: &str| logs.as_array().is_some_and(|a| a.iter().any(|l| l[k] == v));
            if status == 200 && has("line", "deploy-1.4.0 done") && has("stream", "slipway") { Ok(logs) } else { Err(format!("{status} {logs}")) }
        })
        .await;
        let lines: Vec<&str> = logs.as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
        assert!(lines.contains(&"deploy-1.4.0 says hello from staging"), "{backend}: {lines:?}");
        assert!(lines.contains(&"deploy-1.4.0 done"), "{backend}: {lines:?}");
        let streams: Vec<&str> = logs.as_array().unwrap().iter().map(|l| l["stream"].as_str().unwrap()).collect();
        assert!(streams.contains(&"stderr") && streams.contains(&"stdout") && streams.contains(&"slipway"));

        // Metrics see the store's counts and this node's durations.
        let metrics = n.http.get(format!("{}/metrics", n.base)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("slipway_jobs{state=\"succeeded\"} 5"), "{backend}: {metrics}");
        assert!(metrics.contains("slipway_deployments{state=\"succeeded\"} 1"), "{metrics}");
        assert!(metrics.contains("slipway_job_duration_seconds_count{outcome=\"succeeded\"} 5"), "{metrics}");
        assert!(metrics.contains("slipway_event_to_start_seconds_count 5"), "{metrics}");
        assert!(metrics.contains("slipway_queue_depth 0"), "{metrics}");
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_event_id_deploys_once() {
    for_each_backend(|backend, n| async move {
        let ev = json!({"kind": "run", "jobs": ["prepare"], "environment": "staging", "id": "push-42"});
        let (s1, a) = n.post("/api/v1/events", &ev).await;
        let (s2, b) = n.post("/api/v1/events", &ev).await;
        assert_eq!((s1, s2), (202, 200), "{backend}");
        assert_eq!(a["deployment_id"], b["deployment_id"]);
        assert_eq!(b["duplicate"], true);
        let (_, list) = n.get("/api/v1/deployments").await;
        assert_eq!(list.as_array().unwrap().len(), 1, "{backend}: {list}");
        n
    })
    .await;
}

// Issue 13: `deploy web 4.2 --id K` after `deploy web 4.1 --id K` answered "already seen" and never deployed 4.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_an_event_id_reused_for_another_request_is_a_conflict_naming_the_first() {
    for_each_backend(|backend, n| async move {
        let first = json!({"kind": "deploy", "service": "api", "version": "4.1", "id": "release-k"});
        let (s, a) = n.post("/api/v1/events", &first).await;
        assert_eq!(s, 202, "{backend}: {a}");
        let id = a["deployment_id"].as_i64().expect("deployment");
        // The same request again, also with its (only) environment named:
        // already seen, the same deployment.
        for again in [first.clone(), json!({"kind": "deploy", "service": "api", "version": "4.1", "environment": "staging", "id": "release-k"})] {
            let (s, b) = n.post("/api/v1/events", &again).await;
            assert_eq!((s, b["duplicate"].as_bool(), b["deployment_id"].as_i64()), (200, Some(true), Some(id)), "{backend}: {b}");
        }
        // Another version, a digest, a run under the same key: 409, naming
        // what the key was first used for and what it started.
        for other in [
            json!({"kind": "deploy", "service": "api", "version": "4.2", "id": "release-k"}),
            json!({"kind": "deploy", "service": "api", "version": "4.1", "digest": "a".repeat(64), "id": "release-k"}),
            json!({"kind": "run", "jobs": ["prepare"], "id": "release-k"}),
        ] {
            let (s, e) = n.post("/api/v1/events", &other).await;
            assert_eq!(s, 409, "{backend}: {other} → {e}");
            let message = e["error"]["message"].as_str().unwrap_or("");
            assert!(
                message.contains(r#"event id "release-k" was already used for deploy api 4.1 in staging"#) && message.contains(&format!("(deployment {id})")),
                "{backend}: {message}"
            );
        }
        // The CLI: exit 6 with that message; the same request, exit 0.
        let config = n.dir().join("slipway.toml");
        let cli = |args: &[&str]| {
            std::process::Command::new(common::slipway_bin())
                .arg("--config")
                .arg(&config)
                .arg("--server")
                .arg(&n.base)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run slipway")
        };
        let out = cli(&["deploy", "api", "4.2", "--id", "release-k", "--detach"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{backend}: {stderr}");
        assert!(stderr.contains("already used for deploy api 4.1 in staging") && stderr.contains("deploy api 4.2 in staging"), "{backend}: {stderr}");
        let out = cli(&["deploy", "api", "4.1", "--id", "release-k", "--detach"]);
        assert_eq!(out.status.code(), Some(0), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("already seen"), "{backend}");
        // 4.2 was never deployed.
        let (_, list) = n.get("/api/v1/deployments").await;
        let versions: Vec<&str> = list.as_array().unwrap().iter().filter_map(|d| d["version"].as_str()).collect();
        assert_eq!(versions, ["4.1"], "{backend}: {list}");
        n.wait_terminal(id).await;
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_skips_dependants_with_reason() {
    for_each_backend(|backend, n| async move {
        let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["after-fail", "prepare"], "environment": "staging"})).await;
        let d = n.wait_terminal(a["deployment_id"].as_i64().unwrap()).await;
        assert_eq!(d["deployment"]["state"], "failed", "{backend}: {d}");
        assert!(d["deployment"]["reason"].as_str().unwrap().contains("\"fails\" failed: exit code 3"), "{d}");
        assert_eq!(job_of(&d, "fails")["exit_code"], 3);
        assert_eq!(job_of(&d, "after-fail")["state"], "skipped");
        assert!(job_of(&d, "after-fail")["reason"].as_str().unwrap().contains("\"fails\""));
        // The independent branch still ran.
        assert_eq!(job_of(&d, "prepare")["state"], "succeeded");
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_running_jobs_and_skips_the_rest() {
    for_each_backend(|backend, n| async move {
        let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["slow"], "environment": "staging"})).await;
        let id = a["deployment_id"].as_i64().unwrap();
        n.wait_job_state(id, "slow", "running").await;
        let (status, c) = n.post(&format!("/api/v1/deployments/{id}/cancel"), &json!({})).await;
        assert_eq!(status, 202, "{backend}: {c}");
        let d = n.wait_terminal(id).await;
        assert_eq!(d["deployment"]["state"], "cancelled", "{backend}: {d}");
        assert_eq!(job_of(&d, "slow")["state"], "cancelled");
        // Cancelling again is a conflict, not a silent success.
        let (status, e) = n.post(&format!("/api/v1/deployments/{id}/cancel"), &json!({})).await;
        assert_eq!(status, 409, "{e}");
        assert_eq!(e["error"]["kind"], "conflict");
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newer_deploy_supersedes_a_queued_one() {
    for_each_backend(|backend, n| async move {
        // The first deploy runs (and holds the service's lock), the second
        // waits for it, the third supersedes the second.
        let ev = |v: &str| json!({"kind": "deploy", "service": "api", "version": v, "environment": "staging"});
        let (_, d1) = n.post("/api/v1/events", &ev("1.0.0")).await;
        n.wait_job_state(d1["deployment_id"].as_i64().unwrap(), "left", "running").await;
        let (_, d2) = n.post("/api/v1/events", &ev("1.0.1")).await;
        let (_, d3) = n.post("/api/v1/events", &ev("1.0.2")).await;
        let (id1, id2, id3) = (d1["deployment_id"].as_i64().unwrap(), d2["deployment_id"].as_i64().unwrap(), d3["deployment_id"].as_i64().unwrap());
        assert_eq!(d3["superseded"], json!([id2]), "{backend}: {d3}");
        let (_, two) = n.get(&format!("/api/v1/deployments/{id2}")).await;
        assert_eq!(two["deployment"]["state"], "superseded");
        assert_eq!(two["deployment"]["superseded_by"], id3);
        assert_eq!(n.wait_terminal(id1).await["deployment"]["state"], "succeeded");
        assert_eq!(n.wait_terminal(id3).await["deployment"]["state"], "succeeded");
        // At most one deployment of the service ran at a time.
        let (_, one) = n.get(&format!("/api/v1/deployments/{id1}")).await;
        let (_, three) = n.get(&format!("/api/v1/deployments/{id3}")).await;
        assert!(three["deployment"]["started_at"].as_i64() >= one["deployment"]["finished_at"].as_i64(), "{backend}: overlapping deploys");
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    for_each_backend(|backend, n| async move {
        let cases: Vec<(Value, u16, &str)> = vec![
            (json!({"kind": "deploy", "service": "api", "version": "$(touch x)", "environment": "staging"}), 400, "invalid version"),
            (json!({"kind": "deploy", "service": "api", "version": "../../etc", "environment": "staging"}), 400, "invalid version"),
            (json!({"kind": "deploy", "service": "api"}), 400, "needs `version`"),
            (json!({"kind": "run", "jobs": ["nope"], "environment": "staging"}), 400, "unknown job \"nope\""),
            (json!({"kind": "run", "jobs": ["prepare"], "environment": "prod"}), 400, "unknown environment \"prod\""),
            (json!({"kind": "run", "jobs": []}), 400, "at least one job"),
            (json!({"kind": "launch"}), 400, "unknown variant"),
            (json!({"kind": "run", "jobs": ["prepare"], "colour": "red"}), 400, "unknown field"),
            (json!({"kind": "run", "jobs": ["prepare"], "id": "bad id with spaces"}), 400, "invalid event id"),
        ];
        for (body, status, needle) in cases {
            let (s, e) = n.post("/api/v1/events", &body).await;
            assert_eq!(s, status, "{backend}: {body} -> {e}");
            assert!(e["error"]["message"].as_str().unwrap_or("").contains(needle), "{backend}: {body} -> {e}");
        }
        let (s, e) = n.post_raw("/api/v1/events", b"{not json".to_vec()).await;
        assert_eq!(s, 400, "{e}");
        assert_eq!(e["error"]["kind"], "bad_request");
        let (s, e) = n.post_raw("/api/v1/events", vec![b' '; 200_000]).await;
        assert_eq!(s, 413, "{e}");
        assert_eq!(e["error"]["kind"], "payload_too_large");
        let (s, e) = n.get("/api/v1/deployments/12345").await;
        assert_eq!((s, e["error"]["kind"].as_str()), (404, Some("not_found")));
        let (s, _) = n.get("/api/v1/deployments/abc").await;
        assert_eq!(s, 400);
        // Issue 13 (schemathesis): a NUL byte in a job filter failed
        // PostgreSQL's query with a 500; it is bad input.
        for path in ["/api/v1/deployments/12345/logs?job=a%00b", "/api/v1/deployments/12345/logs/stream?job=a%00b"] {
            let (s, e) = n.get(path).await;
            assert_eq!((s, e["error"]["kind"].as_str()), (400, Some("bad_request")), "{backend}: {path} -> {e}");
        }
        let (s, _) = n.get("/api/v1/deployments?limit=0").await;
        assert_eq!(s, 400);
        let (s, e) = n.get("/api/v1/deployments?state=bogus").await;
        assert_eq!(s, 400, "{e}");
        let (s, _) = n.get("/api/v1/nope").await;
        assert_eq!(s, 404);
        // Nothing was created by any of it.
        let (_, list) = n.get("/api/v1/deployments").await;
        assert_eq!(list, json!([]), "{backend}");
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_config_on_disk_is_422_with_places_and_keeps_what_was_accepted() {
    for_each_backend(|backend, n| async move {
        let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["prepare"], "environment": "staging"})).await;
        let first = a["deployment_id"].as_i64().unwrap();
        let path = n.dir().join("slipway.toml");
        let good = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            good.replace("needs = [\"prepare\"]\ncommand = [\"./say.sh\", \"left\"", "needs = [\"prepar\"]\ncommand = [\"./say.sh\", \"left\""),
        )
        .unwrap();
        let (s, e) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["prepare"], "environment": "staging"})).await;
        assert_eq!(s, 422, "{backend}: {e}");
        assert_eq!(e["error"]["kind"], "invalid_config");
        let p = &e["error"]["problems"][0];
        assert_eq!(p["kind"], "unknown-reference", "{e}");
        assert!(p["line"].as_u64().unwrap() > 1 && p["column"].as_u64().unwrap() > 1, "{e}");
        assert_eq!(p["hint"], "did you mean \"prepare\"?");
        std::fs::write(&path, good).unwrap();
        // The deployment accepted before is intact and runs to the end.
        assert_eq!(n.wait_terminal(first).await["deployment"]["state"], "succeeded");
        let (_, list) = n.get("/api/v1/deployments").await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_stream_delivers_lines_then_end() {
    for_each_backend(|backend, n| async move {
        let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["left"], "environment": "staging"})).await;
        let id = a["deployment_id"].as_i64().unwrap();
        let text = n.http.get(format!("{}/api/v1/deployments/{id}/logs/stream", n.base)).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("event: line"), "{backend}: {text}");
        assert!(text.contains("left says hello from staging"), "{backend}: {text}");
        let end = text.find("event: end").expect("end event");
        assert!(text.rfind("event: line").unwrap() < end, "lines come before the end event");
        assert!(text[end..].contains("\"state\":\"succeeded\""), "{text}");
        // Resuming after the last id gives only the end.
        let last_id: i64 = text.lines().filter_map(|l| l.strip_prefix("id: ")).next_back().unwrap().parse().unwrap();
        let rest = n
            .http
            .get(format!("{}/api/v1/deployments/{id}/logs/stream", n.base))
            .header("Last-Event-ID", last_id.to_string())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!rest.contains("event: line"), "{rest}");
        assert!(rest.contains("event: end"));
        n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openapi_and_health_are_served() {
    for_each_backend(|backend, n| async move {
        let (s, doc) = n.get("/api/v1/openapi.json").await;
        assert_eq!(s, 200);
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        for path in
            ["/api/v1/events", "/api/v1/deployments", "/api/v1/deployments/{id}", "/api/v1/deployments/{id}/logs/stream", "/api/v1/deployments/{id}/cancel"]
        {
            assert!(doc["paths"][path].is_object(), "{backend}: {path} missing from OpenAPI");
        }
        assert!(doc["components"]["schemas"]["EventRequest"].is_object());
        let (s, h) = n.get("/healthz").await;
        assert_eq!((s, h["status"].as_str(), h["store"].as_str()), (200, Some("ok"), Some("ok")), "{h}");
        n
    })
    .await;
}

/// The store goes away mid-run: the API says 503 with the reason, the
/// node keeps going, and once the store is back the deployment accepted
/// before the outage finishes: nothing accepted is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_is_503_and_nothing_accepted_is_lost() {
    let Some(pg) = common::PgServer::start() else {
        if std::env::var("SLIPWAY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!("PostgreSQL binaries are required (SLIPWAY_REQUIRE_POSTGRES=1)");
        }
        eprintln!("note: skipped: no PostgreSQL binaries under /usr/lib/postgresql");
        return;
    };
    let store = slipway::store::open(&pg.url()).await.expect("store");
    let n = Node::start("outage", store).await;
    let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["left"], "environment": "staging"})).await;
    let id = a["deployment_id"].as_i64().unwrap();
    n.wait_job_state(id, "left", "running").await;
    assert!(pg.ctl("stop"), "stop PostgreSQL");

    let (s, h) = n.get("/healthz").await;
    assert_eq!((s, h["status"].as_str()), (503, Some("degraded")), "{h}");
    let (s, e) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["prepare"], "environment": "staging"})).await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["error"]["kind"], "store_unavailable", "{e}");
    let (s, e) = n.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!((s, e["error"]["kind"].as_str()), (503, Some("store_unavailable")), "{e}");

    // The job ends while the store is down; its result is recorded once
    // the store is back (within its lease). Scenario, not a wait for a
    // condition: the outage lasts past the job's end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pg.ctl("start"), "start PostgreSQL again");
    let d = n.wait_terminal(id).await;
    assert_eq!(d["deployment"]["state"], "succeeded", "{d}");
    assert_eq!(job_of(&d, "left")["attempt"], 1, "{d}");
    let (s, _) = n.get("/healthz").await;
    assert_eq!(s, 200);
    n.stop().await;
}

/// A follower's read waits on the node for the deployment to change, and
/// answers with the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_a_long_poll_answers_when_the_deployment_changes() {
    for_each_backend(|backend, n| async move {
        let (_, a) = n.post("/api/v1/events", &json!({"kind": "run", "jobs": ["left"], "environment": "staging"})).await;
        let id = a["deployment_id"].as_i64().unwrap();
        n.wait_job_state(id, "left", "running").await;
        let (_, before) = n.get(&format!("/api/v1/deployments/{id}")).await;
        let seq = before["seq"].as_u64().unwrap_or_else(|| panic!("{backend}: no seq in {before}"));
        if job_of(&before, "left")["state"] == "running" {
            // Nothing changes until `left` ends (1 s after it started):
            // the read is answered then, with the change, not at the end
            // of its 2 s (a few reads, should the job start slowly).
            let mut after = Value::Null;
            for _ in 0..5 {
                let (status, read) = n.get(&format!("/api/v1/deployments/{id}?wait_ms=2000&after={seq}")).await;
                assert_eq!(status, 200, "{backend}: {read}");
                after = read;
                if job_of(&after, "left")["state"] != "running" {
                    break;
                }
            }
            assert_ne!(job_of(&after, "left")["state"], "running", "{backend}: {after}");
            assert!(after["seq"].as_u64().unwrap() > seq, "{backend}: {after}");
        }
        let done = n.wait_terminal(id).await;
        assert_eq!(done["deployment"]["state"], "succeeded", "{backend}: {done}");
        // A finished deployment never changes again: answered at once.
        let (status, again) = n.get(&format!("/api/v1/deployments/{id}?wait_ms=2000&after={}", done["seq"])).await;
        assert_eq!((status, &again["deployment"]["state"]), (200, &json!("succeeded")), "{backend}: {again}");
        // A bad query is a 400 that names it.
        // (`after` beyond i64 is what the contract test sent in CI: the
        // document says int64, so it must be refused.)
        for (bad_query, named) in [
            ("wait_ms=soon&after=1", "wait_ms"),
            ("wait_ms=2001&after=1", "wait_ms"),
            ("wait_ms=-1&after=1", "wait_ms"),
            ("wait_ms=10&after=-1", "after"),
            ("wait_ms=10&after=9223372036854775808", "after"),
        ] {
            let (status, bad) = n.get(&format!("/api/v1/deployments/{id}?{bad_query}")).await;
            assert_eq!(status, 400, "{backend} {bad_query}: {bad}");
            assert!(bad.to_string().contains(named), "{backend} {bad_query}: {bad}");
        }
        n
    })
    .await;
}

/// A client that never finishes sending its request does not hold up a
/// stopping node. The API gives open connections 5 s to close and then
/// abandons them, but an abandoned connection lives on in its own task,
/// holding the API's state and with it the event bus, so the event
/// consumers never saw their streams end: the node waited out its whole
/// stop deadline on top (15 s in all, warning that the last job output
/// might not be stored). Found by fuzzing the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue19_a_client_that_never_finishes_its_request_does_not_hold_up_a_stopping_node() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let store = slipway::store::open(&common::sqlite_url(dir.path())).await.unwrap();
    let n = Node::start("sqlite", store).await;
    let mut slow = tokio::net::TcpStream::connect(n.node.addr).await.unwrap();
    slow.write_all(b"POST /api/v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"kind\":").await.unwrap();
    // The server has the connection (and the head) before the stop.
    let (status, _) = n.get("/healthz").await;
    assert_eq!(status, 200);
    let asked = std::time::Instant::now();
    n.node.shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(60), n.node.task).await;
    let took = asked.elapsed();
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the node did not stop cleanly: {ended:?}");
    assert!(
        took < slipway::node::STOP_DEADLINE,
        "stopping took {took:?}: the node waited out its stop deadline for consumers held by the abandoned connection"
    );
    drop(slow);
}
