//! The docker target against the real Docker Engine on this machine.
//!
//! No image can be pulled here, so the test assembles one: a root
//! filesystem holding the demo binary and the shared libraries it links
//! (from `ldd`), imported through the Engine API. Without a reachable
//! Engine the tests are skipped with a message, unless
//! `SLIPWAY_REQUIRE_DOCKER=1` (set by scripts/test.sh when dockerd runs),
//! which makes a missing Engine a failure.

mod common;
#[path = "common/docker.rs"]
mod dockerkit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use dockerkit::{IMAGE, Registry, engine, get, image, other_image};
use futures_util::StreamExt;
use slipway::targets::docker::{DockerTarget, LABEL_OWNER, LABEL_SERVICE, LABEL_VERSION};
use slipway::targets::{InstanceRequest, Target};

fn request(version: &str, argv: &[&str]) -> InstanceRequest {
    InstanceRequest {
        service: "web".into(),
        environment: "test".into(),
        version: version.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        workdir: std::env::temp_dir(),
        image: Some(IMAGE.into()),
        settings: slipway::targets::Settings::of(&serde_json::json!({ "port": 8080, "memory_bytes": null, "millicpus": null })),
        deployment_id: 7,
        spec_digest: "test".into(),
        secret_env: BTreeMap::new(),
        secret_files: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_instance_serves_carries_labels_and_stops() {
    let Some(t) = engine().await else { return };
    image(&t).await;
    let i =
        t.start_instance(request("1.0", &["/demo", "serve", "--host", "0.0.0.0", "--port", "{port}", "--version", "1.0"])).await.expect("start a container");
    // Where it is reached is the target's choice.
    let port = i.addr().port();
    assert!(i.id().starts_with("container "), "{}", i.id());
    let body = tokio::task::spawn_blocking(move || common::wait_for(Duration::from_secs(20), "the container to answer", || get(port))).await.expect("join");
    assert_eq!(body, "hello from demo 1.0");
    assert!(i.exit().is_none());

    let containers = t.client().list_containers(Some(ListContainersOptionsBuilder::default().all(true).build())).await.expect("list containers");
    let ours = containers.iter().find(|c| c.ports.iter().flatten().any(|p| p.public_port == Some(port))).expect("our container is listed");
    let labels = ours.labels.clone().unwrap_or_default();
    assert_eq!(labels.get(LABEL_SERVICE).map(String::as_str), Some("web"));
    assert_eq!(labels.get(LABEL_VERSION).map(String::as_str), Some("1.0"));
    assert!(labels.contains_key(LABEL_OWNER), "{labels:?}");
    let id = ours.id.clone().expect("id");

    i.stop(Duration::from_secs(2)).await;
    assert!(i.exit().is_some(), "stopped");
    assert!(get(port).is_none(), "nothing answers after stop");
    assert!(t.client().inspect_container(&id, None::<InspectContainerOptions>).await.is_err(), "the container is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_says_its_exit_code_and_last_output() {
    let Some(t) = engine().await else { return };
    image(&t).await;
    let i: Arc<dyn slipway::targets::Instance> =
        t.start_instance(request("1.0", &["/demo", "migrate", "--file", "/no/such/dir/log", "--version", "1.0"])).await.expect("start a container");
    tokio::time::timeout(Duration::from_secs(20), i.exited()).await.expect("it exits");
    let why = i.exit().unwrap_or_default();
    assert!(why.contains("exit code 1"), "{why}");
    let out = i.last_output().join("\n");
    assert!(out.contains("cannot write /no/such/dir/log"), "its own log, without `docker logs`: {out:?}");
    i.stop(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_is_a_clear_error() {
    let Some(t) = engine().await else { return };
    let mut req = request("1.0", &[]);
    req.image = Some("slipway-test/no-such-image:1".into());
    let e = t.start_instance(req).await.err().expect("refused");
    assert!(e.message.contains("slipway-test/no-such-image:1") && e.message.to_lowercase().contains("no such image"), "{e}");
}

/// A Slipway serving `config` (from a temp dir), with the containers of its
/// installation removed when the test ends. Bound in this order, they drop
/// in the reverse one: the server first, then its containers, then the dir.
fn serve(config: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, dockerkit::ScopeCleanup, common::Server) {
    let dir = common::config_dir(config, &[]);
    let cleanup = dockerkit::ScopeCleanup::of(dir.path());
    let server = common::Server::start_with_env(dir.path(), None, &[], env);
    (dir, cleanup, server)
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn docker_config(port: u16, image: &str) -> String {
    format!(
        r#"
[[environment]]
name = "staging"

[[service]]
name = "web"
target = "docker"
image = "{image}"
port = 8080
memory = "64m"
cpus = 0.5
listen = "127.0.0.1:{port}"
instances = 2
command = ["/demo", "serve", "--host", "0.0.0.0", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 2, deadline = "5s" }}
rollout = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "300ms" }}
migrate = {{ command = ["/demo", "migrate", "--file", "/migrations.log", "--version", "{{version}}"] }}
"#
    )
}

#[test]
fn containers_roll_out_and_back_under_load_without_a_failed_request() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "2.0", "3.0"]));
    let port = common::free_port();
    let (dir, _cleanup, server) = serve(&docker_config(port, &registry.repo()), &[]);
    let deploy = |v: &str| server.cli(dir.path(), &["deploy", "web", v, "--env", "staging"]);

    let out = deploy("1.0");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));
    // The migration ran once, in a one-off container of the pinned image
    // (the demo's path exists only there), its output in the record.
    let logs = server.cli(dir.path(), &["logs", "1", "web.migrate"]);
    assert!(text(&logs).contains("migration to 1.0 applied (/migrations.log)"), "{}", text(&logs));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = common::load(port, stop.clone());
    // Load before and after the rollouts (scenario, not waits).
    std::thread::sleep(Duration::from_millis(300));
    let two = deploy("2.0");
    let three = deploy("3.0");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, errors) = loader.join().expect("load");
    assert!(two.status.success(), "{}", text(&two));
    assert!(ok > 100, "{ok} requests");
    assert_eq!(failed, 0, "{failed} failed: {errors:?}");
    assert_eq!(three.status.code(), Some(1), "{}", text(&three));
    assert!(text(&three).contains("rolled back to 2.0") && text(&three).contains("GET /healthz → 500"), "{}", text(&three));
    assert_eq!(get(port).as_deref(), Some("hello from demo 2.0"));

    // Two containers of 2.0 run, labelled, with the limits asked for.
    let containers = rt
        .block_on(t.client().list_containers(Some(
            ListContainersOptionsBuilder::default().filters(&std::collections::HashMap::from([("label", vec!["slipway.service=web"])])).build(),
        )))
        .expect("list");
    let ours: Vec<_> = containers
        .iter()
        .filter(|c| c.ports.iter().flatten().any(|p| p.public_port.is_some()))
        .filter(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER)).is_some_and(|o| o.starts_with(&format!("{}.", server.child.id()))))
        .collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    assert!(ours.iter().all(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_VERSION)).map(String::as_str) == Some("2.0")));
    let id = ours[0].id.clone().expect("id");
    let info = rt.block_on(t.client().inspect_container(&id, None::<InspectContainerOptions>)).expect("inspect");
    let hc = info.host_config.expect("host config");
    assert_eq!((hc.memory, hc.nano_cpus), (Some(64 << 20), Some(500_000_000)));

    // A graceful stop removes them.
    let mut server = server;
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let _ = server.child.wait();
    let left = rt.block_on(t.client().inspect_container(&id, None::<InspectContainerOptions>));
    assert!(left.is_err(), "stopped with its node");
}

