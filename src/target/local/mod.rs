//! The `local` target: a job is a process group on this node.
//!
//! Each attempt gets its own process group, so a timeout or a cancel kills
//! everything the job started (SIGTERM, then SIGKILL after `kill_grace`),
//! and so does the end of the job: a job does not leave processes behind
//! (long-running things are services, not jobs). A small supervisor in the
//! group (see `split_supervisor`) kills the whole group if Slipway itself
//! dies, even by SIGKILL.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{JobRequest, MAX_LINE_BYTES, OutputSink, RunResult, Stream, Target};
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
            // A relative path with a slash is relative to the revision,
            // not to wherever Slipway was started.
            let program_path = if program.contains('/') && !program.starts_with('/') {
                req.workdir.join(&program).into_os_string()
            } else {
                program.into()
            };
            let mut c = Command::new(program_path);
            c.args(argv[1..].iter().map(|a| substitute(a, &req.values)));
            c
        }
        config::Command::Shell(line) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
    };
    cmd.current_dir(&req.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (k, v) in &req.values {
        cmd.env(format!("SLIPWAY_{}", k.to_ascii_uppercase()), v);
    }
    cmd.env("SLIPWAY_JOB", &req.job).env("SLIPWAY_ATTEMPT", req.attempt.to_string());
    for (k, v) in &req.spec.env {
        cmd.env(k, v);
    }
    let slipway = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (see `split_supervisor`).
    unsafe {
        cmd.pre_exec(move || {
            split_supervisor(slipway);
            Ok(())
        });
    }
    Ok(cmd)
}

extern "C" fn on_slipway_death(_: libc::c_int) {
    // SAFETY: kill is async-signal-safe.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// Runs in the forked child, already leader of the job's process group.
/// Forks once more: the grandchild returns and goes on to exec the job;
/// this process stays behind as the group's supervisor. It waits for the
/// job and exits with the job's status (so Slipway sees the job's exit
/// code or signal), and if Slipway dies — even by SIGKILL — the kernel's
/// parent-death signal makes it kill the whole group, grandchildren
/// included. Without it, processes a job started would outlive a crashed
/// node and could run beside the retry of an interrupted job.
///
/// # Safety
/// Only async-signal-safe calls: this runs after fork in a threaded process.
unsafe fn split_supervisor(slipway: libc::pid_t) {
    unsafe {
        let job = libc::fork();
        if job <= 0 {
            // The job itself (or, if fork failed, run it unsupervised with
            // the direct parent-death signal at least).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            return;
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_slipway_death as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1, 0, 0, 0);
        if libc::getppid() != slipway {
            libc::kill(0, libc::SIGKILL); // Slipway died before we got here.
        }
        // Stop and timeout signals are for the job; the supervisor only
        // passes the job's fate on.
        let mut ign: libc::sigaction = std::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::sigaction(sig, &ign, std::ptr::null_mut());
        }
        // Hold no descriptor of Slipway's: not the output pipes (their
        // readers wait for EOF), not std's exec-status pipe, not sockets.
        for fd in 0..3 {
            libc::close(fd);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        let mut status: libc::c_int = 0;
        loop {
            let r = libc::waitpid(job, &mut status, 0);
            if r == job {
                break;
            }
            if r == -1 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(70);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(70);
    }
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
    fn name(&self) -> &'static str {
        "local"
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
        for pump in [out, err].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        result
    }
}
