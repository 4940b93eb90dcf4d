//! Services on SSH hosts (issue 15), through the real binary against a
//! fleet of real sshd hosts: a release tarball rolled out across 20 hosts,
//! batch by batch, each host behind its own supervisor's proxy, under
//! continuous requests to every host (none may fail); an unhealthy version
//! rolled back on every host it touched; the migration once per
//! deployment, on one host. Needs root (the fleet).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::fleet::Fleet;

const LISTEN_PORT: u16 = 8080;

/// A release: `bin/web PORT VERSION` starts the demo server, which travels
/// in the tarball (the hosts have nothing of this machine's but over SSH).
fn release() -> (Vec<u8>, String) {
    use sha2::Digest;
    let demo = std::fs::read(common::fleet::stripped("slipway-demo", Path::new(common::demo_bin()))).expect("demo");
    let script = "#!/bin/sh\nexec \"$(dirname \"$0\")/slipway-demo\" serve --port \"$1\" --version \"$2\"\n";
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, body) in [("bin/web", script.as_bytes()), ("bin/slipway-demo", demo.as_slice())] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        builder.append_data(&mut header, path, body).expect("append");
    }
    let bytes = builder.into_inner().expect("tar").finish().expect("gzip");
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    (bytes, sha)
}

/// Serves `tarball` for any `GET /web-<v>.tar.gz`, in the current thread's
/// network namespace (the fleet's bridge, where the node fetches it).
fn tarball_server(tarball: Vec<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tarball = Arc::new(tarball);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tarball = tarball.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.read(&mut buf);
                let _ = write!(conn, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", tarball.len());
                let _ = conn.write_all(&tarball);
            });
        }
    });
    port
}

fn config(fleet: &Fleet, n: usize, http: u16, batch: usize) -> String {
    format!(
        r#"
[[environment]]
name = "production"
{hosts}
[[service]]
name = "web"
target = "ssh"
hosts = "web"
batch = {batch}
listen = "0.0.0.0:{LISTEN_PORT}"
instances = 1
command = ["./bin/web", "{{port}}", "{{version}}"]
artifact = {{ url = "http://127.0.0.1:{http}/web-{{version}}.tar.gz" }}
health = {{ http = "/healthz", interval = "200ms", deadline = "4s" }}
rollout = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "1s" }}
migrate = {{ command = ["sh", "-c", "echo \"migrated to $SLIPWAY_VERSION\" >> {dir}/migrations.log"] }}
"#,
        hosts = fleet.hosts_toml(n),
        dir = fleet.dir(),
    )
}

/// `GET /` of one host's service address.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nhost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => Ok(body.trim().to_string()),
        _ => Err(out.lines().next().unwrap_or("empty answer").to_string()),
    }
}

fn addrs(fleet: &Fleet, n: usize) -> Vec<SocketAddr> {
    fleet.hosts()[..n].iter().map(|h| format!("{}:{LISTEN_PORT}", h.address).parse().unwrap()).collect()
}

