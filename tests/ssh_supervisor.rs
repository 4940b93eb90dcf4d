//! The service supervisor of SSH hosts (src/targets/ssh/supervisor.rs)
//! through its agent verb `service`, as the node's rollout (rollout.rs)
//! drives it: first run directly on this machine (the agent as a process,
//! no SSH: quick, no root), then over SSH on a host of the test fleet with
//! load from the fleet's bridge namespace (needs root).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The encoded spec of service "web" on `listen`, the demo as its command.
fn spec(listen: SocketAddr, demo: &str, instances: u32) -> String {
    let text = format!(
        r#"
[[service]]
name = "web"
listen = "{listen}"
instances = {instances}
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 2, deadline = "4s" }}
rollout = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "2s" }}
stop_grace = "2s"
"#
    );
    let config = slipway::config::parse("slipway.toml", &text).unwrap_or_else(|e| panic!("config: {e:?}"));
    slipway::store::spec::encode_service(config.services[0].spec.as_ref().expect("a managed service"))
}

/// What one `service` call printed, line by line, and whether it exited 0.
#[derive(Debug)]
struct Answer {
    lines: Vec<Value>,
    ok: bool,
}

impl Answer {
    fn last(&self) -> &Value {
        self.lines.last().unwrap_or_else(|| panic!("no answer: {self:?}"))
    }
    fn outcome(&self) -> &str {
        self.last()["result"]["outcome"].as_str().unwrap_or_else(|| panic!("no result: {self:?}"))
    }
    fn said(&self) -> String {
        self.lines.iter().filter_map(|l| l["line"].as_str()).collect::<Vec<_>>().join("\n")
    }
    /// The status entry of environment "production", service "web".
    fn web(&self) -> Option<Value> {
        let services = self.last()["status"]["services"].as_array().unwrap_or_else(|| panic!("no status: {self:?}")).clone();
        services.into_iter().find(|s| s["environment"] == "production" && s["service"] == "web")
    }
}

fn parse(stdout: &[u8], ok: bool) -> Answer {
    let lines = String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    Answer { lines, ok }
}

fn pids(entry: &Value) -> Vec<i64> {
    let mut p: Vec<i64> = entry["pids"].as_array().cloned().unwrap_or_default().iter().filter_map(Value::as_i64).collect();
    p.sort();
    p
}

fn get(addr: SocketAddr) -> Option<String> {
    common::http_get(addr.port(), "/")
}

fn refused(addr: SocketAddr) -> bool {
    matches!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

// ---- on this machine ---------------------------------------------------------

struct Local {
    dir: tempfile::TempDir,
    installation: String,
    listen: SocketAddr,
    spec: String,
}

impl Local {
    fn new() -> Local {
        let listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        Local {
            dir: tempfile::tempdir().expect("tempdir"),
            installation: format!("t{}", rand::random::<u32>()),
            listen,
            spec: spec(listen, common::demo_bin(), 2),
        }
    }

    fn request(&self, op: &str) -> Value {
        json!({ "dir": self.dir.path().display().to_string(), "installation": self.installation, "op": op, "environment": "production", "service": "web" })
    }

    fn rollout(&self, version: &str) -> Value {
        let mut r = self.request("rollout");
        r["spec"] = json!(self.spec);
        r["version"] = json!(version);
        r["deployment_id"] = json!(7);
        r["revision"] = json!(format!("rev-{version}"));
        r["workdir"] = json!(self.dir.path().display().to_string());
        r["sha256"] = Value::Null;
        r
    }

    fn start(&self, request: &Value) -> std::process::Child {
        use std::io::Write as _;
        let mut child = std::process::Command::new(common::slipway_bin())
            .args(["agent", "ssh", "service"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the agent");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{request}").expect("send the request");
        child
    }

    /// Run one request to its end (at most 120 s).
    fn ask(&self, request: &Value) -> Answer {
        let child = self.start(request);
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(o) => o.expect("the agent's output"),
            Err(_) => {
                // SAFETY: our own child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("the agent did not answer {request} within 120 s");
            }
        };
        parse(&out.stdout, out.status.success())
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("supervisor").join(&self.installation)
    }

    fn supervisor_pid(&self) -> i64 {
        let v: Value = serde_json::from_slice(&std::fs::read(self.base().join("pid")).expect("the pid file")).expect("pid JSON");
        v["pid"].as_i64().expect("pid")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.base().join("log")).unwrap_or_default()
    }
}

