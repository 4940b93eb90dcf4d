//! Docker test kit, shared by the test files that need the Engine (include
//! it with `#[path = "common/docker.rs"] mod dockerkit;` next to `mod
//! common;`): the Engine or a skip, the demo image assembled from the demo
//! binary and its libraries, and Debian's docker-registry on a free port.
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;
use slipway::targets::docker::DockerTarget;
use tokio::sync::OnceCell;

use crate::common;

pub const IMAGE: &str = "slipway-test/demo:dev";

pub async fn engine() -> Option<DockerTarget> {
    match DockerTarget::connect().await {
        Ok(t) => Some(t),
        Err(e) if std::env::var("SLIPWAY_REQUIRE_DOCKER").as_deref() == Ok("1") => panic!("SLIPWAY_REQUIRE_DOCKER=1 but {e}"),
        Err(e) => {
            eprintln!("skipped: no Docker Engine ({e}); set SLIPWAY_REQUIRE_DOCKER=1 to make this a failure");
            None
        }
    }
}

/// The demo binary and every library `ldd` names for it, by absolute path.
fn demo_files() -> Vec<String> {
    let demo = common::demo_bin();
    let ldd = Command::new("ldd").arg(demo).output().expect("run ldd");
    let mut files: Vec<String> =
        String::from_utf8_lossy(&ldd.stdout).lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string)).collect();
    files.sort();
    files.dedup();
    files
}

/// A tar of / for the image: the demo at /demo, plus every library `ldd`
/// names, at the same paths.
pub fn rootfs() -> Vec<u8> {
    let demo = common::demo_bin();
    let mut b = tar::Builder::new(Vec::new());
    // Plain ustar entries with the bytes read whole: the Engine's
    // importer refuses GNU sparse entries.
    let mut add = |path: &str, name: &str| {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap_or_else(|e| panic!("add {name}: {e}"));
    };
    add(demo, "demo");
    for f in demo_files() {
        add(&f, f.trim_start_matches('/'));
    }
    b.into_inner().expect("tar")
}

/// The label saying which build of the demo an imported image holds.
const BUILD_LABEL: &str = "slipway.test.demo-build";

