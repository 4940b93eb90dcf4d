//! The `local` target: a job is a process group on this node.
//!
//! Each attempt gets its own process group, so a timeout or a cancel kills
//! everything the job started (SIGTERM, then SIGKILL after `kill_grace`),
//! and so does the end of the job: a job does not leave processes behind
//! (long-running things are services, not jobs). If Slipway itself dies
//! (SIGKILL, a crash), its jobs' processes are found by the marks in their
//! environment (which Slipway process, which installation, which attempt)
//! and killed by the next Slipway of the same installation on the host
//! ([`sweep_orphans`]), before any interrupted job is retried; another
//! installation's processes are never touched.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

mod instance;

use super::{Capabilities, Instance, InstanceRequest, JobRequest, Line, LineCutter, NodeContext, OutputSink, RunResult, Stream, Target, TargetError, TargetKind};
use crate::config;
use crate::process::{hide_secret_sources, owner_is_dead, owner_mark, proc_stat, program_path, substitute};
use crate::store::Outcome;

/// Without an installation (`LocalTarget::default()`, in-process tests and
/// benchmarks) processes are marked with their owner only, and nothing is
/// ever swept: whose orphans they are cannot be told.
#[derive(Debug, Default, Clone)]
pub struct LocalTarget {
    /// The installation (store) whose processes this target marks and may
    /// sweep: see [`crate::process::installation_of_store`].
    installation: Option<Arc<str>>,
    /// Orphans without an installation mark (left by an older Slipway) are
    /// reported once, not at every sweep.
    reported_unscoped: Arc<AtomicBool>,
}

impl LocalTarget {
    /// Processes of this target carry `installation`, and only this
    /// installation's orphans are swept.
    pub fn scoped(installation: impl Into<String>) -> Self {
        LocalTarget { installation: Some(Arc::from(installation.into())), reported_unscoped: Arc::default() }
    }

    /// The marks every process this target starts carries.
    fn mark(&self, cmd: &mut std::process::Command, job: Option<(i64, i64, &str)>) {
        match &self.installation {
            Some(i) => cmd.env(OWNER_ENV, format!("{}@{i}", owner_mark())),
            None => cmd.env(OWNER_ENV, owner_mark()),
        };
        match job {
            Some((deployment, attempt, name)) => cmd.env(JOB_ENV, format!("{deployment}/{attempt}/{name}")),
            None => cmd.env_remove(JOB_ENV),
        };
    }
}

fn build_command(req: &JobRequest, target: &LocalTarget) -> Result<Command, String> {
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
        config::Command::Rollout(_) | config::Command::Fetch(_) | config::Command::Pull(_) => {
            return Err("rollouts and artifact fetches are run by the node, not as a process".into());
        }
        config::Command::Unreadable(why) => return Err(why.clone()),
    };
    cmd.current_dir(&req.workdir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
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
    // Marks every process of the job (children inherit them) as this
    // attempt's, of this installation, started by us, so a later Slipway of
    // this installation on this host can find them if we die: see
    // `sweep_orphans`. Set last: a job's own `env` cannot change them. No
    // pre_exec hook: that would force fork() instead of posix_spawn, which
    // costs a copy of Slipway's page tables per job.
    target.mark(cmd.as_std_mut(), Some((req.deployment_id, req.attempt, &req.job)));
    Ok(cmd)
}

/// Environment variable carrying `<pid>.<start time>@<installation>` of
/// the Slipway process that started a process (the installation:
/// [`crate::process::installation_of_store`]; none without one). In one value, so that an
/// older Slipway, which kills every process whose `<pid>.<start time>`
/// names a dead process, cannot read it and leaves it alone.
const OWNER_ENV: &str = "SLIPWAY_OWNER";
/// On a job's processes: `<deployment id>/<attempt>/<job name>`.
const JOB_ENV: &str = "SLIPWAY_OWNER_JOB";

fn parent_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// A process carrying an owner mark, as found in /proc.
struct Marked {
    pid: i32,
    start_time: u64,
    owner: String,
    installation: Option<String>,
    /// `<deployment id>/<attempt>/<job name>` on a job's processes.
    job: Option<String>,
}

