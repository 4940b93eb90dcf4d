//! `slipway-bench`: Slipway's benchmarks, a crate of their own so the
//! product binary ships no harness. `slipway-bench [scheduler]` (this
//! module): the scheduler against ninja on the same random graph;
//! `services` ([`service`]) and `docker` ([`docker`]) are the load benches.
//!
//! One deterministic layered DAG (from `--seed`) is run twice:
//!
//! - **no-op graph**: every job is `true`. This measures what Slipway adds
//!   per job (store transactions, events, process set-up) against ninja,
//!   the reference for "run a DAG of shell commands fast". Both get the
//!   same slots (`-j`); the goal is Slipway ≤ 1.5 × ninja.
//! - **sleep graph**: every job sleeps a random time. With as many slots as
//!   the widest level, the best possible makespan is the critical path
//!   (longest chain of sleeps); the goal is Slipway ≤ 1.02 × that. Ninja
//!   runs it too, for reference.
//!
//! Slipway runs in-process, exactly as `slipway serve` wires it (SQLite
//! store, log writer, local target), against a throw-away directory under
//! the system temp dir, removed at the end. Jobs use `shell = true`, so
//! both sides start each command through `/bin/sh -c`.

pub mod docker;
mod endtoend;
pub mod nginx;
pub mod service;
pub mod wrk;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use slipway::config;
use slipway::events::{Event, EventBus, logwriter};
use slipway::scheduler::{Scheduler, SchedulerConfig};
use slipway::store::{self, DeploymentState, JobState, Store, StoreError};
use slipway::submit::{Request, SubmitError, Submitter};
use slipway::targets::LocalTarget;

/// Slipway's no-op makespan may be at most this multiple of ninja's:
/// on SQLite, and on PostgreSQL (every transaction a network round trip
/// and an fsync).
pub const NOOP_TARGET: f64 = 1.0;
pub const NOOP_TARGET_POSTGRES: f64 = 1.5;
/// A sleep graph's makespan may be at most this multiple of its critical
/// path, on SQLite and on PostgreSQL.
pub const SLEEP_TARGET: f64 = 1.02;
pub const SLEEP_TARGET_POSTGRES: f64 = 1.05;

/// Where the bench's Slipway keeps its state: a fresh store for every run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchStore {
    /// A SQLite file in the run's directory.
    Sqlite,
    /// A database of its own on this server for each run, created through
    /// this URL (a user allowed to `CREATE DATABASE`) and dropped after.
    Postgres { admin_url: String },
}

