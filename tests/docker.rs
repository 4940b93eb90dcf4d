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
use slipway::target::docker::{DockerTarget, LABEL_OWNER, LABEL_SERVICE, LABEL_VERSION};
use slipway::target::{InstanceRequest, Target};

fn request(version: &str, port: u16, argv: &[&str]) -> InstanceRequest {
    InstanceRequest {
        service: "web".into(),
        environment: "test".into(),
        version: version.into(),
        port,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        workdir: std::env::temp_dir(),
        image: Some(IMAGE.into()),
        container_port: Some(8080),
        memory_bytes: None,
        millicpus: None,
        deployment_id: 7,
        secret_env: BTreeMap::new(),
        secret_files: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_instance_serves_carries_labels_and_stops() {
    let Some(t) = engine().await else { return };
    image(&t).await;
    let port = common::free_port();
    let i = t
        .start_instance(request("1.0", port, &["/demo", "serve", "--host", "0.0.0.0", "--port", "8080", "--version", "1.0"]))
        .await
        .expect("start a container");
    assert!(i.id().starts_with("container "), "{}", i.id());
    let body = tokio::task::spawn_blocking(move || common::wait_for(Duration::from_secs(20), "the container to answer", || get(port))).await.expect("join");
    assert_eq!(body, "hello from demo 1.0");
    assert!(i.exit().is_none());

    let containers = t
        .client()
        .list_containers(Some(ListContainersOptionsBuilder::default().all(true).build()))
        .await
        .expect("list containers");
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
    let i: Arc<dyn slipway::target::Instance> = t
        .start_instance(request("1.0", common::free_port(), &["/demo", "migrate", "--file", "/no/such/dir/log", "--version", "1.0"]))
        .await
        .expect("start a container");
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
    let mut req = request("1.0", common::free_port(), &[]);
    req.image = Some("slipway-test/no-such-image:1".into());
    let e = t.start_instance(req).await.err().expect("refused");
    assert!(e.contains("slipway-test/no-such-image:1") && e.to_lowercase().contains("no such image"), "{e}");
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
    let dir = common::config_dir(&docker_config(port, &registry.repo()), &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let deploy = |v: &str| server.cli(dir.path(), &["deploy", "web", v, "--env", "staging"]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let out = deploy("1.0");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));
    // The migration ran once, in a one-off container of the pinned image
    // (the demo's path exists only there), its output in the record.
    let logs = server.cli(dir.path(), &["logs", "1", "web.migrate"]);
    assert!(text(&logs).contains("migration to 1.0 applied (/migrations.log)"), "{}", text(&logs));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = common::load(port, stop.clone());
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
    let ours: Vec<_> = containers.iter().filter(|c| c.ports.iter().flatten().any(|p| p.public_port.is_some())).filter(|c| {
        c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER)).is_some_and(|o| o.starts_with(&format!("{}.", server.child.id())))
    }).collect();
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
    let dir = common::config_dir(&docker_config(port, &registry.repo()), &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
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

    // kill -9, then a new node: the dead node's containers are removed and
    // the recorded version (by its digest) runs again.
    let owned_by = |pid: u32| -> Vec<String> {
        let filters = std::collections::HashMap::from([("label", vec!["slipway.service=web"])]);
        let list = rt.block_on(t.client().list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))).expect("list");
        list.into_iter()
            .filter(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER)).is_some_and(|o| o.starts_with(&format!("{pid}."))))
            .filter_map(|c| c.image)
            .collect()
    };
    let old_pid = server.child.id();
    assert_eq!(owned_by(old_pid).len(), 2);
    drop(server); // SIGKILL
    let mut server = common::Server::start(dir.path(), None, &[]);
    let images = common::wait_for(Duration::from_secs(30), "the service back on the new node", || {
        let mine = owned_by(server.child.id());
        (mine.len() == 2 && owned_by(old_pid).is_empty() && get(port).is_some()).then_some(mine)
    });
    assert!(images.iter().all(|i| i.ends_with(&pinned)), "restored by digest: {images:?}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 4.0"));
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let _ = server.child.wait();
    assert!(owned_by(server.child.id()).is_empty(), "a graceful stop removes its containers");
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
    let dir = common::config_dir(&config, &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

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
    assert_eq!(entry.header().mode().expect("mode") & 0o777, 0o400);
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
    let record = format!(
        "{}{}{}",
        server.log_text(),
        text(&server.cli(dir.path(), &["logs", "1"])),
        common::get_json(&format!("{}/api/v1/deployments/1", server.url))
    );
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
    let dir = common::config_dir(&docker_config(port, &registry.repo()), &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
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
    assert!(record.contains("OOM-killed") && record.contains("fills memory"), "the OOM flag and its own last words: {record}");
    assert_eq!(get(port).as_deref(), Some("hello from demo 1.0"));
}
