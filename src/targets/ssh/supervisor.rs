//! The service supervisor of an SSH host: `slipway agent ssh supervise`,
//! a daemon per (dir, installation), and its client, the one-shot agent
//! verb `service` the node runs over SSH (see `rollout.rs` for the node's
//! side of the protocol).
//!
//! Each service on the host gets its own [`ServiceManager`] (the node's
//! own rollout logic: health-gated start, switch, drain, rollback, restart
//! of dead instances) behind its own proxy on the service's `listen`
//! address, with its own SQLite store. Per service, so that draining one
//! (its manager goes, its proxy closes its listener, in-flight requests
//! finish) and undraining it (a new manager restores it and adopts the
//! instances that kept running) are the manager's own shutdown and
//! restore, and so that one service's restore never touches another's.
//!
//! Instances run under [`HostTarget`]: like the local target's, but not
//! tied to the supervisor's life. Output goes to a file, not a pipe, and a
//! marker file per instance names it (pid and start time, port, service,
//! version, spec digest), so a supervisor that was killed (kill -9, an
//! upgrade) leaves them serving and its successor adopts them.
//!
//! On the host, under `<dir>/supervisor/<installation>/`: `sock` (the
//! unix socket, 0600, in a 0700 directory), `lock` (held by the running
//! supervisor), `start.lock` (held by an agent starting one), `log`, `pid`,
//! and `services/<environment>/<service>/` with `service.json` (drained,
//! the working directory of each revision), `store.db` and `instances/`.
//!
//! Socket protocol: one JSON request line per connection; the answer is
//! JSON lines: `{"line"}` progress, then `{"result": {"outcome",
//! "reason"}}` or `{"status": {"services": […]}}`, or `{"error"}`;
//! `{"alive": true}` every few seconds while an operation runs (the agent
//! drops these). The agent relays all but `alive` to its stdout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::agent::{self, Input};
use crate::config::service::ServiceSpec;
use crate::service::{RolloutRequest, ServiceManager};
use crate::store::{Outcome, Store};
use crate::targets::{
    Adoptable, Instance, InstanceRequest, JobRequest, Lifeline, LocalTarget, OutputSink, RunResult, Target, TargetError, TargetErrorKind, Targets,
};

/// How long an agent waits for an older supervisor to hand its host over.
const HANDOFF_WITHIN: Duration = Duration::from_secs(30);
/// Connecting to the supervisor's socket.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);
/// An agent waits this long for another agent that is starting the
/// supervisor, and then for the supervisor it started to answer.
const START_LOCK_WITHIN: Duration = Duration::from_secs(30);
const START_WITHIN: Duration = Duration::from_secs(20);
/// While an operation runs, the supervisor says it is alive this often;
/// the agent gives up after `SILENCE` without a line.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
const SILENCE: Duration = Duration::from_secs(60);
/// Writing one line to a peer.
const WRITE_WITHIN: Duration = Duration::from_secs(10);
/// Longest request (a spec, with its secrets' names and env) and answer line.
const MAX_LINE: usize = 16 << 20;
/// Stopping a service's instances (each has its own stop grace; this
/// bounds the whole).
const STOP_WITHIN: Duration = Duration::from_secs(120);
/// After its proxy was told to stop: until the listen address refuses.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// Reading a service's store for `status`.
const STORE_WITHIN: Duration = Duration::from_secs(10);
/// Orphan instances: SIGTERM, then SIGKILL after this.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);
/// How often an instance's process is looked at in /proc.
const POLL: Duration = Duration::from_millis(200);
/// Output files (the supervisor's log, each instance's) are cut back to
/// their last [`LOG_KEEP`] bytes (kept in `*.1`) beyond this size.
const LOG_LIMIT: u64 = 16 << 20;
const LOG_KEEP: u64 = 256 << 10;
/// How often instance output files are looked at.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Where a supervisor keeps its things on the host.
#[derive(Debug, Clone)]
pub struct Paths {
    pub base: PathBuf,
}

impl Paths {
    pub fn new(dir: &str, installation: &str) -> Paths {
        Paths { base: Path::new(dir).join("supervisor").join(installation) }
    }
    pub fn sock(&self) -> PathBuf {
        self.base.join("sock")
    }
    fn lock(&self) -> PathBuf {
        self.base.join("lock")
    }
    fn start_lock(&self) -> PathBuf {
        self.base.join("start.lock")
    }
    pub fn log(&self) -> PathBuf {
        self.base.join("log")
    }
    /// `{"pid", "start_time", "exe"}` of the running supervisor.
    pub fn pid(&self) -> PathBuf {
        self.base.join("pid")
    }
    fn services(&self) -> PathBuf {
        self.base.join("services")
    }
    /// `{"drained": bool}`: the whole host is out of service.
    fn host(&self) -> PathBuf {
        self.base.join("host.json")
    }
    pub fn service(&self, environment: &str, service: &str) -> PathBuf {
        self.services().join(environment).join(service)
    }

    /// Whether any service is kept here (`services/<env>/<service>`).
    fn holds_services(&self) -> bool {
        let Ok(envs) = std::fs::read_dir(self.services()) else { return false };
        envs.flatten().any(|e| std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
    }

    /// The persisted whole-host drain ([`Paths::host`]).
    fn host_drained(&self) -> bool {
        std::fs::read(self.host())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["drained"].as_bool() == Some(true))
    }
}

/// A request as the node sends it (`rollout.rs`, `machines.rs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Request {
    pub dir: String,
    pub installation: String,
    pub op: String,
    #[serde(default)]
    pub environment: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub spec: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub deployment_id: Option<i64>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

fn result_line(outcome: Outcome, reason: Option<String>) -> serde_json::Value {
    json!({ "result": { "outcome": outcome.as_str(), "reason": reason } })
}

fn error_line(message: impl Into<String>) -> serde_json::Value {
    json!({ "error": message.into() })
}

// ---- the agent's `service` verb ----------------------------------------------

/// `slipway agent ssh service`: the request on stdin, relayed to the
/// supervisor (started first if none runs), its answer to stdout. Exit 0
/// when a result (or status) was relayed, 1 otherwise.
pub async fn service() -> u8 {
    let mut input = Input::start();
    let line = match input.line(agent::REQUEST_WITHIN).await {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return fail(&format!("bad request: {e}")),
    };
    if let Err(e) = agent::check_component("installation", &req.installation) {
        return fail(&e);
    }
    let paths = Paths::new(&req.dir, &req.installation);
    // A status check where no supervisor runs and none is needed (nothing
    // of this installation's was ever rolled out here, or it was all
    // stopped): answered here, so that checking a group that only runs
    // jobs starts no daemon on its hosts.
    if req.op == "status" && connect(&paths.sock()).await.is_none() && !paths.holds_services() {
        let status = json!({ "status": { "drained": paths.host_drained(), "supervisor": null, "services": [] } });
        return if agent::write_all_fd(1, format!("{status}\n").as_bytes()).is_ok() { 0 } else { 1 };
    }
    if req.op == "rollout" {
        hand_over_from_other_build(&paths, &req).await;
    }
    let stream = match connect_or_start(&paths, &req.dir, &req.installation).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    relay(stream, &line).await
}

