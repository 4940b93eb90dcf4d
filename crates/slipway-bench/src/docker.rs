//! `slipway-bench docker`: one container service under `docker-compose`
//! and under Slipway, on this machine's Docker Engine.
//!
//! - **failed requests during a change**: the demo in one container,
//!   `wrk` against its stable address (compose: the published port;
//!   Slipway: its proxy's `listen`), and, a quarter into the run, the image
//!   changes from 1.0 to 2.0: compose by `docker-compose up -d` with the
//!   new tag (which stops the container and starts a new one), Slipway by
//!   a deploy (tag resolved to a digest through a registry, pulled,
//!   rolled out health-gated behind its proxy). Failed = wrk's non-2xx
//!   answers plus its socket errors. A prober beside wrk (a fresh
//!   connection every [`PROBE_EVERY`]) gives the longest stretch without a
//!   good answer, which does not depend on how fast wrk retries a refused
//!   connection the way its error count does.
//! - **rollout of 4 containers**: Slipway's rollout job, timed by the
//!   server's own record (the attempt's start and end, and each output
//!   line's timestamp), split into the health waits (from "started" to "is
//!   healthy"), the Engine creating and starting each container (from the
//!   line before "started"), retiring the old ones ("traffic →" to
//!   "stopped": the drain, which ends at once without traffic, then
//!   `docker stop` and removal) and the rest, Slipway's own. Compose
//!   recreates `deploy.replicas: 4` the way it does: all four stopped and
//!   started again at once, no health gate; its `up -d` time and the time
//!   until all four answer with the new version are reported.
//!
//! No image can be pulled here, so the bench assembles one per version the
//! way the Docker tests do: a root filesystem with `slipway-demo` at
//! `/demo`, the libraries `ldd` names, and a `/version` file (so each tag
//! is a different image), imported through the Engine API. Slipway pins
//! tags to digests through a registry: Debian's `docker-registry` runs on a
//! free 127.0.0.1 port for the bench (the Engine treats 127.0.0.0/8
//! registries as insecure, so plain HTTP works).
//!
//! Everything is named by a run id (images, compose projects, the Slipway
//! environment, which labels Slipway's containers) and removed at the end,
//! on error and on Ctrl-C too. Every subprocess and Engine call is bounded.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListContainersOptionsBuilder, PushImageOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::{StreamExt, TryFutureExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::wrk::{LoadBenchError, LoadBenchOptions, find_demo, find_wrk, free_port, io, read_wrk, run_wrk, socket_errors, wrk_version};
use super::{BenchError, TempDir, find_on_path, ms};
use slipway::targets::docker::{DockerError, DockerTarget};

/// The load test's change, and the timed rollouts after it.
pub const VERSIONS: [&str; 4] = ["1.0", "2.0", "2.1", "2.2"];
/// The container's port (the demo listens on it inside).
const CONTAINER_PORT: u16 = 8080;

// The service's settings, the same for compose where compose has them.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const HEALTHY_AFTER: u32 = 2;
const HEALTH_TIMEOUT: &str = "1s";
const HEALTH_DEADLINE: &str = "20s";
const DRAIN: Duration = Duration::from_secs(1);
const STOP_GRACE: &str = "5s";

