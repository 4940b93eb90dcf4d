//! Services on the local target, through the real binary and the demo
//! service (`slipway-demo`): deploy, zero-downtime rollouts under HTTP
//! load, automatic rollback, migrations once per deployment, kill -9 and
//! restart, bad input.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, config_dir, free_port, get_json, load, wait_for};

fn demo_bin() -> &'static str {
    common::demo_bin()
}

/// A config with one managed service `web` on `port`.
fn web_config(port: u16, instances: u32, rollout: &str, extra: &str) -> String {
    let demo = demo_bin();
    format!(
        r#"
[project]
name = "svc-test"

[[environment]]
name = "staging"

[[service]]
name = "web"
listen = "127.0.0.1:{port}"
instances = {instances}
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 2, deadline = "3s" }}
rollout = {rollout}
migrate = {{ command = ["{demo}", "migrate", "--file", "migrations.log", "--version", "{{version}}"] }}
{extra}
"#
    )
}

fn deploy(server: &Server, dir: &Path, version: &str) -> std::process::Output {
    server.cli(dir, &["deploy", "web", version, "--env", "staging"])
}

/// GET / through the proxy: the body, or None on any failure.
fn hello(port: u16) -> Option<String> {
    let out = std::process::Command::new("curl").args(["-sf", "--max-time", "5", &format!("http://127.0.0.1:{port}/")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every line the demo's migrations wrote: jobs run in the revision's
/// unpacked copy of the config directory, one per revision.
fn migrations(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in walk(dir) {
        if entry.file_name().is_some_and(|n| n == "migrations.log") {
            lines.extend(std::fs::read_to_string(&entry).unwrap_or_default().lines().map(String::from));
        }
    }
    lines.sort();
    lines
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn deploy_roll_out_and_roll_back_without_a_failed_request() {
    let port = free_port();
    let dir = config_dir(&web_config(port, 2, r#"{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "300ms" }"#, ""), &[]);
    let server = Server::start(dir.path(), None, &[]);

    let out = deploy(&server, dir.path(), "1.0");
    assert!(out.status.success(), "deploy 1.0 failed:\n{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.0"));

    // v2 under load: every request answered.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(port, stop.clone());
    // Load before, between and after the rollouts (scenario, not waits).
    std::thread::sleep(Duration::from_millis(300));
    let out = deploy(&server, dir.path(), "2.0");
    std::thread::sleep(Duration::from_millis(300));
    // v3 never becomes healthy: rolled back, still under load.
    let bad = deploy(&server, dir.path(), "3.0");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, errors) = loader.join().expect("load thread");
    assert!(out.status.success(), "deploy 2.0 failed:\n{}", text(&out));
    assert!(ok > 100, "too little load to prove anything: {ok} requests");
    assert_eq!(failed, 0, "{failed} of {} requests failed during the rollouts: {errors:?}", ok + failed);

    assert_eq!(bad.status.code(), Some(1), "a rolled-back deploy exits 1:\n{}", text(&bad));
    let said = text(&bad);
    assert!(said.contains("rolled_back") && said.contains("rolled back to 2.0"), "{said}");
    assert!(said.contains("GET /healthz → 500") && said.contains("v3.0 is broken"), "the reason carries the health output: {said}");
    assert_eq!(hello(port).as_deref(), Some("hello from demo 2.0"), "traffic stays on the last good version");

    let deps = get_json(&format!("{}/api/v1/deployments", server.url));
    let list = deps.as_array().or_else(|| deps["deployments"].as_array()).unwrap_or_else(|| panic!("a list of deployments: {deps}"));
    let states: Vec<&str> = list.iter().map(|d| d["state"].as_str().unwrap_or("")).collect();
    assert!(states.contains(&"rolled_back"), "{states:?}");
    // One migration per deployment, never one per instance.
    assert_eq!(migrations(dir.path()), vec!["migrated to 1.0", "migrated to 2.0", "migrated to 3.0"]);
}

#[test]
fn blue_green_switches_all_at_once_and_verify_failure_rolls_back() {
    let port = free_port();
    let verify = r#"verify = { command = ["sh", "-c", "test \"$SLIPWAY_VERSION\" != 2.5" ] }"#;
    let dir = config_dir(&web_config(port, 2, r#"{ strategy = "blue-green", drain = "200ms" }"#, verify), &[]);
    let server = Server::start(dir.path(), None, &[]);
    assert!(deploy(&server, dir.path(), "1.0").status.success());
    let out = deploy(&server, dir.path(), "2.0");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 2.0"));
    // 2.5 is healthy but fails its verify step: back to 2.0.
    let out = deploy(&server, dir.path(), "2.5");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("verify failed"), "{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 2.0"));
}

#[test]
fn kill_9_during_a_rollout_then_restart_runs_exactly_one_version() {
    let port = free_port();
    // Slow health (healthy after 2 s) so the kill lands mid-rollout.
    let cfg = web_config(port, 2, r#"{ strategy = "rolling", max_surge = 1, drain = "200ms" }"#, "").replace(
        r#"health = { http = "/healthz", interval = "100ms", healthy_after = 2, deadline = "3s" }"#,
        r#"health = { http = "/healthz", interval = "500ms", healthy_after = 4, deadline = "10s" }"#,
    );
    let dir = config_dir(&cfg, &[]);
    let mut server = Server::start(dir.path(), None, &[]);
    assert!(deploy(&server, dir.path(), "1.0").status.success());
    let first_pid = server.child.id();

    let accepted = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging", "--detach"]);
    assert!(accepted.status.success(), "{}", text(&accepted));
    // Wait until the new version's first instance runs, then crash.
    wait_for(Duration::from_secs(20), "an instance of 2.0", || {
        procs_of(first_pid).into_iter().any(|(_, cmd)| cmd.contains("slipway-demo") && cmd.contains("--version\x002.0")).then_some(())
    });
    server.kill9();
    // Not dropped: its instances are left for the next node to find.
    std::mem::forget(server);
    assert!(common::marked(first_pid) > 0, "the dead node's instances outlive it");

    let server = Server::start(dir.path(), None, &[]);
    wait_for(Duration::from_secs(15), "the new node to sweep the dead node's instances", || (common::marked(first_pid) == 0).then_some(()));
    // Back on the recorded version (1.0: 2.0 never took all traffic), and
    // the deployment says it was interrupted.
    let body = wait_for(Duration::from_secs(20), "the service back", || hello(port));
    assert_eq!(body, "hello from demo 1.0");
    let d = wait_for(Duration::from_secs(20), "the interrupted deployment to end", || {
        let d = get_json(&format!("{}/api/v1/deployments/2", server.url))["deployment"].clone();
        (d["state"].as_str() != Some("running") && d["state"].as_str() != Some("queued")).then_some(d)
    });
    assert_eq!(d["state"], "failed", "{d}");
    assert!(d["reason"].as_str().unwrap_or("").contains("interrupted"), "{d}");
    let versions: Vec<String> =
        procs_of(server.child.id()).into_iter().map(|(_, c)| c).filter(|c| c.contains("slipway-demo") && c.contains("\x00serve\x00")).collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.iter().all(|c| c.contains("--version\x001.0")), "only 1.0 runs: {versions:?}");
    assert_eq!(migrations(dir.path()), vec!["migrated to 1.0", "migrated to 2.0"], "the migration ran once per deployment");

    // Deploying again completes the change.
    let out = deploy(&server, dir.path(), "2.0");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 2.0"));
}

/// (pid, NUL-separated command line) of the processes that Slipway
/// process `owner` started (its owner mark): other tests' are not ours.
fn procs_of(owner: u32) -> Vec<(i32, String)> {
    let mark = format!("SLIPWAY_OWNER={owner}.");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|p| std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv.starts_with(mark.as_bytes()))))
        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok().map(|c| (p, String::from_utf8_lossy(&c).to_string())))
        .collect()
}

