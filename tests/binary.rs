//! End-to-end tests of the real `slipway` binary: crashes (SIGKILL) and
//! restarts, several nodes on one PostgreSQL store, lease takeover,
//! revisions, timeouts, retries, bounded output and CLI exit codes.
//!
//! Jobs prove "ran exactly once" through side effects: each appends
//! `<job> <attempt>` to a marker file outside the config directory (jobs
//! run in a snapshot of the config directory, so the marker path is
//! absolute and passed through the job's `env`). Every wait is bounded;
//! nothing asserts on wall-clock durations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, free_port, get_json, post_json, slipway_bin};
use serde_json::Value;

/// Generous bound for anything that should happen "soon".
const WAIT: Duration = Duration::from_secs(60);

/// `mark.sh FIRST [LATER]`: record "<job> <attempt>" in $MARK, then sleep
/// FIRST seconds on attempt 1 and LATER (default FIRST) on later attempts.
/// `exec`, so the sleep is the job's direct child (PR_SET_PDEATHSIG).
const MARK_SH: &str = r#"#!/bin/sh
echo "$SLIPWAY_JOB $SLIPWAY_ATTEMPT" >> "$MARK"
if [ "$SLIPWAY_ATTEMPT" -gt 1 ] && [ -n "$2" ]; then exec sleep "$2"; fi
exec sleep "${1:-0}"
"#;

// ---------------------------------------------------------------- fixture

/// A config directory plus a directory outside it for markers, stores and
/// server logs (server logs inside the config dir would become part of
/// every revision). `@EXT@` and `@NONCE@` in the config text are replaced.
struct Fx {
    cfg: tempfile::TempDir,
    ext: tempfile::TempDir,
    /// Digits unique to this test run, for `pgrep -f` patterns.
    nonce: String,
    text: String,
    scripts: Vec<(String, String)>,
}

impl Fx {
    fn new(toml: &str, scripts: &[(&str, &str)]) -> Fx {
        let ext = tempfile::tempdir().expect("tempdir");
        let nonce = format!("{}{:06}", std::process::id() % 10_000, rand::random::<u32>() % 1_000_000);
        let text = toml.replace("@EXT@", &ext.path().display().to_string()).replace("@NONCE@", &nonce);
        let scripts: Vec<(String, String)> = scripts.iter().map(|(n, b)| (n.to_string(), b.replace("@NONCE@", &nonce))).collect();
        let refs: Vec<(&str, &str)> = scripts.iter().map(|(n, b)| (n.as_str(), b.as_str())).collect();
        let cfg = common::config_dir(&text, &refs);
        Fx { cfg, ext, nonce, text, scripts }
    }

    fn dir(&self) -> &Path {
        self.cfg.path()
    }

    /// Another node's own copy of the same config directory.
    fn copy(&self) -> tempfile::TempDir {
        let refs: Vec<(&str, &str)> = self.scripts.iter().map(|(n, b)| (n.as_str(), b.as_str())).collect();
        common::config_dir(&self.text, &refs)
    }

    fn sqlite(&self) -> String {
        common::sqlite_url(self.ext.path())
    }

    fn marker(&self) -> PathBuf {
        self.ext.path().join("marks")
    }

    /// Lines of the marker file as (job, attempt).
    fn marks(&self) -> Vec<(String, i64)> {
        let text = std::fs::read_to_string(self.marker()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (job, attempt) = l.split_once(' ')?;
                Some((job.to_string(), attempt.trim().parse().ok()?))
            })
            .collect()
    }

    /// How many times `job` started, by its side effects.
    fn runs(&self, job: &str) -> usize {
        self.marks().iter().filter(|(j, _)| j == job).count()
    }

    fn marked(&self, job: &str, attempt: i64) -> bool {
        self.marks().iter().any(|(j, a)| j == job && *a == attempt)
    }

    /// Start `slipway serve` on `config` with its log in the outside dir.
    fn serve_in(&self, config: &Path, store: &str, extra: &[&str]) -> Server {
        Server::start_logged(config, store, extra, self.ext.path(), "")
    }

    fn serve(&self, store: &str, extra: &[&str]) -> Server {
        self.serve_in(self.dir(), store, extra)
    }
}

// ---------------------------------------------------------------- helpers

/// Poll `f` until Some; on timeout panic with `what` and `diag()`.
fn wait<T>(what: &str, diag: impl Fn() -> String, f: impl FnMut() -> Option<T>) -> T {
    wait_within(WAIT, what, diag, f)
}

fn wait_within<T>(limit: Duration, what: &str, diag: impl Fn() -> String, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for_diag(limit, what, diag, f)
}

/// Processes die at once when killed; this bounds waiting for it.
const GONE: Duration = Duration::from_secs(15);

/// Kills (SIGKILL) processes matching a `pgrep -f` pattern when dropped,
/// so a failing test leaves nothing running behind it.
struct Reap(String);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-f", &self.0]).status();
    }
}

/// Submit a run event; the deployment id.
fn submit_run(url: &str, jobs: &[&str], env: Option<&str>) -> i64 {
    let body = serde_json::json!({"kind": "run", "jobs": jobs, "environment": env}).to_string();
    let (status, v) = post_json(&format!("{url}/api/v1/events"), &body);
    assert_eq!(status, 202, "submit {jobs:?}: {v}");
    v["deployment_id"].as_i64().unwrap_or_else(|| panic!("no deployment_id in {v}"))
}

fn detail(url: &str, id: i64) -> Value {
    get_json(&format!("{url}/api/v1/deployments/{id}"))
}

fn state(d: &Value) -> &str {
    d["deployment"]["state"].as_str().unwrap_or("?")
}

fn job<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["jobs"].as_array().and_then(|js| js.iter().find(|j| j["name"] == name)).unwrap_or_else(|| panic!("no job {name} in {d:#}"))
}

fn job_state<'a>(d: &'a Value, name: &str) -> &'a str {
    job(d, name)["state"].as_str().unwrap_or("?")
}

fn attempts<'a>(d: &'a Value, name: &str) -> Vec<&'a Value> {
    d["attempts"].as_array().map(|a| a.iter().filter(|x| x["job"] == name).collect()).unwrap_or_default()
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled" | "superseded")
}

/// Wait until the deployment ends; its detail.
fn wait_done(url: &str, id: i64, diag: impl Fn() -> String) -> Value {
    wait(
        &format!("deployment {id} to end"),
        || format!("{:#}\n{}", detail(url, id), diag()),
        || {
            let d = detail(url, id);
            is_terminal(state(&d)).then_some(d)
        },
    )
}

/// Every stored log line of a deployment (optionally one job's).
fn logs(url: &str, id: i64, job: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let mut u = format!("{url}/api/v1/deployments/{id}/logs?after={after}&limit=10000");
        if let Some(j) = job {
            u.push_str(&format!("&job={j}"));
        }
        let page = get_json(&u);
        let page = page.as_array().cloned().unwrap_or_else(|| panic!("logs: not an array: {page}"));
        let n = page.len();
        if let Some(last) = page.last() {
            after = last["seq"].as_i64().expect("seq");
        }
        out.extend(page);
        if n < 10_000 {
            return out;
        }
    }
}

/// A finished job's stdout lines. Output is stored asynchronously, just
/// after the job's result: wait for the closing "[slipway] attempt …" note,
/// which is written after all of the attempt's output.
fn stdout_of(server: &Server, id: i64, job: &str) -> Vec<String> {
    let lines = wait(
        &format!("the output of {job} to be stored"),
        || logs_of(&[server]),
        || {
            let lines = logs(&server.url, id, Some(job));
            lines.iter().any(|l| l["stream"] == "slipway" && l["line"].as_str().unwrap_or_default().starts_with("[slipway] attempt")).then_some(lines)
        },
    );
    lines.iter().filter(|l| l["stream"] == "stdout").map(|l| l["line"].as_str().unwrap_or_default().to_string()).collect()
}

