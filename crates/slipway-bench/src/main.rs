//! The `slipway-bench` binary: `slipway-bench [scheduler|services|docker]`,
//! with the options `slipway bench` had before the benchmarks left the
//! product binary. Exit codes are the `slipway` command's.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use slipway::cli::exit;
use slipway_bench::{docker, service, wrk};

#[derive(Debug, Parser)]
#[command(
    name = "slipway-bench",
    version,
    about = "Slipway's benchmarks: the scheduler against ninja, the service path under wrk, Docker rollouts against docker-compose"
)]
struct Cli {
    #[arg(value_enum, default_value = "scheduler")]
    what: BenchWhat,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
    /// services, docker: each wrk run, in seconds.
    #[arg(long, default_value_t = 10)]
    wrk_secs: u64,
    /// services, docker: wrk's connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// services, docker: instances in the measured rollout.
    #[arg(long, default_value_t = 4)]
    instances: u32,
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    #[arg(long, default_value_t = 50)]
    width: usize,
    /// Slots for the no-op graph (Slipway's parallelism and ninja's -j).
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// scheduler: runs of the no-op graph through each, alternating (default
    /// 5); services: wrk runs against each front, alternating (default 2).
    /// Medians are reported: one run is at the mercy of whatever else the
    /// machine does.
    #[arg(long)]
    rounds: Option<usize>,
    /// Short-job graph (the random graph again): each job sleeps 0 to this, in ms.
    #[arg(long, default_value_t = 200)]
    short_max_ms: u64,
    /// Short-job graph: slots (Slipway's parallelism and ninja's -j).
    #[arg(long, default_value_t = 64)]
    short_parallelism: usize,
    /// Long-job graph: shortest job, in ms (with as many slots as the widest level).
    #[arg(long, default_value_t = 200)]
    sleep_min_ms: u64,
    /// Long-job graph: longest job, in ms.
    #[arg(long, default_value_t = 1000)]
    sleep_max_ms: u64,
    /// Chain graph: jobs, each needing the one before.
    #[arg(long, default_value_t = 200)]
    chain: usize,
    /// Chain graph: each job sleeps 0 to this, in ms.
    #[arg(long, default_value_t = 50)]
    chain_max_ms: u64,
    /// scheduler: the store, `sqlite` or a PostgreSQL URL whose user may
    /// CREATE DATABASE (each run gets a database of its own, dropped after).
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// scheduler: nodes sharing each graph (PostgreSQL only).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// scheduler: skip the runs through the real binary (`slipway serve`
    /// and `slipway run`).
    #[arg(long)]
    no_cli: bool,
    /// services, docker: the `slipway-demo` binary [default: next to this one].
    #[arg(long)]
    demo_bin: Option<PathBuf>,
    /// scheduler, docker: the `slipway` binary [default: next to this one].
    #[arg(long)]
    slipway_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchWhat {
    /// The scheduler against ninja on random graphs.
    Scheduler,
    /// The service proxy against the service hit directly (wrk), and the
    /// engine's own share of a rollout.
    Services,
    /// A container service: failed requests while `docker-compose up -d`
    /// recreates it and while Slipway rolls it out (wrk for `--wrk-secs`
    /// with `--connections`), and a rollout of `--instances` containers.
    Docker,
}

impl Cli {
    /// The options the load benches (`services`, `docker`) share.
    fn load_options(&self) -> wrk::LoadBenchOptions {
        wrk::LoadBenchOptions {
            duration: Duration::from_secs(self.wrk_secs),
            connections: self.connections,
            threads: 2,
            rollout_instances: self.instances,
            rounds: self.rounds.unwrap_or(service::ROUNDS),
            json: self.json,
        }
    }
}

/// The bench's outcome as an exit code and, on failure, what to print.
async fn run(cli: Cli) -> Result<(), (u8, String)> {
    let internal = |e: &dyn std::fmt::Display| (exit::INTERNAL, e.to_string());
    let demo = cli.demo_bin.clone().unwrap_or_else(service::default_demo_bin);
    match cli.what {
        BenchWhat::Services => service::run(cli.load_options(), &demo).await.map(drop).map_err(|e| internal(&e)),
        BenchWhat::Docker => {
            let slipway = cli.slipway_bin.clone().unwrap_or_else(|| slipway_bench::sibling_bin("slipway"));
            match docker::run(cli.load_options(), &slipway, &demo).await {
                Ok(_) => Ok(()),
                Err(e @ docker::DockerBenchError::Interrupted) => Err((exit::INTERRUPTED, e.to_string())),
                Err(e) => Err(internal(&e)),
            }
        }
        BenchWhat::Scheduler => {
            let store = match cli.store.as_str() {
                "sqlite" => slipway_bench::BenchStore::Sqlite,
                url if url.starts_with("postgres://") || url.starts_with("postgresql://") => slipway_bench::BenchStore::Postgres { admin_url: url.to_string() },
                other => return Err((exit::USAGE, format!("--store {other:?}: expected `sqlite` or a postgres:// URL"))),
            };
            let slipway = cli.slipway_bin.clone().unwrap_or_else(|| slipway_bench::sibling_bin("slipway"));
            slipway_bench::run(slipway_bench::BenchOptions {
                jobs: cli.jobs,
                width: cli.width,
                parallelism: cli.parallelism,
                seed: cli.seed,
                rounds: cli.rounds.unwrap_or(5),
                short_max_ms: cli.short_max_ms,
                short_parallelism: cli.short_parallelism,
                sleep_min_ms: cli.sleep_min_ms,
                sleep_max_ms: cli.sleep_max_ms,
                chain: cli.chain,
                chain_max_ms: cli.chain_max_ms,
                store,
                nodes: cli.nodes,
                cli: (!cli.no_cli).then_some(slipway),
                json: cli.json,
            })
            .await
            .map(drop)
            .map_err(|e| match e {
                slipway_bench::BenchError::Options(_) => (exit::USAGE, e.to_string()),
                e => internal(&e),
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The scheduler bench runs Slipway's scheduler in-process: its logs go
    // where `slipway serve`'s go, filtered the same way.
    slipway::cli::init_logging(false);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway-bench: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err((code, message)) => {
            let _ = writeln!(std::io::stderr(), "slipway-bench: {}", message.trim_end());
            ExitCode::from(code)
        }
    }
}
