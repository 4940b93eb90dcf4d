//! The compliance suite (tests/compliance/) on the `docker` target:
//! containers on this machine's Docker Engine, images from Debian's
//! docker-registry started by the fixture. Without an Engine the suite is
//! skipped with a message, unless `SLIPWAY_REQUIRE_DOCKER=1`.

mod common;
#[path = "common/docker.rs"]
mod dockerkit;
#[macro_use]
mod compliance;

use std::sync::{Arc, OnceLock};

use compliance::{Fixture, Scope, VERSIONS};
use slipway::targets::docker::{DockerTarget, LABEL_ENVIRONMENT};
use slipway::targets::{Settings, Target};

/// Where the demo listens inside its container (`{port}` there).
const CONTAINER_PORT: u16 = 8080;

struct Docker {
    engine: DockerTarget,
    /// Started on first use: only the properties that pin and pull need it.
    registry: OnceLock<dockerkit::Registry>,
    /// Versions already pushed to it: a property asks for one many times.
    pushed: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Docker {
    fn registry(&self) -> &dockerkit::Registry {
        self.registry.get_or_init(|| tokio::task::block_in_place(dockerkit::Registry::start))
    }
}

#[async_trait::async_trait]
impl Fixture for Docker {
    async fn start() -> Option<Self> {
        let engine = dockerkit::engine().await?;
        dockerkit::image(&engine).await;
        Some(Docker { engine, registry: OnceLock::new(), pushed: Default::default() })
    }

    fn name(&self) -> &'static str {
        "docker"
    }

    fn target(&self) -> Arc<dyn Target> {
        Arc::new(self.engine.clone())
    }

    /// The image holds the demo at /demo; it listens on every interface in
    /// its container (the port there, published on 127.0.0.1). A broken
    /// release is a missing image, so the same command serves for both.
    fn demo_command(&self, _scope: &Scope, _breakable: bool) -> Vec<String> {
        ["/demo", "serve", "--host", "0.0.0.0", "--port", "{port}", "--version", "{version}"].map(String::from).to_vec()
    }

    fn image(&self, scope: &Scope, version: &str) -> Option<String> {
        Some(format!("{}:{version}", scope.repo))
    }

    fn settings(&self) -> Settings {
        Settings::of(&serde_json::json!({ "port": CONTAINER_PORT, "memory_bytes": null, "millicpus": null }))
    }

    /// A version is a tag of the demo image in the scope's repository; a
    /// broken one is a tag that is gone (as if the image were pruned).
    async fn release(&self, scope: &Scope, version: &str, working: bool) {
        if working {
            let opts = bollard::query_parameters::TagImageOptionsBuilder::default().repo(&scope.repo).tag(version).build();
            self.engine.client().tag_image(dockerkit::IMAGE, Some(opts)).await.expect("tag the demo image");
        } else {
            let opts = bollard::query_parameters::RemoveImageOptionsBuilder::default().noprune(false).build();
            let _ = self.engine.client().remove_image(&format!("{}:{version}", scope.repo), Some(opts), None).await;
        }
    }

    async fn crash(&self, id: &str) {
        let container = id.strip_prefix("container ").unwrap_or_else(|| panic!("not a container id: {id:?}"));
        self.engine.client().kill_container(container, None::<bollard::query_parameters::KillContainerOptions>).await.expect("kill the container");
    }

    async fn remains(&self, id: &str) -> Option<String> {
        let container = id.strip_prefix("container ").unwrap_or(id);
        let info = self.engine.client().inspect_container(container, None::<bollard::query_parameters::InspectContainerOptions>).await.ok()?;
        Some(format!("container {container} ({:?}) is still there: {:?}", info.name, info.state.and_then(|s| s.status)))
    }

    /// Containers labelled with the scope's environment (removed now), and
    /// the scope's tags (always removed: they are the fixture's own).
    async fn leftovers(&self, scope: &Scope) -> Vec<String> {
        let filters = std::collections::HashMap::from([("label", vec![format!("{LABEL_ENVIRONMENT}={}", scope.env)])]);
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let containers = self.engine.client().list_containers(Some(opts)).await.expect("list this property's containers");
        let mut left = Vec::new();
        for c in containers {
            let id = c.id.unwrap_or_default();
            left.push(format!("{} {:?} {:?}: {}", &id[..id.len().min(12)], c.names.unwrap_or_default(), c.state, c.status.unwrap_or_default()));
            let opts = bollard::query_parameters::RemoveContainerOptionsBuilder::default().force(true).build();
            let _ = self.engine.client().remove_container(&id, Some(opts)).await;
        }
        for v in VERSIONS {
            self.release(scope, v, false).await;
        }
        left
    }

    fn rounds(&self) -> usize {
        10
    }

    async fn publish(&self, _scope: &Scope, version: &str) -> Option<String> {
        let registry = self.registry();
        let new = self.pushed.lock().expect("pushed").insert(version.to_string());
        if new {
            registry.push(&self.engine, &[version]).await;
        }
        Some(format!("{}:{version}", registry.repo()))
    }

    async fn service_toml(&self, scope: &Scope) -> String {
        let reference = self.publish(scope, "1.0").await.expect("published");
        let repo = reference.rsplit_once(':').map(|(r, _)| r).expect("repo:tag");
        format!(
            "target = \"docker\"\nimage = \"{repo}\"\nport = {CONTAINER_PORT}\ncommand = [\"/demo\", \"serve\", \"--host\", \"0.0.0.0\", \"--port\", \"{{port}}\", \"--version\", \"{{version}}\"]\n"
        )
    }
}

compliance_suite!(Docker);
