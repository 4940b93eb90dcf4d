//! The agent: Slipway's side on an SSH host, run as `slipway agent ssh VERB`
//! by a fixed command string (see `session::agent_command`). The request
//! is one JSON line on stdin, so nothing from a payload is ever a shell
//! string: a job's process is started with its argv (a shell only for a
//! job whose config says `shell`).
//!
//! `run` supervises one job's process: in its own session (setsid), output
//! copied to the agent's stdout/stderr as it comes, ended when the node
//! stops proving it is alive (no heartbeat on stdin for `heartbeat_ms`, or
//! stdin closed) — a command a partition or a killed node left behind ends
//! by itself — and the agent exits with the job's status. A marker file
//! per run (`<dir>/runs/<installation>/<deployment>.<job>.<attempt>.json`)
//! names the agent and the process, each by pid AND start time (so a
//! reused pid is never mistaken for them), for `end-earlier` and `sweep`.
//! Other verbs reply with one JSON line on stdout (`{"error": …}` and a
//! non-zero exit on failure). The agent writes nothing else to stdout or
//! stderr: those are the job's streams or the reply. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::process::proc_stat;

/// Exit code of `run` when the agent, not the job, failed (a program that
/// cannot be started, a bad request); a line on stderr says why.
pub const AGENT_FAILED: u8 = 125;
/// What stderr lines of the agent itself start with.
pub const PREFIX: &str = "slipway-agent: ";

/// How long the agent waits for its request line.
pub(super) const REQUEST_WITHIN: Duration = Duration::from_secs(30);
/// Longest request line.
const MAX_REQUEST: usize = 1 << 20;
/// `put`: the longest silence on stdin before the upload is given up.
const PUT_SILENCE: Duration = Duration::from_secs(60);
/// After the job's exit: how long output that stopped coming is waited
/// for (a daemon the job started may hold the pipes).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// After SIGKILL: how long a process is waited for.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// `sweep`: grace between SIGTERM and SIGKILL for orphans.
const SWEEP_GRACE: Duration = Duration::from_secs(2);
/// `sweep`: markers of finished runs older than this are removed.
const MARKER_KEEP: Duration = Duration::from_secs(24 * 3600);

// ---- requests and replies (the node's side builds and reads these) ---------

