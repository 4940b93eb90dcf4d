//! Issue 18: `slipway deploy` shows the deployment as it happens, through
//! the real binary: every job's start and end, the rollout's steps, and
//! the deployment's last line after all of them; timestamped lines when
//! not on a terminal, a live display on one.

mod common;

use std::process::Command;

fn config(port: u16) -> String {
    let demo = common::demo_bin();
    format!(
        r#"
[[service]]
name = "web"
listen = "127.0.0.1:{port}"
instances = 2
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1, deadline = "10s" }}
migrate = {{ command = ["true"] }}
"#
    )
}

fn is_clock(s: &str) -> bool {
    s.len() == 8 && s.chars().enumerate().all(|(i, c)| if i == 2 || i == 5 { c == ':' } else { c.is_ascii_digit() })
}

#[test]
fn issue18_deploy_shows_every_job_and_the_rollout_as_timestamped_lines() {
    let dir = common::config_dir(&config(common::free_port()), &[]);
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(dir.path(), &format!("sqlite://{}/s.db", state.path().display()), &["--poll", "100ms"], state.path(), "");
    for version in ["1", "2"] {
        let out = server.cli(dir.path(), &["deploy", "web", version]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        // Everything after the acceptance is a timestamped line.
        assert!(lines[0].starts_with("deployment ") && lines[0].contains("accepted"), "{text}");
        for l in &lines[1..] {
            assert!(is_clock(l.split(' ').next().unwrap_or_default()), "no timestamp: {l:?}\n{text}");
        }
        let at = |what: &str| lines.iter().position(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what:?}:\n{text}"));
        let step_at = |what: &str| {
            lines.iter().position(|l| l.contains("web.rollout │") && l.contains(what)).unwrap_or_else(|| panic!("no rollout step {what:?}:\n{text}"))
        };
        // The migration is `true`: over before the first look, and still
        // its start line comes first.
        assert!(at("web.migrate              started") < at("web.migrate              succeeded"), "{text}");
        let (start, end) = (at("web.rollout              started"), at("web.rollout              succeeded"));
        let steps = [format!("started web {version} on"), "is healthy".into(), "traffic →".into()];
        for step in &steps {
            let i = step_at(step);
            assert!(start < i && i < end, "{step} outside the rollout's lines:\n{text}");
        }
        if version == "2" {
            let draining = step_at("draining 127.0.0.1:");
            assert!(draining < step_at("stopped 127.0.0.1:") && step_at("stopped 127.0.0.1:") < end, "{text}");
        }
        // Every step of the rollout is before its end line.
        assert!(lines.iter().rposition(|l| l.contains("web.rollout │")).is_some_and(|i| i < end), "{text}");
        // The deployment's last line comes after every job's.
        let last = lines.last().copied().unwrap_or_default();
        assert!(last.contains("succeeded in") && last.contains("2/2 jobs succeeded"), "{text}");
        assert_eq!(lines.iter().filter(|l| l.contains(": succeeded")).count(), 0, "the end said twice:\n{text}");
    }
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), the same
/// deploy runs with the live display and still ends with its last line.
#[test]
fn issue18_deploy_on_a_terminal_uses_the_live_display() {
    let dir = common::config_dir(&config(common::free_port()), &[]);
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(dir.path(), &format!("sqlite://{}/s.db", state.path().display()), &["--poll", "100ms"], state.path(), "");
    let cmd = format!("{} --config {} --server {} deploy web 1", common::slipway_bin().display(), dir.path().display(), server.url);
    let out = Command::new("timeout")
        .args(["120", "script", "-qefc", &cmd, "/dev/null"])
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    // No timestamps on a terminal: the live display instead (its redraws
    // are escape sequences), and the same words.
    assert!(text.contains("\u{1b}["), "no live display:\n{text}");
    assert!(text.contains("web.rollout │ started web 1 on") && text.contains("deployment 1 succeeded in"), "{text}");
}

/// After `slipway rollback`, `status` and `why` call it a rollback (it was
/// "deploy" and "the newest version seen").
#[test]
fn issue18_after_a_rollback_status_and_why_name_it() {
    let dir = common::config_dir(&config(common::free_port()), &[]);
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(dir.path(), &format!("sqlite://{}/s.db", state.path().display()), &["--poll", "100ms"], state.path(), "");
    for args in [&["deploy", "web", "1"][..], &["deploy", "web", "2"], &["rollback", "web"]] {
        let out = server.cli(dir.path(), args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let status = server.cli(dir.path(), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    let line = text.lines().find(|l| l.trim_start().starts_with("3 ")).unwrap_or_else(|| panic!("no deployment 3:\n{text}"));
    assert!(line.contains("rollback") && line.contains("web@1"), "{line}");
    let json = server.cli(dir.path(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let d3 = v["deployments"].as_array().into_iter().flatten().find(|d| d["id"] == 3).cloned().unwrap_or_default();
    assert_eq!(d3["cause"], "rollback", "{v}");
    let d2 = v["deployments"].as_array().into_iter().flatten().find(|d| d["id"] == 2).cloned().unwrap_or_default();
    assert!(d2.get("cause").is_none(), "a plain deploy has no cause: {d2}");
    let why = server.cli(dir.path(), &["why", "web"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(text.contains("runs 1, not 2") && text.contains("a rollback #3 has since put 1 back"), "{text}");
    assert!(!text.contains("the newest version seen"), "{text}");
}