fn assert_all_serve(fleet: &Fleet, n: usize, version: &str) {
    for a in addrs(fleet, n) {
        assert_eq!(get(a).as_deref(), Ok(format!("hello from demo {version}").as_str()), "{a}");
    }
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Requests to every address until `stop`: (ok, failed, first errors).
fn load(addrs: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64, Vec<String>)> {
    std::thread::spawn(move || {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads: Vec<_> = addrs
            .into_iter()
            .map(|a| {
                let (ok, failed, errors, stop) = (ok.clone(), failed.clone(), errors.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match get(a) {
                            Ok(b) if b.starts_with("hello") => ok.fetch_add(1, Ordering::SeqCst),
                            Ok(b) => {
                                errors.lock().unwrap().push(format!("{a}: {b}"));
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                            Err(e) => {
                                errors.lock().unwrap().push(format!("{a}: {e}"));
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        let e = errors.lock().unwrap().iter().take(10).cloned().collect();
        (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst), e)
    })
}

#[test]
fn issue15_a_tarball_service_rolls_across_twenty_hosts_without_a_failed_request() {
    const N: usize = 20;
    let fleet = Fleet::up(N);
    fleet.enter();
    let (tarball, sha) = release();
    let http = tarball_server(tarball);
    let dir = common::config_dir(&config(&fleet, N, http, 5), &[]);
    let server = fleet.serve(dir.path());

    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "production", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));
    assert_all_serve(&fleet, N, "1.0");

    // 2.0 under continuous requests to every host's address.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(addrs(&fleet, N), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let out = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "production", "--sha256", &sha]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, errors) = traffic.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(failed, 0, "{failed} failed requests of {}: {errors:?}", ok + failed);
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    assert_all_serve(&fleet, N, "2.0");

    // 3.0 never becomes healthy: the first batch fails, is put back on
    // 2.0, and no later host is touched.
    let out = server.cli(dir.path(), &["deploy", "web", "3.0", "--env", "production", "--sha256", &sha]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rolled") || text(&out).contains("roll"), "{}", text(&out));
    assert_all_serve(&fleet, N, "2.0");

    // One migration per deployment, on one host only.
    let logs: Vec<(usize, String)> = (1..=N).filter_map(|k| std::fs::read_to_string(fleet.host_root(k).join("migrations.log")).ok().map(|t| (k, t))).collect();
    assert_eq!(logs.len(), 1, "migrations ran on several hosts: {logs:?}");
    assert_eq!(logs[0].1.lines().collect::<Vec<_>>(), ["migrated to 1.0", "migrated to 2.0", "migrated to 3.0"], "{logs:?}");

    // The record: what runs, per environment, as for any service.
    let services = common::get_json(&format!("{}/api/v1/services", server.url));
    assert_eq!(services[0]["version"], "2.0", "{services}");
}

/// The pid of the demo server (version `version`) on host `k`, if any.
fn demo_pid(fleet: &Fleet, k: usize, version: &str) -> Option<String> {
    let out = fleet.exec_on(k, &["ps", "-eo", "pid=,args="]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("slipway-demo serve") && l.contains(&format!("--version {version}")))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
}

#[test]
fn issue15_kill_9_in_the_middle_of_a_fleet_rollout_converges_to_the_recorded_version() {
    const N: usize = 4;
    let fleet = Fleet::up(N);
    fleet.enter();
    let (tarball, sha) = release();
    let http = tarball_server(tarball);
    let dir = common::config_dir(&config(&fleet, N, http, 1), &[]);
    let mut server = fleet.serve(dir.path());
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "production", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));
    let untouched = demo_pid(&fleet, N, "1.0").expect("1.0 runs on the last host");

    // 2.0 host by host; the node dies once the first host switched.
    let mut deploy = server
        .cli_command(dir.path(), &["deploy", "web", "2.0", "--env", "production", "--sha256", &sha])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = addrs(&fleet, N)[0];
    common::wait_for(Duration::from_secs(120), "the first host to serve 2.0", || (get(first).as_deref() == Ok("hello from demo 2.0")).then_some(()));
    server.kill9();
    let _ = deploy.kill();
    let _ = deploy.wait();

    // The next node finds 1.0 recorded (2.0 never finished): every host
    // converges to it; the last host's instance is kept, not replaced.
    let server = fleet.serve(dir.path());
    common::wait_for(Duration::from_secs(120), "every host back on 1.0", || {
        addrs(&fleet, N).into_iter().all(|a| get(a).as_deref() == Ok("hello from demo 1.0")).then_some(())
    });
    assert_eq!(demo_pid(&fleet, N, "1.0").as_deref(), Some(untouched.as_str()), "the untouched host's instance was replaced");
    let services = common::get_json(&format!("{}/api/v1/services", server.url));
    assert_eq!(services[0]["version"], "1.0", "{services}");
    // Each deployment's migration ran once, on one host.
    let logs: Vec<String> = (1..=N).filter_map(|k| std::fs::read_to_string(fleet.host_root(k).join("migrations.log")).ok()).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0].lines().collect::<Vec<_>>(), ["migrated to 1.0", "migrated to 2.0"]);
}

#[test]
fn issue15_a_drained_host_gets_no_deploys_and_takes_no_connections() {
    const N: usize = 3;
    let fleet = Fleet::up(N);
    fleet.enter();
    let (tarball, sha) = release();
    let http = tarball_server(tarball);
    let dir = common::config_dir(&config(&fleet, N, http, 1), &[]);
    let server = fleet.serve(dir.path());
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "production", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));

    let hosts = server.cli(dir.path(), &["--json", "hosts"]);
    assert!(hosts.status.success(), "{}", text(&hosts));
    let list: serde_json::Value = serde_json::from_slice(&hosts.stdout).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(N), "{list}");
    for h in list.as_array().unwrap() {
        assert_eq!(h["reachable"], true, "{h}");
        assert!(h["fingerprint"].as_str().is_some_and(|f| f.starts_with("SHA256:")), "{h}");
        assert_eq!(h["services"][0]["version"], "1.0", "{h}");
    }

    let h2 = fleet.host(2).address.clone();
    let out = server.cli(dir.path(), &["hosts", "drain", &h2]);
    assert!(out.status.success(), "{}", text(&out));
    let a2: SocketAddr = format!("{h2}:{LISTEN_PORT}").parse().unwrap();
    assert!(get(a2).is_err(), "a drained host still takes connections");
    let out = server.cli(dir.path(), &["deploy", "web", "2.0", "--env", "production", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(addrs(&fleet, N)[0]).as_deref(), Ok("hello from demo 2.0"));
    assert!(demo_pid(&fleet, 2, "2.0").is_none(), "the drained host was deployed to");

    let out = server.cli(dir.path(), &["hosts", "undrain", &h2]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(a2).as_deref(), Ok("hello from demo 1.0"), "back in service on what it ran");
    let audit = server.cli(dir.path(), &["audit"]);
    assert!(text(&audit).contains(&format!("drain host {h2}")), "{}", text(&audit));
}