/// A supervisor of another build of the same or an older version (the
/// node was upgraded) hands the host over before a rollout: asked, it
/// ends once no operation runs (its instances stay), and the supervisor
/// this agent then starts adopts them. Never to an older version: nodes
/// of two versions would pass the host back and forth. Busy, or anything
/// unexpected: the running supervisor stays and serves the rollout.
async fn hand_over_from_other_build(paths: &Paths, req: &Request) {
    let Ok(bytes) = std::fs::read(paths.pid()) else { return };
    let Ok(info) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return };
    let (Some(pid), Some(start)) = (info["pid"].as_i64().map(|p| p as i32), info["start_time"].as_u64()) else { return };
    let theirs_exe = info["exe"].as_str().unwrap_or_default().to_string();
    let mine_exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    if theirs_exe == mine_exe || mine_exe.is_empty() || !agent::is_running(pid, start) {
        return;
    }
    // A supervisor that wrote no version is older than any that does.
    let theirs = info["version"].as_str().and_then(|v| semver::Version::parse(v).ok()).unwrap_or(semver::Version::new(0, 0, 0));
    let Ok(mine) = semver::Version::parse(env!("CARGO_PKG_VERSION")) else { return };
    if mine < theirs {
        return;
    }
    let Some(stream) = connect(&paths.sock()).await else { return };
    let ask = Request { dir: req.dir.clone(), installation: req.installation.clone(), op: "handoff".into(), ..Request::default() };
    let Ok(mut line) = serde_json::to_vec(&ask) else { return };
    line.push(b'\n');
    let (read, mut write) = stream.into_split();
    if !matches!(tokio::time::timeout(WRITE_WITHIN, write.write_all(&line)).await, Ok(Ok(()))) {
        return;
    }
    // Its answer; or the end of the connection, when it exited first.
    let mut lines = BufReader::new(read);
    let deadline = Instant::now() + HANDOFF_WITHIN;
    loop {
        let mut buf = Vec::new();
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), read_line(&mut lines, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) else { continue };
                match v["result"]["outcome"].as_str() {
                    Some("succeeded") => break,
                    Some(_) => return, // busy: it stays
                    // Already handing over (another agent asked): wait for it too.
                    None if v["error"].as_str().is_some_and(|e| e.contains("handing the host over")) => break,
                    None if v.get("error").is_some() => return, // a build that knows no handoff
                    None => continue,
                }
            }
            Ok(Ok(_)) => break,
            _ => return,
        }
    }
    while agent::is_running(pid, start) {
        if Instant::now() >= deadline {
            return; // connect_or_start finds it still answering: it serves
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let said = json!({ "line": format!("[supervisor] {theirs} ({theirs_exe}) handed the host over to {mine} ({mine_exe}); its instances are adopted") });
    let _ = agent::write_all_fd(1, format!("{said}\n").as_bytes());
}

fn fail(message: &str) -> u8 {
    agent::reply_error(message);
    1
}

async fn connect(sock: &Path) -> Option<UnixStream> {
    tokio::time::timeout(CONNECT_WITHIN, UnixStream::connect(sock)).await.ok()?.ok()
}

/// Create `path` (and parents) with mode 0700: what is under it is the
/// installation's alone.
fn private_dir(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| format!("cannot create {}: {}", path.display(), agent::os_message(&e)))
}

