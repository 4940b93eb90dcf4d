//! Service instances on the local target: one process group each, owned
//! by this Slipway process (marked like jobs, with this process and this
//! installation, so a Slipway that died leaves nothing behind: the next
//! one of the same installation on this host kills them in its orphan
//! sweep, and the service manager starts the recorded version again).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{LocalTarget, describe, kill_group, pump};
use crate::process::program_path;
use crate::targets::{Instance, InstanceRequest, Lifeline, Stream, TargetError, TargetErrorKind};

pub struct LocalInstance {
    pgid: i32,
    addr: SocketAddr,
    life: Lifeline,
}

/// Start one instance listening on `port` of 127.0.0.1.
pub fn start(req: &InstanceRequest, target: &LocalTarget, port: u16) -> Result<Arc<dyn Instance>, TargetError> {
    let (argv, env) = req.filled(port);
    let Some(program) = argv.first() else { return Err(TargetError::new(TargetErrorKind::Refused, "empty command")) };
    let mut cmd = Command::new(program_path(program, &req.workdir));
    crate::process::hide_secret_sources(cmd.as_std_mut());
    cmd.args(&argv[1..])
        .current_dir(&req.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .envs(&env)
        .envs(req.secret_env.iter().map(|(k, v)| (k, v.expose())))
        .env("SLIPWAY_SERVICE", &req.service)
        .env("SLIPWAY_ENV", &req.environment)
        .env("SLIPWAY_VERSION", &req.version)
        .env("SLIPWAY_PORT", port.to_string());
    target.mark(cmd.as_std_mut(), None);
    let mut child = cmd.spawn().map_err(|e| TargetError::new(TargetErrorKind::Refused, format!("cannot start {program:?} in {}: {e}", req.workdir.display())))?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let (life, exit_tx) = Lifeline::new();
    let (tx, mut rx) = mpsc::channel::<super::super::Line>(256);
    let out_pump = child.stdout.take().map(|o| tokio::spawn(pump(o, Stream::Stdout, tx.clone())));
    let err_pump = child.stderr.take().map(|e| tokio::spawn(pump(e, Stream::Stderr, tx)));
    let collector = {
        let life = life.clone();
        tokio::spawn(async move {
            let keeper = life.keeper();
            while let Some(super::super::Line { stream, text, cut, .. }) = rx.recv().await {
                keeper.push_piece(stream, text, cut);
            }
        })
    };
    tokio::spawn(async move {
        let why = match child.wait().await {
            Ok(status) => describe(status).1,
            Err(e) => format!("waiting for it failed: {e}"),
        };
        // The group may hold more than the main process: it goes too.
        kill_group(pgid, libc::SIGKILL);
        // Its last words before the exit is announced: whoever asks why it
        // ended reads `last_output`. Bounded: a grandchild that escaped
        // the group may hold the pipes.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for p in [out_pump, err_pump].into_iter().flatten() {
                let _ = p.await;
            }
            let _ = collector.await;
        })
        .await;
        exit_tx.send(why);
    });
    Ok(Arc::new(LocalInstance { pgid, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), life }))
}

#[async_trait]
impl Instance for LocalInstance {
    fn id(&self) -> String {
        format!("pid {}", self.pgid)
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lifeline(&self) -> &Lifeline {
        &self.life
    }

    async fn stop(&self, grace: Duration) {
        self.life.end_group(self.pgid, grace).await
    }
}

impl Drop for LocalInstance {
    /// An instance nobody holds any more must not keep running unseen.
    fn drop(&mut self) {
        if self.life.exit().is_none() {
            kill_group(self.pgid, libc::SIGKILL);
        }
    }
}