/// Pid of the supervisor on host `k`, if one runs.
fn supervisor_pid(fleet: &Fleet, k: usize) -> Option<String> {
    let out = fleet.exec_on(k, &["ps", "-eo", "pid=,args="]);
    String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("agent ssh supervise")).and_then(|l| l.split_whitespace().next().map(str::to_string))
}

#[test]
fn issue15_a_killed_supervisor_is_started_again_by_the_node_and_a_dead_host_is_reported() {
    const N: usize = 2;
    let fleet = Fleet::up(N);
    fleet.enter();
    let (tarball, sha) = release();
    let http = tarball_server(tarball);
    let toml = config(&fleet, N, http, 1).replace("\ndir = ", "\ncheck_every = \"1s\"\ndir = ");
    assert!(toml.contains("check_every"), "{toml}");
    let dir = common::config_dir(&toml, &[]);
    let server = fleet.serve(dir.path());
    let out = server.cli(dir.path(), &["deploy", "web", "1.0", "--env", "production", "--sha256", &sha]);
    assert!(out.status.success(), "{}", text(&out));
    let instance = demo_pid(&fleet, 1, "1.0").expect("1.0 runs on host 1");
    let old = supervisor_pid(&fleet, 1).expect("a supervisor on host 1");

    // kill -9 of a host's supervisor: its address goes dark, and comes
    // back without anyone deploying: the node's check starts a new
    // supervisor, which adopts the instance that kept running.
    assert!(fleet.exec_on(1, &["kill", "-9", &old]).status.success());
    let a1 = addrs(&fleet, N)[0];
    common::wait_for(Duration::from_secs(60), "host 1's address to answer again", || {
        (supervisor_pid(&fleet, 1).is_some_and(|p| p != old) && get(a1).as_deref() == Ok("hello from demo 1.0")).then_some(())
    });
    assert_eq!(demo_pid(&fleet, 1, "1.0").as_deref(), Some(instance.as_str()), "the instance was adopted, not restarted");

    // A host cut off: `slipway hosts` says which and why, and exits 4 (in
    // JSON too); the node's log says it once.
    fleet.ctl(2, "link-down");
    let out = server.cli(dir.path(), &["hosts"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let h2 = fleet.host(2).address.clone();
    let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains(&h2)).map(str::to_string).unwrap_or_default();
    assert!(line.contains("down") && ["no answer", "timed out", "lost"].iter().any(|w| line.contains(w)), "host 2's line: {line:?}\n{}", text(&out));
    let out = server.cli(dir.path(), &["--json", "hosts"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    common::wait_for(Duration::from_secs(30), "the node's log to report host 2", || {
        server.log_text().lines().any(|l| l.contains("a host does not answer") && l.contains(&h2)).then_some(())
    });
    let once = server.log_text().lines().filter(|l| l.contains("a host does not answer") && l.contains(&h2)).count();
    std::thread::sleep(Duration::from_secs(3));
    let later = server.log_text().lines().filter(|l| l.contains("a host does not answer") && l.contains(&h2)).count();
    assert_eq!((once, later), (1, 1), "reported once, not at every check");
    fleet.ctl(2, "link-up");
    common::wait_for(Duration::from_secs(30), "the node's log to report host 2 back", || {
        server.log_text().lines().any(|l| l.contains("a host answers again") && l.contains(&h2)).then_some(())
    });
}
