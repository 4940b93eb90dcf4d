//! Issue 18: the operator's comforts of the command line, through the
//! real binary: shell completions, man pages, the systemd unit in
//! `contrib/`, and one exit code for a missing `--env`.

mod common;

use std::process::{Command, Stdio};

fn slipway(args: &[&str]) -> std::process::Output {
    Command::new(common::slipway_bin()).args(args).stdin(Stdio::null()).output().expect("slipway")
}

/// `sh -c SCRIPT` bounded by `timeout`.
fn sh(script: &str) -> std::process::Output {
    Command::new("timeout").args(["60", "sh", "-c", script]).stdin(Stdio::null()).output().expect("sh")
}

#[test]
fn issue18_completions_for_bash_zsh_and_fish() {
    let bash = slipway(&["completions", "bash"]);
    assert!(bash.status.success());
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("slipway.bash");
    std::fs::write(&file, &bash.stdout).expect("write");
    // Valid bash that registers a completion for `slipway`, offering its
    // commands.
    let out = sh(&format!(
        "bash -n {f} && bash -c 'source {f}; complete -p slipway; COMP_WORDS=(slipway de); COMP_CWORD=1; COMP_LINE=\"slipway de\"; COMP_POINT=10; _slipway slipway de slipway; echo \"${{COMPREPLY[@]}}\"'",
        f = file.display()
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("-F _slipway slipway"), "{text}");
    assert_eq!(text.lines().last(), Some("deploy"), "`slipway de<Tab>` offers deploy alone: {text}");
    for shell in ["zsh", "fish"] {
        let out = slipway(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("rollback") && text.contains("promote"), "{shell}: {text}");
    }
    let bad = slipway(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn issue18_man_pages_for_every_command_render() {
    let dir = tempfile::tempdir().expect("dir");
    let out = slipway(&["man", dir.path().to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in ["slipway.1", "slipway-deploy.1", "slipway-rollback.1", "slipway-schema.1"] {
        assert!(dir.path().join(page).is_file(), "no {page}");
    }
    assert!(!dir.path().join("slipway-agent.1").exists(), "hidden commands get no page");
    let out = sh(&format!("MANWIDTH=100 man -l {}", dir.path().join("slipway-deploy.1").display()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("slipway-deploy") && text.contains("SYNOPSIS") && text.contains("--env"), "{text}");
}

/// The unit in contrib/ passes `systemd-analyze verify` (pointed at this
/// build's binary), and its command line starts a node that answers.
#[test]
fn issue18_the_systemd_unit_verifies_and_its_command_line_serves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/slipway.service")).expect("contrib/slipway.service");
    for hardening in ["NoNewPrivileges=yes", "DynamicUser=yes", "StateDirectory=slipway", "ProtectSystem=strict", "ProtectHome=yes"] {
        assert!(unit.lines().any(|l| l == hardening), "the unit lacks {hardening}");
    }
    let bin = common::slipway_bin();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("slipway.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/slipway", bin.to_str().expect("utf-8"))).expect("write");
    let out = sh(&format!("systemd-analyze verify {} 2>&1", path.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("Unknown key") && !text.contains("not executable"), "{text}");

    // The same arguments, with this test's directories and port.
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let config = common::config_dir("[[job]]\nname = \"hello\"\ncommand = [\"true\"]\n", &[]);
    let port = common::free_port();
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| {
            a.replace("/etc/slipway", config.path().to_str().unwrap_or_default())
                .replace("127.0.0.1:7878", &format!("127.0.0.1:{port}"))
                .replace("/var/lib/slipway", dir.path().to_str().unwrap_or_default())
        })
        .collect();
    let mut child = Command::new(&bin).args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("serve");
    let health = common::wait_for_diag(std::time::Duration::from_secs(30), "the unit's node to answer", String::new, || common::http_get(port, "/healthz"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(health.contains("\"ok\""), "{health}");
    assert!(dir.path().join("slipway.db").exists(), "the store is in the state directory");
}

/// A missing `--env` where the config has several environments is a
/// usage mistake (exit 2), whether `plan` notices or the server.
#[test]
fn issue18_a_missing_env_is_exit_2_for_plan_and_deploy_alike() {
    let dir = common::config_dir(
        "[[environment]]\nname = \"staging\"\n\n[[environment]]\nname = \"production\"\n\n[[job]]\nname = \"hello\"\ncommand = [\"true\"]\n",
        &[],
    );
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(dir.path(), &format!("sqlite://{}/s.db", state.path().display()), &[], state.path(), "");
    let plan = server.cli(dir.path(), &["plan"]);
    let run = server.cli(dir.path(), &["run", "hello"]);
    for (what, out) in [("plan", &plan), ("run", &run)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains("--env"), "{what}: {err}");
    }
    let ok = server.cli(dir.path(), &["run", "hello", "--env", "staging"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
}

/// `plan` says what a deploy will wait at and the check after its rollout.
#[test]
fn issue18_plan_shows_the_gates_and_the_verify_step() {
    let demo = common::demo_bin();
    let dir = common::config_dir(
        &format!(
            r#"
[[environment]]
name = "staging"

[[environment]]
name = "production"
promote_from = "staging"
soak = "1h"
approval = true
windows = ["Mon-Fri 09:00-17:00"]

[[service]]
name = "web"
listen = "127.0.0.1:{}"
command = ["{demo}", "serve", "--port", "{{port}}"]
health = {{ http = "/healthz" }}
verify = {{ command = ["./smoke", "--quick"], timeout = "2m" }}
"#,
            common::free_port()
        ),
        &[],
    );
    let out = slipway(&["--config", dir.path().to_str().expect("utf-8"), "plan", "--env", "production"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "a deploy to production waits for",
        "an approval by an approver of production",
        "versions come by promotion from staging, after it has run 1h",
        "a deploy window: Mon-Fri 09:00-17:00",
        "web.rollout: then verify `./smoke --quick` (within 2m",
        "an upper bound",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    let staging = slipway(&["--config", dir.path().to_str().expect("utf-8"), "plan", "--env", "staging"]);
    assert!(!String::from_utf8_lossy(&staging.stdout).contains("waits for"), "staging has no gates");
}