#[test]
fn the_digest_pinned_when_the_deploy_is_accepted_runs_even_if_the_tag_moves() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "3.0", "4.0"]));
    let port = common::free_port();
    let (dir, _cleanup, server) = serve(&docker_config(port, &registry.repo()), &[]);
    assert!(server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]).status.success());

    // Unknown tag: refused when the deploy is asked for, saying why.
    let unknown = server.cli(dir.path(), &["deploy", "web", "9.9", "--env", "staging"]);
    assert_eq!(unknown.status.code(), Some(6), "{}", text(&unknown));
    assert!(text(&unknown).contains(&format!("{}:9.9", registry.repo())), "{}", text(&unknown));

    // 3.0 holds the service's lock for its health deadline; 4.0 is
    // accepted (and pinned) meanwhile, then its tag moves.
    assert!(server.cli(dir.path(), &["deploy", "web", "3.0", "--env", "staging", "--detach"]).status.success());
    let queued = server.cli(dir.path(), &["--json", "deploy", "web", "4.0", "--env", "staging", "--detach"]);
    assert!(queued.status.success(), "{}", text(&queued));
    let pinned = rt.block_on(t.client().inspect_registry_image(&format!("{}:4.0", registry.repo()), None)).expect("inspect").descriptor.digest.expect("digest");
    rt.block_on(async {
        other_image(&t, (&registry.repo(), "4.0")).await;
        let mut s = t.client().push_image(&registry.repo(), Some(bollard::query_parameters::PushImageOptionsBuilder::default().tag("4.0").build()), None);
        while let Some(r) = s.next().await {
            r.expect("push the moved tag");
        }
    });
    let moved = rt.block_on(t.client().inspect_registry_image(&format!("{}:4.0", registry.repo()), None)).expect("inspect").descriptor.digest.expect("digest");
    assert_ne!(pinned, moved, "the tag really moved");

    let d: serde_json::Value = serde_json::from_slice(&queued.stdout).expect("json");
    let id = d["deployment_id"].as_i64().expect("id");
    let done = common::wait_for(Duration::from_secs(60), "deployment of 4.0 to end", || {
        let d = common::get_json(&format!("{}/api/v1/deployments/{id}", server.url))["deployment"].clone();
        (d["state"] != "running" && d["state"] != "queued").then_some(d)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    let services = common::get_json(&format!("{}/api/v1/services", server.url));
    assert_eq!(services[0]["version"], "4.0");
    assert_eq!(services[0]["digest"].as_str(), Some(pinned.as_str()), "the planned digest runs, not the moved tag: {services}");
    let status = server.cli(dir.path(), &["status"]);
    assert!(text(&status).contains(&pinned[..19]), "status shows tag and digest: {}", text(&status));

    // kill -9, then a new node: it adopts the dead node's containers of
    // the recorded version (by its digest) instead of replacing them.
    let old = server.child.id();
    let before = web_containers(&rt, &t, &[old]);
    assert_eq!(before.len(), 2, "{before:?}");
    drop(server); // SIGKILL
    let mut server = common::Server::start(dir.path(), None, &[]);
    let pids = [old, server.child.id()];
    common::wait_for(Duration::from_secs(30), "the service back on the new node", || get(port));
    assert_eq!(get(port).as_deref(), Some("hello from demo 4.0"));
    let after = web_containers(&rt, &t, &pids);
    assert_eq!(after.iter().map(|c| &c.id).collect::<Vec<_>>(), before.iter().map(|c| &c.id).collect::<Vec<_>>(), "the same containers, adopted");
    assert!(after.iter().all(|c| c.image.ends_with(&pinned)), "by digest: {after:?}");
    let events = common::get_json(&format!("{}/api/v1/services/staging/web/events", server.url)).to_string();
    assert!(events.contains("2 adopted"), "{events}");
    let gc = common::get_json(&format!("{}/api/v1/gc", server.url));
    assert_eq!(gc["containers"].as_array().map(Vec::len), Some(0), "adopted containers are not orphans: {gc}");
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let _ = server.child.wait();
    assert!(web_containers(&rt, &t, &pids).is_empty(), "a graceful stop removes its containers, adopted ones too");
}

#[derive(Debug)]
struct Seen {
    id: String,
    version: String,
    image: String,
    owner: String,
    /// Set on one-off job containers (migrations).
    job: String,
}

/// Every container of service `web` started by one of the Slipway
/// processes `pids` (tests run side by side), sorted by id.
fn web_containers(rt: &tokio::runtime::Runtime, t: &DockerTarget, pids: &[u32]) -> Vec<Seen> {
    let filters = std::collections::HashMap::from([("label", vec!["slipway.service=web"])]);
    let list = rt.block_on(t.client().list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))).expect("list");
    let mut v: Vec<Seen> = list
        .into_iter()
        .map(|c| {
            let l = c.labels.clone().unwrap_or_default();
            Seen {
                id: c.id.unwrap_or_default(),
                version: l.get(LABEL_VERSION).cloned().unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                owner: l.get(LABEL_OWNER).cloned().unwrap_or_default(),
                job: l.get("slipway.job").cloned().unwrap_or_default(),
            }
        })
        .filter(|c: &Seen| pids.iter().any(|p| c.owner.starts_with(&format!("{p}."))))
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