/// The value of `name` in a NUL-separated environment block.
fn env_value(environ: &[u8], name: &str) -> Option<String> {
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(name.as_bytes()).and_then(|v| v.strip_prefix(b"=")))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Every process on this host carrying an owner mark, but never ourselves
/// or our ancestors (a Slipway started by a job of an older one inherits
/// its marks), never another pid namespace (its pids mean other
/// processes), never a Slipway binary (a Slipway a job restarted).
fn marked_processes() -> Vec<Marked> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    let mut spared = vec![std::process::id() as i32];
    let mut at = std::process::id() as i32;
    while let Some(parent) = parent_of(at).filter(|p| *p > 1 && !spared.contains(p)) {
        spared.push(parent);
        at = parent;
    }
    let our_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let our_exe = std::fs::read_link("/proc/self/exe").ok();
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if spared.contains(&pid) || std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != our_ns {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let Some(mark) = env_value(&environ, OWNER_ENV) else { continue };
        if our_exe.is_some() && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == our_exe {
            continue;
        }
        let Some(stat) = proc_stat(pid).filter(|s| !s.zombie) else { continue };
        let (owner, installation) = match mark.split_once('@') {
            Some((owner, installation)) => (owner.to_string(), Some(installation.to_string())),
            None => (mark, None),
        };
        found.push(Marked { pid, start_time: stat.start_time, owner, installation, job: env_value(&environ, JOB_ENV) });
    }
    found
}

/// Whether `pid` is still the process that started at `start_time` and has
/// not exited (a zombie has: only its parent's bookkeeping is left).
fn is_running(pid: i32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && !s.zombie)
}

/// SIGKILL one marked process, unless its pid now names another process.
/// Only the marked process itself: everything a job started carries the
/// marks, and its process group may hold processes that do not belong to
/// the job (whoever started a marked Slipway).
fn kill_marked(p: &Marked) {
    if is_running(p.pid, p.start_time) {
        // SAFETY: plain syscall on a pid we just identified as an orphan.
        unsafe {
            libc::kill(p.pid, libc::SIGKILL);
        }
    }
}

/// Wait (bounded) until the processes are gone; those still running.
fn wait_gone(procs: &[(i32, u64)], within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = procs.iter().filter(|(p, s)| is_running(*p, *s)).map(|(p, _)| *p).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a sweep waits for the processes it killed to be gone.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// What [`sweep_orphans`] did.
#[derive(Debug, Default)]
pub struct Swept {
    pub killed: usize,
    /// Killed, yet not gone within `CONFIRM_WITHIN` (a process stuck in
    /// the kernel, as on a hung NFS mount).
    pub still_running: Vec<i32>,
    /// Orphans without an installation mark (an older Slipway started
    /// them): whose they are cannot be told, so they are left alone.
    pub unscoped: Vec<i32>,
}

/// Kill what jobs and service instances of `installation` left behind
/// when their Slipway died (SIGKILL, a crash): every process on this host
/// marked with this installation and with the owner of a Slipway process
/// that no longer exists (this node's previous life, or another node of
/// this installation on this host that died). Processes of a live Slipway
/// (another node of this installation included: it looks after them) and
/// of another installation (its own next Slipway sweeps them) are never
/// touched. Returns once the killed processes are gone (or after
/// `CONFIRM_WITHIN`). Runs when a node starts, before it reaps leases,
/// every sweep interval after, and before interrupted jobs are retried.
pub fn sweep_orphans(installation: &str) -> Swept {
    let mine = owner_mark();
    let mut swept = Swept::default();
    // Again after each pass that killed something: a process caught in the
    // middle of an exec shows no environment for a moment, and one an
    // orphan had just forked is found only now.
    for _ in 0..5 {
        let mut killed = Vec::new();
        swept.unscoped.clear();
        for p in marked_processes() {
            if p.owner == mine || !owner_is_dead(&p.owner) {
                continue; // its Slipway is alive and looks after it
            }
            match p.installation.as_deref() {
                Some(i) if i == installation => {
                    kill_marked(&p);
                    killed.push((p.pid, p.start_time));
                }
                Some(_) => {}
                None => swept.unscoped.push(p.pid),
            }
        }
        if killed.is_empty() {
            break;
        }
        swept.killed += killed.len();
        swept.still_running = wait_gone(&killed, CONFIRM_WITHIN);
        if !swept.still_running.is_empty() {
            break;
        }
    }
    swept
}

/// Processes of attempts before `attempt` of one job of `installation` on
/// this host: those of a dead Slipway are killed (and given a moment to
/// go). Returns the pids found, and those still running with their owner
/// mark.
fn earlier_attempts(installation: &str, deployment: i64, job: &str, attempt: i64) -> (Vec<i32>, Vec<(i32, String)>) {
    let mut killed = Vec::new();
    let mut running = Vec::new();
    for p in marked_processes() {
        if p.installation.as_deref() != Some(installation) {
            continue;
        }
        let Some(mark) = &p.job else { continue };
        let mut parts = mark.splitn(3, '/');
        let (Some(Ok(d)), Some(Ok(a)), Some(name)) = (parts.next().map(str::parse::<i64>), parts.next().map(str::parse::<i64>), parts.next()) else { continue };
        if d != deployment || name != job || a >= attempt {
            continue;
        }
        if p.owner != owner_mark() && owner_is_dead(&p.owner) {
            kill_marked(&p);
            killed.push((p.pid, p.start_time));
        } else if p.owner.split('.').next().and_then(|o| o.parse::<i32>().ok()) != parent_of(p.pid) {
            // A live owner's (this process's too) attempt runs while its
            // main process, the owner's child, does: the owner ends the
            // whole group with it. Others escaped the group (a daemon the
            // job started): no longer the attempt's, as after any attempt.
            continue;
        }
        // Else a live owner is stopping its attempt, which lost its
        // lease: waited for, never killed from here.
        running.push((p.pid, p.start_time, p.owner));
    }
    wait_gone(&killed, Duration::from_secs(1));
    let found = running.iter().map(|(pid, _, _)| *pid).collect();
    (found, running.into_iter().filter(|(pid, start, _)| is_running(*pid, *start)).map(|(pid, _, owner)| (pid, owner)).collect())
}

use crate::process::kill_group;

/// Forward output as lines, cutting lines longer than MAX_LINE_BYTES.
async fn pump(mut reader: impl AsyncRead + Unpin, stream: Stream, sink: OutputSink) {
    let mut lines = LineCutter::default();
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for (text, cut) in lines.feed(&chunk[..n]) {
            if sink.send(Line { stream, text, part: None, cut }).await.is_err() {
                return;
            }
        }
    }
    if let Some(text) = lines.finish() {
        let _ = sink.send(Line { stream, text, part: None, cut: false }).await;
    }
}

