//! What `deploy`, `run`, `rollback` and `promote` show while a deployment
//! runs: every job's start and end (a job that started and ended between
//! two looks still gets its start line, at the time it started), and the
//! rollout's own steps as they happen (instances started, health checks
//! passing, traffic switched, old ones draining and stopped), read from
//! the rollout jobs' log. On a terminal, running jobs are live spinners
//! (indicatif) under the lines; otherwise every line is plain text with a
//! timestamp. The deployment's last line comes after every job's.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::api::wire::{DeploymentDetail, Job, LogLine};
use crate::store::JobState;

/// One thing to say, at the time it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Said {
    pub at: i64,
    pub job: String,
    pub text: String,
    /// The job runs from here on (a spinner on a terminal).
    pub running: bool,
    /// The job has ended (its spinner goes).
    pub ended: bool,
}

/// Which jobs' log lines are rollout steps worth showing live.
pub fn shows_log(job: &str) -> bool {
    job.ends_with(".rollout")
}

/// The job events between what was seen and `detail`, each at its own
/// time; `seen` is updated. Pure, so its order is tested.
pub fn job_events(seen: &mut HashMap<String, (JobState, i64)>, detail: &DeploymentDetail, symbol: fn(JobState) -> &'static str) -> Vec<Said> {
    let mut out = Vec::new();
    for j in &detail.jobs {
        let key = (j.state, j.attempt);
        let before = seen.get(&j.name).copied();
        if before == Some(key) || j.state == JobState::Pending {
            continue;
        }
        seen.insert(j.name.clone(), key);
        // A start not shown yet: shown now, at the time it happened, even
        // if the job has ended since.
        let started_shown = matches!(before, Some((JobState::Running, a)) if a == j.attempt);
        if j.state != JobState::Ready && !started_shown && j.state != JobState::Running && j.started_at.is_some() && j.attempt > 0 {
            out.push(start(j, symbol));
        }
        out.push(match j.state {
            JobState::Running => start(j, symbol),
            JobState::Ready if j.attempt > 0 => said(
                j,
                j.finished_at.or(j.started_at),
                format!("{} {:<24} waiting to retry: {}", symbol(j.state), j.name, j.reason.clone().unwrap_or_default()),
                false,
                true,
            ),
            JobState::Ready => said(j, None, format!("{} {:<24} ready", symbol(j.state), j.name), false, false),
            JobState::Succeeded => said(j, j.finished_at, format!("{} {:<24} succeeded in {}", symbol(j.state), j.name, duration(j.duration_ms)), false, true),
            s => said(j, j.finished_at, format!("{} {:<24} {s}: {}", symbol(s), j.name, j.reason.clone().unwrap_or_default()), false, true),
        });
    }
    out.sort_by_key(|s| s.at);
    out
}

fn start(j: &Job, symbol: fn(JobState) -> &'static str) -> Said {
    let text = format!(
        "{} {:<24} started (attempt {}{})",
        symbol(JobState::Running),
        j.name,
        j.attempt,
        j.node.as_deref().map(|n| format!(" on {n}")).unwrap_or_default()
    );
    said(j, j.started_at, text, true, false)
}

fn said(j: &Job, at: Option<i64>, text: String, running: bool, ended: bool) -> Said {
    Said { at: at.unwrap_or_else(crate::store::now_ms), job: j.name.clone(), text, running, ended }
}

fn duration(ms: Option<i64>) -> String {
    ms.map(|m| crate::plan::format_duration(Duration::from_millis(m.max(0) as u64))).unwrap_or_else(|| "-".into())
}

/// In the order they happened, except that a job's end comes after its
/// own log lines (a rollout writes its last steps as its attempt is
/// recorded).
pub fn in_order(mut said: Vec<Said>) -> Vec<Said> {
    let mut last_line: HashMap<String, i64> = HashMap::new();
    for s in said.iter().filter(|s| !s.running && !s.ended) {
        let at = last_line.entry(s.job.clone()).or_insert(s.at);
        *at = (*at).max(s.at);
    }
    for s in said.iter_mut().filter(|s| s.ended) {
        if let Some(at) = last_line.get(&s.job) {
            s.at = s.at.max(*at);
        }
    }
    // Stable: what happened at the same time keeps its order, ends last.
    said.sort_by_key(|s| (s.at, s.ended));
    said
}

/// A rollout step from the log, as a line.
pub fn log_event(l: &LogLine) -> Said {
    let step = l.line.strip_prefix("[rollout] ").unwrap_or(&l.line);
    Said { at: l.ts, job: l.job.clone(), text: format!("    {} │ {step}", l.job), running: false, ended: false }
}

/// `HH:MM:SS` (UTC) of a time in ms.
pub fn clock(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.strftime("%H:%M:%S").to_string()).unwrap_or_else(|_| "--:--:--".into())
}

/// Where progress goes: a live display on a terminal, lines otherwise.
pub enum Display {
    Live { multi: MultiProgress, bars: HashMap<String, ProgressBar> },
    Lines,
}