// Issue 5: SIGKILL of Slipway in the middle of a rollout, then a restart:
// one version (the recorded one), the migration ran once, no orphans.
#[test]
fn sigkill_mid_rollout_then_restart_converges_to_the_recorded_version() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "2.0"]));
    let port = common::free_port();
    // Slow health (healthy after 10 checks, 1 s apart) keeps the rollout
    // of 2.0 going long enough to kill the node in its middle.
    let config = docker_config(port, &registry.repo()).replace("healthy_after = 2, deadline = \"5s\"", "healthy_after = 2, deadline = \"30s\"");
    let (dir, _cleanup, server) = serve(&config, &[]);
    assert!(server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]).status.success());
    let first = server.child.id();
    let ones: Vec<String> = web_containers(&rt, &t, &[first]).into_iter().map(|c| c.id).collect();
    assert_eq!(ones.len(), 2);
    let slow = config.replace("interval = \"100ms\", healthy_after = 2", "interval = \"1s\", healthy_after = 10");
    std::fs::write(dir.path().join("slipway.toml"), slow).expect("slower health");
    assert!(server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging", "--detach"]).status.success());
    common::wait_for(Duration::from_secs(30), "a 2.0 container to start", || {
        web_containers(&rt, &t, &[first]).iter().any(|c| c.version == "2.0" && c.job.is_empty()).then_some(())
    });
    drop(server); // SIGKILL mid-rollout

    let server = common::Server::start(dir.path(), None, &[]);
    let pids = [first, server.child.id()];
    let settled = common::wait_for(Duration::from_secs(40), "only 1.0 left", || {
        let now = web_containers(&rt, &t, &pids);
        (now.len() == 2 && now.iter().all(|c| c.version == "1.0") && get(port).is_some()).then_some(now)
    });
    assert_eq!(settled.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), ones, "the 1.0 containers were adopted, not replaced");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));
    let d = common::get_json(&format!("{}/api/v1/deployments/2", server.url));
    assert_eq!(d["deployment"]["state"], "failed", "{d}");
    let migrate = d["jobs"].as_array().and_then(|j| j.iter().find(|j| j["name"] == "web.migrate")).cloned().expect("the migrate job");
    assert_eq!((migrate["state"].as_str(), migrate["attempt"].as_i64()), (Some("succeeded"), Some(1)), "the migration ran once: {migrate}");
    let gc = common::get_json(&format!("{}/api/v1/gc", server.url));
    assert_eq!(gc["containers"].as_array().map(Vec::len), Some(0), "no orphaned containers: {gc}");
    drop(server);
}