/// One probe of the stable address every this long, beside wrk.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
const PROBE_LIMIT: Duration = Duration::from_secs(1);
/// Bounds: an Engine call, a docker-compose run, a deploy, start-ups.
const ENGINE_LIMIT: Duration = Duration::from_secs(60);
const COMPOSE_LIMIT: Duration = Duration::from_secs(90);
const DEPLOY_LIMIT: Duration = Duration::from_secs(120);
const START_LIMIT: Duration = Duration::from_secs(30);
const SERVE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DockerBenchError {
    /// What both load benches can meet: wrk or the demo missing, invalid
    /// options, I/O, timeouts, wrk failing.
    #[error(transparent)]
    Load(#[from] LoadBenchError),
    #[error("docker-compose not found: apt-get install docker-compose")]
    ComposeMissing,
    #[error("docker-registry not found (Slipway pins tags to digests through a registry): apt-get install docker-registry")]
    RegistryMissing,
    #[error("ldd not found (it names the libraries the demo image needs): apt-get install libc-bin")]
    LddMissing,
    #[error(transparent)]
    Unreachable(#[from] DockerError),
    #[error("Docker Engine: {0}")]
    Engine(String),
    #[error("docker-compose {args}: {reason}")]
    Compose { args: String, reason: String },
    #[error("docker-registry: {0}")]
    Registry(String),
    #[error("the slipway binary {0} does not exist (build it: cargo build --release -p slipway)")]
    SlipwayMissing(PathBuf),
    #[error("slipway serve: {0}")]
    Server(String),
    #[error("deploy {service} {version}: {reason}")]
    Deploy { service: String, version: String, reason: String },
    #[error("{0}")]
    Measure(String),
    #[error("interrupted by Ctrl-C")]
    Interrupted,
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Serialize)]
pub struct DockerBenchReport {
    /// wrk, dockerd, the containers, docker-compose and Slipway share its cores.
    pub machine: super::Machine,
    pub wrk_version: String,
    pub compose_version: String,
    pub engine_version: String,
    pub load: LoadBench,
    pub rollout: RolloutBench,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadBench {
    pub duration_secs: u64,
    pub connections: u32,
    pub threads: u32,
    /// When, into the wrk run, the change starts.
    pub change_at_secs: f64,
    pub from: String,
    pub to: String,
    pub compose: LoadRun,
    pub slipway: LoadRun,
}

/// One wrk run with a change in the middle.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRun {
    /// What made the change: `docker-compose up -d` or `slipway deploy`.
    pub change: String,
    /// Answers wrk read (any status).
    pub requests: u64,
    pub non_2xx: u64,
    /// wrk's socket errors: connect, read, write, timeout.
    pub socket_errors: [u64; 4],
    /// non_2xx + every socket error.
    pub failed: u64,
    /// failed ÷ (requests + socket errors): a socket error is a request
    /// that got no answer.
    pub failure_pct: f64,
    pub rps: f64,
    pub p99_ms: f64,
    /// From starting the change to its end (`up -d` returned; the
    /// deployment succeeded).
    pub change_secs: f64,
    /// The prober's longest stretch without a good answer: from the last
    /// good answer before a failed probe to the next good one.
    pub longest_gap_ms: f64,
    pub probes: u64,
    pub failed_probes: u64,
    /// From starting the change to the first answer from the new version.
    pub new_version_after_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutBench {
    pub instances: u32,
    pub health_interval_ms: f64,
    pub healthy_after: u32,
    pub drain_ms: f64,
    /// Timed rollouts, in order (the first is 1.0 → 2.0).
    pub slipway: Vec<SlipwayRollout>,
    /// The run with the median rollout time.
    pub slipway_median: SlipwayRollout,
    pub compose: Vec<ComposeRecreate>,
    /// The run with the median `up -d` time.
    pub compose_median: ComposeRecreate,
}

/// One Slipway rollout, split by its output lines (timestamps from the
/// server's record, in ms).
#[derive(Debug, Clone, Serialize)]
pub struct SlipwayRollout {
    pub from: String,
    pub to: String,
    /// The deploy as its client sees it, from sending the event to seeing
    /// the deployment succeeded (polled every 20ms): the tag resolved to a
    /// digest through the registry, the image fetched (here already
    /// local), the rollout.
    pub deploy_secs: f64,
    /// The rollout job's attempt, start to end.
    pub rollout_secs: f64,
    /// Sum over new containers of "started" → "is healthy": the demo's
    /// start-up, the health interval(s) and the checks.
    pub health_wait_secs: f64,
    pub health_waits_ms: Vec<f64>,
    /// batches × (healthy_after − 1) × interval: what the configuration
    /// alone makes the checks wait.
    pub health_configured_secs: f64,
    /// rollout − health waits: the figure to hold against compose's `up -d`.
    pub without_health_secs: f64,
    /// Sum over new containers of the line before "started" → "started":
    /// the Engine creating and starting each one.
    pub container_start_secs: f64,
    pub container_starts_ms: Vec<f64>,
    /// Sum over retirements of "traffic →" → "stopped": the drain (ends at
    /// once: nothing is in flight) and `docker stop` + removal.
    pub retire_secs: f64,
    pub retires_ms: Vec<f64>,
    /// rollout − health − container starts − retirements: planning, proxy
    /// swaps, the store write, output.
    pub slipway_own_secs: f64,
    /// "traffic →" lines: one per batch.
    pub batches: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComposeRecreate {
    pub from: String,
    pub to: String,
    /// `docker-compose up -d`, start to return.
    pub up_secs: f64,
    /// From starting `up -d` until every replica answers with the new version.
    pub serving_secs: f64,
}

impl DockerBenchReport {
    pub fn human(&self) -> String {
        let l = &self.load;
        let (c, s) = (&l.compose, &l.slipway);
        let r = &self.rollout;
        let mut out = format!(
            "slipway-bench docker: {}; {}; Docker Engine {}\n{} (wrk, dockerd, the containers, docker-compose and Slipway share the cores)\n\n\
             one container of the demo under load (wrk -t{} -c{} -d{}s; the image changes {} → {} {:.1}s in):\n",
            self.wrk_version,
            self.compose_version,
            self.engine_version,
            self.machine.human(),
            l.threads,
            l.connections,
            l.duration_secs,
            l.from,
            l.to,
            l.change_at_secs,
        );
        let row = |label: &str, a: String, b: String| format!("  {label:<46} {a:>22} {b:>22}\n");
        let errs = |x: &LoadRun| format!("{}/{}/{}/{}", x.socket_errors[0], x.socket_errors[1], x.socket_errors[2], x.socket_errors[3]);
        let after = |x: &LoadRun| x.new_version_after_secs.map(|t| format!("{t:.2}s")).unwrap_or_else(|| "never".into());
        out.push_str(&row("", "docker-compose up -d".into(), "slipway deploy".into()));
        out.push_str(&row("requests answered", c.requests.to_string(), s.requests.to_string()));
        out.push_str(&row("failed (non-2xx + socket errors)", c.failed.to_string(), s.failed.to_string()));
        out.push_str(&row("  non-2xx", c.non_2xx.to_string(), s.non_2xx.to_string()));
        out.push_str(&row("  socket errors connect/read/write/timeout", errs(c), errs(s)));
        out.push_str(&row("failure %", format!("{:.3}%", c.failure_pct), format!("{:.3}%", s.failure_pct)));
        out.push_str(&row("requests/s over the run", format!("{:.0}", c.rps), format!("{:.0}", s.rps)));
        out.push_str(&row("p99 latency", format!("{:.2}ms", c.p99_ms), format!("{:.2}ms", s.p99_ms)));
        out.push_str(&row("time of the change", format!("{:.2}s", c.change_secs), format!("{:.2}s", s.change_secs)));
        out.push_str(&row(
            &format!("longest gap without a good answer ({:.0}ms probes)", ms(PROBE_EVERY)),
            format!("{:.0}ms", c.longest_gap_ms),
            format!("{:.0}ms", s.longest_gap_ms),
        ));
        out.push_str(&row("failed probes", format!("{} of {}", c.failed_probes, c.probes), format!("{} of {}", s.failed_probes, s.probes)));
        out.push_str(&row(&format!("first answer from {} after the change began", l.to), after(c), after(s)));
        out.push_str("  (wrk reconnects at once after a refused or reset connection and counts every try: the count grows with the outage and the\n   load; the probes' longest gap is the outage itself)\n");

        let m = &r.slipway_median;
        let runs = |f: &dyn Fn(&SlipwayRollout) -> f64| r.slipway.iter().map(|x| format!("{:.3}", f(x))).collect::<Vec<_>>().join("/");
        let each = |total: f64, count: usize| total * 1000.0 / count.max(1) as f64;
        out.push_str(&format!(
            "\nrollout of {n} containers, {} (the median run by rollout time; every run on the \"runs\" lines):\n\
             \x20 slipway (rolling, surge 1, unavailable 0; GET /healthz every {:.0}ms, healthy after {}; drain {:.0}ms, which ends at once without traffic):\n\
             \x20   rollout job {:.3}s − health waits {:.3}s (the configuration alone: {:.3}s) = {:.3}s:\n\
             \x20     the Engine creating and starting the new containers, one at a time, {:.3}s ({:.0}ms each); retiring the old ones (drain + docker stop + remove) {:.3}s ({:.0}ms each); Slipway's own {:.3}s\n\
             \x20   slipway deploy as its client sees it (resolve the tag, fetch, roll out): {:.3}s\n\
             \x20   runs: rollout {} s; without health waits {} s; Slipway's own {} s\n",
            r.slipway.iter().map(|x| format!("{} → {}", x.from, x.to)).collect::<Vec<_>>().join(", "),
            r.health_interval_ms,
            r.healthy_after,
            r.drain_ms,
            m.rollout_secs,
            m.health_wait_secs,
            m.health_configured_secs,
            m.without_health_secs,
            m.container_start_secs,
            each(m.container_start_secs, m.container_starts_ms.len()),
            m.retire_secs,
            each(m.retire_secs, m.retires_ms.len()),
            m.slipway_own_secs,
            m.deploy_secs,
            runs(&|x| x.rollout_secs),
            runs(&|x| x.without_health_secs),
            runs(&|x| x.slipway_own_secs),
            n = r.instances,
        ));
        let cm = &r.compose_median;
        out.push_str(&format!(
            "  docker-compose (deploy.replicas {}: `up -d` stops every replica and starts new ones, all at once; no health gate):\n\
             \x20   up -d {:.3}s; every replica answers {} after {:.3}s\n\
             \x20   runs: up -d {} s; serving {} s\n",
            r.instances,
            cm.up_secs,
            cm.to,
            cm.serving_secs,
            r.compose.iter().map(|x| format!("{:.3}", x.up_secs)).collect::<Vec<_>>().join("/"),
            r.compose.iter().map(|x| format!("{:.3}", x.serving_secs)).collect::<Vec<_>>().join("/"),
        ));
        out
    }
}

// ---------------------------------------------------------------- generated files

/// The compose file, as JSON (which is YAML, and needs no YAML crate):
/// one service `web` running the demo at `version`. One replica publishes
/// `host_port`; several publish ephemeral ports (one host port cannot
/// serve several containers).
pub fn compose_file(image: &str, version: &str, replicas: u32, host_port: Option<u16>, run_id: &str) -> String {
    let ports = match host_port {
        Some(p) => format!("127.0.0.1:{p}:{CONTAINER_PORT}"),
        None => format!("127.0.0.1::{CONTAINER_PORT}"),
    };
    let mut web = json!({
        "image": format!("{image}:{version}"),
        "command": ["/demo", "serve", "--host", "0.0.0.0", "--port", CONTAINER_PORT.to_string(), "--version", version],
        "ports": [ports],
        "stop_grace_period": STOP_GRACE,
        "labels": { "slipway.bench": run_id },
    });
    if replicas != 1 {
        web["deploy"] = json!({ "replicas": replicas });
    }
    let file = json!({ "services": { "web": web } });
    // Serializing a Value cannot fail.
    serde_json::to_string_pretty(&file).unwrap_or_default()
}

/// The Slipway config: `web` (one container, under load) and `web4`
/// (`instances` containers, the timed rollouts), both from `image` on the
/// bench's registry, in the environment `env`.
pub fn slipway_toml(image: &str, env: &str, web_listen: SocketAddr, web4_listen: SocketAddr, instances: u32) -> String {
    let service = |name: &str, listen: SocketAddr, n: u32| {
        format!(
            r#"
[[service]]
name = "{name}"
target = "docker"
image = "{image}"
port = {CONTAINER_PORT}
listen = "{listen}"
instances = {n}
command = ["/demo", "serve", "--host", "0.0.0.0", "--port", "{CONTAINER_PORT}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "{}ms", timeout = "{HEALTH_TIMEOUT}", healthy_after = {HEALTHY_AFTER}, deadline = "{HEALTH_DEADLINE}" }}
rollout = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "{}ms" }}
stop_grace = "{STOP_GRACE}"
"#,
            HEALTH_INTERVAL.as_millis(),
            DRAIN.as_millis(),
        )
    };
    format!(
        "[project]\nname = \"slipway-bench-docker\"\n\n[[environment]]\nname = \"{env}\"\n{}{}",
        service("web", web_listen, 1),
        service("web4", web4_listen, instances)
    )
}

// ---------------------------------------------------------------- wrk and the prober

/// One probe: when (since the run began), and the version that answered
/// (`None`: refused, reset, not 200, too slow).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub at: Duration,
    pub version: Option<String>,
}

/// The longest stretch without a good answer: from the last good answer
/// before a failed probe to the next good one (or the last probe, if none
/// came back).
pub fn longest_gap(probes: &[Probe]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut last_good: Option<Duration> = None;
    let mut failing_since: Option<Duration> = None;
    for p in probes {
        match (&p.version, failing_since) {
            (Some(_), Some(since)) => {
                longest = longest.max(p.at.saturating_sub(last_good.unwrap_or(since)));
                failing_since = None;
                last_good = Some(p.at);
            }
            (Some(_), None) => last_good = Some(p.at),
            (None, None) => failing_since = Some(p.at),
            (None, Some(_)) => {}
        }
    }
    if let (Some(since), Some(end)) = (failing_since, probes.last()) {
        longest = longest.max(end.at.saturating_sub(last_good.unwrap_or(since)));
    }
    longest
}

/// GET / on a fresh connection: the version in "hello from demo V".
async fn probe_once(addr: SocketAddr) -> Result<String, String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.lines().next().unwrap_or("");
        if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
            return Err(format!("answered {status:?}"));
        }
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
        body.strip_prefix("hello from demo ").map(str::to_string).ok_or_else(|| format!("unexpected body {body:?}"))
    };
    tokio::time::timeout(PROBE_LIMIT, exchange).await.unwrap_or_else(|_| Err(format!("no answer within {}ms", PROBE_LIMIT.as_millis())))
}

