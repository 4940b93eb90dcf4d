//! The planner: from a validated config, an environment and a selection
//! (everything, one service's jobs, or named jobs) to the graph a
//! deployment runs — dependency order, parallel waves, critical path and an
//! estimated duration.
//!
//! **Architecture Invariant:** the planner does no IO. Durations of past
//! runs are passed in by the caller, who read them from the store.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Job};

/// Which jobs a deployment runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selection {
    /// Every job of the environment.
    All,
    /// The jobs that belong to a service, and what they need.
    Service { service: String },
    /// Named jobs and what they need.
    Jobs { jobs: Vec<String> },
    /// Exactly these jobs, ordered by the `needs` among them; what they
    /// need outside the set does not run (a git revision: the jobs its
    /// changes touch, see [`changes`]).
    Exactly { jobs: Vec<String> },
}

pub mod changes;
pub mod shape;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown environment {env:?}; the config declares: {known}")]
    UnknownEnvironment { env: String, known: String },
    #[error("unknown job {job:?}{}", hint.as_deref().map(|h| format!("; did you mean {h:?}?")).unwrap_or_default())]
    UnknownJob { job: String, hint: Option<String> },
    #[error("unknown service {service:?}; the config declares: {known}")]
    UnknownService { service: String, known: String },
    #[error("service {service:?} has no jobs in environment {env:?}; give jobs `service = {service:?}`")]
    ServiceHasNoJobs { service: String, env: String },
    #[error("job {job:?} is not part of environment {env:?} (see its `environments`)")]
    JobNotInEnvironment { job: String, env: String },
    #[error("job {job:?} needs {need:?}, which does not run in environment {env:?}")]
    NeedNotInEnvironment { job: String, need: String, env: String },
    #[error("nothing to run: environment {env:?} has no jobs")]
    Empty { env: String },
}

