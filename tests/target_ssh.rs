//! The compliance suite (tests/compliance/) on the `ssh` target: one host,
//! a real OpenSSH sshd on 127.0.0.1 (tests/sshd/), so the service's listen
//! address and its instances answer where the suite looks, and a crash is
//! a `kill -KILL` of the pid the host's supervisor reports. The target
//! runs its own rollouts: the suite's own-rollout properties apply
//! (`compliance_suite!(own_rollout: …)`).

mod common;
#[macro_use]
mod compliance;
mod sshd;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use compliance::{Fixture, Scope};
use slipway::targets::ssh::SshTarget;
use slipway::targets::ssh::session::AgentBinary;
use slipway::targets::{Settings, Target};

struct Ssh {
    sshd: sshd::Sshd,
    /// The host's `dir`: the agent, shipped revisions, the supervisor.
    host_dir: tempfile::TempDir,
    target: Arc<SshTarget>,
    /// The hosts table and secrets, as `slipway.toml` text.
    tables_toml: String,
    settings: Settings,
    tables: Settings,
}

const GROUP: &str = "one";

impl Ssh {
    /// Every supervisor this fixture's host directory holds, by its
    /// installation's directory.
    fn installations(&self) -> Vec<String> {
        let dir = self.host_dir.path().join("supervisor");
        std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect()
    }

    /// One request to a supervisor, through the agent's `service` verb run
    /// here (the host is this machine), as a node's would arrive over SSH.
    fn ask_supervisor(&self, installation: &str, op: &str, env: &str) -> String {
        let request = serde_json::json!({
            "dir": self.host_dir.path().display().to_string(),
            "installation": installation,
            "op": op,
            "environment": env,
            "service": compliance::SERVICE,
        });
        let out = common::run_with_stdin(common::slipway_bin(), &["agent", "ssh", "service"], &format!("{request}\n"), Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[async_trait::async_trait]
impl Fixture for Ssh {
    async fn start() -> Option<Self> {
        let sshd = tokio::task::spawn_blocking(sshd::Sshd::start).await.expect("start sshd");
        let host_dir = tempfile::Builder::new().prefix("slw").tempdir().expect("tempdir");
        let known = sshd.dir.path().join("known_hosts");
        write(&known, &sshd.known_hosts());
        let tables_toml = format!(
            "[secret.compliance_key]\nfile = {key:?}\n[secret.compliance_known]\nfile = {known:?}\n\n\
             [[hosts]]\ngroup = \"{GROUP}\"\naddresses = [{address:?}]\nuser = {user:?}\nkey = \"compliance_key\"\nknown_hosts = \"compliance_known\"\n\
             connect_timeout = \"5s\"\ndir = {dir:?}\n",
            key = sshd.client_key.display().to_string(),
            known = known.display().to_string(),
            address = sshd.address(),
            user = sshd.user,
            dir = host_dir.path().display().to_string(),
        );
        // The settings as a real config makes them: a service on the group.
        let text = format!(
            "[[service]]\nname = \"probe\"\ntarget = \"ssh\"\nhosts = \"{GROUP}\"\nlisten = \"127.0.0.1:1\"\ncommand = [\"probe\", \"{{port}}\"]\n\n{tables_toml}"
        );
        let config = slipway::config::parse("slipway.toml", &text).unwrap_or_else(|e| panic!("the fixture's config: {e:?}\n{text}"));
        let settings = config.services[0].spec.as_ref().expect("a managed service").settings.clone();
        let tables = config.targets.get("ssh").cloned().expect("the ssh kind read its [[hosts]]");
        // This test binary is not Slipway's: the hosts run the real one.
        let installation = format!("compliance-{}", std::process::id());
        let target = Arc::new(SshTarget::with_agent(installation, Arc::new(AgentBinary::at(common::slipway_bin()))));
        Some(Ssh { sshd, host_dir, target, tables_toml, settings, tables })
    }

    fn name(&self) -> &'static str {
        "ssh"
    }

    fn target(&self) -> Arc<dyn Target> {
        self.target.clone()
    }

    fn settings(&self) -> Settings {
        self.settings.clone()
    }

    fn job_settings(&self) -> Settings {
        self.settings.clone()
    }

    fn tables(&self) -> Settings {
        self.tables.clone()
    }

    /// A broken release exits at once (code 5) while its flag file exists
    /// (`compliance::flag_demo_command`).
    fn demo_command(&self, scope: &Scope, breakable: bool) -> Vec<String> {
        compliance::flag_demo_command(scope, breakable)
    }

    async fn release(&self, scope: &Scope, version: &str, working: bool) {
        compliance::flag_release(scope, version, working)
    }

    async fn crash(&self, id: &str) {
        let pid: i32 = id.strip_prefix("pid ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("not a pid: {id:?}"));
        // SAFETY: a process of this test's host, named by its supervisor.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -KILL {pid}");
    }

    /// The service stopped by its supervisor, as the target's own `stop`
    /// request does it (every installation that ran it here).
    async fn retire(&self, scope: &Scope) {
        for installation in self.installations() {
            let said = self.ask_supervisor(&installation, "stop", &scope.env);
            assert!(said.contains("\"result\""), "stopping {} on the host: {said}", scope.env);
        }
    }

    /// Processes of this scope's environment still running on the host.
    async fn leftovers(&self, scope: &Scope) -> Vec<String> {
        common::processes_with_env("SLIPWAY_ENV", &scope.env, true)
    }

    async fn service_toml(&self, _scope: &Scope) -> String {
        format!(
            "target = \"ssh\"\nhosts = \"{GROUP}\"\ncommand = [\"{}\", \"serve\", \"--port\", \"{{port}}\", \"--version\", \"{{version}}\"]\n\n{}",
            compliance::demo_bin(),
            self.tables_toml
        )
    }
}

impl Drop for Ssh {
    /// The host's supervisors end with the fixture (their services were
    /// retired by then): found by the host directory on their command line.
    fn drop(&mut self) {
        let dir = self.host_dir.path().display().to_string();
        for pid in common::processes_with_args(&["supervise", "--dir", &dir]) {
            // SAFETY: a supervisor of this fixture's host directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = &self.sshd;
    }
}

compliance_suite!(own_rollout: Ssh);
