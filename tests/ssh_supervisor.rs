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

/// The encoded spec of service "web" on `listen`, the demo as its command;
/// a release tarball's service, as the node sends it (the host never
/// fetches: the node shipped the release unpacked to `workdir`).
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
artifact = {{ url = "http://127.0.0.1:9/web-{{version}}.tar.gz" }}
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
        self.start_with(&common::slipway_bin(), request)
    }

    /// The agent's `service` verb of the Slipway build at `bin`.
    fn start_with(&self, bin: &std::path::Path, request: &Value) -> std::process::Child {
        use std::io::Write as _;
        let mut child = std::process::Command::new(bin)
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
        self.ask_with(&common::slipway_bin(), request)
    }

    fn ask_with(&self, bin: &std::path::Path, request: &Value) -> Answer {
        let child = self.start_with(bin, request);
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

    // The whole host drained (as `slipway hosts drain` asks): the address
    // refuses, the instances keep running, no rollout starts; persisted.
    let host = |op: &str| {
        let mut r = t.request(op);
        r["environment"] = json!("");
        r["service"] = json!("*");
        r
    };
    let a = t.ask(&host("drain"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
    assert!(refused(t.listen), "a drained service takes no connections");
    assert!(before.iter().all(|p| alive(*p)), "instances keep running while drained");
    let s = t.ask(&t.request("status"));
    assert_eq!(s.last()["status"]["drained"].as_bool(), Some(true), "{s:?}");
    let web = s.web().expect("a drained service is still in status");
    assert_eq!(web["drained"].as_bool(), Some(true));
    let a = t.ask(&t.rollout("4.0"));
    assert_eq!(a.outcome(), "skipped", "no rollout to a drained service: {a:?}");
    let a = t.ask(&host("undrain"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));
    let s = t.ask(&t.request("status"));
    assert_eq!(s.last()["status"]["drained"].as_bool(), Some(false), "{s:?}");
    assert_eq!(pids(&s.web().expect("web")), before, "undrain adopts the instances that kept running");

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
    assert_eq!(s.last()["status"]["supervisor"]["pid"].as_i64(), Some(t.supervisor_pid()), "status names the supervisor that answers");
    wait_until(Duration::from_secs(20), "the address answers again", || get(t.listen).as_deref() == Some("hello from demo 2.0"));
    assert_eq!(pids(&t.ask(&t.request("status")).web().expect("web")), before, "the new supervisor adopted the same processes");

    // The node's connection dies mid-rollout: the rollout goes on to its end.
    // Cut only once the supervisor has said the rollout began (its first
    // progress line): a fixed pause raced a loaded machine, where the agent
    // could be killed before it had relayed the request at all.
    let mut agent = t.start(&t.rollout("5.0"));
    let mut first = String::new();
    let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(agent.stdout.as_mut().expect("stdout")), &mut first);
    assert!(read.is_ok_and(|n| n > 0) && first.contains("\"line\""), "the rollout began: {first:?}");
    let _ = agent.kill();
    let _ = agent.wait();
    wait_until(Duration::from_secs(120), "the cut-off rollout finishes", || get(t.listen).as_deref() == Some("hello from demo 5.0"));
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

// Issue 19 (an audit of where secrets go): a service's secrets are read on
// the host, and may exist only there, so the node cannot mask them; what
// the supervisor relayed of a rollout (an instance's last output in a
// health failure, the reason) left the host in clear.
#[test]
fn issue19_what_a_rollout_relays_from_the_host_is_masked_there() {
    let mut t = Local::new();
    let secrets = tempfile::tempdir().expect("tempdir");
    let key = secrets.path().join("api-key");
    std::fs::write(&key, "host-only-secret-4477\n").expect("write the secret");
    let text = format!(
        r#"
[secret.api]
file = "{key}"

[[service]]
name = "web"
listen = "{listen}"
instances = 1
command = ["sh", "-c", "echo booting $0 with $API_KEY >&2; [ $0 = 3.0 ] && exit 3; exec {demo} serve --port \"$1\" --version \"$0\"", "{{version}}", "{{port}}"]
secrets = {{ API_KEY = "api" }}
health = {{ http = "/healthz", interval = "100ms", healthy_after = 2, deadline = "3s" }}
artifact = {{ url = "http://127.0.0.1:9/web-{{version}}.tar.gz" }}
"#,
        key = key.display(),
        listen = t.listen,
        demo = common::demo_bin()
    );
    let config = slipway::config::parse("slipway.toml", &text).unwrap_or_else(|e| panic!("config: {e:?}"));
    t.spec = slipway::store::spec::encode_service(config.services[0].spec.as_ref().expect("a managed service"));

    let a = t.ask(&t.rollout("1.0"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    // 3.0 exits at once: the reason quotes its last output.
    let a = t.ask(&t.rollout("3.0"));
    assert_eq!(a.outcome(), "rolled_back", "{a:?}");
    let relayed = format!("{a:?}");
    assert!(relayed.contains("booting 3.0 with [secret api]"), "the last output, masked: {relayed}");
    assert!(!relayed.contains("host-only-secret-4477"), "the value left the host: {relayed}");
}

/// The supervisor's exe, as its pid file says.
fn supervisor_exe(t: &Local) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(t.base().join("pid")).expect("the pid file")).expect("JSON");
    v["exe"].as_str().unwrap_or_default().to_string()
}

#[test]
fn issue15_another_build_takes_the_host_over_before_a_rollout_and_adopts_the_instances() {
    let t = Local::new();
    let a = t.ask(&t.rollout("1.0"));
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    let (old, before) = (t.supervisor_pid(), pids(&t.ask(&t.request("status")).web().expect("web")));

    // The node was upgraded: its agent is another build (here: a copy of
    // this one under another name, as another checksum would be).
    let next_dir = tempfile::tempdir().expect("tempdir");
    let next = next_dir.path().join("slipway-next");
    std::fs::copy(common::slipway_bin(), &next).expect("copy slipway");

    // A status asked by it hands nothing over.
    assert!(t.ask_with(&next, &t.request("status")).ok);
    assert_eq!(t.supervisor_pid(), old, "a status check changes no supervisor");

    // A rollout does, first: the old supervisor ends, the new one adopts
    // the instances, then rolls 2.0 out. Between the old one's proxies
    // closing and the new one's binding, the address refuses connections
    // (about 0.2 s here; README, "Upgrading"): the load is reported, not
    // held to zero failures.
    let stop = Arc::new(AtomicBool::new(false));
    let load = common::load(t.listen.port(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let a = t.ask_with(&next, &t.rollout("2.0"));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, errors) = load.join().expect("load");
    assert!(a.ok && a.outcome() == "succeeded", "{a:?}\n{}", t.log());
    assert!(a.said().contains("handed the host over"), "the rollout says so: {a:?}");
    assert!(!alive(old) || std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| s.contains(") Z")), "the old supervisor ended");
    assert_ne!(t.supervisor_pid(), old);
    assert_eq!(supervisor_exe(&t), next.display().to_string(), "the new build supervises");
    assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));
    eprintln!("during the handoff and rollout: {ok} requests answered, {failed} failed: {errors:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");

    // The new supervisor adopted 1.0's instances (the rollout then
    // replaced them), and says so in its log.
    let log = t.log();
    assert!(log.contains(&format!("{} adopted", before.len())), "1.0's instances were adopted by the new supervisor:\n{log}");
}