/// Where a job's estimated duration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimateSource {
    /// Recorded durations of past successful runs.
    History,
    /// The job's declared `timeout` (an upper bound).
    Timeout,
    /// The default timeout: the job declares none.
    DefaultTimeout,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedJob {
    pub name: String,
    /// Indexes into `Plan::jobs`.
    pub needs: Vec<usize>,
    pub wave: usize,
    #[serde(serialize_with = "secs")]
    pub estimate: Duration,
    pub estimate_source: EstimateSource,
    #[serde(skip)]
    pub job: Job,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub environment: String,
    pub selection: Selection,
    pub parallelism: usize,
    /// In dependency order: every job after all it needs.
    pub jobs: Vec<PlannedJob>,
    /// Groups that may run at once: wave n needs only waves before it.
    pub waves: Vec<Vec<usize>>,
    pub critical_path: Vec<usize>,
    #[serde(serialize_with = "secs")]
    pub critical_path_duration: Duration,
    /// Simulated makespan with `parallelism` slots.
    #[serde(serialize_with = "secs")]
    pub estimated_duration: Duration,
    /// How many jobs' estimates come from history (the rest from timeouts).
    pub estimated_from_history: usize,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Build the plan. `history` maps job names to a typical duration of
/// their recent successful runs.
pub fn build(config: &Config, env: &str, selection: &Selection, parallelism: usize, history: &HashMap<String, Duration>) -> Result<Plan, PlanError> {
    let envs = config.environment_names();
    if !envs.iter().any(|e| e == env) {
        return Err(PlanError::UnknownEnvironment { env: env.to_string(), known: envs.join(", ") });
    }
    let in_env = |j: &Job| j.environments.as_ref().is_none_or(|e| e.iter().any(|e| e == env));
    let index: HashMap<&str, usize> = config.jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();

    // Roots of the selection, then the closure over `needs`.
    let roots: Vec<usize> = match selection {
        Selection::All => (0..config.jobs.len()).filter(|i| in_env(&config.jobs[*i])).collect(),
        Selection::Service { service } => {
            if !config.services.iter().any(|s| &s.name == service) {
                let known: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
                return Err(PlanError::UnknownService { service: service.clone(), known: none_if_empty(&known) });
            }
            let r: Vec<usize> = (0..config.jobs.len()).filter(|i| config.jobs[*i].service.as_deref() == Some(service) && in_env(&config.jobs[*i])).collect();
            if r.is_empty() {
                return Err(PlanError::ServiceHasNoJobs { service: service.clone(), env: env.to_string() });
            }
            r
        }
        Selection::Jobs { jobs } | Selection::Exactly { jobs } => {
            let mut r = Vec::new();
            for name in jobs {
                let Some(&i) = index.get(name.as_str()) else {
                    let hint = crate::config::diagnostic::did_you_mean(name, index.keys().copied()).map(str::to_string);
                    return Err(PlanError::UnknownJob { job: name.clone(), hint });
                };
                if !in_env(&config.jobs[i]) {
                    return Err(PlanError::JobNotInEnvironment { job: name.clone(), env: env.to_string() });
                }
                r.push(i);
            }
            r
        }
    };
    let mut selected = BTreeSet::new();
    let closed = matches!(selection, Selection::Exactly { .. });
    if closed {
        selected.extend(roots.iter().copied());
    }
    let mut stack = if closed { vec![] } else { roots };
    while let Some(i) = stack.pop() {
        if !selected.insert(i) {
            continue;
        }
        for need in &config.jobs[i].needs {
            if let Some(&d) = index.get(need.as_str()) {
                if !in_env(&config.jobs[d]) {
                    return Err(PlanError::NeedNotInEnvironment { job: config.jobs[i].name.clone(), need: need.clone(), env: env.to_string() });
                }
                stack.push(d);
            }
        }
    }
    if selected.is_empty() {
        return Err(PlanError::Empty { env: env.to_string() });
    }

    // Waves by longest distance from a root; order by (wave, name) so the
    // same config always plans the same way.
    let chosen: Vec<&Job> = selected.iter().map(|i| &config.jobs[*i]).collect();
    let local: HashMap<&str, usize> = chosen.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();
    let topo = crate::config::validate::topo_order(&chosen.iter().map(|j| (*j).clone()).collect::<Vec<_>>(), &local);
    let mut wave = vec![0usize; chosen.len()];
    for &i in &topo {
        wave[i] = chosen[i].needs.iter().filter_map(|n| local.get(n.as_str())).map(|d| wave[*d] + 1).max().unwrap_or(0);
    }
    let mut order: Vec<usize> = (0..chosen.len()).collect();
    order.sort_by(|a, b| (wave[*a], &chosen[*a].name).cmp(&(wave[*b], &chosen[*b].name)));
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(p, i)| (*i, p)).collect();

    let mut jobs = Vec::with_capacity(order.len());
    let mut from_history = 0;
    for &i in &order {
        let j = chosen[i];
        let (estimate, estimate_source) = match history.get(&j.name) {
            Some(d) => {
                from_history += 1;
                (*d, EstimateSource::History)
            }
            None if j.timeout_declared => (j.timeout, EstimateSource::Timeout),
            None => (j.timeout, EstimateSource::DefaultTimeout),
        };
        let mut needs: Vec<usize> = j.needs.iter().filter_map(|n| local.get(n.as_str())).map(|d| position[d]).collect();
        needs.sort_unstable();
        jobs.push(PlannedJob { name: j.name.clone(), needs, wave: wave[i], estimate, estimate_source, job: j.clone() });
    }
    let waves_count = jobs.iter().map(|j| j.wave + 1).max().unwrap_or(0);
    let mut waves = vec![Vec::new(); waves_count];
    for (p, j) in jobs.iter().enumerate() {
        waves[j.wave].push(p);
    }

    // Longest path by estimate (jobs are in dependency order).
    let needs: Vec<Vec<usize>> = jobs.iter().map(|j| j.needs.clone()).collect();
    let estimates: Vec<Duration> = jobs.iter().map(|j| j.estimate).collect();
    let (critical_path, critical_path_duration) = shape::longest_path(&needs, &estimates);
    let parallelism = parallelism.max(1);
    let estimated_duration = simulate(&jobs, parallelism);
    Ok(Plan {
        environment: env.to_string(),
        selection: selection.clone(),
        parallelism,
        jobs,
        waves,
        critical_path,
        critical_path_duration,
        estimated_duration,
        estimated_from_history: from_history,
    })
}

fn none_if_empty(v: &[&str]) -> String {
    if v.is_empty() { "(none)".to_string() } else { v.join(", ") }
}

