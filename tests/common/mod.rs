//! Shared test support: stores (SQLite in a temp dir, and a fresh
//! PostgreSQL database per test when `SLIPWAY_TEST_POSTGRES` is set, as
//! `scripts/test.sh` does), the real binary, free ports, configs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway::store::{self, Store};

pub mod fleet;
pub mod moto;
pub mod pki;

/// A database of its own on the test PostgreSQL server, or `None` (with a
/// note) when there is none. With `SLIPWAY_REQUIRE_POSTGRES=1` a missing
/// server fails the test instead: CI must run these.
pub async fn postgres_url() -> Option<String> {
    let Ok(admin) = std::env::var("SLIPWAY_TEST_POSTGRES") else {
        if std::env::var("SLIPWAY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!("SLIPWAY_REQUIRE_POSTGRES=1 but SLIPWAY_TEST_POSTGRES is not set");
        }
        eprintln!("note: PostgreSQL part skipped: SLIPWAY_TEST_POSTGRES is not set (scripts/test.sh starts a server and sets it)");
        return None;
    };
    sqlx::any::install_default_drivers();
    let name = format!("slipway_t{}_{}", std::process::id(), rand::random::<u32>());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await.expect("connect to the test PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(admin.clone());
    Some(format!("{base}/{name}"))
}

pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("slipway.db").display())
}

/// Every store backend available here, each fresh: ("sqlite", …) always,
/// ("postgres", …) when a server is configured.
pub async fn stores(dir: &Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    let mut v: Vec<(&'static str, Arc<dyn Store>)> = vec![("sqlite", store::open(&sqlite_url(dir)).await.expect("open sqlite store"))];
    if let Some(url) = postgres_url().await {
        v.push(("postgres", store::open(&url).await.expect("open postgres store")));
    }
    v
}

pub fn slipway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slipway"))
}

/// The demo service's binary (`crates/slipway-demo`). It is a package of
/// its own, so `env!("CARGO_BIN_EXE_…")` cannot name it here and a test run
/// of this package alone does not build it: `SLIPWAY_DEMO_BIN` when set
/// (scripts/test.sh builds it once and sets it), else built here with
/// cargo, once per test process (cargo rebuilds it only when it changed).
pub fn demo_bin() -> &'static str {
    static DEMO: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DEMO.get_or_init(|| {
        if let Some(p) = std::env::var_os("SLIPWAY_DEMO_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "SLIPWAY_DEMO_BIN={} is not a file", p.display());
            return p.to_string_lossy().into_owned();
        }
        build_demo()
    })
}

/// `cargo build -p slipway-demo`, in the profile this test was built in
/// (`release` when `slipway` sits in a `release` directory), and the path
/// of the binary cargo reports.
fn build_demo() -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = Path::new(env!("CARGO_BIN_EXE_slipway")).parent().and_then(Path::file_name).is_some_and(|d| d == "release");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--quiet",
        "-p",
        "slipway-demo",
        "--bin",
        "slipway-demo",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo to build slipway-demo");
    assert!(out.status.success(), "cargo build -p slipway-demo failed ({})", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "slipway-demo")
        .find_map(|m| m["executable"].as_str().map(str::to_string))
        .expect("cargo named no slipway-demo executable")
}