// ---- over SSH, on a host of the fleet ------------------------------------------

mod fleet_test {
    use super::*;
    use common::fleet::Fleet;
    use slipway::targets::ssh::session::{self, AgentBinary, Chunk, Connection, Endpoint, Keys};

    const T: Duration = Duration::from_secs(120);

    struct Host<'a> {
        fleet: &'a Fleet,
        conn: Connection,
        agent: String,
        installation: String,
        listen: SocketAddr,
        spec: String,
        workdir: String,
    }

    impl Host<'_> {
        fn request(&self, op: &str) -> Value {
            json!({ "dir": self.fleet.dir(), "installation": self.installation, "op": op, "environment": "production", "service": "web" })
        }

        fn rollout(&self, version: &str) -> Value {
            let mut r = self.request("rollout");
            r["spec"] = json!(self.spec);
            r["version"] = json!(version);
            r["deployment_id"] = json!(3);
            r["revision"] = json!(format!("rev-{version}"));
            r["workdir"] = json!(self.workdir);
            r["sha256"] = Value::Null;
            r
        }

        /// One `service` call over SSH, as rollout.rs makes it.
        async fn ask(&self, request: &Value) -> Answer {
            let mut p = self.conn.spawn(&session::agent_command(&self.agent, "service")).await.expect("spawn the agent");
            p.write(format!("{request}\n").as_bytes()).await.expect("send");
            p.close_stdin().await.expect("close stdin");
            let (mut out, mut code) = (Vec::new(), None);
            while let Some(c) = tokio::time::timeout(T, p.next()).await.expect("the agent answers within the bound") {
                match c {
                    Chunk::Stdout(b) => out.extend(b),
                    Chunk::Stderr(_) => {}
                    Chunk::Exit(e) => code = Some(e),
                }
            }
            parse(&out, matches!(code, Some(session::RemoteExit::Code(0))))
        }

        fn base(&self) -> PathBuf {
            self.fleet.host_root(1).join("supervisor").join(&self.installation)
        }

        fn supervisor_pid(&self) -> i64 {
            let v: Value = serde_json::from_slice(&std::fs::read(self.base().join("pid")).expect("the pid file")).expect("pid JSON");
            v["pid"].as_i64().expect("pid")
        }

        /// Whether `pid` (of the host's PID namespace) runs there.
        fn alive(&self, pid: i64) -> bool {
            self.fleet.exec_on(1, &["kill", "-0", &pid.to_string()]).status.success()
        }
    }

    /// GET / on `addr` (HTTP/1.0, 2 s bounds): the body on a 200.
    fn get(addr: SocketAddr) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET / HTTP/1.0\r\nHost: web\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.trim().to_string())
    }

    async fn eventually(within: Duration, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Keep-alive clients against `addr` until `stop`: (ok, failed, first failures).
    async fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> (u64, u64, Vec<String>) {
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let client = slipway::http::builder().timeout(Duration::from_secs(10)).build().expect("client");
                    let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        match client.get(format!("http://{addr}/")).send().await {
                            Ok(r) if r.status().is_success() => match r.text().await {
                                Ok(b) if b.starts_with("hello") => ok += 1,
                                other => {
                                    failed += 1;
                                    errors.push(format!("{other:?}"));
                                }
                            },
                            other => {
                                failed += 1;
                                errors.push(format!("{other:?}"));
                            }
                        }
                    }
                    (ok, failed, errors)
                })
            })
            .collect();
        let mut total = (0, 0, Vec::new());
        for t in tasks {
            let (o, f, e) = t.await.expect("load task");
            total.0 += o;
            total.1 += f;
            total.2.extend(e.into_iter().take(3));
        }
        total
    }

    #[test]
    fn issue15_the_supervisor_on_a_fleet_host_over_ssh() {
        let fleet = Fleet::up(1);
        fleet.enter();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(on_fleet(&fleet));
    }

    async fn on_fleet(fleet: &Fleet) {
        let h = fleet.host(1);
        let ep = Endpoint { name: h.name.clone(), address: h.address.clone(), user: fleet.user().to_string(), connect_timeout: Duration::from_secs(5) };
        let key =
            slipway::config::secret::SecretRef { name: "key".into(), source: slipway::config::secret::SecretSource::File(fleet.key_path().to_path_buf()) }
                .read()
                .expect("the fleet's key");
        let keys = Keys { private_key: key, known_hosts: std::fs::read_to_string(fleet.known_hosts_path()).expect("known_hosts") };
        let conn = session::connect(&ep, &keys).await.expect("connect to h1");
        let agent = session::ensure_agent_with(&conn, &AgentBinary::at(common::fleet::agent_binary()), fleet.dir(), T).await.expect("the agent on h1");
        let workdir = format!("{}/demo", fleet.dir());
        let demo = std::fs::read(common::fleet::stripped("slipway-demo", std::path::Path::new(common::demo_bin()))).expect("read the demo");
        conn.upload(&format!("{workdir}/slipway-demo"), &demo, 0o755, T).await.expect("upload the demo");
        let port = 8080;
        let spec = spec(SocketAddr::from(([0, 0, 0, 0], port)), &format!("{workdir}/slipway-demo"), 2);
        let listen: SocketAddr = format!("{}:{port}", h.address).parse().expect("addr");
        let t = Host { fleet, conn, agent, installation: format!("t{}", rand::random::<u32>()), listen, spec, workdir };

        // v1: the host's address answers.
        let a = t.ask(&t.rollout("1.0")).await;
        assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
        assert_eq!(get(t.listen).as_deref(), Some("hello from demo 1.0"));

        // v2 under continuous requests from the bridge: none fails.
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(load(t.listen, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = t.ask(&t.rollout("2.0")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ok, failed, errors) = load.await.expect("load");
        assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
        eprintln!("rollout v1 → v2 on {}: {ok} requests, {failed} failed", h.name);
        assert!(ok > 50, "the load ran ({ok} requests)");
        assert_eq!(failed, 0, "failed requests during the rollout: {errors:?}");
        assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));

        // v3 never gets healthy: rolled back on the host, v2 serves.
        let a = t.ask(&t.rollout("3.0")).await;
        assert!(a.ok && a.outcome() == "rolled_back", "{a:?}");
        assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));

        // Status: what the node needs to put the host back.
        let web = t.ask(&t.request("status")).await.web().expect("web in status");
        assert_eq!((web["version"].as_str(), web["instances"].as_i64(), web["healthy"].as_i64()), (Some("2.0"), Some(2), Some(2)), "{web}");
        assert_eq!(
            (web["spec"].as_str(), web["workdir"].as_str(), web["revision"].as_str()),
            (Some(t.spec.as_str()), Some(t.workdir.as_str()), Some("rev-2.0"))
        );
        let before = pids(&web);

        // Drain: refused from the bridge; undrain: answers, same processes.
        let a = t.ask(&t.request("drain")).await;
        assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
        assert!(refused(t.listen), "a drained host refuses connections");
        let a = t.ask(&t.request("undrain")).await;
        assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
        assert_eq!(get(t.listen).as_deref(), Some("hello from demo 2.0"));
        assert_eq!(pids(&t.ask(&t.request("status")).await.web().expect("web")), before);

        // kill -9 of the supervisor: the next request starts a new one, which
        // adopts the running instances; the address answers again.
        let old = t.supervisor_pid();
        assert!(fleet.exec_on(1, &["kill", "-9", &old.to_string()]).status.success());
        eventually(Duration::from_secs(10), "the supervisor is gone", || !t.alive(old)).await;
        assert!(before.iter().all(|p| t.alive(*p)), "instances outlive their supervisor");
        let s = t.ask(&t.request("status")).await;
        assert!(s.ok, "{s:?}");
        assert_ne!(t.supervisor_pid(), old, "a new supervisor answers");
        eventually(Duration::from_secs(20), "the address answers again", || get(t.listen).as_deref() == Some("hello from demo 2.0")).await;
        assert_eq!(pids(&t.ask(&t.request("status")).await.web().expect("web")), before, "the same processes, adopted");

        // The node's connection dies mid-rollout: the host finishes it.
        let conn2 = session::connect(&ep, &keys).await.expect("a second connection");
        let mut p = conn2.spawn(&session::agent_command(&t.agent, "service")).await.expect("spawn");
        p.write(format!("{}\n", t.rollout("4.0")).as_bytes()).await.expect("send");
        p.close_stdin().await.expect("close stdin");
        let first = tokio::time::timeout(T, p.next()).await.expect("a first line");
        assert!(matches!(first, Some(Chunk::Stdout(_))), "{first:?}");
        drop(p);
        conn2.close().await;
        eventually(Duration::from_secs(30), "the cut-off rollout finishes on the host", || get(t.listen).as_deref() == Some("hello from demo 4.0")).await;
        let a = t.ask(&t.rollout("4.0")).await;
        assert!(a.ok && a.outcome() == "succeeded" && a.said().contains("nothing to do"), "{a:?}");

        // Stop: the address refuses, nothing of it runs.
        let now = pids(&t.ask(&t.request("status")).await.web().expect("web"));
        let a = t.ask(&t.request("stop")).await;
        assert!(a.ok && a.outcome() == "succeeded", "{a:?}");
        assert!(refused(t.listen));
        eventually(Duration::from_secs(10), "the instances end", || now.iter().all(|p| !t.alive(*p))).await;
        assert!(t.ask(&t.request("status")).await.web().is_none());
    }
}