impl BenchStore {
    /// `sqlite` or `postgres`, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            BenchStore::Sqlite => "sqlite",
            BenchStore::Postgres { .. } => "postgres",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Jobs in the graph.
    pub jobs: usize,
    /// Most jobs in one level.
    pub width: usize,
    /// Slots for the no-op graph, for both Slipway and `ninja -j`.
    pub parallelism: usize,
    pub seed: u64,
    /// No-op graph: how many times each of Slipway and ninja runs it
    /// (alternating); the report gives the median ratio.
    pub rounds: usize,
    /// Short-job graph: each job sleeps uniformly in `[0, short_max_ms]`.
    pub short_max_ms: u64,
    /// Slots for the short-job graph (Slipway's and ninja's).
    pub short_parallelism: usize,
    /// Long-job graph: each job sleeps uniformly in `[sleep_min_ms, sleep_max_ms]`.
    pub sleep_min_ms: u64,
    pub sleep_max_ms: u64,
    /// Chain: this many jobs, one after the other, each sleeping
    /// uniformly in `[0, chain_max_ms]`.
    pub chain: usize,
    pub chain_max_ms: u64,
    pub store: BenchStore,
    /// Nodes sharing the graph (PostgreSQL only), each with `parallelism`
    /// (or the sleep graph's) slots.
    pub nodes: usize,
    /// Also time the real binary: `slipway serve` node(s) and `slipway run`
    /// of every job, from the command's start to its end.
    pub cli: Option<PathBuf>,
    /// Print a JSON report instead of the human table.
    pub json: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            jobs: 1000,
            width: 50,
            parallelism: 8,
            seed: 1,
            rounds: 5,
            short_max_ms: 200,
            short_parallelism: 64,
            sleep_min_ms: 200,
            sleep_max_ms: 1000,
            chain: 200,
            chain_max_ms: 50,
            store: BenchStore::Sqlite,
            nodes: 1,
            cli: None,
            json: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("ninja not found on PATH: install Debian's ninja-build (apt-get install ninja-build)")]
    NinjaMissing,
    #[error("invalid bench options: {0}")]
    Options(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the generated config does not validate (a bug in `slipway-bench`):\n{0}")]
    Config(config::ConfigErrors),
    #[error("bench store: {0}")]
    Store(#[from] StoreError),
    #[error("submitting the bench graph failed: {0}")]
    Submit(#[from] SubmitError),
    #[error("slipway run of the {graph} graph failed: {reason}")]
    Slipway { graph: &'static str, reason: String },
    #[error("ninja run of the {graph} graph failed: {reason}")]
    Ninja { graph: &'static str, reason: String },
    #[error("{what} did not finish within {}", humantime::format_duration(*.after))]
    Timeout { what: String, after: Duration },
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bench PostgreSQL: {0}")]
    Postgres(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

// ---------------------------------------------------------------- the graph

/// A layered DAG. Jobs are numbered level by level, so every need of a job
/// has a smaller index than the job itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    /// Jobs per level, in order.
    pub level_sizes: Vec<usize>,
    /// The level of each job.
    pub level: Vec<usize>,
    /// Indexes of the jobs each job needs, sorted, distinct.
    pub needs: Vec<Vec<usize>>,
}

impl Dag {
    pub fn len(&self) -> usize {
        self.needs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.needs.is_empty()
    }

    pub fn levels(&self) -> usize {
        self.level_sizes.len()
    }

    pub fn max_width(&self) -> usize {
        self.level_sizes.iter().copied().max().unwrap_or(0)
    }

    pub fn edges(&self) -> usize {
        self.needs.iter().map(Vec::len).sum()
    }

    /// `j0000`, `j0001`, …: zero-padded so names sort like indexes.
    pub fn name(&self, i: usize) -> String {
        let digits = self.len().saturating_sub(1).to_string().len().max(4);
        format!("j{i:0digits$}")
    }

    pub fn names(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.name(i)).collect()
    }
}

/// A random layered DAG, the same for the same arguments: `jobs` jobs in
/// levels of between `width/2` and `width` jobs (the last level takes what
/// is left); every job after level 0 needs 1–3 distinct earlier jobs, at
/// least one of them from the level just before.
pub fn generate(jobs: usize, width: usize, seed: u64) -> Dag {
    let mut rng = StdRng::seed_from_u64(seed);
    let width = width.max(1);
    let min_width = (width / 2).max(1);
    let mut level_sizes = Vec::new();
    let mut placed = 0;
    while placed < jobs {
        let size = rng.random_range(min_width..=width).min(jobs - placed);
        level_sizes.push(size);
        placed += size;
    }
    let mut level = Vec::with_capacity(jobs);
    let mut needs = Vec::with_capacity(jobs);
    let mut start = 0; // first job of the current level
    for (l, &size) in level_sizes.iter().enumerate() {
        let prev_start = if l == 0 { 0 } else { start - level_sizes[l - 1] };
        for _ in 0..size {
            level.push(l);
            let mut mine: Vec<usize> = Vec::new();
            if l > 0 {
                let want = rng.random_range(1..=3usize).min(start);
                mine.push(rng.random_range(prev_start..start));
                while mine.len() < want {
                    let n = rng.random_range(0..start);
                    if !mine.contains(&n) {
                        mine.push(n);
                    }
                }
                mine.sort_unstable();
            }
            needs.push(mine);
        }
        start += size;
    }
    Dag { level_sizes, level, needs }
}

/// Sleep time of each job, uniform in `[min_ms, max_ms]`, from the seed.
pub fn sleep_durations(jobs: usize, min_ms: u64, max_ms: u64, seed: u64) -> Vec<u64> {
    // A different stream from the graph's, so the shape does not depend on it.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_51EE_9000_0000);
    let (lo, hi) = (min_ms.min(max_ms), min_ms.max(max_ms));
    (0..jobs).map(|_| rng.random_range(lo..=hi)).collect()
}

/// Longest path through the graph, summing the durations of its jobs.
/// `None` if `needs` has a cycle or an index out of range.
/// Where a run's time went along its realized critical chain: the job
/// that ended last, the need of it that ended last, and so on back to a
/// job with no needs. Times in ms from the submit (Slipway) or ninja's
/// start, summed over the chain's jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChainSplit {
    /// Jobs on the chain.
    pub jobs: usize,
    /// The chain's first job's start.
    pub first_start_ms: f64,
    /// What the chain's jobs asked for (their sleeps).
    pub sleeps_ms: f64,
    /// Each job's start to its end, beyond its sleep: the process's own
    /// start and exit, and whatever the tool does around it before it
    /// counts the job as ended.
    pub beyond_sleep_ms: f64,
    /// Each need's end to its dependant's start: the hand-overs.
    pub hand_over_ms: f64,
    /// Of `beyond_sleep_ms`, the part from the job's result being known
    /// to its end being seen: recording the result (Slipway only).
    pub recording_ms: Option<f64>,
}

/// The split of a run whose jobs started and ended at `times` (None for a
/// job never seen to run); `None` when no job was seen.
pub fn chain_split(needs: &[Vec<usize>], sleeps: &[u64], times: &[Option<(f64, f64)>], results: Option<&[Option<f64>]>) -> Option<ChainSplit> {
    let end = |j: usize| times.get(j).copied().flatten().map(|t| t.1);
    let mut j = (0..times.len()).filter(|&j| end(j).is_some()).max_by(|&a, &b| end(a).unwrap_or(0.0).total_cmp(&end(b).unwrap_or(0.0)))?;
    let mut split = ChainSplit::default();
    // A graph has no cycles, but the walk is bounded all the same.
    for _ in 0..times.len() {
        let (start, finish) = times[j]?;
        let sleep = sleeps.get(j).copied().unwrap_or(0) as f64;
        split.jobs += 1;
        split.sleeps_ms += sleep;
        split.beyond_sleep_ms += finish - start - sleep;
        if let Some(results) = results {
            let known = results.get(j).copied().flatten().unwrap_or(finish);
            *split.recording_ms.get_or_insert(0.0) += finish - known;
        }
        let last_need =
            needs.get(j).into_iter().flatten().copied().filter(|&n| end(n).is_some()).max_by(|&a, &b| end(a).unwrap_or(0.0).total_cmp(&end(b).unwrap_or(0.0)));
        match last_need {
            Some(n) => {
                split.hand_over_ms += start - end(n).unwrap_or(start);
                j = n;
            }
            None => {
                split.first_start_ms = start;
                break;
            }
        }
    }
    Some(split)
}

/// Ninja's `.ninja_log` (v5 and later: `start end mtime output hash`, ms
/// from ninja's start) as each job's (start, end), in `names`' order.
pub fn ninja_log_times(log: &str, names: &[String]) -> Vec<Option<(f64, f64)>> {
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let mut times = vec![None; names.len()];
    for line in log.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        if let [start, end, _, output, ..] = f[..]
            && let (Ok(start), Ok(end), Some(&i)) = (start.parse::<f64>(), end.parse::<f64>(), index.get(output))
        {
            times[i] = Some((start, end));
        }
    }
    times
}

pub fn critical_path(needs: &[Vec<usize>], durations: &[u64]) -> Option<u64> {
    let n = needs.len();
    if durations.len() != n || needs.iter().flatten().any(|&d| d >= n) {
        return None;
    }
    let mut dependants = vec![Vec::new(); n];
    let mut missing: Vec<usize> = needs.iter().map(Vec::len).collect();
    for (job, ns) in needs.iter().enumerate() {
        for &d in ns {
            dependants[d].push(job);
        }
    }
    let mut finish = vec![0u64; n];
    let mut start = vec![0u64; n];
    let mut queue: VecDeque<usize> = (0..n).filter(|&j| missing[j] == 0).collect();
    let mut done = 0;
    while let Some(j) = queue.pop_front() {
        done += 1;
        finish[j] = start[j] + durations[j];
        for &k in &dependants[j] {
            start[k] = start[k].max(finish[j]);
            missing[k] -= 1;
            if missing[k] == 0 {
                queue.push_back(k);
            }
        }
    }
    (done == n).then(|| finish.into_iter().max().unwrap_or(0))
}

/// `sleep 0.137` for 137 ms.
pub fn sleep_command(ms: u64) -> String {
    format!("sleep {}.{:03}", ms / 1000, ms % 1000)
}

/// `slipway.toml` for the graph, one shell command per job.
pub fn slipway_toml(dag: &Dag, commands: &[String]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::from("# Generated by `slipway-bench`.\n[project]\nname = \"bench\"\n");
    for i in 0..dag.len() {
        let needs: Vec<String> = dag.needs[i].iter().map(|&d| quote(&dag.name(d))).collect();
        let command = commands.get(i).map(String::as_str).unwrap_or("true");
        let _ = write!(
            out,
            "\n[[job]]\nname = {}\nshell = true\ncommand = {}\nneeds = [{}]\ntimeout = \"60s\"\n",
            quote(&dag.name(i)),
            quote(command),
            needs.join(", ")
        );
    }
    out
}

/// `build.ninja` for the graph: outputs are never created, so every edge
/// runs; needs are order-only dependencies.
pub fn build_ninja(dag: &Dag, commands: &[String]) -> String {
    let mut out = String::from("# Generated by `slipway-bench`.\nrule r\n  command = $cmd\n");
    for i in 0..dag.len() {
        let command = commands.get(i).map(String::as_str).unwrap_or("true").replace('$', "$$");
        let _ = write!(out, "\nbuild {}: r", dag.name(i));
        if !dag.needs[i].is_empty() {
            out.push_str(" ||");
            for &d in &dag.needs[i] {
                let _ = write!(out, " {}", dag.name(d));
            }
        }
        let _ = writeln!(out, "\n  cmd = {command}");
    }
    out
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    /// `sqlite` or `postgres`.
    pub store: &'static str,
    /// Slipway nodes sharing each graph.
    pub nodes: usize,
    pub seed: u64,
    pub jobs: usize,
    pub levels: usize,
    /// Jobs in the widest level.
    pub max_level_width: usize,
    pub edges: usize,
    pub ninja_version: String,
    pub noop: NoopReport,
    /// The random graph with short jobs, with long jobs, and the chain.
    pub graphs: Vec<GraphReport>,
    /// The real binary, timed from `slipway run`'s start to its end, and
    /// the same deployment's time on the server (`None` without `--cli`).
    pub end_to_end: Option<Vec<EndToEnd>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoopReport {
    pub parallelism: usize,
    pub slipway: SlipwayRun,
    pub ninja_secs: f64,
    /// CPU time of ninja and the commands it ran.
    pub ninja_cpu_secs: f64,
    /// Slipway ÷ ninja: the median of the rounds' ratios.
    pub ratio: f64,
    /// Each round's Slipway ÷ ninja, in the order run.
    pub round_ratios: Vec<f64>,
    pub target: f64,
    pub within_target: bool,
}

/// A graph of sleeping jobs: the best possible makespan is its critical
/// path (the longest chain of sleeps), given enough slots.
#[derive(Debug, Clone, Serialize)]
pub struct GraphReport {
    /// `short`, `long` or `chain`.
    pub name: &'static str,
    pub jobs: usize,
    /// Jobs on the longest chain of needs (the number of hand-overs a
    /// job's end makes on the critical path, plus one).
    pub depth: usize,
    /// Slots (per node), for Slipway and `ninja -j`.
    pub parallelism: usize,
    pub sleep_min_ms: u64,
    pub sleep_max_ms: u64,
    pub critical_path_secs: f64,
    pub slipway: SlipwayRun,
    /// Slipway ÷ critical path.
    pub ratio: f64,
    /// (Slipway − critical path) ÷ depth: what each hand-over costs.
    pub overhead_per_hop_ms: f64,
    /// The goal for `ratio` (issue 19); none for the chain, whose goal is
    /// to keep its cost per hop, read from the figures.
    pub target: Option<f64>,
    pub within_target: Option<bool>,
    pub ninja_secs: f64,
    pub ninja_cpu_secs: f64,
    /// Ninja ÷ critical path.
    pub ninja_ratio: f64,
    pub ninja_overhead_per_hop_ms: f64,
    /// Where Slipway's time went on its critical chain (job start and
    /// end as the bench's event consumer saw them: the end is after the
    /// result's commit).
    pub slipway_chain: Option<ChainSplit>,
    /// The same for ninja, from its `.ninja_log` (ms resolution).
    pub ninja_chain: Option<ChainSplit>,
}

/// One Slipway run, as seen from its events.
#[derive(Debug, Clone, Serialize)]
pub struct SlipwayRun {
    /// From just before submit to the deployment's `DeploymentFinished`:
    /// the server-side time.
    pub makespan_secs: f64,
    /// Most jobs running at once (over all nodes).
    pub peak_running: usize,
    /// Mean time from a job becoming ready to its start (store clock, ms resolution).
    pub mean_ready_to_start_ms: f64,
    /// Jobs each node started, in node order.
    pub started_per_node: Vec<u64>,
    /// CPU time (user + system) of this process and of the jobs it ran,
    /// during the run: a figure that holds up on a busy machine.
    pub cpu_secs: f64,
    /// Of `cpu_secs`, this process's own (the node, its store, the bench's
    /// watcher): what Slipway spends beyond the jobs' processes.
    pub own_cpu_secs: f64,
    /// The PostgreSQL server's CPU time (user + system) during the run: its
    /// postmaster, its live processes and those it reaped, from `/proc`.
    /// `None` on SQLite, or when the server does not run on this host (its
    /// processes cannot be read here). On a machine that runs the server
    /// beside the jobs, it competes with them for the same cores; anything
    /// else the server does meanwhile is counted too.
    pub store_server_cpu_secs: Option<f64>,
    /// Each job's (start, end) in ms from the submit, in the graph's
    /// order, as the bench's event consumer saw them.
    #[serde(skip)]
    pub job_times: Vec<Option<(f64, f64)>>,
    /// When each job's result was known (its summary line), before it is
    /// recorded; ms from the submit.
    #[serde(skip)]
    pub result_times: Vec<Option<f64>>,
}

/// A graph run through the real binary: `slipway serve` node(s), and
/// `slipway run` of every job, which waits for the end.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEnd {
    /// `noop` or `short`.
    pub graph: &'static str,
    /// `slipway run`'s start to its exit: what a user waits.
    pub cli_secs: f64,
    /// The deployment's `finished_at − created_at` (store clock, ms).
    pub server_secs: f64,
    /// cli ÷ server: what the command adds (start-up, the submit, how
    /// soon it learns the end).
    pub cli_over_server: f64,
    /// cli ÷ the peer: ninja's time (no-op graph, the same run's) or the
    /// critical path (short graph).
    pub cli_ratio: f64,
    /// What `cli_ratio` divides by.
    pub versus: &'static str,
}

impl BenchReport {
    pub fn human(&self) -> String {
        let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
        let n = &self.noop;
        let mut out = format!(
            "slipway-bench scheduler: store {}, {} node(s); seed {}, {} jobs in {} levels (widest {}), {} needs; {}\n{}\n\n",
            self.store,
            self.nodes,
            self.seed,
            self.jobs,
            self.levels,
            self.max_level_width,
            self.edges,
            self.ninja_version,
            self.machine.human(),
        );
        let _ = writeln!(
            out,
            "no-op graph (-j {}): slipway {:.3}s, ninja {:.3}s → ×{:.2} of ninja (target ≤ {}) {}; rounds: {}",
            n.parallelism,
            n.slipway.makespan_secs,
            n.ninja_secs,
            n.ratio,
            n.target,
            verdict(n.within_target),
            n.round_ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
        );
        let _ = writeln!(
            out,
            "  cpu: slipway {:.2}s (its own {:.2}s, {:.0}µs per job) vs ninja {:.2}s; peak {} running; ready→start {:.1}ms mean",
            n.slipway.cpu_secs,
            n.slipway.own_cpu_secs,
            n.slipway.own_cpu_secs * 1e6 / self.jobs.max(1) as f64,
            n.ninja_cpu_secs,
            n.slipway.peak_running,
            n.slipway.mean_ready_to_start_ms
        );
        if let Some(server) = n.slipway.store_server_cpu_secs {
            let _ = writeln!(
                out,
                "  cpu of the PostgreSQL server (on this host, sharing its cores): {:.2}s, {:.0}µs per job",
                server,
                server * 1e6 / self.jobs.max(1) as f64
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<7} {:>5} {:>5} {:>4} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}",
            "graph", "jobs", "depth", "-j", "sleeps ms", "critical", "slipway", "÷ crit", "ms/hop", "ninja", "÷ crit", "ms/hop"
        );
        for g in &self.graphs {
            let _ = writeln!(
                out,
                "{:<7} {:>5} {:>5} {:>4} {:>10} {:>8.2}s {:>8.2}s {:>8.3} {:>8.2} {:>8.2}s {:>8.3} {:>8.2}  {}",
                g.name,
                g.jobs,
                g.depth,
                g.parallelism,
                format!("{}–{}", g.sleep_min_ms, g.sleep_max_ms),
                g.critical_path_secs,
                g.slipway.makespan_secs,
                g.ratio,
                g.overhead_per_hop_ms,
                g.ninja_secs,
                g.ninja_ratio,
                g.ninja_overhead_per_hop_ms,
                match (g.target, g.within_target) {
                    (Some(t), Some(ok)) => format!("target ≤ {t} {}", verdict(ok)),
                    _ => "no target (compare ms/hop)".to_string(),
                },
            );
        }
        let _ = writeln!(
            out,
            "\nthe critical chain as run (the job that ended last, the need of it that ended last, back to the first); ms, summed over its jobs:"
        );
        let _ = writeln!(
            out,
            "{:<7} {:<8} {:>5} {:>12} {:>10} {:>13} {:>11} {:>11} {:>9}",
            "graph", "tool", "jobs", "first start", "sleeps", "beyond sleep", "(recording)", "hand-overs", "per job"
        );
        for g in &self.graphs {
            for (tool, c) in [("slipway", &g.slipway_chain), ("ninja", &g.ninja_chain)] {
                let Some(c) = c else { continue };
                let per_job = (c.beyond_sleep_ms + c.hand_over_ms) / c.jobs.max(1) as f64;
                let _ = writeln!(
                    out,
                    "{:<7} {:<8} {:>5} {:>12.1} {:>10.0} {:>13.1} {:>11} {:>11.1} {:>9.2}",
                    g.name,
                    tool,
                    c.jobs,
                    c.first_start_ms,
                    c.sleeps_ms,
                    c.beyond_sleep_ms,
                    c.recording_ms.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into()),
                    c.hand_over_ms,
                    per_job
                );
            }
        }
        if self.nodes > 1 {
            for g in &self.graphs {
                let _ = writeln!(out, "  {}: jobs started per node {:?}", g.name, g.slipway.started_per_node);
            }
        }
        if let Some(e2e) = &self.end_to_end {
            let _ = writeln!(out, "\nthe real binary (slipway serve, then `slipway run` of every job):");
            let _ = writeln!(out, "{:<7} {:>9} {:>9} {:>12} {:>10}", "graph", "cli", "server", "cli÷server", "cli÷peer");
            for e in e2e {
                let _ = writeln!(
                    out,
                    "{:<7} {:>8.3}s {:>8.3}s {:>12.3} {:>10.3}  (peer: {})",
                    e.graph, e.cli_secs, e.server_secs, e.cli_over_server, e.cli_ratio, e.versus
                );
            }
        }
        out
    }
}

