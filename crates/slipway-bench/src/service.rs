//! `slipway-bench service`: what the service path costs.
//!
//! Two measurements, both against the demo service (`slipway-demo serve`,
//! which answers `GET /` with one short line):
//!
//! - **proxy overhead**: `wrk` against the demo directly, then through a
//!   [`Proxy`] (in this process) with that one backend, alternating
//!   direct, proxy, direct, proxy (`--rounds`, [`ROUNDS`] by default); the report
//!   gives the medians of requests/s and of the 99th-percentile latency,
//!   and proxy ÷ direct for both. Everything shares the machine: wrk, the
//!   demo and the proxy compete for the same cores, so the ratio is "what
//!   a client sees on this machine", not the proxy's cost in isolation;
//!   the CPU time per request of the proxy and of the demo is reported
//!   next to it for that reason.
//! - **against nginx**: in the same rounds, nginx (Debian's, installed if
//!   missing; configured as [`super::nginx`] says: one worker, keep-alive
//!   to the upstream) in front of the same demo instance. The report gives
//!   Slipway's proxy ÷ nginx for requests/s and for the 99th percentile:
//!   the goal is at least nginx's throughput with no worse a tail.
//! - **rollout overhead**: a [`ServiceManager`] over a throw-away SQLite
//!   store and the local target rolls `instances` demo instances from one
//!   version to the next (rolling, max surge 1, max unavailable 0, HTTP
//!   health check every 100 ms, healthy after 1 pass, drain 200 ms). The
//!   rollout's own output lines, timestamped as they arrive, split its
//!   time into the waits it cannot avoid (each new instance's health wait,
//!   from "started" to "is healthy"; each old instance's retirement, from
//!   "traffic →" to "stopped", i.e. drain plus stop) and the rest, the
//!   engine's own work (spawning, proxy swaps, the store write, output).
//!   Nothing sends traffic during the rollouts, so every drain ends at its
//!   first check: the configured drain is a cap, not a wait, and is not
//!   subtracted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::nginx::{self, Nginx};
use super::wrk::{LoadBenchError, LoadBenchOptions, find_demo, find_wrk, free_port, io, read_wrk, run_wrk, wrk_version};
use super::{BenchError, Machine, TempDir, ms, ratio, rusage_cpu, rusage_user_system};
use slipway::config::service::{HealthCheck, HealthSpec, RolloutSpec, ServiceSpec, Strategy};
use slipway::service::proxy::{Proxy, ProxyError};
use slipway::service::{RolloutRequest, ServiceManager};
use slipway::store::{self, Outcome, StoreError};
use slipway::targets::LocalTarget;

/// wrk runs per side (direct, Slipway's proxy, nginx), alternating, unless `--rounds` says otherwise.
pub const ROUNDS: usize = 2;
/// Timed rollouts: 1.0 → 2.0, then 2.0 → 2.1, 2.1 → 2.2.
pub const ROLLOUT_VERSIONS: [&str; 4] = ["1.0", "2.0", "2.1", "2.2"];