/// A port for a test to listen on. Below the kernel's ephemeral range
/// (32768–60999 here): ports from `bind(:0)` — the instances Slipway
/// starts, outgoing connections — come from there, and a port picked there
/// and used a moment later was sometimes taken meanwhile by another test's
/// instance. Random, so parallel test processes rarely meet; never the same
/// twice in one process; checked free by binding it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A temp dir holding `slipway.toml` with `text`, plus executable scripts.
pub fn config_dir(text: &str, scripts: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("slipway.toml"), text).expect("write config");
    for (name, body) in scripts {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, body).expect("write script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

/// A running `slipway serve`, killed (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Start the real binary on a free port and wait until /healthz answers.
    pub fn start(config: &Path, store: Option<&str>, extra: &[&str]) -> Server {
        Server::start_with_env(config, store, extra, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(config: &Path, store: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_binary(&slipway_bin(), config, store, extra, env)
    }

    /// [`Server::start_with_env`] of another copy of the binary, `bin`.
    pub fn start_binary(bin: &Path, config: &Path, store: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(bin, config, store, extra, env, config, "")
    }

    /// [`Server::start`] with its log `serve-<name or port>.log` in
    /// `log_dir` (outside the config's directory, for a test that watches
    /// what lands there).
    pub fn start_logged(config: &Path, store: &str, extra: &[&str], log_dir: &Path, name: &str) -> Server {
        Server::spawn(&slipway_bin(), config, Some(store), extra, &[], log_dir, name)
    }

    fn spawn(bin: &Path, config: &Path, store: Option<&str>, extra: &[&str], env: &[(&str, &str)], log_dir: &Path, name: &str) -> Server {
        // A port from `free_port` is free when chosen, not when bound: a
        // test binary running beside this one may take it in between, and
        // then this server cannot listen. It is started again on another.
        for _ in 0..3 {
            let port = free_port();
            let log = log_dir.join(if name.is_empty() { format!("serve-{port}.log") } else { format!("serve-{name}.log") });
            let out = std::fs::File::create(&log).expect("log file");
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(config).arg("serve").arg("--listen").arg(format!("127.0.0.1:{port}"));
            if let Some(s) = store {
                cmd.arg("--store").arg(s);
            }
            // Only what the test says: none of the caller's own settings.
            cmd.args(extra)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup"))
                .stderr(out)
                .env_remove("SLIPWAY_STORE")
                .env_remove("SLIPWAY_CONFIG")
                .env_remove("SLIPWAY_SERVER");
            cmd.envs(env.iter().copied());
            let child = cmd.spawn().expect("spawn slipway serve");
            let mut s = Server { child, url: format!("http://127.0.0.1:{port}"), port, log };
            match s.listening(Duration::from_secs(30)) {
                Ok(()) => return s,
                Err(log) if log.contains("port is in use") => continue,
                Err(log) => panic!("slipway serve exited early:\n{log}"),
            }
        }
        panic!("slipway serve found its port taken three times");
    }

    /// Wait until this server says it listens on its port (its own words,
    /// not just any process's socket there) and the port answers; `Err`
    /// with its log if it exited first.
    fn listening(&mut self, timeout: Duration) -> Result<(), String> {
        let (log, port) = (self.log.clone(), self.port);
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        let said = format!("listening on http://127.0.0.1:{port}");
        let said_tls = format!("listening on https://127.0.0.1:{port}");
        wait_for_diag(timeout, "slipway serve to listen", log_text, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(Err(format!("({status})\n{}", log_text())));
            }
            let text = log_text();
            (text.contains(&said) || text.contains(&said_tls)).then(|| std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| Ok(()))).flatten()
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The CLI against this server, run to its end.
    pub fn cli(&self, config: &Path, args: &[&str]) -> std::process::Output {
        self.cli_command(config, args).output().expect("run slipway")
    }

    /// The CLI against this server, not started: for a test that reads
    /// its output while it runs.
    pub fn cli_command(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(slipway_bin());
        cmd.arg("--config").arg(config).arg("--server").arg(&self.url).args(args).stdin(Stdio::null());
        cmd
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id();
        self.kill9();
        // What it ran (service instances) would outlive it otherwise.
        kill_marked(pid);
    }
}

/// SIGKILL every process carrying the owner mark of Slipway process `pid`.
pub fn kill_marked(pid: u32) {
    let mark = format!("SLIPWAY_OWNER={pid}.");
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for entry in dir.flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{p}/environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv.starts_with(mark.as_bytes())) {
            let _ = Command::new("kill").arg("-9").arg(p.to_string()).status();
        }
    }
}

/// Processes carrying the owner mark of Slipway process `pid`.
pub fn marked(pid: u32) -> usize {
    let mark = format!("SLIPWAY_OWNER={pid}.");
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|p| std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv.starts_with(mark.as_bytes()))))
        .count()
}

/// Live processes (not zombies) whose environment holds `key=value`,
/// each as "pid N: its stat line"; with `kill`, SIGKILLed as found.
pub fn processes_with_env(key: &str, value: &str, kill: bool) -> Vec<String> {
    let want = format!("{key}={value}");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
                continue; // exited, not yet reaped
            }
            found.push(format!("pid {pid}: {}", stat.trim()));
            if kill {
                // SAFETY: a process of the test's own, found by its marks.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    found
}

/// Pids of processes whose arguments hold `args`, one after another.
pub fn processes_with_args(args: &[&str]) -> Vec<i32> {
    let want: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let have: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            have.windows(want.len().max(1)).any(|w| w == want.as_slice())
        })
        .collect()
}