// ---------------------------------------------------------------- the machine

/// The machine a bench ran on, printed with every report so two runs can
/// be compared: a ratio from a loaded 2-core box means something else than
/// one from an idle 16-core one.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `std::thread::available_parallelism` (cgroup limits included).
    pub cores: usize,
    /// `/proc/loadavg`'s 1-, 5- and 15-minute load when the bench started.
    pub load_at_start: [f64; 3],
    /// The same when the report was made.
    pub load_at_end: [f64; 3],
}

impl Machine {
    /// The core count and the load now; call [`Machine::finish`] at the end.
    pub fn now() -> Machine {
        let load = loadavg();
        Machine { cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), load_at_start: load, load_at_end: load }
    }

    /// Record the load at the end of the run.
    pub fn finish(mut self) -> Machine {
        self.load_at_end = loadavg();
        self
    }

    /// One line for the human report.
    pub fn human(&self) -> String {
        let l = |x: [f64; 3]| format!("{:.2} {:.2} {:.2}", x[0], x[1], x[2]);
        format!("machine: {} cores; load {} at the start, {} at the end", self.cores, l(self.load_at_start), l(self.load_at_end))
    }
}

/// `/proc/loadavg`'s three figures; zeros where it cannot be read.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().unwrap_or(0.0));
    [it.next().unwrap_or(0.0), it.next().unwrap_or(0.0), it.next().unwrap_or(0.0)]
}

