//! The compliance suite (tests/compliance/) on the `local` target:
//! processes on this machine.

mod common;
#[macro_use]
mod compliance;

use std::sync::Arc;

use compliance::{Fixture, Scope};
use slipway::targets::{LocalTarget, Target};

struct Local;

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

    /// A broken release exits at once (code 5) while its flag file exists
    /// (`compliance::flag_demo_command`).
    fn demo_command(&self, scope: &Scope, breakable: bool) -> Vec<String> {
        compliance::flag_demo_command(scope, breakable)
    }

    async fn release(&self, scope: &Scope, version: &str, working: bool) {
        compliance::flag_release(scope, version, working)
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