const HEALTH_INTERVAL: Duration = Duration::from_millis(100);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTHY_AFTER: u32 = 1;
const HEALTH_DEADLINE: Duration = Duration::from_secs(10);
const DRAIN: Duration = Duration::from_millis(200);
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the demo may take to listen.
const DEMO_START_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServiceBenchError {
    /// What both load benches can meet: wrk or the demo missing, invalid
    /// options, I/O, timeouts, wrk failing.
    #[error(transparent)]
    Load(#[from] LoadBenchError),
    #[error("the demo service did not start: {0}")]
    Demo(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("bench store: {0}")]
    Store(#[from] StoreError),
    #[error("rollout {from} → {to} did not succeed: {reason}")]
    Rollout { from: String, to: String, reason: String },
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Serialize)]
pub struct ServiceBenchReport {
    /// wrk, the demo, the proxy and nginx share its cores.
    pub machine: Machine,
    pub wrk_version: String,
    pub nginx_version: String,
    pub proxy: ProxyBench,
    pub rollout: RolloutBench,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyBench {
    pub duration_secs: u64,
    pub connections: u32,
    pub threads: u32,
    /// wrk runs per side.
    pub rounds: usize,
    /// Medians over the rounds.
    pub rps_direct: f64,
    pub rps_proxy: f64,
    pub p99_direct_ms: f64,
    pub p99_proxy_ms: f64,
    pub p50_direct_ms: f64,
    pub p50_proxy_ms: f64,
    /// rps_proxy ÷ rps_direct (below 1: the proxy costs throughput).
    pub rps_ratio: f64,
    /// p99_proxy ÷ p99_direct (above 1: the proxy adds tail latency).
    pub p99_ratio: f64,
    /// nginx in front of the same demo, medians over the rounds.
    pub rps_nginx: f64,
    pub p99_nginx_ms: f64,
    pub p50_nginx_ms: f64,
    /// rps_proxy ÷ rps_nginx (goal: at least 1).
    pub rps_vs_nginx: f64,
    /// p99_proxy ÷ p99_nginx (goal: at most 1).
    pub p99_vs_nginx: f64,
    pub rps_at_least_nginx: bool,
    pub p99_at_most_nginx: bool,
    /// The proxy's user CPU per request ÷ nginx's (medians): the steadiest
    /// comparison on a shared machine.
    pub user_cpu_vs_nginx: f64,
    /// The same for the kernel's share.
    pub system_cpu_vs_nginx: f64,
    /// Every wrk run, in the order run.
    pub runs: Vec<WrkRun>,
    /// Requests the proxy answered itself with 502/503/504 (should be 0).
    pub proxy_errors: u64,
}

/// One wrk run.
#[derive(Debug, Clone, Serialize)]
pub struct WrkRun {
    /// "direct", "proxy" (Slipway's) or "nginx".
    pub via: &'static str,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Non-2xx/3xx answers plus socket errors (should be 0).
    pub errors: u64,
    /// The front's CPU time per request: this process (Slipway's proxy)
    /// or nginx's; 0 for direct.
    pub front_cpu_us_per_request: f64,
    /// Of the front's CPU time per request, user space and the kernel:
    /// the kernel's share (the sends and receives) is most of it and
    /// about the same for any front, so the user share is where fronts
    /// differ. nginx's come from `/proc` in clock ticks (10 ms).
    pub front_user_us_per_request: f64,
    pub front_system_us_per_request: f64,
    /// The demo's CPU time per request.
    pub demo_cpu_us_per_request: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutBench {
    pub instances: u32,
    pub health_interval_ms: f64,
    pub healthy_after: u32,
    pub drain_ms: f64,
    pub stop_grace_ms: f64,
    /// Timed rollouts, in order (the first is 1.0 → 2.0).
    pub runs: Vec<RolloutRun>,
    /// The run with the median total time.
    pub median: RolloutRun,
}

/// One timed rollout, split by its output lines.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutRun {
    pub from: String,
    pub to: String,
    /// From calling `rollout` to its return.
    pub total_secs: f64,
    /// Sum over new instances of "started" → "is healthy": the instance's
    /// start-up, the configured interval(s) between checks and the checks.
    pub health_wait_secs: f64,
    /// Each new instance's health wait, in order.
    pub health_waits_ms: Vec<f64>,
    /// Whole health intervals those waits contain (a fresh instance that
    /// already listens passes its first check and waits none).
    pub health_intervals_waited: u32,
    /// health_intervals_waited × interval: the configured part of the health waits.
    pub health_interval_secs: f64,
    /// Sum over old instances of "traffic →" → "stopped": the drain (ends at
    /// once, nothing is in flight) and SIGTERM until the process is gone.
    pub retire_secs: f64,
    /// Each old instance's retirement, in order.
    pub retires_ms: Vec<f64>,
    /// instances × drain: the configured cap, not subtracted (see retire_secs).
    pub drain_configured_secs: f64,
    /// health_wait_secs + retire_secs: what is subtracted.
    pub waits_secs: f64,
    /// total − waits: spawning, proxy swaps, the store write, output.
    pub overhead_secs: f64,
    pub overhead_per_instance_ms: f64,
    /// "traffic →" lines: one per batch.
    pub batches: usize,
}

impl ServiceBenchReport {
    pub fn human(&self) -> String {
        let p = &self.proxy;
        let r = &self.rollout;
        let first = &r.runs[0];
        let m = &r.median;
        let errors: u64 = p.runs.iter().map(|w| w.errors).sum::<u64>() + p.proxy_errors;
        let per_run = |via: &str| p.runs.iter().filter(|w| w.via == via).map(|w| format!("{:.2}", w.p99_ms)).collect::<Vec<_>>().join("/");
        let cpu = |via: &str, f: fn(&WrkRun) -> f64| median(&p.runs.iter().filter(|w| w.via == via).map(f).collect::<Vec<_>>());
        let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
        let mut out = format!(
            "slipway-bench services: {}; {}\n{} (wrk, the demo, the proxy and nginx share the cores)\n\nwrk -t{} -c{} -d{}s against the demo, {} rounds of each front, alternating; medians:\n",
            self.wrk_version,
            self.nginx_version,
            self.machine.human(),
            p.threads,
            p.connections,
            p.duration_secs,
            p.rounds,
        );
        out.push_str(&format!(
            "{:<22} {:>10} {:>9} {:>9} {:>14} {:>15} {:>13}  {}\n",
            "front", "req/s", "p50 ms", "p99 ms", "front µs/req", "(user + kernel)", "demo µs/req", "p99 per run (ms)"
        ));
        for (via, label, rps, p50, p99) in [
            ("direct", "none (the demo itself)", p.rps_direct, p.p50_direct_ms, p.p99_direct_ms),
            ("proxy", "slipway's proxy", p.rps_proxy, p.p50_proxy_ms, p.p99_proxy_ms),
            ("nginx", "nginx", p.rps_nginx, p.p50_nginx_ms, p.p99_nginx_ms),
        ] {
            out.push_str(&format!(
                "{label:<22} {rps:>10.0} {p50:>9.2} {p99:>9.2} {:>14.1} {:>15} {:>13.1}  {}\n",
                cpu(via, |w| w.front_cpu_us_per_request),
                format!("{:.1} + {:.1}", cpu(via, |w| w.front_user_us_per_request), cpu(via, |w| w.front_system_us_per_request)),
                cpu(via, |w| w.demo_cpu_us_per_request),
                per_run(via)
            ));
        }
        out.push_str(&format!(
            "slipway's proxy ÷ nginx: req/s ×{:.3} (goal ≥ 1) {}, p99 ×{:.3} (goal ≤ 1) {}; ÷ direct: req/s ×{:.2}, p99 ×{:.2}\n",
            p.rps_vs_nginx,
            verdict(p.rps_at_least_nginx),
            p.p99_vs_nginx,
            verdict(p.p99_at_most_nginx),
            p.rps_ratio,
            p.p99_ratio
        ));
        out.push_str(&format!(
            "slipway's proxy ÷ nginx, CPU per request: user ×{:.3}, kernel ×{:.3} (this process's times against nginx's /proc ticks)\n",
            p.user_cpu_vs_nginx, p.system_cpu_vs_nginx
        ));
        if errors > 0 {
            out.push_str(&format!("WARNING: {errors} failed requests during the wrk runs: the req/s figures are not comparable\n"));
        }
        let line = |label: String, x: &RolloutRun| {
            format!(
                "{label}: {:.3}s total − waits {:.3}s = engine {:.3}s, {:.1}ms per instance\n    \
                 waits subtracted, measured from the rollout's output lines: health {:.3}s (per instance {} ms; {} whole {:.0}ms interval(s) = {:.3}s, the rest start-up and checks) + retire {:.3}s (drain + stop; per instance {} ms)\n",
                x.total_secs,
                x.waits_secs,
                x.overhead_secs,
                x.overhead_per_instance_ms,
                x.health_wait_secs,
                x.health_waits_ms.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join("/"),
                x.health_intervals_waited,
                r.health_interval_ms,
                x.health_interval_secs,
                x.retire_secs,
                x.retires_ms.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join("/"),
            )
        };
        out.push_str(&format!(
            "rollout ({} instances of the demo, rolling surge 1 / unavailable 0, GET /healthz every {:.0}ms, healthy after {}, drain {:.0}ms; no traffic, so drains end at once and the configured {:.0}ms × {} is not subtracted):\n",
            r.instances, r.health_interval_ms, r.healthy_after, r.drain_ms, r.drain_ms, r.instances
        ));
        out.push_str(&line(format!("  {} → {}", first.from, first.to), first));
        out.push_str(&line(
            format!(
                "  median of {} ({}: {})",
                r.runs.len(),
                r.runs.iter().map(|x| format!("{}→{}", x.from, x.to)).collect::<Vec<_>>().join(", "),
                r.runs.iter().map(|x| format!("{:.3}s", x.total_secs)).collect::<Vec<_>>().join(" ")
            ),
            m,
        ));
        out
    }
}

// ---------------------------------------------------------------- running

/// Where the CLI finds the demo: next to the running `slipway-bench`.
pub fn default_demo_bin() -> PathBuf {
    super::sibling_bin("slipway-demo")
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Run both measurements, print the report (human or JSON) to stdout and
/// return it. `demo_bin` is the `slipway-demo` binary
/// ([`default_demo_bin`] finds it next to `slipway-bench`).
pub async fn run(opts: LoadBenchOptions, demo_bin: &Path) -> Result<ServiceBenchReport, ServiceBenchError> {
    opts.check_wrk()?;
    if opts.duration < Duration::from_secs(1) || opts.duration.subsec_nanos() != 0 {
        return Err(LoadBenchError::Options("--wrk-secs must be at least 1".into()).into());
    }
    if opts.rounds == 0 {
        return Err(LoadBenchError::Options("--rounds must be at least 1".into()).into());
    }
    if !(1..=64).contains(&opts.rollout_instances) {
        return Err(LoadBenchError::Options("--instances must be between 1 and 64".into()).into());
    }
    let machine = Machine::now();
    let wrk = find_wrk()?;
    let demo = find_demo(demo_bin)?;
    let wrk_version = wrk_version(&wrk).await?;
    let nginx_bin = nginx::find_or_install().await?;
    let nginx_version = nginx::version(&nginx_bin).await?;
    let progress = |msg: &str| eprintln!("slipway-bench service: {msg}");

    progress(&format!(
        "proxy: wrk -t{} -c{} -d{}s, direct, through Slipway's proxy and through nginx, {} rounds each",
        opts.threads,
        opts.connections,
        opts.duration.as_secs(),
        opts.rounds
    ));
    let proxy = bench_proxy(&opts, &wrk, &demo, &nginx_bin).await?;
    progress(&format!("rollouts of {} demo instances: {}", opts.rollout_instances, ROLLOUT_VERSIONS.join(" → ")));
    let rollout = bench_rollouts(&opts, &demo).await?;

    let report = ServiceBenchReport { machine: machine.finish(), wrk_version, nginx_version, proxy, rollout };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report)
}

/// The demo, started directly; killed when dropped.
struct Demo {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Demo {
    async fn start(bin: &Path, version: &str) -> Result<Demo, ServiceBenchError> {
        let port = free_port()?;
        let mut child = tokio::process::Command::new(bin)
            .args(["serve", "--port", &port.to_string(), "--version", version])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("cannot run {}", bin.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt as _;
                    let _ = tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut stderr)).await;
                }
                return Err(ServiceBenchError::Demo(format!("{} exited ({status}): {}", bin.display(), stderr.trim())));
            }
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await {
                return Ok(Demo { child, addr });
            }
            if started.elapsed() > DEMO_START_LIMIT {
                return Err(LoadBenchError::Timeout { what: format!("the demo service listening on {addr}"), after: DEMO_START_LIMIT }.into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// CPU time (user + system) the demo has used so far, from /proc.
    fn cpu(&self) -> Duration {
        self.child.id().and_then(proc_cpu).unwrap_or_default()
    }
}

/// CPU time of a process, to the nanosecond from its CPU-time clock
/// (`clock_getcpuclockid`), else utime + stime from `/proc/PID/stat`.
/// Those count in clock ticks (10 ms): a front that served a short run's
/// requests in less read as 0 (found by CI, on a loaded machine).
fn proc_cpu(pid: u32) -> Option<Duration> {
    proc_cpu_clock(pid).or_else(|| proc_cpu_ticks(pid))
}

fn proc_cpu_clock(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: both write only through the valid pointers given.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?))
}

fn proc_cpu_ticks(pid: u32) -> Option<Duration> {
    proc_user_system_ticks(pid).map(|(user, system)| user + system)
}

/// User and system CPU time of a process from `/proc/PID/stat`, in clock ticks.
fn proc_user_system_ticks(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (user, system): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (Duration::from_secs_f64(user as f64 / hz as f64), Duration::from_secs_f64(system as f64 / hz as f64)))
}