/// `run`: exactly one of `argv` and `shell`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub dir: String,
    pub installation: String,
    /// The node's owner mark (kept in the marker, for people and sweeps).
    pub owner: String,
    pub deployment: i64,
    pub job: String,
    pub attempt: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// 0: none (the node enforces its own; this is a backstop).
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub kill_grace_ms: u64,
    /// 0: only stdin's end stops the job.
    #[serde(default)]
    pub heartbeat_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndEarlierRequest {
    pub dir: String,
    pub installation: String,
    pub deployment: i64,
    pub job: String,
    pub attempt: i64,
    pub within_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndEarlierReply {
    /// Live runs of earlier attempts found.
    pub found: usize,
    /// All of them gone within `within_ms`.
    pub ended: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRequest {
    pub dir: String,
    pub installation: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SweepReply {
    pub ended: usize,
}

/// `put`: followed on stdin by exactly `size` bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutRequest {
    pub dir: String,
    pub sha256: String,
    pub size: u64,
}

/// `unpack` and `has`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRequest {
    pub dir: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HasReply {
    pub blob: bool,
    pub tree: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnpackReply {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionReply {
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    pub error: String,
}

/// One run on this host, as its marker file holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    pub installation: String,
    pub owner: String,
    pub deployment: i64,
    pub job: String,
    pub attempt: i64,
    pub agent_pid: i32,
    pub agent_start: u64,
    /// The job's process; also its process group (setsid).
    pub child_pid: i32,
    pub child_start: u64,
    /// Unix seconds.
    pub started_at: u64,
    #[serde(default)]
    pub ended_at: Option<u64>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
}

/// Where the marker of a run is.
pub fn marker_path(dir: &str, installation: &str, deployment: i64, job: &str, attempt: i64) -> PathBuf {
    Path::new(dir).join("runs").join(installation).join(format!("{deployment}.{job}.{attempt}.json"))
}

// ---- entry ----------------------------------------------------------------

pub async fn main(args: Vec<String>) -> Result<u8, String> {
    if args.first().map(String::as_str) == Some("supervise") {
        // The host's service supervisor: a daemon, not a request.
        return super::supervisor::supervise(&args[1..]).await;
    }
    let verb = match args.as_slice() {
        [verb] => verb.as_str(),
        _ => {
            reply_error("usage: slipway agent ssh run|service|end-earlier|sweep|put|unpack|has|version (the request on stdin), or supervise --dir DIR --installation ID");
            return Ok(2);
        }
    };
    let result = match verb {
        "run" => return Ok(run().await),
        "service" => return Ok(super::supervisor::service().await),
        "version" => Ok(to_line(&VersionReply { version: env!("CARGO_PKG_VERSION").to_string() })),
        "end-earlier" => end_earlier().await,
        "sweep" => sweep().await,
        "put" => put().await,
        "unpack" => unpack().await,
        "has" => has().await,
        other => Err(format!("unknown verb {other:?}")),
    };
    match result {
        Ok(line) => {
            let _ = write_all_fd(1, line.as_bytes());
            Ok(0)
        }
        Err(e) => {
            reply_error(&e);
            Ok(1)
        }
    }
}

pub(super) fn to_line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

pub(super) fn reply_error(message: &str) {
    let _ = write_all_fd(1, to_line(&ErrorReply { error: message.to_string() }).as_bytes());
}

// ---- stdin and raw output ---------------------------------------------------

/// Stdin read by a thread of its own (a plain thread: the runtime never
/// waits for it, so a read that never returns cannot hold the exit).
pub(super) struct Input {
    rx: mpsc::Receiver<Vec<u8>>,
    /// Read but not yet consumed.
    buf: Vec<u8>,
    eof: bool,
}

impl Input {
    pub(super) fn start() -> Input {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(chunk[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // An error ends stdin as EOF would.
                    Err(_) => break,
                }
            }
        });
        Input { rx, buf: Vec::new(), eof: false }
    }

    /// The first line (the request), within `within`.
    pub(super) async fn line(&mut self, within: Duration) -> Result<Vec<u8>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(line);
            }
            if self.buf.len() > MAX_REQUEST {
                return Err(format!("the request line is longer than {MAX_REQUEST} bytes"));
            }
            if self.eof {
                return if self.buf.is_empty() { Err("stdin ended before the request".into()) } else { Ok(std::mem::take(&mut self.buf)) };
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => self.eof = true,
                Err(_) => return Err(format!("no request on stdin within {}", humantime::format_duration(within))),
            }
        }
    }

    /// The next bytes; None at the end of stdin.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        if !self.buf.is_empty() {
            return Some(std::mem::take(&mut self.buf));
        }
        if self.eof {
            return None;
        }
        let c = self.rx.recv().await;
        self.eof = c.is_none();
        c
    }
}

/// write(2) to a raw descriptor: no std lock (a thread blocked writing
/// the job's output must never block the agent's own writes).
pub(super) fn write_all_fd(fd: i32, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice to a descriptor we do not own or close.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// A line of the agent's own on stderr. From a thread, bounded: stderr
/// may be a channel nobody reads any more.
fn say(message: &str) {
    let line = format!("{PREFIX}{message}\n");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = write_all_fd(2, line.as_bytes());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(1));
}

// ---- processes -------------------------------------------------------------

pub(super) fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

/// `pid` is still the process that started at `start`, and not a zombie.
pub(super) fn is_running(pid: i32, start: u64) -> bool {
    pid > 0 && proc_stat(pid).is_some_and(|s| s.start_time == start && !s.zombie)
}

/// Some process other than a zombie is in process group `pgid`.
fn group_has_members(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { return false };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else { return false };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
    })
}

/// The run's process, or anything left in its group, still exists. (A
/// group's id is not reused while a member lives.)
fn group_alive(pgid: i32, leader_start: u64) -> bool {
    pgid > 0 && (is_running(pgid, leader_start) || group_has_members(pgid))
}

pub(super) use crate::process::kill_group;