// ---------------------------------------------------------------- running

/// Removes the bench directory however `run` ends.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<Self, BenchError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("slipway-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(io(format!("cannot create {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `name` in the directory of the running binary: cargo puts every binary
/// of the workspace there (`target/release/slipway-bench` next to
/// `target/release/slipway` and `target/release/slipway-demo`).
pub fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

/// An executable file `name` in a directory of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|f| std::fs::metadata(f).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A duration in (fractional) milliseconds, for reports.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `a / b`, or infinity when `b` is zero.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::INFINITY }
}

/// A chain: job i needs job i − 1.
pub fn chain(jobs: usize) -> Dag {
    Dag { level_sizes: vec![1; jobs], level: (0..jobs).collect(), needs: (0..jobs).map(|i| if i == 0 { vec![] } else { vec![i - 1] }).collect() }
}

fn check_options(opts: &BenchOptions) -> Result<(), BenchError> {
    let positive = [
        ("--jobs", opts.jobs),
        ("--width", opts.width),
        ("--rounds", opts.rounds),
        ("--parallelism", opts.parallelism),
        ("--short-parallelism", opts.short_parallelism),
        ("--chain", opts.chain),
        ("--nodes", opts.nodes),
    ];
    if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(BenchError::Options(format!("{flag} must be at least 1")));
    }
    if opts.sleep_min_ms > opts.sleep_max_ms {
        return Err(BenchError::Options(format!("the sleep range is empty: min {}ms > max {}ms", opts.sleep_min_ms, opts.sleep_max_ms)));
    }
    if opts.sleep_max_ms.max(opts.short_max_ms).max(opts.chain_max_ms) > 50_000 {
        return Err(BenchError::Options("sleeps above 50s exceed the jobs' 60s timeout".into()));
    }
    if opts.nodes > 1 && opts.store == BenchStore::Sqlite {
        return Err(BenchError::Options("--nodes above 1 needs --store postgres://…: one SQLite store serves one node".into()));
    }
    if opts.nodes > 16 {
        return Err(BenchError::Options("--nodes may be at most 16".into()));
    }
    Ok(())
}

/// Run every graph on Slipway and ninja (and, with `cli`, through the real
/// binary), print the report (human or JSON) to stdout and return it.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    check_options(&opts)?;
    let machine = Machine::now();
    let ninja = find_on_path("ninja").ok_or(BenchError::NinjaMissing)?;
    let ninja_version = ninja_version(&ninja).await?;
    if let Some(bin) = &opts.cli
        && !bin.is_file()
    {
        return Err(BenchError::Options(format!("the slipway binary {} does not exist (cargo build --release)", bin.display())));
    }

    let dag = generate(opts.jobs, opts.width, opts.seed);
    let root = TempDir::create()?;
    let stores = Stores::new(opts.store.clone());
    let result = run_graphs(&opts, &dag, &ninja, &root.0, &stores).await;
    stores.drop_all().await;
    drop(root);
    let (noop, graphs, end_to_end) = result?;

    let report = BenchReport {
        machine: machine.finish(),
        store: opts.store.kind(),
        nodes: opts.nodes,
        seed: opts.seed,
        jobs: dag.len(),
        levels: dag.levels(),
        max_level_width: dag.max_width(),
        edges: dag.edges(),
        ninja_version,
        noop,
        graphs,
        end_to_end,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report)
}

type Runs = (NoopReport, Vec<GraphReport>, Option<Vec<EndToEnd>>);