async fn bench_proxy(opts: &LoadBenchOptions, wrk: &Path, demo_bin: &Path, nginx_bin: &Path) -> Result<ProxyBench, ServiceBenchError> {
    let demo = Demo::start(demo_bin, "1.0").await?;
    let shutdown = CancellationToken::new();
    let _stop_proxy = shutdown.clone().drop_guard();
    let proxy = Proxy::bind("bench", SocketAddr::from(([127, 0, 0, 1], 0)), shutdown.clone()).await?;
    proxy.set_backends(vec![demo.addr]);
    let nginx_dir = TempDir::create()?;
    let nginx = Nginx::start(nginx_bin, &nginx_dir.0, demo.addr).await?;

    let rounds = opts.rounds;
    let mut runs = Vec::with_capacity(3 * rounds);
    for round in 1..=rounds {
        for (via, addr) in [("direct", demo.addr), ("proxy", proxy.local_addr()), ("nginx", nginx.addr)] {
            eprintln!("slipway-bench services: round {round} of {rounds}: {via}");
            let front_cpu = || match via {
                "proxy" => rusage_cpu(libc::RUSAGE_SELF),
                "nginx" => nginx.pid().and_then(proc_cpu).unwrap_or_default(),
                _ => Duration::ZERO,
            };
            let front_split = || match via {
                "proxy" => rusage_user_system(libc::RUSAGE_SELF),
                "nginx" => nginx.pid().and_then(proc_user_system_ticks).unwrap_or_default(),
                _ => Default::default(),
            };
            let (front_before, split_before, demo_before) = (front_cpu(), front_split(), demo.cpu());
            let w = read_wrk(&run_wrk(wrk, opts, addr).await?)?;
            let (front, demo_cpu) = (front_cpu().saturating_sub(front_before), demo.cpu().saturating_sub(demo_before));
            let split = front_split();
            let (user, system) = (split.0.saturating_sub(split_before.0), split.1.saturating_sub(split_before.1));
            let per = |d: Duration| if w.requests == 0 { 0.0 } else { d.as_secs_f64() * 1e6 / w.requests as f64 };
            runs.push(WrkRun {
                via,
                rps: w.requests_per_sec,
                p50_ms: w.p50.map(ms).unwrap_or(f64::NAN),
                p99_ms: ms(w.p99),
                requests: w.requests,
                errors: w.non_2xx + w.socket_errors,
                front_cpu_us_per_request: per(front),
                front_user_us_per_request: per(user),
                front_system_us_per_request: per(system),
                demo_cpu_us_per_request: per(demo_cpu),
            });
        }
    }
    let proxy_errors = proxy.stats().errors;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.stopped()).await;
    drop(nginx);
    drop(nginx_dir);
    drop(demo);

    let side = |via: &str, f: fn(&WrkRun) -> f64| median(&runs.iter().filter(|w| w.via == via).map(f).collect::<Vec<_>>());
    let (rps_direct, rps_proxy, rps_nginx) = (side("direct", |w| w.rps), side("proxy", |w| w.rps), side("nginx", |w| w.rps));
    let (p99_direct_ms, p99_proxy_ms, p99_nginx_ms) = (side("direct", |w| w.p99_ms), side("proxy", |w| w.p99_ms), side("nginx", |w| w.p99_ms));
    Ok(ProxyBench {
        duration_secs: opts.duration.as_secs(),
        connections: opts.connections,
        threads: opts.threads,
        rounds,
        rps_direct,
        rps_proxy,
        p99_direct_ms,
        p99_proxy_ms,
        p50_direct_ms: side("direct", |w| w.p50_ms),
        p50_proxy_ms: side("proxy", |w| w.p50_ms),
        rps_ratio: ratio(rps_proxy, rps_direct),
        p99_ratio: ratio(p99_proxy_ms, p99_direct_ms),
        rps_nginx,
        p99_nginx_ms,
        p50_nginx_ms: side("nginx", |w| w.p50_ms),
        rps_vs_nginx: ratio(rps_proxy, rps_nginx),
        p99_vs_nginx: ratio(p99_proxy_ms, p99_nginx_ms),
        rps_at_least_nginx: rps_proxy >= rps_nginx,
        p99_at_most_nginx: p99_proxy_ms <= p99_nginx_ms,
        user_cpu_vs_nginx: ratio(side("proxy", |w| w.front_user_us_per_request), side("nginx", |w| w.front_user_us_per_request)),
        system_cpu_vs_nginx: ratio(side("proxy", |w| w.front_system_us_per_request), side("nginx", |w| w.front_system_us_per_request)),
        runs,
        proxy_errors,
    })
}