async fn probe_until(addr: SocketAddr, since: Instant, stop: CancellationToken) -> Vec<Probe> {
    let mut probes = Vec::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return probes,
            _ = tick.tick() => {}
        }
        let version = probe_once(addr).await.ok();
        probes.push(Probe { at: since.elapsed(), version });
    }
}

/// Poll `addr` until the demo answers with `version`.
async fn wait_serving(addr: SocketAddr, version: &str, limit: Duration) -> Result<(), DockerBenchError> {
    let start = Instant::now();
    loop {
        let last = match probe_once(addr).await {
            Ok(v) if v == version => return Ok(()),
            Ok(v) => format!("it answers {v}"),
            Err(e) => e,
        };
        if start.elapsed() > limit {
            return Err(LoadBenchError::Timeout { what: format!("waiting for {addr} to answer with {version} (last: {last})"), after: limit }.into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// wrk and the prober against `addr` for the run's duration; `change`
/// starts `lead` in. The change must end before wrk does.
async fn under_load<F, Fut>(
    wrk: &Path,
    opts: &LoadBenchOptions,
    addr: SocketAddr,
    lead: Duration,
    new_version: &str,
    what: &str,
    change: F,
) -> Result<LoadRun, DockerBenchError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), DockerBenchError>>,
{
    let begin = Instant::now();
    let stop = CancellationToken::new();
    let work = async {
        let changed = async {
            tokio::time::sleep(lead).await;
            let t0 = begin.elapsed();
            change().await?;
            Ok::<_, DockerBenchError>((t0, begin.elapsed()))
        };
        let r = tokio::try_join!(run_wrk(wrk, opts, addr).map_err(DockerBenchError::from), changed);
        let wrk_end = begin.elapsed();
        stop.cancel();
        r.map(|(w, c)| (w, c, wrk_end))
    };
    let (probes, result) = tokio::join!(probe_until(addr, begin, stop.clone()), work);
    let (w, (t0, t1), wrk_end) = result?;
    if t1 > wrk_end {
        return Err(DockerBenchError::Measure(format!(
            "{what} took {:.1}s and outlasted the load ({}s from {:.1}s in): the failure count would miss its end; raise --wrk-secs",
            (t1 - t0).as_secs_f64(),
            opts.duration.as_secs(),
            t0.as_secs_f64()
        )));
    }
    let parsed = read_wrk(&w)?;
    let socket = socket_errors(&w);
    let socket_sum: u64 = socket.iter().sum();
    let failed = parsed.non_2xx + socket_sum;
    let attempts = parsed.requests + socket_sum;
    Ok(LoadRun {
        change: what.to_string(),
        requests: parsed.requests,
        non_2xx: parsed.non_2xx,
        socket_errors: socket,
        failed,
        failure_pct: if attempts == 0 { 0.0 } else { failed as f64 * 100.0 / attempts as f64 },
        rps: parsed.requests_per_sec,
        p99_ms: ms(parsed.p99),
        change_secs: (t1 - t0).as_secs_f64(),
        longest_gap_ms: ms(longest_gap(&probes)),
        probes: probes.len() as u64,
        failed_probes: probes.iter().filter(|p| p.version.is_none()).count() as u64,
        new_version_after_secs: probes.iter().find(|p| p.at >= t0 && p.version.as_deref() == Some(new_version)).map(|p| (p.at - t0).as_secs_f64()),
    })
}

// ---------------------------------------------------------------- subprocesses

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Run a program to its end within `limit`: (success, stdout + stderr).
async fn run_bounded(program: &Path, args: &[&str], cwd: Option<&Path>, limit: Duration) -> Result<(bool, String), DockerBenchError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let what = format!("{} {}", program.display(), args.join(" "));
    match tokio::time::timeout(limit, cmd.output()).await {
        Err(_) => Err(LoadBenchError::Timeout { what, after: limit }.into()),
        Ok(Err(e)) => Err(LoadBenchError::Io { what: format!("cannot run {what}"), source: e }.into()),
        Ok(Ok(out)) => Ok((out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))),
    }
}

/// One docker-compose project: its file and name.
struct Compose {
    bin: PathBuf,
    dir: PathBuf,
    file: PathBuf,
    project: String,
}

impl Compose {
    async fn run(&self, args: &[&str]) -> Result<String, DockerBenchError> {
        let file = self.file.display().to_string();
        let mut all = vec!["-f", &file, "-p", &self.project];
        all.extend_from_slice(args);
        let (ok, out) = run_bounded(&self.bin, &all, Some(&self.dir), COMPOSE_LIMIT).await?;
        if ok { Ok(out) } else { Err(DockerBenchError::Compose { args: args.join(" "), reason: out.trim().to_string() }) }
    }

    fn write(&self, text: &str) -> Result<(), DockerBenchError> {
        Ok(std::fs::write(&self.file, text).map_err(io(format!("cannot write {}", self.file.display())))?)
    }

    async fn up(&self) -> Result<(), DockerBenchError> {
        self.run(&["up", "-d"]).await.map(drop)
    }
}

// ---------------------------------------------------------------- the image

/// The demo and every library `ldd` names, read once: (path in the image, bytes).
async fn image_files(demo: &Path) -> Result<Vec<(String, Vec<u8>)>, DockerBenchError> {
    let ldd = find_on_path("ldd").ok_or(DockerBenchError::LddMissing)?;
    let demo_s = demo.display().to_string();
    let (ok, out) = run_bounded(&ldd, &[&demo_s], None, Duration::from_secs(20)).await?;
    if !ok {
        return Err(DockerBenchError::Measure(format!("ldd {demo_s} failed: {}", out.trim())));
    }
    let mut libs: Vec<String> = out.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string)).collect();
    libs.sort();
    libs.dedup();
    let mut files = vec![("demo".to_string(), std::fs::read(demo).map_err(io(format!("cannot read {demo_s}")))?)];
    for lib in libs {
        // Read whole (symlinks followed): the image holds plain files.
        let bytes = std::fs::read(&lib).map_err(io(format!("cannot read {lib}")))?;
        files.push((lib.trim_start_matches('/').to_string(), bytes));
    }
    Ok(files)
}

