//! Issue 13, section 2: a store outage longer than the lease must not turn
//! work that finished into failures. Three real `slipway serve` nodes on a
//! PostgreSQL server of the test's own, stopped (`pg_ctl stop -m
//! immediate`) mid-run for longer than the lease and started again; and a
//! single node on SQLite whose database is locked longer than the lease.
//!
//! Jobs prove "ran exactly once" through a marker file outside the config
//! directory (`<job> <attempt>` per start). Every wait is bounded; nothing
//! asserts on wall-clock durations.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{PgServer, Server, post_json};
use serde_json::Value;

/// Short, as in the report: an outage of 10 to 15 s is several leases.
const LEASE: &str = "3s";

/// Generous bound for a deployment to end once the store is back.
const WAIT: Duration = Duration::from_secs(90);

/// Record "<job> <attempt>" in $MARK, then sleep $1 seconds.
const MARK_SH: &str = r#"#!/bin/sh
echo "$SLIPWAY_JOB $SLIPWAY_ATTEMPT" >> "$MARK"
exec sleep "${1:-0}"
"#;

/// A layered graph: `levels` × `width` jobs, each needing two jobs of the
/// level above, and `done` needing the last level. Every job sleeps
/// `sleep` seconds; all are idempotent (so a job whose node really died
/// is retried, and the deployment can still succeed).
fn graph(levels: usize, width: usize, sleep: &str) -> String {
    let mut t = String::from("[project]\nname = \"outage\"\n");
    let name = |l: usize, i: usize| format!("l{l}j{i:02}");
    for l in 0..levels {
        for i in 0..width {
            let needs = if l == 0 { String::new() } else { format!("needs = [\"{}\", \"{}\"]\n", name(l - 1, i), name(l - 1, (i + 1) % width)) };
            t.push_str(&format!(
                "\n[[job]]\nname = \"{}\"\n{needs}idempotent = true\ncommand = [\"./mark.sh\", \"{sleep}\"]\nenv = {{ MARK = \"@EXT@/marks\" }}\n",
                name(l, i)
            ));
        }
    }
    let last: Vec<String> = (0..width).map(|i| format!("\"{}\"", name(levels - 1, i))).collect();
    t.push_str(&format!(
        "\n[[job]]\nname = \"done\"\nneeds = [{}]\nidempotent = true\ncommand = [\"./mark.sh\", \"0\"]\nenv = {{ MARK = \"@EXT@/marks\" }}\n",
        last.join(", ")
    ));
    t
}

/// Config directories (one per node: a server's files must not end up in
/// another's revision) and a directory outside them for markers and logs.
struct Fx {
    ext: tempfile::TempDir,
    configs: Vec<tempfile::TempDir>,
}

impl Fx {
    fn new(toml: &str, nodes: usize) -> Fx {
        let ext = tempfile::tempdir().expect("tempdir");
        let text = toml.replace("@EXT@", &ext.path().display().to_string());
        let configs = (0..nodes).map(|_| common::config_dir(&text, &[("mark.sh", MARK_SH)])).collect();
        Fx { ext, configs }
    }

    fn marker(&self) -> PathBuf {
        self.ext.path().join("marks")
    }

    /// How many times each job started, by its side effects.
    fn runs(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for l in std::fs::read_to_string(self.marker()).unwrap_or_default().lines() {
            if let Some((job, _)) = l.split_once(' ') {
                *n.entry(job.to_string()).or_default() += 1;
            }
        }
        n
    }

    /// `slipway serve` for node `i`, its log outside the config dir.
    fn serve(&self, i: usize, store: &str, node: &str) -> Server {
        let extra = ["--node-id", node, "--lease", LEASE, "--poll", "200ms", "--parallelism", "8", "--shutdown-grace", "1s"];
        Server::start_logged(self.configs[i].path(), store, &extra, self.ext.path(), node)
    }
}

fn logs_of(servers: &[&Server]) -> String {
    servers.iter().map(|s| format!("--- serve log {}:\n{}", s.url, tail(&s.log_text(), 150))).collect::<Vec<_>>().join("\n")
}