#[tokio::test]
async fn a_missing_engine_socket_is_a_clear_error() {
    let e = DockerTarget::connect_to("/nonexistent/docker.sock").await.err().expect("no Engine there");
    let said = e.to_string();
    assert!(said.contains("cannot reach the Docker Engine") && said.contains("/nonexistent/docker.sock"), "{said}");
}

/// Remove this Engine's names for `repo:tag` (the tag and its digest
/// reference), so that a deploy of it must pull from the registry. The
/// bytes stay under the demo image's own name.
async fn forget(t: &DockerTarget, repo: &str, tag: &str) {
    let reference = format!("{repo}:{tag}");
    let Ok(info) = t.client().inspect_image(&reference).await else { return };
    let opts = bollard::query_parameters::RemoveImageOptionsBuilder::default().noprune(true).build();
    let _ = t.client().remove_image(&reference, Some(opts.clone()), None).await;
    for d in info.repo_digests.unwrap_or_default().into_iter().filter(|d| d.starts_with(&format!("{repo}@"))) {
        let _ = t.client().remove_image(&d, Some(opts.clone()), None).await;
    }
    assert!(t.client().inspect_image(&reference).await.is_err(), "{reference} still on the Engine");
}

// Issue 5: registry credentials come from secrets; a wrong password is a
// clear refusal naming the registry and the user, never the password.
#[test]
fn registry_credentials_come_from_secrets_and_a_wrong_password_is_refused_clearly() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    const PASSWORD: &str = "correct-horse-battery";
    const API_KEY: &str = "s3cret-api-key-4711";
    let registry = Registry::start_with_auth("deployer", PASSWORD);
    rt.block_on(async {
        registry.push(&t, &["1.0", "2.0"]).await;
        forget(&t, &registry.repo(), "1.0").await;
        forget(&t, &registry.repo(), "2.0").await;
    });
    // Secrets live outside the config directory (which is shipped as the
    // revision): files on the Slipway host.
    let secrets = tempfile::tempdir().expect("tempdir");
    let pw = secrets.path().join("registry-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).expect("write secret");
    let api = secrets.path().join("api-key");
    std::fs::write(&api, API_KEY).expect("write secret");
    let port = common::free_port();
    let config = format!(
        "{}secrets = {{ API_KEY = \"api\" }}\nsecret_files = {{ \"/run/secrets/api_key\" = \"api\" }}\n\n\
         [secret.registry]\nfile = \"{}\"\n\n[secret.api]\nfile = \"{}\"\n\n\
         [[registry]]\nhost = \"127.0.0.1:{}\"\nusername = \"deployer\"\npassword = \"registry\"\n",
        docker_config(port, &registry.repo()),
        pw.display(),
        api.display(),
        registry.port
    );
    // At debug level: bollard logs request and response bodies.
    let (dir, _cleanup, server) = serve(&config, &[("SLIPWAY_LOG", "debug")]);

    let one = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]);
    assert!(one.status.success(), "{}", text(&one));
    let fetch = text(&server.cli(dir.path(), &["logs", "1", "web.fetch"]));
    assert!(fetch.contains("pulling") && fetch.contains("pulled"), "pulled with the credentials: {fetch}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));

    // The secrets reached the container: as an environment variable, and
    // as a file readable by its owner only.
    let filters = std::collections::HashMap::from([("label", vec!["slipway.service=web"])]);
    let list = rt.block_on(t.client().list_containers(Some(ListContainersOptionsBuilder::default().filters(&filters).build()))).expect("list");
    let id = list
        .iter()
        .find(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER)).is_some_and(|o| o.starts_with(&format!("{}.", server.child.id()))))
        .and_then(|c| c.id.clone())
        .expect("a container of ours");
    let info = rt.block_on(t.client().inspect_container(&id, None::<InspectContainerOptions>)).expect("inspect");
    let env = info.config.and_then(|c| c.env).unwrap_or_default();
    assert!(env.contains(&format!("API_KEY={API_KEY}")), "{env:?}");
    let archive: Vec<u8> = rt.block_on(async {
        let opts = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default().path("/run/secrets/api_key").build();
        let chunks: Vec<_> = t.client().download_from_container(&id, Some(opts)).collect().await;
        chunks.into_iter().flat_map(|c| c.expect("download the secret file").to_vec()).collect()
    });
    let mut tar = tar::Archive::new(archive.as_slice());
    let mut entry = tar.entries().expect("tar").next().expect("one entry").expect("entry");
    assert_eq!(entry.header().mode().expect("mode") & 0o777, 0o444, "readable by any user in the container, as Docker's own secrets");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut entry, &mut body).expect("read");
    assert_eq!(body, API_KEY);

    // The password changes on the host but not in the registry: the next
    // deploy is refused when it is asked for, saying which registry and
    // user, and the service stays where it was.
    std::fs::write(&pw, "wrong-password").expect("rotate the secret");
    let two = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging"]);
    assert_eq!(two.status.code(), Some(6), "{}", text(&two));
    let said = text(&two);
    assert!(said.contains("refused the credentials") && said.contains(&format!("127.0.0.1:{}", registry.port)) && said.contains("deployer"), "{said}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));

    // No secret value in the server's log, the record or the API.
    let record =
        format!("{}{}{}", server.log_text(), text(&server.cli(dir.path(), &["logs", "1"])), common::get_json(&format!("{}/api/v1/deployments/1", server.url)));
    for secret in [PASSWORD, API_KEY, "wrong-password"] {
        assert!(!record.contains(secret), "{secret} leaked: {record}");
    }
}

