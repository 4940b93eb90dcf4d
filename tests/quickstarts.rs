//! The README's walkthroughs run as they are written: `scripts/quickstart.sh`
//! and (as root, on a throwaway fleet) `scripts/ssh-quickstart.sh`. Each
//! must end with success and say what the README promises it shows.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

/// Run a script of the repository to its end (killed after `within`): its
/// exit status and everything it printed. It runs this suite's own builds
/// of `slipway` and `slipway-demo` (`SLIPWAY_BIN`, `SLIPWAY_DEMO_BIN`):
/// the `cargo build` it would run otherwise can relink `target/debug/slipway`
/// (dev-dependencies unify features only for the test build) while other
/// tests are running it.
fn script(name: &str, within: Duration) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let child = Command::new("timeout")
        .args(["-k", "10", &within.as_secs().to_string(), "bash", &format!("{root}/scripts/{name}")])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("SLIPWAY_CONFIG")
        .env_remove("SLIPWAY_SERVER")
        .env_remove("SLIPWAY_STORE")
        .env("SLIPWAY_BIN", common::slipway_bin())
        .env("SLIPWAY_DEMO_BIN", common::demo_bin())
        .spawn()
        .expect("run the script");
    let out = child.wait_with_output().expect("its output");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Issue 19: a script's own `cargo build` relinked the binary other tests
/// were running (`cannot read …/slipway (deleted)` in the SSH tests).
fn assert_ran_the_suites_builds(out: &str) {
    let ours = format!("==> using the builds {} and {}", common::slipway_bin().display(), common::demo_bin());
    assert!(out.contains(&ours), "it runs the suite's builds, not one of its own:\n{out}");
}

#[test]
fn the_quickstart_runs_as_the_readme_says() {
    let (ok, out) = script("quickstart.sh", Duration::from_secs(600));
    assert!(ok, "quickstart.sh failed:\n{out}");
    assert_ran_the_suites_builds(&out);
    assert!(out.contains(", 0 failed"), "no request fails during the rollout:\n{out}");
    assert!(out.contains("the deployment was rolled back, as expected"), "v3 is rolled back:\n{out}");
    // Issue 18: its logs used to be written into the config directory, so
    // every deploy ran a new revision.
    assert!(out.contains(": 5 deployments, 1 revision(s)"), "one revision for every deployment:\n{out}");
    // Issue 18: its last hint named a server it had already stopped.
    assert!(out.contains("web.rollout stdout: [rollout] rolling back to 2"), "the rollback's account is shown while the server runs:\n{out}");
}

#[test]
fn issue15_the_ssh_quickstart_runs_as_the_readme_says() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run the SSH walkthrough: it needs root");
        eprintln!("skipped: the SSH walkthrough needs root");
        return;
    }
    let (ok, out) = script("ssh-quickstart.sh", Duration::from_secs(600));
    assert!(ok, "ssh-quickstart.sh failed:\n{out}");
    assert_ran_the_suites_builds(&out);
    for want in [
        "uptime attempt 1 on 3 hosts:",
        "h1: up since",
        "answered, 0 failed",
        "(exit 1: rolled back, as it should be)",
        "drained: no new deploys, no new connections",
        "migrated to 2 on h1",
    ] {
        assert!(out.contains(want), "{want:?} not in its output:\n{out}");
    }
    // Every host ends on v2: the unhealthy v3 went nowhere.
    let last = out.rsplit("==> slipway hosts\n").next().unwrap_or_default();
    assert_eq!(last.matches("production/web 2 (1/1)").count(), 3, "{out}");
    // Nothing it started outlives it. A background `fleet.sh client …` job
    // is a shell, fleet.sh, timeout and the command: stopping the shell
    // alone left the web server and `slipway serve` running on the bridge
    // until their timeout, ten minutes later.
    let work = out
        .split("fleet.sh up ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|f| f.strip_suffix("/fleet"))
        .unwrap_or_else(|| panic!("the fleet's directory in its output:\n{out}"))
        .to_string();
    let left = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&work))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !left().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(left(), Vec::<String>::new(), "processes of the walkthrough still running after it ended");
}