/// An exclusive flock on `path`, tried every 50 ms until `within`.
async fn lock_file(path: &Path, within: Duration) -> Result<Option<std::fs::File>, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open {}: {}", path.display(), agent::os_message(&e)))?;
    let deadline = Instant::now() + within;
    loop {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own; non-blocking.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` bytes of a file, as text (for error messages).
fn tail(path: &Path, n: u64) -> String {
    String::from_utf8_lossy(&tail_bytes(path, n)).trim().to_string()
}

/// The whole lines among the last `n` bytes of `path`. Unless they begin
/// a line (the byte before them is a line break, or they begin a file
/// never cut back by [`cap_log`], which may cut inside a line), what
/// precedes their first line break is the end of a line begun before
/// them, and goes. Masking sees only whole lines: a secret cut by the
/// start would be kept in part, unmasked.
fn tail_lines(path: &Path, n: u64) -> String {
    // One byte more: the one before the last `n`.
    let (bytes, len) = tail_bytes_of(path, n.saturating_add(1));
    let (before, body) = if len > n { (bytes.first().copied(), bytes.get(1..).unwrap_or_default()) } else { (None, &bytes[..]) };
    let starts_a_line = match before {
        Some(b) => b == b'\n',
        None => !std::path::Path::new(&old_log(path)).exists(),
    };
    let lines = if starts_a_line {
        body
    } else {
        match body.iter().position(|&b| b == b'\n') {
            Some(i) => &body[i + 1..],
            None => &[],
        }
    };
    String::from_utf8_lossy(lines).into_owned()
}

fn tail_bytes(path: &Path, n: u64) -> Vec<u8> {
    tail_bytes_of(path, n).0
}

/// The last `n` bytes of `path`, and its length when they were read.
fn tail_bytes_of(path: &Path, n: u64) -> (Vec<u8>, u64) {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), 0) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut buf = Vec::new();
    let _ = f.take(n).read_to_end(&mut buf);
    (buf, len)
}

/// Where [`cap_log`] keeps the end of `path` it cut off.
fn old_log(path: &Path) -> std::ffi::OsString {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    old
}

/// A connection to the supervisor of (dir, installation), started if none
/// answers: one agent at a time starts it (`start.lock`), and the daemon
/// itself refuses to run twice (`lock`).
pub async fn connect_or_start(paths: &Paths, dir: &str, installation: &str) -> Result<UnixStream, String> {
    let sock = paths.sock();
    // sun_path holds 108 bytes with its NUL.
    if sock.as_os_str().len() > 107 {
        return Err(format!("the supervisor's socket path {} is too long for a unix socket: use a shorter dir", sock.display()));
    }
    if let Some(s) = connect(&sock).await {
        return Ok(s);
    }
    private_dir(&paths.base)?;
    let Some(_starting) = lock_file(&paths.start_lock(), START_LOCK_WITHIN).await? else {
        return Err(format!("another agent has been starting the supervisor for {}; it does not answer", humantime::format_duration(START_LOCK_WITHIN)));
    };
    if let Some(s) = connect(&sock).await {
        return Ok(s); // started by the agent that held the lock
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this agent's binary: {e}"))?;
    cap_log(&paths.log());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(paths.log())
        .map_err(|e| format!("cannot open {}: {}", paths.log().display(), agent::os_message(&e)))?;
    let err = log.try_clone().map_err(|e| format!("cannot open {}: {}", paths.log().display(), agent::os_message(&e)))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["agent", "ssh", "supervise", "--dir", dir, "--installation", installation])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child.
    // Its own session: apart from the SSH session that started it, which
    // may end any moment.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the supervisor {}: {}", exe.display(), agent::os_message(&e)))?;
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(s) = connect(&sock).await {
            // Not waited for: it outlives this agent (init reaps it).
            drop(child);
            return Ok(s);
        }
        match child.try_wait() {
            // Exit 0: another supervisor still holds the lock (one ending
            // after a handoff): start ours again once it may be gone.
            Ok(Some(status)) if status.success() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                child = cmd.spawn().map_err(|e| format!("cannot start the supervisor {}: {}", exe.display(), agent::os_message(&e)))?;
            }
            Ok(Some(status)) => return Err(format!("the supervisor exited at once ({status}): {}", tail(&paths.log(), 2000))),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the supervisor did not answer on {} within {}: {}",
                sock.display(),
                humantime::format_duration(START_WITHIN),
                tail(&paths.log(), 2000)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file written in append mode (by a process that keeps writing) cut
/// back when it grew beyond [`LOG_LIMIT`]: its last bytes to `<file>.1`,
/// then truncated (appends go on at its new end).
fn cap_log(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let _ = std::fs::write(old_log(path), tail_bytes(path, LOG_KEEP));
        let _ = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0));
    }
}

/// Send the request, copy the answer's lines to stdout.
async fn relay(stream: UnixStream, line: &[u8]) -> u8 {
    let (read, mut write) = stream.into_split();
    let mut request = line.to_vec();
    if request.last() != Some(&b'\n') {
        request.push(b'\n');
    }
    match tokio::time::timeout(WRITE_WITHIN, write.write_all(&request)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return fail(&format!("cannot send the request to the supervisor: {e}")),
        Err(_) => return fail("the supervisor does not take the request"),
    }
    let mut lines = BufReader::new(read);
    let mut finished = false;
    let mut failed = false;
    loop {
        let mut buf = Vec::new();
        let n = match tokio::time::timeout(SILENCE, read_line(&mut lines, &mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return fail(&format!("reading the supervisor's answer: {e}")),
            Err(_) => return fail(&format!("the supervisor said nothing for {}", humantime::format_duration(SILENCE))),
        };
        if n == 0 {
            break;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) else { continue };
        if v.get("alive").is_some() {
            continue;
        }
        finished |= v.get("result").is_some() || v.get("status").is_some();
        failed |= v.get("error").is_some();
        if buf.last() != Some(&b'\n') {
            buf.push(b'\n');
        }
        // The node is gone: nothing to relay to (the supervisor finishes
        // the operation anyway).
        if agent::write_all_fd(1, &buf).is_err() {
            return 1;
        }
    }
    match (finished, failed) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => fail("the supervisor closed the connection without an answer"),
    }
}

/// One line (with its newline) into `buf`, at most [`MAX_LINE`] bytes;
/// 0 at the end.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt as _;
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', buf).await?;
    if n > MAX_LINE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a line longer than {MAX_LINE} bytes")));
    }
    Ok(n)
}

// ---- the daemon ----------------------------------------------------------------

/// `slipway agent ssh supervise --dir DIR --installation ID`.
pub async fn supervise(args: &[String]) -> Result<u8, String> {
    let mut dir = None;
    let mut installation = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().cloned(),
            "--installation" => installation = it.next().cloned(),
            other => return Err(format!("supervise: unexpected argument {other:?} (usage: supervise --dir DIR --installation ID)")),
        }
    }
    let (Some(dir), Some(installation)) = (dir, installation) else {
        return Err("usage: slipway agent ssh supervise --dir DIR --installation ID".into());
    };
    agent::check_component("installation", &installation)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
    let paths = Paths::new(&dir, &installation);
    private_dir(&paths.base)?;
    // Held for the whole life of this process (released by the kernel
    // however it ends): one supervisor per (dir, installation).
    let Some(_lock) = lock_file(&paths.lock(), Duration::ZERO).await? else {
        tracing::info!("another supervisor runs for {}; this one exits", paths.base.display());
        return Ok(0);
    };
    let me = std::process::id() as i32;
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    let pid = json!({ "pid": me, "start_time": agent::start_time(me).unwrap_or(0), "exe": exe, "version": env!("CARGO_PKG_VERSION") });
    agent::write_atomic(&paths.pid(), pid.to_string().as_bytes()).map_err(|e| format!("cannot write {}: {e}", paths.pid().display()))?;
    let sock = paths.sock();
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| format!("cannot listen on {}: {}", sock.display(), agent::os_message(&e)))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("cannot restrict {}: {e}", sock.display()))?;
    tracing::info!(pid = me, exe, "supervisor of {} started", paths.base.display());

    let drained = paths.host_drained();
    let sup = Arc::new(Supervisor {
        paths: paths.clone(),
        installation,
        shutdown: CancellationToken::new(),
        handoff: CancellationToken::new(),
        handing_off: AtomicBool::new(false),
        services: Default::default(),
        drained: AtomicBool::new(drained),
    });
    sup.load().await;

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    // Started with setsid there is no terminal to hang up; a stray HUP
    // must not end the host's services' supervision.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut logs = tokio::time::interval(LOG_CHECK_EVERY);
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    let sup = sup.clone();
                    tokio::spawn(async move { sup.connection(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = sup.handoff.cancelled() => break,
            _ = hup.recv() => tracing::info!("SIGHUP ignored"),
            _ = logs.tick() => {
                // Instances write their output to files that nothing else
                // bounds; the supervisor's own log too.
                cap_log(&paths.log());
                for svc in sup.all().await {
                    for (_, m) in read_markers(&svc.instances_dir()) {
                        cap_log(&svc.instances_dir().join(format!("{}.log", m.pid)));
                    }
                }
            }
        }
    }
    // The proxies stop (their listeners close, in-flight requests
    // finish); the instances keep running for the next supervisor to
    // adopt, so a restart of the supervisor (an upgrade) does not restart
    // the services.
    tracing::info!("stopping: proxies close, instances stay for the next supervisor");
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    let listens = sup.listens().await;
    sup.shutdown.cancel();
    wait_closed(&listens).await;
    Ok(0)
}

/// Wait (bounded) until nothing accepts on any of `addrs` any more.
async fn wait_closed(addrs: &[SocketAddr]) {
    let deadline = Instant::now() + CLOSE_WITHIN;
    for a in addrs {
        let probe = if a.ip().is_unspecified() { SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())) } else { *a };
        while Instant::now() < deadline && tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(probe)).await.is_ok_and(|r| r.is_ok())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a service keeps beside its store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    environment: String,
    service: String,
    #[serde(default)]
    drained: bool,
    /// Revision → where it is on this host (the store records the
    /// revision; a restore needs the directory).
    #[serde(default)]
    workdirs: BTreeMap<String, String>,
}

struct Running {
    manager: Arc<ServiceManager>,
    /// Its proxy, its supervision: cancelled, both stop (instances stay).
    shutdown: CancellationToken,
}

struct Svc {
    environment: String,
    name: String,
    dir: PathBuf,
    store: Arc<dyn Store>,
    meta: std::sync::Mutex<Meta>,
    /// Held for each operation on the service; holds its running manager
    /// (None: drained, or not started yet).
    op: Arc<tokio::sync::Mutex<Option<Running>>>,
    /// Stopped and removed: whoever waited for `op` looks it up again.
    gone: AtomicBool,
}

impl Svc {
    fn meta(&self) -> Meta {
        self.meta.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Meta)) -> Result<(), String> {
        let meta = {
            let mut m = self.meta.lock().map_err(|_| "the service's state is poisoned".to_string())?;
            f(&mut m);
            m.clone()
        };
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
        let path = self.dir.join("service.json");
        agent::write_atomic(&path, &bytes).map_err(|e| format!("cannot write {}: {}", path.display(), agent::os_message(&e)))
    }

    async fn row(&self) -> Result<Option<crate::store::ServiceRow>, String> {
        let rows = tokio::time::timeout(STORE_WITHIN, self.store.services())
            .await
            .map_err(|_| "the service's store did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(rows.into_iter().find(|r| r.environment == self.environment && r.service == self.name))
    }

    fn instances_dir(&self) -> PathBuf {
        self.dir.join("instances")
    }
}

struct Supervisor {
    paths: Paths,
    installation: String,
    shutdown: CancellationToken,
    /// Cancelled by a `handoff`: the daemon ends as on SIGTERM (proxies
    /// close, instances stay) for a newer build to take over.
    handoff: CancellationToken,
    handing_off: AtomicBool,
    services: tokio::sync::Mutex<HashMap<(String, String), Arc<Svc>>>,
    /// The whole host drained (`drain` of every service in every
    /// environment, a server being replaced): no rollout starts here.
    drained: AtomicBool,
}

impl Supervisor {
    /// Every service recorded on this host, restored unless drained
    /// (each in a task of its own: the socket answers meanwhile).
    async fn load(self: &Arc<Self>) {
        let Ok(envs) = std::fs::read_dir(self.paths.services()) else { return };
        for env in envs.flatten() {
            let Ok(services) = std::fs::read_dir(env.path()) else { continue };
            for s in services.flatten() {
                let (Some(environment), Some(name)) = (env.file_name().to_str().map(str::to_string), s.file_name().to_str().map(str::to_string)) else {
                    continue;
                };
                if !s.path().join("service.json").is_file() {
                    continue;
                }
                let svc = match self.svc(&environment, &name, false).await {
                    Ok(Some(svc)) => svc,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(env = environment, service = name, error = %e, "cannot load the service");
                        continue;
                    }
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let mut op = svc.op.clone().lock_owned().await;
                    if op.is_none() && !svc.meta().drained {
                        *op = Some(me.start(&svc).await);
                    }
                });
            }
        }
    }

    /// The service's entry; created (directory, store) when `create`.
    async fn svc(&self, environment: &str, name: &str, create: bool) -> Result<Option<Arc<Svc>>, String> {
        agent::check_component("environment", environment)?;
        agent::check_component("service", name)?;
        let key = (environment.to_string(), name.to_string());
        let mut services = self.services.lock().await;
        if let Some(s) = services.get(&key) {
            return Ok(Some(s.clone()));
        }
        let dir = self.paths.service(environment, name);
        let meta_path = dir.join("service.json");
        let meta = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice::<Meta>(&b).map_err(|e| format!("{}: {e}", meta_path.display()))?,
            Err(_) if create => Meta { environment: environment.into(), service: name.into(), ..Meta::default() },
            Err(_) => return Ok(None),
        };
        private_dir(&dir)?;
        let url = format!("sqlite://{}", dir.join("store.db").display());
        let store = crate::store::open(&url).await.map_err(|e| format!("cannot open the service's store: {e}"))?;
        let svc = Arc::new(Svc {
            environment: environment.into(),
            name: name.into(),
            dir,
            store,
            meta: std::sync::Mutex::new(meta),
            op: Default::default(),
            gone: AtomicBool::new(false),
        });
        if create {
            svc.update(|_| {})?;
        }
        services.insert(key, svc.clone());
        Ok(Some(svc))
    }

    /// A manager for the service, with what its store records restored
    /// (running instances adopted).
    async fn start(&self, svc: &Svc) -> Running {
        let shutdown = self.shutdown.child_token();
        let target = Arc::new(HostTarget::new(svc.instances_dir(), &self.installation));
        let targets = Arc::new(Targets::only(crate::targets::DEFAULT, target));
        let manager = ServiceManager::with_targets(targets, svc.store.clone(), shutdown.clone());
        let workdirs = svc.meta().workdirs;
        manager
            .restore(|revision| {
                let found = workdirs.get(&revision).map(PathBuf::from);
                async move { found.ok_or_else(|| format!("no directory of revision {revision} is recorded on this host")) }
            })
            .await;
        Running { manager, shutdown }
    }

    async fn all(&self) -> Vec<Arc<Svc>> {
        let mut v: Vec<Arc<Svc>> = self.services.lock().await.values().cloned().collect();
        v.sort_by(|a, b| (&a.environment, &a.name).cmp(&(&b.environment, &b.name)));
        v
    }

    /// The listen addresses of the services recorded here.
    async fn listens(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for svc in self.all().await {
            if let Ok(Some(row)) = svc.row().await
                && let Ok(spec) = crate::store::spec::decode_service(&row.spec)
            {
                out.push(spec.listen);
            }
        }
        out
    }

    /// One connection: its request is served in a task of its own, which
    /// runs to its end even if the connection goes (a rollout must not
    /// stop half-way because the node's SSH connection died).
    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        let req = match tokio::time::timeout(agent::REQUEST_WITHIN, read_line(&mut reader, &mut line)).await {
            Ok(Ok(n)) if n > 0 => serde_json::from_slice::<Request>(&line).map_err(|e| format!("bad request: {e}")),
            Ok(Ok(_)) => return,
            Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
            Err(_) => Err("no request within the time allowed".into()),
        };
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(256);
        match req {
            Ok(req) => {
                let me = self.clone();
                tokio::spawn(async move {
                    let last = me.serve(req, &tx).await;
                    let _ = tx.send(last).await;
                });
            }
            Err(e) => {
                let _ = tx.send(error_line(e)).await;
                drop(tx);
            }
        }
        let mut alive = tokio::time::interval(ALIVE_EVERY);
        alive.tick().await;
        loop {
            let v = tokio::select! {
                v = rx.recv() => match v { Some(v) => v, None => break },
                _ = alive.tick() => json!({ "alive": true }),
            };
            let mut bytes = serde_json::to_vec(&v).unwrap_or_default();
            bytes.push(b'\n');
            // A peer that is gone or stuck: stop writing to it (the
            // operation goes on; its sends to a closed channel fail).
            if !matches!(tokio::time::timeout(WRITE_WITHIN, write.write_all(&bytes)).await, Ok(Ok(()))) {
                break;
            }
        }
    }

    /// Serve one request; its last line (result, status or error). Lines
    /// before it go to `tx`.
    async fn serve(self: &Arc<Self>, req: Request, tx: &mpsc::Sender<serde_json::Value>) -> serde_json::Value {
        if req.installation != self.installation || Paths::new(&req.dir, &req.installation).base != self.paths.base {
            return error_line(format!("this supervisor serves {}, not {}/{}", self.paths.base.display(), req.dir, req.installation));
        }
        // Between a handoff's answer and the end: nothing new starts here.
        if self.handing_off.load(Ordering::SeqCst) && req.op != "status" && req.op != "handoff" {
            return error_line("this supervisor is handing the host over to another build: ask again in a moment");
        }
        let r = match req.op.as_str() {
            "status" => Ok(self.status().await),
            "rollout" => self.rollout(&req, tx).await,
            "stop" => self.stop(&req).await,
            "drain" => self.drain(&req, true).await,
            "undrain" => self.drain(&req, false).await,
            "handoff" => self.hand_off().await,
            other => Err(format!("unknown op {other:?} (rollout, status, stop, drain, undrain, handoff)")),
        };
        r.unwrap_or_else(error_line)
    }

    /// The service's entry with its operation lock held; re-looked-up if it
    /// was stopped and removed while this waited.
    async fn locked(&self, environment: &str, name: &str, create: bool) -> Result<Option<(Arc<Svc>, tokio::sync::OwnedMutexGuard<Option<Running>>)>, String> {
        for _ in 0..3 {
            let Some(svc) = self.svc(environment, name, create).await? else { return Ok(None) };
            let guard = svc.op.clone().lock_owned().await;
            if !svc.gone.load(Ordering::SeqCst) {
                return Ok(Some((svc, guard)));
            }
        }
        Err("the service was stopped and started again meanwhile; ask again".into())
    }

    async fn rollout(&self, req: &Request, tx: &mpsc::Sender<serde_json::Value>) -> Result<serde_json::Value, String> {
        let need = |what: &str, v: &Option<String>| v.clone().ok_or_else(|| format!("a rollout needs {what}"));
        let spec: ServiceSpec = crate::store::spec::decode_service(&need("spec", &req.spec)?)?;
        if spec.name != req.service {
            return Err(format!("the spec is of service {:?}, the request names {:?}", spec.name, req.service));
        }
        let version = need("version", &req.version)?;
        let revision = need("revision", &req.revision)?;
        let workdir = need("workdir", &req.workdir)?;
        if !Path::new(&workdir).is_dir() {
            return Err(format!("the working directory {workdir} is not on this host"));
        }
        if spec.artifact.is_some() {
            // A release the node shipped unpacked: marked complete as the
            // node marks its own unpacked releases, which is what the
            // manager's restore looks for (after a supervisor restart).
            let complete = Path::new(&workdir).join(".complete");
            if !complete.exists() {
                std::fs::write(&complete, b"").map_err(|e| format!("cannot write {}: {}", complete.display(), agent::os_message(&e)))?;
            }
        }
        let Some((svc, mut op)) = self.locked(&req.environment, &req.service, true).await? else {
            return Err("the service cannot be created".into());
        };
        if svc.meta().drained || self.drained.load(Ordering::SeqCst) {
            return Ok(result_line(Outcome::Skipped, Some("drained on this host: undrain it first".into())));
        }
        // Known before the rollout can commit: a supervisor killed right
        // after the commit restores this revision from this directory.
        svc.update(|m| {
            m.workdirs.insert(revision.clone(), workdir.clone());
        })?;
        if op.is_none() {
            *op = Some(self.start(&svc).await);
        }
        let Some(running) = op.as_ref() else { return Err("the service's manager did not start".into()) };
        // The service's secrets are read here, on the host, and may exist
        // only here: the node cannot mask what it cannot read, so what
        // leaves the host (an instance's last output in a health failure,
        // a verify step's output, the reason) is masked before it goes.
        let mask = Arc::new(crate::config::secret::Redactor::of(spec.secret_refs()));
        let rollout = RolloutRequest {
            sha256: req.sha256.clone(),
            environment: req.environment.clone(),
            deployment_id: req.deployment_id.unwrap_or(0),
            revision: revision.clone(),
            version,
            spec,
            workdir: PathBuf::from(&workdir),
        };
        let (out, mut lines): (OutputSink, _) = mpsc::channel(256);
        let relay_tx = tx.clone();
        let relay_mask = mask.clone();
        let forward = tokio::spawn(async move {
            // Consumed to the end even when nobody reads any more.
            let mut pieces = relay_mask.pieces();
            while let Some(l) = lines.recv().await {
                if let Some(line) = pieces.piece((l.stream, l.part), l.text, l.cut) {
                    let _ = relay_tx.send(json!({ "line": line })).await;
                }
            }
            for (_, line) in pieces.finish() {
                let _ = relay_tx.send(json!({ "line": line })).await;
            }
        });
        let mut result = running.manager.rollout(rollout, out, self.shutdown.child_token()).await;
        result.reason = result.reason.map(|r| mask.redact(&r));
        let _ = tokio::time::timeout(Duration::from_secs(5), forward).await;
        // Only what runs now needs its directory remembered.
        if let Ok(Some(row)) = svc.row().await {
            let keep = row.revision;
            let _ = svc.update(|m| m.workdirs.retain(|r, _| *r == keep || *r == revision));
        }
        drop(op);
        Ok(result_line(result.outcome, result.reason))
    }

    async fn status(&self) -> serde_json::Value {
        let mut services = Vec::new();
        for svc in self.all().await {
            let meta = svc.meta();
            let row = match svc.row().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(env = svc.environment, service = svc.name, error = %e, "cannot read the service's store");
                    None
                }
            };
            let drained = meta.drained || self.drained.load(Ordering::SeqCst);
            if row.is_none() && !drained {
                continue; // nothing runs (a first rollout that failed)
            }
            let live: Vec<InstanceMarker> = read_markers(&svc.instances_dir()).into_iter().map(|(_, m)| m).filter(|m| agent::is_running(m.pid, m.start_time)).collect();
            let version = row.as_ref().map(|r| r.version.clone());
            let current: Vec<&InstanceMarker> = live.iter().filter(|m| Some(&m.version) == version.as_ref()).collect();
            // Healthy here: of the recorded version, and accepting connections.
            let accepting = futures_util::future::join_all(current.iter().map(|m| async move {
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, m.port))).await.is_ok_and(|r| r.is_ok())
            }))
            .await;
            let listen = row.as_ref().and_then(|r| crate::store::spec::decode_service(&r.spec).ok()).map(|s| s.listen.to_string());
            services.push(json!({
                "environment": svc.environment,
                "service": svc.name,
                "version": version,
                "spec": row.as_ref().map(|r| r.spec.clone()),
                "workdir": row.as_ref().and_then(|r| meta.workdirs.get(&r.revision).cloned().or_else(|| r.artifact_dir.clone())),
                "deployment_id": row.as_ref().map(|r| r.deployment_id),
                "revision": row.as_ref().map(|r| r.revision.clone()),
                "sha256": row.as_ref().and_then(|r| r.sha256.clone()),
                "instances": live.len(),
                "healthy": accepting.iter().filter(|ok| **ok).count(),
                "drained": drained,
                "listen": listen,
                "pids": live.iter().map(|m| m.pid).collect::<Vec<_>>(),
            }));
        }
        // Which supervisor answers: a node upgraded since it started one
        // talks to an older build until that one is restarted.
        let me = std::process::id() as i32;
        let supervisor = json!({
            "pid": me,
            "version": env!("CARGO_PKG_VERSION"),
            "exe": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
        });
        json!({ "status": { "drained": self.drained.load(Ordering::SeqCst), "supervisor": supervisor, "services": services } })
    }

    /// Make way for another build: only while no operation runs on any
    /// service (else "busy", and this one goes on), then the daemon ends
    /// as on SIGTERM, leaving its instances to the next supervisor.
    async fn hand_off(&self) -> Result<serde_json::Value, String> {
        for svc in self.all().await {
            if svc.op.try_lock().is_err() {
                return Ok(result_line(Outcome::Skipped, Some(format!("busy: {}/{} has an operation in flight", svc.environment, svc.name))));
            }
        }
        if self.handing_off.swap(true, Ordering::SeqCst) {
            return Ok(result_line(Outcome::Succeeded, Some("already handing over".into())));
        }
        tracing::info!("handing off to another build");
        // Ended a moment later: the answer reaches the agent first, and
        // the proxies serve until then.
        let handoff = self.handoff.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            handoff.cancel();
        });
        Ok(result_line(Outcome::Succeeded, None))
    }

    async fn stop(&self, req: &Request) -> Result<serde_json::Value, String> {
        let Some((svc, mut op)) = self.locked(&req.environment, &req.service, false).await? else {
            return Ok(result_line(Outcome::Succeeded, Some("it does not run on this host".into())));
        };
        if let Some(running) = op.take() {
            // Its tasks (the restart loop among them) end before its
            // instances are stopped, as at a node's shutdown.
            running.shutdown.cancel();
            if tokio::time::timeout(STOP_WITHIN, running.manager.stop_all_services()).await.is_err() {
                tracing::warn!(env = svc.environment, service = svc.name, "stopping the instances took too long; ending what is left");
            }
        }
        // Whatever still runs of it (started before a drain, orphans).
        let left: Vec<(i32, u64)> = read_markers(&svc.instances_dir()).into_iter().map(|(_, m)| (m.pid, m.start_time)).collect();
        if !agent::end_groups(&left, ORPHAN_GRACE, Instant::now() + ORPHAN_GRACE + Duration::from_secs(5)).await {
            return Ok(result_line(Outcome::Failed, Some("some of its processes did not end after SIGKILL".into())));
        }
        svc.gone.store(true, Ordering::SeqCst);
        self.services.lock().await.remove(&(svc.environment.clone(), svc.name.clone()));
        if let Err(e) = std::fs::remove_dir_all(&svc.dir) {
            tracing::warn!(dir = %svc.dir.display(), error = %e, "cannot remove a stopped service's directory");
        }
        drop(op);
        Ok(result_line(Outcome::Succeeded, None))
    }

    /// Drain (or undrain) one service, or every service with `*` (in
    /// every environment when the environment is `*` or empty: then the
    /// whole host, persisted, so no rollout starts here either).
    async fn drain(&self, req: &Request, drain: bool) -> Result<serde_json::Value, String> {
        let every_env = req.environment.is_empty() || req.environment == "*";
        let targets: Vec<(String, String)> = if req.service == "*" {
            if every_env {
                let bytes = json!({ "drained": drain }).to_string();
                agent::write_atomic(&self.paths.host(), bytes.as_bytes()).map_err(|e| format!("cannot write {}: {e}", self.paths.host().display()))?;
                self.drained.store(drain, Ordering::SeqCst);
            }
            self.all().await.into_iter().filter(|s| every_env || s.environment == req.environment).map(|s| (s.environment.clone(), s.name.clone())).collect()
        } else {
            vec![(req.environment.clone(), req.service.clone())]
        };
        let mut failures = Vec::new();
        let mut notes = Vec::new();
        for (env, name) in targets {
            let r = if drain { self.drain_one(&env, &name).await } else { self.undrain_one(&env, &name).await };
            match r {
                Ok(note) => notes.push(note),
                Err(e) => failures.push(format!("{env}/{name}: {e}")),
            }
        }
        Ok(if failures.is_empty() {
            result_line(Outcome::Succeeded, (!notes.is_empty()).then(|| notes.join("; ")))
        } else {
            result_line(Outcome::Failed, Some(failures.join("; ")))
        })
    }

    async fn drain_one(&self, environment: &str, name: &str) -> Result<String, String> {
        let Some((svc, mut op)) = self.locked(environment, name, false).await? else {
            return Err("it does not run on this host".into());
        };
        // Persisted first: a restart in between keeps it drained.
        svc.update(|m| m.drained = true)?;
        let listen = svc.row().await.ok().flatten().and_then(|r| crate::store::spec::decode_service(&r.spec).ok()).map(|s| s.listen);
        if let Some(running) = op.take() {
            // The proxy closes its listener; requests in flight finish. The
            // instances keep running, unsupervised, for the undrain.
            running.shutdown.cancel();
            wait_closed(&listen.into_iter().collect::<Vec<_>>()).await;
        }
        Ok(format!("{environment}/{name} drained{}", listen.map(|l| format!(": {l} takes no connections")).unwrap_or_default()))
    }

    async fn undrain_one(&self, environment: &str, name: &str) -> Result<String, String> {
        let Some((svc, mut op)) = self.locked(environment, name, false).await? else {
            return Err("it does not run on this host".into());
        };
        svc.update(|m| m.drained = false)?;
        if op.is_none() {
            *op = Some(self.start(&svc).await);
        }
        let Some(running) = op.as_ref() else { return Err("the service's manager did not start".into()) };
        let row = svc.row().await?;
        let served = running.manager.status().await.into_iter().find(|s| s.environment == environment && s.service == name);
        match (row, served) {
            (None, _) => Ok(format!("{environment}/{name} undrained (nothing recorded to run)")),
            (Some(_), Some(s)) => Ok(format!("{environment}/{name} listens on {} again ({} instance(s))", s.listen, s.instances.len())),
            (Some(_), None) => Err(format!("not served again: see {}", self.paths.log().display())),
        }
    }
}

// ---- instances on this host ----------------------------------------------------

/// One instance, as its marker file records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct InstanceMarker {
    /// Also its process group.
    pid: i32,
    start_time: u64,
    port: u16,
    environment: String,
    service: String,
    version: String,
    spec_digest: String,
    deployment_id: i64,
    /// Unix seconds.
    started_at: u64,
}

fn read_markers(dir: &Path) -> Vec<(PathBuf, InstanceMarker)> {
    agent::read_json_files(dir).into_iter().map(|(path, m, _)| (path, m)).collect()
}

/// The target a host's service managers start instances on: processes of
/// this host, each in its own process group, its output in a file beside
/// its marker, so that it outlives the supervisor and the next one adopts
/// it. Verify steps run as the local target runs jobs.
pub struct HostTarget {
    dir: PathBuf,
    jobs: LocalTarget,
    /// (pid, start time) of the instances this target started or adopted:
    /// everything else its sweep ends.
    held: std::sync::Mutex<HashSet<(i32, u64)>>,
}

impl HostTarget {
    pub fn new(dir: PathBuf, installation: &str) -> HostTarget {
        HostTarget { dir, jobs: LocalTarget::scoped(installation), held: Default::default() }
    }

    fn hold(&self, pid: i32, start: u64) {
        if let Ok(mut h) = self.held.lock() {
            h.insert((pid, start));
        }
    }

    fn start(&self, req: &InstanceRequest, port: u16) -> Result<Arc<dyn Instance>, TargetError> {
        let refused = |m: String| TargetError::new(TargetErrorKind::Refused, m);
        let (argv, env) = req.filled(port);
        let Some(program) = argv.first().filter(|p| !p.is_empty()) else { return Err(refused("empty command".into())) };
        private_dir(&self.dir).map_err(refused)?;
        let tmp_log = self.dir.join(format!(".starting-{port}-{:016x}.log", rand::random::<u64>()));
        let open_log = || std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&tmp_log);
        let (out, err) = match (open_log(), open_log()) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => return Err(refused(format!("cannot create {}: {}", tmp_log.display(), agent::os_message(&e)))),
        };
        let mut cmd = tokio::process::Command::new(crate::process::program_path(program, &req.workdir));
        crate::process::hide_secret_sources(cmd.as_std_mut());
        cmd.args(&argv[1..])
            .current_dir(&req.workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .envs(&env)
            .envs(req.secret_env.iter().map(|(k, v)| (k, v.expose())))
            .env("SLIPWAY_SERVICE", &req.service)
            .env("SLIPWAY_ENV", &req.environment)
            .env("SLIPWAY_VERSION", &req.version)
            .env("SLIPWAY_PORT", port.to_string())
            // Not a local target's process: no local sweep may take it.
            .env_remove("SLIPWAY_OWNER")
            .env_remove("SLIPWAY_OWNER_JOB");
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&tmp_log);
            refused(format!("cannot start {program:?} in {}: {}", req.workdir.display(), agent::os_message(&e)))
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let start_time = agent::start_time(pid).unwrap_or(0);
        self.hold(pid, start_time);
        let log = self.dir.join(format!("{pid}.log"));
        let _ = std::fs::rename(&tmp_log, &log);
        let marker = InstanceMarker {
            pid,
            start_time,
            port,
            environment: req.environment.clone(),
            service: req.service.clone(),
            version: req.version.clone(),
            spec_digest: req.spec_digest.clone(),
            deployment_id: req.deployment_id,
            started_at: agent::unix_now(),
        };
        let marker_path = self.dir.join(format!("{pid}.json"));
        let written = serde_json::to_vec_pretty(&marker).map_err(|e| e.to_string()).and_then(|b| agent::write_atomic(&marker_path, &b).map_err(|e| e.to_string()));
        if let Err(e) = written {
            // An instance nothing could find after a restart is not run.
            agent::kill_group(pid, libc::SIGKILL);
            return Err(refused(format!("cannot write {}: {e}", marker_path.display())));
        }
        Ok(HostInstance::watch(marker, marker_path, log, Some(child)))
    }
}

pub struct HostInstance {
    pid: i32,
    addr: SocketAddr,
    life: Lifeline,
    log: PathBuf,
}

impl HostInstance {
    /// The instance, and a task that announces its end: the child's exit
    /// status for one this process started, the pid leaving /proc for an
    /// adopted one. The task gives up once nobody holds the instance (a
    /// drained service's manager went): the process runs on.
    fn watch(marker: InstanceMarker, marker_path: PathBuf, log: PathBuf, child: Option<tokio::process::Child>) -> Arc<dyn Instance> {
        let (life, exit_tx) = Lifeline::new();
        let keeper = life.keeper();
        let (pid, start) = (marker.pid, marker.start_time);
        let log_path = log.clone();
        tokio::spawn(async move {
            let why = match child {
                Some(mut child) => loop {
                    tokio::select! {
                        status = child.wait() => break Some(match status {
                            Ok(s) => describe(s),
                            Err(e) => format!("waiting for it failed: {e}"),
                        }),
                        _ = tokio::time::sleep(POLL) => if exit_tx.abandoned() {
                            // tokio reaps a dropped child when it ends.
                            break None;
                        },
                    }
                },
                None => loop {
                    if !agent::is_running(pid, start) {
                        break Some("ended (an adopted instance: its exit status is not known here)".to_string());
                    }
                    if exit_tx.abandoned() {
                        break None;
                    }
                    tokio::time::sleep(POLL).await;
                },
            };
            let Some(why) = why else { return };
            // What it left in its group goes with it.
            agent::kill_group(pid, libc::SIGKILL);
            for line in tail_lines(&log_path, 8192).lines().rev().take(crate::targets::KEEP_LINES).collect::<Vec<_>>().into_iter().rev() {
                keeper.push_line(line.to_string());
            }
            let _ = std::fs::remove_file(&marker_path);
            exit_tx.send(why);
        });
        let instance: Arc<dyn Instance> = Arc::new(HostInstance { pid, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, marker.port)), life, log });
        instance
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    crate::process::describe_exit(status).1
}

#[async_trait]
impl Instance for HostInstance {
    fn id(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lifeline(&self) -> &Lifeline {
        &self.life
    }

    async fn stop(&self, grace: Duration) {
        self.life.end_group(self.pid, grace).await;
        let _ = std::fs::remove_file(&self.log);
        let mut old = self.log.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::remove_file(old);
    }
}

// No Drop that kills: an instance nobody holds (the supervisor stopping,
// a drained service) keeps serving until a supervisor adopts or ends it.

#[async_trait]
impl Target for HostTarget {
    async fn start_instance(&self, request: InstanceRequest) -> Result<Arc<dyn Instance>, TargetError> {
        if !request.secret_files.is_empty() {
            return Err(TargetError::new(TargetErrorKind::Unsupported, "secret files are not placed on SSH hosts yet"));
        }
        crate::targets::ports::on_free_port(|port| std::future::ready(self.start(&request, port))).await
    }

    async fn run(&self, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        self.jobs.run(req, output, cancel).await
    }

    async fn adopt(&self, wanted: &Adoptable<'_>) -> Vec<Arc<dyn Instance>> {
        let mut found = Vec::new();
        for (path, m) in read_markers(&self.dir) {
            if m.environment != wanted.environment || m.service != wanted.service || m.version != wanted.version || m.spec_digest != wanted.spec_digest {
                continue;
            }
            if !agent::is_running(m.pid, m.start_time) {
                continue;
            }
            self.hold(m.pid, m.start_time);
            let log = self.dir.join(format!("{}.log", m.pid));
            let i = HostInstance::watch(m, path, log, None);
            crate::targets::ports::PORTS.hold(&i);
            found.push(i);
        }
        found
    }

    /// Instances of this service that no supervisor holds (a rollout cut
    /// short by a kill, one not adopted) end; markers of dead ones and
    /// logs without a marker go.
    async fn sweep_orphans(&self) -> usize {
        let held = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        let mut ended = 0;
        let mut orphans = Vec::new();
        for (path, m) in read_markers(&self.dir) {
            if !agent::is_running(m.pid, m.start_time) {
                let _ = std::fs::remove_file(&path);
            } else if !held.contains(&(m.pid, m.start_time)) {
                tracing::info!(pid = m.pid, version = m.version, "ending an instance no supervisor holds");
                orphans.push((path, m));
            }
        }
        let groups: Vec<(i32, u64)> = orphans.iter().map(|(_, m)| (m.pid, m.start_time)).collect();
        agent::end_groups(&groups, ORPHAN_GRACE, Instant::now() + ORPHAN_GRACE + Duration::from_secs(5)).await;
        for (path, m) in orphans {
            if !agent::is_running(m.pid, m.start_time) {
                let _ = std::fs::remove_file(&path);
                ended += 1;
            }
        }
        let markers: HashSet<i32> = read_markers(&self.dir).into_iter().map(|(_, m)| m.pid).collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_suffix(".log").or_else(|| name.strip_suffix(".log.1")).and_then(|p| p.parse::<i32>().ok())
                    && !markers.contains(&pid)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue19_the_tail_of_an_instance_log_starts_at_a_whole_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.log");
        // A line cut by the tail's start (its secret in part) goes.
        let mut text = b"first line\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 100));
        text.extend_from_slice(b"token=hunter2\nlast line\nno break at the end");
        std::fs::write(&path, &text).expect("write");
        let n = "hunter2\nlast line\nno break at the end".len() as u64;
        assert_eq!(tail_lines(&path, n), "last line\nno break at the end");
        // Bytes that begin just after a line break are whole lines.
        assert_eq!(tail_lines(&path, n - "hunter2\n".len() as u64), "last line\nno break at the end");
        assert_eq!(tail_lines(&path, n + 1), "last line\nno break at the end");
        // A file within the limit is whole, its first line included.
        assert_eq!(tail_lines(&path, text.len() as u64), String::from_utf8_lossy(&text));
        // One line longer than the tail: nothing of it.
        assert_eq!(tail_lines(&path, 10), "");
        assert_eq!(tail_lines(&dir.path().join("none.log"), 50), "");
        // A file cut back (`cap_log`, which may cut inside a line) does not
        // begin a line, however short it is now.
        std::fs::write(&path, "ret=hunter2\nnext\n").expect("write");
        assert_eq!(tail_lines(&path, 100), "ret=hunter2\nnext\n");
        std::fs::write(old_log(&path), "the part before").expect("write");
        assert_eq!(tail_lines(&path, 100), "next\n");
    }

    #[test]
    fn an_output_file_beyond_its_limit_keeps_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.log");
        let mut text = vec![b'a'; LOG_LIMIT as usize];
        text.extend_from_slice(b"the end\n");
        std::fs::write(&path, &text).expect("write");
        cap_log(&path);
        assert_eq!(std::fs::metadata(&path).expect("log").len(), 0);
        let old = std::fs::read(dir.path().join("1.log.1")).expect("the kept end");
        assert_eq!(old.len() as u64, LOG_KEEP);
        assert!(old.ends_with(b"the end\n"));
        // Under the limit: left alone.
        std::fs::write(&path, b"short\n").expect("write");
        cap_log(&path);
        assert_eq!(std::fs::read(&path).expect("log"), b"short\n");
    }

    #[test]
    fn socket_paths_and_bad_requests() {
        let p = Paths::new("/srv/slipway", "abc");
        assert_eq!(p.sock(), PathBuf::from("/srv/slipway/supervisor/abc/sock"));
        assert_eq!(p.service("production", "web"), PathBuf::from("/srv/slipway/supervisor/abc/services/production/web"));
        assert!(serde_json::from_str::<Request>(r#"{"dir": "/d", "installation": "i", "op": "status"}"#).is_ok());
        assert!(serde_json::from_str::<Request>(r#"{"dir": "/d", "op": "status"}"#).is_err());
    }
}