fn bench_spec(demo_bin: &Path, instances: u32, listen: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        secrets: Default::default(),
        listen_in: Default::default(),
        name: "bench".into(),
        listen,
        instances,
        command: vec![demo_bin.display().to_string(), "serve".into(), "--port".into(), "{port}".into(), "--version".into(), "{version}".into()],
        env: Default::default(),
        health: HealthSpec {
            check: HealthCheck::Http { path: "/healthz".into(), status: 200 },
            interval: HEALTH_INTERVAL,
            timeout: HEALTH_TIMEOUT,
            healthy_after: HEALTHY_AFTER,
            deadline: HEALTH_DEADLINE,
        },
        rollout: RolloutSpec { strategy: Strategy::Rolling { max_surge: 1, max_unavailable: 0 }, drain: DRAIN },
        verify: None,
        stop_grace: STOP_GRACE,
        artifact: None,
        target: slipway::targets::DEFAULT.to_string(),
        image: None,
        secret_files: Default::default(),
        settings: Default::default(),
    }
}

/// A rollout's output lines, as they arrived, without the `"[rollout] "` prefix.
type Lines = Vec<(Instant, String)>;

/// Run one rollout, timing it and its output lines.
async fn timed_rollout(manager: &Arc<ServiceManager>, req: RolloutRequest, from: &str) -> Result<(Duration, Lines), ServiceBenchError> {
    let to = req.version.clone();
    let instances = req.spec.instances;
    let (tx, mut rx) = mpsc::channel::<slipway::targets::Line>(1024);
    let collector = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(slipway::targets::Line { text: line, .. }) = rx.recv().await {
            let line = line.strip_prefix("[rollout] ").map(str::to_string).unwrap_or(line);
            lines.push((Instant::now(), line));
        }
        lines
    });
    let limit = (HEALTH_DEADLINE + DRAIN + STOP_GRACE) * (2 * instances + 2) + Duration::from_secs(30);
    let start = Instant::now();
    let result = tokio::time::timeout(limit, manager.rollout(req, tx, CancellationToken::new())).await;
    let total = start.elapsed();
    let lines = tokio::time::timeout(Duration::from_secs(5), collector).await.ok().and_then(Result::ok).unwrap_or_default();
    let failed = |reason: String| {
        let tail: Vec<&str> = lines.iter().rev().take(8).rev().map(|(_, l)| l.as_str()).collect();
        ServiceBenchError::Rollout { from: from.to_string(), to: to.clone(), reason: format!("{reason}; its last lines: {}", tail.join(" | ")) }
    };
    match result {
        Err(_) => Err(LoadBenchError::Timeout { what: format!("rollout {from} → {to}"), after: limit }.into()),
        Ok(r) if r.outcome != Outcome::Succeeded => Err(failed(format!("{}{}", r.outcome, r.reason.map(|r| format!(": {r}")).unwrap_or_default()))),
        Ok(_) => Ok((total, lines)),
    }
}