/// Wait (polling) until none of `groups` is alive, or `deadline`; whether all are gone.
async fn wait_groups_gone(groups: &[(i32, u64)], deadline: Instant) -> bool {
    loop {
        if !groups.iter().any(|(g, s)| group_alive(*g, *s)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM the groups, SIGKILL what is left after `grace`, wait until
/// `deadline`; whether all are gone.
pub(super) async fn end_groups(groups: &[(i32, u64)], grace: Duration, deadline: Instant) -> bool {
    let live: Vec<(i32, u64)> = groups.iter().copied().filter(|(g, s)| group_alive(*g, *s)).collect();
    for (g, _) in &live {
        kill_group(*g, libc::SIGTERM);
    }
    if wait_groups_gone(&live, (Instant::now() + grace).min(deadline)).await {
        return true;
    }
    for (g, s) in &live {
        if group_alive(*g, *s) {
            kill_group(*g, libc::SIGKILL);
        }
    }
    wait_groups_gone(&live, deadline.max(Instant::now() + Duration::from_millis(100))).await
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Without the " (os error N)" tail: messages for people.
pub(super) fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---- markers ---------------------------------------------------------------

/// A name used as one path component: no separators, no dot files.
pub(super) fn check_component(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 200 || value.starts_with('.') || value.contains(['/', '\0']) {
        return Err(format!("invalid {what} {value:?}"));
    }
    Ok(())
}

/// Write a file atomically: a temporary file beside it, then a rename.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn write_marker(path: &Path, marker: &Marker) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(marker).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes).map_err(|e| format!("cannot write the run marker {}: {}", path.display(), os_message(&e)))
}

/// The markers of an installation: path, marker, last change.
fn markers(dir: &str, installation: &str) -> Vec<(PathBuf, Marker, SystemTime)> {
    read_json_files(&Path::new(dir).join("runs").join(installation))
}

/// Every `*.json` file of `dir` that parses as a `T` (files being written,
/// `.`-named, and unreadable ones are passed over), with its path and
/// when it was last written.
pub(super) fn read_json_files<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<(PathBuf, T, SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                return None;
            }
            let modified = e.metadata().and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now());
            let value = serde_json::from_slice::<T>(&std::fs::read(&path).ok()?).ok()?;
            Some((path, value, modified))
        })
        .collect()
}

// ---- run -------------------------------------------------------------------

/// One output pump's progress, for the drain after the job's exit.
struct Pump {
    /// 0 reading, 1 writing, 2 done.
    state: AtomicU8,
    /// Milliseconds since [`base`] of the last progress.
    at: AtomicU64,
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64
}

impl Pump {
    fn start(mut from: impl std::io::Read + Send + 'static, to_fd: i32) -> Arc<Pump> {
        let pump = Arc::new(Pump { state: AtomicU8::new(0), at: AtomicU64::new(now_ms()) });
        let p = pump.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            // Once the node stops taking output, it is still read (so the
            // job never blocks on a full pipe) and dropped.
            let mut broken = false;
            loop {
                p.state.store(0, Ordering::SeqCst);
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                p.at.store(now_ms(), Ordering::SeqCst);
                p.state.store(1, Ordering::SeqCst);
                if !broken && write_all_fd(to_fd, &buf[..n]).is_err() {
                    broken = true;
                }
                p.at.store(now_ms(), Ordering::SeqCst);
            }
            p.state.store(2, Ordering::SeqCst);
        });
        pump
    }

    fn done(&self) -> bool {
        self.state.load(Ordering::SeqCst) == 2
    }

    /// Waiting for output that has not come for `idle` (not while its
    /// last output is still being written: the node's pace, which the
    /// heartbeat governs).
    fn stalled(&self, idle: Duration) -> bool {
        self.state.load(Ordering::SeqCst) == 0 && now_ms().saturating_sub(self.at.load(Ordering::SeqCst)) >= idle.as_millis() as u64
    }
}

/// Fail before the job started: a line on stderr, the agent's exit code.
fn agent_failed(message: &str) -> u8 {
    say(message);
    AGENT_FAILED
}