impl Display {
    pub fn new() -> Display {
        if std::io::stdout().is_terminal() && std::env::var_os("TERM").is_some_and(|t| t != "dumb") {
            Display::Live { multi: MultiProgress::new(), bars: HashMap::new() }
        } else {
            Display::Lines
        }
    }

    /// A line about the deployment itself (state changes, the end).
    pub fn line(&self, text: &str) {
        match self {
            Display::Live { multi, .. } => {
                if multi.println(text).is_err() {
                    println!("{text}");
                }
            }
            Display::Lines => println!("{} {text}", clock(crate::store::now_ms())),
        }
    }

    pub fn say(&mut self, s: &Said) {
        match self {
            Display::Lines => println!("{} {}", clock(s.at), s.text),
            Display::Live { multi, bars } => {
                if s.ended
                    && let Some(b) = bars.remove(&s.job)
                {
                    b.finish_and_clear();
                }
                if multi.println(&s.text).is_err() {
                    println!("{}", s.text);
                }
                if s.running && !bars.contains_key(&s.job) {
                    let b = multi.add(ProgressBar::new_spinner());
                    let style =
                        ProgressStyle::with_template("  {spinner} {prefix:<24} {elapsed:>4} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner());
                    b.set_style(style);
                    b.set_prefix(s.job.clone());
                    b.enable_steady_tick(Duration::from_millis(120));
                    bars.insert(s.job.clone(), b);
                } else if let Some(b) = bars.get(&s.job) {
                    // The job's latest step, beside its spinner.
                    b.set_message(s.text.split(" │ ").nth(1).unwrap_or_default().to_string());
                }
            }
        }
    }

    /// The live spinners go (before the last line).
    pub fn finish(&mut self) {
        if let Display::Live { bars, multi } = self {
            for (_, b) in bars.drain() {
                b.finish_and_clear();
            }
            let _ = multi.clear();
        }
    }
}

impl Default for Display {
    fn default() -> Self {
        Display::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::Deployment;
    use crate::store::{DeploymentKind, DeploymentState};

    fn job(name: &str, state: JobState, attempt: i64, started: Option<i64>, finished: Option<i64>) -> Job {
        Job {
            name: name.into(),
            state,
            attempt,
            node: None,
            needs: vec![],
            started_at: started,
            finished_at: finished,
            duration_ms: started.map(|s| finished.unwrap_or(s) - s),
            exit_code: None,
            reason: None,
        }
    }

    fn detail(jobs: Vec<Job>) -> DeploymentDetail {
        let d = Deployment {
            id: 1,
            kind: DeploymentKind::Run,
            environment: "e".into(),
            service: None,
            version: None,
            revision: "r".into(),
            state: DeploymentState::Running,
            reason: None,
            superseded_by: None,
            cancel_requested: false,
            created_at: 0,
            started_at: Some(0),
            finished_at: None,
            duration_ms: None,
            cause: None,
        };
        DeploymentDetail::new(d, jobs, vec![])
    }

    fn sym(_: JobState) -> &'static str {
        "*"
    }

    #[test]
    fn a_job_that_started_and_ended_unseen_gets_its_start_line_first() {
        let mut seen = HashMap::new();
        let said = job_events(
            &mut seen,
            &detail(vec![job("fast", JobState::Succeeded, 1, Some(100), Some(105)), job("slow", JobState::Running, 1, Some(101), None)]),
            sym,
        );
        let texts: Vec<(i64, bool, bool)> = said.iter().map(|s| (s.at, s.running, s.ended)).collect();
        assert_eq!(texts, vec![(100, true, false), (101, true, false), (105, false, true)], "{said:#?}");
        assert!(said[0].text.contains("fast") && said[0].text.contains("started"));
        assert!(said[2].text.contains("fast") && said[2].text.contains("succeeded"));
        // Seen once: nothing again.
        assert!(job_events(&mut seen, &detail(vec![job("fast", JobState::Succeeded, 1, Some(100), Some(105))]), sym).is_empty());
    }

    #[test]
    fn a_seen_start_is_not_repeated_at_the_end() {
        let mut seen = HashMap::new();
        job_events(&mut seen, &detail(vec![job("j", JobState::Running, 1, Some(10), None)]), sym);
        let said = job_events(&mut seen, &detail(vec![job("j", JobState::Failed, 1, Some(10), Some(20))]), sym);
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(said[0].ended && said[0].text.contains("failed"));
    }

    #[test]
    fn a_jobs_end_comes_after_its_own_last_lines() {
        let l = |at: i64, job: &str| Said { at, job: job.into(), text: format!("{job} line"), running: false, ended: false };
        let end = Said { at: 10, job: "a".into(), text: "a ended".into(), running: false, ended: true };
        let out = in_order(vec![l(5, "a"), end, l(12, "a"), l(11, "b")]);
        let texts: Vec<&str> = out.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["a line", "b line", "a line", "a ended"]);
    }

    #[test]
    fn only_rollouts_show_their_log() {
        assert!(shows_log("web.rollout") && !shows_log("web.migrate") && !shows_log("build"));
        assert_eq!(clock(3_723_000), "01:02:03");
    }
}