/// Split a rollout's time by its output lines (see [`RolloutRun`]).
fn split_rollout(from: &str, to: &str, total: Duration, lines: &[(Instant, String)], instances: u32) -> RolloutRun {
    let mut health = Vec::new();
    let mut retire = Vec::new();
    let mut batches = 0;
    let mut started: Vec<(String, Instant)> = Vec::new();
    for (i, (at, line)) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("started ") {
            // "started NAME VERSION on ADDR (pid N)"
            if let Some(addr) = rest.split(" on ").nth(1).and_then(|r| r.split_whitespace().next()) {
                started.push((addr.to_string(), *at));
            }
        } else if let Some((addr, _)) = line.split_once(" is healthy: ") {
            if let Some((_, t0)) = started.iter().find(|(a, _)| a == addr) {
                health.push(at.saturating_duration_since(*t0));
            }
        } else if line.starts_with("traffic →") {
            batches += 1;
        } else if line.starts_with("stopped ") && i > 0 {
            // The line before (past the "draining" note) is "traffic →"
            // (or another "stopped" of the same retirement, which then
            // adds ~0).
            if let Some((before, _)) = lines[..i].iter().rev().find(|(_, l)| !l.starts_with("draining ")) {
                retire.push(at.saturating_duration_since(*before));
            }
        }
    }
    let intervals: u32 = health.iter().map(|d| (d.as_nanos() / HEALTH_INTERVAL.as_nanos()) as u32).sum();
    let health_sum: Duration = health.iter().sum();
    let retire_sum: Duration = retire.iter().sum();
    let waits = health_sum + retire_sum;
    let overhead = total.as_secs_f64() - waits.as_secs_f64();
    RolloutRun {
        from: from.to_string(),
        to: to.to_string(),
        total_secs: total.as_secs_f64(),
        health_wait_secs: health_sum.as_secs_f64(),
        health_waits_ms: health.iter().copied().map(ms).collect(),
        health_intervals_waited: intervals,
        health_interval_secs: (HEALTH_INTERVAL * intervals).as_secs_f64(),
        retire_secs: retire_sum.as_secs_f64(),
        retires_ms: retire.iter().copied().map(ms).collect(),
        drain_configured_secs: (DRAIN * instances).as_secs_f64(),
        waits_secs: waits.as_secs_f64(),
        overhead_secs: overhead,
        overhead_per_instance_ms: overhead * 1000.0 / instances as f64,
        batches,
    }
}