async fn run() -> u8 {
    let _ = base();
    let mut input = Input::start();
    let line = match input.line(REQUEST_WITHIN).await {
        Ok(l) => l,
        Err(e) => return agent_failed(&e),
    };
    let req: RunRequest = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return agent_failed(&format!("bad request: {e}")),
    };
    if let Err(e) = check_component("installation", &req.installation).and_then(|()| check_component("job", &req.job)) {
        return agent_failed(&e);
    }
    let workdir = Path::new(&req.workdir);
    let (mut cmd, shown) = match (&req.argv, &req.shell) {
        (Some(argv), None) => {
            let Some(program) = argv.first().filter(|p| !p.is_empty()) else { return agent_failed("bad request: empty argv") };
            let mut c = Command::new(crate::process::program_path(program, workdir));
            c.args(&argv[1..]);
            (c, program.clone())
        }
        (None, Some(line)) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(line);
            (c, "/bin/sh".to_string())
        }
        _ => return agent_failed("bad request: exactly one of argv and shell"),
    };
    match std::fs::metadata(workdir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return agent_failed(&format!("working directory {:?} is not a directory", req.workdir)),
        Err(e) => return agent_failed(&format!("working directory {:?}: {}", req.workdir, os_message(&e))),
    }
    let marker_file = marker_path(&req.dir, &req.installation, req.deployment, &req.job, req.attempt);
    if let Some(parent) = marker_file.parent()
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        return agent_failed(&format!("cannot create {}: {}", parent.display(), os_message(&e)));
    }
    cmd.current_dir(workdir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).env_clear();
    for k in ["PATH", "HOME", "LANG"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.envs(&req.env);
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child.
    // Its own session and group: ended as a whole, and apart from sshd's.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    // Whoever ends the agent ends its job (its own session would outlive it).
    // The handlers go in before the job starts: a SIGTERM that came between
    // the marker and them would end the agent alone and orphan the job.
    let mut signals = Vec::new();
    for kind in [SignalKind::terminate(), SignalKind::hangup(), SignalKind::interrupt()] {
        if let Ok(s) = signal(kind) {
            signals.push(s);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return agent_failed(&format!("cannot start {shown:?}: {}", os_message(&e))),
    };
    let pgid = child.id() as i32;
    let agent_pid = std::process::id() as i32;
    let mut marker = Marker {
        installation: req.installation.clone(),
        owner: req.owner.clone(),
        deployment: req.deployment,
        job: req.job.clone(),
        attempt: req.attempt,
        agent_pid,
        agent_start: start_time(agent_pid).unwrap_or(0),
        child_pid: pgid,
        child_start: start_time(pgid).unwrap_or(0),
        started_at: unix_now(),
        ended_at: None,
        exit_code: None,
        signal: None,
    };
    if let Err(e) = write_marker(&marker_file, &marker) {
        // A run nothing could find later is not started.
        kill_group(pgid, libc::SIGKILL);
        let _ = child.wait();
        return agent_failed(&e);
    }
    let pumps: Vec<Arc<Pump>> = [child.stdout.take().map(|o| Pump::start(o, 1)), child.stderr.take().map(|e| Pump::start(e, 2))].into_iter().flatten().collect();
    let (exit_tx, mut exited) = oneshot::channel::<std::io::Result<ExitStatus>>();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });

    let heartbeat = (req.heartbeat_ms > 0).then(|| Duration::from_millis(req.heartbeat_ms));
    // A backstop: the node ends a job at its timeout; the agent one grace
    // period later, so it acts only when the node could not.
    let deadline = (req.timeout_ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms.saturating_add(req.kill_grace_ms)));
    let signalled = async {
        if signals.is_empty() {
            return std::future::pending().await;
        }
        futures_util::future::select_all(signals.iter_mut().map(|s| Box::pin(s.recv()))).await
    };
    tokio::pin!(signalled);
    let grace = Duration::from_millis(req.kill_grace_ms);
    let mut last_beat = tokio::time::Instant::now();
    let far = || tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    enum End {
        Exited(Option<ExitStatus>),
        Stop { why: String, node_gone: bool },
    }
    let end = loop {
        let beat_due = heartbeat.map(|h| last_beat + h).unwrap_or_else(far);
        tokio::select! {
            status = &mut exited => break End::Exited(status.ok().and_then(|s| s.ok())),
            chunk = input.chunk() => match chunk {
                Some(_) => last_beat = tokio::time::Instant::now(),
                None => break End::Stop { why: "stdin closed: the node's connection ended".into(), node_gone: true },
            },
            _ = tokio::time::sleep_until(beat_due), if heartbeat.is_some() => break End::Stop {
                why: format!("no heartbeat from the node for {}", humantime::format_duration(heartbeat.unwrap_or_default())),
                node_gone: true,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => break End::Stop {
                why: format!("timed out after {}", humantime::format_duration(Duration::from_millis(req.timeout_ms))),
                node_gone: false,
            },
            _ = &mut signalled => break End::Stop { why: "the agent was told to stop".into(), node_gone: false },
        }
    };
    let (status, node_gone) = match end {
        End::Exited(status) => (status, false),
        End::Stop { why, node_gone } => {
            say(&format!("{why}: ending the job"));
            kill_group(pgid, libc::SIGTERM);
            let status = match tokio::time::timeout(grace, &mut exited).await {
                Ok(s) => s.ok().and_then(|s| s.ok()),
                Err(_) => {
                    kill_group(pgid, libc::SIGKILL);
                    tokio::time::timeout(KILL_WAIT, &mut exited).await.ok().and_then(|s| s.ok()).and_then(|s| s.ok())
                }
            };
            (status, node_gone)
        }
    };
    // What the job left in its group goes with it, and with it the last
    // holders of the output pipes.
    kill_group(pgid, libc::SIGKILL);
    if !node_gone {
        // All output to the node, unless it stops coming (a daemon the job
        // started holds the pipes) or the node goes.
        loop {
            if pumps.iter().all(|p| p.done() || p.stalled(DRAIN_IDLE)) {
                break;
            }
            let beat_due = heartbeat.map(|h| last_beat + h).unwrap_or_else(far);
            tokio::select! {
                chunk = input.chunk() => match chunk {
                    Some(_) => last_beat = tokio::time::Instant::now(),
                    None => break,
                },
                _ = tokio::time::sleep_until(beat_due), if heartbeat.is_some() => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
    use std::os::unix::process::ExitStatusExt as _;
    marker.ended_at = Some(unix_now());
    marker.exit_code = status.and_then(|s| s.code());
    marker.signal = status.and_then(|s| s.signal());
    let _ = write_marker(&marker_file, &marker);
    match (marker.exit_code, marker.signal) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => agent_failed("the job's exit status is unknown (it did not end after SIGKILL)"),
    }
}

// ---- end-earlier, sweep ----------------------------------------------------

async fn request<T: serde::de::DeserializeOwned>(input: &mut Input) -> Result<T, String> {
    let line = input.line(REQUEST_WITHIN).await?;
    serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))
}