async fn run_graphs(opts: &BenchOptions, dag: &Dag, ninja: &Path, root: &Path, stores: &Stores) -> Result<Runs, BenchError> {
    let progress = |msg: &str| eprintln!("slipway-bench: {msg}");
    let postgres = matches!(opts.store, BenchStore::Postgres { .. });
    let names = dag.names();
    let nodes = Nodes { count: opts.nodes, stores };

    // No-op graph: alternate the two, each round in a fresh directory (a
    // fresh store), and keep the round with the median ratio.
    let noop_cmds = vec!["true".to_string(); dag.len()];
    let noop_limit = Duration::from_secs(60) + Duration::from_millis(100) * dag.len() as u32;
    let mut rounds = Vec::with_capacity(opts.rounds);
    for round in 1..=opts.rounds {
        let noop_dir = write_graph(&root.join(format!("noop-{round}")), dag, &noop_cmds)?;
        progress(&format!("no-op graph, round {round} of {}: slipway ({} jobs, -j {}), then ninja", opts.rounds, dag.len(), opts.parallelism));
        let s = run_slipway("no-op", &noop_dir, &names, opts.parallelism, noop_limit, &nodes).await?;
        let n = run_ninja("no-op", ninja, &noop_dir, opts.parallelism, noop_limit).await?;
        rounds.push((s, n));
    }
    let round_ratios: Vec<f64> = rounds.iter().map(|(s, n)| ratio(s.makespan_secs, n.wall.as_secs_f64())).collect();
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| round_ratios[a].total_cmp(&round_ratios[b]));
    let median = order[order.len() / 2];
    let noop_ratio = round_ratios[median];
    let (noop_slipway, noop_ninja) = rounds.swap_remove(median);
    let noop_target = if postgres { NOOP_TARGET_POSTGRES } else { NOOP_TARGET };
    let noop = NoopReport {
        parallelism: opts.parallelism,
        slipway: noop_slipway,
        ninja_secs: noop_ninja.wall.as_secs_f64(),
        ninja_cpu_secs: noop_ninja.cpu.as_secs_f64(),
        ratio: noop_ratio,
        round_ratios,
        target: noop_target,
        within_target: noop_ratio <= noop_target,
    };

    let sleep_target = if postgres { SLEEP_TARGET_POSTGRES } else { SLEEP_TARGET };
    let chain_dag = chain(opts.chain);
    let plans: [(&'static str, &Dag, u64, u64, usize); 3] = [
        ("short", dag, 0, opts.short_max_ms, opts.short_parallelism),
        ("long", dag, opts.sleep_min_ms, opts.sleep_max_ms, dag.max_width().max(1)),
        ("chain", &chain_dag, 0, opts.chain_max_ms, 1),
    ];
    let mut graphs = Vec::new();
    for (name, g, lo, hi, slots) in plans {
        let sleeps = sleep_durations(g.len(), lo, hi, opts.seed);
        let crit_ms =
            critical_path(&g.needs, &sleeps).ok_or_else(|| BenchError::Options("the generated graph has a cycle (a bug in `slipway-bench`)".into()))?;
        let depth = critical_path(&g.needs, &vec![1; g.len()]).unwrap_or(1) as usize;
        let cmds: Vec<String> = sleeps.iter().map(|&ms| sleep_command(ms)).collect();
        let dir = write_graph(&root.join(name), g, &cmds)?;
        let total_ms: u64 = sleeps.iter().sum();
        let limit = Duration::from_secs(60) + Duration::from_millis(3 * (crit_ms + total_ms / slots as u64)) + Duration::from_millis(100) * g.len() as u32;
        progress(&format!("{name} graph on slipway ({} jobs, sleeps {lo}–{hi} ms, critical path {:.2}s, -j {slots})", g.len(), crit_ms as f64 / 1000.0));
        let s = run_slipway(name, &dir, &g.names(), slots, limit, &nodes).await?;
        progress(&format!("{name} graph on ninja"));
        let n = run_ninja(name, ninja, &dir, slots, limit).await?;
        let crit = crit_ms as f64 / 1000.0;
        let r = ratio(s.makespan_secs, crit);
        let per_hop = |secs: f64| (secs - crit) * 1000.0 / depth.max(1) as f64;
        let slipway_chain = chain_split(&g.needs, &sleeps, &s.job_times, Some(&s.result_times));
        let ninja_chain = chain_split(&g.needs, &sleeps, &ninja_log_times(&n.log, &g.names()), None);
        graphs.push(GraphReport {
            name,
            jobs: g.len(),
            depth,
            parallelism: slots,
            sleep_min_ms: lo,
            sleep_max_ms: hi,
            critical_path_secs: crit,
            overhead_per_hop_ms: per_hop(s.makespan_secs),
            slipway: s,
            ratio: r,
            target: (name != "chain").then_some(sleep_target),
            within_target: (name != "chain").then_some(r <= sleep_target),
            ninja_secs: n.wall.as_secs_f64(),
            ninja_cpu_secs: n.cpu.as_secs_f64(),
            ninja_ratio: ratio(n.wall.as_secs_f64(), crit),
            ninja_overhead_per_hop_ms: per_hop(n.wall.as_secs_f64()),
            slipway_chain,
            ninja_chain,
        });
    }

    let end_to_end = match &opts.cli {
        None => None,
        Some(bin) => {
            let mut runs = Vec::new();
            let noop_dir = write_graph(&root.join("cli-noop"), dag, &noop_cmds)?;
            progress("no-op graph through the real binary: slipway serve, slipway run");
            let (cli, server) = endtoend::run(bin, &noop_dir, &names, opts.parallelism, noop_limit, &nodes).await?;
            runs.push(EndToEnd::new("noop", cli, server, noop.ninja_secs, "ninja on the no-op graph"));
            let short = &graphs[0];
            let sleeps = sleep_durations(dag.len(), 0, opts.short_max_ms, opts.seed);
            let dir = write_graph(&root.join("cli-short"), dag, &sleeps.iter().map(|&ms| sleep_command(ms)).collect::<Vec<_>>())?;
            progress("short graph through the real binary");
            let limit = Duration::from_secs(120) + Duration::from_millis(100) * dag.len() as u32;
            let (cli, server) = endtoend::run(bin, &dir, &names, short.parallelism, limit, &nodes).await?;
            runs.push(EndToEnd::new("short", cli, server, short.critical_path_secs, "the short graph's critical path"));
            Some(runs)
        }
    };
    Ok((noop, graphs, end_to_end))
}

impl EndToEnd {
    fn new(graph: &'static str, cli: Duration, server: Duration, peer_secs: f64, versus: &'static str) -> EndToEnd {
        let (cli, server) = (cli.as_secs_f64(), server.as_secs_f64());
        EndToEnd { graph, cli_secs: cli, server_secs: server, cli_over_server: ratio(cli, server), cli_ratio: ratio(cli, peer_secs), versus }
    }
}

/// The fresh stores a bench made, so they can be removed at the end.
pub(crate) struct Stores {
    kind: BenchStore,
    made: std::sync::Mutex<Vec<String>>,
    /// The PostgreSQL server's postmaster, when it runs on this host
    /// (looked up at the first fresh store, from the backend that made it).
    postmaster: std::sync::OnceLock<Option<u32>>,
}

impl Stores {
    fn new(kind: BenchStore) -> Stores {
        Stores { kind, made: Default::default(), postmaster: Default::default() }
    }

    /// The PostgreSQL server's CPU time so far, when it runs on this host.
    async fn server_cpu(&self) -> Option<Duration> {
        server_cpu_of(self.postmaster.get().copied().flatten()?)
    }