/// A tar of / for one version: the files, and /version, which makes each
/// version a different image.
fn rootfs(files: &[(String, Vec<u8>)], version: &str) -> Result<Vec<u8>, DockerBenchError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8], mode: u32| {
        // Plain ustar entries: the Engine's importer refuses GNU sparse ones.
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, name, bytes).map_err(io(format!("cannot add {name} to the image")))
    };
    for (name, bytes) in files {
        add(name, bytes, 0o755)?;
    }
    add("version", format!("{version}\n").as_bytes(), 0o644)?;
    Ok(b.into_inner().map_err(io("cannot finish the image's tar"))?)
}

/// Bound an Engine call; its error says what was being done.
async fn engine<T, E: std::fmt::Display>(what: &str, f: impl Future<Output = Result<T, E>>) -> Result<T, DockerBenchError> {
    match tokio::time::timeout(ENGINE_LIMIT, f).await {
        Err(_) => Err(LoadBenchError::Timeout { what: what.to_string(), after: ENGINE_LIMIT }.into()),
        Ok(Err(e)) => Err(DockerBenchError::Engine(format!("{what}: {e}"))),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Import `tar` as `repo:tag`; returns the image id.
async fn import(docker: &Docker, tar: Vec<u8>, repo: &str, tag: &str) -> Result<String, DockerBenchError> {
    let what = format!("importing the demo image as {repo}:{tag}");
    engine(&what, async {
        let opts = CreateImageOptionsBuilder::default().from_src("-").repo(repo).tag(tag).build();
        let mut s = docker.create_image(Some(opts), Some(bollard::body_full(tar.into())), None);
        while let Some(r) = s.next().await {
            let info = r.map_err(|e| e.to_string())?;
            if let Some(e) = info.error_detail {
                return Err(e.message.unwrap_or_else(|| "failed".into()));
            }
        }
        Ok(())
    })
    .await?;
    let info = engine(&format!("inspecting {repo}:{tag}"), docker.inspect_image(&format!("{repo}:{tag}"))).await?;
    info.id.ok_or_else(|| DockerBenchError::Engine(format!("{repo}:{tag} has no id")))
}

async fn push(docker: &Docker, local: &str, remote_repo: &str, tag: &str) -> Result<(), DockerBenchError> {
    let opts = TagImageOptionsBuilder::default().repo(remote_repo).tag(tag).build();
    engine(&format!("tagging {local} as {remote_repo}:{tag}"), docker.tag_image(local, Some(opts))).await?;
    engine(&format!("pushing {remote_repo}:{tag} to the bench's registry"), async {
        let mut s = docker.push_image(remote_repo, Some(PushImageOptionsBuilder::default().tag(tag).build()), None);
        while let Some(r) = s.next().await {
            let info = r.map_err(|e| e.to_string())?;
            if let Some(e) = info.error_detail {
                return Err(e.message.unwrap_or_else(|| "failed".into()));
            }
        }
        Ok(())
    })
    .await
}

/// Running containers with `label`, and the host address each publishes
/// for the container port.
async fn published(docker: &Docker, label: &str) -> Result<Vec<SocketAddr>, DockerBenchError> {
    let filters = HashMap::from([("label", vec![label])]);
    let list = engine("listing containers", docker.list_containers(Some(ListContainersOptionsBuilder::default().filters(&filters).build()))).await?;
    Ok(list
        .iter()
        .filter_map(|c| c.ports.iter().flatten().find(|p| p.private_port == CONTAINER_PORT && p.public_port.is_some()).and_then(|p| p.public_port))
        .map(local)
        .collect())
}

/// Force-remove every container (running or not) with `label`; how many.
async fn remove_labelled(docker: &Docker, label: &str) -> Result<usize, DockerBenchError> {
    let filters = HashMap::from([("label", vec![label])]);
    let list = engine("listing containers", docker.list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))).await?;
    let mut removed = 0;
    for id in list.iter().filter_map(|c| c.id.as_deref()) {
        engine(&format!("removing container {id}"), docker.remove_container(id, Some(RemoveContainerOptionsBuilder::default().force(true).build()))).await?;
        removed += 1;
    }
    Ok(removed)
}

