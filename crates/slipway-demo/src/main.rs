//! A tiny HTTP service to deploy with Slipway: the quickstart and the
//! tests use it. Its behaviour comes from its version, so one binary
//! plays every release:
//!
//! - `GET /` answers `hello from demo <version>`;
//! - `GET /healthz` answers 200, except for versions starting with `3`
//!   ("v3 is broken"), which answer 500: a release that never becomes
//!   healthy;
//! - `serve` exits at once with code 4 (saying why on stderr) for
//!   versions starting with `9`: a release that crashes on boot, also in
//!   an image without a shell;
//! - `serve` for versions starting with `8` first fills memory (1 MiB at
//!   a time, touched, up to 1 GiB) before it listens: a release that a
//!   container's memory limit OOM-kills;
//! - `migrate --version V [--file F]` appends one line to F (default:
//!   `$SLIPWAY_DEMO_MIGRATIONS`, else `migrations.log`), so "exactly once
//!   per deployment" can be counted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "slipway-demo", about = "A demo HTTP service for Slipway's quickstart and tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP on HOST:PORT.
    Serve {
        #[arg(long)]
        port: u16,
        /// 0.0.0.0 inside a container, whose published port arrives there.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long)]
        version: String,
    },
    /// Append "migrated to VERSION" to FILE.
    Migrate {
        #[arg(long, env = "SLIPWAY_DEMO_MIGRATIONS", default_value = "migrations.log")]
        file: std::path::PathBuf,
        #[arg(long)]
        version: String,
    },
}

#[derive(serde::Deserialize)]
struct Slow {
    /// Answer after this many milliseconds (at most 10 s): lets tests
    /// see requests in flight during a rollout.
    delay_ms: Option<u64>,
}

async fn hello(State(version): State<String>, Query(slow): Query<Slow>) -> String {
    if let Some(ms) = slow.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    format!("hello from demo {version}\n")
}

async fn healthz(State(version): State<String>) -> (StatusCode, String) {
    if version.starts_with('3') {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("v{version} is broken: cannot reach its database\n"))
    } else {
        (StatusCode::OK, format!("ok {version}\n"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Migrate { file, version } => {
            let line = format!("migrated to {version}\n");
            let result = std::fs::OpenOptions::new().create(true).append(true).open(&file).and_then(|mut f| f.write_all(line.as_bytes()));
            match result {
                Ok(()) => {
                    println!("migration to {version} applied ({})", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("slipway-demo: cannot write {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Serve { version, .. } if version.starts_with('9') => {
            eprintln!("slipway-demo: version {version} cannot boot");
            ExitCode::from(4)
        }
        Cmd::Serve { version, .. } if version.starts_with('8') => {
            eprintln!("slipway-demo: version {version} fills memory before it listens");
            let mut hog: Vec<Vec<u8>> = Vec::new();
            for _ in 0..1024 {
                hog.push(vec![1u8; 1 << 20]);
            }
            eprintln!("slipway-demo: holding {} MiB and no limit stopped it", hog.len());
            ExitCode::from(5)
        }
        Cmd::Serve { port, host, version } => {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("slipway-demo: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let addr = SocketAddr::new(host, port);
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("slipway-demo: cannot listen on {addr}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                println!("demo {version} listening on {addr}");
                let app = Router::new().route("/", get(hello)).route("/healthz", get(healthz)).with_state(version);
                let stop = async {
                    use tokio::signal::unix::{SignalKind, signal};
                    if let Ok(mut term) = signal(SignalKind::terminate()) {
                        term.recv().await;
                    }
                };
                match axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("slipway-demo: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