    /// A store URL nothing has used, for one run in `dir`.
    pub(crate) async fn fresh(&self, dir: &Path) -> Result<String, BenchError> {
        match &self.kind {
            BenchStore::Sqlite => Ok(format!("sqlite://{}", dir.join(".slipway").join("bench.db").display())),
            BenchStore::Postgres { admin_url } => {
                let name = {
                    let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
                    let name = format!("slipway_bench_{}_{}", std::process::id(), made.len());
                    made.push(name.clone());
                    name
                };
                let postmaster = admin(admin_url, &format!("CREATE DATABASE {name}")).await?;
                if self.postmaster.get().is_none() {
                    let _ = self.postmaster.set(postmaster);
                }
                let base = admin_url.split('?').next().unwrap_or(admin_url);
                let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
                Ok(format!("{base}/{name}"))
            }
        }
    }

    /// Drop every database made (best effort: a bench that failed still
    /// cleans up what it can).
    async fn drop_all(&self) {
        let BenchStore::Postgres { admin_url } = &self.kind else { return };
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|e| e.into_inner()));
        for name in made {
            if let Err(e) = admin(admin_url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
                eprintln!("slipway-bench: cannot drop the bench database {name}: {e}");
            }
        }
    }
}

/// The postmaster of a server whose `backend` (its `pg_backend_pid()`,
/// the connection still open) answered, if it runs on this host: the
/// backend's parent, both named `postgres` in this host's `/proc` (a
/// server elsewhere, or in another PID namespace, has no such pair here,
/// or not one of its own).
fn postmaster_of(backend: i32) -> Option<u32> {
    let backend = u32::try_from(backend).ok()?;
    let (comm, parent) = proc_stat(backend).map(|s| (s.comm, s.parent))?;
    let postmaster = proc_stat(parent)?;
    let named = |c: &str| c == "postgres" || c == "postmaster";
    (named(&comm) && named(&postmaster.comm)).then_some(parent)
}

/// What the bench reads of `/proc/PID/stat`.
struct ProcStat {
    comm: String,
    parent: u32,
    /// utime + stime, in clock ticks.
    own: u64,
    /// cutime + cstime: its children's that it has reaped, in clock ticks.
    reaped: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses.
    let (head, rest) = text.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields from 3 (state): ppid is 4, utime 14, stime 15, cutime 16, cstime 17.
    let n = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok());
    Some(ProcStat { comm, parent: u32::try_from(n(4)?).ok()?, own: n(14)? + n(15)?, reaped: n(16)? + n(17)? })
}

/// The postmaster's CPU time, its reaped children's, and its live
/// children's (with what they reaped): a backend that ends between two
/// readings moves its whole time from the last to the second, so the
/// difference of two readings is what the server spent between them, to
/// the clock tick. The children are read first and the postmaster after;
/// if a child ended meanwhile (its time may be in neither), again.
fn server_cpu_of(postmaster: u32) -> Option<Duration> {
    let children = || -> Option<Vec<(u32, u64)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(child) = proc_stat(pid).filter(|c| c.parent == postmaster) {
                found.push((pid, child.own + child.reaped));
            }
        }
        Some(found)
    };
    let mut ticks = None;
    for _ in 0..5 {
        let live = children()?;
        let pm = proc_stat(postmaster)?;
        let total = pm.own + pm.reaped + live.iter().map(|(_, t)| t).sum::<u64>();
        let gone = live.iter().any(|(pid, _)| proc_stat(*pid).is_none_or(|c| c.parent != postmaster));
        ticks = Some(total);
        if !gone {
            break;
        }
    }
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks?.saturating_mul(1_000_000) / hz))
}

/// One statement on the PostgreSQL server, outside any transaction (as
/// `CREATE DATABASE` must be), bounded by a timeout.
/// Answers the server's postmaster, if it runs on this host (see
/// [`postmaster_of`]).
async fn admin(url: &str, sql: &str) -> Result<Option<u32>, BenchError> {
    use sqlx::Connection as _;
    let limit = Duration::from_secs(30);
    let work = async {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut conn).await?;
        // Read while its backend is alive.
        let backend: Option<i32> = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await.ok();
        let postmaster = backend.and_then(postmaster_of);
        conn.close().await.map(|()| postmaster)
    };
    match tokio::time::timeout(limit, work).await {
        Err(_) => Err(BenchError::Timeout { what: format!("PostgreSQL: {sql}"), after: limit }),
        Ok(Err(e)) => Err(BenchError::Postgres(format!("{sql}: {e}"))),
        Ok(Ok(postmaster)) => Ok(postmaster),
    }
}

/// How many nodes run each graph, and where their stores come from.
pub(crate) struct Nodes<'a> {
    pub count: usize,
    pub stores: &'a Stores,
}

/// A directory holding `slipway.toml` and `build.ninja` for the graph.
fn write_graph(dir: &Path, dag: &Dag, commands: &[String]) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let dir = std::fs::canonicalize(dir).map_err(io(format!("cannot resolve {}", dir.display())))?;
    let toml_path = dir.join(config::CONFIG_FILE);
    std::fs::write(&toml_path, slipway_toml(dag, commands)).map_err(io(format!("cannot write {}", toml_path.display())))?;
    let ninja_path = dir.join("build.ninja");
    std::fs::write(&ninja_path, build_ninja(dag, commands)).map_err(io(format!("cannot write {}", ninja_path.display())))?;
    Ok(dir)
}

/// What the bench's own event consumer saw, over every node.
#[derive(Debug, Default)]
struct Watched {
    peak_running: usize,
    started: u64,
    started_per_node: Vec<u64>,
    ready_to_start: Duration,
    /// Each job's start and end events, by name, when they arrived.
    times: HashMap<String, (Instant, Option<Instant>)>,
    /// When each job's summary line (`[slipway] attempt …`) arrived, by name.
    results: HashMap<String, Instant>,
    names: HashMap<i64, String>,
}

async fn watch(mut rx: mpsc::Receiver<(usize, Arc<Event>)>, nodes: usize, finished: mpsc::UnboundedSender<(i64, DeploymentState, Instant)>) -> Watched {
    let mut w = Watched { started_per_node: vec![0; nodes], ..Watched::default() };
    let mut running = 0usize;
    while let Some((node, ev)) = rx.recv().await {
        match &*ev {
            Event::JobStarted { queued_for, name, job_id, .. } => {
                w.times.entry(name.clone()).or_insert((Instant::now(), None));
                w.names.insert(*job_id, name.clone());
                running += 1;
                w.peak_running = w.peak_running.max(running);
                w.started += 1;
                w.started_per_node[node] += 1;
                w.ready_to_start += *queued_for;
            }
            Event::JobOutput { job_id, stream: "slipway", line, .. } if line.starts_with("[slipway] attempt") => {
                if let Some(name) = w.names.get(job_id) {
                    w.results.insert(name.clone(), Instant::now());
                }
            }
            Event::JobFinished { name, .. } => {
                if let Some(t) = w.times.get_mut(name) {
                    t.1 = Some(Instant::now());
                }
                running = running.saturating_sub(1)
            }
            Event::DeploymentFinished { deployment, state } => {
                let _ = finished.send((*deployment, *state, Instant::now()));
            }
            _ => {}
        }
    }
    w
}