// Issue 5, bad input: a container that exits at once and one that its
// memory limit OOM-kills each roll back with a reason that needs no
// `docker logs`, and traffic stays on the last good version.
#[test]
fn a_container_that_exits_at_once_or_is_oom_killed_rolls_back_with_its_reason() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "8.0", "9.0"]));
    let port = common::free_port();
    let (dir, _cleanup, server) = serve(&docker_config(port, &registry.repo()), &[]);
    assert!(server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]).status.success());

    let reason = |id: i64| {
        let d = common::get_json(&format!("{}/api/v1/deployments/{id}", server.url));
        (d["deployment"]["state"].as_str().unwrap_or_default().to_string(), d.to_string())
    };
    let crash = server.cli(dir.path(), &["deploy", "web", "9.0", "--env", "staging"]);
    assert_eq!(crash.status.code(), Some(1), "{}", text(&crash));
    let (state, record) = reason(2);
    assert_eq!(state, "rolled_back", "{record}");
    assert!(record.contains("exit code 4") && record.contains("version 9.0 cannot boot"), "exit code and its own last words: {record}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));

    let oom = server.cli(dir.path(), &["deploy", "web", "8.0", "--env", "staging"]);
    assert_eq!(oom.status.code(), Some(1), "{}", text(&oom));
    let (state, record) = reason(3);
    assert_eq!(state, "rolled_back", "{record}");
    // The Engine's flag; or, when the Engine never sets it (its OOM event
    // and the exit race), the SIGKILL under the memory limit, both causes named.
    let flagged = record.contains("OOM-killed: it reached its memory limit");
    let unflagged = record.contains("SIGKILL under its memory limit of 64 MiB, not flagged as an OOM kill by the Engine");
    assert!((flagged || unflagged) && record.contains("fills memory"), "the OOM flag and its own last words: {record}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));

    // A SIGKILL from outside under the memory limit, with no OOM flag: the
    // supervisor's record names both possible causes, neither as certain.
    let running: Vec<Seen> = web_containers(&rt, &t, &[server.child.id()]).into_iter().filter(|c| c.version == "1.0" && c.job.is_empty()).collect();
    assert!(!running.is_empty(), "1.0 runs");
    let killed = std::process::Command::new("docker").args(["kill", "--signal", "KILL", &running[0].id]).output().expect("docker kill");
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    let events = common::wait_for(Duration::from_secs(30), "the supervisor's record of the kill", || {
        let e = common::get_json(&format!("{}/api/v1/services/staging/web/events", server.url)).to_string();
        e.contains("instance_died").then_some(e)
    });
    assert!(
        events.contains(
            "exit code 137 (SIGKILL under its memory limit of 64 MiB, not flagged as an OOM kill by the Engine: out of memory, or killed from outside)"
        ),
        "{events}"
    );
}

// Issue 5: `status` lists containers with our labels that no live Slipway
// holds; `gc` is a dry run until --apply, removes those and images no
// environment runs or could roll back to, and never touches anything
// without our labels.
#[test]
fn gc_lists_then_removes_orphans_and_unused_images_and_nothing_else() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(async {
        registry.push(&t, &["1.0", "2.0"]).await;
        // 5.0: different bytes, so a digest of its own.
        other_image(&t, (&registry.repo(), "5.0")).await;
        let mut s = t.client().push_image(&registry.repo(), Some(bollard::query_parameters::PushImageOptionsBuilder::default().tag("5.0").build()), None);
        while let Some(r) = s.next().await {
            r.expect("push 5.0");
        }
    });
    let port = common::free_port();
    let (dir, _cleanup, server) = serve(&docker_config(port, &registry.repo()), &[]);
    for v in ["5.0", "1.0", "2.0"] {
        let out = server.cli(dir.path(), &["deploy", "web", v, "--env", "staging"]);
        assert!(out.status.success(), "{v}: {}", text(&out));
    }
    let five = rt.block_on(t.client().inspect_image(&format!("{}:5.0", registry.repo()))).expect("5.0 is on the Engine").id.expect("id");

    // An orphan (our labels, an owner that is gone: pid 1 never started at
    // tick 1) and a stranger's container (no labels).
    let create = |labels: Option<std::collections::HashMap<String, String>>, name: String| {
        let body =
            bollard::models::ContainerCreateBody { image: Some(IMAGE.into()), cmd: Some(vec!["/demo".into(), "serve".into()]), labels, ..Default::default() };
        let opts = bollard::query_parameters::CreateContainerOptionsBuilder::default().name(&name).build();
        rt.block_on(t.client().create_container(Some(opts), body)).expect("create").id
    };
    let tag = common::free_port();
    // The installation's scope, as its own containers carry it.
    let filters = std::collections::HashMap::from([("label", vec!["slipway.service=web"])]);
    let scope = rt
        .block_on(t.client().list_containers(Some(ListContainersOptionsBuilder::default().filters(&filters).build())))
        .expect("list")
        .into_iter()
        .filter_map(|c| c.labels)
        .find(|l| l.get(LABEL_OWNER).is_some_and(|o| o.starts_with(&format!("{}.", server.child.id()))))
        .and_then(|l| l.get("slipway.scope").cloned())
        .expect("our containers carry a scope");
    let orphan = create(
        Some(std::collections::HashMap::from([
            ("slipway.scope".to_string(), scope),
            (LABEL_OWNER.to_string(), "1.1".to_string()),
            (LABEL_SERVICE.to_string(), "web".to_string()),
            ("slipway.environment".to_string(), "staging".to_string()),
            (LABEL_VERSION.to_string(), "0.9".to_string()),
        ])),
        format!("slipway-test-orphan-{tag}"),
    );
    let stranger = create(None, format!("not-slipway-{tag}"));

    let status = text(&server.cli(dir.path(), &["status"]));
    assert!(status.contains("orphaned containers") && status.contains(&orphan[..12]) && status.contains("web 0.9 (staging)"), "{status}");
    let dry = text(&server.cli(dir.path(), &["gc"]));
    assert!(dry.contains(&format!("would remove container {}", &orphan[..12])), "{dry}");
    assert!(dry.contains(&five.trim_start_matches("sha256:")[..12]) && dry.contains("5.0"), "the unused image is listed: {dry}");
    assert!(!dry.contains(&stranger[..12]), "{dry}");
    assert!(rt.block_on(t.client().inspect_container(&orphan, None::<InspectContainerOptions>)).is_ok(), "a dry run removes nothing");
    assert!(rt.block_on(t.client().inspect_image(&five)).is_ok(), "a dry run removes nothing");

    let applied = server.cli(dir.path(), &["gc", "--apply"]);
    assert!(applied.status.success() && text(&applied).contains("removed container"), "{}", text(&applied));
    assert!(rt.block_on(t.client().inspect_container(&orphan, None::<InspectContainerOptions>)).is_err(), "the orphan is gone");
    assert!(rt.block_on(t.client().inspect_image(&five)).is_err(), "the unused image is gone");
    assert!(rt.block_on(t.client().inspect_container(&stranger, None::<InspectContainerOptions>)).is_ok(), "a container without our labels is never touched");
    assert!(rt.block_on(t.client().inspect_image(&format!("{}:1.0", registry.repo()))).is_ok(), "what could be rolled back to stays");
    assert_eq!(get(port).as_deref(), Some("hello from demo 2.0"));
    let again = text(&server.cli(dir.path(), &["gc"]));
    assert!(again.contains("nothing to collect"), "{again}");
    let _ = rt.block_on(t.client().remove_container(&stranger, Some(bollard::query_parameters::RemoveContainerOptionsBuilder::default().force(true).build())));
}