/// Run `program` with `args`, `input` on its stdin, to its end (killed
/// after `within`).
pub fn run_with_stdin(program: impl AsRef<std::ffi::OsStr>, args: &[&str], input: &str, within: Duration) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the program");
    let _ = child.stdin.take().expect("stdin").write_all(input.as_bytes());
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("the program's output"),
        Err(_) => {
            // SAFETY: our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{args:?} did not end within {within:?}");
        }
    }
}

/// What a polled condition answers: done (with a value), or not yet, with
/// what it saw, for the message if the wait times out. `true`/`false`,
/// `Some`/`None`, and `Ok`/`Err(state)` all answer.
pub trait Check<T> {
    fn check(self) -> Result<T, String>;
}

impl Check<()> for bool {
    fn check(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Check<T> for Option<T> {
    fn check(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

impl<T, E: std::fmt::Display> Check<T> for Result<T, E> {
    fn check(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Poll intervals: short at first (most conditions hold within
/// milliseconds), then every 100 ms; never past the deadline.
fn next_pause(pause: &mut Duration, deadline: Instant) -> Duration {
    let p = (*pause).min(deadline.saturating_duration_since(Instant::now()));
    *pause = (*pause * 2).min(Duration::from_millis(100));
    p
}

/// The one way a test waits for something to happen: poll `f` until it
/// answers done, and return its value; after `within`, panic with `what`
/// and the last state `f` saw. For async tests; [`wait_for`] blocks.
pub async fn eventually<T, C, Fut>(within: Duration, what: &str, mut f: impl FnMut() -> Fut) -> T
where
    C: Check<T>,
    Fut: Future<Output = C>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        match f().await.check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("timed out after {within:?} waiting for {what}; last seen: {last}"),
            Err(_) => tokio::time::sleep(next_pause(&mut pause, deadline)).await,
        }
    }
}

/// [`eventually`] for blocking tests (the real binary, curl, std threads).
pub fn wait_for<T, C: Check<T>>(within: Duration, what: &str, mut f: impl FnMut() -> C) -> T {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        match f().check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("timed out after {within:?} waiting for {what}; last seen: {last}"),
            Err(_) => std::thread::sleep(next_pause(&mut pause, deadline)),
        }
    }
}

/// [`wait_for`], with `diag()` (a server's log, say) in the message if it
/// times out: computed only then, since it may read files.
pub fn wait_for_diag<T>(within: Duration, what: &str, diag: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    wait_for(within, what, || match f() {
        Some(v) => Ok(v),
        // wait_for's deadline is a moment after this one: its last poll
        // is past this one's, and brings the diagnosis.
        None if Instant::now() >= deadline => Err(format!("not yet\n{}", diag())),
        None => Err(String::new()),
    })
}

/// GET a JSON document from a server (blocking, for binary tests).
pub fn get_json(url: &str) -> serde_json::Value {
    let out = Command::new("curl").args(["-sS", "--max-time", "10", url]).output().expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("bad JSON from {url}: {e}: {} (curl: {}, {})", String::from_utf8_lossy(&out.stdout), out.status, String::from_utf8_lossy(&out.stderr).trim())
    })
}

/// What a GET of `url` answered, or why there was no answer: for a
/// test's diagnostics, which must never fail themselves (blocking).
pub fn get_text(url: &str) -> String {
    match Command::new("curl").args(["-sS", "--max-time", "10", url]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).to_string(),
        Ok(out) => format!("(no answer: curl {}, {})", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("(cannot run curl: {e})"),
    }
}