use crate::process::describe_exit as describe;

/// The `local` kind: registered in `targets/mod.rs`.
pub struct Kind;

pub static KIND: Kind = Kind;

#[async_trait]
impl TargetKind for Kind {
    fn name(&self) -> &'static str {
        "local"
    }

    fn about(&self) -> &'static str {
        "processes on the node itself; instances listen on ports of 127.0.0.1"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { runs_jobs: true, runs_instances: true, proxied: true, ..Capabilities::default() }
    }

    /// Processes of a dead node must be gone before its leases run out.
    fn sweeps_with_reaps(&self) -> bool {
        true
    }

    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        Ok(Arc::new(if node.installation.is_empty() { LocalTarget::default() } else { LocalTarget::scoped(node.installation.clone()) }))
    }
}

#[async_trait]
impl Target for LocalTarget {
    async fn start_instance(&self, request: InstanceRequest) -> Result<Arc<dyn Instance>, TargetError> {
        // Not a capability of this target (the config refuses the key):
        // never dropped silently.
        if !request.secret_files.is_empty() {
            return Err(TargetError::new(super::TargetErrorKind::Unsupported, "the local target does not place secret files"));
        }
        super::ports::on_free_port(|port| std::future::ready(instance::start(&request, self, port))).await
    }

    async fn sweep_orphans(&self) -> usize {
        let Some(installation) = self.installation.clone() else { return 0 };
        let swept = tokio::task::spawn_blocking(move || sweep_orphans(&installation)).await.unwrap_or_default();
        if !swept.still_running.is_empty() {
            tracing::warn!(pids = ?swept.still_running, "processes left by a dead Slipway of this installation are still there after SIGKILL");
        }
        if !swept.unscoped.is_empty() && !self.reported_unscoped.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                pids = ?swept.unscoped,
                "left running: processes of a Slipway process that is gone, without an installation mark (an older Slipway started them), so they may be another installation's; end them by hand if they are this one's"
            );
        }
        swept.killed
    }

    async fn end_earlier_attempts(
        &self,
        deployment_id: i64,
        job: &str,
        attempt: i64,
        within: Duration,
        cancel: &CancellationToken,
    ) -> Result<usize, RunResult> {
        let Some(installation) = self.installation.clone() else { return Ok(0) };
        // (None: beyond any instant, for a timeout that large.)
        let deadline = Instant::now().checked_add(within);
        let mut found = std::collections::HashSet::new();
        loop {
            let (i, name) = (installation.clone(), job.to_string());
            let (n, running) = tokio::task::spawn_blocking(move || earlier_attempts(&i, deployment_id, &name, attempt)).await.unwrap_or_default();
            // Done once a look finds nothing at all: one that ended some
            // may have missed a process caught mid-exec (no environment
            // for a moment).
            if n.is_empty() {
                return Ok(found.len());
            }
            found.extend(n);
            if running.is_empty() {
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let pids: Vec<String> =
                    running.iter().map(|(p, owner)| format!("{p} (started by Slipway process {})", owner.split('.').next().unwrap_or(owner))).collect();
                return Err(RunResult {
                    outcome: Outcome::Failed,
                    exit_code: None,
                    reason: Some(format!(
                        "processes of an earlier attempt of this job are still running on this host after {}: {}; attempt {attempt} does not start beside them",
                        humantime::format_duration(within),
                        pids.join(", ")
                    )),
                    parts: Vec::new(),
                });
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(RunResult { outcome: Outcome::Cancelled, exit_code: None, reason: Some("stopped on request".into()), parts: Vec::new() }),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn run(&self, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        let timeout = Duration::from_millis(req.spec.timeout_ms.max(1));
        let grace = Duration::from_millis(req.spec.kill_grace_ms);
        let mut cmd = match build_command(&req, self) {
            Ok(c) => c,
            Err(e) => return RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(e), parts: Vec::new() },
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let program = match &req.spec.command {
                    config::Command::Argv(a) => a.first().cloned().unwrap_or_default(),
                    config::Command::Shell(_) => "/bin/sh".into(),
                    config::Command::Rollout(s) => format!("rollout of {}", s.name),
                    config::Command::Fetch(a) => format!("fetch of {}", crate::http::shown_url(&a.url, true)),
                    config::Command::Pull(c) => format!("pull of {}", c.repository),
                    config::Command::Unreadable(_) => "an unreadable job".into(),
                };
                return RunResult { parts: Vec::new(),
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
                    RunResult { outcome: Outcome::Succeeded, exit_code: Some(0), reason: None, parts: Vec::new() }
                } else {
                    RunResult { outcome: Outcome::Failed, exit_code: code, reason: Some(why), parts: Vec::new() }
                }
            }
            End::Exited(Err(e)) => RunResult { parts: Vec::new(), outcome: Outcome::Failed, exit_code: None, reason: Some(format!("waiting for the process failed: {e}")) },
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
                    RunResult { parts: Vec::new(), outcome: Outcome::TimedOut, exit_code: code, reason: Some(format!("timed out after {}", humantime::format_duration(timeout))) }
                } else {
                    RunResult { outcome: Outcome::Cancelled, exit_code: code, reason: Some("stopped on request".into()), parts: Vec::new() }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleeping process with the given marks (`owner` None: ours).
    fn marked(installation: Option<&str>, owner: Option<&str>, job: Option<&str>) -> std::process::Child {
        let mut cmd = std::process::Command::new("sleep");
        let owner = owner.unwrap_or(owner_mark());
        cmd.arg("30").env(OWNER_ENV, installation.map(|i| format!("{owner}@{i}")).unwrap_or(owner.to_string())).env_remove(JOB_ENV);
        if let Some(j) = job {
            cmd.env(JOB_ENV, j);
        }
        let child = cmd.spawn().expect("spawn sleep");
        // Until its exec is complete, its environment reads empty.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{}/environ", child.id())).is_ok_and(|e| env_value(&e, OWNER_ENV).is_some()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    fn running(child: &std::process::Child) -> bool {
        proc_stat(child.id() as i32).is_some_and(|s| !s.zombie)
    }

    /// A mark of a Slipway process that does not exist.
    const DEAD: &str = "999999999.1";

    fn unique() -> String {
        format!("test-{}-{}", std::process::id(), rand::random::<u32>())
    }

    #[test]
    fn issue13_sweep_kills_only_this_installations_orphans() {
        let (ours, theirs) = (unique(), unique());
        let mut procs =
            [marked(Some(&ours), Some(DEAD), None), marked(Some(&theirs), Some(DEAD), None), marked(Some(&ours), None, None), marked(None, Some(DEAD), None)];
        // (No pause: an older Slipway on this host would kill the orphans.)
        let swept = sweep_orphans(&ours);
        let alive: Vec<bool> = procs.iter().map(running).collect();
        for p in &mut procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        assert_eq!(alive, [false, true, true, true], "only our installation's orphan is killed: {swept:?}");
        assert_eq!(swept.killed, 1);
        assert!(swept.still_running.is_empty());
        assert!(swept.unscoped.contains(&(procs[3].id() as i32)), "the unmarked orphan is reported: {swept:?}");
    }

    #[tokio::test]
    async fn issue13_a_retry_waits_for_a_live_attempt_and_ends_a_dead_ones() {
        let installation = unique();
        let target = LocalTarget::scoped(installation.clone());
        let cancel = CancellationToken::new();
        // A live owner's (ours) attempt 1 of job "j" of deployment 5: waited
        // for, never killed, and past the bound the retry does not start.
        let mut live = marked(Some(&installation), None, Some("5/1/j"));
        let waited = target.end_earlier_attempts(5, "j", 2, Duration::from_millis(300), &cancel).await;
        let reason = waited.err().and_then(|r| (r.outcome == Outcome::Failed).then_some(r.reason).flatten()).unwrap_or_default();
        assert!(
            reason.contains(&format!("{} (started by Slipway process {})", live.id(), std::process::id())) && reason.contains("attempt 2 does not start"),
            "{reason}"
        );
        assert!(running(&live), "a live owner's process is never killed from here");
        cancel.cancel();
        let stopped = target.end_earlier_attempts(5, "j", 2, Duration::from_secs(30), &cancel).await;
        assert_eq!(stopped.err().map(|r| r.outcome), Some(Outcome::Cancelled));
        let _ = live.kill();
        let _ = live.wait();
        // What escaped a live owner's attempt (not its child: a daemon the
        // job started) is not waited for, nor killed.
        let mut starter = std::process::Command::new("sh");
        starter.args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"]).env(OWNER_ENV, format!("{}@{installation}", owner_mark())).env(JOB_ENV, "5/1/j");
        let escaped: i32 = String::from_utf8_lossy(&starter.output().expect("run sh").stdout).trim().parse().expect("pid of the escaped sleep");
        let go = target.end_earlier_attempts(5, "j", 2, Duration::from_secs(30), &CancellationToken::new()).await;
        let escaped_running = proc_stat(escaped).is_some_and(|s| !s.zombie);
        // SAFETY: kill of the sleep this test started.
        unsafe {
            libc::kill(escaped, libc::SIGKILL);
        }
        assert_eq!(go.ok(), Some(0));
        assert!(escaped_running);
        // A dead owner's attempt is ended, and then the retry may start.
        // Another job, another deployment, a later attempt: left alone.
        // (An older Slipway on this host would kill all of these at its
        // next sweep: hence no pause between starting and looking.)
        let mut dead = marked(Some(&installation), Some(DEAD), Some("5/1/j"));
        let mut others = [
            marked(Some(&installation), Some(DEAD), Some("5/1/k")),
            marked(Some(&installation), Some(DEAD), Some("6/1/j")),
            marked(Some(&installation), Some(DEAD), Some("5/2/j")),
        ];
        let ended = target.end_earlier_attempts(5, "j", 2, Duration::from_secs(30), &CancellationToken::new()).await;
        let dead_running = running(&dead);
        let others_running: Vec<bool> = others.iter().map(running).collect();
        for p in others.iter_mut().chain([&mut dead]) {
            let _ = p.kill();
            let _ = p.wait();
        }
        assert_eq!(ended.ok(), Some(1));
        assert!(!dead_running);
        assert_eq!(others_running, [true, true, true]);
        // Without an installation nothing is looked at.
        assert_eq!(LocalTarget::default().end_earlier_attempts(5, "j", 2, Duration::ZERO, &cancel).await.ok(), Some(0));
    }
}