/// Successful attempts recorded more than a lease (plus slack) after they
/// started, though their process runs for at most a second: results that
/// waited through the outage. Proof that the outage caught finished work.
fn late_results(d: &Value) -> usize {
    attempts(d).iter().filter(|a| a["outcome"] == "succeeded" && a["duration_ms"].as_i64().unwrap_or(0) > 4_500).count()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn submit_run(url: &str, jobs: &[&str], key: &str) -> i64 {
    let body = serde_json::json!({"kind": "run", "jobs": jobs, "id": key}).to_string();
    let (status, v) = post_json(&format!("{url}/api/v1/events"), &body);
    assert_eq!(status, 202, "submit {jobs:?}: {v}");
    v["deployment_id"].as_i64().unwrap_or_else(|| panic!("no deployment_id in {v}"))
}

/// The deployment's detail, or None while the store does not answer.
fn detail(url: &str, id: i64) -> Option<Value> {
    let out = Command::new("curl").args(["-sS", "--max-time", "10", &format!("{url}/api/v1/deployments/{id}")]).output().ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["deployment"].is_object().then_some(v)
}

fn state(d: &Value) -> &str {
    d["deployment"]["state"].as_str().unwrap_or("?")
}

fn jobs(d: &Value) -> &[Value] {
    d["jobs"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn attempts(d: &Value) -> &[Value] {
    d["attempts"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Jobs running now, with their node.
fn running(d: &Value) -> BTreeMap<String, String> {
    jobs(d)
        .iter()
        .filter(|j| j["state"] == "running")
        .map(|j| (j["name"].as_str().unwrap_or("?").to_string(), j["node"].as_str().unwrap_or("?").to_string()))
        .collect()
}

fn count(d: &Value, st: &str) -> usize {
    jobs(d).iter().filter(|j| j["state"] == st).count()
}

fn wait<T>(limit: Duration, what: &str, diag: impl Fn() -> String, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for_diag(limit, what, diag, f)
}

/// Wait until the deployment ends (asking any server that answers).
fn wait_done(servers: &[&Server], id: i64) -> Value {
    wait(
        WAIT,
        &format!("deployment {id} to end"),
        || logs_of(servers),
        || servers.iter().find_map(|s| detail(&s.url, id)).filter(|d| matches!(state(d), "succeeded" | "failed" | "cancelled" | "superseded")),
    )
}

/// Wait until the deployment is mid-run in the way `ready` says; its detail.
fn wait_mid_run(server: &Server, id: i64, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait(WAIT, what, || format!("{:#}", detail(&server.url, id).unwrap_or_default()), || detail(&server.url, id).filter(|d| ready(d)))
}

/// A PostgreSQL server of this test's own, or None (skipped) when its
/// binaries are not installed.
fn own_postgres() -> Option<PgServer> {
    let pg = PgServer::start();
    if pg.is_none() {
        if std::env::var("SLIPWAY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!("PostgreSQL binaries are required (SLIPWAY_REQUIRE_POSTGRES=1)");
        }
        eprintln!("note: skipped: no PostgreSQL binaries under /usr/lib/postgresql");
    }
    pg
}

/// Three nodes on one PostgreSQL; the server is stopped mid-run for
/// longer than the lease (10 to 14 s against a 3 s lease) and started
/// again, three times. Every time the deployment succeeds, no attempt is
/// recorded as interrupted (no node died: every job's process finished,
/// and its own node records the result), every job ran exactly once, and
/// the jobs that were running when the store went away are recorded by
/// the node that ran them.
#[test]
fn issue13_store_outage_longer_than_the_lease_fails_no_finished_job() {
    let Some(pg) = own_postgres() else { return };
    let store = pg.url();
    let fx = Fx::new(&graph(6, 20, "0.5"), 3);
    let nodes: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
    let servers: Vec<Server> = (0..3).map(|i| fx.serve(i, &store, &nodes[i])).collect();
    let all: Vec<&Server> = servers.iter().collect();

    for (round, outage) in [10u64, 12, 14].into_iter().enumerate() {
        let before = fx.runs();
        let id = submit_run(&servers[0].url, &["done"], &format!("round-{round}"));
        // Mid-run: some work done, jobs of several nodes running.
        let mid = wait_mid_run(&servers[0], id, "the deployment to be mid-run", |d| {
            count(d, "succeeded") >= 20 && running(d).values().collect::<BTreeSet<_>>().len() >= 2
        });
        assert!(pg.ctl("stop"), "stop PostgreSQL");
        let stopped = Instant::now();
        // The outage itself (scenario, not a wait for a condition).
        std::thread::sleep(Duration::from_secs(outage));
        assert!(pg.ctl("start"), "start PostgreSQL again");
        let outage_was = stopped.elapsed();

        let d = wait_done(&all, id);
        let runs = fx.runs();
        let diag = format!("round {round} (store down {outage_was:?})\n{d:#}\nrunning at the stop: {:?}\n{}", running(&mid), logs_of(&all));
        let interrupted: Vec<&Value> = attempts(&d).iter().filter(|a| a["outcome"] == "interrupted").collect();
        assert!(interrupted.is_empty(), "no node died, yet attempts were recorded as interrupted: {interrupted:#?}\n{diag}");
        assert_eq!(state(&d), "succeeded", "{diag}");
        assert!(late_results(&d) > 0, "the outage should have caught jobs whose results waited for the store\n{diag}");
        assert_eq!(jobs(&d).len(), 121, "{diag}");
        for j in jobs(&d) {
            let name = j["name"].as_str().unwrap_or("?");
            assert_eq!(j["state"], "succeeded", "{name}\n{diag}");
            assert_eq!(j["attempt"], 1, "{name}\n{diag}");
            assert_eq!(runs.get(name).copied().unwrap_or(0), before.get(name).copied().unwrap_or(0) + 1, "{name} should have run exactly once more\n{diag}");
        }
        // What ran through the outage was recorded by the node that ran it.
        for (name, node) in running(&mid) {
            let j = jobs(&d).iter().find(|j| j["name"] == name.as_str()).unwrap_or_else(|| panic!("no job {name}\n{diag}"));
            assert_eq!(j["node"], node.as_str(), "{name}\n{diag}");
        }
    }
}

/// A node killed (SIGKILL) while the store is down: once the store is
/// back, the other nodes take its jobs over (a lease after they see the
/// store again) and the deployment still succeeds; only the dead node's
/// attempts are interrupted.
#[test]
fn issue13_node_killed_during_a_store_outage_is_taken_over_after_it() {
    let Some(pg) = own_postgres() else { return };
    let store = pg.url();
    // Wider than two nodes' slots (2 × 8), so n3 surely has work when it
    // is killed (CI once saw n1 and n2 take every job of a 16-wide level).
    let fx = Fx::new(&graph(4, 30, "1"), 3);
    let nodes: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
    let mut servers: Vec<Server> = (0..3).map(|i| fx.serve(i, &store, &nodes[i])).collect();

    let id = submit_run(&servers[0].url, &["done"], "kill");
    let mid = wait_mid_run(&servers[0], id, "node n3 to run jobs", |d| count(d, "succeeded") >= 8 && running(d).values().any(|n| n == "n3"));
    assert!(pg.ctl("stop"), "stop PostgreSQL");
    servers[2].kill9();
    // The outage itself (scenario, not a wait for a condition).
    std::thread::sleep(Duration::from_secs(10));
    assert!(pg.ctl("start"), "start PostgreSQL again");

    let all: Vec<&Server> = servers.iter().collect();
    let d = wait_done(&all[..2], id);
    let runs = fx.runs();
    let diag = format!("{d:#}\nrunning at the stop: {:?}\n{}", running(&mid), logs_of(&all));
    assert_eq!(state(&d), "succeeded", "{diag}");
    let interrupted: Vec<&Value> = attempts(&d).iter().filter(|a| a["outcome"] == "interrupted").collect();
    assert!(!interrupted.is_empty(), "n3 was killed mid-run: its jobs must have been interrupted\n{diag}");
    for a in &interrupted {
        assert_eq!(a["node"], "n3", "only the dead node's work is interrupted: {a:#}\n{diag}");
        let reason = a["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("n3") && reason.contains("retrying"), "{reason:?}\n{diag}");
    }
    // What n3 had running when it died was taken over and ran again
    // elsewhere. (The snapshot `mid` is taken a moment before the kill: a
    // job in it may still have finished on n3, and n3 may have started
    // others since; so the interrupted attempts say what died with it.)
    for a in &interrupted {
        let name = a["job"].as_str().unwrap_or("?");
        let j = jobs(&d).iter().find(|j| j["name"] == name).unwrap_or_else(|| panic!("no job {name}\n{diag}"));
        assert_eq!(j["state"], "succeeded", "{name}\n{diag}");
        assert_ne!(j["node"], "n3", "{name} was taken over\n{diag}");
    }
    // Nothing that finished was run again, except what died with n3.
    let taken_over: BTreeSet<&str> = interrupted.iter().filter_map(|a| a["job"].as_str()).collect();
    for j in jobs(&d) {
        let name = j["name"].as_str().unwrap_or("?");
        let want = if taken_over.contains(name) { 2 } else { 1 };
        assert_eq!(runs.get(name).copied().unwrap_or(0), want, "{name}\n{diag}");
        assert_eq!(j["attempt"], want as i64, "{name}\n{diag}");
    }
}

/// SQLite, one node: the database is locked by another process (as a
/// disk that briefly does not answer) for longer than the lease while
/// jobs finish. The node keeps their results and records them once it
/// can: nothing is interrupted, nothing runs twice.
#[test]
fn issue13_sqlite_store_unavailable_longer_than_the_lease_loses_no_result() {
    let fx = Fx::new(&graph(4, 8, "0.5"), 1);
    let db = fx.ext.path().join("slipway.db");
    let url = format!("sqlite://{}", db.display());
    let server = fx.serve(0, &url, "solo");
    let id = submit_run(&server.url, &["done"], "sqlite");
    let mid = wait_mid_run(&server, id, "the deployment to be mid-run", |d| count(d, "succeeded") >= 4 && !running(d).is_empty());

    // Another process holds SQLite's write lock for 8 s: every write of
    // the node fails (busy) until it lets go.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&format!("{url}?mode=rw")).await.expect("open the store");
        sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.expect("lock the store");
        // How long the lock is held (scenario, not a wait for a condition).
        tokio::time::sleep(Duration::from_secs(8)).await;
        sqlx::query("COMMIT").execute(&mut conn).await.expect("unlock the store");
        conn.close().await.expect("close");
    });

    let d = wait_done(&[&server], id);
    let runs = fx.runs();
    let diag = format!("{d:#}\nrunning at the lock: {:?}\n{}", running(&mid), logs_of(&[&server]));
    let interrupted: Vec<&Value> = attempts(&d).iter().filter(|a| a["outcome"] == "interrupted").collect();
    assert!(interrupted.is_empty(), "{interrupted:#?}\n{diag}");
    assert_eq!(state(&d), "succeeded", "{diag}");
    assert!(late_results(&d) > 0, "the lock should have caught jobs whose results waited for the store\n{diag}");
    for j in jobs(&d) {
        let name = j["name"].as_str().unwrap_or("?");
        assert_eq!(j["attempt"], 1, "{name}\n{diag}");
        assert_eq!(runs.get(name).copied().unwrap_or(0), 1, "{name}\n{diag}");
    }
}

/// A TCP relay in front of PostgreSQL that can go silent: each connection
/// open when [`Relay::silence`] is called still carries what the client
/// sends, but never again delivers the server's answer, and is never
/// closed towards the client (a server host that died, a failover, a path
/// cut without a reset). Connections opened later work. A fault injected
/// between real parts, not a fake of either.
struct Relay {
    port: u16,
    silenced_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes that, once sent by a client, silence that one connection
    /// from then on (once: the trap is then spent).
    trap: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let silenced_below = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let trap = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let (below, count, traps) = (silenced_below.clone(), opened.clone(), trap.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let id = count.fetch_add(1, SeqCst);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
                let (Ok(mut from_client), Ok(mut to_server)) = (client.try_clone(), server.try_clone()) else { continue };
                let trapped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (traps, caught) = (traps.clone(), trapped.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_client.read(&mut buf) {
                        if let Ok(mut t) = traps.lock()
                            && t.as_ref().is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m.as_slice()))
                        {
                            *t = None;
                            caught.store(true, SeqCst);
                        }
                        if to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
                let (mut from_server, mut to_client, below) = (server, client, below.clone());
                std::thread::spawn(move || {
                    let silent = || id < below.load(SeqCst) || trapped.load(SeqCst);
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_server.read(&mut buf) {
                        if silent() {
                            continue;
                        }
                        if to_client.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    if silent() {
                        // Silent to the end: no FIN either.
                        std::mem::forget(to_client);
                    }
                });
            }
        });
        Relay { port, silenced_below, opened, trap }
    }

    /// Silence the next connection that sends `bytes`, from that moment.
    fn silence_on(&self, bytes: &[u8]) {
        *self.trap.lock().expect("trap") = Some(bytes.to_vec());
    }

    fn silence(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.silenced_below.store(self.opened.load(SeqCst), SeqCst);
    }
}

/// Issue 19 (an audit of waits without a bound): a node on PostgreSQL
/// whose store connections go silent mid-run (every one open at that
/// moment) finishes its deployment on new ones. The writer that records
/// results and output waited on its connection's answer forever (sqlx sets
/// no keepalive, and the server's own timeouts cannot fire on a
/// connection it no longer has), and with it every finish of the node.
#[test]
fn issue19_store_connections_that_go_silent_do_not_stall_the_node() {
    let Some(pg) = own_postgres() else { return };
    let relay = Relay::start(pg.port);
    let store = format!("postgres://slipway@127.0.0.1:{}/postgres", relay.port);
    // `chatty` prints a line every 10 ms for about 5 s: its output reaches
    // the writer every 50 ms, so a batch is always in flight or about to go
    // out on the writer's connection without a ping first.
    let chatty = r#"
[[job]]
name = "chatty"
idempotent = true
command = ["sh", "-c", "echo \"$SLIPWAY_JOB $SLIPWAY_ATTEMPT\" >> \"$MARK\"; i=0; while [ $i -lt 500 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"]
env = { MARK = "@EXT@/marks" }
"#;
    let fx = Fx::new(&(graph(4, 5, "0.3") + chatty), 1);
    let server = fx.serve(0, &store, "n1");
    let id = submit_run(&server.url, &["done", "chatty"], "silent-1");
    wait_mid_run(&server, id, "chatty to be running", |d| running(d).contains_key("chatty"));
    relay.silence();
    let d = wait(
        Duration::from_secs(150),
        &format!("deployment {id} to end"),
        || logs_of(&[&server]),
        || detail(&server.url, id).filter(|d| matches!(state(d), "succeeded" | "failed" | "cancelled" | "superseded")),
    );
    let diag = format!("{d:#}\n{}", logs_of(&[&server]));
    assert_eq!(state(&d), "succeeded", "{diag}");
    assert_eq!(jobs(&d).len(), 22, "{diag}");
    // A job whose claim was committed but whose answer never came was not
    // started by it: no job ran twice.
    let runs = fx.runs();
    for j in jobs(&d) {
        let name = j["name"].as_str().unwrap_or("?");
        assert_eq!(runs.get(name).copied(), Some(1), "{name} ran once\n{diag}");
    }
}

/// Issue 19 (an audit of waits without a bound): an API read whose store
/// connection goes silent after it was sent (the server host gone without
/// a reset) is answered 503 "unavailable" within the store's answer
/// deadline, and the next read works on another connection. Before, the
/// request waited for ever, and so did its client: sqlx sets no TCP
/// keepalive, and only the writer's batches had a deadline.
#[test]
fn issue19_an_api_read_on_a_store_connection_gone_silent_is_answered() {
    let Some(pg) = own_postgres() else { return };
    let relay = Relay::start(pg.port);
    let store = format!("postgres://slipway@127.0.0.1:{}/postgres", relay.port);
    let fx = Fx::new(&graph(1, 1, "0"), 1);
    let server = fx.serve(0, &store, "n1");
    let audit = format!("{}/api/v1/audit", server.url);
    // The first audit read sends its statement's text (sqlx prepares it
    // on each connection once); the connection carrying it goes silent.
    relay.silence_on(b"FROM audit");
    let started = Instant::now();
    let out = Command::new("curl").args(["-sS", "--max-time", "120", "-o", "/dev/stderr", "-w", "%{http_code}", &audit]).output().expect("curl");
    let (code, body) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    let diag = format!("after {:?}: {code} {body}\n{}", started.elapsed(), logs_of(&[&server]));
    assert_eq!(code, "503", "the read is answered, as the store being unavailable\n{diag}");
    // Within the store's 40 s answer deadline and a little slack, not at
    // whatever bound the client or the OS sets.
    assert!(started.elapsed() < Duration::from_secs(60), "{diag}");
    assert!(body.contains("did not answer within"), "{diag}");
    // The trap is spent: the next read goes through on a new connection.
    let v = wait(
        Duration::from_secs(30),
        "the audit to be read again",
        || logs_of(&[&server]),
        || {
            let out = Command::new("curl").args(["-sS", "--max-time", "10", &audit]).output().ok()?;
            serde_json::from_slice::<Value>(&out.stdout).ok().filter(Value::is_array)
        },
    );
    assert!(v.is_array(), "{v}");
}
