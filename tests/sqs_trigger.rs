//! Issue 16, the SQS deploy trigger against moto's server, through the
//! real binary: a queue (visibility 2 s) with a dead-letter queue after 2
//! receives (tests/fixtures/moto_sqs.py), `[aws] endpoint` = moto, and a
//! job-only service that follows an ECR image with `auto_deploy`.
//!
//! The crash test puts a small HTTP proxy between Slipway and moto that
//! holds `DeleteMessage`: the node is killed (SIGKILL) exactly after the
//! deployment was recorded and before the message was deleted, once it
//! has extended the message's visibility past its timeout meanwhile.
//!
//! moto comes from PyPI (`scripts/test.sh` installs it and sets
//! `SLIPWAY_MOTO`); without it the tests are skipped with a note, unless
//! `SLIPWAY_REQUIRE_MOTO=1`.
#![cfg(feature = "aws")]

mod common;

use common::moto::Moto;

use std::path::PathBuf;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

const WEB: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/web";
const API: &str = "registry.example.com/team/api";
const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const AWS_ENV: [(&str, &str); 4] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_CONFIG_FILE", "/dev/null")];
const WAIT: Duration = Duration::from_secs(60);

/// The queue and its dead-letter queue.
struct Queues<'a> {
    moto: &'a Moto,
    queue: String,
    dlq: String,
}

impl Queues<'_> {
    fn setup(moto: &Moto) -> Queues<'_> {
        let v = fixture(moto, &["setup"]);
        Queues { moto, queue: v["queue_url"].as_str().unwrap().into(), dlq: v["dlq_url"].as_str().unwrap().into() }
    }

    fn send(&self, body: &str) -> String {
        fixture(self.moto, &["send", &self.queue, body])["message_id"].as_str().unwrap().to_string()
    }

    /// (visible, in flight, the dead-letter queue's bodies).
    fn show(&self) -> (i64, i64, Vec<String>) {
        let v = fixture(self.moto, &["show", &self.queue, &self.dlq]);
        let dlq = v["dlq"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect();
        (v["visible"].as_i64().unwrap(), v["in_flight"].as_i64().unwrap(), dlq)
    }

    fn wait_empty(&self, what: &str) {
        common::wait_for(WAIT, what, || {
            let (visible, in_flight, _) = self.show();
            if visible == 0 && in_flight == 0 { Ok(()) } else { Err(format!("{visible} visible, {in_flight} in flight")) }
        });
    }
}