async fn bench_rollouts(opts: &LoadBenchOptions, demo_bin: &Path) -> Result<RolloutBench, ServiceBenchError> {
    let dir = TempDir::create()?;
    let store = store::open(&format!("sqlite://{}", dir.0.join("bench.db").display())).await?;
    let shutdown = CancellationToken::new();
    // However this ends (even dropped), the proxy and the supervisor stop;
    // instances nobody holds any more are killed by their own Drop.
    let _stop = shutdown.clone().drop_guard();
    let manager = ServiceManager::new(Arc::new(LocalTarget::default()), store, shutdown.clone());
    let n = opts.rollout_instances;
    let spec = bench_spec(demo_bin, n, SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    let request = |i: usize| RolloutRequest {
        sha256: None,
        environment: "bench".into(),
        deployment_id: i as i64 + 1,
        revision: "bench".into(),
        version: ROLLOUT_VERSIONS[i].into(),
        spec: spec.clone(),
        workdir: dir.0.clone(),
    };

    let measured = async {
        // The first deploy starts from nothing: not timed.
        timed_rollout(&manager, request(0), "nothing").await?;
        let mut runs = Vec::new();
        for i in 1..ROLLOUT_VERSIONS.len() {
            let from = ROLLOUT_VERSIONS[i - 1];
            let (total, lines) = timed_rollout(&manager, request(i), from).await?;
            let run = split_rollout(from, ROLLOUT_VERSIONS[i], total, &lines, n);
            eprintln!("slipway-bench service: rollout {from} → {}: {:.3}s", run.to, run.total_secs);
            runs.push(run);
        }
        Ok::<_, ServiceBenchError>(runs)
    }
    .await;

    let stop_limit = STOP_GRACE * 2 + Duration::from_secs(10);
    let _ = tokio::time::timeout(stop_limit, manager.stop_all_services()).await;
    shutdown.cancel();
    drop(dir);
    let runs = measured?;

    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].total_secs.total_cmp(&runs[b].total_secs));
    let median = runs[order[order.len() / 2]].clone();
    Ok(RolloutBench {
        instances: n,
        health_interval_ms: ms(HEALTH_INTERVAL),
        healthy_after: HEALTHY_AFTER,
        drain_ms: ms(DRAIN),
        stop_grace_ms: ms(STOP_GRACE),
        runs,
        median,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_time_is_split_by_its_lines() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let lines: Vec<(Instant, String)> = vec![
            (at(0), "rolling bench out: 1.0 → 2.0 (1 instance(s), rolling, max surge 1, max unavailable 0)".into()),
            (at(5), "started bench 2.0 on 127.0.0.1:4000 (pid 10)".into()),
            (at(110), "127.0.0.1:4000 is healthy: GET /healthz → 200 \"ok 2.0\"".into()),
            (at(111), "traffic → 1 of 1 instance(s) on 2.0".into()),
            (at(121), "stopped 127.0.0.1:3000 (pid 9)".into()),
            (at(125), "recorded: bench bench runs 2.0".into()),
        ];
        let r = split_rollout("1.0", "2.0", Duration::from_millis(130), &lines, 1);
        assert!((r.health_wait_secs - 0.105).abs() < 1e-9, "{r:?}");
        assert!((r.retire_secs - 0.010).abs() < 1e-9, "{r:?}");
        assert!((r.overhead_secs - 0.015).abs() < 1e-9, "{r:?}");
        assert_eq!((r.batches, r.health_intervals_waited, r.health_waits_ms.len(), r.retires_ms.len()), (1, 1, 1, 1));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
    }
}