async fn end_earlier() -> Result<String, String> {
    let req: EndEarlierRequest = request(&mut Input::start()).await?;
    check_component("installation", &req.installation)?;
    let earlier: Vec<(i32, u64)> = markers(&req.dir, &req.installation)
        .into_iter()
        .map(|(_, m, _)| m)
        .filter(|m| m.deployment == req.deployment && m.job == req.job && m.attempt < req.attempt && group_alive(m.child_pid, m.child_start))
        .map(|m| (m.child_pid, m.child_start))
        .collect();
    let within = Duration::from_millis(req.within_ms);
    let ended = end_groups(&earlier, within / 2, Instant::now() + within).await;
    Ok(to_line(&EndEarlierReply { found: earlier.len(), ended }))
}

async fn sweep() -> Result<String, String> {
    let req: SweepRequest = request(&mut Input::start()).await?;
    check_component("installation", &req.installation)?;
    let mut ended = 0;
    for (path, mut m, modified) in markers(&req.dir, &req.installation) {
        let agent_alive = is_running(m.agent_pid, m.agent_start);
        if !agent_alive && group_alive(m.child_pid, m.child_start) {
            // Its agent is gone (killed; the host rebooted into the same
            // pids is ruled out by the start times): nothing supervises it.
            end_groups(&[(m.child_pid, m.child_start)], SWEEP_GRACE, Instant::now() + SWEEP_GRACE + KILL_WAIT).await;
            ended += 1;
            m.ended_at = Some(unix_now());
            let _ = write_marker(&path, &m);
            continue;
        }
        let finished = m.ended_at.is_some() || (!agent_alive && !group_alive(m.child_pid, m.child_start));
        if finished && modified.elapsed().is_ok_and(|age| age > MARKER_KEEP) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(to_line(&SweepReply { ended }))
}

// ---- blobs and trees -------------------------------------------------------

fn check_sha256(s: &str) -> Result<(), String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) { Ok(()) } else { Err(format!("invalid sha256 {s:?} (64 lowercase hex digits)")) }
}

