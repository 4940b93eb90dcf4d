//! The `local` target: a job is a process group on this node.
//!
//! Each attempt gets its own process group, so a timeout or a cancel kills
//! everything the job started (SIGTERM, then SIGKILL after `kill_grace`),
//! and so does the end of the job: a job does not leave processes behind
//! (long-running things are services, not jobs). If Slipway itself dies
//! (SIGKILL, a crash), its jobs' processes are found by the owner mark in
//! their environment and killed by the next Slipway on the host
//! ([`sweep_orphans`]), before any interrupted job is retried.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

mod instance;

use super::{Instance, InstanceRequest, JobRequest, MAX_LINE_BYTES, OutputSink, RunResult, Stream, Target};
use crate::config;
use crate::store::Outcome;

#[derive(Debug, Default, Clone)]
pub struct LocalTarget;

/// Substitute `{name}` placeholders inside one argument. Values stay one
/// argument whatever they contain: no shell ever sees them.
pub fn substitute(arg: &str, values: &std::collections::BTreeMap<&'static str, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

fn build_command(req: &JobRequest) -> Result<Command, String> {
    let mut cmd = match &req.spec.command {
        config::Command::Argv(argv) => {
            let Some(program) = argv.first() else { return Err("empty command".into()) };
            let program = substitute(program, &req.values);
            let mut c = Command::new(program_path(&program, &req.workdir));
            c.args(argv[1..].iter().map(|a| substitute(a, &req.values)));
            c
        }
        config::Command::Shell(line) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        config::Command::Rollout(_) | config::Command::Fetch(_) | config::Command::Pull(_) => return Err("rollouts and artifact fetches are run by the node, not as a process".into()),
        config::Command::Unreadable(why) => return Err(why.clone()),
    };
    cmd.current_dir(&req.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    crate::config::secret::note_sources(req.spec.secrets.values());
    hide_secret_sources(cmd.as_std_mut());
    for (k, v) in &req.values {
        cmd.env(format!("SLIPWAY_{}", k.to_ascii_uppercase()), v);
    }
    cmd.env("SLIPWAY_JOB", &req.job).env("SLIPWAY_ATTEMPT", req.attempt.to_string());
    for (k, v) in &req.spec.env {
        cmd.env(k, v);
    }
    for (k, secret) in &req.spec.secrets {
        cmd.env(k, secret.read()?.expose());
    }
    // Marks every process of the job (children inherit it) as ours, so a
    // later Slipway on this host can find them if we die: see
    // `sweep_orphans`. No pre_exec hook: that would force fork() instead
    // of posix_spawn, which costs a copy of Slipway's page tables per job.
    cmd.env(OWNER_ENV, owner_mark());
    Ok(cmd)
}

/// Take the variables that hold secrets out of a child's environment (it
/// would inherit Slipway's own): a process gets a secret only by listing it.
pub(crate) fn hide_secret_sources(cmd: &mut std::process::Command) {
    for var in crate::config::secret::env_sources() {
        cmd.env_remove(var);
    }
}

/// Environment variable carrying "<pid>.<start time>" of the Slipway
/// process that started a job.
const OWNER_ENV: &str = "SLIPWAY_OWNER";

pub(crate) fn owner_mark() -> &'static str {
    static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARK.get_or_init(|| {
        let pid = std::process::id() as i32;
        format!("{pid}.{}", proc_stat(pid).map(|s| s.start_time).unwrap_or(0))
    })
}

fn parent_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

struct ProcStat {
    start_time: u64,
    /// 'Z': exited, not yet reaped by its parent: dead for our purposes.
    zombie: bool,
}

/// Start time (clock ticks since boot) from
/// /proc/PID/stat; the start time tells a process from a later one that
/// reused its pid.
fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from after its closing parenthesis (field 3 = index 0).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat { start_time: fields.get(19)?.parse().ok()?, zombie: fields.first() == Some(&"Z") })
}

/// Kill what jobs left behind when their Slipway died (SIGKILL, a crash):
/// every process on this host marked with the owner of a Slipway process
/// that no longer exists (Slipway binaries themselves excepted). Runs when a node starts,
/// before it retries interrupted jobs, and now and then after. Returns
/// how many processes it killed.
pub fn sweep_orphans() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let mine = owner_mark();
    // Never ourselves or our ancestors (a Slipway started by a job of an
    // older one inherits its mark), never another pid namespace (its pids
    // mean other processes).
    let mut spared = vec![std::process::id() as i32];
    let mut at = std::process::id() as i32;
    while let Some(parent) = parent_of(at).filter(|p| *p > 1 && !spared.contains(p)) {
        spared.push(parent);
        at = parent;
    }
    let our_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let our_exe = std::fs::read_link("/proc/self/exe").ok();
    let mut killed = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if spared.contains(&pid) || std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != our_ns {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let Some(owner) = environ
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(OWNER_ENV.as_bytes()).and_then(|v| v.strip_prefix(b"=")))
        else {
            continue;
        };
        let owner = String::from_utf8_lossy(owner);
        if owner == mine || !owner_is_dead(&owner) {
            continue; // its Slipway is alive and looks after it
        }
        // A Slipway started by a job (an upgrade, a restart) inherits the
        // mark: it is not an orphan to kill.
        if our_exe.is_some() && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == our_exe {
            continue;
        }
        // Only the marked process itself: everything a job started carries
        // the mark, and its process group may hold processes that do not
        // belong to the job (whoever started a marked Slipway).
        // SAFETY: plain syscall on a pid we just identified as an orphan.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        killed += 1;
    }
    killed
}