/// Processes whose command line contains `pattern` (pgrep -f), other than pgrep.
fn pgrep(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-a", "-f", pattern]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Whether the process `pid` is alive (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

fn text(o: &std::process::Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn logs_of(servers: &[&Server]) -> String {
    servers.iter().map(|s| format!("--- serve log {}:\n{}", s.url, s.log_text())).collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------- tests

/// A crash (SIGKILL) mid-deployment, then a restart on the same SQLite
/// store: the non-idempotent job that was running fails as interrupted,
/// the idempotent one is retried, and nothing that finished runs again.
#[test]
fn kill9_during_run_then_restart_sqlite() {
    let fx = Fx::new(
        r#"
[project]
name = "crash"

[[job]]
name = "A"
command = ["./mark.sh", "0"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "B"
needs = ["A"]
command = ["./mark.sh", "30.@NONCE@"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "C"
needs = ["A"]
idempotent = true
command = ["./mark.sh", "30.@NONCE@", "1"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "D"
needs = ["C"]
command = ["./mark.sh", "0"]
env = { MARK = "@EXT@/marks" }
"#,
        &[("mark.sh", MARK_SH)],
    );
    let store = fx.sqlite();
    let flags = ["--poll", "200ms", "--parallelism", "4", "--node-id", "first", "--shutdown-grace", "1s"];
    let mut server = fx.serve(&store, &flags);
    let id = submit_run(&server.url, &["A", "B", "C", "D"], None);

    wait(
        "B and C running (and started)",
        || format!("{:#}\n{}", detail(&server.url, id), logs_of(&[&server])),
        || {
            let d = detail(&server.url, id);
            (job_state(&d, "B") == "running" && job_state(&d, "C") == "running" && fx.marked("B", 1) && fx.marked("C", 1)).then_some(())
        },
    );
    let before = detail(&server.url, id);
    assert_eq!(job_state(&before, "A"), "succeeded");
    assert_eq!(job_state(&before, "D"), "pending");
    server.kill9();

    let server = fx.serve(&store, &["--poll", "200ms", "--parallelism", "4", "--node-id", "second", "--shutdown-grace", "1s"]);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    let diag = format!("{d:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&server]));

    assert_eq!(state(&d), "failed", "B failed, so the deployment failed\n{diag}");
    // A completed before the crash: it never ran again.
    assert_eq!(fx.runs("A"), 1, "{diag}");
    assert_eq!(job_state(&d, "A"), "succeeded", "{diag}");
    assert_eq!(job(&d, "A")["attempt"], 1, "{diag}");
    // B is not idempotent: failed as interrupted, not run again.
    let b = job(&d, "B");
    assert_eq!(b["state"], "failed", "{diag}");
    let reason = b["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("interrupted") && reason.contains("idempotent"), "B's reason: {reason:?}\n{diag}");
    assert_eq!(fx.runs("B"), 1, "{diag}");
    assert_eq!(b["attempt"], 1, "{diag}");
    // C is idempotent: its interrupted attempt 1 is recorded, attempt 2 succeeded.
    let c = job(&d, "C");
    assert_eq!(c["state"], "succeeded", "{diag}");
    assert_eq!(c["attempt"], 2, "{diag}");
    assert_eq!(c["node"], "second", "{diag}");
    let c_attempts = attempts(&d, "C");
    assert_eq!(c_attempts.len(), 2, "{diag}");
    assert_eq!(c_attempts[0]["outcome"], "interrupted", "{diag}");
    assert_eq!(c_attempts[0]["node"], "first", "{diag}");
    assert_eq!(c_attempts[1]["outcome"], "succeeded", "{diag}");
    assert_eq!(fx.marks().iter().filter(|(j, _)| j == "C").map(|(_, a)| *a).collect::<Vec<_>>(), vec![1, 2], "{diag}");
    // D ran once, after C's retry.
    assert_eq!(job_state(&d, "D"), "succeeded", "{diag}");
    assert_eq!(fx.runs("D"), 1, "{diag}");
    let order: Vec<String> = fx.marks().into_iter().map(|(j, a)| format!("{j}{a}")).collect();
    let pos = |x: &str| order.iter().position(|o| o == x).unwrap_or_else(|| panic!("{x} not in {order:?}"));
    assert!(pos("C2") < pos("D1"), "{order:?}");

    let out = server.cli(fx.dir(), &["status", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted"), "status should explain the interruption:\n{}", text(&out));
}

/// After SIGKILL of the server, the jobs it was running do not run on
/// beside their retries: the next Slipway on the host (here the restart)
/// finds them by their owner mark and kills them first.
#[test]
fn sigkill_leaves_no_orphan_job_processes() {
    let fx = Fx::new(
        r#"
[project]
name = "orphans"

[[job]]
name = "one"
command = ["./mark.sh", "300.@NONCE@1"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "two"
command = ["./mark.sh", "300.@NONCE@2"]
env = { MARK = "@EXT@/marks" }
"#,
        &[("mark.sh", MARK_SH)],
    );
    let mut server = fx.serve(&fx.sqlite(), &["--poll", "200ms", "--parallelism", "4"]);
    let pattern = format!("^sleep 300\\.{}", fx.nonce);
    let _reap = Reap(pattern.clone());
    let id = submit_run(&server.url, &["one", "two"], None);
    wait(
        "both jobs' processes to run",
        || format!("{:#}\n{}", detail(&server.url, id), logs_of(&[&server])),
        || (fx.marked("one", 1) && fx.marked("two", 1) && pgrep(&pattern).len() == 2).then_some(()),
    );
    server.kill9();
    let restarted = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    wait_within(
        GONE,
        "the killed node's job processes to be gone",
        || format!("still running: {:?}", pgrep(&pattern)),
        || pgrep(&pattern).is_empty().then_some(()),
    );
    // (Any Slipway on the host sweeps: when tests run side by side another
    // test's server may get there first, so the log is not asserted.)
    drop(restarted);
}

/// Two nodes on one PostgreSQL store split a wide deployment between
/// them, and every job runs exactly once.
#[test]
fn two_nodes_share_work_on_postgres() {
    let Some(pg) = runtime().block_on(common::postgres_url()) else { return };
    let mut toml = String::from("[project]\nname = \"shared\"\n");
    let names: Vec<String> = (1..=12).map(|i| format!("w{i:02}")).collect();
    for n in &names {
        toml.push_str(&format!("\n[[job]]\nname = \"{n}\"\ncommand = [\"./mark.sh\", \"1\"]\nenv = {{ MARK = \"@EXT@/marks\" }}\n"));
    }
    let needs = names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    toml.push_str(&format!("\n[[job]]\nname = \"final\"\nneeds = [{needs}]\ncommand = [\"./mark.sh\", \"0\"]\nenv = {{ MARK = \"@EXT@/marks\" }}\n"));
    let fx = Fx::new(&toml, &[("mark.sh", MARK_SH)]);
    let other = fx.copy();
    let n1 = format!("n1-{}", fx.nonce);
    let n2 = format!("n2-{}", fx.nonce);
    let s1 = fx.serve(&pg, &["--poll", "200ms", "--parallelism", "2", "--node-id", &n1]);
    let s2 = fx.serve_in(other.path(), &pg, &["--poll", "200ms", "--parallelism", "2", "--node-id", &n2]);

    let nodes = get_json(&format!("{}/api/v1/nodes", s2.url));
    let ids: Vec<&str> = nodes.as_array().map(|a| a.iter().filter_map(|n| n["id"].as_str()).collect()).unwrap_or_default();
    assert!(ids.contains(&n1.as_str()) && ids.contains(&n2.as_str()), "both nodes registered: {nodes}");

    let id = submit_run(&s1.url, &["final"], None);
    let d = wait_done(&s1.url, id, || logs_of(&[&s1, &s2]));
    let diag = format!("{d:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&s1, &s2]));
    assert_eq!(state(&d), "succeeded", "{diag}");
    assert_eq!(d["jobs"].as_array().map(Vec::len), Some(13), "{diag}");
    for j in d["jobs"].as_array().expect("jobs") {
        assert_eq!(j["state"], "succeeded", "{diag}");
        assert_eq!(j["attempt"], 1, "{diag}");
    }
    let used: std::collections::BTreeSet<&str> = d["jobs"].as_array().expect("jobs").iter().filter_map(|j| j["node"].as_str()).collect();
    assert!(used.contains(n1.as_str()) && used.contains(n2.as_str()), "both nodes should have run jobs, ran on {used:?}\n{diag}");
    for n in names.iter().map(String::as_str).chain(["final"]) {
        assert_eq!(fx.runs(n), 1, "{n} should have run exactly once\n{diag}");
    }
    assert_eq!(fx.marks().last().map(|(j, _)| j.as_str()), Some("final"), "final runs after all it needs\n{diag}");
    // Both servers answer the same from the shared store.
    assert_eq!(state(&detail(&s2.url, id)), "succeeded");
}

/// A node killed mid-run on a shared PostgreSQL store: once its leases
/// expire another node re-runs its idempotent jobs, fails its
/// non-idempotent one as interrupted, and runs nothing finished again.
#[test]
fn killed_node_work_is_taken_over_on_postgres() {
    let Some(pg) = runtime().block_on(common::postgres_url()) else { return };
    let fx = Fx::new(
        r#"
[project]
name = "takeover"

[[environment]]
name = "safe"

[[environment]]
name = "fragile"

[[job]]
name = "first"
idempotent = true
command = ["./mark.sh", "0"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "w1"
needs = ["first"]
idempotent = true
command = ["./mark.sh", "4", "1"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "w2"
needs = ["first"]
idempotent = true
command = ["./mark.sh", "4", "1"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "w3"
needs = ["first"]
idempotent = true
command = ["./mark.sh", "4", "1"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "last"
needs = ["w1", "w2", "w3"]
idempotent = true
command = ["./mark.sh", "0"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "once"
command = ["./mark.sh", "30"]
env = { MARK = "@EXT@/marks" }
"#,
        &[("mark.sh", MARK_SH)],
    );
    let other = fx.copy();
    let n1 = format!("n1-{}", fx.nonce);
    let n2 = format!("n2-{}", fx.nonce);
    let flags = |node: &str| -> Vec<String> {
        ["--lease", "2s", "--poll", "200ms", "--parallelism", "8", "--shutdown-grace", "1s", "--node-id", node].iter().map(|s| s.to_string()).collect()
    };
    let f1 = flags(&n1);
    let mut s1 = fx.serve(&pg, &f1.iter().map(String::as_str).collect::<Vec<_>>());
    // Two deployments (different environments, so different locks): one
    // of idempotent jobs only, one with a job that must not run twice.
    let safe = submit_run(&s1.url, &["last"], Some("safe"));
    let fragile = submit_run(&s1.url, &["once"], Some("fragile"));

    // Node 1 alone claims everything ready: "first" finishes, then w1..w3
    // and "once" are mid-run on node 1.
    wait(
        "node 1 to be mid-run",
        || format!("{:#}\n{:#}\n{}", detail(&s1.url, safe), detail(&s1.url, fragile), logs_of(&[&s1])),
        || {
            let d = detail(&s1.url, safe);
            let f = detail(&s1.url, fragile);
            let running = ["w1", "w2", "w3"].iter().all(|j| job_state(&d, j) == "running" && fx.marked(j, 1));
            (running && job_state(&f, "once") == "running" && fx.marked("once", 1)).then_some(())
        },
    );
    // Node 2 joins (nothing is ready for it), then node 1 dies.
    let f2 = flags(&n2);
    let s2 = fx.serve_in(other.path(), &pg, &f2.iter().map(String::as_str).collect::<Vec<_>>());
    let before = detail(&s2.url, safe);
    assert_eq!(job_state(&before, "first"), "succeeded", "{before:#}");
    assert!(["w1", "w2", "w3"].iter().all(|j| job(&before, j)["node"] == n1.as_str()), "{before:#}");
    s1.kill9();

    let d = wait_done(&s2.url, safe, || logs_of(&[&s1, &s2]));
    let f = wait_done(&s2.url, fragile, || logs_of(&[&s1, &s2]));
    let diag = format!("{d:#}\n{f:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&s1, &s2]));

    assert_eq!(state(&d), "succeeded", "{diag}");
    // Completed before the kill: not run again.
    assert_eq!(fx.runs("first"), 1, "{diag}");
    assert_eq!(job(&d, "first")["node"], n1.as_str(), "{diag}");
    // Interrupted: re-run by node 2 as attempt 2.
    for w in ["w1", "w2", "w3"] {
        let j = job(&d, w);
        assert_eq!(j["state"], "succeeded", "{w}\n{diag}");
        assert_eq!(j["attempt"], 2, "{w}\n{diag}");
        assert_eq!(j["node"], n2.as_str(), "{w}\n{diag}");
        let a = attempts(&d, w);
        assert_eq!(a.len(), 2, "{w}\n{diag}");
        assert_eq!(a[0]["outcome"], "interrupted", "{w}\n{diag}");
        assert_eq!(a[0]["node"], n1.as_str(), "{w}\n{diag}");
        assert!(a[0]["reason"].as_str().unwrap_or_default().contains(&n1), "{w}\n{diag}");
        assert_eq!(a[1]["outcome"], "succeeded", "{w}\n{diag}");
        assert_eq!(a[1]["node"], n2.as_str(), "{w}\n{diag}");
        assert_eq!(fx.marks().iter().filter(|(j, _)| j == w).map(|(_, a)| *a).collect::<Vec<_>>(), vec![1, 2], "{w}\n{diag}");
    }
    assert_eq!(job(&d, "last")["node"], n2.as_str(), "{diag}");
    assert_eq!(fx.runs("last"), 1, "{diag}");

    // Not idempotent: failed as interrupted, never run twice.
    assert_eq!(state(&f), "failed", "{diag}");
    let once = job(&f, "once");
    assert_eq!(once["state"], "failed", "{diag}");
    assert_eq!(once["attempt"], 1, "{diag}");
    let reason = once["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("interrupted") && reason.contains("idempotent"), "reason {reason:?}\n{diag}");
    assert_eq!(fx.runs("once"), 1, "{diag}");
}

/// Two nodes on one SQLite file would reap each other's jobs: the second
/// `serve` refuses to start and says why.
#[test]
fn sqlite_store_refuses_second_serve() {
    let fx = Fx::new("[project]\nname = \"one\"\n\n[[job]]\nname = \"a\"\ncommand = [\"true\"]\n", &[]);
    let store = fx.sqlite();
    let first = fx.serve(&store, &[]);
    let port = free_port();
    let mut second = Command::new(slipway_bin())
        .arg("--config")
        .arg(fx.dir())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", &store])
        .env_remove("SLIPWAY_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second serve");
    let pid = second.id().to_string();
    wait_within(
        WAIT,
        "a second serve on the same SQLite store to refuse to start",
        || {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            "it kept running (killed now)".into()
        },
        || second.try_wait().expect("try_wait"),
    );
    let out = second.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another `slipway serve`") && stderr.contains(store.trim_start_matches("sqlite://")), "{}", text(&out));
    // The first one is unaffected.
    assert_eq!(get_json(&format!("{}/healthz", first.url))["status"], "ok");
}

/// Every job of a deployment runs against the revision taken at submit
/// time, whatever happens to the config directory meanwhile.
#[test]
fn config_change_during_run_does_not_change_revision() {
    let fx = Fx::new(
        r#"
[project]
name = "revisions"

[[job]]
name = "gate"
shell = true
command = "while [ ! -e \"$GATE\" ]; do sleep 0.1; done"
env = { GATE = "@EXT@/gate" }

[[job]]
name = "show"
needs = ["gate"]
command = ["cat", "./data.txt"]
"#,
        &[],
    );
    std::fs::write(fx.dir().join("data.txt"), "original-content\n").expect("write data");
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let first = submit_run(&server.url, &["show"], None);
    let at_submit = detail(&server.url, first);
    let revision = at_submit["deployment"]["revision"].as_str().expect("revision").to_string();

    wait("the gate job to run", || format!("{:#}", detail(&server.url, first)), || (job_state(&detail(&server.url, first), "gate") == "running").then_some(()));
    std::fs::write(fx.dir().join("data.txt"), "changed-content\n").expect("rewrite data");
    std::fs::write(fx.ext.path().join("gate"), "").expect("open gate");

    let d = wait_done(&server.url, first, || logs_of(&[&server]));
    assert_eq!(state(&d), "succeeded", "{d:#}");
    assert_eq!(d["deployment"]["revision"], revision.as_str());
    let out = stdout_of(&server, first, "show");
    assert_eq!(out, vec!["original-content".to_string()], "the job saw the config directory as it was at submit time");

    let second = submit_run(&server.url, &["show"], None);
    let d2 = wait_done(&server.url, second, || logs_of(&[&server]));
    assert_eq!(state(&d2), "succeeded", "{d2:#}");
    let revision2 = d2["deployment"]["revision"].as_str().expect("revision").to_string();
    assert_ne!(revision2, revision, "a changed directory is a new revision");
    assert_eq!(stdout_of(&server, second, "show"), vec!["changed-content".to_string()]);

    // Revisions are content hashes: the same tree again is the same revision.
    let third = submit_run(&server.url, &["show"], None);
    let d3 = wait_done(&server.url, third, || logs_of(&[&server]));
    assert_eq!(d3["deployment"]["revision"], revision2.as_str());
}

/// Issue 18: a log written into the config directory between two deploys
/// made a new revision each time. What `.slipwayignore` matches is not
/// part of the revision; what it does not match (or takes back with `!`)
/// is; a pattern it cannot read is refused at its file, line and column.
#[test]
fn issue18_slipwayignore_keeps_logs_written_between_deploys_out_of_the_revision() {
    let fx = Fx::new(
        r#"
[project]
name = "hygiene"

[[job]]
name = "show"
command = ["ls", "-A"]
"#,
        &[],
    );
    std::fs::write(fx.dir().join(".slipwayignore"), "# written by the demo while it runs\n*.log\n!keep.log\n").expect("write .slipwayignore");
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let deploy = || {
        let id = submit_run(&server.url, &["show"], None);
        let d = wait_done(&server.url, id, || logs_of(&[&server]));
        assert_eq!(state(&d), "succeeded", "{d:#}");
        (d["deployment"]["revision"].as_str().expect("revision").to_string(), stdout_of(&server, id, "show"))
    };
    let (first, files) = deploy();
    assert!(files.contains(&".slipwayignore".to_string()) && files.contains(&"slipway.toml".to_string()), "{files:?}");

    std::fs::write(fx.dir().join("serve.log"), "a log line\n").expect("write log");
    let (second, files) = deploy();
    assert_eq!(second, first, "a matching file written between deploys changes nothing");
    assert!(!files.contains(&"serve.log".to_string()), "{files:?}");

    std::fs::write(fx.dir().join("keep.log"), "kept\n").expect("write keep.log");
    let (third, files) = deploy();
    assert_ne!(third, first, "`!keep.log` takes it back");
    assert!(files.contains(&"keep.log".to_string()), "{files:?}");

    std::fs::write(fx.dir().join("notes.txt"), "n\n").expect("write notes");
    let (fourth, _) = deploy();
    assert_ne!(fourth, third, "a file nothing matches is part of the revision");

    // An invalid pattern: `validate` says where, and serve refuses to take
    // a revision it cannot make.
    std::fs::write(fx.dir().join(".slipwayignore"), "*.log\n[z-a\n").expect("write .slipwayignore");
    let out = Command::new(slipway_bin()).arg("--config").arg(fx.dir()).arg("validate").output().expect("validate");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains(".slipwayignore:2:1") && shown.contains("invalid pattern \"[z-a\""), "{shown}");
    let body = serde_json::json!({"kind": "run", "jobs": ["show"]}).to_string();
    let (status, v) = post_json(&format!("{}/api/v1/events", server.url), &body);
    assert_eq!(status, 422, "{v}");
    let p = &v["error"]["problems"][0];
    assert!(p["file"].as_str().unwrap_or_default().ends_with("/.slipwayignore") && p["line"] == 2 && p["column"] == 1, "{v}");
    assert!(p["message"].as_str().unwrap_or_default().starts_with("invalid pattern \"[z-a\": "), "{v}");
}

/// A timed-out job is killed with everything it started: a background
/// process in its process group does not outlive it.
#[test]
fn timeout_kills_whole_process_group() {
    let fx = Fx::new(
        r#"
[project]
name = "timeouts"

[[job]]
name = "hang"
shell = true
timeout = "1s"
kill_grace = "1s"
command = "sleep 300.@NONCE@ & echo $! > \"$PIDFILE\"; sleep 120"
env = { PIDFILE = "@EXT@/bg.pid" }
"#,
        &[],
    );
    let _reap = Reap(format!("^sleep 300\\.{}", fx.nonce));
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let id = submit_run(&server.url, &["hang"], None);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    let diag = format!("{d:#}\n{}", logs_of(&[&server]));
    assert_eq!(state(&d), "failed", "{diag}");
    let j = job(&d, "hang");
    assert_eq!(j["state"], "failed", "{diag}");
    assert!(j["reason"].as_str().unwrap_or_default().contains("timed out"), "{diag}");
    let a = attempts(&d, "hang");
    assert_eq!(a.len(), 1, "{diag}");
    assert_eq!(a[0]["outcome"], "timed_out", "{diag}");

    // The background sleep did start, and is gone now.
    let pid: i32 = std::fs::read_to_string(fx.ext.path().join("bg.pid")).expect("the job wrote its background pid").trim().parse().expect("pid");
    let pattern = format!("^sleep 300\\.{}", fx.nonce);
    wait_within(
        GONE,
        "the background process to be gone",
        || format!("alive: {}, pgrep: {:?}", alive(pid), pgrep(&pattern)),
        || (!alive(pid) && pgrep(&pattern).is_empty()).then_some(()),
    );
    // The server itself is fine.
    assert_eq!(get_json(&format!("{}/healthz", server.url))["status"], "ok");
}

/// Retries follow the policy: retryable exit codes are retried (with
/// backoff) and every attempt is recorded; other codes fail at once.
#[test]
fn retry_with_backoff_records_every_attempt() {
    let fx = Fx::new(
        r#"
[project]
name = "retries"

[[job]]
name = "flaky"
shell = true
command = "echo \"$SLIPWAY_JOB $SLIPWAY_ATTEMPT\" >> \"$MARK\"; [ \"$SLIPWAY_ATTEMPT\" -ge 3 ] || exit 75"
retry = { attempts = 3, on = [75], backoff = "200ms" }
env = { MARK = "@EXT@/marks" }

[[job]]
name = "broken"
shell = true
command = "echo \"$SLIPWAY_JOB $SLIPWAY_ATTEMPT\" >> \"$MARK\"; exit 3"
retry = { attempts = 3, on = [75], backoff = "200ms" }
env = { MARK = "@EXT@/marks" }
"#,
        &[],
    );
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let id = submit_run(&server.url, &["flaky", "broken"], None);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    let diag = format!("{d:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&server]));
    assert_eq!(state(&d), "failed", "broken failed\n{diag}");

    let flaky = job(&d, "flaky");
    assert_eq!(flaky["state"], "succeeded", "{diag}");
    assert_eq!(flaky["attempt"], 3, "{diag}");
    let a = attempts(&d, "flaky");
    let summary: Vec<(i64, &str, Option<i64>)> =
        a.iter().map(|x| (x["attempt"].as_i64().unwrap_or(0), x["outcome"].as_str().unwrap_or("?"), x["exit_code"].as_i64())).collect();
    assert_eq!(summary, vec![(1, "failed", Some(75)), (2, "failed", Some(75)), (3, "succeeded", Some(0))], "{diag}");
    assert_eq!(fx.marks().iter().filter(|(j, _)| j == "flaky").map(|(_, a)| *a).collect::<Vec<_>>(), vec![1, 2, 3], "{diag}");

    let broken = job(&d, "broken");
    assert_eq!(broken["state"], "failed", "{diag}");
    assert_eq!(broken["attempt"], 1, "{diag}");
    assert_eq!(broken["exit_code"], 3, "{diag}");
    let b = attempts(&d, "broken");
    assert_eq!(b.len(), 1, "{diag}");
    assert_eq!(b[0]["outcome"], "failed", "{diag}");
    assert_eq!(b[0]["exit_code"], 3, "{diag}");
    assert_eq!(fx.runs("broken"), 1, "{diag}");
}

/// A job's output is kept up to `max_log_bytes`; the rest is counted, and
/// the log says how much was dropped.
#[test]
fn output_is_bounded_with_marker() {
    let fx = Fx::new(
        r#"
[project]
name = "chatty"
max_log_bytes = 10000

[[job]]
name = "chatty"
command = ["seq", "1", "100000"]

[[job]]
name = "quiet"
command = ["echo", "still here"]
"#,
        &[],
    );
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let id = submit_run(&server.url, &["chatty"], None);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    assert_eq!(state(&d), "succeeded", "{d:#}");

    // The notes are written after the output; wait for the last one.
    let lines = wait(
        "the dropped-output note",
        || logs_of(&[&server]),
        || {
            let lines = logs(&server.url, id, Some("chatty"));
            lines.iter().any(|l| l["line"].as_str().unwrap_or_default().contains("of output were dropped")).then_some(lines)
        },
    );
    let kept: Vec<&str> = lines.iter().filter(|l| l["stream"] == "stdout").map(|l| l["line"].as_str().unwrap_or_default()).collect();
    let kept_bytes: usize = kept.iter().map(|l| l.len() + 1).sum();
    assert!(kept_bytes <= 10_000, "kept {kept_bytes} bytes of output");
    assert!(kept_bytes > 9_000, "kept only {kept_bytes} bytes of output");
    // What was kept is the start of the output, in order.
    let expected: Vec<String> = (1..=kept.len()).map(|i| i.to_string()).collect();
    assert_eq!(kept, expected.iter().map(String::as_str).collect::<Vec<_>>());
    let notes: Vec<&str> = lines.iter().filter(|l| l["stream"] == "slipway").map(|l| l["line"].as_str().unwrap_or_default()).collect();
    assert!(notes.iter().any(|n| n.contains("truncated")), "{notes:?}");
    let dropped = notes.iter().find(|n| n.contains("of output were dropped")).expect("dropped note");
    // "[slipway] N lines (M bytes) of output were dropped": N and M add up.
    let nums: Vec<u64> = dropped.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
    let total_bytes: u64 = (1..=100_000u64).map(|i| i.to_string().len() as u64 + 1).sum();
    assert_eq!(nums.len(), 2, "{dropped}");
    assert_eq!(nums[0] + kept.len() as u64, 100_000, "{dropped}");
    assert_eq!(nums[1] + kept_bytes as u64, total_bytes, "{dropped}");
    // Everything stored for the job stays near the bound.
    let stored: usize = lines.iter().map(|l| l["line"].as_str().unwrap_or_default().len() + 1).sum();
    assert!(stored < 11_000, "stored {stored} bytes for the job");

    // The server keeps working.
    assert_eq!(get_json(&format!("{}/healthz", server.url))["status"], "ok");
    let next = submit_run(&server.url, &["quiet"], None);
    let d = wait_done(&server.url, next, || logs_of(&[&server]));
    assert_eq!(state(&d), "succeeded", "{d:#}");
}

/// The CLI's exit codes, which scripts rely on.
#[test]
fn cli_exit_codes() {
    let fx = Fx::new(
        r#"
[project]
name = "codes"

[[job]]
name = "fails"
shell = true
command = "echo about to fail; exit 1"

[[job]]
name = "works"
command = ["true"]
"#,
        &[],
    );
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);

    let out = server.cli(fx.dir(), &["run", "works"]);
    assert_eq!(out.status.code(), Some(0), "run of a succeeding job: {}", text(&out));
    let out = server.cli(fx.dir(), &["run", "fails"]);
    assert_eq!(out.status.code(), Some(1), "run of a failing job: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"), "{}", text(&out));
    let out = server.cli(fx.dir(), &["status", "999"]);
    assert_eq!(out.status.code(), Some(5), "status of an unknown deployment: {}", text(&out));
    let out = server.cli(fx.dir(), &["run", "no-such-job"]);
    assert_eq!(out.status.code(), Some(6), "run of an unknown job: {}", text(&out));

    let closed = format!("http://127.0.0.1:{}", free_port());
    let cli = |dir: &Path, args: &[&str]| {
        Command::new(slipway_bin())
            .arg("--config")
            .arg(dir)
            .arg("--server")
            .arg(&closed)
            .args(args)
            .env_remove("SLIPWAY_STORE")
            .stdin(Stdio::null())
            .output()
            .expect("run slipway")
    };
    let out = cli(fx.dir(), &["status"]);
    assert_eq!(out.status.code(), Some(4), "status with no server: {}", text(&out));

    // validate reads files only: no server needed.
    let out = cli(fx.dir(), &["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bad = common::config_dir("[project]\nname = \"bad\"\n\n[[job]]\nname = \"x\"\ncomand = [\"true\"]\n", &[]);
    let out = cli(bad.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(3), "validate of a bad config: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("comand"), "names the bad key: {}", text(&out));
}

/// A graceful stop (SIGTERM) whose grace period runs out interrupts the
/// running jobs, just as a crash does: an idempotent job is retried after
/// the restart, a non-idempotent one fails as interrupted.
#[test]
fn sigterm_with_running_jobs_then_restart_retries_idempotent_ones() {
    let fx = Fx::new(
        r#"
[project]
name = "stop"

[[job]]
name = "safe"
idempotent = true
command = ["./mark.sh", "30.@NONCE@", "0"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "unsafe"
command = ["./mark.sh", "30.@NONCE@"]
env = { MARK = "@EXT@/marks" }
"#,
        &[("mark.sh", MARK_SH)],
    );
    let store = fx.sqlite();
    let mut server = fx.serve(&store, &["--poll", "200ms", "--shutdown-grace", "1s", "--node-id", "stopping"]);
    let id = submit_run(&server.url, &["safe", "unsafe"], None);
    wait(
        "both jobs to run",
        || format!("{:#}", detail(&server.url, id)),
        || {
            let d = detail(&server.url, id);
            (job_state(&d, "safe") == "running" && job_state(&d, "unsafe") == "running" && fx.marked("safe", 1) && fx.marked("unsafe", 1)).then_some(())
        },
    );
    let term = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill");
    assert!(term.success());
    let log = server.log.clone();
    let status =
        wait_within(WAIT, "serve to stop after SIGTERM", || std::fs::read_to_string(&log).unwrap_or_default(), || server.child.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0\n{}", server.log_text());

    let server = fx.serve(&store, &["--poll", "200ms", "--node-id", "restarted"]);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    let diag = format!("{d:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&server]));
    let unsafe_job = job(&d, "unsafe");
    assert_eq!(unsafe_job["state"], "failed", "{diag}");
    assert!(unsafe_job["reason"].as_str().unwrap_or_default().contains("interrupted"), "{diag}");
    assert_eq!(fx.runs("unsafe"), 1, "{diag}");
    let a = attempts(&d, "safe");
    assert_eq!(a.first().map(|a| a["outcome"].clone()), Some(Value::from("interrupted")), "{diag}");
    assert_eq!(job_state(&d, "safe"), "succeeded", "an idempotent job interrupted by a shutdown is retried, as after a crash\n{diag}");
    assert_eq!(job(&d, "safe")["attempt"], 2, "{diag}");
    assert_eq!(fx.marks().iter().filter(|(j, _)| j == "safe").map(|(_, a)| *a).collect::<Vec<_>>(), vec![1, 2], "{diag}");
}

/// A node restarted with the same `--node-id` (a stable host name, say)
/// must not keep alive the leases of the jobs its previous process was
/// running: those are reaped like any dead node's, even while the new
/// process is busy with other jobs.
#[test]
fn restarted_node_with_same_id_does_not_renew_dead_jobs_on_postgres() {
    let Some(pg) = runtime().block_on(common::postgres_url()) else { return };
    let fx = Fx::new(
        r#"
[project]
name = "same-id"

[[environment]]
name = "one"

[[environment]]
name = "two"

[[job]]
name = "crashed"
idempotent = true
command = ["./mark.sh", "30.@NONCE@", "0"]
env = { MARK = "@EXT@/marks" }

[[job]]
name = "busy"
shell = true
timeout = "3m"
command = "while [ ! -e \"$GATE\" ]; do sleep 0.1; done"
env = { GATE = "@EXT@/gate" }
"#,
        &[("mark.sh", MARK_SH)],
    );
    let node = format!("stable-{}", fx.nonce);
    let flags = ["--lease", "2s", "--poll", "200ms", "--shutdown-grace", "1s", "--node-id", node.as_str()];
    let mut s1 = fx.serve(&pg, &flags);
    let first = submit_run(&s1.url, &["crashed"], Some("one"));
    wait(
        "the first job to run",
        || format!("{:#}", detail(&s1.url, first)),
        || (job_state(&detail(&s1.url, first), "crashed") == "running" && fx.marked("crashed", 1)).then_some(()),
    );
    s1.kill9();

    let s2 = fx.serve(&pg, &flags);
    let second = submit_run(&s2.url, &["busy"], Some("two"));
    wait("the busy job to run", || format!("{:#}", detail(&s2.url, second)), || (job_state(&detail(&s2.url, second), "busy") == "running").then_some(()));
    // Leases are 2s: the dead process's job is reaped and retried long
    // before this wait gives up, while "busy" still runs.
    let d = wait_done(&s2.url, first, || format!("{:#}\n{}", detail(&s2.url, second), logs_of(&[&s1, &s2])));
    std::fs::write(fx.ext.path().join("gate"), "").expect("open gate");
    let diag = format!("{d:#}\nmarks: {:?}\n{}", fx.marks(), logs_of(&[&s1, &s2]));
    assert_eq!(state(&d), "succeeded", "{diag}");
    assert_eq!(job(&d, "crashed")["attempt"], 2, "{diag}");
    assert_eq!(attempts(&d, "crashed")[0]["outcome"], "interrupted", "{diag}");
    let d2 = wait_done(&s2.url, second, || logs_of(&[&s2]));
    assert_eq!(state(&d2), "succeeded", "{d2:#}");
}

/// After SIGKILL of the server, not even the processes a job's shell
/// started (its grandchildren) run on once a Slipway is back on the host:
/// a retry must not run concurrently with the remains of its attempt.
#[test]
fn sigkill_leaves_no_orphan_grandchildren() {
    let fx = Fx::new(
        r#"
[project]
name = "grandchildren"

[[job]]
name = "script"
shell = true
command = "echo \"$SLIPWAY_JOB $SLIPWAY_ATTEMPT\" >> \"$MARK\"; sleep 300.@NONCE@; echo done"
env = { MARK = "@EXT@/marks" }
"#,
        &[],
    );
    let pattern = format!("^sleep 300\\.{}", fx.nonce);
    let _reap = Reap(pattern.clone());
    let mut server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let id = submit_run(&server.url, &["script"], None);
    wait("the job's sleep to run", || format!("{:#}", detail(&server.url, id)), || (fx.marked("script", 1) && pgrep(&pattern).len() == 1).then_some(()));
    server.kill9();
    let restarted = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    wait_within(
        GONE,
        "the killed node's job processes to be gone",
        || format!("still running: {:?}", pgrep(&pattern)),
        || pgrep(&pattern).is_empty().then_some(()),
    );
    // (Any Slipway on the host sweeps: when tests run side by side another
    // test's server may get there first, so the log is not asserted.)
    drop(restarted);
}

/// `wait.sh`: record "<pid>" in `$PIDS/<job>`, then wait for `$GATE`.
const WAIT_SH: &str = r#"#!/bin/sh
echo $$ > "$PIDS/$SLIPWAY_JOB"
while [ ! -e "$GATE" ]; do sleep 0.1; done
"#;

/// An installation for the issue 13 tests: a job that waits for a gate
/// and a service `web` (the demo server) on `port`.
fn installation(name: &str, port: u16) -> Fx {
    let demo = common::demo_bin();
    Fx::new(
        &format!(
            r#"
[project]
name = "{name}"

[[environment]]
name = "staging"

[[job]]
name = "long"
command = ["./wait.sh"]
env = {{ PIDS = "@EXT@", GATE = "@EXT@/gate" }}

[[service]]
name = "web"
listen = "127.0.0.1:{port}"
instances = 2
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1, deadline = "10s" }}
"#
        ),
        &[("wait.sh", WAIT_SH)],
    )
}

/// Pids of the processes Slipway process `owner` started whose command
/// line contains `needle`.
fn started_by(owner: u32, needle: &str) -> Vec<i32> {
    let mark = format!("SLIPWAY_OWNER={owner}.");
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|p| std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv.starts_with(mark.as_bytes()))))
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .collect();
    pids.sort();
    pids
}

fn pid_in(fx: &Fx, job: &str) -> Option<i32> {
    std::fs::read_to_string(fx.ext.path().join(job)).ok()?.trim().parse().ok()
}

/// Issue 13: one installation's orphan sweeps never touch another
/// installation's processes, orphaned or not. Two installations (separate
/// stores) on one host run a job and a service each; A is SIGKILLed. A
/// third installation starting meanwhile, and B all along, leave A's
/// orphans alone (only A's own next node may end them); A restarted ends
/// its previous life's processes, and B's job and instances are never
/// touched: same pids throughout, and B's job succeeds.
#[test]
fn issue13_an_installation_sweeps_only_its_own_orphans() {
    let (port_a, port_b) = (free_port(), free_port());
    let (a, b) = (installation("alpha", port_a), installation("beta", port_b));
    let flags = ["--poll", "200ms"];
    let mut sa = a.serve(&a.sqlite(), &flags);
    let sb = b.serve(&b.sqlite(), &flags);
    let gates = [a.ext.path().join("gate"), b.ext.path().join("gate")];
    // Whatever happens, nothing waits for its gate after the test.
    struct Open<'a>(&'a [PathBuf]);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.iter().for_each(|g| drop(std::fs::write(g, "")));
        }
    }
    let _open = Open(&gates);
    for (fx, s) in [(&a, &sa), (&b, &sb)] {
        let out = s.cli(fx.dir(), &["deploy", "web", "1.0", "--env", "staging"]);
        assert!(out.status.success(), "{}\n{}", text(&out), logs_of(&[s]));
    }
    let run_a = submit_run(&sa.url, &["long"], Some("staging"));
    let run_b = submit_run(&sb.url, &["long"], Some("staging"));
    let job_a = wait("A's job to run", || logs_of(&[&sa]), || pid_in(&a, "long"));
    let job_b = wait("B's job to run", || logs_of(&[&sb]), || pid_in(&b, "long"));
    let web_a = started_by(sa.child.id(), "slipway-demo");
    let web_b = started_by(sb.child.id(), "slipway-demo");
    assert_eq!((web_a.len(), web_b.len()), (2, 2), "two instances each: {web_a:?} {web_b:?}");
    let b_pids: Vec<i32> = web_b.iter().copied().chain([job_b]).collect();
    let a_pids: Vec<i32> = web_a.iter().copied().chain([job_a]).collect();
    let diag = |servers: &[&Server]| format!("A's {a_pids:?}, B's {b_pids:?}\n{}", logs_of(servers));

    sa.kill9();
    assert!(a_pids.iter().all(|p| alive(*p)), "A's processes outlive A: {}", diag(&[&sb]));
    // A third installation starts on the host and sweeps it.
    let c = Fx::new("[project]\nname = \"gamma\"\n\n[[job]]\nname = \"a\"\ncommand = [\"true\"]\n", &[]);
    let sc = c.serve(&c.sqlite(), &flags);
    wait("C's first sweep", || sc.log_text(), || sc.log_text().contains("swept this host").then_some(()));
    assert!(a_pids.iter().all(|p| alive(*p)), "another installation killed A's orphans: {}", diag(&[&sb, &sc]));
    assert!(b_pids.iter().all(|p| alive(*p)), "B's processes were touched: {}", diag(&[&sb, &sc]));

    // A again: it ends what its previous life left, and nothing of B's.
    let sa2 = a.serve(&a.sqlite(), &flags);
    wait_within(GONE, "A's previous life's processes to be gone", || diag(&[&sa2, &sb]), || a_pids.iter().all(|p| !alive(*p)).then_some(()));
    let interrupted = wait_done(&sa2.url, run_a, || diag(&[&sa2]));
    assert_eq!(job_state(&interrupted, "long"), "failed", "A's job was interrupted: {interrupted:#}");
    assert!(b_pids.iter().all(|p| alive(*p)), "A's restart touched B's processes: {}", diag(&[&sa2, &sb, &sc]));

    std::fs::write(&gates[1], "").expect("open B's gate");
    let done = wait_done(&sb.url, run_b, || diag(&[&sb]));
    assert_eq!(state(&done), "succeeded", "{done:#}\n{}", diag(&[&sb]));
    assert_eq!(job(&done, "long")["attempt"], 1, "{done:#}");
    assert_eq!(started_by(sb.child.id(), "slipway-demo"), web_b, "B's instances are the same processes: {}", diag(&[&sa2, &sb, &sc]));
    assert!(web_b.iter().all(|p| alive(*p)), "{}", diag(&[&sa2, &sb, &sc]));
}

/// `beat.sh`: attempt 1 records its start and then a heartbeat every 50 ms
/// until it is killed; a later attempt records its start, whether attempt
/// 1's process still exists (its state from /proc, or "gone"), and its end.
const BEAT_SH: &str = r#"#!/bin/sh
echo "start $SLIPWAY_ATTEMPT $(date +%s%N) $$" >> "$LOG"
if [ "$SLIPWAY_ATTEMPT" -gt 1 ]; then
  prev=$(sed -n 's/^start 1 [0-9]* //p' "$LOG")
  state=$(cut -d' ' -f3 "/proc/$prev/stat" 2>/dev/null || echo gone)
  echo "previous $state" >> "$LOG"
  echo "end $SLIPWAY_ATTEMPT $(date +%s%N)" >> "$LOG"
  exit 0
fi
while :; do echo "beat 1 $(date +%s%N)" >> "$LOG"; sleep 0.05; done
"#;

/// Issue 13: with a short (accepted) lease, a node killed mid-job on a
/// shared PostgreSQL store: the other node on the same host ends the dead
/// node's process before it retries the idempotent job, so the first
/// attempt's last heartbeat comes before the second attempt's start, and
/// the second attempt finds the first one's process gone. Before the kill,
/// the second node's sweeps leave the live first node's process alone.
#[test]
fn issue13_a_retry_never_runs_beside_its_first_attempt() {
    let Some(pg) = runtime().block_on(common::postgres_url()) else { return };
    let fx = Fx::new(
        r#"
[project]
name = "overlap"

[[job]]
name = "beat"
idempotent = true
command = ["./beat.sh"]
env = { LOG = "@EXT@/beats" }
"#,
        &[("beat.sh", BEAT_SH)],
    );
    let other = fx.copy();
    let (n1, n2) = (format!("n1-{}", fx.nonce), format!("n2-{}", fx.nonce));
    let flags = |node: &str| -> Vec<String> {
        ["--lease", "2s", "--poll", "200ms", "--shutdown-grace", "1s", "--node-id", node].iter().map(|s| s.to_string()).collect()
    };
    let f1 = flags(&n1);
    let mut s1 = fx.serve(&pg, &f1.iter().map(String::as_str).collect::<Vec<_>>());
    let id = submit_run(&s1.url, &["beat"], None);
    let log = fx.ext.path().join("beats");
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let beats = || lines().lines().filter(|l| l.starts_with("beat 1 ")).count();
    wait("attempt 1 to beat", || format!("{:#}\n{}", detail(&s1.url, id), logs_of(&[&s1])), || (beats() > 2).then_some(()));
    let first: i32 = lines().lines().find_map(|l| l.strip_prefix("start 1 ")?.split_whitespace().nth(1)?.parse().ok()).expect("attempt 1's pid");

    let f2 = flags(&n2);
    let s2 = fx.serve_in(other.path(), &pg, &f2.iter().map(String::as_str).collect::<Vec<_>>());
    wait("node 2's first sweep", || s2.log_text(), || s2.log_text().contains("swept this host").then_some(()));
    let seen = beats();
    wait("attempt 1 to beat on", || logs_of(&[&s1, &s2]), || (beats() > seen + 2).then_some(()));
    assert!(alive(first), "node 2 swept the process of live node 1\n{}", logs_of(&[&s1, &s2]));

    s1.kill9();
    let d = wait_done(&s2.url, id, || format!("{}\n{}", lines(), logs_of(&[&s1, &s2])));
    let text = lines();
    let diag = format!("{d:#}\n{text}\n{}", logs_of(&[&s1, &s2]));
    assert_eq!(state(&d), "succeeded", "{diag}");
    let j = job(&d, "beat");
    assert_eq!((j["attempt"].as_i64(), j["node"].as_str()), (Some(2), Some(n2.as_str())), "{diag}");
    assert_eq!(attempts(&d, "beat")[0]["outcome"], "interrupted", "{diag}");
    let time = |prefix: &str| -> Vec<u128> { text.lines().filter_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()).collect() };
    let second_start = *time("start 2 ").first().unwrap_or_else(|| panic!("attempt 2 never started\n{diag}"));
    let last_beat = time("beat 1 ").into_iter().max().expect("beats");
    assert!(last_beat < second_start, "attempt 1 still beat {} ms after attempt 2 started\n{diag}", (last_beat - second_start) / 1_000_000);
    let previous = text.lines().find_map(|l| l.strip_prefix("previous ")).unwrap_or("?");
    assert!(previous == "gone" || previous == "Z", "attempt 2 found attempt 1's process {previous}\n{diag}");
    assert!(!alive(first), "{diag}");
}

/// Issue 13: a lease too short for the node's sweep and poll intervals is
/// refused at start with the reason and the minimum (a usage error from
/// `--lease`, an invalid config from `[project] lease`).
#[test]
fn issue13_serve_refuses_a_lease_too_short_for_its_sweeps() {
    let fx = Fx::new("[project]\nname = \"short\"\n\n[[job]]\nname = \"a\"\ncommand = [\"true\"]\n", &[]);
    let serve = |config: &Path, extra: &[&str]| {
        Command::new(slipway_bin())
            .arg("--config")
            .arg(config)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--store", &fx.sqlite()])
            .args(extra)
            .env_remove("SLIPWAY_STORE")
            .stdin(Stdio::null())
            .output()
            .expect("run serve")
    };
    let out = serve(fx.dir(), &["--lease", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--lease") && said.contains("a lease of 1s is too short") && said.contains("at least 1s 500ms"), "{}", text(&out));
    // The minimum follows the poll interval.
    let out = serve(fx.dir(), &["--lease", "2s", "--poll", "2s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 3s 500ms"), "{}", text(&out));
    // From the config: its file is named, and it is an invalid config.
    let short = Fx::new("[project]\nname = \"short\"\nlease = \"1s\"\n", &[]);
    let out = serve(short.dir(), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("slipway.toml") && said.contains("[project] lease") && said.contains("too short"), "{}", text(&out));
    assert!(!std::path::Path::new(fx.sqlite().trim_start_matches("sqlite://")).exists(), "refused before the store was opened");
}

/// Once output is cut at `max_log_bytes`, nothing later of that attempt is
/// kept: the note says "further output is counted, not kept", and a log
/// with holes in it would mislead.
#[test]
fn output_after_truncation_note_is_not_kept() {
    let fx = Fx::new(
        r#"
[project]
name = "holes"
max_log_bytes = 1000

[[job]]
name = "cut"
shell = true
command = "seq 1 200; head -c 2000 /dev/zero | tr '\\0' x; echo; echo after-the-cut"
"#,
        &[],
    );
    let server = fx.serve(&fx.sqlite(), &["--poll", "200ms"]);
    let id = submit_run(&server.url, &["cut"], None);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    assert_eq!(state(&d), "succeeded", "{d:#}");
    let out = stdout_of(&server, id, "cut");
    assert!(!out.iter().any(|l| l == "after-the-cut"), "output after the truncation note was kept: {:?}", &out[out.len().saturating_sub(3)..]);
    assert_eq!(out, (1..=200).map(|i| i.to_string()).collect::<Vec<_>>());
}

/// SIGTERM while a job runs: the job finishes within the grace period, but
/// the stopping node takes no new work with its result (the job that
/// needed it is left for the next node), and a restart runs it.
#[test]
fn sigterm_finishes_running_jobs_but_takes_no_new_ones() {
    let dir = common::config_dir(
        "[[job]]\nname = \"slow\"\ncommand = [\"sleep\", \"2\"]\n\n[[job]]\nname = \"after\"\nneeds = [\"slow\"]\ncommand = [\"true\"]\n",
        &[],
    );
    let store = format!("sqlite://{}/state/slipway.db", dir.path().display());
    let mut server = common::Server::start(dir.path(), Some(&store), &["--shutdown-grace", "20s", "--poll", "200ms"]);
    let (status, accepted) = common::post_json(&format!("{}/api/v1/events", server.url), r#"{"kind":"run","jobs":["after"]}"#);
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_i64().unwrap();
    common::wait_for(std::time::Duration::from_secs(30), "slow to run", || {
        let d = common::get_json(&format!("{}/api/v1/deployments/{id}", server.url));
        (d["jobs"][0]["state"] == "running").then_some(())
    });
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = common::wait_for(std::time::Duration::from_secs(30), "serve to exit", || server.child.try_wait().ok().flatten());
    assert!(status.success(), "graceful stop exits 0: {status}\n{}", server.log_text());
    let restarted = common::Server::start(dir.path(), Some(&store), &["--poll", "200ms"]);
    let d = common::wait_for(std::time::Duration::from_secs(30), "the deployment to finish", || {
        let d = common::get_json(&format!("{}/api/v1/deployments/{id}", restarted.url));
        (d["deployment"]["state"] == "succeeded").then_some(d)
    });
    let node_of = |name: &str| d["jobs"].as_array().unwrap().iter().find(|j| j["name"] == name).unwrap()["node"].clone();
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2, "each job ran once: {d}");
    assert_ne!(node_of("slow"), node_of("after"), "the stopping node must not have started `after`: {d}");
}

/// Output printed just before a graceful stop is stored before the node
/// exits: the job prints its lines only after SIGTERM was sent, finishes
/// within the grace period, and the process exits right after; every line
/// must be in the store. (The log writer holds up to a channel's worth of
/// lines plus its batch when the scheduler stops: a node that exits
/// without awaiting it loses them.)
#[test]
fn sigterm_keeps_the_output_printed_just_before_the_stop() {
    const LINES: usize = 20_000;
    let fx = Fx::new(
        r#"
[project]
name = "flush"

[[job]]
name = "chatty"
shell = true
command = "echo waiting; while [ ! -e \"$GO\" ]; do sleep 0.05; done; seq 1 20000"
env = { GO = "@EXT@/go" }
"#,
        &[],
    );
    let store = fx.sqlite();
    let mut server = fx.serve(&store, &["--poll", "200ms", "--shutdown-grace", "30s"]);
    let id = submit_run(&server.url, &["chatty"], None);
    // Its first line is stored: it runs, and the writer has caught up.
    wait("chatty to run", || logs_of(&[&server]), || logs(&server.url, id, Some("chatty")).iter().any(|l| l["line"] == "waiting").then_some(()));
    assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill").success());
    // Only once the node is stopping does the job print.
    wait("serve to log that it stops", || server.log_text(), || server.log_text().contains("slipway: stopping").then_some(()));
    std::fs::write(fx.ext.path().join("go"), b"").expect("go file");
    let status = common::wait_for(WAIT, "serve to exit", || server.child.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0\n{}", server.log_text());

    let server = fx.serve(&store, &["--poll", "200ms"]);
    let d = wait_done(&server.url, id, || logs_of(&[&server]));
    assert_eq!(job_state(&d, "chatty"), "succeeded", "it finished within the grace period: {d:#}");
    let out: Vec<String> = logs(&server.url, id, Some("chatty"))
        .iter()
        .filter(|l| l["stream"] == "stdout" && l["line"] != "waiting")
        .map(|l| l["line"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(out.len(), LINES, "every line printed before the stop is stored (last stored: {:?})\n{}", out.last(), logs_of(&[&server]));
    assert_eq!(out.last().map(String::as_str), Some("20000"));
}

/// The orphan sweep never kills Slipway itself, even when its own
/// environment carries the owner mark of a dead Slipway (as it does when a
/// deploy job restarts Slipway).
#[test]
fn issue3_sweep_spares_itself_with_an_inherited_owner_mark() {
    let dir = common::config_dir("[[job]]\nname = \"a\"\ncommand = [\"true\"]\n", &[]);
    let port = common::free_port();
    let mut child = std::process::Command::new(common::slipway_bin())
        .args(["--config", dir.path().to_str().unwrap(), "serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("SLIPWAY_OWNER", "1.1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    common::wait_for(std::time::Duration::from_secs(30), "serve to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    // Scenario, not a wait for a condition: the sweep runs as the node
    // starts; give a self-kill the time it would take to happen.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let alive = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "slipway serve killed itself in its orphan sweep");
}

/// `slipway logs ID -f` follows live output over the SSE stream until the
/// deployment ends (exit 0 for success), and afterwards `slipway plan`
/// estimates from the recorded run instead of from timeouts.
#[test]
fn logs_follow_then_plan_from_history() {
    let dir =
        common::config_dir("[[job]]\nname = \"talk\"\nshell = true\ncommand = \"for i in 1 2 3; do echo line-$i; sleep 0.3; done\"\ntimeout = \"1m\"\n", &[]);
    let store = format!("sqlite://{}/state/slipway.db", dir.path().display());
    let server = common::Server::start(dir.path(), Some(&store), &["--poll", "200ms"]);
    let (status, accepted) = common::post_json(&format!("{}/api/v1/events", server.url), r#"{"kind":"run","jobs":["talk"]}"#);
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_i64().unwrap().to_string();
    let out = server.cli(dir.path(), &["logs", &id, "-f"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let order: Vec<usize> = ["line-1", "line-2", "line-3"].iter().map(|l| stdout.find(l).unwrap_or_else(|| panic!("{l} missing: {stdout}"))).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "lines out of order: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("succeeded"));

    let plan = server.cli(dir.path(), &["--json", "plan", "--store", &store]);
    assert_eq!(plan.status.code(), Some(0), "{}", String::from_utf8_lossy(&plan.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
    assert_eq!(plan["jobs"][0]["estimate_source"], "history", "{plan}");
    assert_eq!(plan["estimated_from_history"], 1);
    assert!(plan["estimated_duration"].as_f64().unwrap() < 60.0, "estimate from the run, not the 1m timeout: {plan}");
}

// Issue 5: a secret read from Slipway's own environment reaches only what
// lists it (the service's migration here), not every process Slipway
// starts, and never its log, even at debug level.
#[test]
fn a_secret_in_slipways_environment_reaches_only_what_lists_it() {
    let port = common::free_port();
    let demo = common::demo_bin();
    let config = format!(
        r#"
[secret.api]
env = "SLIPWAY_TEST_API_SECRET"

[[service]]
name = "web"
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
listen = "127.0.0.1:{port}"
secrets = {{ API_KEY = "api" }}
migrate = {{ command = ["sh", "-c", "test \"$API_KEY\" = topsecret-4711 && echo migrate has the key"] }}

[[job]]
name = "peek"
shell = true
command = "echo peek sees ${{SLIPWAY_TEST_API_SECRET:-nothing}} and ${{API_KEY:-nothing}}"
"#
    );
    let dir = common::config_dir(&config, &[]);
    let server = common::Server::start_with_env(dir.path(), None, &[], &[("SLIPWAY_TEST_API_SECRET", "topsecret-4711"), ("SLIPWAY_LOG", "debug")]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let deploy = server.cli(dir.path(), &["deploy", "web", "1"]);
    assert!(deploy.status.success(), "{}", text(&deploy));
    assert!(text(&server.cli(dir.path(), &["logs", "1", "web.migrate"])).contains("migrate has the key"));
    let run = server.cli(dir.path(), &["run", "peek"]);
    assert!(run.status.success(), "{}", text(&run));
    let peek = text(&server.cli(dir.path(), &["logs", "2"]));
    assert!(peek.contains("peek sees nothing and nothing"), "{peek}");
    assert!(!server.log_text().contains("topsecret-4711"), "the secret is in the server log");
}

// Issue 6: a secret is given only to the job that lists it, and a value a
// job or an instance prints itself is masked in the stored log, the
// recorded reasons, the API and the server log.
#[test]
fn issue6_a_secret_printed_by_a_job_or_an_instance_is_masked_everywhere() {
    let port = common::free_port();
    let demo = common::demo_bin();
    let secrets = tempfile::tempdir().expect("tempdir");
    let key = secrets.path().join("api-key");
    std::fs::write(&key, "topsecret-9931\n").expect("write the secret");
    let config = format!(
        r#"
[secret.api]
file = "{key}"

[[service]]
name = "web"
command = ["sh", "-c", "echo booting $0 with $API_KEY >&2; exec {demo} serve --port \"$1\" --version \"$0\"", "{{version}}", "{{port}}"]
listen = "127.0.0.1:{port}"
secrets = {{ API_KEY = "api" }}
health = {{ http = "/healthz", interval = "100ms", deadline = "2s" }}

[[job]]
name = "leak"
shell = true
secrets = {{ API_KEY = "api" }}
command = "echo the key is $API_KEY; echo \"$API_KEY\" >&2; exit 3"

[[job]]
name = "peek"
shell = true
command = "echo peek sees ${{API_KEY:-nothing}}"
"#,
        key = key.display()
    );
    let dir = common::config_dir(&config, &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let leak = server.cli(dir.path(), &["run", "leak"]);
    assert_eq!(leak.status.code(), Some(1), "{}", text(&leak));
    let logs = text(&server.cli(dir.path(), &["logs", "1"]));
    assert!(logs.contains("the key is [secret api]"), "the job had the value, and it is masked: {logs}");
    assert!(text(&server.cli(dir.path(), &["run", "peek"])).contains("succeeded"));
    assert!(text(&server.cli(dir.path(), &["logs", "2"])).contains("peek sees nothing"), "a job that does not list it does not get it");

    assert!(server.cli(dir.path(), &["deploy", "web", "1"]).status.success());
    let three = server.cli(dir.path(), &["deploy", "web", "3"]);
    assert_eq!(three.status.code(), Some(1), "{}", text(&three));
    assert!(text(&three).contains("booting 3 with [secret api]"), "the instance's last output, masked, in the reason: {}", text(&three));

    let everything = format!(
        "{}{}{}{}{}{}",
        logs,
        text(&three),
        text(&server.cli(dir.path(), &["logs", "4"])),
        common::get_json(&format!("{}/api/v1/deployments/4", server.url)),
        common::get_json(&format!("{}/api/v1/services/default/web/events", server.url)),
        server.log_text()
    );
    assert!(!everything.contains("topsecret-9931"), "the value leaked: {everything}");
}

// Issue 19 (left by the twelfth session): a line longer than 16 KiB is
// cut into pieces before it is masked, and a secret across the cut was
// stored as two unmasked halves.
#[test]
fn issue19_a_secret_across_the_cut_of_a_long_line_is_masked() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let key = secrets.path().join("api-key");
    std::fs::write(&key, "topsecret-5521-across\n").expect("write the secret");
    let config = format!(
        r#"
[secret.api]
file = "{key}"

[[job]]
name = "long"
shell = true
secrets = {{ API_KEY = "api" }}
command = "for n in 16380 16375 16370; do head -c $n /dev/zero | tr '\\0' x; echo \"$API_KEY end\"; done"
"#,
        key = key.display()
    );
    let dir = common::config_dir(&config, &[]);
    let server = common::Server::start(dir.path(), None, &[]);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let run = server.cli(dir.path(), &["run", "long"]);
    assert!(run.status.success(), "{}", text(&run));
    let logs = text(&server.cli(dir.path(), &["logs", "1"]));
    let api = common::get_json(&format!("{}/api/v1/deployments/1/logs", server.url)).to_string();
    for shown in [&logs, &api] {
        assert_eq!(shown.matches("[secret api] end").count(), 3, "each line's secret is masked whole: {}", &shown[shown.len().saturating_sub(600)..]);
        for half in ["topsecret", "5521", "across"] {
            assert!(!shown.contains(half), "a piece of the value leaked ({half})");
        }
    }
}

// Issue 19 (an audit of where secrets go): every process Slipway started
// inherited its own credentials (the store's URL, PGPASSWORD, the CLI's
// token, the AWS keys), and a job that printed its environment stored
// them in its log in clear.
#[test]
fn issue19_no_process_inherits_slipways_own_credentials() {
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = format!("sqlite://{}", store_dir.path().join("own-store-8086.db").display());
    let dir = common::config_dir(
        r#"
[secret.aws]
env = "AWS_SECRET_ACCESS_KEY"

[[job]]
name = "dump"
shell = true
command = "env; test -z \"$SLIPWAY_STORE$PGPASSWORD$SLIPWAY_TOKEN$AWS_ACCESS_KEY_ID$AWS_SECRET_ACCESS_KEY$AWS_SESSION_TOKEN\""

[[job]]
name = "listed"
shell = true
secrets = { AWS_SECRET_ACCESS_KEY = "aws" }
command = "test \"$AWS_SECRET_ACCESS_KEY\" = own-aws-secret-77 && echo listed has $AWS_SECRET_ACCESS_KEY"
"#,
        &[],
    );
    let own = [
        ("SLIPWAY_STORE", store.as_str()),
        ("PGPASSWORD", "own-pg-password-31"),
        ("SLIPWAY_TOKEN", "own-token-5150"),
        ("AWS_ACCESS_KEY_ID", "AKIDOWN42"),
        ("AWS_SECRET_ACCESS_KEY", "own-aws-secret-77"),
        ("AWS_SESSION_TOKEN", "own-session-token-64"),
    ];
    let server = common::Server::start_with_env(dir.path(), None, &[], &own);
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let dump = server.cli(dir.path(), &["run", "dump"]);
    let logs = text(&server.cli(dir.path(), &["logs", "1"]));
    assert!(dump.status.success(), "{}\n{logs}", text(&dump));
    assert!(logs.contains("SLIPWAY_JOB=dump"), "the job printed its environment: {logs}");
    for (name, value) in own {
        assert!(!logs.contains(value) && !logs.contains(&format!("{name}=")), "{name} reached the job: {logs}");
    }
    // Listed as a secret, a job gets it, masked in what it prints.
    let listed = server.cli(dir.path(), &["run", "listed"]);
    let logs = text(&server.cli(dir.path(), &["logs", "2"]));
    assert!(listed.status.success(), "{}\n{logs}", text(&listed));
    assert!(logs.contains("listed has [secret aws]"), "{logs}");
}

// Issue 19 (an audit of where secrets go): a store password given as a
// URL parameter was printed as given when the store could not be
// reached, and `--help` printed SLIPWAY_STORE's value, password and all.
#[test]
fn issue19_the_store_password_is_never_printed() {
    let dir = common::config_dir("", &[]);
    let out = std::process::Command::new(common::slipway_bin())
        .args(["--config", &dir.path().display().to_string(), "serve", "--listen", "127.0.0.1:0", "--store"])
        // sslpassword: sqlx does not know it, and logged it with its value.
        .arg(format!("postgres://slipway@127.0.0.1:{}/db?password=pw-in-a-parameter-12&sslpassword=sslpw-in-a-parameter-56", common::free_port()))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("slipway serve");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && said.contains("password=***"), "{said}");
    assert!(!said.contains("pw-in-a-parameter-12") && !said.contains("sslpw-in-a-parameter-56"), "{said}");
    assert!(said.contains("sslpassword"), "the parameter is named as ignored: {said}");
    for command in [&["serve", "--help"][..], &["plan", "--help"], &["token", "create", "--help"]] {
        let out = std::process::Command::new(common::slipway_bin())
            .args(command)
            .env("SLIPWAY_STORE", "postgres://slipway:pw-in-the-url-34@127.0.0.1/db")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("slipway --help");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.contains("SLIPWAY_STORE"), "{command:?}: {said}");
        assert!(!said.contains("pw-in-the-url-34"), "{command:?}: {said}");
    }
}

/// `slipway run` into an environment behind an approval: the CLI says
/// what the deployment waits for, and when the config changes while it
/// waits (so it is submitted again on the new revision once approved), the
/// CLI follows the copy to its end instead of reporting a cancellation.
#[test]
fn issue6_the_cli_follows_a_waiting_deployment_through_its_resubmission() {
    let dir = common::config_dir(
        r#"
[[environment]]
name = "production"
approval = true

[[job]]
name = "hello"
command = ["echo", "hello"]
"#,
        &[],
    );
    let server = Server::start(dir.path(), None, &[]);
    // An approval needs a token (issue 13): the first (admin) token, which
    // asks for the run, and an approver's.
    let root = server.cli(dir.path(), &["token", "create", "root", "--role", "*=admin"]);
    let root = String::from_utf8_lossy(&root.stdout).lines().last().unwrap_or("").to_string();
    let alice = server.cli(dir.path(), &["--token", &root, "token", "create", "alice", "--role", "production=approver"]);
    let alice = String::from_utf8_lossy(&alice.stdout).lines().last().unwrap_or("").to_string();
    let mut child = server
        .cli_command(dir.path(), &["--token", &root, "run", "hello", "--env", "production"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn slipway run");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !out.iter().any(|l: &String| l.contains("waiting for approval by an approver of production")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the CLI never said what the deployment waits for: {out:?}");
            }
        }
    }
    let status = text(&server.cli(dir.path(), &["--token", &root, "status"]));
    assert!(status.contains("1  run in production: waiting for approval"), "{status}");

    let path = dir.path().join("slipway.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, format!("{config}\n# edited while it waited\n")).expect("edit");
    let approved = server.cli(dir.path(), &["--token", &alice, "approve", "1"]);
    assert!(text(&approved).contains("deployment 1 (run in production) approved"), "{}", text(&approved));

    let code = wait("the CLI to finish", || format!("{out:?}"), || child.try_wait().ok().flatten());
    out.extend(rx.try_iter());
    let all = out.join("\n");
    assert_eq!(code.code(), Some(0), "{all}");
    assert!(all.contains("submitted again as deployment 2; following deployment 2"), "{all}");
    assert!(all.contains("deployment 2 succeeded"), "{all}");
    let old: Value = serde_json::from_slice(&server.cli(dir.path(), &["--token", &root, "--json", "status", "1"]).stdout).unwrap_or_default();
    assert_eq!((old["deployment"]["state"].as_str(), old["deployment"]["superseded_by"].as_i64()), (Some("superseded"), Some(2)), "{old}");
}

/// Tokens through the CLI as a user meets them: the first (admin) token
/// made on the host, a deployer token for staging only, and exit code 7
/// (not allowed) with the reason for a missing role, a missing token and
/// a revoked one.
#[test]
fn issue6_cli_tokens_and_the_not_allowed_exit_code() {
    let dir = common::config_dir(
        r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[[job]]
name = "hello"
command = ["echo", "hello"]
"#,
        &[],
    );
    let server = Server::start(dir.path(), None, &[]);
    let last_line = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").to_string();
    let root = server.cli(dir.path(), &["token", "create", "root", "--role", "*=admin"]);
    assert!(root.status.success(), "{}", text(&root));
    let admin = last_line(&root);
    assert!(admin.starts_with("slw_"), "{}", text(&root));
    let made = server.cli(dir.path(), &["--token", &admin, "token", "create", "ci", "--role", "staging=deployer"]);
    assert!(made.status.success(), "{}", text(&made));
    let ci = last_line(&made);

    let prod = server.cli(dir.path(), &["--token", &ci, "run", "hello", "--env", "production"]);
    assert_eq!(prod.status.code(), Some(7), "{}", text(&prod));
    assert!(text(&prod).contains("token \"ci\" may not deploy in production"), "{}", text(&prod));
    let staging = server.cli(dir.path(), &["--token", &ci, "run", "hello", "--env", "staging"]);
    assert_eq!(staging.status.code(), Some(0), "{}", text(&staging));

    let anonymous = server.cli(dir.path(), &["status"]);
    assert_eq!(anonymous.status.code(), Some(7), "{}", text(&anonymous));
    assert!(text(&anonymous).contains("this API needs a token"), "{}", text(&anonymous));
    assert!(server.cli(dir.path(), &["--token", &admin, "token", "revoke", "ci"]).status.success());
    let revoked = server.cli(dir.path(), &["--token", &ci, "status"]);
    assert_eq!(revoked.status.code(), Some(7), "{}", text(&revoked));
    assert!(text(&revoked).contains("unknown or revoked token"), "{}", text(&revoked));
    let list = text(&server.cli(dir.path(), &["--token", &admin, "token", "list"]));
    assert!(!list.contains(&ci) && !list.contains(&admin), "tokens are shown only when made: {list}");
}