/// POST JSON, return (status, body).
pub fn post_json(url: &str, body: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "-H", "content-type: application/json", "-d", body, url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, a free
/// port), for tests that stop and start the store. `None` when Debian's
/// PostgreSQL binaries are not installed (scripts/test.sh installs them).
pub struct PgServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

impl PgServer {
    pub fn start() -> Option<PgServer> {
        let bin =
            std::fs::read_dir("/usr/lib/postgresql").ok()?.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).max()?;
        let dir = tempfile::tempdir().ok()?;
        let as_root = unsafe { libc_geteuid() } == 0;
        if as_root {
            Command::new("chown").arg("nobody").arg(dir.path()).status().ok()?;
        }
        let s = PgServer { dir, port: free_port(), bin };
        let ok = s.run(&[s.bin.join("initdb").to_str()?, "-D", s.data().to_str()?, "-U", "slipway", "--auth=trust"]);
        assert!(ok, "initdb failed");
        assert!(s.ctl("start"), "pg_ctl start failed");
        Some(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, argv: &[&str]) -> bool {
        let as_root = unsafe { libc_geteuid() } == 0;
        let mut cmd = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).args(argv);
            c
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
    }

    /// `pg_ctl start` or `stop` (immediate: as if the server crashed).
    pub fn ctl(&self, what: &str) -> bool {
        let data = self.data();
        let log = self.dir.path().join("log");
        let opts = format!("-h 127.0.0.1 -p {} -k {} -c fsync=off", self.port, self.dir.path().display());
        let ctl = self.bin.join("pg_ctl");
        match what {
            "start" => self.run(&[ctl.to_str().unwrap(), "-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "-o", &opts, "start"]),
            _ => self.run(&[ctl.to_str().unwrap(), "-D", data.to_str().unwrap(), "-m", "immediate", "-w", "-t", "30", "stop"]),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://slipway@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.ctl("stop");
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// HTTP load through the proxy from several keep-alive clients until
/// `stop`; returns (ok, failed, first failures).
pub fn load(port: u16, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<(u64, u64, Vec<String>)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (ok, failed, errors, stop) = (ok.clone(), failed.clone(), errors.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let client = slipway::http::builder().timeout(Duration::from_secs(10)).build().expect("client");
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let got = match client.get(format!("http://127.0.0.1:{port}/")).send().await {
                            Ok(r) => {
                                let status = r.status();
                                match r.text().await {
                                    Ok(body) if status.is_success() && body.starts_with("hello") => Ok(()),
                                    Ok(body) => Err(format!("status {status}: {body}")),
                                    Err(e) => Err(format!("status {status}, body: {e}")),
                                }
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        match got {
                            Ok(()) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(err) => {
                                failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let mut e = errors.lock().expect("lock");
                                if e.len() < 5 {
                                    e.push(err);
                                }
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let e = errors.lock().expect("lock").clone();
            (ok.load(std::sync::atomic::Ordering::SeqCst), failed.load(std::sync::atomic::Ordering::SeqCst), e)
        })
    })
}

/// The body of `GET path` on 127.0.0.1:`port` when it answers 200 within
/// 2 s (HTTP/1.0, no client library: for waits in blocking test code).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.trim().to_string()).or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.trim().to_string()))
}

/// The HTTP API as a test's client: calls with an optional bearer token,
/// and waiting for a deployment to reach a state.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        // Idle connections go before the server closes them (after 30 s).
        Api {
            base: base.to_string(),
            http: slipway::http::builder().timeout(Duration::from_secs(30)).pool_idle_timeout(Duration::from_secs(20)).build().expect("client"),
        }
    }

    /// (status, JSON body or null).
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let mut r = self.http.request(method.parse().expect("method"), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A new token's secret (`admin`: the token that may create it; none
    /// for the first).
    pub async fn token(&self, admin: Option<&str>, name: &str, roles: serde_json::Value) -> String {
        let (s, t) = self.call("POST", "/api/v1/tokens", admin, Some(serde_json::json!({"name": name, "roles": roles}))).await;
        assert_eq!(s, 201, "{t}");
        t["token"].as_str().expect("token").to_string()
    }

    /// POST an event; the deployment it created (or found again).
    pub async fn submit(&self, token: Option<&str>, body: serde_json::Value) -> i64 {
        let (s, a) = self.call("POST", "/api/v1/events", token, Some(body)).await;
        assert!(s == 202 || s == 200, "{a}");
        a["deployment_id"].as_i64().expect("deployment id")
    }

    /// The deployment (without its jobs).
    pub async fn deployment(&self, id: i64, token: Option<&str>) -> serde_json::Value {
        self.call("GET", &format!("/api/v1/deployments/{id}"), token, None).await.1["deployment"].clone()
    }

    /// The deployment once its state is one of `done` (within 60 s).
    pub async fn wait_state(&self, id: i64, token: Option<&str>, done: &[&str]) -> serde_json::Value {
        eventually(Duration::from_secs(60), &format!("deployment {id} to reach {done:?}"), || async {
            let d = self.deployment(id, token).await;
            if done.contains(&d["state"].as_str().unwrap_or("")) { Ok(d) } else { Err(d) }
        })
        .await
    }
}
