//! placeholder until the bench module lands
#[derive(Debug, Clone)]
pub struct BenchOptions { pub jobs: usize, pub width: usize, pub parallelism: usize, pub seed: u64, pub sleep_min_ms: u64, pub sleep_max_ms: u64, pub json: bool }
#[derive(Debug, thiserror::Error)]
#[error("bench not built yet")]
pub struct BenchError;
pub async fn run(_opts: BenchOptions) -> Result<(), BenchError> { Err(BenchError) }