async fn put() -> Result<String, String> {
    let mut input = Input::start();
    let req: PutRequest = request(&mut input).await?;
    check_sha256(&req.sha256)?;
    let blobs = Path::new(&req.dir).join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("cannot create {}: {}", blobs.display(), os_message(&e)))?;
    let tmp = blobs.join(format!(".tmp-{}-{}", req.sha256, std::process::id()));
    let result = async {
        let mut file = std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {}", tmp.display(), os_message(&e)))?;
        let mut hasher = sha2::Sha256::new();
        let mut got: u64 = 0;
        while got < req.size {
            let chunk = match tokio::time::timeout(PUT_SILENCE, input.chunk()).await {
                Ok(Some(c)) => c,
                Ok(None) => return Err(format!("stdin ended after {got} of {} bytes", req.size)),
                Err(_) => return Err(format!("no data for {} after {got} of {} bytes", humantime::format_duration(PUT_SILENCE), req.size)),
            };
            let take = chunk.len().min((req.size - got) as usize);
            hasher.update(&chunk[..take]);
            std::io::Write::write_all(&mut file, &chunk[..take]).map_err(|e| format!("cannot write {}: {}", tmp.display(), os_message(&e)))?;
            got += take as u64;
        }
        let sum = hex::encode(hasher.finalize());
        if sum != req.sha256 {
            return Err(format!("checksum mismatch: the {} bytes received have sha256 {sum}, not {}", req.size, req.sha256));
        }
        file.sync_all().map_err(|e| format!("cannot write {}: {}", tmp.display(), os_message(&e)))?;
        let path = blobs.join(&req.sha256);
        std::fs::rename(&tmp, &path).map_err(|e| format!("cannot move the blob into place: {}", os_message(&e)))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| to_line(&serde_json::json!({"ok": true})))
}

async fn has() -> Result<String, String> {
    let req: BlobRequest = request(&mut Input::start()).await?;
    check_sha256(&req.sha256)?;
    let dir = Path::new(&req.dir);
    Ok(to_line(&HasReply { blob: dir.join("blobs").join(&req.sha256).is_file(), tree: dir.join("revisions").join(&req.sha256).is_dir() }))
}

/// An archive path that would land outside the directory it unpacks into.
fn escapes(path: &Path) -> bool {
    path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)))
}

async fn unpack() -> Result<String, String> {
    let req: BlobRequest = request(&mut Input::start()).await?;
    check_sha256(&req.sha256)?;
    let dir = Path::new(&req.dir);
    let revisions = dir.join("revisions");
    let target = revisions.join(&req.sha256);
    let reply = |p: &Path| to_line(&UnpackReply { path: std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned() });
    if target.is_dir() {
        return Ok(reply(&target));
    }
    let blob = dir.join("blobs").join(&req.sha256);
    let file = std::fs::File::open(&blob).map_err(|e| format!("no blob {} on this host ({}): put it first", req.sha256, os_message(&e)))?;
    std::fs::create_dir_all(&revisions).map_err(|e| format!("cannot create {}: {}", revisions.display(), os_message(&e)))?;
    let staging = revisions.join(format!(".tmp-{}-{}", req.sha256, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| -> Result<(), String> {
        std::fs::create_dir_all(&staging).map_err(|e| format!("cannot create {}: {}", staging.display(), os_message(&e)))?;
        let mut magic = [0u8; 2];
        let gz = std::fs::File::open(&blob).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b];
        let reader: Box<dyn std::io::Read> = if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("not a valid tar archive: {e}"))?;
            let path = entry.path().map_err(|e| format!("not a valid tar archive: {e}"))?.into_owned();
            let link_escapes = entry.header().entry_type().is_hard_link() && entry.link_name().ok().flatten().is_some_and(|l| escapes(&l));
            if escapes(&path) || link_escapes {
                return Err(format!("refused: the archive's entry {} escapes its directory", path.display()));
            }
            // unpack_in also refuses to write through a symlink leading out.
            match entry.unpack_in(&staging) {
                Ok(true) => {}
                Ok(false) => return Err(format!("refused: the archive's entry {} escapes its directory", path.display())),
                Err(e) => return Err(format!("cannot unpack {}: {e}", path.display())),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&staging, &target) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another unpack of the same blob finished first: the same tree.
        if !target.is_dir() {
            return Err(format!("cannot move the unpacked tree into place: {}", os_message(&e)));
        }
    }
    Ok(reply(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_and_checksums() {
        assert!(check_component("job", "deploy-web").is_ok());
        assert!(check_component("job", "../x").is_err());
        assert!(check_component("job", ".hidden").is_err());
        assert!(check_component("job", "").is_err());
        assert!(check_sha256(&"a".repeat(64)).is_ok());
        assert!(check_sha256(&"A".repeat(64)).is_err());
        assert!(check_sha256("abc").is_err());
        assert!(escapes(Path::new("../x")));
        assert!(escapes(Path::new("/etc/passwd")));
        assert!(escapes(Path::new("a/../../x")));
        assert!(!escapes(Path::new("a/b")));
        assert_eq!(marker_path("/srv/s", "inst", 5, "j", 2), PathBuf::from("/srv/s/runs/inst/5.j.2.json"));
    }
}
