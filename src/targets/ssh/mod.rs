//! SSH hosts: jobs and services on a fleet of servers, reached over SSH.
//! Host groups are `[[hosts]]` tables; a job with `hosts = "web"` runs on
//! every host of the group, batch by batch. On each host Slipway runs its
//! own binary as an agent (`slipway agent ssh …`, uploaded once per
//! checksum) that supervises the job's process there, so nothing from a
//! payload is ever a shell string and a process a partition cut off is
//! found and ended. Design: docs/design/ssh.md.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Capabilities, ConfigTables, JobRequest, Key, KeyTable, NodeContext, OutputSink, RunResult, Settings, TableKeys, Target, TargetError, TargetKind};

pub mod agent;
pub mod config;
pub mod session;

pub static KIND: Kind = Kind;

pub struct Kind;

#[async_trait]
impl TargetKind for Kind {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn about(&self) -> &'static str {
        "commands on groups of hosts over SSH ([[hosts]]), batch by batch"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { runs_jobs: true, remote: true, ..Capabilities::default() }
    }

    fn tables(&self) -> &'static [TableKeys] {
        &[config::HOSTS]
    }

    fn read_tables(&self, tables: &mut ConfigTables<'_, '_>) -> Option<Settings> {
        config::read_groups(tables)
    }

    fn job_keys(&self) -> &'static [Key] {
        config::JOB_KEYS
    }

    fn job_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        config::read_job(table)
    }

    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        Ok(Arc::new(SshTarget { installation: node.installation.clone() }))
    }

    async fn agent(&self, args: Vec<String>) -> Result<u8, String> {
        agent::main(args).await
    }
}

pub struct SshTarget {
    #[allow(dead_code)]
    installation: String,
}

#[async_trait]
impl Target for SshTarget {
    async fn run(&self, _request: JobRequest, _output: OutputSink, _cancel: CancellationToken) -> RunResult {
        RunResult::failed("jobs on hosts are being built (issue 15)")
    }
}
