//! The shape of a deployment's graph as it ran: waves (longest distance
//! from a job that needs nothing) and the critical path by the durations
//! jobs actually took. The dashboard draws it; the planner's own critical
//! path ([`super::build`]) uses estimates and the same longest-path rule
//! ([`longest_path`]).

use std::collections::HashMap;
use std::time::Duration;

/// One job as recorded: its name, what it needs, how long it took so far.
pub struct RanJob<'a> {
    pub name: &'a str,
    pub needs: &'a [String],
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Job indexes per wave, each wave in the order the jobs were given.
    pub waves: Vec<Vec<usize>>,
    /// Job indexes from a first job to the one that ends last.
    pub critical_path: Vec<usize>,
    pub critical_path_duration: Duration,
}

/// Waves and critical path of `jobs`. Needs naming no job of the list are
/// ignored (a revision's exact selection leaves some out). The recorded
/// graph has no cycle, but a store row edited by hand might: jobs on a
/// cycle go into one last wave rather than loop or panic.
pub fn shape(jobs: &[RanJob<'_>]) -> Shape {
    let index: HashMap<&str, usize> = jobs.iter().enumerate().map(|(i, j)| (j.name, i)).collect();
    let needs: Vec<Vec<usize>> = jobs.iter().map(|j| j.needs.iter().filter_map(|n| index.get(n.as_str()).copied()).collect()).collect();
    // Kahn's order: every job after all it needs.
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut needed_by = vec![Vec::new(); jobs.len()];
    for (i, ns) in needs.iter().enumerate() {
        for &n in ns {
            needed_by[n].push(i);
        }
    }
    let mut order: Vec<usize> = (0..jobs.len()).filter(|i| waiting[*i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let i = order[next];
        next += 1;
        for &d in &needed_by[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                order.push(d);
            }
        }
    }
    let mut wave = vec![usize::MAX; jobs.len()];
    for &i in &order {
        wave[i] = needs[i].iter().map(|n| wave[*n] + 1).max().unwrap_or(0);
    }
    let last = order.iter().map(|i| wave[*i] + 1).max().unwrap_or(0);
    let stuck: Vec<usize> = (0..jobs.len()).filter(|i| wave[*i] == usize::MAX).collect();
    for &i in &stuck {
        wave[i] = last;
    }
    let mut waves = vec![Vec::new(); last + usize::from(!stuck.is_empty())];
    for (i, w) in wave.iter().enumerate() {
        waves[*w].push(i);
    }
    // The longest path over the acyclic part, in its topological order.
    let local: HashMap<usize, usize> = order.iter().enumerate().map(|(p, i)| (*i, p)).collect();
    let local_needs: Vec<Vec<usize>> = order.iter().map(|i| needs[*i].iter().map(|n| local[n]).collect()).collect();
    let took: Vec<Duration> = order.iter().map(|i| jobs[*i].took).collect();
    let (path, critical_path_duration) = longest_path(&local_needs, &took);
    // Before any job has taken time there is no critical path to show.
    let critical_path = if critical_path_duration.is_zero() { vec![] } else { path.into_iter().map(|p| order[p]).collect() };
    Shape { waves, critical_path, critical_path_duration }
}

/// The longest path through jobs given in dependency order (`needs[p]`
/// holds positions before `p`), weighted by `weight`: positions from its
/// first job to its last, and its length. Ties go to the earlier job.
pub fn longest_path(needs: &[Vec<usize>], weight: &[Duration]) -> (Vec<usize>, Duration) {
    let mut finish = vec![Duration::ZERO; needs.len()];
    let mut prev: Vec<Option<usize>> = vec![None; needs.len()];
    for p in 0..needs.len() {
        let (start, from) = needs[p].iter().map(|d| (finish[*d], Some(*d))).max_by_key(|(f, _)| *f).unwrap_or((Duration::ZERO, None));
        finish[p] = start + weight[p];
        prev[p] = from;
    }
    let mut path = Vec::new();
    let mut at = (0..needs.len()).max_by_key(|p| (finish[*p], std::cmp::Reverse(*p)));
    let length = at.map(|p| finish[p]).unwrap_or_default();
    while let Some(p) = at {
        path.push(p);
        at = prev[p];
    }
    path.reverse();
    (path, length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran<'a>(name: &'a str, needs: &'a [String], ms: u64) -> RanJob<'a> {
        RanJob { name, needs, took: Duration::from_millis(ms) }
    }

    fn names(jobs: &[RanJob<'_>], idx: &[usize]) -> Vec<String> {
        idx.iter().map(|i| jobs[*i].name.to_string()).collect()
    }

    #[test]
    fn waves_follow_needs_and_the_path_follows_durations() {
        let none: Vec<String> = vec![];
        let a = vec!["build".to_string()];
        let both = vec!["slow".to_string(), "fast".to_string()];
        // Given out of order, with a need outside the deployment.
        let outside = vec!["build".to_string(), "not-here".to_string()];
        let jobs = [ran("deploy", &both, 100), ran("slow", &a, 5000), ran("build", &none, 1000), ran("fast", &outside, 10)];
        let s = shape(&jobs);
        let waves: Vec<Vec<String>> = s.waves.iter().map(|w| names(&jobs, w)).collect();
        assert_eq!(waves, vec![vec!["build"], vec!["slow", "fast"], vec!["deploy"]]);
        assert_eq!(names(&jobs, &s.critical_path), vec!["build", "slow", "deploy"]);
        assert_eq!(s.critical_path_duration, Duration::from_millis(6100));
    }

    #[test]
    fn a_cycle_goes_into_a_last_wave_without_looping() {
        let a = vec!["b".to_string()];
        let b = vec!["a".to_string()];
        let none: Vec<String> = vec![];
        let jobs = [ran("a", &a, 1), ran("b", &b, 1), ran("root", &none, 7)];
        let s = shape(&jobs);
        let waves: Vec<Vec<String>> = s.waves.iter().map(|w| names(&jobs, w)).collect();
        assert_eq!(waves, vec![vec!["root"], vec!["a", "b"]]);
        assert_eq!(names(&jobs, &s.critical_path), vec!["root"]);
    }

    #[test]
    fn nothing_ran_yet_has_no_critical_path() {
        let none: Vec<String> = vec![];
        let a = vec!["a".to_string()];
        let jobs = [ran("a", &none, 0), ran("b", &a, 0)];
        let s = shape(&jobs);
        assert_eq!((s.waves.len(), s.critical_path.len()), (2, 0));
    }

    #[test]
    fn nothing_has_no_shape() {
        assert_eq!(shape(&[]), Shape { waves: vec![], critical_path: vec![], critical_path_duration: Duration::ZERO });
    }
}