/// Which build of the demo (and of its libraries) the image would hold:
/// their sizes and modification times, which every rebuild changes.
fn demo_build() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in std::iter::once(common::demo_bin().to_string()).chain(demo_files()) {
        let meta = std::fs::metadata(&f).unwrap_or_else(|e| panic!("stat {f}: {e}"));
        (&f, meta.len(), meta.modified().ok()).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

static IMAGE_READY: OnceCell<()> = OnceCell::const_new();

/// `IMAGE` holds this build of the demo. Imported only when it does not
/// yet: every test process asks, and an import per process would leave an
/// unnamed copy behind each time.
pub async fn image(t: &DockerTarget) {
    IMAGE_READY
        .get_or_init(|| async {
            let build = demo_build();
            if let Ok(info) = t.client().inspect_image(IMAGE).await
                && info.config.and_then(|c| c.labels).and_then(|l| l.get(BUILD_LABEL).cloned()).as_deref() == Some(build.as_str())
            {
                return;
            }
            let opts = CreateImageOptionsBuilder::default()
                .from_src("-")
                .repo("slipway-test/demo")
                .tag("dev")
                .changes(vec![format!("LABEL {BUILD_LABEL}={build}")])
                .build();
            let mut s = t.client().create_image(Some(opts), Some(bollard::body_full(rootfs().into())), None);
            while let Some(r) = s.next().await {
                r.expect("import the demo image");
            }
        })
        .await;
}

pub fn get(port: u16) -> Option<String> {
    let out = Command::new("curl").args(["-sf", "--max-time", "2", &format!("http://127.0.0.1:{port}/")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Debian's docker-registry on a free 127.0.0.1 port with its own config
/// and storage; killed on drop. (dockerd treats 127.0.0.0/8 registries as
/// insecure, so plain HTTP works without configuring the Engine.)
pub struct Registry {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    /// User and password, when it wants them.
    pub auth: Option<(String, String)>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// A registry that wants HTTP basic auth (htpasswd, bcrypt, from
    /// Debian's apache2-utils) for this user and password.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user, password)))
    }

    /// A registry that notifies `url` of every event, sending
    /// `Authorization: Bearer <token>`.
    pub fn start_notifying(url: &str, token: &str) -> Registry {
        Registry::start_full(None, Some((url, token)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Registry {
        Registry::start_full(auth, None)
    }

    fn start_full(auth: Option<(&str, &str)>, notify: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = common::free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let config = match auth {
            None => config,
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .unwrap_or_else(|e| panic!("htpasswd (Debian's apache2-utils; scripts/test.sh installs it) cannot run: {e}"));
                assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
                std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd");
                format!("{config}auth:\n  htpasswd:\n    realm: slipway-test\n    path: {}\n", dir.path().join("htpasswd").display())
            }
        };
        let config = match notify {
            None => config,
            Some((url, token)) => format!(
                "{config}notifications:\n  endpoints:\n    - name: slipway\n      url: {url}\n      headers:\n        Authorization: [\"Bearer {token}\"]\n      timeout: 30s\n      threshold: 3\n      backoff: 1s\n"
            ),
        };
        std::fs::write(dir.path().join("config.yml"), config).expect("write registry config");
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| panic!("Debian's docker-registry is not installed (scripts/test.sh installs it: apt-get install docker-registry)"));
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        common::wait_for(Duration::from_secs(20), "the registry to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Registry { child, port, _dir: dir, auth: auth.map(|(u, p)| (u.to_string(), p.to_string())) }
    }

    pub fn repo(&self) -> String {
        format!("127.0.0.1:{}/demo", self.port)
    }

    /// What the registry logged (warnings and errors: failed
    /// notifications among them), for a failing test's message.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Push the demo image to this registry as `repo:tag`, for each tag
    /// (all the same bytes unless `marker` changes them: the version
    /// reaches the demo through its command line).
    pub async fn push(&self, t: &DockerTarget, tags: &[&str]) {
        image(t).await;
        for tag in tags {
            let opts = bollard::query_parameters::TagImageOptionsBuilder::default().repo(&self.repo()).tag(tag).build();
            t.client().tag_image(IMAGE, Some(opts)).await.expect("tag the demo image");
            let opts = bollard::query_parameters::PushImageOptionsBuilder::default().tag(tag).build();
            let creds = self.auth.as_ref().map(|(u, p)| bollard::auth::DockerCredentials {
                username: Some(u.clone()),
                password: Some(p.clone()),
                serveraddress: Some(format!("127.0.0.1:{}", self.port)),
                ..Default::default()
            });
            let mut s = t.client().push_image(&self.repo(), Some(opts), creds);
            while let Some(r) = s.next().await {
                let info = r.expect("push to the test registry");
                assert!(info.error_detail.is_none(), "push failed: {info:?}");
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A second image, different bytes: the demo plus a marker file.
pub async fn other_image(t: &DockerTarget, repo_tag: (&str, &str)) {
    let mut tar = tar::Builder::new(rootfs_builder_bytes());
    let mut h = tar::Header::new_ustar();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "marker", &b"other\n"[..]).expect("marker");
    let bytes = tar.into_inner().expect("tar");
    let opts = CreateImageOptionsBuilder::default().from_src("-").repo(repo_tag.0).tag(repo_tag.1).build();
    let mut s = t.client().create_image(Some(opts), Some(bollard::body_full(bytes.into())), None);
    while let Some(r) = s.next().await {
        r.expect("import the other image");
    }
}

/// The rootfs archive without its end-of-archive marker, so more entries
/// can follow.
pub fn rootfs_builder_bytes() -> Vec<u8> {
    let mut bytes = rootfs();
    // A tar ends with two 512-byte zero blocks (and padding): drop the
    // trailing zeros back to the last entry.
    while bytes.len() >= 512 && bytes[bytes.len() - 512..].iter().all(|b| *b == 0) {
        bytes.truncate(bytes.len() - 512);
    }
    bytes
}

/// Removes, when dropped, every container of the Slipway installation
/// whose config directory is `dir` (its scope label): a test's server is
/// killed with SIGKILL, and with scoped sweeps no later Slipway would ever
/// remove what it left. Declare it before the server, so it drops after.
pub struct ScopeCleanup {
    scope: String,
}

impl ScopeCleanup {
    pub fn of(dir: &std::path::Path) -> ScopeCleanup {
        let url = slipway::cli::serve::store_url(None, None, dir);
        ScopeCleanup { scope: slipway::process::scope_of_store(&url) }
    }
}

impl Drop for ScopeCleanup {
    fn drop(&mut self) {
        let scope = format!("slipway.scope={}", self.scope);
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let Ok(t) = DockerTarget::connect().await else { return };
            let filters = std::collections::HashMap::from([("label", vec![scope.as_str()])]);
            let opts = bollard::query_parameters::ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
            for c in t.client().list_containers(Some(opts)).await.unwrap_or_default() {
                if let Some(id) = c.id {
                    let rm = bollard::query_parameters::RemoveContainerOptionsBuilder::default().force(true).build();
                    let _ = tokio::time::timeout(Duration::from_secs(20), t.client().remove_container(&id, Some(rm))).await;
                }
            }
        });
    }
}