fn fixture(m: &Moto, args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moto_sqs.py");
    let mut argv = vec![script.to_str().unwrap(), args[0], &m.url];
    argv.extend(&args[1..]);
    let out = common::run_with_stdin(m.bin.join("python"), &argv, "", Duration::from_secs(60));
    assert!(out.status.success(), "moto_sqs.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("fixture JSON")
}

fn config(endpoint: &str, queue: &str) -> String {
    format!(
        r#"
[[environment]]
name = "staging"

[aws]
region = "eu-west-1"
endpoint = "{endpoint}"

[sqs]
queue_url = "{queue}"

[[service]]
name = "web"
follows = "{WEB}"
auto_deploy = ["staging"]

[[service]]
name = "api"
follows = "{API}"

[[job]]
name = "deploy-web"
service = "web"
command = ["true"]

[[job]]
name = "deploy-api"
service = "api"
command = ["true"]
"#
    )
}

/// The deployments of `service`, by version.
fn deployments(server: &common::Server, service: &str) -> Vec<String> {
    let all = common::get_json(&format!("{}/api/v1/deployments?limit=1000", server.url));
    all.as_array().unwrap().iter().filter(|d| d["service"] == service).map(|d| d["version"].as_str().unwrap_or("").to_string()).collect()
}

fn audit(server: &common::Server) -> Vec<String> {
    let all = common::get_json(&format!("{}/api/v1/audit?limit=1000", server.url));
    all.as_array().unwrap().iter().filter(|a| a["actor"] == "sqs").map(|a| format!("{} {}: {}", a["status"], a["action"], a["detail"])).collect()
}

fn own(image: &str, version: &str, digest: Option<&str>) -> String {
    let mut v = json!({"image": image, "version": version});
    if let Some(d) = digest {
        v["digest"] = d.into();
    }
    v.to_string()
}

fn ecr_push(repository: &str, tag: &str, digest: &str) -> String {
    json!({
        "version": "0", "id": format!("0b7c1e2a-0000-4000-8000-{:012}", rand::random::<u32>()), "detail-type": "ECR Image Action", "source": "aws.ecr",
        "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "eu-west-1", "resources": [],
        "detail": {"result": "SUCCESS", "repository-name": repository, "image-digest": digest, "action-type": "PUSH", "image-tag": tag}
    })
    .to_string()
}

#[test]
fn issue16_sqs_deploys_once_deduplicates_dead_letters_malformed_and_respects_auto_deploy() {
    let Some(m) = common::moto::start() else { return };
    let q = Queues::setup(&m);
    let dir = common::config_dir(&config(&m.url, &q.queue), &[]);
    let server = common::Server::start_with_env(dir.path(), Some(&common::sqlite_url(dir.path())), &[], &AWS_ENV);
    let diag = || format!("audit: {:#?}\nlog:\n{}", audit(&server), server.log_text());

    // Slipway's own shape: deployed, once, and the message deleted.
    q.send(&own(WEB, "1.0.0", None));
    common::wait_for_diag(WAIT, "web 1.0.0 to deploy", diag, || deployments(&server, "web").contains(&"1.0.0".to_string()).then_some(()));
    q.wait_empty("the message to be deleted");
    assert_eq!(deployments(&server, "web"), ["1.0.0"]);

    // The same publication twice (two messages), and an ECR push event
    // announcing the same image, tag and digest as a third message: one
    // deployment.
    q.send(&own(WEB, "1.1.0", Some(D1)));
    q.send(&own(WEB, "1.1.0", Some(D1)));
    q.send(&ecr_push("team/web", "1.1.0", D1));
    q.wait_empty("the three messages to be deleted");
    common::wait_for_diag(WAIT, "all three handled", diag, || (audit(&server).iter().filter(|a| a.contains("1.1.0")).count() >= 3).then_some(()));
    assert_eq!(deployments(&server, "web").iter().filter(|v| *v == "1.1.0").count(), 1, "{}", diag());

    // An ECR push of a new tag deploys by itself.
    q.send(&ecr_push("team/web", "1.2.0", D2));
    common::wait_for_diag(WAIT, "web 1.2.0 from the ECR event", diag, || deployments(&server, "web").contains(&"1.2.0".to_string()).then_some(()));

    // A malformed message, then a good one: the good one deploys while the
    // malformed one backs off; the malformed one ends in the dead-letter
    // queue, audited, never deleted.
    q.send("{\"image\": \"a/b\", \"version\": \"1.0; reboot\"}");
    q.send(&own(WEB, "1.3.0", None));
    common::wait_for_diag(WAIT, "web 1.3.0 after the malformed message", diag, || deployments(&server, "web").contains(&"1.3.0".to_string()).then_some(()));
    common::wait_for(WAIT, "the malformed message in the dead-letter queue", || {
        let (visible, in_flight, dlq) = q.show();
        if visible == 0 && in_flight == 0 && dlq.len() == 1 { Ok(dlq) } else { Err(format!("{visible} visible, {in_flight} in flight, dlq {dlq:?}")) }
    });
    let malformed: Vec<String> = audit(&server).into_iter().filter(|a| a.contains("malformed message")).collect();
    // Read twice (maxReceiveCount 2), backed off in between, then moved.
    assert_eq!(malformed.len(), 2, "{malformed:#?}");
    assert!(malformed.iter().all(|a| a.starts_with("400") && a.contains("invalid version")), "{malformed:#?}");
    assert!(malformed.iter().any(|a| a.contains("(receive 1)")) && malformed.iter().any(|a| a.contains("(receive 2)")), "{malformed:#?}");

    // A service without auto_deploy: recorded as held, not deployed.
    q.send(&own(API, "3.0.0", None));
    q.wait_empty("the api message to be deleted");
    common::wait_for_diag(WAIT, "the api publication audited", diag, || audit(&server).into_iter().find(|a| a.contains("api 3.0.0 in staging held")));
    assert!(audit(&server).iter().any(|a| a.contains("auto_deploy is off for staging")), "{}", diag());
    assert!(deployments(&server, "api").is_empty(), "{}", diag());
    assert_eq!(deployments(&server, "web"), ["1.3.0", "1.2.0", "1.1.0", "1.0.0"], "newest first, each once");
}

/// An HTTP proxy to moto that, while `hold` is set, never answers
/// `DeleteMessage` (and counts those it holds), and counts
/// `ChangeMessageVisibility` calls.
struct Proxy {
    url: String,
    hold: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    extended: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

fn proxy(upstream: &str) -> Proxy {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (hold, held, extended) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let http = slipway::http::builder().timeout(Duration::from_secs(60)).build().expect("client");
    let (upstream, h, c, e) = (upstream.to_string(), hold.clone(), held.clone(), extended.clone());
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (http, upstream, hold, held, extended) = (http.clone(), upstream.clone(), h.clone(), c.clone(), e.clone());
        async move {
            let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            if target == "AmazonSQS.ChangeMessageVisibility" {
                extended.fetch_add(1, Ordering::SeqCst);
            }
            if target == "AmazonSQS.DeleteMessage" && hold.load(Ordering::SeqCst) {
                held.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut out = http.request(parts.method, format!("{upstream}{path}")).body(body);
            for (k, v) in &parts.headers {
                if k != "host" {
                    out = out.header(k, v);
                }
            }
            match out.send().await {
                Ok(r) => {
                    let mut resp = axum::http::Response::builder().status(r.status());
                    for (k, v) in r.headers() {
                        if k != "transfer-encoding" && k != "content-length" {
                            resp = resp.header(k, v);
                        }
                    }
                    resp.body(axum::body::Body::from(r.bytes().await.unwrap_or_default())).expect("response")
                }
                Err(e) => axum::http::Response::builder().status(502).body(axum::body::Body::from(e.to_string())).expect("response"),
            }
        }
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    Proxy { url, hold, held, extended, _rt: rt }
}

#[test]
fn issue16_sqs_a_node_killed_before_deleting_deploys_once_after_a_restart() {
    let Some(m) = common::moto::start() else { return };
    let q = Queues::setup(&m);
    let p = proxy(&m.url);
    let dir = common::config_dir(&config(&p.url, &q.queue), &[]);
    let store = common::sqlite_url(dir.path());
    let args = ["--node-id", "sqs-node"];
    let mut server = common::Server::start_with_env(dir.path(), Some(&store), &args, &AWS_ENV);

    p.hold.store(true, Ordering::SeqCst);
    q.send(&own(WEB, "2.0.0", Some(D1)));
    // The deployment is recorded, and the node is about to delete the
    // message: kill it there.
    common::wait_for_diag(WAIT, "the node to try to delete the message", || server.log_text(), || (p.held.load(Ordering::SeqCst) > 0).then_some(()));
    assert_eq!(deployments(&server, "web"), ["2.0.0"]);
    // Handled (deleting) past its visibility timeout (2 s): extended, so
    // it stays in flight rather than going to another reader.
    let before = p.extended.load(Ordering::SeqCst);
    common::wait_for(WAIT, "three visibility extensions", || (p.extended.load(Ordering::SeqCst) >= before + 3).then_some(()));
    let (visible, in_flight, _) = q.show();
    assert_eq!((visible, in_flight), (0, 1), "still in flight");
    server.kill9();
    p.hold.store(false, Ordering::SeqCst);

    // Restarted: the message comes back (its visibility lapses), is
    // answered as a redelivery, and deleted.
    let server = common::Server::start_with_env(dir.path(), Some(&store), &args, &AWS_ENV);
    q.wait_empty("the redelivered message to be deleted");
    common::wait_for_diag(
        WAIT,
        "the redelivery audited",
        || format!("{:#?}\n{}", audit(&server), server.log_text()),
        || audit(&server).into_iter().find(|a| a.contains("(a redelivery)")),
    );
    assert_eq!(deployments(&server, "web"), ["2.0.0"], "one deployment");
}

/// Two nodes on one PostgreSQL store: only the lease holder reads the
/// queue; killed, the other takes over once the lease lapses.
#[test]
fn issue16_sqs_one_node_reads_the_queue_and_another_takes_over() {
    let Some(m) = common::moto::start() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(pg) = rt.block_on(common::postgres_url()) else { return };
    let q = Queues::setup(&m);
    let dir = common::config_dir(&config(&m.url, &q.queue), &[]);
    let flags = |node: &'static str| ["--lease", "3s", "--poll", "200ms", "--node-id", node];
    let a = common::Server::start_with_env(dir.path(), Some(&pg), &flags("node-a"), &AWS_ENV);
    let b = common::Server::start_with_env(dir.path(), Some(&pg), &flags("node-b"), &AWS_ENV);
    let holder = || -> Option<String> {
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg).await.ok()?;
            sqlx::query_scalar::<_, String>("SELECT holder FROM leases WHERE name = 'sqs'").fetch_optional(&mut c).await.ok()?
        })
    };
    let first = common::wait_for(WAIT, "a node to hold the sqs lease", holder);

    for v in ["4.0.0", "4.0.1", "4.0.2"] {
        q.send(&own(WEB, v, None));
    }
    q.wait_empty("the messages to be deleted");
    let rows = common::wait_for(WAIT, "three audit rows", || {
        let rows = audit(&a);
        if rows.len() >= 3 { Ok(rows) } else { Err(format!("{rows:#?}")) }
    });
    assert!(rows.iter().all(|r| r.contains(&format!("read by node {first}"))), "only {first} reads: {rows:#?}");

    // The holder dies: the other takes the lease and reads on.
    let (mut dead, alive, other) = if first == "node-a" { (a, b, "node-b") } else { (b, a, "node-a") };
    dead.kill9();
    q.send(&own(WEB, "4.1.0", None));
    common::wait_for_diag(
        WAIT,
        "4.1.0 deployed by the other node",
        || alive.log_text(),
        || deployments(&alive, "web").contains(&"4.1.0".to_string()).then_some(()),
    );
    q.wait_empty("the message to be deleted");
    assert_eq!(holder().as_deref(), Some(other));
    let row = audit(&alive).into_iter().find(|r| r.contains("4.1.0")).expect("audited");
    assert!(row.contains(&format!("read by node {other}")), "{row}");
}