/// A Unix socket that forwards to the machine's Engine and can be cut: for
/// the Slipway that talks through it, the Engine goes away and comes back
/// (while the containers keep running, as with a restarted dockerd using
/// live-restore, or a socket that disappeared).
struct EngineLink {
    path: std::path::PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl EngineLink {
    fn new() -> EngineLink {
        let dir = tempfile::tempdir().expect("tempdir");
        EngineLink { path: dir.path().join("docker.sock"), task: None, _dir: dir }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn up(&mut self, rt: &tokio::runtime::Runtime) {
        let engine =
            std::env::var("DOCKER_HOST").ok().and_then(|h| h.strip_prefix("unix://").map(String::from)).unwrap_or_else(|| "/var/run/docker.sock".into());
        let _ = std::fs::remove_file(&self.path);
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&self.path) }).expect("bind the link socket");
        self.task = Some(rt.spawn(async move {
            // Dropped with the task: every forwarded connection ends too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut a, _)) = listener.accept().await {
                let engine = engine.clone();
                conns.spawn(async move {
                    if let Ok(mut b) = tokio::net::UnixStream::connect(&engine).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        }));
    }

    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

// Issue 5: the Engine unreachable is a clear error that loses nothing
// (the service keeps serving the version it ran), an unreachable registry
// is named as such, and the Engine coming back resumes work.
#[test]
fn an_unreachable_engine_or_registry_is_a_clear_error_and_the_engine_coming_back_resumes() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "2.0", "3.0"]));
    let mut link = EngineLink::new();
    link.up(&rt);
    let port = common::free_port();
    let (dir, _cleanup, server) = serve(&docker_config(port, &registry.repo()), &[("DOCKER_HOST", &link.url())]);
    let one = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]);
    assert!(one.status.success(), "{}", text(&one));

    link.down();
    let refused = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging"]);
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused));
    assert!(text(&refused).contains("cannot reach the Docker Engine"), "{}", text(&refused));
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"), "what runs keeps running");
    assert!(server.cli(dir.path(), &["status"]).status.success());

    link.up(&rt);
    let two = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging"]);
    assert!(two.status.success(), "the Engine is back: {}", text(&two));
    assert_eq!(get(port).as_deref(), Some("hello from demo 2.0"));

    let registry_port = registry.port;
    drop(registry);
    let unreachable = server.cli(dir.path(), &["deploy", "web", "3.0", "--env", "staging"]);
    assert_eq!(unreachable.status.code(), Some(6), "{}", text(&unreachable));
    let said = text(&unreachable).to_lowercase();
    assert!(said.contains(&format!("127.0.0.1:{registry_port}")) && said.contains("connection refused"), "{said}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 2.0"));
    link.down();
}