#[test]
fn a_crashed_instance_is_restarted() {
    let port = free_port();
    let dir = config_dir(&web_config(port, 1, r#"{ strategy = "rolling", max_surge = 1, drain = "100ms" }"#, ""), &[]);
    let server = Server::start(dir.path(), None, &[]);
    assert!(deploy(&server, dir.path(), "1.0").status.success());
    let owner = server.child.id();
    let pids = |v: &str| -> Vec<i32> { procs_of(owner).into_iter().filter(|(_, c)| c.contains(&format!("--version\x00{v}"))).map(|(p, _)| p).collect() };
    let before = pids("1.0");
    assert_eq!(before.len(), 1, "{before:?}");
    let _ = std::process::Command::new("kill").arg("-9").arg(before[0].to_string()).status();
    let started = Instant::now();
    wait_for(Duration::from_secs(15), "a new instance", || {
        let now = pids("1.0");
        (now.len() == 1 && now[0] != before[0] && hello(port).is_some()).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(15));
    let events = get_json(&format!("{}/api/v1/services/staging/web/events", server.url));
    let kinds: Vec<&str> = events.as_array().expect("events").iter().map(|e| e["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["restarted", "instance_died"], "the crash and the restart are recorded: {events}");
    assert!(events[1]["message"].as_str().unwrap_or("").contains("killed by signal 9"), "{events}");
}

#[test]
fn a_port_in_use_fails_the_rollout_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = config_dir(&web_config(port, 1, r#"{ strategy = "rolling", max_surge = 1 }"#, ""), &[]);
    let server = Server::start(dir.path(), None, &[]);
    let out = deploy(&server, dir.path(), "1.0");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains(&format!("127.0.0.1:{port}")) && said.to_lowercase().contains("in use"), "{said}");
}

#[test]
fn service_config_mistakes_are_reported_with_their_place() {
    let dir = config_dir(
        r#"
[[service]]
name = "web"
command = ["./server"]
instances = 0
health = { http = "healthz", interval = "often" }
rollout = { strategy = "canary" }
"#,
        &[],
    );
    let out = std::process::Command::new(common::slipway_bin()).arg("--config").arg(dir.path()).arg("validate").output().expect("run");
    assert_eq!(out.status.code(), Some(3));
    let said = text(&out);
    for expected in [
        "no `listen` address",
        "never receives {port}",
        "`instances` must be between 1 and 64",
        "starting with '/'",
        "not a duration",
        "unknown rollout strategy \"canary\"",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
}

#[test]
fn rollback_returns_to_the_previous_version_without_migrating() {
    let port = free_port();
    let dir = config_dir(&web_config(port, 2, r#"{ strategy = "rolling", max_surge = 2, drain = "100ms" }"#, ""), &[]);
    let server = Server::start(dir.path(), None, &[]);
    let refused = server.cli(dir.path(), &["rollback", "web", "--env", "staging"]);
    assert_ne!(refused.status.code(), Some(0), "nothing recorded yet: {}", text(&refused));
    assert!(deploy(&server, dir.path(), "1.0").status.success());
    let only_one = server.cli(dir.path(), &["rollback", "web"]);
    assert_eq!(only_one.status.code(), Some(6), "one version only: refused (409): {}", text(&only_one));
    assert!(text(&only_one).contains("no earlier version"), "{}", text(&only_one));
    assert!(deploy(&server, dir.path(), "2.0").status.success());

    let out = server.cli(dir.path(), &["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.0"));
    assert!(text(&out).contains("web.rollout") && !text(&out).contains("web.migrate"), "only the rollout runs: {}", text(&out));
    assert_eq!(migrations(dir.path()), vec!["migrated to 1.0", "migrated to 2.0"]);

    let status = server.cli(dir.path(), &["status"]);
    let said = text(&status);
    let line = said.lines().find(|l| l.starts_with("staging") && l.contains("web")).unwrap_or_else(|| panic!("no service line in:\n{said}"));
    assert!(line.contains("1.0") && line.contains("2.0") && line.contains("2/2"), "version, previous and instances: {line}");
    let services = get_json(&format!("{}/api/v1/services", server.url));
    assert_eq!(services[0]["version"], "1.0", "{services}");
    assert_eq!(services[0]["previous_version"], "2.0", "{services}");
}

// Issue 19 (an audit of waits without a bound): `slipway status`, `GET
// /api/v1/services` and the dashboard's overview waited for a rollout in
// progress to let go of its service, for as long as its health deadline,
// drains and stop graces took.
#[test]
fn issue19_services_are_listed_while_a_rollout_runs() {
    let port = free_port();
    let config = web_config(port, 2, r#"{ strategy = "rolling", max_surge = 1, drain = "100ms" }"#, "").replace(r#"deadline = "3s""#, r#"deadline = "15s""#);
    let dir = config_dir(&config, &[]);
    let server = Server::start(dir.path(), None, &[]);
    assert!(deploy(&server, dir.path(), "1.0").status.success());

    // 3.0 never becomes healthy: its rollout holds the service until the
    // health deadline.
    let bad = std::thread::scope(|scope| {
        let rollout = scope.spawn(|| deploy(&server, dir.path(), "3.0"));
        // The rollout says this once it holds the service.
        wait_for(Duration::from_secs(20), "the rollout of 3.0 to hold the service", || {
            let deployments = get_json(&format!("{}/api/v1/deployments", server.url));
            let id = deployments.as_array().into_iter().flatten().find(|d| d["version"] == "3.0").and_then(|d| d["id"].as_i64());
            id.is_some_and(|id| text(&server.cli(dir.path(), &["logs", &id.to_string()])).contains("[rollout] rolling web out"))
        });
        let status = server.cli(dir.path(), &["status"]);
        let said = text(&status);
        assert!(status.status.success(), "{said}");
        let line = said.lines().find(|l| l.starts_with("staging") && l.contains("web")).unwrap_or_else(|| panic!("no service line in:\n{said}"));
        assert!(line.contains("1.0") && line.contains("2/2"), "what runs until the rollout ends: {line}");
        let deployments = get_json(&format!("{}/api/v1/deployments", server.url));
        let states: Vec<(String, String)> = deployments
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| (d["version"].as_str().unwrap_or("").to_string(), d["state"].as_str().unwrap_or("").to_string()))
            .collect();
        assert!(states.contains(&("3.0".to_string(), "running".to_string())), "answered while 3.0 still rolls out: {states:?}");
        rollout.join().expect("deploy thread")
    });
    assert_eq!(bad.status.code(), Some(1), "rolled back: {}", text(&bad));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.0"));
}

/// A tiny HTTP server for release tarballs: `GET /web-<v>.tar.gz` serves
/// `tarball`; `/down-*` always answers 503; anything else 404. Counts hits.
fn tarball_server(tarball: Vec<u8>) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            seen.lock().expect("lock").push(path.clone());
            let (status, body): (&str, &[u8]) = if path.starts_with("/web-") {
                ("200 OK", &tarball)
            } else if path.starts_with("/down-") {
                ("503 Service Unavailable", b"try later")
            } else {
                ("404 Not Found", b"no such release")
            };
            let _ = write!(conn, "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(body);
        }
    });
    (port, hits)
}

/// A release tarball: `bin/web` starts the demo server.
fn release_tarball() -> (Vec<u8>, String) {
    use sha2::Digest;
    let script = format!("#!/bin/sh\nexec {} serve --port \"$1\" --version \"$2\"\n", demo_bin());
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    builder.append_data(&mut header, "bin/web", script.as_bytes()).expect("append");
    let bytes = builder.into_inner().expect("tar").finish().expect("gzip");
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    (bytes, sha)
}

#[test]
fn a_release_tarball_is_fetched_checked_and_run_and_a_bad_one_refused() {
    let (tarball, sha) = release_tarball();
    let (http, hits) = tarball_server(tarball);
    let port = free_port();
    let cfg = |path: &str| {
        format!(
            r#"
[[environment]]
name = "staging"

[[service]]
name = "web"
listen = "127.0.0.1:{port}"
command = ["./bin/web", "{{port}}", "{{version}}"]
artifact = {{ url = "http://127.0.0.1:{http}/{path}-{{version}}.tar.gz", attempts = 2 }}
health = {{ http = "/healthz", interval = "100ms", deadline = "3s" }}
migrate = {{ command = ["sh", "-c", "echo migrating in $PWD"] }}
"#
        )
    };
    let dir = config_dir(&cfg("web"), &[]);
    let server = Server::start(dir.path(), None, &[]);

    let missing = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging"]);
    assert_eq!(missing.status.code(), Some(6), "{}", text(&missing));
    assert!(text(&missing).contains("--sha256"), "{}", text(&missing));

    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "staging", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.0"));
    assert_eq!(hits.lock().expect("lock").as_slice(), ["/web-1.0.tar.gz"]);

    // Same checksum again: served from the cache, no download.
    let again = server.cli(dir.path(), &["deploy", "web", "1.1", "--env", "staging", "--sha256", &sha]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(hits.lock().expect("lock").len(), 1, "cached per checksum");

    // A checksum that does not match: refused before migrate or rollout.
    let wrong = "0".repeat(64);
    let bad = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "staging", "--sha256", &wrong]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let said = text(&bad);
    assert!(said.contains("sha256 mismatch") && said.contains(&sha), "{said}");
    let d = get_json(&format!("{}/api/v1/deployments/3", server.url));
    let states: Vec<(String, String)> =
        d["jobs"].as_array().expect("jobs").iter().map(|j| (j["name"].as_str().unwrap_or("").into(), j["state"].as_str().unwrap_or("").into())).collect();
    assert!(states.contains(&("web.migrate".into(), "skipped".into())) && states.contains(&("web.rollout".into(), "skipped".into())), "{states:?}");
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.1"), "traffic stays where it was");

    // A restarted node runs the recorded release from its unpacked copy:
    // no download.
    let downloads = hits.lock().expect("lock").len();
    drop(server);
    let _server = Server::start(dir.path(), None, &[]);
    let back = wait_for(Duration::from_secs(20), "the service restored", || hello(port));
    assert_eq!(back, "hello from demo 1.1");
    assert_eq!(hits.lock().expect("lock").len(), downloads, "restored from the cache");
}

#[test]
fn a_download_that_keeps_failing_says_the_status_and_the_tries() {
    let (tarball, sha) = release_tarball();
    let (http, hits) = tarball_server(tarball);
    let port = free_port();
    let config = |path: &str| {
        format!(
            r#"
[[service]]
name = "web"
listen = "127.0.0.1:{port}"
command = ["./bin/web", "{{port}}", "{{version}}"]
artifact = {{ url = "http://127.0.0.1:{http}/{path}-{{version}}.tar.gz", attempts = 2 }}
"#
        )
    };
    let dir = config_dir(&config("down"), &[]);
    let server = Server::start(dir.path(), None, &[]);
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--sha256", &sha]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("HTTP 503") && said.contains("after 2 tries"), "{said}");
    assert_eq!(hits.lock().expect("lock").len(), 2, "a 5xx is retried up to `attempts`");

    // A 404 is final at once.
    std::fs::write(dir.path().join("slipway.toml"), config("gone")).expect("rewrite config");
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--sha256", &sha, "--id", "second"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("HTTP 404") && text(&out).contains("after 1 try"), "{}", text(&out));
    assert_eq!(hits.lock().expect("lock").len(), 3);
}

// Issue 19 (an audit of where secrets go): an artifact URL's user and
// password, or a token in its query (a private release store), were
// printed with it in the job's output and the failure's reason.
#[test]
fn issue19_an_artifact_urls_credentials_are_never_shown() {
    let (tarball, sha) = release_tarball();
    let (http, hits) = tarball_server(tarball);
    let port = free_port();
    let config = format!(
        r#"
[[service]]
name = "web"
listen = "127.0.0.1:{port}"
command = ["./bin/web", "{{port}}", "{{version}}"]
artifact = {{ url = "http://reader:pw-in-the-url-56@127.0.0.1:{http}/down-{{version}}.tar.gz?token=tok-in-the-query-78", attempts = 2 }}
"#
    );
    let dir = config_dir(&config, &[]);
    let server = Server::start(dir.path(), None, &[]);
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--sha256", &sha]);
    let said = format!("{}{}", text(&out), text(&server.cli(dir.path(), &["logs", "1"])));
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("HTTP 503") && said.contains("http://reader:***@127.0.0.1"), "what failed, and where: {said}");
    assert_eq!(hits.lock().expect("lock").len(), 2, "{said}");
    let everything = format!("{said}{}", server.log_text());
    assert!(!everything.contains("pw-in-the-url-56") && !everything.contains("tok-in-the-query-78"), "{everything}");
}

#[test]
fn a_failed_verify_is_never_what_rollback_returns_to() {
    let port = free_port();
    let verify = r#"verify = { command = ["sh", "-c", "test \"$SLIPWAY_VERSION\" != 2.5" ] }"#;
    let dir = config_dir(&web_config(port, 1, r#"{ strategy = "blue-green", drain = "100ms" }"#, verify), &[]);
    let server = Server::start(dir.path(), None, &[]);
    for v in ["1.0", "2.0"] {
        assert!(deploy(&server, dir.path(), v).status.success());
    }
    assert_eq!(deploy(&server, dir.path(), "2.5").status.code(), Some(1));
    let services = get_json(&format!("{}/api/v1/services", server.url));
    assert_eq!((&services[0]["version"], &services[0]["previous_version"]), (&"2.0".into(), &"1.0".into()), "{services}");
    assert!(server.cli(dir.path(), &["rollback", "web"]).status.success());
    assert_eq!(hello(port).as_deref(), Some("hello from demo 1.0"));
}

#[test]
fn container_keys_are_checked_against_the_target() {
    let dir = config_dir(
        r#"
[[service]]
name = "api"
listen = "127.0.0.1:8081"
command = ["./api", "{port}"]
image = "registry.example.org/api"

[[service]]
name = "web"
target = "docker"
listen = "127.0.0.1:8082"
image = "Registry/Web:latest"
memory = "1k"

[[service]]
name = "db"
target = "docker"
listen = "127.0.0.1:8083"
"#,
        &[],
    );
    let out = std::process::Command::new(common::slipway_bin()).arg("--config").arg(dir.path()).arg("validate").output().expect("run");
    assert_eq!(out.status.code(), Some(3));
    let said = text(&out);
    for expected in [
        "`image` is for targets that run images, and service \"api\" runs on target \"local\"",
        "has no `port`",
        "is not an image name without a tag",
        "not a size of at least 6m",
        "service \"db\" sets `listen` but has no `image` to run",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
}