// ---------------------------------------------------------------- Slipway's side

/// The bench's client of the Slipway API it starts.
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    slipway::http::client(|b| b.timeout(Duration::from_secs(10)))
}

/// `slipway serve` on the bench config, and its API.
struct Server {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Server {
    async fn start(exe: &Path, config_dir: &Path, store: &Path, log: PathBuf) -> Result<Server, DockerBenchError> {
        let port = free_port()?;
        let out = std::fs::File::create(&log).map_err(io(format!("cannot create {}", log.display())))?;
        let err = out.try_clone().map_err(io("cannot duplicate the server log"))?;
        let child = tokio::process::Command::new(exe)
            .arg("--config")
            .arg(config_dir)
            .args(["serve", "--listen", &local(port).to_string(), "--shutdown-grace", "5s", "--store"])
            .arg(format!("sqlite://{}", store.display()))
            .env_remove("SLIPWAY_STORE")
            .env_remove("SLIPWAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("cannot start {} serve", exe.display())))?;
        let http = http_client().map_err(|e| DockerBenchError::Server(e.to_string()))?;
        let mut server = Server { child, url: format!("http://{}", local(port)), log, http };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(DockerBenchError::Server(format!("exited at start ({status}): {}", server.log_tail(20))));
            }
            if let Ok(r) = server.http.get(format!("{}/healthz", server.url)).send().await
                && r.status().is_success()
            {
                return Ok(server);
            }
            if start.elapsed() > START_LIMIT {
                return Err(LoadBenchError::Timeout {
                    what: format!("slipway serve answering on {} (its log: {})", server.url, server.log_tail(10)),
                    after: START_LIMIT,
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn get(&self, path: &str) -> Result<Value, DockerBenchError> {
        let r = self.http.get(format!("{}{path}", self.url)).send().await.map_err(|e| DockerBenchError::Server(format!("GET {path}: {e}")))?;
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| DockerBenchError::Server(format!("GET {path}: {e}")))?;
        if !status.is_success() {
            return Err(DockerBenchError::Server(format!("GET {path}: {status} {body}")));
        }
        Ok(body)
    }

    /// Deploy and wait for the end; the deployment's detail.
    async fn deploy(&self, env: &str, service: &str, version: &str) -> Result<Value, DockerBenchError> {
        let fail = |reason: String| DockerBenchError::Deploy { service: service.into(), version: version.into(), reason };
        let body = json!({ "kind": "deploy", "service": service, "version": version, "environment": env });
        let r = self.http.post(format!("{}/api/v1/events", self.url)).json(&body).send().await.map_err(|e| fail(e.to_string()))?;
        let status = r.status();
        let answer: Value = r.json().await.map_err(|e| fail(format!("{status}: {e}")))?;
        let Some(id) = answer["deployment_id"].as_i64() else {
            return Err(fail(format!("refused ({status}): {}", answer["error"]["message"].as_str().unwrap_or(&answer.to_string()))));
        };
        let start = Instant::now();
        loop {
            let detail = self.get(&format!("/api/v1/deployments/{id}")).await?;
            match detail["deployment"]["state"].as_str() {
                Some("queued" | "running") => {}
                Some("succeeded") => return Ok(detail),
                other => {
                    let reason = detail["deployment"]["reason"].as_str().unwrap_or("no reason given");
                    let logs = self.get(&format!("/api/v1/deployments/{id}/logs?limit=10000")).await.unwrap_or(Value::Null);
                    let lines: Vec<String> =
                        logs.as_array().map(|a| a.iter().filter_map(|l| l["line"].as_str().map(str::to_string)).collect()).unwrap_or_default();
                    let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
                    return Err(fail(format!("deployment {id} ended {}: {reason}; its last lines: {tail}", other.unwrap_or("in an unknown state"))));
                }
            }
            if start.elapsed() > DEPLOY_LIMIT {
                return Err(LoadBenchError::Timeout { what: format!("deployment {id} of {service} {version}"), after: DEPLOY_LIMIT }.into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (it stops its containers), then SIGKILL if it lingers.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(SERVE_LIMIT, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Split a rollout by its lines (`(ts ms, line without "[rollout] ")`);
/// `start_ms`/`end_ms`: the attempt's. See [`SlipwayRollout`].
pub fn split_rollout(from: &str, to: &str, deploy: Duration, start_ms: i64, end_ms: i64, lines: &[(i64, String)]) -> SlipwayRollout {
    let mut health = Vec::new();
    let mut starts = Vec::new();
    let mut retires = Vec::new();
    let mut batches = 0;
    let mut started: Vec<(String, i64)> = Vec::new();
    let mut prev = start_ms;
    for (i, (at, line)) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("started ") {
            // "started NAME VERSION on ADDR (container ID)"
            if let Some(addr) = rest.split(" on ").nth(1).and_then(|r| r.split_whitespace().next()) {
                started.push((addr.to_string(), *at));
            }
            starts.push(at - prev);
        } else if let Some((addr, _)) = line.split_once(" is healthy: ") {
            if let Some((_, t0)) = started.iter().find(|(a, _)| a == addr) {
                health.push(at - t0);
            }
        } else if line.starts_with("traffic →") {
            batches += 1;
        } else if line.starts_with("stopped ") && i > 0 {
            // The line before is "traffic →" (or another "stopped" of the
            // same retirement, which then adds ~0).
            retires.push(at - lines[i - 1].0);
        }
        prev = *at;
    }
    let sum = |v: &[i64]| v.iter().sum::<i64>();
    let secs = |v: &[i64]| sum(v) as f64 / 1000.0;
    let rollout = (end_ms - start_ms) as f64 / 1000.0;
    let health_secs = secs(&health);
    // In whole ms, as recorded: no float dust such as "-0.000".
    let own_ms = end_ms - start_ms - sum(&health) - sum(&starts) - sum(&retires);
    let configured = (HEALTH_INTERVAL * HEALTHY_AFTER.saturating_sub(1) * batches as u32).as_secs_f64();
    let list = |v: &[i64]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    SlipwayRollout {
        from: from.into(),
        to: to.into(),
        deploy_secs: deploy.as_secs_f64(),
        rollout_secs: rollout,
        health_wait_secs: health_secs,
        health_waits_ms: list(&health),
        health_configured_secs: configured,
        without_health_secs: (end_ms - start_ms - sum(&health)) as f64 / 1000.0,
        container_start_secs: secs(&starts),
        container_starts_ms: list(&starts),
        retire_secs: secs(&retires),
        retires_ms: list(&retires),
        slipway_own_secs: own_ms as f64 / 1000.0,
        batches,
    }
}

/// The rollout split of a finished deployment of `service`.
async fn rollout_of(server: &Server, detail: &Value, deploy: Duration, service: &str, from: &str, to: &str) -> Result<SlipwayRollout, DockerBenchError> {
    let d = &detail["deployment"];
    let id = d["id"].as_i64().ok_or_else(|| DockerBenchError::Server(format!("a deployment without an id: {d}")))?;
    let job = format!("{service}.rollout");
    let attempt = detail["attempts"]
        .as_array()
        .and_then(|a| a.iter().rfind(|x| x["job"].as_str() == Some(job.as_str())))
        .ok_or_else(|| DockerBenchError::Server(format!("deployment {id} has no attempt of {job}")))?;
    let (start, end) = (attempt["started_at"].as_i64().unwrap_or(0), attempt["finished_at"].as_i64().unwrap_or(0));
    let logs = server.get(&format!("/api/v1/deployments/{id}/logs?job={job}&limit=10000")).await?;
    let lines: Vec<(i64, String)> = logs
        .as_array()
        .map(|a| a.iter().filter_map(|l| Some((l["ts"].as_i64()?, l["line"].as_str()?.strip_prefix("[rollout] ")?.to_string()))).collect())
        .unwrap_or_default();
    Ok(split_rollout(from, to, deploy, start, end, &lines))
}

// ---------------------------------------------------------------- the run

/// What the bench started, so that it can all go however the run ends.
struct Leftovers {
    docker: Docker,
    images: Vec<String>,
    registry: Option<tokio::process::Child>,
    server: Option<Server>,
    compose: Vec<Compose>,
    /// Slipway's environment: its containers carry `slipway.environment=` it.
    env: String,
}

impl Leftovers {
    /// Remove everything; returns what could not be removed.
    async fn clean(mut self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        match remove_labelled(&self.docker, &format!("slipway.environment={}", self.env)).await {
            Ok(0) => {}
            Ok(n) => eprintln!("slipway-bench docker: removed {n} container(s) slipway serve left"),
            Err(e) => left.push(format!("Slipway's containers (label slipway.environment={}): {e}", self.env)),
        }
        for c in &self.compose {
            if let Err(e) = c.run(&["down", "--timeout", "5"]).await {
                left.push(format!("compose project {}: {e}", c.project));
            }
            // `down` may have failed or been cut short: what it left, by its labels.
            if let Err(e) = remove_labelled(&self.docker, &format!("com.docker.compose.project={}", c.project)).await {
                left.push(format!("compose project {}: {e}", c.project));
            }
            let network = format!("{}_default", c.project);
            if let Ok(Ok(_)) =
                tokio::time::timeout(ENGINE_LIMIT, self.docker.inspect_network(&network, None::<bollard::query_parameters::InspectNetworkOptions>)).await
                && let Err(e) = engine(&format!("removing network {network}"), self.docker.remove_network(&network)).await
            {
                left.push(e.to_string());
            }
        }
        if let Some(mut registry) = self.registry.take() {
            let _ = registry.kill().await;
        }
        for id in &self.images {
            let opts = RemoveImageOptionsBuilder::default().force(true).build();
            match tokio::time::timeout(ENGINE_LIMIT, self.docker.remove_image(id, Some(opts), None)).await {
                Ok(Ok(_)) => {}
                Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => {}
                Ok(Err(e)) => left.push(format!("image {id}: {e}")),
                Err(_) => left.push(format!("image {id}: the Engine did not answer within {}s", ENGINE_LIMIT.as_secs())),
            }
        }
        left
    }
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:x}{:05x}", std::process::id(), nanos >> 12)
}

/// Run both measurements, print the report (human or JSON) to stdout and
/// return it. `slipway_bin` is the `slipway` binary that serves, `demo_bin`
/// the `slipway-demo` binary ([`super::sibling_bin`] finds both next to
/// `slipway-bench`).
pub async fn run(opts: LoadBenchOptions, slipway_bin: &Path, demo_bin: &Path) -> Result<DockerBenchReport, DockerBenchError> {
    let started = super::Machine::now();
    opts.check_wrk()?;
    if opts.duration < Duration::from_secs(4) || opts.duration.subsec_nanos() != 0 {
        return Err(LoadBenchError::Options("--wrk-secs must be a whole number of seconds, at least 4 (the change needs room)".into()).into());
    }
    if !(1..=16).contains(&opts.rollout_instances) {
        return Err(LoadBenchError::Options("--instances must be between 1 and 16".into()).into());
    }
    let wrk = find_wrk()?;
    let compose_bin = find_on_path("docker-compose").ok_or(DockerBenchError::ComposeMissing)?;
    let registry_bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_on_path("docker-registry"))
        .ok_or(DockerBenchError::RegistryMissing)?;
    let demo = find_demo(demo_bin)?;
    let slipway = std::fs::canonicalize(slipway_bin).ok().filter(|p| p.is_file()).ok_or_else(|| DockerBenchError::SlipwayMissing(slipway_bin.to_path_buf()))?;
    let target = DockerTarget::connect().await?;
    let docker = target.client().clone();
    let dir = TempDir::create()?;
    let id = run_id();
    let mut left = Leftovers { docker: docker.clone(), images: Vec::new(), registry: None, server: None, compose: Vec::new(), env: format!("bench-{id}") };

    let measured = tokio::select! {
        r = measure(&opts, started, &wrk, &compose_bin, &registry_bin, &slipway, &demo, &dir.0, &id, &mut left) => r,
        _ = tokio::signal::ctrl_c() => Err(DockerBenchError::Interrupted),
    };
    eprintln!("slipway-bench docker: cleaning up (slipway serve, containers, compose projects, the registry, images)");
    let not_removed = left.clean().await;
    drop(dir);
    for what in &not_removed {
        eprintln!("slipway-bench docker: WARNING: not removed: {what}");
    }
    let report = measured?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    opts: &LoadBenchOptions,
    machine: super::Machine,
    wrk: &Path,
    compose_bin: &Path,
    registry_bin: &Path,
    slipway: &Path,
    demo: &Path,
    dir: &Path,
    id: &str,
    left: &mut Leftovers,
) -> Result<DockerBenchReport, DockerBenchError> {
    let progress = |msg: &str| eprintln!("slipway-bench docker: {msg}");
    let docker = left.docker.clone();
    let engine_version = engine("asking the Engine's version", docker.version()).await?.version.unwrap_or_else(|| "(unknown)".into());
    let (_, compose_version) = run_bounded(compose_bin, &["version", "--short"], None, COMPOSE_LIMIT).await?;
    let compose_version = format!("docker-compose {}", compose_version.lines().next().unwrap_or("").trim());
    let wrk_version = wrk_version(wrk).await?;

    // The images: one per version, local tags for compose.
    progress(&format!("assembling the demo image ({} versions) from {}", VERSIONS.len(), demo.display()));
    let repo = format!("slipway-bench-{id}/demo");
    let files = image_files(demo).await?;
    for v in VERSIONS {
        let image = import(&docker, rootfs(&files, v)?, &repo, v).await?;
        left.images.push(image);
    }

    // The registry Slipway resolves tags through.
    let reg_dir = dir.join("registry");
    std::fs::create_dir_all(&reg_dir).map_err(io(format!("cannot create {}", reg_dir.display())))?;
    let reg_port = free_port()?;
    let reg_config = reg_dir.join("config.yml");
    std::fs::write(
        &reg_config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{reg_port}\n",
            reg_dir.join("data").display()
        ),
    )
    .map_err(io(format!("cannot write {}", reg_config.display())))?;
    let reg_log_path = dir.join("registry.log");
    let reg_log = std::fs::File::create(&reg_log_path).map_err(io("cannot create the registry's log"))?;
    let child = tokio::process::Command::new(registry_bin)
        .arg("serve")
        .arg(&reg_config)
        .stdin(Stdio::null())
        .stdout(reg_log.try_clone().map_err(io("cannot duplicate the registry's log"))?)
        .stderr(reg_log)
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("cannot start {}", registry_bin.display())))?;
    left.registry = Some(child);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(local(reg_port)).await.is_err() {
        if let Some(Ok(Some(status))) = left.registry.as_mut().map(|c| c.try_wait()) {
            let log = std::fs::read_to_string(&reg_log_path).unwrap_or_default();
            return Err(DockerBenchError::Registry(format!("exited at start ({status}): {}", log.trim())));
        }
        if start.elapsed() > START_LIMIT {
            return Err(LoadBenchError::Timeout { what: format!("docker-registry listening on 127.0.0.1:{reg_port}"), after: START_LIMIT }.into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let remote = format!("127.0.0.1:{reg_port}/slipway-bench-{id}/demo");
    progress(&format!("pushing {} tags to {remote}", VERSIONS.len()));
    for v in VERSIONS {
        push(&docker, &format!("{repo}:{v}"), &remote, v).await?;
    }

    let lead = Duration::from_secs_f64(opts.duration.as_secs_f64() / 4.0);
    let (from, to) = (VERSIONS[0], VERSIONS[1]);

    // Compose, one container under load.
    let compose_dir = dir.join("compose");
    std::fs::create_dir_all(&compose_dir).map_err(io(format!("cannot create {}", compose_dir.display())))?;
    let project = |what: &str| Compose {
        bin: compose_bin.to_path_buf(),
        dir: compose_dir.clone(),
        file: compose_dir.join(format!("{what}.yml")),
        project: format!("slipway-bench-{id}-{what}"),
    };
    let load_port = free_port()?;
    left.compose.push(project("load"));
    let c = &left.compose[0];
    c.write(&compose_file(&repo, from, 1, Some(load_port), id))?;
    progress(&format!("docker-compose: {from} on 127.0.0.1:{load_port}, then {from} → {to} under wrk -c{} -d{}s", opts.connections, opts.duration.as_secs()));
    c.up().await?;
    wait_serving(local(load_port), from, START_LIMIT).await?;
    let compose_load = under_load(wrk, opts, local(load_port), lead, to, "docker-compose up -d", || async {
        c.write(&compose_file(&repo, to, 1, Some(load_port), id))?;
        c.up().await
    })
    .await?;
    wait_serving(local(load_port), to, START_LIMIT).await?;
    c.run(&["down", "--timeout", "5"]).await?;

    // Compose, the replicas recreated.
    let n = opts.rollout_instances;
    left.compose.push(project("replicas"));
    let c = &left.compose[1];
    let label = format!("com.docker.compose.project={}", c.project);
    let all_serving = |version: &'static str, t0: Instant| {
        let label = label.clone();
        let docker = docker.clone();
        async move {
            loop {
                let addrs = published(&docker, &label).await?;
                if addrs.len() == n as usize {
                    let mut ok = true;
                    for a in &addrs {
                        ok &= probe_once(*a).await.is_ok_and(|v| v == version);
                    }
                    if ok {
                        return Ok::<_, DockerBenchError>(t0.elapsed());
                    }
                }
                if t0.elapsed() > START_LIMIT {
                    return Err(LoadBenchError::Timeout { what: format!("{n} compose replicas answering with {version}"), after: START_LIMIT }.into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    progress(&format!("docker-compose: {n} replicas, {}", VERSIONS.join(" → ")));
    c.write(&compose_file(&repo, VERSIONS[0], n, None, id))?;
    c.up().await?;
    all_serving(VERSIONS[0], Instant::now()).await?;
    let mut compose_runs = Vec::new();
    for i in 1..VERSIONS.len() {
        c.write(&compose_file(&repo, VERSIONS[i], n, None, id))?;
        let t0 = Instant::now();
        c.up().await?;
        let up = t0.elapsed();
        let serving = all_serving(VERSIONS[i], t0).await?;
        compose_runs.push(ComposeRecreate {
            from: VERSIONS[i - 1].into(),
            to: VERSIONS[i].into(),
            up_secs: up.as_secs_f64(),
            serving_secs: serving.as_secs_f64(),
        });
    }
    c.run(&["down", "--timeout", "5"]).await?;

    // Slipway: a server on a config of both services.
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).map_err(io(format!("cannot create {}", config_dir.display())))?;
    let (web, web4) = (local(free_port()?), local(free_port()?));
    let toml = slipway_toml(&remote, &left.env, web, web4, n);
    std::fs::write(config_dir.join("slipway.toml"), toml).map_err(io("cannot write the bench's slipway.toml"))?;
    progress("slipway serve");
    left.server = Some(Server::start(slipway, &config_dir, &dir.join("slipway.db"), dir.join("slipway.log")).await?);
    let server = left.server.as_ref().ok_or_else(|| DockerBenchError::Server("not started".into()))?;
    let env = left.env.clone();
    progress(&format!("slipway: web {from} on {web}, then {from} → {to} under wrk -c{} -d{}s", opts.connections, opts.duration.as_secs()));
    server.deploy(&env, "web", from).await?;
    wait_serving(web, from, START_LIMIT).await?;
    let slipway_load = under_load(wrk, opts, web, lead, to, "slipway deploy", || async { server.deploy(&env, "web", to).await.map(drop) }).await?;
    wait_serving(web, to, START_LIMIT).await?;

    progress(&format!("slipway: web4, {n} containers, {}", VERSIONS.join(" → ")));
    server.deploy(&env, "web4", VERSIONS[0]).await?;
    let mut slipway_runs = Vec::new();
    for i in 1..VERSIONS.len() {
        let t0 = Instant::now();
        let detail = server.deploy(&env, "web4", VERSIONS[i]).await?;
        let r = rollout_of(server, &detail, t0.elapsed(), "web4", VERSIONS[i - 1], VERSIONS[i]).await?;
        progress(&format!("  {} → {}: rollout {:.3}s, without health waits {:.3}s", r.from, r.to, r.rollout_secs, r.without_health_secs));
        slipway_runs.push(r);
    }
    wait_serving(web4, VERSIONS[VERSIONS.len() - 1], START_LIMIT).await?;

    let median_by = |v: &mut Vec<usize>, key: &dyn Fn(usize) -> f64| {
        v.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
        v[v.len() / 2]
    };
    let slipway_median = slipway_runs[median_by(&mut (0..slipway_runs.len()).collect(), &|i| slipway_runs[i].rollout_secs)].clone();
    let compose_median = compose_runs[median_by(&mut (0..compose_runs.len()).collect(), &|i| compose_runs[i].up_secs)].clone();
    Ok(DockerBenchReport {
        machine: machine.finish(),
        wrk_version,
        compose_version,
        engine_version,
        load: LoadBench {
            duration_secs: opts.duration.as_secs(),
            connections: opts.connections,
            threads: opts.threads,
            change_at_secs: lead.as_secs_f64(),
            from: from.into(),
            to: to.into(),
            compose: compose_load,
            slipway: slipway_load,
        },
        rollout: RolloutBench {
            instances: n,
            health_interval_ms: ms(HEALTH_INTERVAL),
            healthy_after: HEALTHY_AFTER,
            drain_ms: ms(DRAIN),
            slipway: slipway_runs,
            slipway_median,
            compose: compose_runs,
            compose_median,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moved here with the bench from the engine's test that every place
    /// making a client gets one (reqwest panics without a crypto provider).
    #[test]
    fn the_bench_client_builds() {
        http_client().expect("bench client");
    }

    #[test]
    fn the_compose_file_runs_the_demo_at_the_version_on_a_loopback_port() {
        let text = compose_file("slipway-bench-x/demo", "2.0", 1, Some(4100), "x");
        // JSON is YAML: docker-compose reads this file as it is.
        let v: Value = serde_json::from_str(&text).expect("valid JSON, hence YAML");
        let web = &v["services"]["web"];
        assert_eq!(web["image"], "slipway-bench-x/demo:2.0");
        assert_eq!(web["command"], json!(["/demo", "serve", "--host", "0.0.0.0", "--port", "8080", "--version", "2.0"]));
        assert_eq!(web["ports"], json!(["127.0.0.1:4100:8080"]));
        assert_eq!(web["labels"]["slipway.bench"], "x");
        assert!(web.get("deploy").is_none(), "one replica: {text}");

        let v: Value = serde_json::from_str(&compose_file("r/demo", "1.0", 4, None, "x")).expect("valid");
        let web = &v["services"]["web"];
        assert_eq!(web["deploy"]["replicas"], 4);
        assert_eq!(web["ports"], json!(["127.0.0.1::8080"]), "replicas cannot share a host port");
    }

    #[test]
    fn the_slipway_config_is_valid_with_two_docker_services() {
        let text = slipway_toml("127.0.0.1:5000/slipway-bench-x/demo", "bench-x", local(4101), local(4102), 4);
        let config = slipway::config::parse("slipway.toml", &text).unwrap_or_else(|e| panic!("{}\n{text}", e.render(false)));
        let spec = |name: &str| config.services.iter().find(|s| s.name == name).and_then(|s| s.spec.clone()).expect("managed");
        assert_eq!((spec("web").instances, spec("web4").instances), (1, 4));
        assert_eq!(spec("web4").listen, local(4102));
        assert_eq!(spec("web").health.interval, HEALTH_INTERVAL);
        assert_eq!(spec("web").image.as_ref().map(|c| c.repository.as_str()), Some("127.0.0.1:5000/slipway-bench-x/demo"));
        assert!(config.jobs.iter().any(|j| j.name == "web4.rollout"), "a rollout job per service");
    }

    #[test]
    fn the_longest_gap_runs_from_the_last_good_answer_to_the_next() {
        let p = |ms: u64, ok: bool| Probe { at: Duration::from_millis(ms), version: ok.then(|| "1.0".to_string()) };
        assert_eq!(longest_gap(&[p(0, true), p(20, true), p(40, true)]), Duration::ZERO);
        // Good at 20, bad at 40..80, good at 100: 80ms without a good answer.
        assert_eq!(
            longest_gap(&[p(0, true), p(20, true), p(40, false), p(60, false), p(80, false), p(100, true), p(120, false), p(140, true)]),
            Duration::from_millis(80)
        );
        // Never back: until the last probe.
        assert_eq!(longest_gap(&[p(0, true), p(20, false), p(40, false)]), Duration::from_millis(40));
    }

    #[test]
    fn a_rollout_is_split_by_its_lines() {
        let lines: Vec<(i64, String)> = vec![
            (1_000, "rolling web4 out: 1.0 → 2.0 (1 instance(s), rolling, max surge 1, max unavailable 0)".into()),
            (1_300, "started web4 2.0 on 127.0.0.1:4000 (container abc)".into()),
            (1_700, "127.0.0.1:4000 is healthy: GET /healthz → 200 \"ok 2.0\"".into()),
            (1_702, "traffic → 1 of 1 instance(s) on 2.0".into()),
            (2_100, "stopped 127.0.0.1:3000 (container def)".into()),
            (2_110, "recorded: bench web4 runs 2.0".into()),
        ];
        let r = split_rollout("1.0", "2.0", Duration::from_millis(1_500), 995, 2_120, &lines);
        assert!((r.rollout_secs - 1.125).abs() < 1e-9, "{r:?}");
        assert!((r.health_wait_secs - 0.4).abs() < 1e-9, "{r:?}");
        assert!((r.container_start_secs - 0.3).abs() < 1e-9, "{r:?}");
        assert!((r.retire_secs - 0.398).abs() < 1e-9, "{r:?}");
        assert!((r.slipway_own_secs - 0.027).abs() < 1e-9, "{r:?}");
        assert!((r.without_health_secs - 0.725).abs() < 1e-9, "{r:?}");
        assert_eq!(r.batches, 1);
        assert!((r.health_configured_secs - 0.2).abs() < 1e-9, "{r:?}");
    }
}