/// Makespan of list scheduling with `slots` workers, jobs taken in plan
/// order as they become ready: what the scheduler does.
fn simulate(jobs: &[PlannedJob], slots: usize) -> Duration {
    let n = jobs.len();
    let mut remaining: Vec<usize> = jobs.iter().map(|j| j.needs.len()).collect();
    let mut dependants: Vec<Vec<usize>> = vec![vec![]; n];
    for (p, j) in jobs.iter().enumerate() {
        for d in &j.needs {
            dependants[*d].push(p);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|p| remaining[*p] == 0).collect();
    // (finish time, job) of running jobs
    let mut running: Vec<(Duration, usize)> = Vec::new();
    let mut now = Duration::ZERO;
    let mut done = 0;
    while done < n {
        while running.len() < slots {
            let Some(p) = ready.pop_first() else { break };
            running.push((now + jobs[p].estimate, p));
        }
        let Some(idx) = running.iter().enumerate().min_by_key(|(_, (f, _))| *f).map(|(i, _)| i) else { break };
        let (t, p) = running.swap_remove(idx);
        now = t;
        done += 1;
        for &d in &dependants[p] {
            remaining[d] -= 1;
            if remaining[d] == 0 {
                ready.insert(d);
            }
        }
    }
    now
}

pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

impl Plan {
    /// The plan for people: waves, critical path, and how sure the
    /// estimate is.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan for environment {:?}: {} job{} in {} wave{}, parallelism {}\n",
            self.environment,
            self.jobs.len(),
            if self.jobs.len() == 1 { "" } else { "s" },
            self.waves.len(),
            if self.waves.len() == 1 { "" } else { "s" },
            self.parallelism
        );
        let critical: BTreeSet<usize> = self.critical_path.iter().copied().collect();
        for (w, members) in self.waves.iter().enumerate() {
            let _ = writeln!(out, "wave {} ({}):", w + 1, if members.len() > 1 { format!("{} jobs in parallel", members.len()) } else { "1 job".to_string() });
            for &p in members {
                let j = &self.jobs[p];
                let needs: Vec<&str> = j.needs.iter().map(|d| self.jobs[*d].name.as_str()).collect();
                let source = match j.estimate_source {
                    EstimateSource::History => "past runs",
                    EstimateSource::Timeout => "timeout",
                    EstimateSource::DefaultTimeout => "default timeout",
                };
                let _ = writeln!(
                    out,
                    "  {} {:<28} ~{:<8} ({source}){}",
                    if critical.contains(&p) { "*" } else { " " },
                    j.name,
                    format_duration(j.estimate),
                    if needs.is_empty() { String::new() } else { format!("  after {}", needs.join(", ")) }
                );
            }
        }
        let path: Vec<&str> = self.critical_path.iter().map(|p| self.jobs[*p].name.as_str()).collect();
        let _ = writeln!(out, "\ncritical path (*): {}  ({})", path.join(" → "), format_duration(self.critical_path_duration));
        let basis = if self.estimated_from_history == self.jobs.len() {
            "from recorded durations of past runs".to_string()
        } else if self.estimated_from_history == 0 {
            "from timeouts (no past runs recorded): an upper bound".to_string()
        } else {
            format!("from recorded durations for {} of {} jobs, timeouts for the rest: an upper bound", self.estimated_from_history, self.jobs.len())
        };
        let _ = writeln!(out, "estimated total: {} with parallelism {}, {basis}", format_duration(self.estimated_duration), self.parallelism);
        out
    }

    /// Graphviz: edges from a job to what needs it; the critical path bold.
    pub fn render_dot(&self) -> String {
        let mut out = String::from("digraph slipway {\n  rankdir=LR;\n  node [shape=box];\n");
        let critical: BTreeSet<usize> = self.critical_path.iter().copied().collect();
        for (p, j) in self.jobs.iter().enumerate() {
            let style = if critical.contains(&p) { ", style=bold, color=red" } else { "" };
            let _ = writeln!(out, "  \"{}\" [label=\"{}\\n~{}\"{style}];", j.name, j.name, format_duration(j.estimate));
        }
        for (p, j) in self.jobs.iter().enumerate() {
            for d in &j.needs {
                let on_path = critical.contains(&p) && critical.contains(d);
                let style = if on_path { " [style=bold, color=red]" } else { "" };
                let _ = writeln!(out, "  \"{}\" -> \"{}\"{style};", self.jobs[*d].name, j.name);
            }
        }
        out.push_str("}\n");
        out
    }
}