/// Run the graph in `dir` on in-process Slipway node(s) over a fresh
/// store, each wired as `slipway serve` wires it; the first one takes the
/// submit.
async fn run_slipway(
    graph: &'static str,
    dir: &Path,
    names: &[String],
    parallelism: usize,
    limit: Duration,
    nodes: &Nodes<'_>,
) -> Result<SlipwayRun, BenchError> {
    let config_path = dir.join(config::CONFIG_FILE);
    let loaded = config::load(&config_path).map_err(BenchError::Config)?;
    if loaded.config.jobs.len() != names.len() {
        return Err(BenchError::Slipway { graph, reason: format!("the config has {} jobs, expected {}", loaded.config.jobs.len(), names.len()) });
    }
    let url = nodes.stores.fresh(dir).await?;
    let (all_tx, all_rx) = mpsc::channel(4096);
    let (fin_tx, mut fin_rx) = mpsc::unbounded_channel();
    let watch_task = tokio::spawn(watch(all_rx, nodes.count, fin_tx));
    let token = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut log_tasks = Vec::new();
    let mut first: Option<(Arc<dyn Store>, slipway::scheduler::SchedulerHandle)> = None;
    for node in 0..nodes.count {
        // Each node its own store handle (its own connections), as
        // separate `serve` processes have.
        let store: Arc<dyn Store> = store::open(&url).await?;
        let mut bus = EventBus::new();
        let log_rx = bus.subscribe(4096);
        let mut my_rx = bus.subscribe(4096);
        log_tasks.push(tokio::spawn(logwriter::run(store.clone(), log_rx)));
        let tx = all_tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = my_rx.recv().await {
                if tx.send((node, ev)).await.is_err() {
                    break;
                }
            }
        });
        let mut cfg = SchedulerConfig::new(format!("bench-{}", node + 1), dir.join(".slipway").join(format!("work-{}", node + 1)));
        cfg.parallelism = parallelism;
        cfg.poll = Duration::from_millis(200);
        cfg.shutdown_grace = Duration::from_secs(5);
        let sched = Scheduler::new(store.clone(), Arc::new(LocalTarget::default()), cfg, bus);
        if first.is_none() {
            first = Some((store.clone(), sched.handle()));
        }
        tasks.push(tokio::spawn(Scheduler::run(sched, token.clone())));
    }
    drop(all_tx);
    let Some((store, wake)) = first else { return Err(BenchError::Options("--nodes must be at least 1".into())) };
    let submitter = Submitter {
        config_path,
        store: store.clone(),
        parallelism,
        wake: Some(wake),
        targets: None,
        events: None,
        deciding: Default::default(),
        parsed: Default::default(),
        redeployed: Default::default(),
        fetch_failures: Default::default(),
    };
    // Let the nodes register and go idle, so their start-up is not timed.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let server_before = nodes.stores.server_cpu().await;
    let (cpu_before, own_before) = (cpu_time(), rusage_cpu(libc::RUSAGE_SELF));
    let submitted_at = Instant::now();
    let measured = async {
        let start = submitted_at;
        let submitted = submitter.submit(Request::Run { jobs: names.to_vec(), environment: None }, None, "{}".into()).await?;
        let id = submitted.deployment_id;
        let wait = async {
            while let Some((d, state, at)) = fin_rx.recv().await {
                if d == id {
                    return Some((state, at));
                }
            }
            None
        };
        let (state, at) = match tokio::time::timeout(limit, wait).await {
            Err(_) => return Err(BenchError::Timeout { what: format!("slipway on the {graph} graph"), after: limit }),
            Ok(None) => return Err(BenchError::Slipway { graph, reason: "the scheduler stopped before the deployment finished".into() }),
            Ok(Some(x)) => x,
        };
        let makespan = at.duration_since(start);
        check_succeeded(graph, &store, id, state, names.len()).await?;
        Ok(makespan)
    }
    .await;

    let cpu = cpu_time().saturating_sub(cpu_before);
    let own_cpu = rusage_cpu(libc::RUSAGE_SELF).saturating_sub(own_before);
    let server_cpu = match (server_before, nodes.stores.server_cpu().await) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    // The last jobs' tasks are still winding down when the deployment's
    // event arrives: let the nodes see them end before asking them to stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel();
    drop(submitter);
    drop(store);
    let stop_limit = Duration::from_secs(30);
    let stopped = tokio::time::timeout(stop_limit, futures_util::future::join_all(tasks)).await;
    let watched = tokio::time::timeout(Duration::from_secs(5), watch_task).await.ok().and_then(Result::ok).unwrap_or_default();
    let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(log_tasks)).await;
    let makespan = measured?;
    match stopped {
        Err(_) => return Err(BenchError::Timeout { what: "stopping the bench scheduler(s)".into(), after: stop_limit }),
        Ok(results) => {
            for r in results {
                match r {
                    Err(e) => return Err(BenchError::Slipway { graph, reason: format!("scheduler task failed: {e}") }),
                    Ok(Err(e)) => return Err(BenchError::Slipway { graph, reason: format!("scheduler stopped: {e}") }),
                    Ok(Ok(())) => {}
                }
            }
        }
    }
    Ok(SlipwayRun {
        makespan_secs: makespan.as_secs_f64(),
        peak_running: watched.peak_running,
        mean_ready_to_start_ms: if watched.started == 0 { 0.0 } else { watched.ready_to_start.as_secs_f64() * 1000.0 / watched.started as f64 },
        started_per_node: watched.started_per_node,
        cpu_secs: cpu.as_secs_f64(),
        own_cpu_secs: own_cpu.as_secs_f64(),
        store_server_cpu_secs: server_cpu.map(|d| d.as_secs_f64()),
        job_times: names
            .iter()
            .map(|n| {
                let (start, end) = watched.times.get(n)?;
                let ms = |t: &Instant| t.saturating_duration_since(submitted_at).as_secs_f64() * 1000.0;
                Some((ms(start), ms(&(*end)?)))
            })
            .collect(),
        result_times: names.iter().map(|n| watched.results.get(n).map(|t| t.saturating_duration_since(submitted_at).as_secs_f64() * 1000.0)).collect(),
    })
}

/// An error unless deployment `id` ended `succeeded` with `jobs` jobs, all succeeded.
pub(crate) async fn check_succeeded(graph: &'static str, store: &Arc<dyn Store>, id: i64, state: DeploymentState, expected: usize) -> Result<(), BenchError> {
    let jobs = store.jobs(id).await?;
    let bad: Vec<String> = jobs
        .iter()
        .filter(|j| j.state != JobState::Succeeded)
        .take(3)
        .map(|j| format!("{} {}{}", j.name, j.state, j.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()))
        .collect();
    if state != DeploymentState::Succeeded || jobs.len() != expected || !bad.is_empty() {
        return Err(BenchError::Slipway {
            graph,
            reason: format!(
                "deployment {id} ended {state} with {} of {expected} jobs{}{}",
                jobs.len(),
                if bad.is_empty() { "" } else { "; for instance: " },
                bad.join(", ")
            ),
        });
    }
    Ok(())
}

async fn ninja_version(ninja: &Path) -> Result<String, BenchError> {
    let run = tokio::process::Command::new(ninja).arg("--version").stdin(Stdio::null()).kill_on_drop(true).output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Err(_) => Err(BenchError::Timeout { what: format!("{} --version", ninja.display()), after: Duration::from_secs(10) }),
        Ok(Err(e)) => Err(BenchError::Io { what: format!("cannot run {}", ninja.display()), source: e }),
        Ok(Ok(out)) => Ok(format!("ninja {}", String::from_utf8_lossy(&out.stdout).trim())),
    }
}

/// CPU time (user + system) of `RUSAGE_SELF` or `RUSAGE_CHILDREN`.
fn rusage_cpu(who: libc::c_int) -> Duration {
    let (user, system) = rusage_user_system(who);
    user + system
}