impl Drop for Local {
    /// Nothing of the test may stay: the service stops, the supervisor ends.
    fn drop(&mut self) {
        let _ = self.ask(&self.request("stop"));
        if let Ok(text) = std::fs::read(self.base().join("pid"))
            && let Ok(v) = serde_json::from_slice::<Value>(&text)
            && let Some(pid) = v["pid"].as_i64()
        {
            // SAFETY: plain kill of the supervisor this test started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
}

fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn issue15_the_supervisor_rolls_drains_and_survives_its_own_kill_here() {
    let t = Local::new();

    // v1: the listen address answers; status says what runs.
    let a = t.ask(&t.rollout("1.0"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    assert!(a.said().contains("[rollout]"), "progress lines are relayed: {a:?}");
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 1.0"));
    let s = t.ask(&t.request("status"));
    let web = s.web().unwrap_or_else(|| panic!("web in {s:?}"));
    assert_eq!(
        (web["version"].as_str(), web["instances"].as_i64(), web["healthy"].as_i64(), web["drained"].as_bool()),
        (Some("1.0"), Some(2), Some(2), Some(false))
    );
    assert_eq!(web["spec"].as_str(), Some(t.spec.as_str()));
    assert_eq!(web["revision"], "rev-1.0");
    assert_eq!(web["workdir"].as_str(), Some(t.dir.path().to_str().unwrap()));

    // v2 under continuous requests: none fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load = common::load(t.listen.port(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let a = t.ask(&t.rollout("2.0"));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, errors) = load.join().expect("load");
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");
    assert_eq!(failed, 0, "failed requests during the rollout: {errors:?}");
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));

    // The same rollout again (a node that restarted): nothing to do.
    let a = t.ask(&t.rollout("2.0"));
    assert!(a.ok && a.outcome() == "succeeded" && a.said().contains("nothing to do"), "{a:?}");

    // v3 never gets healthy: rolled back, v2 serves.
    let a = t.ask(&t.rollout("3.0"));
    assert!(a.ok, "a relayed result exits 0 whatever the outcome: {a:?}");
    assert_eq!(a.outcome(), "rolled_back", "{a:?}");
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));
    let before = pids(&t.ask(&t.request("status")).web().expect("web"));
    assert_eq!(before.len(), 2, "{before:?}");

    // Drained: the address refuses, the instances keep running; persisted.
    let a = t.ask(&t.request("drain"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
    assert!(refused(t.listen), "a drained service takes no connections");
    assert!(before.iter().all(|p| alive(*p)), "instances keep running while drained");
    let web = t.ask(&t.request("status")).web().expect("a drained service is still in status");
    assert_eq!(web["drained"].as_bool(), Some(true));
    let a = t.ask(&t.rollout("4.0"));
    assert_eq!(a.outcome(), "skipped", "no rollout to a drained service: {a:?}");
    let a = t.ask(&t.request("undrain"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));
    assert_eq!(pids(&t.ask(&t.request("status")).web().expect("web")), before, "undrain adopts the instances that kept running");

    // kill -9 of the supervisor: instances keep serving behind nothing;
    // the next request starts a new supervisor, which adopts them.
    let old = t.supervisor_pid();
    // SAFETY: the supervisor this test started.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "the supervisor is gone", || {
        !alive(old) || std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| s.contains(") Z"))
    });
    assert!(before.iter().all(|p| alive(*p)), "instances outlive their supervisor");
    let s = t.ask(&t.request("status"));
    assert!(s.ok, "{s:?}");
    assert_ne!(t.supervisor_pid(), old, "a new supervisor answers");
    wait_until(Duration::from_secs(20), "the address answers again", || get(t.listen).as_deref() == Some("hello from demo 2.0"));
    assert_eq!(pids(&t.ask(&t.request("status")).web().expect("web")), before, "the new supervisor adopted the same processes");

    // The node's connection dies mid-rollout: the rollout goes on to its end.
    let mut agent = t.start(&t.rollout("5.0"));
    std::thread::sleep(Duration::from_millis(300));
    let _ = agent.kill();
    let _ = agent.wait();
    wait_until(Duration::from_secs(30), "the cut-off rollout finishes", || get(t.listen).as_deref() == Some("hello from demo 5.0"));
    let a = t.ask(&t.rollout("5.0"));
    assert!(a.ok && a.outcome() == "succeeded" && a.said().contains("nothing to do"), "{a:?}");

    // Stop: gone, and so are its processes and its entry.
    let now = pids(&t.ask(&t.request("status")).web().expect("web"));
    let a = t.ask(&t.request("stop"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
    assert!(refused(t.listen));
    wait_until(Duration::from_secs(10), "the instances end", || now.iter().all(|p| !alive(*p)));
    assert!(t.ask(&t.request("status")).web().is_none());

    // Bad requests are errors, with a non-zero exit.
    let mut bad = t.request("explode");
    let a = t.ask(&bad);
    assert!(!a.ok && a.last()["error"].as_str().is_some_and(|e| e.contains("unknown op")), "{a:?}");
    bad["op"] = json!("rollout");
    bad["spec"] = json!("not a spec");
    let a = t.ask(&bad);
    assert!(!a.ok && a.last()["error"].is_string(), "{a:?}");
}
