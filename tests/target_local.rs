//! The compliance suite (tests/compliance/) on the `local` target:
//! processes on this machine.

mod common;
#[macro_use]
mod compliance;

use std::sync::Arc;

use compliance::{Fixture, Scope};
use slipway::targets::{LocalTarget, Target};

struct Local;

impl Local {
    fn flag(scope: &Scope, version: &str) -> std::path::PathBuf {
        scope.dir.join(format!("broken-{version}"))
    }
}

#[async_trait::async_trait]
impl Fixture for Local {
    async fn start() -> Option<Self> {
        Some(Local)
    }

    fn name(&self) -> &'static str {
        "local"
    }

    fn target(&self) -> Arc<dyn Target> {
        Arc::new(LocalTarget::default())
    }

    /// A broken release exits at once (code 5, saying "broken"): a shell
    /// wrapper finds its flag file before it runs the demo.
    fn demo_command(&self, scope: &Scope, breakable: bool) -> Vec<String> {
        let demo = compliance::demo_bin();
        if !breakable {
            return [demo.as_str(), "serve", "--port", "{port}", "--version", "{version}"].map(String::from).to_vec();
        }
        let flag = scope.dir.join("broken-");
        let script = format!("test -e '{}'\"$0\" && {{ echo broken >&2; exit 5; }}; exec '{demo}' serve --port \"$1\" --version \"$0\"", flag.display());
        ["sh", "-c", &script, "{version}", "{port}"].map(String::from).to_vec()
    }

    async fn release(&self, scope: &Scope, version: &str, working: bool) {
        if working {
            let _ = std::fs::remove_file(Self::flag(scope, version));
        } else {
            std::fs::write(Self::flag(scope, version), "").expect("write the flag");
        }
    }

    async fn crash(&self, id: &str) {
        let pid = id.strip_prefix("pid ").unwrap_or_else(|| panic!("not a pid: {id:?}"));
        let status = std::process::Command::new("kill").args(["-KILL", pid]).status().expect("run kill");
        assert!(status.success(), "kill -KILL {pid}: {status}");
    }

    /// Instances carry SLIPWAY_ENV: any process of this scope's
    /// environment still running is left over (killed now).
    async fn leftovers(&self, scope: &Scope) -> Vec<String> {
        common::processes_with_env("SLIPWAY_ENV", &scope.env, true)
    }

    async fn service_toml(&self, _scope: &Scope) -> String {
        format!("command = [\"{}\", \"serve\", \"--port\", \"{{port}}\", \"--version\", \"{{version}}\"]\n", compliance::demo_bin())
    }
}

compliance_suite!(Local);
