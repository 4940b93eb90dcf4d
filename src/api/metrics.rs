//! `/metrics` in the Prometheus text format.
//!
//! Two sources: counts of deployments and jobs by state and the queue
//! depth are read from the store at scrape time (the truth for every node
//! sharing it); durations and latencies are observed from this node's
//! scheduler events.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::events::Event;
use crate::store::{Counts, DeploymentState, JobState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

pub struct Metrics {
    registry: Registry,
    deployments: Family<StateLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    queued_deployments: Gauge,
    job_duration: Family<OutcomeLabel, Histogram>,
    jobs_finished: Family<OutcomeLabel, Counter>,
    event_to_start: Histogram,
    queue_wait: Histogram,
}

fn buckets() -> impl Iterator<Item = f64> {
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slipway");
        let deployments = Family::<StateLabel, Gauge>::default();
        let jobs = Family::<StateLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let queued_deployments = Gauge::default();
        let job_duration = Family::<OutcomeLabel, Histogram>::new_with_constructor(|| Histogram::new(buckets()) as Histogram);
        let jobs_finished = Family::<OutcomeLabel, Counter>::default();
        let event_to_start = Histogram::new(buckets());
        let queue_wait = Histogram::new(buckets());
        registry.register("deployments", "Deployments by state (whole store)", deployments.clone());
        registry.register("jobs", "Jobs by state (whole store)", jobs.clone());
        registry.register("queue_depth", "Jobs ready and waiting for a slot (whole store)", queue_depth.clone());
        registry.register("queued_deployments", "Deployments waiting for their lock (whole store)", queued_deployments.clone());
        registry.register("job_duration_seconds", "Duration of job attempts run by this node, by outcome", job_duration.clone());
        registry.register("job_attempts_finished", "Job attempts finished on this node, by outcome", jobs_finished.clone());
        registry.register(
            "event_to_start_seconds",
            "From an event's acceptance to the start of each first attempt of its jobs (this node)",
            event_to_start.clone(),
        );
        registry.register("job_queue_wait_seconds", "From a job becoming ready to its start (this node)", queue_wait.clone());
        Metrics { registry, deployments, jobs, queue_depth, queued_deployments, job_duration, jobs_finished, event_to_start, queue_wait }
    }

    fn observe(&self, event: &Event) {
        match event {
            Event::JobStarted { attempt, queued_for, since_event, .. } => {
                self.queue_wait.observe(queued_for.as_secs_f64());
                if *attempt == 1 {
                    self.event_to_start.observe(since_event.as_secs_f64());
                }
            }
            Event::JobFinished { outcome, duration, .. } => {
                let l = OutcomeLabel { outcome: outcome.as_str().to_string() };
                self.job_duration.get_or_create(&l).observe(duration.as_secs_f64());
                self.jobs_finished.get_or_create(&l).inc();
            }
            _ => {}
        }
    }

    /// Render, with store counts read just now.
    pub fn render(&self, counts: &Counts) -> String {
        for s in DeploymentState::ALL {
            let n = counts.deployments.iter().find(|(x, _)| x == s).map(|(_, n)| *n).unwrap_or(0);
            self.deployments.get_or_create(&StateLabel { state: s.as_str().into() }).set(n);
        }
        for s in JobState::ALL {
            let n = counts.jobs.iter().find(|(x, _)| x == s).map(|(_, n)| *n).unwrap_or(0);
            self.jobs.get_or_create(&StateLabel { state: s.as_str().into() }).set(n);
        }
        self.queue_depth.set(counts.ready);
        self.queued_deployments.set(counts.queued_deployments);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        classic_text(&out)
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// prometheus-client writes OpenMetrics; served as Prometheus' classic
/// text format (what `promtool check metrics` and every scraper read) it
/// needs three changes: a counter's HELP and TYPE name its `_total`
/// samples, and OpenMetrics' `# EOF`, `# UNIT` and `_created` samples go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) { format!("{name}_total") } else { name.to_string() };
            out.push_str(&format!("{prefix}{name} {tail}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if sample.strip_suffix("_created").is_some_and(|f| counters.contains(f)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The metrics consumer of the node's event bus ([`crate::events`]).
pub async fn consume(metrics: Arc<Metrics>, mut events: crate::events::Subscription) {
    while let Some(ev) = events.recv().await {
        metrics.observe(&ev);
    }
}

#[cfg(test)]
mod classic_tests {
    #[test]
    fn issue18_counters_are_named_by_their_samples_and_openmetrics_only_lines_go() {
        let om = "# HELP a_finished Done.\n# TYPE a_finished counter\na_finished_total{x=\"1\"} 2\na_finished_created{x=\"1\"} 1.5\n# HELP g A gauge.\n# TYPE g gauge\ng 3\n# EOF\n";
        assert_eq!(
            super::classic_text(om),
            "# HELP a_finished_total Done.\n# TYPE a_finished_total counter\na_finished_total{x=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 3\n"
        );
    }
}
