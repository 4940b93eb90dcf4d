//! `slipway bench docker`: a container service under `docker-compose` and under Slipway.

use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DockerBenchOptions {
    pub duration: Duration,
    pub connections: u32,
    pub threads: u32,
    pub rollout_instances: u32,
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DockerBenchError {
    #[error("not yet")]
    NotYet,
}

pub struct DockerBenchReport;

pub async fn run(_opts: DockerBenchOptions, _demo_bin: &Path) -> Result<DockerBenchReport, DockerBenchError> {
    Err(DockerBenchError::NotYet)
}