/// User and system CPU time of `who` (`RUSAGE_SELF`, `RUSAGE_CHILDREN`).
fn rusage_user_system(who: libc::c_int) -> (Duration, Duration) {
    // SAFETY: getrusage only writes the struct we pass it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64);
    (tv(u.ru_utime), tv(u.ru_stime))
}

/// This process and the children it has waited for (jobs, ninja and,
/// through ninja, its commands).
fn cpu_time() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF) + rusage_cpu(libc::RUSAGE_CHILDREN)
}

fn children_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_CHILDREN)
}

struct NinjaRun {
    wall: Duration,
    /// Ninja's and its commands' CPU time.
    cpu: Duration,
    /// `.ninja_log`, read after the run.
    log: String,
}

/// Time `ninja -f build.ninja -j P -C dir`. Ninja gets its own process
/// group, so a timeout kills the commands it started too.
async fn run_ninja(graph: &'static str, ninja: &Path, dir: &Path, parallelism: usize, limit: Duration) -> Result<NinjaRun, BenchError> {
    // Ninja remembers what it built: start from nothing every time.
    for f in [".ninja_log", ".ninja_deps"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let mut cmd = tokio::process::Command::new(ninja);
    cmd.arg("-f")
        .arg("build.ninja")
        .arg("-j")
        .arg(parallelism.to_string())
        .arg("-C")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let children_before = children_cpu();
    let start = Instant::now();
    let child = cmd.spawn().map_err(io(format!("cannot run {}", ninja.display())))?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.map_err(io(format!("waiting for {}", ninja.display())))?,
        Err(_) => {
            if pgid > 0 {
                // SAFETY: plain syscall on the group we created; ESRCH is ignored.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            return Err(BenchError::Timeout { what: format!("ninja on the {graph} graph"), after: limit });
        }
    };
    let wall = start.elapsed();
    let cpu = children_cpu().saturating_sub(children_before);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError::Ninja { graph, reason: format!("{}: {}", out.status, stderr.trim()) });
    }
    let log = std::fs::read_to_string(dir.join(".ninja_log")).unwrap_or_default();
    Ok(NinjaRun { wall, cpu, log })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_for_a_seed() {
        assert_eq!(generate(500, 20, 7), generate(500, 20, 7));
        assert_ne!(generate(500, 20, 7), generate(500, 20, 8));
        assert_eq!(sleep_durations(100, 50, 300, 7), sleep_durations(100, 50, 300, 7));
    }

    #[test]
    fn generated_graphs_are_layered() {
        for (jobs, width, seed) in [(1000, 50, 1), (37, 5, 2), (10, 1, 3), (1, 50, 4), (200, 3, 5)] {
            let dag = generate(jobs, width, seed);
            assert_eq!(dag.len(), jobs);
            assert_eq!(dag.level_sizes.iter().sum::<usize>(), jobs);
            assert!(dag.level_sizes.iter().all(|&s| s >= 1 && s <= width), "{:?}", dag.level_sizes);
            // All levels but the last are at least half the width.
            let full = &dag.level_sizes[..dag.levels() - 1];
            assert!(full.iter().all(|&s| s >= (width / 2).max(1)));
            for (j, ns) in dag.needs.iter().enumerate() {
                let l = dag.level[j];
                if l == 0 {
                    assert!(ns.is_empty());
                    continue;
                }
                assert!((1..=3).contains(&ns.len()), "job {j} needs {ns:?}");
                assert!(ns.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {ns:?}");
                assert!(ns.iter().all(|&d| dag.level[d] < l), "job {j} at level {l} needs {ns:?}");
                assert!(ns.iter().any(|&d| dag.level[d] == l - 1), "job {j} needs nothing from level {}", l - 1);
            }
        }
    }

    #[test]
    fn critical_path_of_a_small_graph() {
        // a(3) → b(5) → d(1), a → c(10) → d, e(20) alone.
        let needs = vec![vec![], vec![0], vec![0], vec![1, 2], vec![]];
        assert_eq!(critical_path(&needs, &[3, 5, 10, 1, 4]), Some(14));
        assert_eq!(critical_path(&needs, &[3, 5, 10, 1, 20]), Some(20));
        assert_eq!(critical_path(&[vec![1], vec![0]], &[1, 1]), None, "a cycle has no critical path");
        assert_eq!(critical_path(&[], &[]), Some(0));
    }

    #[test]
    fn the_chain_split_follows_the_needs_that_ended_last() {
        // a → b → d, a → c → d, e alone; c ends after b, so the chain is a, c, d.
        let needs = vec![vec![], vec![0], vec![0], vec![1, 2], vec![]];
        let sleeps = [3, 5, 10, 1, 4];
        let times = vec![Some((1.0, 5.0)), Some((6.0, 12.0)), Some((7.0, 18.0)), Some((20.0, 22.0)), Some((1.0, 6.0))];
        let results = vec![Some(4.5), None, Some(17.0), Some(21.0), None];
        let split = chain_split(&needs, &sleeps, &times, Some(&results)).expect("a split");
        // Beyond sleep: (4 − 3) + (11 − 10) + (2 − 1); hand-overs: c starts 2 after a's end, d 2 after c's.
        let want = ChainSplit { jobs: 3, first_start_ms: 1.0, sleeps_ms: 14.0, beyond_sleep_ms: 3.0, hand_over_ms: 4.0, recording_ms: Some(0.5 + 1.0 + 1.0) };
        assert_eq!(split, want);
        // Ninja's side has no result times; a job never seen is skipped as a need.
        let partial = vec![Some((1.0, 5.0)), None, Some((7.0, 18.0)), Some((20.0, 22.0)), None];
        let split = chain_split(&needs, &sleeps, &partial, None).expect("a split");
        assert_eq!((split.jobs, split.hand_over_ms, split.recording_ms), (3, 4.0, None));
        assert_eq!(chain_split(&needs, &sleeps, &[None, None, None, None, None], None), None);
    }

    #[test]
    fn ninja_log_lines_are_read_by_output_name() {
        let names: Vec<String> = ["j1", "j2", "j3"].iter().map(|s| s.to_string()).collect();
        let log = "# ninja log v5\n0\t53\t0\tj2\t692f11a2e1c1f0df\n53\t54\t0\tj1\t486a3acadd116b47\nnot a line\n7\tx\t0\tj3\tff\n";
        assert_eq!(ninja_log_times(log, &names), vec![Some((53.0, 54.0)), Some((0.0, 53.0)), None]);
    }

    #[test]
    fn generated_files_describe_the_graph() {
        let dag = generate(60, 8, 3);
        let cmds: Vec<String> = sleep_durations(60, 50, 300, 3).into_iter().map(sleep_command).collect();
        let cfg = config::parse("slipway.toml", &slipway_toml(&dag, &cmds)).expect("the generated config validates");
        assert_eq!(cfg.jobs.len(), 60);
        for (i, job) in cfg.jobs.iter().enumerate() {
            assert_eq!(job.name, dag.name(i));
            assert_eq!(job.needs, dag.needs[i].iter().map(|&d| dag.name(d)).collect::<Vec<_>>());
            assert_eq!(job.command, config::Command::Shell(cmds[i].clone()));
        }
        let ninja = build_ninja(&dag, &cmds);
        assert_eq!(ninja.matches("\nbuild ").count(), 60);
        assert_eq!(sleep_command(137), "sleep 0.137");
        assert_eq!(sleep_command(1005), "sleep 1.005");
    }
}
