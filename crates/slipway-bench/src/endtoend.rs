//! The scheduler bench through the real binary: `slipway serve` node(s)
//! over a fresh store, then `slipway run` of every job, timed from the
//! command's start to its exit (what a user waits), beside the same
//! deployment's time on the server (`finished_at − created_at`). The
//! difference is what the CLI adds: its own start-up, the submit over
//! HTTP, and how soon it learns that the deployment ended.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{BenchError, Nodes, io};

/// How long a node may take to answer `/healthz`.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a node may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A `slipway serve` child; killed (its whole group) when dropped.
struct Node {
    child: tokio::process::Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain syscall on the group we created; ESRCH is ignored.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

impl Node {
    async fn start(bin: &Path, dir: &Path, store: &str, parallelism: usize, n: usize) -> Result<Node, BenchError> {
        let port = super::wrk::free_port().map_err(|e| BenchError::Slipway { graph: "end-to-end", reason: e.to_string() })?;
        let log_path = dir.join(format!("serve-{n}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(format!("cannot create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io(format!("cannot open {} twice", log_path.display())))?;
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(dir)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", store, "--parallelism", &parallelism.to_string()])
            .args(["--node-id", &format!("bench-{n}"), "--poll", "200ms"])
            .env_remove("SLIPWAY_STORE")
            .env_remove("SLIPWAY_TLS_CERT")
            .env_remove("SLIPWAY_TLS_KEY")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("cannot run {}", bin.display())))?;
        let mut node = Node { child, url: format!("http://127.0.0.1:{port}") };
        let http = http_client()?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                let said = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(BenchError::Slipway { graph: "end-to-end", reason: format!("slipway serve exited ({status}): {}", tail(&said)) });
            }
            if let Ok(r) = http.get(format!("{}/healthz", node.url)).send().await
                && r.status().is_success()
            {
                return Ok(node);
            }
            if started.elapsed() > START_LIMIT {
                let _ = node.child.start_kill();
                return Err(BenchError::Timeout { what: format!("slipway serve answering on {}", node.url), after: START_LIMIT });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL by `Drop` past the limit).
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain syscall on our child; ESRCH is ignored.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(STOP_LIMIT, self.child.wait()).await;
    }
}

fn http_client() -> Result<reqwest::Client, BenchError> {
    slipway::http::client(|b| b.timeout(Duration::from_secs(10)).no_proxy())
        .map_err(|e| BenchError::Slipway { graph: "end-to-end", reason: format!("cannot build an HTTP client: {e}") })
}

/// The last lines of a log, for an error.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Run every job of the graph in `dir` through `slipway run`; the CLI's
/// time and the server's.
pub(crate) async fn run(
    bin: &Path,
    dir: &Path,
    names: &[String],
    parallelism: usize,
    limit: Duration,
    nodes: &Nodes<'_>,
) -> Result<(Duration, Duration), BenchError> {
    let store = nodes.stores.fresh(dir).await?;
    let mut started = Vec::new();
    for n in 1..=nodes.count {
        started.push(Node::start(bin, dir, &store, parallelism, n).await?);
    }
    let result = timed_run(bin, dir, names, limit, &started[0].url).await;
    for node in started {
        node.stop().await;
    }
    result
}

async fn timed_run(bin: &Path, dir: &Path, names: &[String], limit: Duration, url: &str) -> Result<(Duration, Duration), BenchError> {
    let fail = |reason: String| BenchError::Slipway { graph: "end-to-end", reason };
    // Let the nodes go idle, so their start-up is not timed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let run = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(dir)
        .args(["--server", url, "run"])
        .args(names)
        .env_remove("SLIPWAY_TOKEN")
        .env_remove("SLIPWAY_CACERT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(limit, run).await {
        Err(_) => return Err(BenchError::Timeout { what: "slipway run".into(), after: limit }),
        Ok(r) => r.map_err(io(format!("cannot run {}", bin.display())))?,
    };
    let cli = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail(format!("slipway run exited {}: {} {}", out.status, tail(&stdout), tail(&String::from_utf8_lossy(&out.stderr)))));
    }
    // "deployment 1 accepted (event 1)"
    let id: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment ")?.split_once(" accepted")?.0.parse().ok())
        .ok_or_else(|| fail(format!("slipway run did not say which deployment it made: {}", tail(&stdout))))?;
    let detail: serde_json::Value = http_client()?
        .get(format!("{url}/api/v1/deployments/{id}"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(format!("GET deployment {id}: {e}")))?
        .json()
        .await
        .map_err(|e| fail(format!("GET deployment {id}: {e}")))?;
    let d = &detail["deployment"];
    let (Some(created), Some(finished)) = (d["created_at"].as_i64(), d["finished_at"].as_i64()) else {
        return Err(fail(format!("deployment {id} has no created_at/finished_at: {d}")));
    };
    if d["state"] != "succeeded" {
        return Err(fail(format!("deployment {id} ended {}", d["state"])));
    }
    Ok((cli, Duration::from_millis(finished.saturating_sub(created).max(0) as u64)))
}
