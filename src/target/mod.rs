//! Where jobs run, behind the [`Target`] trait.
//!
//! **Architecture Invariant:** the scheduler never sees a concrete target:
//! it hands a [`JobRequest`] to a `dyn Target` and gets a [`RunResult`]
//! back. Output goes through an [`OutputSink`] line by line; bounding it is
//! the scheduler's job, not the target's.
//!
//! Targets live in `target/<name>/`: `local` (processes on this node) for
//! now; Docker, SSH and ECS follow.

pub mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{JobSpec, Outcome};

pub use local::LocalTarget;

/// Everything a target needs to run one attempt of one job.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub deployment_id: i64,
    pub job: String,
    pub attempt: i64,
    pub spec: JobSpec,
    /// The materialized revision: the job's working directory.
    pub workdir: PathBuf,
    /// Values for `{placeholder}`s in argv commands and `SLIPWAY_*`
    /// environment variables (version, service, env, deployment, revision).
    pub values: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Lines of output, in order per stream.
pub type OutputSink = mpsc::Sender<(Stream, String)>;

/// How an attempt ended, as the target saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled`.
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// For people: "exit code 3", "killed by signal 9", "timed out after 5m".
    pub reason: Option<String>,
}

#[async_trait]
pub trait Target: Send + Sync + 'static {
    /// Run one attempt to the end. Must return within the spec's timeout
    /// plus its kill grace, and promptly once `cancel` fires.
    async fn run(&self, request: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult;

    /// Stop what jobs of a dead Slipway process left running on this
    /// target. Called when a node starts (before interrupted jobs are
    /// retried) and periodically. Returns how many it stopped.
    async fn sweep_orphans(&self) -> usize {
        0
    }
}

/// Longest line kept whole; longer ones are cut into pieces of this size
/// so one line without a newline cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
