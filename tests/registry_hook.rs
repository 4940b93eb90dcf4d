//! `POST /hooks/registry` without a Docker Engine: Debian's real
//! docker-registry, configured to notify Slipway, and images pushed to it
//! over its HTTP API by the test. A local-target service follows the
//! image's tags: a semver tag deploys it; `latest` is held by its tag
//! filter and says so.

mod common;
#[path = "common/docker.rs"]
mod dockerkit;
#[path = "common/push.rs"]
mod push;

use std::time::Duration;

use serde_json::Value;
use slipway::node::{NodeOptions, start_node};
use slipway::scheduler::SchedulerConfig;

const TOKEN: &str = "registry-hook-token-31";

fn config(image: &str, port: u16, secret: &std::path::Path) -> String {
    format!(
        r#"
[[environment]]
name = "staging"

[secret.hook]
file = "{}"

[registry_hook]
token = "hook"
hosts = ["{}"]

[[service]]
name = "web"
follows = "{image}"
auto_deploy = ["staging"]
tags = "semver"
listen = "127.0.0.1:{port}"
command = ["{}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1 }}
"#,
        secret.display(),
        image.split('/').next().unwrap_or(""),
        common::demo_bin()
    )
}

fn hello(port: u16) -> Option<String> {
    let out = std::process::Command::new("curl").args(["-sf", "--max-time", "5", &format!("http://127.0.0.1:{port}/")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// Issue 6: a real registry's push notification deploys a local-target follower, no Docker Engine involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue6_a_registry_push_over_its_http_api_deploys_a_local_follower() {
    let scratch = tempfile::tempdir().expect("tempdir");
    for (backend, store) in common::stores(scratch.path()).await {
        let secret = scratch.path().join(format!("hook-{backend}"));
        std::fs::write(&secret, TOKEN).expect("secret");
        let port = common::free_port();
        // Slipway first (the registry needs its address), then the
        // registry, then Slipway's config names the registry's image (the
        // config is read afresh by every request).
        let dir = common::config_dir(&config("127.0.0.1:1/placeholder", port, &secret), &[]);
        let mut cfg = SchedulerConfig::new("registry-hook", dir.path().join(".slipway/work"));
        cfg.poll = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node =
            start_node(NodeOptions { config_path: dir.path().join("slipway.toml"), store, scheduler: cfg, listener, scope: "registry-hook-test".into() });
        let base = format!("http://{}", node.addr);
        let registry = dockerkit::Registry::start_notifying(&format!("{base}/hooks/registry"), TOKEN);
        std::fs::write(dir.path().join("slipway.toml"), config(&registry.repo(), port, &secret)).expect("config");
        let pusher = push::Pusher::new(&registry);

        pusher.image("2026-11-01T00:00:00Z", &["1.4.0"]).await;
        common::wait_for(Duration::from_secs(60), "1.4.0 to be deployed", || (hello(port).as_deref() == Some("hello from demo 1.4.0")).then_some(()));

        // `latest` is pushed too: held by the semver filter, not deployed.
        pusher.image("2026-11-02T00:00:00Z", &["latest"]).await;
        let http = slipway::http::builder().timeout(Duration::from_secs(10)).build().expect("client");
        let why = common::wait_for(Duration::from_secs(30), "latest to be seen", || {
            let v: Value = serde_json::from_str(
                &std::process::Command::new("curl")
                    .args(["-sf", &format!("{base}/api/v1/services/staging/web/why")])
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())?,
            )
            .ok()?;
            v["history"].as_array()?.iter().any(|h| h.as_str().is_some_and(|h| h.contains("latest"))).then_some(v)
        });
        assert!(why["running"].as_str().unwrap_or("").contains("1.4.0"), "{backend}: {why}");
        let deployments: Value = http.get(format!("{base}/api/v1/deployments")).send().await.expect("get").json().await.expect("json");
        let versions: Vec<&str> = deployments.as_array().expect("list").iter().filter_map(|d| d["version"].as_str()).collect();
        assert_eq!(versions, ["1.4.0"], "{backend}: one deployment, for the semver tag");
        assert_eq!(hello(port).as_deref(), Some("hello from demo 1.4.0"));

        node.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
    }
}