// Issue 5: the Engine going away in the middle of a rollout fails the
// deployment with that reason; traffic stays on what still runs, and once
// the Engine answers again the service converges on its recorded version.
#[test]
fn the_engine_going_away_mid_rollout_fails_the_deployment_with_that_reason() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    let registry = Registry::start();
    rt.block_on(registry.push(&t, &["1.0", "2.0"]));
    let mut link = EngineLink::new();
    link.up(&rt);
    let port = common::free_port();
    // Health passes take 2 s per new instance: time to cut the link.
    let config = docker_config(port, &registry.repo()).replace("interval = \"100ms\", healthy_after = 2", "interval = \"1s\", healthy_after = 2");
    let (dir, _cleanup, server) = serve(&config, &[("DOCKER_HOST", &link.url())]);
    let one = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]);
    assert!(one.status.success(), "{}", text(&one));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = common::load(port, stop.clone());
    assert!(server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging", "--detach"]).status.success());
    common::wait_for(Duration::from_secs(30), "the rollout to start a 2.0 container", || {
        let l = common::get_json(&format!("{}/api/v1/deployments/2/logs?job=web.rollout", server.url)).to_string();
        l.contains("started web 2.0").then_some(())
    });
    link.down();
    let done = common::wait_for(Duration::from_secs(90), "deployment 2 to end", || {
        let d = common::get_json(&format!("{}/api/v1/deployments/2", server.url))["deployment"].clone();
        (d["state"] != "running" && d["state"] != "queued").then_some(d)
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, errors) = loader.join().expect("load");
    assert_ne!(done["state"], "succeeded", "{done}");
    let record = common::get_json(&format!("{}/api/v1/deployments/2", server.url)).to_string();
    assert!(record.contains("cannot reach the Docker Engine"), "the reason says the Engine went away: {record}");
    assert!(ok > 50, "{ok} requests");
    assert_eq!(failed, 0, "traffic stayed on instances that still run: {errors:?}");

    link.up(&rt);
    let services = common::wait_for(Duration::from_secs(60), "the service to settle on one version", || {
        let s = common::get_json(&format!("{}/api/v1/services", server.url));
        let body = get(port)?;
        (s[0]["instances"].as_array().is_some_and(|i| i.len() == 2 && i.iter().all(|i| i["running"] == true))).then_some((s, body))
    });
    assert_eq!(services.0[0]["version"], "1.0", "{}", services.0);
    assert_eq!(services.1, "hello from demo 1.0");
    // What could not be removed while the Engine was away is gone now:
    // nothing is left running that nobody holds.
    let pid = server.child.id();
    common::wait_for(Duration::from_secs(30), "only the two 1.0 containers left", || {
        let now = web_containers(&rt, &t, &[pid]);
        (now.len() == 2 && now.iter().all(|c| c.version == "1.0")).then_some(())
    });
    link.down();
}

// Issue 6: a push to a real registry is a deployment on the docker target,
// end to end: Debian's docker-registry notifies Slipway (its endpoint
// config sends the bearer token), the tagged manifest push deploys where
// auto_deploy opts in; pulls and blob pushes start nothing; a wrong token
// is refused.
#[test]
fn issue6_a_push_to_the_registry_deploys_where_auto_deploy_opts_in() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(t) = rt.block_on(engine()) else { return };
    const TOKEN: &str = "registry-hook-token-77";
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("hook"), TOKEN).expect("secret");
    let (port, local_port) = (common::free_port(), common::free_port());
    // Beside the container service, a local-target one whose versions
    // follow the same image's tags (the demo binary, run directly).
    let with_image = |image: &str| {
        format!(
            "{}auto_deploy = [\"staging\"]\n\n[secret.hook]\nfile = \"{}\"\n\n[registry_hook]\ntoken = \"hook\"\n\n\
             [[service]]\nname = \"web-local\"\nfollows = \"{image}\"\nauto_deploy = [\"staging\"]\nlisten = \"127.0.0.1:{local_port}\"\n\
             command = [\"{}\", \"serve\", \"--port\", \"{{port}}\", \"--version\", \"{{version}}\"]\n\
             health = {{ http = \"/healthz\", interval = \"100ms\", healthy_after = 1 }}\n",
            docker_config(port, image),
            secrets.path().join("hook").display(),
            common::demo_bin()
        )
    };
    // The registry needs Slipway's address and Slipway's config the
    // registry's: start Slipway first, then point its config (read afresh
    // by every request) at the registry.
    let (dir, _cleanup, server) = serve(&with_image("127.0.0.1:1/placeholder"), &[]);
    let registry = Registry::start_notifying(&format!("{}/hooks/registry", server.url), TOKEN);
    std::fs::write(dir.path().join("slipway.toml"), with_image(&registry.repo())).expect("config");

    // A timeout says what Slipway and the registry did meanwhile.
    let serves = |port: u16, body: &str, what: &str| {
        let diag = || {
            // Text, not JSON: a server that does not answer is the clue.
            let list = common::get_text(&format!("{}/api/v1/deployments", server.url));
            let audit = common::get_text(&format!("{}/api/v1/audit", server.url));
            format!("deployments: {list}\naudit: {audit}\nslipway log:\n{}\nregistry log:\n{}", server.log_text(), registry.log_text())
        };
        common::wait_for_diag(Duration::from_secs(60), what, diag, || (get(port).as_deref() == Some(body)).then_some(()));
    };
    rt.block_on(registry.push(&t, &["1.0"]));
    serves(port, "hello from demo 1.0", "the pushed 1.0 to be deployed");
    serves(local_port, "hello from demo 1.0", "the local follower at 1.0");
    rt.block_on(registry.push(&t, &["2.0"]));
    serves(port, "hello from demo 2.0", "the pushed 2.0 to be deployed");
    serves(local_port, "hello from demo 2.0", "the local follower at 2.0");

    // A pull is a notification too: it starts nothing.
    rt.block_on(async {
        let opts = bollard::query_parameters::CreateImageOptionsBuilder::default().from_image(&format!("{}:1.0", registry.repo())).build();
        let mut s = t.client().create_image(Some(opts), None, None);
        while let Some(r) = s.next().await {
            r.expect("pull");
        }
    });
    // Scenario, not a wait for a condition: a deployment the pull started
    // would show within this time.
    std::thread::sleep(Duration::from_secs(2));
    let list = common::get_json(&format!("{}/api/v1/deployments", server.url));
    let mut versions: Vec<String> =
        list.as_array().map(|a| a.iter().filter_map(|d| Some(format!("{}@{}", d["service"].as_str()?, d["version"].as_str()?))).collect()).unwrap_or_default();
    versions.sort();
    assert_eq!(versions, ["web-local@1.0", "web-local@2.0", "web@1.0", "web@2.0"], "one deployment per pushed tag and follower: {list}");

    let wrong = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Authorization: Bearer nope", "-d", r#"{"events":[]}"#])
        .arg(format!("{}/hooks/registry", server.url))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&wrong.stdout), "401");

    // A push of a tag the registry cannot show (yet): the container
    // service's pin fails, so the answer is 503 and the delivery is not
    // recorded: the registry retries rather than that deploy being lost.
    // The local follower needs no pin and deploys once, retry or not.
    let envelope = serde_json::json!({"events": [{
        "id": "b1a2c3d4-0000-4000-8000-000000000077", "action": "push",
        "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "repository": "demo", "tag": "7.7", "url": format!("http://{}/v2/demo/manifests/7.7", registry.repo().trim_end_matches("/demo"))},
        "request": {"host": registry.repo().trim_end_matches("/demo")}
    }]});
    for _ in 0..2 {
        let unseen = post_registry_hook(&server.url, TOKEN, &envelope);
        let answer = String::from_utf8_lossy(&unseen.stdout).to_string();
        assert!(answer.ends_with("\n503") && answer.contains("cannot pin"), "{answer}");
    }
    let after = common::get_json(&format!("{}/api/v1/deployments", server.url));
    let sevens: Vec<&str> = after.as_array().into_iter().flatten().filter(|d| d["version"] == "7.7").filter_map(|d| d["service"].as_str()).collect();
    assert_eq!(sevens, ["web-local"], "the follower once, the container service not at all: {after}");

    // With the manifest's digest in the event (as the registry sends it)
    // nothing is resolved: the deploy is pinned to that digest, so even a
    // tag the registry does not have deploys the pushed bytes.
    let digest = rt.block_on(t.client().inspect_registry_image(&format!("{}:1.0", registry.repo()), None)).expect("inspect").descriptor.digest.expect("digest");
    let mut pinned = envelope.clone();
    pinned["events"][0]["id"] = "b1a2c3d4-0000-4000-8000-000000000078".into();
    pinned["events"][0]["target"]["tag"] = "7.8".into();
    pinned["events"][0]["target"]["digest"] = digest.clone().into();
    let sent = post_registry_hook(&server.url, TOKEN, &pinned);
    let answer = String::from_utf8_lossy(&sent.stdout).to_string();
    assert!(answer.ends_with("\n200") || answer.ends_with("\n202"), "{answer}");
    serves(port, "hello from demo 7.8", "7.8, pinned to the event's digest");
    let services = common::get_json(&format!("{}/api/v1/services", server.url));
    let web = services.as_array().into_iter().flatten().find(|s| s["service"] == "web").cloned().unwrap_or_default();
    assert_eq!(web["digest"].as_str().map(|d| d.trim_start_matches("sha256:")), Some(digest.trim_start_matches("sha256:")), "{services}");
}

/// POST a registry notification to `/hooks/registry` with its bearer
/// token; curl prints the body, then the status on a line of its own.
fn post_registry_hook(url: &str, token: &str, envelope: &serde_json::Value) -> std::process::Output {
    std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(envelope.to_string())
        .arg(format!("{url}/hooks/registry"))
        .output()
        .expect("curl")
}