/// Whether the Slipway process named by an owner mark ("<pid>.<start
/// time>") on this host is gone. A mark that does not parse is not ours to
/// judge: false.
pub(crate) fn owner_is_dead(owner: &str) -> bool {
    let Some((opid, ostart)) = owner.split_once('.') else { return false };
    let (Ok(opid), Ok(ostart)) = (opid.parse::<i32>(), ostart.parse::<u64>()) else { return false };
    !proc_stat(opid).is_some_and(|s| s.start_time == ostart && !s.zombie)
}

/// The program of an argv command: a relative path with a slash is
/// relative to `workdir` (the revision, or the unpacked release), not to
/// wherever Slipway was started; a bare name is looked up on PATH.
pub fn program_path(program: &str, workdir: &std::path::Path) -> std::ffi::OsString {
    if program.contains('/') && !program.starts_with('/') { workdir.join(program).into_os_string() } else { program.into() }
}

fn kill_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        // SAFETY: plain syscall; a group that is gone gives ESRCH, ignored.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Forward output as lines, cutting lines longer than MAX_LINE_BYTES.
async fn pump(mut reader: impl AsyncRead + Unpin, stream: Stream, sink: OutputSink) {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            for piece in line.chunks(MAX_LINE_BYTES.max(1)) {
                if sink.send((stream, String::from_utf8_lossy(piece).into_owned())).await.is_err() {
                    return;
                }
            }
            if line.is_empty() && sink.send((stream, String::new())).await.is_err() {
                return;
            }
        }
        while buf.len() >= MAX_LINE_BYTES {
            let piece: Vec<u8> = buf.drain(..MAX_LINE_BYTES).collect();
            if sink.send((stream, String::from_utf8_lossy(&piece).into_owned())).await.is_err() {
                return;
            }
        }
    }
    if !buf.is_empty() {
        let _ = sink.send((stream, String::from_utf8_lossy(&buf).into_owned())).await;
    }
}

fn describe(status: std::process::ExitStatus) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (Some(c), format!("exit code {c}")),
        (None, Some(s)) => (None, format!("killed by signal {s}")),
        _ => (None, "ended without exit code".into()),
    }
}

#[async_trait]
impl Target for LocalTarget {
    async fn start_instance(&self, request: InstanceRequest) -> Result<std::sync::Arc<dyn Instance>, String> {
        instance::start(request)
    }

    async fn sweep_orphans(&self) -> usize {
        tokio::task::spawn_blocking(sweep_orphans).await.unwrap_or(0)
    }

    async fn run(&self, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        let timeout = Duration::from_millis(req.spec.timeout_ms.max(1));
        let grace = Duration::from_millis(req.spec.kill_grace_ms);
        let mut cmd = match build_command(&req) {
            Ok(c) => c,
            Err(e) => return RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(e) },
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let program = match &req.spec.command {
                    config::Command::Argv(a) => a.first().cloned().unwrap_or_default(),
                    config::Command::Shell(_) => "/bin/sh".into(),
                    config::Command::Rollout(s) => format!("rollout of {}", s.name),
                    config::Command::Fetch(a) => format!("fetch of {}", a.url),
                    config::Command::Pull(c) => format!("pull of {}", c.image),
                    config::Command::Unreadable(_) => "an unreadable job".into(),
                };
                return RunResult {
                    outcome: Outcome::Failed,
                    exit_code: None,
                    reason: Some(format!("cannot start {program:?} in {}: {e}", req.workdir.display())),
                };
            }
        };
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let out = child.stdout.take().map(|r| tokio::spawn(pump(r, Stream::Stdout, output.clone())));
        let err = child.stderr.take().map(|r| tokio::spawn(pump(r, Stream::Stderr, output.clone())));
        drop(output);

        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            TimedOut,
            Cancelled,
        }
        let end = tokio::select! {
            s = child.wait() => End::Exited(s),
            _ = tokio::time::sleep(timeout) => End::TimedOut,
            _ = cancel.cancelled() => End::Cancelled,
        };
        let result = match end {
            End::Exited(Ok(status)) => {
                let (code, why) = describe(status);
                if status.success() {
                    RunResult { outcome: Outcome::Succeeded, exit_code: Some(0), reason: None }
                } else {
                    RunResult { outcome: Outcome::Failed, exit_code: code, reason: Some(why) }
                }
            }
            End::Exited(Err(e)) => RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(format!("waiting for the process failed: {e}")) },
            End::TimedOut | End::Cancelled => {
                kill_group(pgid, libc::SIGTERM);
                let status = match tokio::time::timeout(grace, child.wait()).await {
                    Ok(s) => s.ok(),
                    Err(_) => {
                        kill_group(pgid, libc::SIGKILL);
                        tokio::time::timeout(Duration::from_secs(5), child.wait()).await.ok().and_then(|s| s.ok())
                    }
                };
                let code = status.and_then(|s| s.code());
                if matches!(end, End::TimedOut) {
                    RunResult {
                        outcome: Outcome::TimedOut,
                        exit_code: code,
                        reason: Some(format!("timed out after {}", humantime::format_duration(timeout))),
                    }
                } else {
                    RunResult { outcome: Outcome::Cancelled, exit_code: code, reason: Some("stopped on request".into()) }
                }
            }
        };
        // Whatever the job left running in its group goes too, and with it
        // the last holders of the output pipes.
        kill_group(pgid, libc::SIGKILL);
        // A daemon the job started may still hold the pipes (setsid, no
        // redirect): stop reading after a moment, or the job never ends.
        for mut pump in [out, err].into_iter().flatten() {
            if tokio::time::timeout(Duration::from_secs(2), &mut pump).await.is_err() {
                pump.abort();
            }
        }
        result
    }
}
